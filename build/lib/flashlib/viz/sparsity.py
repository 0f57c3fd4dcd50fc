"""Block-sparse attention pictures: the block mask, the tiles a causal or sparse pattern skips, and the work
that remains (flashlib.block_sparse)."""
import numpy as np
from matplotlib.colors import ListedColormap

from ..block_sparse import kept_fraction
from ..tiled import tile_visible


def tile_status(block_mask, causal=False, Br=16, Bc=16):
    """(Tr, Tc) int: 1 computed, 0 skipped by the block mask, -1 skipped by the causal mask (Nq = Tr * Br)."""
    m = np.asarray(block_mask, bool)
    st = m.astype(int)
    for (i, j), _ in np.ndenumerate(m):
        if not tile_visible(i, j, Br, Bc, m.shape[0] * Br, causal):
            st[i, j] = -1
    return st


def draw_mask(ax, block_mask, causal=False, Br=16, Bc=16, title=None):
    """The tile grid: computed tiles coloured, skipped ones grey (light grey: causal), with the kept fraction."""
    st = tile_status(block_mask, causal, Br, Bc)
    ax.imshow(st, cmap=ListedColormap(["#eeeeee", "#bbbbbb", "#4e79a7"]), vmin=-1.5, vmax=1.5)
    Tr, Tc = st.shape
    ax.set_xticks(np.arange(Tc + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(Tr + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="w", lw=1)
    ax.tick_params(which="both", length=0, labelsize=7)
    ax.set_xlabel("j (K/V block)", fontsize=8)
    ax.set_ylabel("i (Q block)", fontsize=8)
    frac = kept_fraction(block_mask, causal, Br, Bc)
    ax.set_title(f"{title + ': ' if title else ''}{frac:.0%} of tiles computed", fontsize=9)
    return frac


def local_global_mask(T, local=1, stride=None):
    """A simple fixed sparsity pattern on T x T tiles: a band of `local` tiles each side of the diagonal plus
    every `stride`-th column (global tokens), in the spirit of the local + global patterns of sparse
    Transformers. (FlashAttention's experiments used a fixed butterfly pattern, Section 3.3; this is simpler.)"""
    i, j = np.indices((T, T))
    mask = np.abs(i - j) <= local
    if stride:
        mask |= (j % stride == 0)
    return mask
