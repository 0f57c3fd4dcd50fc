"""Graders for the book's coding exercises: each runs the reader's function (or Numba kernel) on random and
edge-case inputs against float64 answers from flashlib's reference, and prints a short verdict that names the
first failing case (its shapes, the position, expected vs got).

    check_merge(merge)                 # chapter 06: merge two softmax states (m, l)
    check_online_softmax(fn)           # chapter 06: one pass over a row, (m, l)
    check_ring_step(fn)                # merge two partial attentions by their logsumexp (a ring step)
    check_tiled_matmul(fn)             # chapter 05: C = A B tile by tile, in NumPy
    check_matmul_kernel(kernel, T)     # chapter 05: the tiled matmul as a Numba kernel
    check_fa1_step(fn)                 # chapter 07: lines 10-13 of Algorithm 1 on one score tile
    check_tiled_forward(fn)            # chapters 07, 08: a whole tiled forward, (O, lse)
    check_numba_tile_kernel(kernel, Br, D)  # chapter 08: FA2's forward of one Q tile per thread block, Numba
    check_backward_dS(fn)              # chapter 09: D and dS of one tile
    check_backward(fn)                 # chapter 09: the tiled backward, (dQ, dK, dV)
    check_tile_visible(fn)             # chapter 10: which causal tiles to compute
    check_causal_skip(fn)              # chapter 10: a causal forward that skips the hidden tiles
    check_zigzag_positions(fn)         # chapter 15: the positions a rank holds in the zigzag layout
    check_block_kind(fn)               # chapter 15: skip, mask or compute fully one ring block under causality

Every grader returns a `Verdict` (truthy when all cases pass). A function that still raises NotImplementedError
gets a kind "not written yet" verdict. `strict=True` (the book's solution cells) raises ExerciseFailed on a
failure, so a solution that stops passing fails the build. Convention for a row that sees no key (fully
masked): m = -inf, l = 0, O = 0, lse = -inf. Kernels run in Numba's CUDA simulator without a GPU (each
grader there takes a few seconds) and on the GPU in Colab.
"""
import math
import time

import numpy as np

from . import reference, tiled

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
    from .env import simulated
    if simulated():
        return "the Numba CUDA simulator (CPU)"
    from numba import cuda
    name = cuda.get_current_device().name
    return f"the GPU ({name.decode() if isinstance(name, bytes) else name})"


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
    m = x.max(axis=-1) if x.shape[-1] else np.full(x.shape[:-1], -np.inf)
    l = np.exp(x - np.where(np.isneginf(m), 0.0, m)[..., None]).sum(axis=-1)
    return m, l


def attention(q, k, v, causal=False, scale=None, mask=None):
    """Reference (O, lse) with the convention for rows that see no key: O = 0, lse = -inf. mask (Nq, Nk) bool
    hides scores where it is False."""
    S = reference.scores(q, k, causal, scale)
    if mask is not None:
        S = np.where(mask, S, -np.inf)
    m, l = softmax_state(S)
    P = np.exp(S - np.where(np.isneginf(m), 0.0, m)[..., None]) / np.where(l > 0, l, 1.0)[..., None]
    return P @ np.asarray(v, np.float64), np.where(l > 0, m + np.log(np.where(l > 0, l, 1.0)), -np.inf)


# ----- chapter 06: softmax states --------------------------------------------------------------------------

def _rows(rng, shape, kind):
    x = rng.standard_normal(shape) * 3
    if kind == "large":
        x += 1000.0
    return x


