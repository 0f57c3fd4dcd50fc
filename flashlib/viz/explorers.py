"""Live explorers for the notebooks (ipywidgets), each with a static fallback for the rendered book.

    live(stepthrough_explorer(), static=draw_step(None, default_record, 0))

`live(widget, static)` displays as the widget in Jupyter and Colab and as the static figure (a PNG of the default
view) in the book: its output carries both MIME types, and the book's `_config.yml` ranks the widget view below
PNG (`nb_mime_priority_overrides`), since a page without a kernel cannot run a widget.

- `stepthrough_explorer()`: algorithm (FA1, FA2, backward), N, Br, Bc, causal -> the step-through, regenerated.
- `roofline_explorer()`: GPU (flashlib.hardware.GPUS), N, d, dtype -> where standard and flash attention land.
- `sram_explorer()`: GPU, Br, Bc, d, dtype, warps -> shared memory of a FlashAttention-2 tile against the SM's,
  blocks per SM and occupancy (flashlib.hardware.occupancy), and the waves a grid takes (flashlib.viz.waves).
"""
import base64
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .. import hardware
from . import stepthrough, waves
from .players import DPI, FONT, WIDTH, png

# Per-SM limits by compute capability (CUDA C++ Programming Guide, "Technical Specifications per Compute
# Capability"): resident threads and blocks per SM, and the largest shared memory one block may opt in to (KiB).
SM_LIMITS = {"7.0": dict(threads=2048, blocks=32, smem_block_KiB=96),
             "7.5": dict(threads=1024, blocks=16, smem_block_KiB=64),
             "8.0": dict(threads=2048, blocks=32, smem_block_KiB=163),
             "8.9": dict(threads=1536, blocks=24, smem_block_KiB=99),
             "9.0": dict(threads=2048, blocks=32, smem_block_KiB=227)}
REGISTERS_PER_SM = 65536            # 64 K 32-bit registers per SM on every architecture in the table
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


class live:
    """Displays `widget` where a kernel runs it, `static` (a Figure) elsewhere (the rendered book)."""

    def __init__(self, widget, static):
        self.widget, self.static = widget, static

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = self.widget._repr_mimebundle_(include=include, exclude=exclude) or {}
        if isinstance(bundle, tuple):
            bundle = bundle[0]
        bundle = dict(bundle)
        bundle["image/png"] = base64.b64encode(png(self.static, DPI)).decode("ascii")
        bundle["text/plain"] = "(interactive in a live notebook; the default view is shown as a figure)"
        return bundle


