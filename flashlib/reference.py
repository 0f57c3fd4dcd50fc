"""Standard attention in float64 NumPy, the truth every other implementation is tested against.

Shapes follow PyTorch's SDPA: q (..., H, Nq, d), k and v (..., H_kv, Nk, d); the leading axes are (batch, heads).
`causal=True` means what PyTorch's `is_causal` means: query i sees keys 0..i (top-left aligned, also when
Nq != Nk). The scale defaults to 1/sqrt(d). `mask`, a bool array broadcastable to the scores (..., H, Nq, Nk),
True where a query may see a key, hides more keys.

Conventions shared by every backend in flashlib:
- Grouped-query attention: H_kv may divide H; query head h uses kv head h // (H // H_kv) (SDPA's `enable_gqa`,
  `repeat_interleave` order), and dK, dV are summed over the query heads sharing a kv head.
- A query row that sees no key (all its scores -inf) gives O = 0 and lse = -inf, and adds 0 to dQ, dK, dV.
"""
import numbers

import numpy as np

from .constants import NEG_INF, default_scale

GQA = ("forward", "backward")   # k, v may have fewer heads than q (flashlib.api reads this)


def check_block_size(name, value):
    """`value` as an int if it is a positive integer (a Python or NumPy int, not a bool); else a clear error."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int (a block or chunk length), got {value!r} "
                        f"of type {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int (a block or chunk length, at least 1), got {value}")
    return int(value)


def kv_group(q_shape, k_shape, v_shape=None):
    """g = H // H_kv, the number of query heads that share one k/v head (1 when the heads match).

    The heads are axis -3. Raises ValueError when H_kv does not divide H or the other leading axes differ.
    """
    if v_shape is not None and len(v_shape) >= 3 and len(k_shape) >= 3 and v_shape[-3] != k_shape[-3]:
        raise ValueError(f"k and v must have the same number of heads, got shapes {tuple(k_shape)} and {tuple(v_shape)}")
    if len(q_shape) < 3 or len(k_shape) < 3 or q_shape[-3] == k_shape[-3]:
        return 1
    H, H_kv = q_shape[-3], k_shape[-3]
    if H % H_kv or tuple(q_shape[:-3]) != tuple(k_shape[:-3]):
        raise ValueError(f"grouped-query attention needs k/v heads dividing q's heads and equal batch axes: "
                         f"q {tuple(q_shape)}, k {tuple(k_shape)} (heads are axis -3)")
    return H // H_kv


def group(x, g):
    """(..., H, N, e) -> (..., H // g, g, N, e): the query heads of each kv head side by side (a view if it can)."""
    return x if g == 1 else x.reshape(x.shape[:-3] + (x.shape[-3] // g, g) + x.shape[-2:])


def ungroup(x, g):
    """The inverse of `group`: (..., H // g, g, N, e) -> (..., H, N, e)."""
    return x if g == 1 else x.reshape(x.shape[:-4] + (-1,) + x.shape[-2:])


def shared(x, g):
    """A kv array (..., H_kv, N, e) as (..., H_kv, 1, N, e), so it broadcasts over the g query heads of a group."""
    return x if g == 1 else x[..., None, :, :]


def kv_sum(x, g):
    """A per-query-head gradient (..., H_kv, g, N, e) summed over each group: (..., H_kv, N, e)."""
    return x if g == 1 else x.sum(axis=-3)


def causal_mask(Nq, Nk):
    """(Nq, Nk) bool, True where query i may attend key j (j <= i, top-left aligned)."""
    return np.arange(Nk)[None, :] <= np.arange(Nq)[:, None]


def scores(q, k, causal=False, scale=None, mask=None):
    """S = scale * Q K^T in float64, with masked entries set to -inf: (..., H, Nq, Nk)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    g = kv_group(q.shape, k.shape)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    S = scale * ungroup(group(q, g) @ np.swapaxes(shared(k, g), -1, -2), g)
    if causal:
        S = np.where(causal_mask(S.shape[-2], S.shape[-1]), S, NEG_INF)
    if mask is not None:
        S = np.where(mask, S, NEG_INF)
    return S


def softmax_rows(S):
    """P = softmax(S) along the last axis and lse = logsumexp(S), safe (row max subtracted); a row that is
    all -inf gives P = 0 and lse = -inf."""
    m = S.max(axis=-1, keepdims=True)
    E = np.exp(S - np.where(np.isneginf(m), 0.0, m))   # exp(-inf) = 0 for masked entries, never -inf - -inf
    l = E.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        P = np.where(l > 0, E / l, 0.0)
        lse = np.where(l > 0, m + np.log(l), NEG_INF)[..., 0]
    return P, lse


def probabilities(S, lse):
    """P rebuilt from the scores S (..., Nq, Nk) and a given logsumexp lse (..., Nq), in float64.

    Where lse is S's own row logsumexp up to float32 rounding (|lse - lse_S| <= 1e-6 + 2^-22 |lse_S|), P is the
    exact softmax: a float32 lse carries |lse| * 6e-8 of rounding, which exp(S - lse) would put into every P (a
    1e-4 error in dV at |S| ~ 1e3; 0 or inf at 1e20). Where lse is larger, k and v are one block of a longer row
    (ring attention passes the global lse) and P = exp(S - lse). An lse below the scores' own is an error.
    """
    P_own, lse_own = softmax_rows(S)
    lse = np.asarray(lse, np.float64)
    seen = np.isfinite(lse_own)
    tol = 1e-6 + 2.0 ** -22 * np.abs(np.where(seen, lse_own, 0.0))
    bad = seen & ~(lse >= lse_own - tol)                   # smaller, nan or -inf where the row sees keys
    if bad.any():
        raise ValueError(f"lse does not fit the scores: in {int(bad.sum())} row(s) it is below the rows' own "
                         f"logsumexp (e.g. {lse[bad].flat[0]:.6g} < {lse_own[bad].flat[0]:.6g}); pass the lse that "
                         f"the forward returned for these q, k, v")
    own = ~seen | (np.abs(lse - lse_own) <= tol)
    with np.errstate(over="ignore", invalid="ignore"):
        P_part = np.exp(S - np.where(own, 0.0, lse)[..., None])
    return np.where(own[..., None], P_own, P_part)


def attention_forward(q, k, v, causal=False, scale=None, mask=None):
    """Standard attention. Returns O (..., H, Nq, d) and lse = log(sum_j exp(S_ij)) (..., H, Nq), float64.

    The N x N matrices S and P are materialised in full: this is the algorithm FlashAttention avoids.
    """
    g = kv_group(np.shape(q), np.shape(k), np.shape(v))
    P, lse = softmax_rows(scores(q, k, causal, scale, mask))
    O = ungroup(group(P, g) @ shared(np.asarray(v, np.float64), g), g)
    return O, lse


def attention_backward(q, k, v, o, lse, do, causal=False, scale=None, mask=None):
    """Gradients of attention given dO. Returns (dq, dk, dv) in float64.

    dS = P * (dP - D) with D = rowsum(dO * O) (FlashAttention-2, Algorithm 2). P is rebuilt from S and lse by
    `probabilities`: exactly (in float64) where lse is this row's own logsumexp, rounded or not, and as
    exp(S - lse) where lse is larger, the logsumexp of a longer row of which k, v are one block (ring attention).
    """
    q, k, v, o, do = (np.asarray(x, np.float64) for x in (q, k, v, o, do))
    if np.shape(lse) != o.shape[:-1]:
        raise ValueError(f"lse must have shape {o.shape[:-1]} (o's without head_dim), got {np.shape(lse)}")
    g = kv_group(q.shape, k.shape, v.shape)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    P = probabilities(scores(q, k, causal, scale, mask), lse)
    swap = lambda x: np.swapaxes(x, -1, -2)
    dV = kv_sum(swap(group(P, g)) @ group(do, g), g)
    dP = ungroup(group(do, g) @ swap(shared(v, g)), g)
    D = (do * o).sum(axis=-1, keepdims=True)
    dS = P * (dP - D)
    dQ = scale * ungroup(group(dS, g) @ shared(k, g), g)
    dK = scale * kv_sum(swap(group(dS, g)) @ group(q, g), g)
    return dQ, dK, dV
