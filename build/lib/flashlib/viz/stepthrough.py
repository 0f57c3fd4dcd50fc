"""Step through FlashAttention tile by tile, drawn from the trace of `flashlib.tiled`.

    rec = record("fa1", q, k, v, Br=16, Bc=16)    # runs tiled.fa1_forward(trace=...), keeps inputs and sizes
    draw_step(fig, rec, 5)                         # one step on a matplotlib Figure
    HTML(player(rec))                              # frame player for the static book (matplotlib to_jshtml)
    slider(rec)                                    # ipywidgets slider for a live notebook (Colab)

One step is one (i, j) tile of S = Q K^T: the figure shows Q, K, V and O as they sit in HBM with the tiles now
in SRAM outlined, the score tile S and probability tile P, the running max m and sum l of the rows of block i,
which tiles are done or skipped, and the HBM bytes moved so far beside what standard attention moves
(`flashlib.iomodel`). `algo` is "fa1" (Algorithm 1), "fa2" (FlashAttention-2 forward) or "bwd" (backward).
"""
import io

import matplotlib
import numpy as np
from matplotlib import animation, rcParams
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from .. import block_sparse, iomodel, reference, tiled

FIGSIZE = (11.5, 6.4)
LOADED, KEPT, WRITTEN = "#f28e2b", "#ffd8a8", "#1f77b4"   # loaded into SRAM now / still in SRAM / written back
TITLES = {"fa1": "FlashAttention, Algorithm 1: outer loop over K/V blocks j, inner loop over Q blocks i",
          "fa2": "FlashAttention-2 forward: outer loop over Q blocks i, inner loop over K/V blocks j",
          "bwd": "FlashAttention-2 backward: outer loop over K/V blocks j, inner loop over Q blocks i"}