def figure(height, dpi=96):
    """A Figure as wide as the step-through frames (WIDTH inches), `height` inches tall."""
    fig = Figure(figsize=(WIDTH, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


# ----- the step-through, regenerated ------------------------------------------------------------------------

def stepthrough_explorer(algo="fa2", N=64, Br=16, Bc=16, causal=False, d=16):
    """Dropdowns for the algorithm and tiles, a slider for N: each change records the algorithm anew on
    structured inputs and replaces the step-through (stepthrough.slider). The VBox carries `.controls`."""
    import ipywidgets as w
    controls = dict(algo=w.Dropdown(options=[("FA1", "fa1"), ("FA2", "fa2"), ("backward", "bwd")], value=algo,
                                    description="algorithm"),
                    N=w.IntSlider(value=N, min=16, max=128, step=8, description="N", continuous_update=False),
                    Br=w.Dropdown(options=[8, 16, 32], value=Br, description="B_r"),
                    Bc=w.Dropdown(options=[8, 16, 32], value=Bc, description="B_c"),
                    causal=w.Checkbox(value=causal, description="causal"))
    holder = w.VBox()

    def rebuild(_=None):
        c = {k: v.value for k, v in controls.items()}
        q, k, v = stepthrough.structured_inputs(c["N"], d)
        rec = stepthrough.record(c["algo"], q, k, v, causal=c["causal"], Br=c["Br"], Bc=c["Bc"])
        holder.children = [stepthrough.slider(rec)]

    for ctl in controls.values():
        ctl.observe(rebuild, names="value")
    rebuild()
    box = w.VBox([w.HBox(list(controls.values())[:3]), w.HBox(list(controls.values())[3:]), holder])
    box.controls, box.holder = controls, holder
    return box


# ----- the roofline ------------------------------------------------------------------------------------------

def _peak_tflops(g, dtype):
    """Tensor Core dense fp16 for 16-bit dtypes, the FP32 peak for float32 (CUDA cores), in TFLOP/s."""
    return (g["fp16_tensor_tflops"] if dtype != "float32" else g["fp32_tflops"]) or g["fp32_tflops"]


def draw_roofline(fig, gpu="H100", N=4096, d=64, dtype="float16"):
    """The GPU's roofline (datasheet peak and bandwidth) with standard attention (S and P through HBM) and the
    fused kernel (FlashAttention-2's IO, K/V re-read per Q block) placed at their arithmetic intensity."""
    g = hardware.gpu(gpu)
    peak, bw = _peak_tflops(g, dtype), g["bandwidth_GBps"]
    parts = hardware.attention_parts(N, d, ITEMSIZE[dtype])
    fig.clear()
    ax = fig.add_subplot()
    x = np.logspace(0, 4, 200)
    ax.loglog(x, [hardware.roofline(i, peak, bw) for i in x], color="k", lw=2)
    ridge = hardware.ridge_point(peak, bw)
    ax.axvline(ridge, color="0.6", ls=":", lw=1)
    ax.text(ridge * 1.1, peak * 1.15, f"ridge {ridge:.0f} FLOP/B", fontsize=FONT)
    for name, color in (("standard attention", "#e15759"), ("fused, K/V re-read from HBM", "#4e79a7")):
        flops, nbytes = parts[name]
        i = flops / nbytes
        ax.loglog(i, hardware.roofline(i, peak, bw), "o", color=color, ms=9,
                  label=f"{name}: {i:.0f} FLOP/B, at most {hardware.roofline(i, peak, bw):.0f} TFLOP/s")
    ax.set_xlabel("arithmetic intensity (FLOP per byte of HBM traffic)", fontsize=FONT)
    ax.set_ylabel("attainable TFLOP/s", fontsize=FONT)
    ax.set_ylim(peak / 1e3, peak * 2.5)
    ax.tick_params(labelsize=FONT)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=FONT, loc="lower right")
    unit = "Tensor Core dense fp16" if dtype != "float32" else "FP32 CUDA cores"
    ax.set_title(f"{g['sku']}: {peak:g} TFLOP/s ({unit}), {bw:,} GB/s (datasheet)\n"
                 f"one head of attention, N = {N}, d = {d}, {dtype}", fontsize=FONT + 1)
    fig.subplots_adjust(left=0.11, right=0.97, top=0.86, bottom=0.13)
    return fig


def roofline_explorer(gpu="H100", N=4096, d=64, dtype="float16"):
    import ipywidgets as w
    fig = figure(4.4)
    controls = dict(gpu=w.Dropdown(options=[g["name"] for g in hardware.GPUS], value=gpu, description="GPU"),
                    N=w.SelectionSlider(options=[2 ** p for p in range(8, 16)], value=N, description="N"),
                    d=w.Dropdown(options=[32, 64, 128, 256], value=d, description="d"),
                    dtype=w.Dropdown(options=list(ITEMSIZE), value=dtype, description="dtype"))
    return _explorer(fig, controls, draw_roofline)


def _explorer(fig, controls, draw):
    import ipywidgets as w
    image = w.Image(format="png", layout=w.Layout(width="100%"))

    def redraw(_=None):
        draw(fig, **{k: v.value for k, v in controls.items()})
        image.value = png(fig)

    for ctl in controls.values():
        ctl.observe(redraw, names="value")
    redraw()
    box = w.VBox([w.HBox(list(controls.values())), image])
    box.controls, box.image, box.figure = controls, image, fig
    return box


# ----- the SRAM budget ---------------------------------------------------------------------------------------

def fa2_tile_budget(Br, Bc, d, dtype="float16", warps=4):
    """What one FlashAttention-2 thread block holds on chip: shared memory for Q_i (Br x d), K_j and V_j
    (Bc x d each) in `dtype`; registers per thread for its share of the float32 accumulator O_i (Br x d) and of
    the score tile S = P (Br x Bc), plus m and l, spread over warps x 32 threads (a lower bound: addresses and
    loop counters come on top)."""
    it = ITEMSIZE[dtype]
    smem = dict(Q=Br * d * it, K=Bc * d * it, V=Bc * d * it)
    threads = 32 * warps
    regs = math.ceil((Br * d + Br * Bc + 2 * Br) / threads)
    return dict(smem=smem, smem_total=sum(smem.values()), threads=threads, regs_per_thread=regs)


def sram_budget(gpu, Br, Bc, d, dtype="float16", warps=4):
    """fa2_tile_budget against the chosen GPU's SM (flashlib.hardware.occupancy): blocks per SM, occupancy,
    the limiter, and whether one block fits at all (registers per thread <= 255, shared memory <= the opt-in
    maximum per block). The 1 KiB of shared memory the driver reserves per block is counted."""
    g = hardware.gpu(gpu)
    lim = SM_LIMITS[g["cc"]]
    b = fa2_tile_budget(Br, Bc, d, dtype, warps)
    smem_block = b["smem_total"] + 1024
    fits = b["regs_per_thread"] <= 255 and b["smem_total"] <= lim["smem_block_KiB"] * 1024
    occ = hardware.occupancy(b["threads"], b["regs_per_thread"], smem_block, max_threads_per_sm=lim["threads"],
                             max_blocks_per_sm=lim["blocks"], regs_per_sm=REGISTERS_PER_SM,
                             smem_per_sm=g["smem_per_sm_KB"] * 1024)
    return dict(b, gpu=g, sm_limits=lim, fits=fits, **(occ if fits else dict(blocks=0, occupancy=0.0,
                                                                            limiter="does not fit")))


def draw_sram(fig, gpu="A100", Br=128, Bc=64, d=64, dtype="float16", warps=4, N=4096, heads=16):
    """Left: the block's shared memory (Q_i, K_j, V_j) stacked against the SM's, with the copies that fit side by
    side. Right: the waves of thread blocks a grid of heads x ceil(N / Br) blocks takes on the GPU's SMs."""
    r = sram_budget(gpu, Br, Bc, d, dtype, warps)
    g = r["gpu"]
    fig.clear()
    ax, axw = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[1, 1.5], wspace=0.35))
    kib, bottom = 1024, 0
    for (name, nbytes), color in zip(r["smem"].items(), ("#4e79a7", "#f28e2b", "#59a14f")):
        for c in range(max(1, r["blocks"])):
            ax.bar(c, nbytes / kib, bottom=bottom, color=color, edgecolor="k", lw=0.5,
                   label=f"{name}: {nbytes / kib:.0f} KiB" if c == 0 else None)
        bottom += nbytes / kib
    cap = g["smem_per_sm_KB"]
    ax.axhline(cap, color="k", ls="--", lw=1.2)
    ax.text(-0.45, cap * 1.03, f"one SM: {cap} KB", fontsize=FONT)
    ax.set_ylim(0, max(cap, bottom) * 1.25)
    ax.set_xticks(range(max(1, r["blocks"])))
    ax.set_xlabel("resident blocks on one SM", fontsize=FONT)
    ax.set_ylabel("KiB of shared memory", fontsize=FONT)
    ax.tick_params(labelsize=FONT)
    ax.legend(fontsize=FONT, loc="center right")
    verdict = (f"{r['blocks']} blocks/SM, occupancy {r['occupancy']:.0%}\n(limit: {r['limiter']})" if r["fits"]
               else "does not fit: " + ("over 255 registers/thread" if r["regs_per_thread"] > 255 else
                                        f"over {r['sm_limits']['smem_block_KiB']} KiB/block"))
    ax.set_title(f"{r['threads']} threads, >= {r['regs_per_thread']} registers each\n{verdict}", fontsize=FONT)
    grid = heads * math.ceil(N / Br)
    waves.draw_waves(axw, grid, g["sms"], max(1, r["blocks"]), wave=None)
    fig.suptitle(f"{g['sku']}: a FlashAttention-2 block of B_r = {Br}, B_c = {Bc}, d = {d}, {dtype}, "
                 f"{warps} warps", fontsize=FONT + 1)
    fig.subplots_adjust(left=0.09, right=0.98, top=0.8, bottom=0.13)
    return fig


def sram_explorer(gpu="A100", Br=128, Bc=64, d=64, dtype="float16", warps=4, N=4096, heads=16):
    import ipywidgets as w
    fig = figure(4.0)
    controls = dict(gpu=w.Dropdown(options=[g["name"] for g in hardware.GPUS if g["cc"] in SM_LIMITS], value=gpu,
                                   description="GPU"),
                    Br=w.Dropdown(options=[16, 32, 64, 128, 256], value=Br, description="B_r"),
                    Bc=w.Dropdown(options=[16, 32, 64, 128, 256], value=Bc, description="B_c"),
                    d=w.Dropdown(options=[32, 64, 128, 256], value=d, description="d"),
                    dtype=w.Dropdown(options=list(ITEMSIZE), value=dtype, description="dtype"),
                    warps=w.Dropdown(options=[1, 2, 4, 8], value=warps, description="warps"),
                    N=w.SelectionSlider(options=[2 ** p for p in range(9, 15)], value=N, description="N"),
                    heads=w.Dropdown(options=[1, 8, 16, 32, 64], value=heads, description="B x H"))
    box = _explorer(fig, controls, draw_sram)
    box.children = [w.HBox(list(controls.values())[:4]), w.HBox(list(controls.values())[4:]), box.image]
    return box