def check_merge(fn, strict=False, seed=0):
    """fn(m_a, l_a, m_b, l_b) -> (m, l): arrays (rows,), the state of the union of two disjoint chunks."""
    rng = np.random.default_rng(seed)

    def case(xa, xb):
        def run():
            (ma, la), (mb, lb) = softmax_state(xa), softmax_state(xb)
            m, l = _unpack(fn(ma, la, mb, lb), 2, ("m", "l"))
            me, le = softmax_state(np.concatenate([xa, xb], axis=-1))
            return _first(_compare("m", m, me), _compare("l", l, le))
        return run

    a, b = _rows(rng, (5, 7), "random"), _rows(rng, (5, 4), "random")
    b[0] += 20                                         # b holds the max of row 0, a of others
    empty = np.full((3, 4), -np.inf)
    mixed = _rows(rng, (3, 4), "random")
    mixed[1] = -np.inf
    cases = [("random scores, 5 rows", case(a, b)),
             ("large scores (about 1000)", case(_rows(rng, (4, 6), "large"), _rows(rng, (4, 6), "large"))),
             ("one chunk empty (m_b = -inf, l_b = 0)", case(_rows(rng, (3, 5), "random"), empty)),
             ("both chunks empty: a fully masked row", lambda: _empty_hint(case(empty, mixed)()))]
    return _grade("check_merge", cases, strict)


def _empty_hint(problem):
    return problem and f"{problem}. Hint: {EMPTY_HINT}"


def check_online_softmax(fn, strict=False, seed=0):
    """fn(x) -> (m, l): x (rows, n) read one column at a time; m, l (rows,) the running max and sum."""
    rng = np.random.default_rng(seed)

    def case(x, hint=None):
        def run():
            m, l = _unpack(fn(x.copy()), 2, ("m", "l"))
            me, le = softmax_state(x)
            p = _first(_compare("m", m, me), _compare("l", l, le))
            return p and (f"{p}. Hint: {hint}" if hint else p)
        return run

    grow = np.stack([np.arange(8.0), np.arange(8.0)[::-1], rng.standard_normal(8) * 4])
    masked = _rows(rng, (3, 9), "random")
    masked[0, ::2] = -np.inf
    masked[2] = -np.inf
    cases = [("random scores, 4 rows of 10", case(_rows(rng, (4, 10), "random"))),
             ("max grows at every key (row 0), never (row 1)", case(grow, "when the max grows, the sum so far "
                                                                      "must be rescaled by exp(m_old - m_new)")),
             ("large scores (about 1000)", case(_rows(rng, (3, 12), "large"), "subtract the running max before "
                                                                             "exp: exp(1000) overflows")),
             ("masked scores, row 2 fully masked", case(masked, EMPTY_HINT))]
    return _grade("check_online_softmax", cases, strict)


def check_ring_step(fn, strict=False, seed=0):
    """fn(O_a, lse_a, O_b, lse_b) -> (O, lse): two normalised partial attentions over disjoint key sets
    (O (Nq, d), lse (Nq,)) merged into the attention over both (one step of ring attention)."""
    rng = np.random.default_rng(seed)

    def case(q, k, v, split, mask=None):
        def run():
            ma = mb = None
            if mask is not None:
                ma, mb = mask[:, :split], mask[:, split:]
            Oa, la = attention(q, k[:split], v[:split], mask=ma)
            Ob, lb = attention(q, k[split:], v[split:], mask=mb)
            O, lse = _unpack(fn(Oa, la, Ob, lb), 2, ("O", "lse"))
            Oe, le = attention(q, k, v, mask=mask)
            return _first(_compare("O", O, Oe), _compare("lse", lse, le))
        return run

    q, k, v = (rng.standard_normal((n, 6)) for n in (5, 11, 11))
    mask = np.ones((5, 11), bool)
    mask[1, :4] = False                                # row 1 sees nothing in chunk a
    mask[3] = False                                    # row 3 sees nothing at all
    cases = [("random, Nq = 5, keys split 4 + 7", case(q, k, v, 4)),
             ("large scores", case(8 * q, 8 * k, v, 6)),
             ("row 1 masked in one chunk, row 3 fully masked (O = 0, lse = -inf)",
              lambda: _empty_hint(case(q, k, v, 4, mask)()))]
    return _grade("check_ring_step", cases, strict)


# ----- chapter 05: tiled matrix multiply --------------------------------------------------------------------

def _matmul_cases(rng):
    return [(f"M, K, N = {M}, {K}, {N}, T = {T}", rng.standard_normal((M, K)), rng.standard_normal((K, N)), T)
            for M, K, N, T in ((16, 16, 16, 8), (19, 23, 13, 8), (5, 3, 7, 4))]


