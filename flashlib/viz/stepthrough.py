"""Step through FlashAttention tile by tile, drawn from the trace of `flashlib.tiled`.

    q, k, v = structured_inputs(64, 16)           # scores with a visible diagonal and a few large keys
    rec = record("fa1", q, k, v, Br=16, Bc=16)    # runs tiled.fa1_forward(trace=...), keeps inputs and sizes
    draw_step(fig, rec, 5)                         # one step on a matplotlib Figure
    HTML(player(rec))                              # frame player for the static book (matplotlib to_jshtml)
    HTML(compare_player(rec_fa1, rec_fa2))         # FA1 and FA2 side by side on the same tiles
    slider(rec)                                    # ipywidgets slider for a live notebook (Colab)

One step is one (i, j) tile of S = Q K^T. A forward frame shows Q, K, V and O with the tiles now in SRAM
outlined, the score tile S and probability tile P, the factor exp(m - m_new) that rescales each O row of block i,
the visit order of the tiles, and the HBM bytes read and written so far per tensor (Q, K, V, O, l, m, lse) beside
what standard attention moves (`flashlib.iomodel`). A backward frame shows dQ, dK, dV accumulating, the
recomputed S and P, and dS. `algo` is "fa1" (Algorithm 1), "fa2" (FlashAttention-2 forward) or "bwd" (backward).
"""
import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from .. import block_sparse, iomodel, reference, tiled
from ..constants import default_scale
from .players import DPI, FIGSIZE, FONT, WIDTH, animate, png
from .trace import gradients, replay, tensor_bytes

LOADED, KEPT, WRITTEN = "#f28e2b", "#ffd8a8", "#1f77b4"   # loaded into SRAM now / still in SRAM / written back
TITLES = {"fa1": "FlashAttention, Algorithm 1: outer loop over K/V blocks j, inner over Q blocks i",
          "fa2": "FlashAttention-2 forward: outer loop over Q blocks i, inner over K/V blocks j",
          "bwd": "FlashAttention-2 backward: outer loop over K/V blocks j, inner over Q blocks i"}
SHORT = {"fa1": "FA1", "fa2": "FA2", "bwd": "backward"}


