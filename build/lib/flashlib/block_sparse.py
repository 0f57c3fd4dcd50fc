"""Block-sparse FlashAttention: FlashAttention-2's forward that skips the tiles a block mask turns off.

`block_mask` (Tr, Tc) bool says which tiles (i, j) of S = Q K^T are computed; a skipped tile is never loaded
from HBM, so work and traffic fall with the fraction of tiles kept. This is the idea of block-sparse
FlashAttention (Dao et al. 2022, Section 3.3, Algorithm 5, written there in Algorithm 1's loop order); here it
is written in FlashAttention-2's loop order with flashlib.tiled's helpers. Rows that see no key get O = 0 and
lse = -inf (FlashAttention's convention for an all-masked row).
"""
import numpy as np

from .reference import default_scale
from .tiled import _HBM, _step, block, n_blocks, tile_scores, tile_visible


def expand(block_mask, Nq, Nk, Br, Bc):
    """The (Nq, Nk) element mask of a (Tr, Tc) block mask."""
    return np.kron(np.asarray(block_mask, bool), np.ones((Br, Bc), bool))[:Nq, :Nk]


def random_mask(Tr, Tc, density, seed=0):
    """A (Tr, Tc) block mask keeping each tile with probability `density`, plus one tile per row block (the
    diagonal one) so that every query sees some key."""
    m = np.random.default_rng(seed).random((Tr, Tc)) < density
    m[np.arange(Tr), np.minimum(np.arange(Tr), Tc - 1)] = True
    return m


def fa2_forward(q, k, v, block_mask, causal=False, scale=None, Br=16, Bc=16, trace=None, itemsize=4):
    """q (..., Nq, d), k, v (..., Nk, d), block_mask (Tr, Tc) bool -> O (..., Nq, d), lse (..., Nq)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    scale = default_scale(q.shape[-1]) if scale is None else scale
    Nq, Nk = q.shape[-2], k.shape[-2]
    Tr, Tc = n_blocks(Nq, Br), n_blocks(Nk, Bc)
    block_mask = np.asarray(block_mask, bool)
    if block_mask.shape != (Tr, Tc):
        raise ValueError(f"block_mask must have shape (Tr, Tc) = ({Tr}, {Tc}), got {block_mask.shape}")
    hbm = _HBM(itemsize)
    O = np.empty(q.shape)
    lse = np.empty(q.shape[:-1])
    for i in range(Tr):
        Qi = block(q, i, Br)
        hbm.load(Qi)
        Oi = np.zeros(Qi.shape)
        li = np.zeros(Qi.shape[:-1] + (1,))
        mi = np.full(Qi.shape[:-1] + (1,), -np.inf)
        first = True
        for j in range(Tc):
            if not (block_mask[i, j] and tile_visible(i, j, Br, Bc, Nq, causal)):
                _step(trace, hbm, algo="fa2", i=i, j=j, skipped=True)
                continue
            Kj, Vj = block(k, j, Bc), block(v, j, Bc)
            hbm.load(Kj, Vj)
            S = tile_scores(Qi, Kj, i, j, Br, Bc, causal, scale)
            m_new = np.maximum(mi, S.max(axis=-1, keepdims=True))
            m_safe = np.where(np.isneginf(m_new), 0.0, m_new)     # a row with no key yet: exp(-inf) = 0, not nan
            P_t = np.exp(S - m_safe)
            alpha = np.exp(mi - m_safe)
            li = alpha * li + P_t.sum(axis=-1, keepdims=True)
            Oi = alpha * Oi + P_t @ Vj
            mi = m_new
            with np.errstate(invalid="ignore", divide="ignore"):
                _step(trace, hbm, algo="fa2", i=i, j=j, skipped=False, loaded=(("Q",) if first else ()) + ("K", "V"),
                      written=(), S=S, P=P_t, m=mi[..., 0], l=li[..., 0], O=np.where(li > 0, Oi / li, 0.0))
            first = False
        with np.errstate(invalid="ignore", divide="ignore"):
            block(O, i, Br)[...] = np.where(li > 0, Oi / li, 0.0)
            lse[..., i * Br:(i + 1) * Br] = np.where(li > 0, mi + np.log(li), -np.inf)[..., 0]
        hbm.store(block(O, i, Br), lse[..., i * Br:(i + 1) * Br])
        if trace is not None and trace and trace[-1]["i"] == i:     # the row's last step also writes O_i, lse_i
            trace[-1].update(written=("O", "lse"), hbm_written=hbm.written)
    return O, lse


def hbm_bytes(Nq, Nk, d, Br, Bc, block_mask, causal=False, itemsize=4):
    """(bytes read, bytes written) of `fa2_forward`: Q once, K_j and V_j once per kept tile, O and lse once."""
    rows = [min(Br, Nq - t * Br) for t in range(n_blocks(Nq, Br))]
    cols = [min(Bc, Nk - t * Bc) for t in range(n_blocks(Nk, Bc))]
    read = Nq * d + sum(2 * bc * d for i in range(len(rows)) for j, bc in enumerate(cols)
                        if block_mask[i][j] and tile_visible(i, j, Br, Bc, Nq, causal))
    return read * itemsize, (Nq * d + Nq) * itemsize


def kept_fraction(block_mask, causal=False, Br=16, Bc=16, Nq=None):
    """Fraction of the Tr x Tc tiles that are computed: the work (and K/V traffic) relative to dense.
    Nq defaults to Tr * Br (no ragged last block)."""
    m = np.asarray(block_mask, bool)
    Nq = m.shape[0] * Br if Nq is None else Nq
    vis = np.array([[tile_visible(i, j, Br, Bc, Nq, causal) for j in range(m.shape[1])] for i in range(m.shape[0])])
    return float((m & vis).sum() / m.size)
