"""Chapters 07 and 08: FA1's update on one score tile, a whole tiled forward, FA2's forward as a Numba kernel."""
import math

import numpy as np

from ..constants import NEG_INF
from .grading import (FORWARD_CASES, attention, _case_label, _compare, _empty_hint, _first, _grade, softmax_state,
                      _unpack, where_run)


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
    masked[[1, 3]] = NEG_INF                           # rows fully masked in this tile
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
