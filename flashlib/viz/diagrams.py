"""Diagrams of the hardware the talk draws: a program running across host and device, HBM stacks beside a GDDR
board, a Hopper SM, and the 32 shared-memory banks. Each function returns a matplotlib Figure drawn from numbers
(flashlib.hardware's table by default), so a diagram cannot disagree with the chapters' tables.

Colours are the Okabe-Ito palette (safe for the common colour-blindnesses); every box also carries its name, so
no colour is needed to read a diagram. Text is at least 9 pt on figures at most 8.5 inches wide: at least 10
screen pixels in a 700-pixel column.
"""
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, Rectangle

from .. import hardware

OKABE_ITO = dict(orange="#E69F00", sky="#56B4E9", green="#009E73", yellow="#F0E442", blue="#0072B2",
                 vermillion="#D55E00", purple="#CC79A7", grey="#BBBBBB", light="#EEEEEE")
FONT = 10          # body text, points
SMALL = 9          # the smallest text any diagram uses


def _box(ax, x, y, w, h, text="", color="light", fontsize=FONT, weight="normal", ec="0.2", tc="black"):
    """A labelled rectangle with its lower-left corner at (x, y)."""
    ax.add_patch(Rectangle((x, y), w, h, facecolor=OKABE_ITO.get(color, color), edgecolor=ec, lw=1.2))
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize, weight=weight, color=tc)


def _arrow(ax, start, end, text="", color="0.15", offset=(0, 0.18), fontsize=FONT, lw=2.0, **kw):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=16, color=color, lw=lw))
    if text:
        mx, my = (start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1]
        ax.text(mx, my, text, ha="center", va="center", fontsize=fontsize, color=color, **kw)


def _canvas(width, height, xmax, ymax, title):
    fig, ax = plt.subplots(figsize=(width, height))
    ax.set_xlim(0, xmax)
    ax.set_ylim(0, ymax)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title, fontsize=11)
    return fig, ax


def host_device(pcie_GBps=None, hbm_GBps=None, gpu_name="GPU"):
    """How `python train.py` runs (the talk's プログラムの実行 slide): the CPU runs the program and sends the GPU
    (1) the data, copied from main memory to GPU memory over PCIe, (2) kernel launches, which the SMs' CUDA
    and Tensor Cores execute on data in GPU memory, and (3) gets the results copied back. The copies cross the
    narrowest link, so they are drawn as the bottleneck; pass measured or datasheet GB/s to label the links."""
    fig, ax = _canvas(8.5, 4.6, 17, 9.2, f"How a program runs across host and device ({gpu_name})")
    red, blue = OKABE_ITO["vermillion"], OKABE_ITO["blue"]
    for x0, name in ((0.2, "host"), (11.2, "device")):
        _box(ax, x0, 0.3, 5.6, 8.2)
        ax.text(x0 + 2.8, 8.05, name, fontsize=11, weight="bold", ha="center")
    _box(ax, 0.5, 5.0, 5.0, 2.6, "CPU\nruns python train.py:\ncontrol, launches", "sky")
    _box(ax, 0.5, 0.8, 5.0, 2.4, "main memory (DRAM)", "yellow")
    _box(ax, 11.5, 5.0, 5.0, 2.6, "", "green")
    ax.text(14.0, 7.2, "SMs run the kernels", fontsize=FONT, ha="center", color="white", weight="bold")
    for i in range(4):
        _box(ax, 11.7 + i * 1.175, 6.0, 1.05, 0.85, "CUDA\ncore", "white", fontsize=SMALL)
    _box(ax, 11.7, 5.2, 4.6, 0.65, "Tensor Cores", "orange", fontsize=SMALL)
    hbm = f"\n{hbm_GBps:,.0f} GB/s to the SMs" if hbm_GBps else ""
    _box(ax, 11.5, 0.8, 5.0, 2.4, "GPU memory\n(HBM or GDDR)" + hbm, "yellow")
    for x in (2.8, 14.0):
        _arrow(ax, (x - 0.25, 5.0), (x - 0.25, 3.2))
        _arrow(ax, (x + 0.25, 3.2), (x + 0.25, 5.0))
    _arrow(ax, (5.5, 2.5), (11.5, 2.5), "(1) copy the data in", red, lw=3, offset=(0, 0.3))
    _arrow(ax, (11.5, 1.5), (5.5, 1.5), "(3) copy the results back", red, lw=3, offset=(0, -0.35))
    pcie = f"PCIe: {pcie_GBps:.0f} GB/s each way" if pcie_GBps else "PCIe"
    ax.text(8.5, 3.75, f"the bottleneck\n{pcie}", ha="center", va="center", fontsize=FONT, color=red,
            weight="bold")
    _arrow(ax, (5.5, 6.6), (11.5, 6.6), "(2) launch kernels", blue, offset=(0, 0.3))
    ax.text(8.5, 6.2, "a command in a queue;\nthe CPU does not wait", ha="center", va="top", fontsize=SMALL,
            color=blue)
    return fig


