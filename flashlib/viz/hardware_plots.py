"""Figures and tables for the hardware chapters: the memory pyramid, the roofline, the block-to-SM timeline,
and the plots of the micro-benchmarks (flashlib.bench.micro). Each function takes plain numbers (measured
live or loaded from flashlib/data/results/) and returns a matplotlib Figure; `table` (from .tables) prints the
chapters' tables."""
import math
import re
import textwrap

import matplotlib.pyplot as plt
import numpy as np

from .. import hardware
from .tables import number, table  # noqa: F401  (hv.table in the chapters)


def _fmt_bytes(n):
    for unit, k in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= k:
            return f"{n / k:.3g} {unit}"
    return f"{n:.0f} B"


def _fmt_bw(gbps):
    return f"{gbps / 1e3:.3g} TB/s" if gbps >= 1e3 else f"{gbps:.3g} GB/s"


def memory_pyramid(levels, title="The memory hierarchy"):
    """levels: list of dicts {name, capacity (bytes), bandwidth (GB/s or None), note}, fastest first.
    Drawn as a pyramid, the fast small levels on top; the text gives each level's capacity and bandwidth."""
    n = len(levels)
    fig, ax = plt.subplots(figsize=(9, 0.85 * n + 0.8))
    colors = plt.cm.viridis(np.linspace(0.1, 0.9, n))
    width = lambda k: 0.3 + 0.7 * k / n                    # full pyramid: the base is 1.0 wide
    for i, lv in enumerate(levels):
        y = n - 1 - i
        top, w = width(i), width(i + 1)
        ax.fill([-w / 2, w / 2, top / 2, -top / 2], [y, y, y + 0.94, y + 0.94], color=colors[i], alpha=0.9)
        bw = _fmt_bw(lv["bandwidth"]) if lv.get("bandwidth") else "–"
        ax.text(0, y + 0.47, f"{lv['name']}\n{_fmt_bytes(lv['capacity'])} · {bw}", ha="center", va="center",
                fontsize=8.5, color="white" if i < n - 2 else "black", weight="bold")
        if lv.get("note"):
            ax.text(0.56, y + 0.47, lv["note"], ha="left", va="center", fontsize=8, color="0.25")
    ax.annotate("", xy=(-0.56, n - 0.1), xytext=(-0.56, 0.1), arrowprops=dict(arrowstyle="->", color="0.3"))
    ax.text(-0.58, n / 2, "faster, smaller", rotation=90, ha="right", va="center", fontsize=8, color="0.3")
    ax.set_xlim(-0.62, 1.45)
    ax.set_ylim(-0.05, n)
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def roofline(peaks, bandwidths, points=(), title="Roofline", imin=0.1, imax=1e4):
    """peaks: {label: TFLOP/s} (horizontal roofs); bandwidths: {label: GB/s} (slanted roofs);
    points: dicts {label, intensity (FLOP/byte), TFLOPs (achieved, or None to mark the intensity only)}.
    Each measured point has its own marker, colour and size (points that coincide stay visible); points whose
    label says "fused" are drawn open, the others filled. The legend sits under the plot."""
    fig, ax = plt.subplots(figsize=(7.5, 6))
    x = np.logspace(math.log10(imin), math.log10(imax), 200)
    top = max(peaks.values())
    styles = ("-", "--", ":")
    roof_colors = ("C0", "C1", "C2", "C4")
    for (blabel, bw), style in zip(bandwidths.items(), styles):
        for (plabel, p), color in zip(peaks.items(), roof_colors):
            ax.loglog(x, np.minimum(p, bw * 1e9 * x / 1e12), style, color=color, lw=1.4)
        ax.plot([], [], style, color="k", label=f"bandwidth: {blabel}, {_fmt_bw(bw)}")
    for (plabel, p), color in zip(peaks.items(), roof_colors):
        ax.plot([], [], "-", color=color, lw=3, label=f"peak: {plabel}, {number(p)} TFLOP/s")
    for i, p in enumerate(points):
        if p.get("TFLOPs"):
            color = ("C3", "C5", "k")[i % 3]           # sizes differ: coinciding points stay visible
            fused = re.search(r"\bfused\b", p["label"]) is not None          # not "unfused"
            ax.loglog(p["intensity"], p["TFLOPs"], "osD^vp<>"[i % 8], color=color, ms=(12, 9, 7)[i % 3], mew=1.5,
                      mfc="none" if fused else color,
                      label=f"{p['label']}: {number(p['intensity'], 3)} FLOP/B, {number(p['TFLOPs'], 3)} TFLOP/s")
        else:
            ax.axvline(p["intensity"], color="0.6", lw=0.8, ls=":")
            ax.text(p["intensity"] * 1.05, top * 0.02 * (1.8 ** (i % 4)), p["label"], rotation=90, fontsize=8,
                    va="bottom")
    ax.set_xlabel("arithmetic intensity (FLOP per byte of memory traffic)")
    ax.set_ylabel("TFLOP/s")
    ax.set_ylim(top * 1e-4, top * 2)
    ax.set_xlim(imin, imax)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def sm_timeline(timeline, max_sms=None, title=None):
    """timeline: the dict of flashlib.bench.micro.smid_timeline(): one bar per thread block on its SM's row
    (blocks resident on one SM at once get sub-rows), coloured by launch order (block index)."""
    blocks = timeline["blocks"]
    sms = sorted({b["sm"] for b in blocks})[: max_sms or None]
    per_sm = max(1, timeline.get("blocks_per_sm", 1))
    fig, ax = plt.subplots(figsize=(8, min(9, 1.2 + 0.045 * len(sms) * per_sm + 0.02 * len(sms))))
    cmap = plt.cm.viridis
    nb = len(blocks)
    for row, sm in enumerate(sms):
        mine = sorted((b for b in blocks if b["sm"] == sm), key=lambda b: b["start_us"])
        slot_end = []
        for b in mine:                                     # first free slot: blocks that overlap get sub-rows
            s = next((i for i, e in enumerate(slot_end) if e <= b["start_us"] + 1e-3), None)
            if s is None:
                slot_end.append(0)
                s = len(slot_end) - 1
            slot_end[s] = b["end_us"]
            h = 0.9 / max(per_sm, len(slot_end))
            ax.broken_barh([(b["start_us"], b["end_us"] - b["start_us"])], (row + s * h, h * 0.9),
                           facecolors=cmap(b["block"] / max(1, nb - 1)))
    ax.set_ylim(0, len(sms))
    ax.set_xlabel("time since the first block started (µs, %globaltimer)")
    ax.set_ylabel("SM (%smid)")
    step = max(1, len(sms) // 12)
    ax.set_yticks(np.arange(0, len(sms), step) + 0.45, [str(s) for s in sms[::step]])
    sm_ = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, nb - 1))
    fig.colorbar(sm_, ax=ax, label="block index (launch order)", pad=0.01)
    shown = f", SMs {sms[0]}-{sms[-1]} shown" if len(sms) < timeline["sms"] else ""
    ax.set_title(title or f"{nb} blocks of {timeline['threads']} threads on {timeline['sms']} SMs "
                          f"({per_sm} resident per SM{shown})", fontsize=10)
    fig.tight_layout()
    return fig


def bars(labels, values, reference=None, ylabel="", title="", ref_label="datasheet"):
    """A bar chart of measured values with an optional dashed reference line (a datasheet figure). Long labels
    are wrapped to the width of their bar; the values over the bars are plain numbers ('2,119', not 2.12e+03)."""
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.bar(range(len(values)), values, color=[f"C{i % 7}" for i in range(len(values))])
    for i, v in enumerate(values):                  # a white box: a reference line does not strike through
        ax.text(i, v, number(v, 3), ha="center", va="bottom", fontsize=8,
                bbox=dict(facecolor="white", edgecolor="none", pad=0.5))
    if reference:
        ax.axhline(reference, ls="--", color="k", lw=1)
        ax.text(len(values) - 0.5, reference, f" {ref_label}: {number(reference)}", va="bottom", ha="right",
                fontsize=8)
    chars = max(6, int(7 * 0.8 / len(values) * 72 / (8 * 0.62)))   # characters of 8 pt text under one bar
    ax.set_xticks(range(len(values)), [textwrap.fill(str(s), chars) for s in labels], fontsize=8)
    ax.set_ylim(0, max([*values, reference or 0]) * 1.15)
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda y, _: number(y)))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def l2_cliff(rows, l2_MB=None, hbm_GBps=None, title="Repeated reads of one buffer"):
    """rows from micro.l2_sweep(): bandwidth against buffer size, with the L2 size and datasheet HBM marked."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    mb = [r["MB"] for r in rows]
    ax.semilogx(mb, [r["GBps"] for r in rows], "o-", base=2)
    if l2_MB:
        ax.axvline(l2_MB, color="C3", ls=":")
        ax.text(l2_MB * 1.05, ax.get_ylim()[1] * 0.9, f"L2 = {l2_MB:g} MB", color="C3", fontsize=8)
    if hbm_GBps:
        ax.axhline(hbm_GBps, color="k", ls="--", lw=1)
        ax.text(mb[0], hbm_GBps, f"HBM datasheet {_fmt_bw(hbm_GBps)}", va="bottom", fontsize=8)
    ax.set_xticks(mb, [f"{m:g}" for m in mb])
    ax.set_xlabel("buffer size (MiB)")
    ax.set_ylabel("read bandwidth (GB/s)")
    ax.set_ylim(0, None)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


# The spec-sheet table, one column per header, units in the headers. It is shown in two halves that fit the
# page: the memory side (GPU_MEMORY_HEADERS) and the compute side (GPU_COMPUTE_HEADERS).
GPU_COLUMNS = {
    "GPU": lambda g: f"[{g['name']}]({g['source']})", "SKU": lambda g: g["sku"], "arch": lambda g: g["arch"],
    "memory": lambda g: f"{g['memory_GB']} GB {g['memory_type']}", "bus (bit)": lambda g: g["bus_bits"],
    "bandwidth (GB/s)": lambda g: g["bandwidth_GBps"], "power (W)": lambda g: g["power_W"],
    "NVLink (GB/s)": lambda g: g["nvlink_GBps"], "SMs": lambda g: g["sms"], "CUDA cores": lambda g: g["cuda_cores"],
    "Tensor Cores": lambda g: g["tensor_cores"], "RT cores": lambda g: g["rt_cores"],
    "FP32 (TFLOPS)": lambda g: g["fp32_tflops"], "FP16 Tensor dense (TFLOPS)": lambda g: g["fp16_tensor_tflops"],
    "FP16 Tensor sparse (TFLOPS)": lambda g: g["fp16_tensor_sparse_tflops"],
    "FP8 Tensor sparse (TFLOPS)": lambda g: g["fp8_tensor_sparse_tflops"]}
GPU_TABLE_HEADERS = list(GPU_COLUMNS)
GPU_MEMORY_HEADERS = ["GPU", "SKU", "arch", "memory", "bus (bit)", "bandwidth (GB/s)", "power (W)", "NVLink (GB/s)"]
GPU_COMPUTE_HEADERS = ["GPU"] + [h for h in GPU_TABLE_HEADERS if h not in GPU_MEMORY_HEADERS]


def gpu_table_rows(gpus=None, headers=GPU_TABLE_HEADERS):
    """Rows for the spec-sheet table: one per GPU in flashlib.hardware.GPUS, one cell per header."""
    return [[GPU_COLUMNS[h](g) for h in headers] for g in gpus or hardware.GPUS]
