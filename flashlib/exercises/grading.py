"""What every grader shares: running cases into a Verdict, comparing arrays, the reference answers."""
import time

import numpy as np

from ..constants import NEG_INF
from ..env import gpu_name, simulated
from ..reference import attention_forward as attention  # noqa: F401  (the graders' answers: O, lse in float64)

EMPTY_HINT = ("a row that has seen no score yet has m = -inf and l = 0; exp(-inf - (-inf)) is nan, so use a finite "
              "stand-in for m (e.g. 0) where m is -inf")


class ExerciseFailed(AssertionError):
    """A solution cell's grader failed (raised with strict=True)."""


class Verdict:
    """What a grader found: `passed`, the `message` it printed, the cases it ran and the seconds they took."""

    def __init__(self, name, passed, message, cases, seconds):
        self.name, self.passed, self.message, self.cases, self.seconds = name, passed, message, cases, seconds

    def __bool__(self):
        return self.passed

    def __repr__(self):
        return self.message


def where_run():
    """'the Numba CUDA simulator (CPU)' or the GPU's name: where a kernel grader runs."""
    return "the Numba CUDA simulator (CPU)" if simulated() else f"the GPU ({gpu_name()})"


def _grade(name, cases, strict, where=None):
    """Run cases [(label, thunk)]: a thunk returns None when the answer is right, else what is wrong."""
    t0 = time.perf_counter()
    on = f" on {where}" if where else ""
    for n, (label, run) in enumerate(cases):
        try:
            with np.errstate(all="ignore"):        # the reader's nan/inf is reported in the verdict instead
                problem = run()
        except NotImplementedError:
            return _finish(name, False, f"{name}: not written yet (your function raises NotImplementedError). "
                                        "Fill in the parts marked ___ and run this cell again.", n, t0, strict=False)
        except Exception as e:  # noqa: BLE001  (the reader's bug: report it as a verdict)
            problem = f"raised {type(e).__name__}: {str(e)[:300]}"
        if problem:
            return _finish(name, False, f"FAIL {name}{on}, case {n + 1}/{len(cases)} ({label}): {problem}", n + 1, t0,
                           strict)
    return _finish(name, True, f"PASS {name}: all {len(cases)} cases{on} "
                               f"({'; '.join(label for label, _ in cases)})", len(cases), t0, strict)


def _finish(name, passed, message, cases, t0, strict):
    seconds = time.perf_counter() - t0
    message += f" [{seconds:.1f} s]"
    print(message)
    if strict and not passed:
        raise ExerciseFailed(message)
    return Verdict(name, passed, message, cases, seconds)


def _compare(what, got, expected, rtol=1e-7, atol=1e-9):
    """None if `got` matches `expected` (same shape, -inf where expected has -inf), else a one-line description
    of the first element that differs."""
    expected = np.asarray(expected, np.float64)
    try:
        got = np.asarray(got, np.float64)
    except (TypeError, ValueError) as e:
        return f"{what} is not an array of numbers ({e})"
    if got.shape != expected.shape:
        return f"{what} has shape {got.shape}, expected {expected.shape}"
    ok = np.isclose(got, expected, rtol=rtol, atol=atol) | ((got == expected) & np.isinf(expected))
    if ok.all():
        return None
    pos = tuple(int(p) for p in np.argwhere(~ok)[0])
    at = f"{what}[{', '.join(map(str, pos))}]" if pos else what
    return (f"{at} = {got[pos]:.6g}, expected {expected[pos]:.6g} "
            f"({int((~ok).sum())} of {ok.size} elements of {what} {tuple(expected.shape)} wrong)")


def _first(*problems):
    return next((p for p in problems if p), None)


def _unpack(out, n, names):
    if not isinstance(out, (tuple, list)) or len(out) != n:
        raise TypeError(f"return {n} values ({', '.join(names)}), got {type(out).__name__}"
                        + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""))
    return out


def softmax_state(x):
    """(m, l) of the rows of x (..., n): the maximum and sum of exp(x - m); (-inf, 0) for a row of -inf."""
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1) if x.shape[-1] else np.full(x.shape[:-1], NEG_INF)
    l = np.exp(x - np.where(np.isneginf(m), 0.0, m)[..., None]).sum(axis=-1)
    return m, l


def _empty_hint(problem):
    return problem and f"{problem}. Hint: {EMPTY_HINT}"


FORWARD_CASES = [  # (Nq, Nk, d, Br, Bc, causal, input scale)
    (32, 32, 8, 16, 16, False, 1), (37, 29, 12, 16, 8, False, 1), (20, 45, 5, 8, 16, True, 1),
    (45, 20, 5, 8, 16, True, 1), (7, 9, 3, 16, 16, False, 1), (24, 24, 8, 8, 8, True, 12)]


def _case_label(Nq, Nk, d, Br, Bc, causal, scale):
    return (f"Nq = {Nq}, Nk = {Nk}, d = {d}, Br = {Br}, Bc = {Bc}" + (", causal" if causal else "")
            + (", large scores" if scale > 1 else ""))