def check_tiled_matmul(fn, strict=False, seed=0):
    """fn(A, B, T) -> C: A (M, K) @ B (K, N) computed tile by tile, T x T tiles, ragged edges included."""
    rng = np.random.default_rng(seed)
    cases = [(label, (lambda A=A, B=B, T=T: _compare("C", fn(A.copy(), B.copy(), T), A @ B)))
             for label, A, B, T in _matmul_cases(rng)]
    return _grade("check_tiled_matmul", cases, strict)


def check_matmul_kernel(kernel, T, strict=False, seed=0):
    """kernel[(ceil(N/T), ceil(M/T)), (T, T)](A, B, C): float32 device arrays, C (M, N) = A (M, K) @ B (K, N).
    C starts filled with NaN: an element the kernel never writes fails."""
    from numba import cuda
    rng = np.random.default_rng(seed)

    def case(A, B):
        def run():
            A32, B32 = A.astype(np.float32), B.astype(np.float32)
            C = cuda.to_device(np.full((A.shape[0], B.shape[1]), np.nan, np.float32))
            kernel[(math.ceil(B.shape[1] / T), math.ceil(A.shape[0] / T)), (T, T)](
                cuda.to_device(A32), cuda.to_device(B32), C)
            return _compare("C", C.copy_to_host(), A32.astype(np.float64) @ B32, rtol=1e-4, atol=1e-4)
        return run

    cases = [(label, case(A, B)) for label, A, B, _ in _matmul_cases(rng)[:2]]
    return _grade("check_matmul_kernel", cases, strict, where_run())


# ----- chapters 07, 08: the forward pass ----------------------------------------------------------------------

def check_fa1_step(fn, strict=False, seed=0):
    """fn(S, Vj, Oi, li, mi) -> (Oi, li, mi): Algorithm 1, lines 10-13, for one score tile S (Br, Bc) (already
    scaled; -inf where masked), Vj (Bc, d), and the normalised state of the rows so far: Oi (Br, d), li, mi (Br,)."""
    rng = np.random.default_rng(seed)

    def case(S_old, V_old, S, V):
        def run():
            m0, l0 = softmax_state(S_old)
            O0 = _normalised(S_old, V_old)
            O, l, m = _unpack(fn(S.copy(), V.copy(), O0, l0, m0), 3, ("Oi", "li", "mi"))
            both = np.concatenate([S_old, S], axis=1)
            me, le = softmax_state(both)
            return _first(_compare("mi", m, me), _compare("li", l, le),
                          _compare("Oi", O, _normalised(both, np.concatenate([V_old, V]))))
        return run

    Br, Bc, d = 5, 3, 4
    S0, V0 = rng.standard_normal((Br, 4)), rng.standard_normal((4, d))
    S, V = rng.standard_normal((Br, Bc)) * 2, rng.standard_normal((Bc, d))
    grown = S + 6                                      # this tile's max exceeds every earlier score
    masked = S.copy()
    masked[[1, 3]] = -np.inf                           # rows fully masked in this tile
    none = np.zeros((Br, 0))
    cases = [("first tile (mi = -inf, li = 0, Oi = 0), Br = 5, Bc = 3, d = 4", case(none, np.zeros((0, d)), S, V)),
             ("second tile, random scores", case(S0, V0, S, V)),
             ("second tile whose max is larger: the old O, l must be rescaled", case(S0, V0, grown, V)),
             ("rows 1 and 3 fully masked in this tile", case(S0, V0, masked, V)),
             ("first tile with rows 1 and 3 fully masked (they stay O = 0, l = 0, m = -inf)",
              lambda: _empty_hint(case(none, np.zeros((0, d)), masked, V)()))]
    return _grade("check_fa1_step", cases, strict)


def _normalised(S, V):
    m, l = softmax_state(S)
    E = np.exp(S - np.where(np.isneginf(m), 0.0, m)[:, None])
    return (E @ V) / np.where(l > 0, l, 1.0)[:, None]


