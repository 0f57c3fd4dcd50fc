"""The online softmax as an animation: scores arrive one key at a time, the running max m and running sum l
are updated, and the terms already summed are rescaled by exp(m_old - m_new) whenever the max grows.
Drawn from `flashlib.online_softmax.online_softmax(x, trace=...)`."""
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..constants import NEG_INF
from ..online_softmax import online_softmax
from .players import DPI, WIDTH, animate

FIGSIZE = (WIDTH, 4.4)


def draw_softmax_step(fig, x, step):
    """After reading key `step` (0-based) of the scores x (n,): top, the scores seen so far and the running max m;
    bottom, each term exp(x_j - m) as it stands now, with its value before this step as an outline."""
    x = np.asarray(x, np.float64)
    trace = []
    online_softmax(x, trace=trace)
    _, m, l = trace[step]
    m_old, l_old = (trace[step - 1][1], trace[step - 1][2]) if step else (NEG_INF, 0.0)
    fig.clear()
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw=dict(hspace=0.35))
    n, seen = len(x), np.arange(len(x)) <= step
    idx = np.arange(n)
    top.bar(idx, x, color=np.where(seen, "#4e79a7", "#dddddd"))
    top.axhline(m, color="#59a14f", lw=2, label=f"running max m = {m:.2f}")
    if np.isfinite(m_old) and m_old != m:
        top.axhline(m_old, color="#59a14f", lw=1, ls="--", label=f"previous max {m_old:.2f}")
    top.legend(fontsize=8, loc="lower right")
    top.set_ylabel("score x_j", fontsize=9)
    now = np.where(seen, np.exp(x - m), 0.0)
    before = np.where(idx < step, np.exp(x - m_old), 0.0) if step else np.zeros(n)
    bottom.bar(idx, now, color=np.where(idx == step, "#f28e2b", "#b07aa1"), label="exp(x_j - m) now")
    bottom.bar(idx, before, facecolor="none", edgecolor="k", lw=1, ls=":", label="before this step")
    bottom.set_ylim(0, 1.05 * max(1.0, before.max()))
    bottom.legend(fontsize=8, loc="upper right")
    bottom.set_ylabel("term", fontsize=9)
    bottom.set_xlabel("key j", fontsize=9)
    factor = np.exp(m_old - m) if step else 1.0
    fig.suptitle(f"key {step + 1}/{n}: m = {m:.2f}, l = {l:.3f} = {l_old:.3f} x {factor:.3f} + "
                 f"exp({x[step]:.2f} - {m:.2f})\n"
                 + ("the max grew: every earlier term shrinks by the same factor" if factor < 1 else
                    "the max did not change: earlier terms stay as they were"), fontsize=10)
    return fig


def softmax_player(x, dpi=DPI, interval=900):
    """HTML frame player, one frame per key of x (n,)."""
    return animate(lambda fig, s: draw_softmax_step(fig, x, s), len(x), figsize=FIGSIZE, dpi=dpi,
                   interval=interval)


def new_figure(figsize=FIGSIZE, dpi=80):
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig
