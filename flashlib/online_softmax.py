"""Online softmax: the small recurrences FlashAttention is built from (Milakov & Gimelshein 2018).

A softmax state over a stream of scores is the pair (m, l): the running maximum and the running sum of
exp(x - m). Two states merge exactly, which is what lets attention be computed tile by tile.

An all -inf row (every score masked) keeps the state (-inf, 0) and softmaxes to zeros: exp(-inf - m) is taken
with m replaced by 0 while it is -inf (`_finite`), never as -inf - (-inf) = nan.
"""
import numpy as np

from .constants import NEG_INF, default_scale
from .reference import check_block_size


def _finite(m):
    """m, with -inf (no score seen yet) replaced by 0."""
    return np.where(np.isneginf(m), 0.0, m)


def naive_softmax(x):
    """exp(x) / sum(exp(x)): overflows to inf/nan once some x > ~709 (float64)."""
    e = np.exp(np.asarray(x, np.float64))
    return e / e.sum(axis=-1, keepdims=True)


def safe_softmax(x):
    """Softmax with the row max subtracted first: three passes (max, sum, normalise), never overflows."""
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    e = np.exp(x - _finite(m))
    return _normalise(e, e.sum(axis=-1, keepdims=True))


def _normalise(e, l):
    """e / l, and 0 in a row whose sum l is 0 (all -inf)."""
    return e / np.where(l > 0, l, 1.0)


def online_update(m, l, x):
    """Fold a block of new scores x (..., n) into the state (m, l) of shape (...).

    m_new = max(m, max_j x_j);  l_new = l * exp(m - m_new) + sum_j exp(x_j - m_new).
    Start from (m, l) = (-inf, 0); exp(-inf) = 0 makes the first step need no special case.
    """
    x = np.asarray(x, np.float64)
    m_new = np.maximum(m, x.max(axis=-1))
    l_new = l * np.exp(m - _finite(m_new)) + np.exp(x - _finite(m_new)[..., None]).sum(axis=-1)
    return m_new, l_new


def merge(m_a, l_a, m_b, l_b):
    """Combine the states of two disjoint chunks of one row into the state of their union."""
    m = np.maximum(m_a, m_b)
    l = l_a * np.exp(m_a - _finite(m)) + l_b * np.exp(m_b - _finite(m))
    return m, l


def online_softmax(x, trace=None):
    """One pass over x (..., n) computing (m, l), then the normalisation pass. Same result as safe_softmax.

    If `trace` is a list, each step appends (j, m, l) after element j has been read.
    """
    x = np.asarray(x, np.float64)
    m = np.full(x.shape[:-1], NEG_INF)
    l = np.zeros(x.shape[:-1])
    for j in range(x.shape[-1]):
        m, l = online_update(m, l, x[..., j:j + 1])
        if trace is not None:
            trace.append((j, np.copy(m), np.copy(l)))
    return _normalise(np.exp(x - _finite(m)[..., None]), l[..., None])


def chunked_attention(q, k, v, chunk=64, scale=None):
    """Attention over key chunks with (m, l, acc) merged chunk by chunk: the incremental form of Rabe & Staats
    (2021), whose implementation instead summarises every chunk and combines the summaries at the end.

    Memory is O(Nq * chunk) for the scores instead of O(Nq * Nk). q (..., Nq, d), k/v (..., Nk, d).
    chunk must be a positive int.
    """
    chunk = check_block_size("chunk", chunk)
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    scale = default_scale(q.shape[-1]) if scale is None else scale
    m = np.full(q.shape[:-1], NEG_INF)
    l = np.zeros(q.shape[:-1])
    acc = np.zeros(q.shape[:-1] + (v.shape[-1],))
    for s in range(0, k.shape[-2], chunk):
        S = scale * q @ np.swapaxes(k[..., s:s + chunk, :], -1, -2)
        m_c = S.max(axis=-1)
        E = np.exp(S - _finite(m_c)[..., None])
        m_new, l = merge(m, l, m_c, E.sum(axis=-1))
        acc = (acc * np.exp(m - _finite(m_new))[..., None]
               + np.exp(m_c - _finite(m_new))[..., None] * (E @ v[..., s:s + chunk, :]))
        m = m_new
    return _normalise(acc, l[..., None])
