"""Figures of the attention benchmark grid (flashlib.bench.grid): runtime and memory against N."""
import matplotlib.pyplot as plt

STYLE = {"naive": ("k", "o"), "sdpa-math": ("0.5", "v"), "sdpa-efficient": ("tab:green", "^"),
         "sdpa-flash": ("tab:blue", "s"), "sdpa-cudnn": ("tab:purple", "D"),
         "flashlib-cupy": ("tab:red", "*"), "flashlib-numba": ("tab:orange", "P")}


def _lines(ax, rows, key):
    for impl in sorted({r["impl"] for r in rows}):
        pts = sorted((r["n"], r[key]) for r in rows if r["impl"] == impl and key in r)
        if pts:
            color, marker = STYLE.get(impl, (None, "."))
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


def memory_vs_n(result, ax=None):
    """Peak extra device memory of one forward against N; runs that failed (out of memory) marked with x."""
    rows = result["info"].get("memory") or []
    ax = ax or plt.subplots(figsize=(6, 3.8))[1]
    _lines(ax, rows, "peak_extra_MB")
    for r in rows:
        if "error" in r:
            ax.scatter([r["n"]], [ax.get_ylim()[1]], marker="x", color=STYLE.get(r["impl"], ("r",))[0])
            ax.annotate(f"{r['impl']}: {r['error']}", (r["n"], ax.get_ylim()[1]), fontsize=6,
                        textcoords="offset points", xytext=(-60, -10))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N (B = 1, H = 16)")
    ax.set_ylabel("peak extra memory (MB)")
    ax.legend(fontsize=7, ncol=2)
    return ax
