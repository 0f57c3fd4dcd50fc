"""Device code the Tensor Core forward kernels (fa2_tc, fa2_tf32) share, compiled inline into each.

In both, the 4 lanes t = 0..3 of a quad (lane = 4g + t) hold one query row's scores between them (lanes.c_index),
so a row's maximum is reduced with two butterfly shuffles, and the running max m is kept in base 2, in units of
S * scale_log2 (scale_log2 = scale * log2(e)), so that P = exp2(S * scale_log2 - m) is one FFMA and one MUFU.EX2.
"""
from numba import cuda, float32

from . import mma
from .host import NEG_INF

FULL = 0xFFFFFFFF                                    # every lane of the warp takes part in the shuffles


@cuda.jit(device=True, inline="always")
def online_softmax_step(m, l, base, mx, h, scale_log2):
    """FlashAttention-2 Algorithm 1, line 9 for row h of this thread: mx[h] (this lane's largest score of the tile)
    reduced over the row's 4 lanes, m_new = max(m, that * scale_log2); base[h] = m_new, or 0 while no key of the row
    is visible (then P = exp2(-inf) = 0, no NaN); l *= alpha. Returns alpha = exp2(m - base), the rescale of the row
    of O (line 10)."""
    y = mx[h]
    y = max(y, cuda.shfl_xor_sync(FULL, y, 1))
    y = max(y, cuda.shfl_xor_sync(FULL, y, 2))
    m_new = max(m[h], y * scale_log2)
    base[h] = m_new if m_new != NEG_INF else float32(0.0)
    alpha = mma.exp2_approx(m[h] - base[h])
    m[h] = m_new
    l[h] *= alpha
    return alpha
