"""Tiled matrix multiplication C = A B (n x n, tiles of T x T), the loads each thread block makes, and the
reuse tiling buys.

A naive kernel gives each thread one C element, read from a row of A and a column of B in global memory:
2n loads per thread, 2 n^3 for the whole product. A tiled kernel gives each T x T block one C tile; at step k
the block loads the A tile (bi, k) and the B tile (k, bj) into shared memory once (2 T^2 loads) and every
one of its T^2 threads reads them from there: 2 n^3 / T global loads in all, T times fewer.
"""
from matplotlib.patches import Rectangle

from .players import DPI, WIDTH, animate

FIGSIZE = (WIDTH, 3.6)


def global_loads(n, T):
    """Elements read from global memory for C = A B (n x n): naive (one thread per C element) and tiled (T x T)."""
    return {"naive": 2 * n ** 3, "tiled": 2 * n ** 3 // T}


def frames(n, T, blocks=((0, 0), (1, 2))):
    """The (block, k) steps shown: every k of each listed C block (bi, bj)."""
    return [(b, k) for b in blocks for k in range(-(-n // T))]


def _grid(ax, n, T, name, hi, color, filled=()):
    ax.add_patch(Rectangle((0, 0), n, n, facecolor="#f4f4f4", edgecolor="k", lw=1))
    for t in range(1, -(-n // T)):
        ax.axhline(t * T, color="0.6", lw=0.6)
        ax.axvline(t * T, color="0.6", lw=0.6)
    for (r, c) in filled:
        ax.add_patch(Rectangle((c * T, r * T), T, T, facecolor="#b7e4c7"))
    r, c = hi
    ax.add_patch(Rectangle((c * T, r * T), T, T, facecolor=color, alpha=0.8, edgecolor="k", lw=1.5))
    ax.set_xlim(0, n)
    ax.set_ylim(n, 0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(name, fontsize=10)


def draw_matmul_step(fig, n, T, step, blocks=((0, 0), (1, 2))):
    """Step `step` of `frames(n, T, blocks)`: which A and B tiles the block computing C tile (bi, bj) loads."""
    (bi, bj), k = frames(n, T, blocks)[step]
    done = [b for b in blocks[:blocks.index((bi, bj))]]
    fig.clear()
    axA, axB, axC, axN = fig.subplots(1, 4, gridspec_kw=dict(width_ratios=[1, 1, 1, 1.1], wspace=0.45))
    _grid(axA, n, T, f"A tile ({bi}, {k})\n-> shared memory", (bi, k), "#f28e2b")
    _grid(axB, n, T, f"B tile ({k}, {bj})\n-> shared memory", (k, bj), "#f28e2b")
    _grid(axC, n, T, f"C tile ({bi}, {bj})\n+= A tile x B tile", (bi, bj), "#4e79a7", filled=done)
    steps = k + 1
    tiled, naive = steps * 2 * T * T, steps * 2 * T * T * T
    axN.barh([0, 1], [naive, tiled], color=["#999999", "#f28e2b"])
    axN.set_yticks([0, 1], ["naive", "tiled"])
    axN.invert_yaxis()
    for y, val in ((0, naive), (1, tiled)):
        axN.text(val, y, f" {val:,}", va="center", fontsize=8)
    axN.set_xlim(0, 1.6 * n * 2 * T * T)
    axN.xaxis.set_major_formatter(lambda x, _: f"{x / 1000:.0f}k")
    axN.set_title("global loads by this\nblock so far", fontsize=9)
    axN.tick_params(labelsize=8)
    fig.suptitle(f"C block ({bi}, {bj}), step k = {k} of {-(-n // T)}: the block's {T}x{T} threads read both "
                 f"tiles\nfrom shared memory, each shared element {T} times", fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.88, top=0.72, bottom=0.1)
    return fig


def matmul_player(n=64, T=16, blocks=((0, 0), (1, 2)), dpi=DPI, interval=900):
    return animate(lambda fig, s: draw_matmul_step(fig, n, T, s, blocks), len(frames(n, T, blocks)),
                   figsize=FIGSIZE, dpi=dpi, interval=interval)
