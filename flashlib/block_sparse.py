"""Block-sparse FlashAttention: FlashAttention-2's forward that skips the tiles a block mask turns off.

`block_mask` (Tr, Tc) bool says which tiles (i, j) of S = Q K^T are computed; a skipped tile is never loaded
from HBM, so work and traffic fall with the fraction of tiles kept. This is the idea of block-sparse
FlashAttention (Dao et al. 2022, Section 3.3, Algorithm 5, written there in Algorithm 1's loop order); here it
is FlashAttention-2's loop order: `flashlib.tiled.fa2_forward(block_mask=...)`. Rows that see no key get O = 0 and
lse = -inf (FlashAttention's convention for an all-masked row).
"""
import numpy as np

from . import tiled
from .tiled import n_blocks, tile_visible


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
    """q (..., H, Nq, d), k, v (..., H_kv, Nk, d), block_mask (Tr, Tc) bool -> O (..., H, Nq, d), lse (..., H, Nq).

    flashlib.tiled.fa2_forward with the block mask: one FA2 forward in flashlib, not two."""
    return tiled.fa2_forward(q, k, v, causal, scale, Br, Bc, trace=trace, itemsize=itemsize, block_mask=block_mask)


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