def structured_inputs(N=64, d=16, sinks=(6, 41), seed=0, Nk=None):
    """q (N, d), k, v (Nk, d) whose scores the eye can follow: each query matches its own key (a diagonal of
    scores near sqrt(d)), and the keys in `sinks` score high for every query, so a row's max jumps when such a key
    arrives and the O rows visibly rescale. V rows are random except the sinks' (+2 / -2 halves)."""
    Nk = N if Nk is None else Nk
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((max(N, Nk), d))
    u = np.ones(d) / np.sqrt(d)                       # a direction every query shares a little of
    q = base[:N] + 1.2 * u
    k = base[:Nk] + 0.3 * rng.standard_normal((Nk, d))
    v = rng.standard_normal((Nk, d))
    for c in sinks:
        if c < Nk:
            k[c] = 2.5 * np.sqrt(d) * u
            v[c] = np.where(np.arange(d) < d // 2, 2.0, -2.0)
    return q, k, v


def record(algo, q, k, v, causal=False, Br=16, Bc=16, scale=None, do=None, itemsize=4, block_mask=None):
    """Run one algorithm of flashlib.tiled on q (Nq, d), k, v (Nk, d) with a trace; return a dict with the
    steps (`steps`, tiled's trace list) and what drawing needs: sizes, inputs, final and standard HBM bytes.
    With a (Tr, Tc) `block_mask` ("fa2" only) it runs flashlib.block_sparse.fa2_forward instead."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    if q.ndim != 2:
        raise ValueError(f"record() takes one head: q (Nq, d), k and v (Nk, d); got q of shape {q.shape}")
    (Nq, d), Nk = q.shape, k.shape[0]
    scale = default_scale(d) if scale is None else scale
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
                Tr=tiled.n_blocks(Nq, Br), Tc=tiled.n_blocks(Nk, Bc), q=q, k=k, v=v, do=do, scale=scale,
                steps=steps, total=total, standard=iomodel.standard_hbm_bytes(Nq, Nk, d, itemsize))


# ----- panels ------------------------------------------------------------------------------------------------

def _matrix(ax, X, B, t_sram, name, loaded, kept, written, cmap="Greys", lim=None):
    """X (N, x) as a heatmap cut into row tiles of B; tile t_sram outlined by its role at this step."""
    lim = lim or (np.nanmax(np.abs(X)) or 1.0)
    ax.imshow(X, cmap=cmap, aspect="auto", interpolation="nearest", vmin=-lim if cmap != "Greys" else None,
              vmax=lim if cmap != "Greys" else None, alpha=0.45 if cmap == "Greys" else 1.0)
    N = X.shape[0]
    for t in range(1, tiled.n_blocks(N, B)):
        ax.axhline(t * B - 0.5, color="k", lw=0.6)
    if t_sram is not None:
        rows = min(B, N - t_sram * B)
        face = LOADED if loaded else KEPT if kept else "none"
        face = matplotlib.colors.to_rgba(face, 0.5 if cmap == "Greys" and face != "none" else 0.0)
        ax.add_patch(Rectangle((-0.5, t_sram * B - 0.5), X.shape[1], rows, facecolor=face,
                               edgecolor=WRITTEN if written else LOADED, lw=3 if written else 2))
    ax.set_title(name, fontsize=FONT)
    ax.set_xticks([])
    ax.set_yticks(np.arange(0, N, B))
    ax.tick_params(labelsize=FONT)


def _tile(ax, X, title, cmap, vmin=None, vmax=None):
    Xm = np.ma.masked_invalid(np.where(np.isneginf(X), np.nan, X))
    cm = matplotlib.colormaps[cmap].with_extremes(bad="#bbbbbb")
    ax.imshow(Xm, cmap=cm, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_title(title, fontsize=FONT)
    ax.set_xticks([])
    ax.set_yticks([])


def _skipped(ax, title):
    ax.set_title(title, fontsize=FONT)
    ax.text(0.5, 0.5, "skipped:\nmasked tile,\nnever loaded", ha="center", va="center", fontsize=FONT,
            transform=ax.transAxes, color="0.3")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_facecolor("#eeeeee")


def _tilemap(ax, rec, status, order, title="tiles of S: visit order"):
    cmap = ListedColormap(["white", "#b7e4c7", "#cccccc", LOADED])
    ax.imshow(status, cmap=cmap, vmin=-0.5, vmax=3.5, aspect="equal")
    for (i, j), n in np.ndenumerate(order):
        if n:
            ax.text(j, i, ("x" if status[i, j] == 2 else str(n)), ha="center", va="center", fontsize=FONT)
    ax.set_xticks(range(rec["Tc"]))
    ax.set_yticks(range(rec["Tr"]))
    ax.set_xticks(np.arange(rec["Tc"] + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(rec["Tr"] + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="k", lw=0.5)
    ax.tick_params(which="both", length=0, labelsize=FONT)
    ax.set_xlabel("j (K/V block)", fontsize=FONT)
    ax.set_ylabel("i (Q block)", fontsize=FONT)
    ax.set_title(title, fontsize=FONT)


def _counters(ax, rec, step, title=None, xmax=None):
    """Bytes read (left half of each bar pair) and written per tensor so far; the final totals and standard
    attention's in the title."""
    kib = 1024
    per = tensor_bytes(rec, step)
    names = list(per)
    y = np.arange(len(names))
    r = np.array([per[n][0] for n in names]) / kib
    w = np.array([per[n][1] for n in names]) / kib
    ax.barh(y - 0.2, r, 0.4, color="#4e79a7", label="read")
    ax.barh(y + 0.2, w, 0.4, color="#e15759", label="written")
    for yy, a, b in zip(y, r, w):
        if a:
            ax.text(a, yy - 0.2, f" {a:.1f}", va="center", fontsize=FONT)
        if b:
            ax.text(b, yy + 0.2, f" {b:.1f}", va="center", fontsize=FONT)
    ax.set_yticks(y, names, fontsize=FONT)
    ax.invert_yaxis()
    ax.set_xlim(0, xmax or 1.3 * max(max(v) for v in _final(rec).values()) / kib)
    ax.tick_params(labelsize=FONT)
    ax.set_xlabel("KiB so far (blue read from HBM, red written)", fontsize=FONT)
    st = rec["steps"][step]
    tot = st["hbm_read"] + st["hbm_written"]
    if rec["algo"] == "bwd":
        ref = 2 * rec["Nq"] * rec["Nk"] * rec["itemsize"]
        ref_text = f"storing and reading P alone: {ref / kib:.0f}"
    else:
        ref_text = f"standard attention: {sum(rec['standard']) / kib:.0f}"
    ax.set_title(title or f"HBM traffic so far {tot / kib:.1f} KiB, at the end {sum(rec['total']) / kib:.1f}; "
                          f"{ref_text}", fontsize=FONT)


def _final(rec):
    return tensor_bytes(rec, len(rec["steps"]) - 1)


def _rescale(ax, rec, st, m_old):
    """exp(m_old - m_new) per row of block i: the factor the old O row (and l) is multiplied by at this step."""
    m_new = st["m"]
    rows = st["i"] * rec["Br"] + np.arange(len(m_new))
    fresh = np.isneginf(m_old)
    alpha = np.where(fresh, 1.0, np.exp(np.where(fresh, 0.0, m_old) - np.where(np.isneginf(m_new), 0.0, m_new)))
    colors = np.where(fresh, "#cccccc", np.where(alpha < 0.999, "#e15759", "#59a14f"))
    ax.barh(rows, alpha, color=colors, height=0.8)
    ax.set_xlim(0, 1.05)
    ax.set_ylim(rows[-1] + 0.5, rows[0] - 0.5)
    ax.tick_params(labelsize=FONT)
    ax.set_xlabel("factor on old O row", fontsize=FONT)
    grew = int(np.sum(~fresh & (alpha < 0.999)))
    ax.set_title(f"exp(m - m_new): {grew} of {len(rows)}\nrows rescaled (red)", fontsize=FONT)


def _figure(fig_or_axes, figsize=FIGSIZE):
    if fig_or_axes is None:
        fig = Figure(figsize=figsize)
        FigureCanvasAgg(fig)
        return fig
    return getattr(fig_or_axes, "figure", fig_or_axes) if not isinstance(fig_or_axes, Figure) else fig_or_axes


def _what(st):
    if st["skipped"]:
        return "skipped (masked tile)"
    loaded, written = st.get("loaded", ()), st.get("written", ())
    return "loads " + ", ".join(loaded) + ("; writes " + ", ".join(written) if written else "")


def draw_step(fig_or_axes, rec, step):
    """Draw step `step` (0-based) of the record `rec` (see `record`) on a Figure (or an Axes' figure);
    returns the figure. The title names the step as 'step n/total' (1-based)."""
    fig = _figure(fig_or_axes)
    fig.clear()
    st = rec["steps"][step]
    algo, i, j, Br, Bc = rec["algo"], st["i"], st["j"], rec["Br"], rec["Bc"]
    status, order, O, m_prev = replay(rec, step)
    gs = fig.add_gridspec(3, 4, height_ratios=[1.15, 1, 1.5 if algo == "bwd" else 0.95], hspace=0.75, wspace=0.45,
                          left=0.08, right=0.97, top=0.87, bottom=0.11)
    live = not st["skipped"]
    loaded, written = st.get("loaded", ()), st.get("written", ())
    row_role = dict(t_sram=i if live else None, kept=live)
    col_role = dict(t_sram=j if live else None, kept=live, written=False)
    if algo == "bwd":
        dq, dk, dv = gradients(rec, step)
        lim = max(np.abs(g).max() for g in gradients(rec, len(rec["steps"]) - 1)) or 1.0
        _matrix(fig.add_subplot(gs[0, 0]), rec["do"], Br, name=f"dO in HBM, dO_{i}", loaded=live, written=False,
                **row_role)
        _matrix(fig.add_subplot(gs[0, 1]), dq, Br, name=f"dQ in HBM: dQ_{i} += dS K_j", loaded=live,
                written=live, cmap="RdBu_r", lim=lim, **row_role)
        _matrix(fig.add_subplot(gs[0, 2]), dk, Bc, name=f"dK: dK_{j} on chip", loaded=False, cmap="RdBu_r",
                lim=lim, **col_role)
        _matrix(fig.add_subplot(gs[0, 3]), dv, Bc, name=f"dV: dV_{j} on chip", loaded=False, cmap="RdBu_r",
                lim=lim, **col_role)
    else:
        _matrix(fig.add_subplot(gs[0, 0]), rec["q"], Br, name=f"Q in HBM, Q_{i}", loaded="Q" in loaded,
                written=False, **row_role)
        _matrix(fig.add_subplot(gs[0, 1]), rec["k"], Bc, name=f"K in HBM, K_{j}", loaded="K" in loaded, **col_role)
        _matrix(fig.add_subplot(gs[0, 2]), rec["v"], Bc, name=f"V in HBM, V_{j}", loaded="V" in loaded, **col_role)
        if live:
            O[slice(i * Br, i * Br + st["O"].shape[0])] = st["O"]
        name = "O in HBM (every step)" if algo == "fa1" else "O_i on chip (O / l so far)"
        _matrix(fig.add_subplot(gs[0, 3]), np.nan_to_num(O, nan=0.0), Br, name=name, loaded="O" in loaded,
                written="O" in written, cmap="RdBu_r", lim=np.abs(rec["v"]).max(), **row_role)

    axS, axP, ax3 = fig.add_subplot(gs[1, 0]), fig.add_subplot(gs[1, 1]), fig.add_subplot(gs[1, 2])
    if live:
        finite = st["S"][np.isfinite(st["S"])]
        _tile(axS, st["S"], f"S_{i}{j} = scale Q_{i} K_{j}^T\nmax {finite.max():.1f}" if finite.size else
              f"S_{i}{j}", "viridis")
        Ptitle = {"fa1": "P~ = exp(S - m~)", "fa2": "P~ = exp(S - m_new)", "bwd": "P = exp(S - lse)\n(recomputed)"}
        _tile(axP, st["P"], Ptitle[algo] + ("" if algo == "bwd" else "\n(unnormalised)"), "magma", 0,
              st["P"].max() or 1.0)
        if algo == "bwd":
            lim = np.abs(st["dS"]).max() or 1.0
            _tile(ax3, st["dS"], "dS = P * (dP - D)", "RdBu_r", -lim, lim)
        else:
            _rescale(ax3, rec, st, m_prev[i * Br:i * Br + st["m"].shape[0]])
    else:
        for ax, t in ((axS, f"S_{i}{j}"), (axP, "P"), (ax3, "dS" if algo == "bwd" else "rescale")):
            _skipped(ax, t)
    _tilemap(fig.add_subplot(gs[1, 3]), rec, status, order, "visit order\n(x skipped)")
    _counters(fig.add_subplot(gs[2, :]), rec, step)

    extra = (" (causal)" if rec["causal"] else "") + (" (block-sparse)" if rec["block_mask"] is not None else "")
    fig.suptitle(f"{TITLES[algo]}{extra}\nN_q = {rec['Nq']}, N_k = {rec['Nk']}, d = {rec['d']}, B_r = {Br}, "
                 f"B_c = {Bc}. step {step + 1}/{len(rec['steps'])}: i = {i}, j = {j}, {_what(st)}",
                 fontsize=FONT + 1)
    fig.legend(handles=[Patch(facecolor=LOADED, alpha=0.5, edgecolor=LOADED, label="loaded into SRAM now"),
                        Patch(facecolor=KEPT, alpha=0.5, edgecolor=LOADED, label="kept in SRAM"),
                        Patch(facecolor="none", edgecolor=WRITTEN, lw=2, label="written to HBM now")],
               loc="lower center", ncol=3, fontsize=FONT, frameon=False)
    return fig


def compare_step(fig_or_axes, rec1, rec2, step):
    """Two records of the same input and tiles (FA1 and FA2) at the same step number, one row each: tile map,
    O as it stands, and the per-tensor HBM counters on one scale, so their divergence shows."""
    fig = _figure(fig_or_axes, (WIDTH, 6.0))
    fig.clear()
    gs = fig.add_gridspec(2, 3, width_ratios=[0.8, 0.8, 2], hspace=0.7, wspace=0.45, left=0.08, right=0.97,
                          top=0.86, bottom=0.09)
    xmax = 1.15 * max(max(max(v) for v in _final(r).values()) for r in (rec1, rec2)) / 1024
    for row, rec in enumerate((rec1, rec2)):
        st = rec["steps"][step]
        status, order, O, _ = replay(rec, step)
        if not st["skipped"] and "O" in st:
            O[slice(st["i"] * rec["Br"], st["i"] * rec["Br"] + st["O"].shape[0])] = st["O"]
        _tilemap(fig.add_subplot(gs[row, 0]), rec, status, order, f"{SHORT[rec['algo']]}: order")
        _matrix(fig.add_subplot(gs[row, 1]), np.nan_to_num(O, nan=0.0), rec["Br"], name="O so far",
                t_sram=None if st["skipped"] else st["i"], loaded="O" in st.get("loaded", ()), kept=True,
                written="O" in st.get("written", ()), cmap="RdBu_r", lim=np.abs(rec["v"]).max())
        tot = (st["hbm_read"] + st["hbm_written"]) / 1024
        _counters(fig.add_subplot(gs[row, 2]), rec, step, xmax=xmax,
                  title=f"{SHORT[rec['algo']]}: {tot:.1f} KiB so far; {_what(st)}")
    fig.suptitle(f"The same {rec1['Tr']} x {rec1['Tc']} tiles in two orders (N = {rec1['Nq']}, d = {rec1['d']}, "
                 f"B_r = B_c = {rec1['Br']})\nstep {step + 1}/{len(rec1['steps'])}: FA1 re-reads and re-writes O, "
                 "l, m; FA2 keeps them on chip", fontsize=FONT + 1)
    return fig


# ----- players -----------------------------------------------------------------------------------------------

def player(rec, dpi=DPI, interval=900):
    """An HTML frame player (buttons and slider, works offline) stepping through every step of `rec`.
    Display it with IPython.display.HTML; its size is checked against rcParams['animation.embed_limit']."""
    return animate(lambda fig, s: draw_step(fig, rec, s), len(rec["steps"]), dpi=dpi, interval=interval)


def compare_player(rec1, rec2, dpi=DPI, interval=900):
    """Player of compare_step over the steps of two records with the same number of steps."""
    if len(rec1["steps"]) != len(rec2["steps"]):
        raise ValueError(f"the records have {len(rec1['steps'])} and {len(rec2['steps'])} steps; compare_player "
                         "needs the same tiles (same N, Br, Bc, causal)")
    return animate(lambda fig, s: compare_step(fig, rec1, rec2, s), len(rec1["steps"]), figsize=(WIDTH, 6.0), dpi=dpi,
                   interval=interval)


def slider(rec, dpi=96):
    """A live ipywidgets view: a Play button and an IntSlider; moving the slider redraws that step into an Image.
    The returned VBox carries `.slider`, `.image`, `.figure` and `.redraw(step)`."""
    import ipywidgets as w
    fig = Figure(figsize=FIGSIZE, dpi=dpi)
    FigureCanvasAgg(fig)
    s = w.IntSlider(value=0, min=0, max=len(rec["steps"]) - 1, description="step", continuous_update=False)
    play = w.Play(value=0, min=0, max=s.max, interval=1000)
    w.jslink((play, "value"), (s, "value"))
    image = w.Image(format="png", layout=w.Layout(width="100%"))

    def redraw(step):
        draw_step(fig, rec, step)
        image.value = png(fig)

    s.observe(lambda change: redraw(change["new"]), names="value")
    redraw(0)
    box = w.VBox([w.HBox([play, s]), image])
    box.slider, box.image, box.figure, box.redraw = s, image, fig, redraw
    return box
