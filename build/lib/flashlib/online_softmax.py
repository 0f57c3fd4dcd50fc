"""Online softmax: the small recurrences FlashAttention is built from (Milakov & Gimelshein 2018).

A softmax state over a stream of scores is the pair (m, l): the running maximum and the running sum of
exp(x - m). Two states merge exactly, which is what lets attention be computed tile by tile.
"""
import numpy as np


def naive_softmax(x):
    """exp(x) / sum(exp(x)): overflows to inf/nan once some x > ~709 (float64)."""
    e = np.exp(np.asarray(x, np.float64))
    return e / e.sum(axis=-1, keepdims=True)


def safe_softmax(x):
    """Softmax with the row max subtracted first: three passes (max, sum, normalise), never overflows."""
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=-1, keepdims=True)


def online_update(m, l, x):
    """Fold a block of new scores x (..., n) into the state (m, l) of shape (...).

    m_new = max(m, max_j x_j);  l_new = l * exp(m - m_new) + sum_j exp(x_j - m_new).
    Start from (m, l) = (-inf, 0); exp(-inf) = 0 makes the first step need no special case.
    """
    x = np.asarray(x, np.float64)
    m_new = np.maximum(m, x.max(axis=-1))
    l_new = l * np.exp(m - m_new) + np.exp(x - m_new[..., None]).sum(axis=-1)
    return m_new, l_new


def merge(m_a, l_a, m_b, l_b):
    """Combine the states of two disjoint chunks of one row into the state of their union."""
    m = np.maximum(m_a, m_b)
    l = l_a * np.exp(m_a - m) + l_b * np.exp(m_b - m)
    return m, l


def online_softmax(x, trace=None):
    """One pass over x (..., n) computing (m, l), then the normalisation pass. Same result as safe_softmax.

    If `trace` is a list, each step appends (j, m, l) after element j has been read.
    """
    x = np.asarray(x, np.float64)
    m = np.full(x.shape[:-1], -np.inf)
    l = np.zeros(x.shape[:-1])
    for j in range(x.shape[-1]):
        m, l = online_update(m, l, x[..., j:j + 1])
        if trace is not None:
            trace.append((j, np.copy(m), np.copy(l)))
    return np.exp(x - m[..., None]) / l[..., None]


def chunked_attention(q, k, v, chunk=64, scale=None):
    """Attention over key chunks with (m, l, acc) merged chunk by chunk (Rabe & Staats 2021).

    Memory is O(Nq * chunk) for the scores instead of O(Nq * Nk). q (..., Nq, d), k/v (..., Nk, d).
    """
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    m = np.full(q.shape[:-1], -np.inf)
    l = np.zeros(q.shape[:-1])
    acc = np.zeros(q.shape[:-1] + (v.shape[-1],))
    for s in range(0, k.shape[-2], chunk):
        S = scale * q @ np.swapaxes(k[..., s:s + chunk, :], -1, -2)
        m_c = S.max(axis=-1)
        E = np.exp(S - m_c[..., None])
        m_new, l = merge(m, l, m_c, E.sum(axis=-1))
        acc = acc * np.exp(m - m_new)[..., None] + np.exp(m_c - m_new)[..., None] * (E @ v[..., s:s + chunk, :])
        m = m_new
    return acc / l[..., None]