def _hbm_package(ax, g, x0):
    stacks = g["bus_bits"] // 1024
    _box(ax, x0, 1.4, 7.6, 5.0)
    ax.text(x0 + 3.8, 6.0, "one package: silicon interposer", ha="center", fontsize=SMALL)
    _box(ax, x0 + 2.4, 1.8, 2.8, 3.8, f"{g['name']}\nGPU die", "green", weight="bold")
    per_side = (stacks + 1) // 2
    for s in range(stacks):
        x, y = x0 + (0.45 if s % 2 == 0 else 5.65), 1.9 + (s // 2) * (3.7 / per_side)
        h = 3.7 / per_side - 0.2
        _box(ax, x, y, 1.5, h, "", "blue")
        for k in range(1, 4):
            ax.plot([x, x + 1.5], [y + k * h / 4] * 2, color="white", lw=0.8)
        ax.text(x + 0.75, y + h / 2, "HBM", ha="center", va="center", fontsize=SMALL, color="white",
                weight="bold", bbox=dict(facecolor=OKABE_ITO["blue"], edgecolor="none", pad=1))
    ax.text(x0 + 3.8, 0.95, f"{stacks} stacks x 1024 bit = {g['bus_bits']:,}-bit bus", ha="center", fontsize=SMALL)
    ax.text(x0 + 3.8, 0.35, "stacks of DRAM dies, millimetres from the GPU", ha="center", fontsize=SMALL)


def _gddr_board(ax, g, x0):
    chips = g["bus_bits"] // 32
    _box(ax, x0, 1.4, 7.6, 5.0, "", "#D9EAD3")
    ax.text(x0 + 3.8, 6.0, "a circuit board", ha="center", fontsize=SMALL)
    _box(ax, x0 + 2.7, 2.9, 2.2, 2.0, f"{g['name']}\nGPU", "green", weight="bold")
    top = (chips + 1) // 2
    for c in range(chips):
        row, k, n = (0, c, top) if c < top else (1, c - top, chips - top)
        cx = x0 + 0.3 + k * (6.0 / max(1, n - 1)) if n > 1 else x0 + 3.3
        cy = 5.0 if row == 0 else 1.6
        gx = min(max(cx + 0.5, x0 + 2.9), x0 + 4.7)
        ax.plot([cx + 0.5, gx], [cy if row == 0 else cy + 0.75, 4.9 if row == 0 else 2.9], color="0.35", lw=1)
        _box(ax, cx, cy, 1.0, 0.75, g["memory_type"], "orange", fontsize=SMALL)
    ax.text(x0 + 3.8, 0.95, f"{chips} chips x 32 bit (two 16-bit channels each) = {g['bus_bits']}-bit bus",
            ha="center", fontsize=SMALL)
    ax.text(x0 + 3.8, 0.35, "separate chips, centimetres from the GPU", ha="center", fontsize=SMALL)


def hbm_vs_gddr(hbm="H100", gddr="T4"):
    """HBM stacks beside the GPU die on one package, against GDDR6 chips around the GPU on a board, with the bus
    width, data rate per pin and bandwidth of the two `flashlib.hardware.GPUS` rows named."""
    h, g = hardware.gpu(hbm), hardware.gpu(gddr)
    fig, ax = _canvas(8.5, 4.9, 16.4, 9.4, "Two ways to attach DRAM to a GPU")
    _hbm_package(ax, h, 0.2)
    _gddr_board(ax, g, 8.6)
    for x0, r in ((0.2, h), (8.6, g)):
        ax.text(x0 + 3.8, 7.9, f"{r['memory_type']} ({r['sku']})", ha="center", fontsize=FONT, weight="bold")
        ax.text(x0 + 3.8, 7.0, f"{r['bus_bits']:,} bit x {r['gbps_per_pin']:g} Gbit/s per pin / 8 = "
                f"{r['bandwidth_GBps']:,} GB/s", ha="center", fontsize=FONT)
    return fig


def _sm_quarter(ax, x0, y0, q):
    """One SM quarter (processing block) with its lower-left corner at (x0, y0): 8.2 wide, 5.5 high."""
    _box(ax, x0, y0, 8.2, 5.5)
    ax.text(x0 + 4.1, y0 + 5.15, f"quarter {q}", ha="center", va="center", fontsize=FONT, weight="bold")
    _box(ax, x0 + 0.2, y0 + 4.05, 7.8, 0.7, "warp scheduler: 1 instruction / clock", "sky", fontsize=SMALL)
    _box(ax, x0 + 0.2, y0 + 3.25, 7.8, 0.7, "register file: 16,384 x 32-bit (64 KiB)", "yellow", fontsize=SMALL)
    for dx, w, text, color, tc in ((0.2, 1.7, "INT32\nx 16", "purple", "black"),
                                   (2.0, 2.6, "FP32 x 32\n(CUDA\ncores)", "green", "white"),
                                   (4.7, 1.7, "FP64\nx 16", "blue", "white"),
                                   (6.5, 1.5, "LD/ST,\nSFU", "grey", "black")):
        _box(ax, x0 + dx, y0 + 1.35, w, 1.8, text, color, fontsize=SMALL, tc=tc)
    _box(ax, x0 + 0.2, y0 + 0.15, 7.8, 1.1, "Tensor Core (4th generation):\nD = A B + C on small tiles", "orange",
         fontsize=SMALL)


def hopper_sm():
    """One Hopper SM (H100), after the Hopper whitepaper's SM figure: four quarters, each with a warp scheduler,
    a 16,384 x 32-bit register file, 16 INT32, 32 FP32 and 16 FP64 lanes, a Tensor Core, load/store units and
    special-function units; the 256 KiB L1 data cache / shared memory (up to 228 KiB of it shared) and the Tensor
    Memory Accelerator serve all four."""
    fig, ax = _canvas(8.5, 7.4, 17, 14.8, "One Hopper SM (H100): four quarters around one L1 / shared memory")
    for q in range(4):
        _sm_quarter(ax, 0.2 + (q % 2) * 8.4, 8.5 - (q // 2) * 5.8, q + 1)
    _box(ax, 0.2, 0.1, 16.6, 2.4, "", "vermillion")
    ax.text(8.5, 1.7, "256 KiB L1 data cache / shared memory (up to 228 KiB as shared memory)", ha="center",
            va="center", fontsize=FONT, weight="bold", color="white")
    ax.text(8.5, 0.8, "shared by the four quarters; the Tensor Memory Accelerator (TMA) copies tiles into it",
            ha="center", va="center", fontsize=SMALL, color="white")
    return fig


def _bank_panel(ax, x0, row_words, title):
    """A 32-float-wide view of shared memory: word w sits in bank w mod 32. Lane l reads element (l, 0) of a
    32 x row_words float tile stored row after row, so its word is l * row_words."""
    rows = 8
    ax.text(x0 + 16 * 0.25, rows * 0.5 + 1.35, title, ha="center", fontsize=FONT, weight="bold")
    for b in range(0, 32, 4):
        ax.text(x0 + b * 0.25 + 0.125, rows * 0.5 + 0.25, str(b), ha="center", fontsize=SMALL)
    ax.text(x0 + 4.0, rows * 0.5 + 0.75, "bank (4-byte words)", ha="center", fontsize=SMALL)
    ax.text(x0 - 0.1, rows * 0.25, "tile rows 0-7", rotation=90, ha="right", va="center", fontsize=SMALL)
    color = "vermillion" if len({(lane * row_words) % 32 for lane in range(32)}) < 32 else "green"
    hits = {}
    for lane in range(rows):
        word = lane * row_words
        hits[(word // 32, word % 32)] = lane
    for r in range(rows):
        for b in range(32):
            lane = hits.get((r, b))
            ax.add_patch(Rectangle((x0 + b * 0.25, (rows - 1 - r) * 0.5), 0.25, 0.5, edgecolor="0.6", lw=0.5,
                                   facecolor=OKABE_ITO[color] if lane is not None else "white"))
            if lane is not None:
                ax.text(x0 + b * 0.25 + 0.125, (rows - 1 - r) * 0.5 + 0.25, str(lane), ha="center",
                        va="center", fontsize=SMALL, color="white", weight="bold")
    banks = len({(lane * row_words) % 32 for lane in range(32)})
    passes = 32 // banks
    verdict = f"{passes} passes: a {passes}-way conflict" if passes > 1 else "1 pass: no conflict"
    ax.text(x0 + 4.0, -0.7, f"the warp's 32 lanes hit {banks} bank{'s' if banks > 1 else ''}\n{verdict}",
            ha="center", va="center", fontsize=FONT, weight="bold", color=OKABE_ITO[color])
    return passes


def shared_memory_banks():
    """The 32 banks of shared memory with a conflict and its padding fix: a warp reads one column of a 32 x 32
    float tile (lane l takes row l). Stored with rows of 32 words, every lane's word falls in bank 0 and the
    read takes 32 passes; padded to 33 words per row, lane l's word falls in bank l and one pass serves all.
    Only the first 8 lanes and rows are drawn; the numbers in the cells are lane numbers."""
    fig, ax = _canvas(8.5, 4.0, 17, 6.4, "Shared-memory banks: a warp reads one column of a 32 x 32 float tile")
    ax.set_ylim(-1.5, 6.0)
    ax.set_xlim(0, 17.2)
    _bank_panel(ax, 0.5, 32, "rows of 32 words: word = 32 x lane")
    _bank_panel(ax, 9.1, 33, "rows padded to 33 words: word = 33 x lane")
    return fig


ALL = (host_device, hbm_vs_gddr, hopper_sm, shared_memory_banks)
