"""The register-fragment layouts of `mma.sync` m16n8k16, drawn from flashlib.numba_kernels.lanes' index functions:
which of a warp's 32 lanes holds which element of A (16 x 16), B (16 x 8) and C/D (16 x 8)."""
import matplotlib.pyplot as plt
import numpy as np


def _grid(index, rows, cols, n):
    lane, elem = np.full((rows, cols), -1), np.full((rows, cols), -1)
    for ln in range(32):
        for i in range(n):
            r, c = index(ln, i)
            lane[r, c], elem[r, c] = ln, i
    return lane, elem


def mma_layout(highlight=(0, 1, 4)):
    """Three panels, A, B and C/D of one m16n8k16 mma; each cell names the lane (L) and element (e) holding it.
    The lanes in `highlight` are coloured; the rest are grey, so one lane's scattered elements stand out."""
    # lanes is NumPy only; imported here, not at the top, as flashlib.numba_kernels' __init__ loads numba.cuda
    from ..numba_kernels.lanes import a_index, b_index, c_index
    panels = [("A (16 x 16, fp16): 8 elements per lane", _grid(a_index, 16, 16, 8)),
              ("B (16 x 8, fp16): 4 per lane", _grid(b_index, 16, 8, 4)),
              ("C, D (16 x 8, fp32): 4 per lane", _grid(lambda ln, i, s=None: c_index(ln, i), 16, 8, 4))]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6), gridspec_kw={"width_ratios": [16, 8, 8]})
    colors = plt.cm.tab10(np.arange(len(highlight)))
    for ax, (title, (lane, elem)) in zip(axes, panels):
        img = np.ones(lane.shape + (4,)) * 0.92
        for color, ln in zip(colors, highlight):
            img[lane == ln] = color * [1, 1, 1, 0.6] + [0, 0, 0, 0.4]
        ax.imshow(img)
        for (r, c), ln in np.ndenumerate(lane):
            ax.text(c, r, f"{ln}\n{elem[r, c]}", ha="center", va="center", fontsize=4.5,
                    color="k" if ln in highlight else "0.45")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(0, lane.shape[1], 4)); ax.set_yticks(range(0, 16, 4))
    fig.suptitle("mma.sync.m16n8k16: cell text = lane, element index in that lane; coloured: lanes "
                 + ", ".join(map(str, highlight)), fontsize=9)
    fig.tight_layout()
    return fig
