"""Figures of the attention benchmark grid (flashlib.bench.grid): runtime and memory against N."""
import re

import matplotlib.pyplot as plt

from . import OKABE_ITO

BLUE, ORANGE, GREEN, VERMILLION, SKY, PURPLE = OKABE_ITO[:6]
# Colour and marker per implementation: colour-blind-safe colours, and a marker of its own for each.
STYLE = {"naive": ("k", "o"), "math": ("0.55", "v"), "efficient": (GREEN, "^"), "flash": (BLUE, "s"),
         "cudnn": (PURPLE, "D"), "cupy": (VERMILLION, "*"), "tuned": (VERMILLION, "*"), "tc": (ORANGE, "X"),
         "sm75": (SKY, "h"), "fp32": ("0.3", "p"), "numba": (ORANGE, "P")}


def _style(impl):
    """Colour and marker by the implementation's last word: 'sdpa-flash' and 'flash' look alike."""
    for word in reversed(re.split(r"[-:_]", impl)):
        if word in STYLE:
            return STYLE[word]
    return None, "."


def _lines(ax, rows, key):
    for impl in sorted({r["impl"] for r in rows}):
        pts = sorted((r["n"], r[key]) for r in rows if r["impl"] == impl and key in r)
        if pts:
            color, marker = _style(impl)
            ax.plot(*zip(*pts), marker=marker, color=color, label=impl)


def runtime_vs_n(result, dtype="float16", d=64, causal=False, key="fwd_ms", ax=None):
    """Milliseconds (or TFLOP/s with key='fwd_tflops') against N for one (dtype, d, causal) slice of the grid."""
    rows = [r for r in result["rows"] if (r["dtype"], r["d"], r["causal"]) == (dtype, d, causal)]
    ax = ax or plt.subplots(figsize=(6, 3.8))[1]
    _lines(ax, rows, key)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log" if key.endswith("_ms") else "linear")
    ax.set_xlabel("sequence length N (B·H·N fixed)")
    ax.set_ylabel({"fwd_ms": "forward (ms)", "fwdbwd_ms": "forward + backward (ms)",
                   "fwd_tflops": "forward TFLOP/s", "fwdbwd_tflops": "forward + backward TFLOP/s"}[key])
    ax.set_title(f"{dtype}, d = {d}{', causal' if causal else ''}")
    ax.legend(fontsize=7, ncol=2)
    return ax


def memory_vs_n(rows, ax=None, title=""):
    """Peak extra device memory of one forward against N, from rows (impl, n, peak_extra_MB or error);
    runs that failed (out of memory) are marked with x at the top."""
    ax = ax or plt.subplots(figsize=(6, 3.8))[1]
    _lines(ax, rows, "peak_extra_MB")
    for r in rows:
        if "error" in r:
            ax.scatter([r["n"]], [ax.get_ylim()[1]], marker="x", s=60, color=_style(r["impl"])[0])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("peak extra memory (MB)")
    ax.set_title(title + " (x: out of memory)")
    ax.legend(fontsize=7, ncol=2)
    return ax