def record(algo, q, k, v, causal=False, Br=16, Bc=16, scale=None, do=None, itemsize=4, block_mask=None):
    """Run one algorithm of flashlib.tiled on q (Nq, d), k, v (Nk, d) with a trace; return a dict with the
    steps (`steps`, tiled's trace list) and what drawing needs: sizes, inputs, final and standard HBM bytes.
    With a (Tr, Tc) `block_mask` ("fa2" only) it runs flashlib.block_sparse.fa2_forward instead."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    if q.ndim != 2:
        raise ValueError(f"record() takes one head: q (Nq, d), k and v (Nk, d); got q of shape {q.shape}")
    (Nq, d), Nk = q.shape, k.shape[0]
    steps = []
    if block_mask is not None:
        if algo != "fa2":
            raise ValueError("block_mask is supported with algo='fa2' (flashlib.block_sparse.fa2_forward)")
        block_sparse.fa2_forward(q, k, v, block_mask, causal, scale, Br, Bc, trace=steps, itemsize=itemsize)
        total = block_sparse.hbm_bytes(Nq, Nk, d, Br, Bc, block_mask, causal, itemsize)
    elif algo == "fa1":
        tiled.fa1_forward(q, k, v, causal, scale, Br, Bc, trace=steps, itemsize=itemsize)
        total = iomodel.fa1_hbm_bytes(Nq, Nk, d, Br, Bc, causal, itemsize)
    elif algo == "fa2":
        tiled.fa2_forward(q, k, v, causal, scale, Br, Bc, trace=steps, itemsize=itemsize)
        total = iomodel.fa2_hbm_bytes(Nq, Nk, d, Br, Bc, causal, itemsize)
    elif algo == "bwd":
        o, lse = reference.attention_forward(q, k, v, causal, scale)
        do = np.random.default_rng(0).standard_normal(q.shape) if do is None else np.asarray(do, np.float64)
        tiled.backward(q, k, v, o, lse, do, causal, scale, Br, Bc, trace=steps, itemsize=itemsize)
        total = iomodel.backward_hbm_bytes(Nq, Nk, d, Br, Bc, causal, itemsize)
    else:
        raise ValueError(f"algo must be 'fa1', 'fa2' or 'bwd', got {algo!r}")
    return dict(algo=algo, causal=causal, block_mask=block_mask, Br=Br, Bc=Bc, Nq=Nq, Nk=Nk, d=d, itemsize=itemsize,
                Tr=tiled.n_blocks(Nq, Br), Tc=tiled.n_blocks(Nk, Bc), q=q, k=k, v=v, do=do, steps=steps,
                total=total, standard=iomodel.standard_hbm_bytes(Nq, Nk, d, itemsize))


def _replay(rec, step):
    """State after steps 0..step-1: tile status (Tr, Tc), visit order, O rows and m rows as last written."""
    status = np.zeros((rec["Tr"], rec["Tc"]), int)            # 0 pending, 1 done, 2 skipped, 3 now
    order = np.zeros((rec["Tr"], rec["Tc"]), int)
    O = np.full((rec["Nq"], rec["d"]), np.nan)
    m = np.full(rec["Nq"], -np.inf)
    for n, st in enumerate(rec["steps"][:step + 1]):
        i, j = st["i"], st["j"]
        status[i, j], order[i, j] = (2 if st["skipped"] else 1), n + 1
        if n == step:
            status[i, j] = 2 if st["skipped"] else 3
            break
        if not st["skipped"] and "O" in st:
            rows = slice(i * rec["Br"], i * rec["Br"] + st["O"].shape[0])
            O[rows], m[rows] = st["O"], st["m"]
    return status, order, O, m


def _matrix(ax, X, B, t_sram, name, loaded, kept, written):
    """X (N, x) as a heatmap cut into row tiles of B; tile t_sram outlined by its role at this step."""
    ax.imshow(X, cmap="Greys", aspect="auto", interpolation="nearest", alpha=0.45)
    N = X.shape[0]
    for t in range(1, tiled.n_blocks(N, B)):
        ax.axhline(t * B - 0.5, color="k", lw=0.6)
    if t_sram is not None:
        rows = min(B, N - t_sram * B)
        face = LOADED if loaded else KEPT if kept else "none"
        ax.add_patch(Rectangle((-0.5, t_sram * B - 0.5), X.shape[1], rows, facecolor=face, alpha=0.55,
                               edgecolor=WRITTEN if written else LOADED, lw=3 if written else 2))
    ax.set_title(name, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks(np.arange(0, N, B))
    ax.tick_params(labelsize=7)


def _tile(ax, X, title, cmap, vmin=None, vmax=None):
    Xm = np.ma.masked_invalid(np.where(np.isneginf(X), np.nan, X))
    cm = matplotlib.colormaps[cmap].with_extremes(bad="#bbbbbb")
    ax.imshow(Xm, cmap=cm, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _skipped(ax, title):
    ax.set_title(title, fontsize=9)
    ax.text(0.5, 0.5, "skipped:\nmasked tile,\nnever loaded", ha="center", va="center", fontsize=9,
            transform=ax.transAxes, color="0.35")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_facecolor("#eeeeee")


def _tilemap(ax, rec, status, order):
    cmap = ListedColormap(["white", "#b7e4c7", "#cccccc", LOADED])
    ax.imshow(status, cmap=cmap, vmin=-0.5, vmax=3.5, aspect="equal")
    for (i, j), n in np.ndenumerate(order):
        if n:
            ax.text(j, i, ("x" if status[i, j] == 2 else str(n)), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(rec["Tc"]))
    ax.set_yticks(range(rec["Tr"]))
    ax.set_xticks(np.arange(rec["Tc"] + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(rec["Tr"] + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="k", lw=0.5)
    ax.tick_params(which="both", length=0, labelsize=7)
    ax.set_xlabel("j (K/V block)", fontsize=8)
    ax.set_ylabel("i (Q block)", fontsize=8)
    ax.set_title("tiles of S: visit order\n(green done, x skipped)", fontsize=9)


def _bytes(ax, rec, st):
    kib = 1024
    if rec["algo"] == "bwd":
        P = rec["Nq"] * rec["Nk"] * rec["itemsize"]
        ref_label, ref = "P stored", (P, P)
        title = "HBM traffic (grey: reading and writing P alone, as a standard backward must)"
    else:
        ref_label, ref = "standard", rec["standard"]
        title = "HBM traffic (grey: standard attention, whole pass)"
    labels = ["so far", "at the end", ref_label]
    read = [st["hbm_read"], rec["total"][0], ref[0]]
    written = [st["hbm_written"], rec["total"][1], ref[1]]
    y = np.arange(3)
    ax.barh(y - 0.18, np.array(read) / kib, 0.34, color=["#4e79a7", "#a0c4e8", "#999999"], label="read")
    ax.barh(y + 0.18, np.array(written) / kib, 0.34, color=["#e15759", "#f4a6a7", "#cccccc"], label="written")
    for yy, r, w in zip(y, read, written):
        ax.text(r / kib, yy - 0.18, f" {r / kib:.1f}", va="center", fontsize=7)
        ax.text(w / kib, yy + 0.18, f" {w / kib:.1f}", va="center", fontsize=7)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("KiB between HBM and SRAM (upper bar read, lower written)", fontsize=8)
    ax.set_xlim(0, 1.25 * max(read + written) / kib)
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)


def _ml(fig, cell, rec, st, m_old):
    """Two small panels for the rows of block i: m before and after this step, and l after it."""
    top, bottom = cell.subgridspec(2, 1, hspace=0.15).subplots(sharex=True)
    rows = st["i"] * rec["Br"] + np.arange(st["m"].shape[0])
    m_new, l = st["m"], st["l"]
    top.plot(rows, np.where(np.isneginf(m_old), np.nan, m_old), "o", mfc="none", color="#59a14f", ms=4,
             label="before")
    top.plot(rows, m_new, ".", color="#2d6a2e", ms=6, label="after")
    top.legend(fontsize=6, loc="upper right", handletextpad=0.1, borderpad=0.2)
    top.set_ylabel("m", fontsize=8)
    bottom.bar(rows, l, color="#b07aa1", width=0.8)
    bottom.set_ylabel("l", fontsize=8)
    bottom.set_xlabel("query row", fontsize=8)
    for ax in (top, bottom):
        ax.tick_params(labelsize=6)
    grew = int(np.sum(np.isfinite(m_old) & (m_new > m_old)))
    top.set_title(f"running max m, sum l\n{grew} rows rescaled (m grew)", fontsize=9)


def _figure(fig_or_axes):
    if fig_or_axes is None:
        fig = Figure(figsize=FIGSIZE)
        FigureCanvasAgg(fig)
        return fig
    return getattr(fig_or_axes, "figure", fig_or_axes) if not isinstance(fig_or_axes, Figure) else fig_or_axes


def draw_step(fig_or_axes, rec, step):
    """Draw step `step` (0-based) of the record `rec` (see `record`) on a Figure (or an Axes' figure);
    returns the figure. The title names the step as 'step n/total' (1-based)."""
    fig = _figure(fig_or_axes)
    fig.clear()
    st = rec["steps"][step]
    algo, i, j, Br, Bc = rec["algo"], st["i"], st["j"], rec["Br"], rec["Bc"]
    status, order, O, m_prev = _replay(rec, step)
    gs = fig.add_gridspec(2, 5, width_ratios=[1, 1, 1, 1, 1.5], hspace=0.6, wspace=0.5,
                          left=0.05, right=0.97, top=0.84, bottom=0.14)
    loaded, written = st.get("loaded", ()), st.get("written", ())
    live = not st["skipped"]
    q_role = dict(t_sram=i if live else None, loaded="Q" in loaded, kept=live, written=False)
    kv_role = dict(t_sram=j if live else None, loaded="K" in loaded, kept=live, written=False)
    _matrix(fig.add_subplot(gs[0, 0]), rec["q"], Br, name=f"Q in HBM, Q_{i}", **q_role)
    _matrix(fig.add_subplot(gs[0, 1]), rec["k"], Bc, name=f"K in HBM, K_{j}", **kv_role)
    _matrix(fig.add_subplot(gs[0, 2]), rec["v"], Bc, name=f"V in HBM, V_{j}", **kv_role)
    if algo == "bwd":
        _matrix(fig.add_subplot(gs[0, 3]), rec["do"], Br, name=f"dO in HBM, dO_{i}", t_sram=i if live else None,
                loaded=live, kept=live, written=False)
    else:
        ax = fig.add_subplot(gs[0, 3])
        if live:
            rows = slice(i * Br, i * Br + st["O"].shape[0])
            O[rows] = st["O"]
        name = "O in HBM (FA1: every step)" if algo == "fa1" else "O_i on chip (= O / l so far)"
        _matrix(ax, np.nan_to_num(O, nan=0.0), Br, name=name, t_sram=i if live else None, loaded="O" in loaded,
                kept=live, written="O" in written)
    _tilemap(fig.add_subplot(gs[0, 4]), rec, status, order)

    axS, axP, ax3 = fig.add_subplot(gs[1, 0]), fig.add_subplot(gs[1, 1]), fig.add_subplot(gs[1, 2])
    if live:
        _tile(axS, st["S"], f"S_{i}{j} = scale Q_{i} K_{j}^T", "viridis")
        Ptitle = {"fa1": "P~ = exp(S - m~) (tile max)", "fa2": "P~ = exp(S - m_new)",
                  "bwd": "P = exp(S - lse), recomputed"}[algo]
        _tile(axP, st["P"], f"{Ptitle}\nmax {st['P'].max():.2f}", "magma", 0, st["P"].max() or 1.0)
        if algo == "bwd":
            lim = np.abs(st["dS"]).max() or 1.0
            _tile(ax3, st["dS"], "dS = P * (dP - D)", "RdBu_r", -lim, lim)
        else:
            ax3.remove()
            _ml(fig, gs[1, 2], rec, st, m_prev[i * Br:i * Br + st["m"].shape[0]])
    else:
        for ax, t in ((axS, f"S_{i}{j}"), (axP, "P"), (ax3, "dS" if algo == "bwd" else "m, l")):
            _skipped(ax, t)
    _bytes(fig.add_subplot(gs[1, 3:]), rec, st)

    what = "skipped (masked tile)" if st["skipped"] else ("loads " + ", ".join(loaded) +
                                                    ("; writes " + ", ".join(written) if written else ""))
    fig.suptitle(f"{TITLES[algo]}{' (causal)' if rec['causal'] else ''}{' (block-sparse)' if rec['block_mask'] is not None else ''}\n"
                 f"step {step + 1}/{len(rec['steps'])}: i = {i}, j = {j}, {what}", fontsize=10)
    fig.legend(handles=[Patch(facecolor=LOADED, alpha=0.55, edgecolor=LOADED, label="tile loaded into SRAM now"),
                        Patch(facecolor=KEPT, alpha=0.55, edgecolor=LOADED, label="tile kept in SRAM"),
                        Patch(facecolor="none", edgecolor=WRITTEN, lw=2, label="tile written to HBM now")],
               loc="lower center", ncol=3, fontsize=8, frameon=False)
    return fig


def animate(draw, n_frames, figsize=FIGSIZE, dpi=60, interval=900):
    """Frame player HTML (matplotlib to_jshtml) for draw(fig, frame); frames are PNGs embedded in the page."""
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    anim = animation.FuncAnimation(fig, lambda s: draw(fig, s), frames=n_frames, interval=interval, repeat=False)
    return anim.to_jshtml(default_mode="once")


def player(rec, dpi=60, interval=900):
    """An HTML frame player (buttons and slider, works offline) stepping through every step of `rec`.
    Display it with IPython.display.HTML. At dpi 60, 16 steps take about 1 MB, far below
    rcParams['animation.embed_limit'] (MB)."""
    return animate(lambda fig, s: draw_step(fig, rec, s), len(rec["steps"]), dpi=dpi, interval=interval)


def embed_limit_bytes():
    return rcParams["animation.embed_limit"] * 1024 * 1024


def slider(rec, dpi=72):
    """A live ipywidgets view: a Play button and an IntSlider; moving the slider redraws that step into an Image.
    The returned VBox carries `.slider`, `.image`, `.figure` and `.redraw(step)`."""
    import ipywidgets as w
    fig = Figure(figsize=FIGSIZE, dpi=dpi)
    FigureCanvasAgg(fig)
    s = w.IntSlider(value=0, min=0, max=len(rec["steps"]) - 1, description="step", continuous_update=False)
    play = w.Play(value=0, min=0, max=s.max, interval=1000)
    w.jslink((play, "value"), (s, "value"))
    image = w.Image(format="png")

    def redraw(step):
        draw_step(fig, rec, step)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        image.value = buf.getvalue()

    s.observe(lambda change: redraw(change["new"]), names="value")
    redraw(0)
    box = w.VBox([w.HBox([play, s]), image])
    box.slider, box.image, box.figure, box.redraw = s, image, fig, redraw
    return box