FORWARD_CASES = [  # (Nq, Nk, d, Br, Bc, causal, input scale)
    (32, 32, 8, 16, 16, False, 1), (37, 29, 12, 16, 8, False, 1), (20, 45, 5, 8, 16, True, 1),
    (45, 20, 5, 8, 16, True, 1), (7, 9, 3, 16, 16, False, 1), (24, 24, 8, 8, 8, True, 12)]


def _case_label(Nq, Nk, d, Br, Bc, causal, scale):
    return (f"Nq = {Nq}, Nk = {Nk}, d = {d}, Br = {Br}, Bc = {Bc}" + (", causal" if causal else "")
            + (", large scores" if scale > 1 else ""))


def check_tiled_forward(fn, strict=False, seed=0, causal=True):
    """fn(q, k, v, causal, Br, Bc) -> (O, lse): q (Nq, d), k, v (Nk, d) float64, O (Nq, d), lse (Nq,), scale
    1/sqrt(d), causal top-left aligned (query i sees keys 0..i). causal=False skips the causal cases."""
    rng = np.random.default_rng(seed)

    def case(Nq, Nk, d, Br, Bc, c, s):
        def run():
            q, k, v = (rng.standard_normal((n, d)) for n in (Nq, Nk, Nk))
            q *= s
            O, lse = _unpack(fn(q.copy(), k.copy(), v.copy(), c, Br, Bc), 2, ("O", "lse"))
            Oe, le = attention(q, k, v, c)
            return _first(_compare("O", O, Oe), _compare("lse", lse, le))
        return run

    cases = [(_case_label(*c), case(*c)) for c in FORWARD_CASES if causal or not c[5]]
    return _grade("check_tiled_forward", cases, strict)


def check_numba_tile_kernel(kernel, Br, D, strict=False, seed=0):
    """kernel[(ceil(Nq/Br),), (Br,)](q, k, v, O, lse, scale): FlashAttention-2's forward, one thread block per
    Q tile and one thread per query row; q (Nq, d), k, v (Nk, d), O (Nq, d), lse (Nq,) float32 device arrays,
    d <= D (the kernel's compiled head dim). O and lse start as NaN."""
    from numba import cuda
    rng = np.random.default_rng(seed)

    def case(Nq, Nk, d, s):
        def run():
            q, k, v = (rng.standard_normal((n, d)).astype(np.float32) for n in (Nq, Nk, Nk))
            q *= np.float32(s)
            O = cuda.to_device(np.full((Nq, d), np.nan, np.float32))
            lse = cuda.to_device(np.full(Nq, np.nan, np.float32))
            kernel[(math.ceil(Nq / Br),), (Br,)](cuda.to_device(q), cuda.to_device(k), cuda.to_device(v), O, lse,
                                                 np.float32(1 / math.sqrt(d)))
            Oe, le = attention(q, k, v)
            return _first(_compare("O", O.copy_to_host(), Oe, 1e-4, 1e-5),
                          _compare("lse", lse.copy_to_host(), le, 1e-4, 1e-5))
        return run

    sizes = [(Br, 2 * Br, min(D, 8), 1), (Br + 5, 21, D - 3 if D > 4 else D, 1), (3, 7, min(D, 4), 100)]
    cases = [(f"Nq = {Nq}, Nk = {Nk}, d = {d}" + (", large scores" if s > 1 else ""), case(Nq, Nk, d, s))
             for Nq, Nk, d, s in sizes]
    return _grade("check_numba_tile_kernel", cases, strict, where_run())


# ----- chapter 09: the backward pass ------------------------------------------------------------------------

