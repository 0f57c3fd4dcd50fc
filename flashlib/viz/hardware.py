"""Figures and tables for the hardware chapters: the memory pyramid, the roofline, the block-to-SM timeline,
and the plots of the micro-benchmarks (flashlib.bench.micro). Each function takes plain numbers (measured
live or loaded from flashlib/data/results/) and returns a matplotlib Figure."""
import math

import matplotlib.pyplot as plt
import numpy as np

from .. import hardware


def _fmt_bytes(n):
    for unit, k in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= k:
            return f"{n / k:.3g} {unit}"
    return f"{n:.0f} B"


def _fmt_bw(gbps):
    return f"{gbps / 1e3:.3g} TB/s" if gbps >= 1e3 else f"{gbps:.3g} GB/s"


def table(headers, rows):
    """A Markdown table (IPython's Markdown object when IPython is present, else the string)."""
    fmt = lambda x: "–" if x is None else (f"{x:,.4g}" if isinstance(x, float) else str(x))
    text = "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] +
                     ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows])
    try:
        from IPython.display import Markdown
        return Markdown(text)
    except ImportError:
        return text


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
    points: dicts {label, intensity (FLOP/byte), TFLOPs (achieved, or None to mark the intensity only)}."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    x = np.logspace(math.log10(imin), math.log10(imax), 200)
    top = max(peaks.values())
    styles = ("-", "--", ":")
    for (blabel, bw), style in zip(bandwidths.items(), styles):
        for (plabel, p), color in zip(peaks.items(), ("C0", "C1", "C2", "C4")):
            ax.loglog(x, np.minimum(p, bw * 1e9 * x / 1e12), style, color=color, lw=1.4)
        ax.plot([], [], style, color="k", label=f"bandwidth: {blabel}, {_fmt_bw(bw)}")
    for (plabel, p), color in zip(peaks.items(), ("C0", "C1", "C2", "C4")):
        ax.plot([], [], "-", color=color, lw=3, label=f"peak: {plabel}, {p:,.4g} TFLOP/s")
    for i, p in enumerate(points):
        marker = "os^Dvp<>"[i % 8]
        if p.get("TFLOPs"):
            ax.loglog(p["intensity"], p["TFLOPs"], marker, color="k", ms=7, mfc="none" if "fused" in p["label"] else "k",
                      label=f"{p['label']}: {p['intensity']:.3g} FLOP/B, {p['TFLOPs']:.3g} TFLOP/s")
        else:
            ax.axvline(p["intensity"], color="0.6", lw=0.8, ls=":")
            ax.text(p["intensity"] * 1.05, top * 0.02 * (1.8 ** (i % 4)), p["label"], rotation=90, fontsize=7,
                    va="bottom")
    ax.set_xlabel("arithmetic intensity (FLOP per byte of memory traffic)")
    ax.set_ylabel("TFLOP/s")
    ax.set_ylim(top * 1e-4, top * 2)
    ax.set_xlim(imin, imax)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=6.5, loc="lower right")
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
    cmap = plt.cm.turbo
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
    """A bar chart of measured values with an optional dashed reference line (a datasheet figure)."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(range(len(values)), values, color=[f"C{i}" for i in range(len(values))])
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:,.3g}", ha="center", va="bottom", fontsize=8)
    if reference:
        ax.axhline(reference, ls="--", color="k", lw=1)
        ax.text(len(values) - 0.5, reference, f" {ref_label}: {reference:,.4g}", va="bottom", ha="right", fontsize=8)
    ax.set_xticks(range(len(values)), labels, fontsize=8)
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


def gpu_table_rows(gpus=None):
    """Rows for the spec-sheet table: one per GPU in flashlib.hardware.GPUS."""
    rows = []
    for g in gpus or hardware.GPUS:
        rows.append([f"[{g['name']}]({g['source']})", g["sku"], g["arch"], f"{g['memory_GB']} GB {g['memory_type']}",
                     f"{g['bus_bits']}-bit", f"{g['bandwidth_GBps']:,}", g["sms"], g["cuda_cores"], g["tensor_cores"],
                     g["rt_cores"], g["fp32_tflops"], g["fp16_tensor_tflops"], g["fp16_tensor_sparse_tflops"],
                     g["fp8_tensor_sparse_tflops"], g["power_W"], g["nvlink_GBps"]])
    return rows


GPU_TABLE_HEADERS = ["GPU", "SKU", "arch", "memory", "bus", "GB/s", "SMs", "CUDA cores", "Tensor cores",
                     "RT cores", "FP32 TFLOPS", "FP16 Tensor dense", "FP16 Tensor sparse", "FP8 Tensor sparse",
                     "W", "NVLink GB/s"]
