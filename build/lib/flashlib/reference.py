"""Layer 1: standard attention in float64 NumPy, the truth every other implementation is tested against.

Shapes follow PyTorch's SDPA: q (..., Nq, d), k and v (..., Nk, d); the leading axes are (batch, heads).
`causal=True` means what PyTorch's `is_causal` means: query i sees keys 0..i (top-left aligned, also when
Nq != Nk). The scale defaults to 1/sqrt(d).
"""
import numpy as np


def default_scale(d):
    return 1.0 / np.sqrt(d)


def causal_mask(Nq, Nk):
    """(Nq, Nk) bool, True where query i may attend key j (j <= i, top-left aligned)."""
    return np.arange(Nk)[None, :] <= np.arange(Nq)[:, None]


def scores(q, k, causal=False, scale=None):
    """S = scale * Q K^T in float64, with masked entries set to -inf: (..., Nq, Nk)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    S = scale * (q @ np.swapaxes(k, -1, -2))
    if causal:
        S = np.where(causal_mask(S.shape[-2], S.shape[-1]), S, -np.inf)
    return S


def attention_forward(q, k, v, causal=False, scale=None):
    """Standard attention. Returns O (..., Nq, d) and lse = log(sum_j exp(S_ij)) (..., Nq), float64.

    The N x N matrices S and P are materialised in full: this is the algorithm FlashAttention avoids.
    """
    S = scores(q, k, causal, scale)
    m = S.max(axis=-1, keepdims=True)          # safe softmax: subtract the row max
    E = np.exp(S - m)
    l = E.sum(axis=-1, keepdims=True)
    P = E / l
    O = P @ np.asarray(v, np.float64)
    lse = (m + np.log(l))[..., 0]
    return O, lse


def attention_backward(q, k, v, o, lse, do, causal=False, scale=None):
    """Gradients of attention given dO. Returns (dq, dk, dv) in float64.

    P is rebuilt from the logsumexp (P = exp(S - lse)), as FlashAttention's backward does, and
    dS = P * (dP - D) with D = rowsum(dO * O) (FlashAttention-2, Algorithm 2).
    """
    q, k, v, o, do = (np.asarray(x, np.float64) for x in (q, k, v, o, do))
    scale = default_scale(q.shape[-1]) if scale is None else scale
    P = np.exp(scores(q, k, causal, scale) - np.asarray(lse, np.float64)[..., None])
    dV = np.swapaxes(P, -1, -2) @ do
    dP = do @ np.swapaxes(v, -1, -2)
    D = (do * o).sum(axis=-1, keepdims=True)
    dS = P * (dP - D)
    dQ = scale * (dS @ k)
    dK = scale * (np.swapaxes(dS, -1, -2) @ q)
    return dQ, dK, dV


def attention_memory_bytes(N, d, B=1, H=1, itemsize=4):
    """Bytes standard attention keeps in memory: Q, K, V, O plus the N x N matrices S and P."""
    return B * H * (4 * N * d + 2 * N * N) * itemsize