def check_backward_dS(fn, strict=False, seed=0):
    """fn(P, dO, O, V) -> (D, dS): P (Nq, Nk) the softmax, dO, O (Nq, d), V (Nk, d); D = rowsum(dO * O) (Nq,),
    dS = P * (dP - D) with dP = dO V^T (Nq, Nk)."""
    rng = np.random.default_rng(seed)

    def case(Nq, Nk, d, masked_row=None):
        def run():
            q, k, v, do = (rng.standard_normal((n, d)) for n in (Nq, Nk, Nk, Nq))
            mask = np.ones((Nq, Nk), bool)
            if masked_row is not None:
                mask[masked_row] = False
            O, lse = attention(q, k, v, mask=mask)
            S = np.where(mask, reference.scores(q, k), -np.inf)
            P = np.where(np.isneginf(lse)[:, None], 0.0, np.exp(S - np.where(np.isneginf(lse), 0, lse)[:, None]))
            D, dS = _unpack(fn(P.copy(), do.copy(), O.copy(), v.copy()), 2, ("D", "dS"))
            De = (do * O).sum(axis=1)
            return _first(_compare("D", D, De), _compare("dS", dS, P * (do @ v.T - De[:, None])))
        return run

    cases = [("Nq = Nk = 6, d = 4", case(6, 6, 4)), ("Nq = 5, Nk = 9, d = 3", case(5, 9, 3)),
             ("row 2 fully masked (P = 0, O = 0: D = 0, dS = 0)", case(5, 7, 4, masked_row=2))]
    return _grade("check_backward_dS", cases, strict)


def check_backward(fn, strict=False, seed=0):
    """fn(q, k, v, o, lse, do, causal, Br, Bc) -> (dq, dk, dv), shapes as q, k, v (float64, scale 1/sqrt(d))."""
    rng = np.random.default_rng(seed)

    def case(Nq, Nk, d, Br, Bc, c, s):
        def run():
            q, k, v, do = (rng.standard_normal((n, d)) for n in (Nq, Nk, Nk, Nq))
            q *= s
            o, lse = reference.attention_forward(q, k, v, c)
            expected = reference.attention_backward(q, k, v, o, lse, do, c)
            got = _unpack(fn(*(a.copy() for a in (q, k, v, o, lse, do)), c, Br, Bc), 3, ("dq", "dk", "dv"))
            return _first(*(_compare(n, g, e) for n, g, e in zip(("dq", "dk", "dv"), got, expected)))
        return run

    cases = [(_case_label(*c), case(*c)) for c in FORWARD_CASES[:5]]
    return _grade("check_backward", cases, strict)


# ----- chapter 10: skipping masked tiles ----------------------------------------------------------------------

def check_tile_visible(fn, strict=False):
    """fn(i, j, Br, Bc, Nq, Nk) -> bool: does causal masking (top-left: query r sees keys 0..r) leave any score of
    tile (i, j) visible? Checked on every tile of many shapes, ragged ones and Nq != Nk included."""
    shapes = [(16, 16, 64, 64), (16, 8, 40, 40), (8, 16, 40, 40), (4, 4, 10, 13), (5, 3, 17, 11), (3, 7, 20, 30)]

    def case(Br, Bc, Nq, Nk):
        def run():
            for i in range(tiled.n_blocks(Nq, Br)):
                for j in range(tiled.n_blocks(Nk, Bc)):
                    e, g = tiled.tile_visible(i, j, Br, Bc, Nq, True), fn(i, j, Br, Bc, Nq, Nk)
                    if bool(g) != e:
                        rows, cols = (i * Br, min((i + 1) * Br, Nq) - 1), (j * Bc, min((j + 1) * Bc, Nk) - 1)
                        return (f"tile (i, j) = ({i}, {j}) (query rows {rows[0]}..{rows[1]}, keys "
                                f"{cols[0]}..{cols[1]}): expected {e}, got {g}"
                                + (": its last query sees its first key" if e else
                                   ": every key of it comes after its last query"))
        return run

    cases = [(f"Br = {Br}, Bc = {Bc}, Nq = {Nq}, Nk = {Nk}", case(Br, Bc, Nq, Nk)) for Br, Bc, Nq, Nk in shapes]
    return _grade("check_tile_visible", cases, strict)


def check_causal_skip(fn, strict=False, seed=0):
    """fn(q, k, v, Br, Bc) -> (O, lse, computed): a causal tiled forward (q (Nq, d), k, v (Nk, d)) and the list
    of tiles (i, j) it computed. Right answers that compute a hidden tile, or skip a visible one, fail."""
    rng = np.random.default_rng(seed)

    def case(Nq, Nk, d, Br, Bc):
        def run():
            q, k, v = (rng.standard_normal((n, d)) for n in (Nq, Nk, Nk))
            Oe, le = attention(q, k, v, True)
            O, lse, computed = _unpack(fn(q.copy(), k.copy(), v.copy(), Br, Bc), 3, ("O", "lse", "computed"))
            visible = {(i, j) for i in range(tiled.n_blocks(Nq, Br)) for j in range(tiled.n_blocks(Nk, Bc))
                       if tiled.tile_visible(i, j, Br, Bc, Nq, True)}
            done = [tuple(int(x) for x in t) for t in computed]
            extra = sorted(set(done) - visible)
            missing = sorted(visible - set(done))
            return _first(_compare("O", O, Oe), _compare("lse", lse, le),
                          extra and f"computed tile {extra[0]}, which the causal mask hides entirely "
                                    f"({len(extra)} such tiles)",
                          missing and f"tile {missing[0]} has visible scores but is not listed as computed",
                          len(done) != len(set(done)) and "a tile is listed twice")
        return run

    shapes = [(32, 32, 4, 8, 8), (37, 29, 5, 16, 8), (20, 45, 3, 8, 16)]
    cases = [(f"Nq = {Nq}, Nk = {Nk}, d = {d}, Br = {Br}, Bc = {Bc}", case(Nq, Nk, d, Br, Bc))
             for Nq, Nk, d, Br, Bc in shapes]
    return _grade("check_causal_skip", cases, strict)


# ----- chapter 15: attention across GPUs --------------------------------------------------------------------

def check_zigzag_positions(fn, strict=False):
    """fn(rank, P, N) -> the global positions (a list or array of N // P ints, in local order) that `rank` of P
    holds in the zigzag layout: the sequence cut into 2P equal chunks, rank r holding chunks r and 2P-1-r."""
    from .distributed.layouts import positions

    def case(P, N):
        def run():
            for r in range(P):
                got = [int(x) for x in fn(r, P, N)]
                want = positions(r, P, N // P, "zigzag")
                if got != want:
                    return f"rank {r} of P = {P}, N = {N}: expected {want}, got {got}"
        return run

    cases = [(f"P = {P}, N = {N}", case(P, N)) for P, N in ((2, 8), (3, 12), (4, 8), (4, 32), (1, 6))]
    return _grade("check_zigzag_positions", cases, strict)


def _block_kind(q_pos, k_pos):
    """'skip' when every key comes after every query (top-left causal), 'full' when every key is at or before
    every query, else 'mask'."""
    if min(k_pos) > max(q_pos):
        return "skip"
    return "full" if max(k_pos) <= min(q_pos) else "mask"


def check_block_kind(fn, strict=False):
    """fn(q_pos, k_pos) -> 'skip' | 'mask' | 'full': what a rank does with one K/V block under a causal mask,
    given the global positions of its queries and of the block's keys (contiguous runs or zigzag pairs)."""
    from .distributed.layouts import positions

    def case(P, n, layout):
        def run():
            for r in range(P):
                for s in range(P):
                    q, k = positions(r, P, n, layout), positions(s, P, n, layout)
                    want, got = _block_kind(q, k), fn(list(q), list(k))
                    if got != want:
                        return (f"queries of rank {r} (positions {q[0]}..{q[-1]}), keys of rank {s} (positions "
                                f"{k[0]}..{k[-1]}): expected {want!r}, got {got!r}")
        return run

    cases = [(f"P = {P}, {n} positions per rank, {layout}", case(P, n, layout))
             for P, n, layout in ((2, 4, "contiguous"), (4, 3, "contiguous"), (2, 4, "zigzag"), (4, 6, "zigzag"))]
    return _grade("check_block_kind", cases, strict)
