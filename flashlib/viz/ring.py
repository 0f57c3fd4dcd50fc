"""Ring attention pictures, drawn from the schedule flashlib.distributed runs: which K/V block each rank holds at
each step, which (query, key) pairs each step computes, the idle ranks of a causal contiguous layout, and the
link-level IO model (when a step's transfer hides behind its compute)."""
import matplotlib.pyplot as plt
import numpy as np

from .. import distributed as fd
from ..reference import causal_mask


def block_work(plan, n):
    """The fraction of an n x n block's scores that `plan` (from distributed.block_plan) computes."""
    if plan is None:
        return 0.0
    qs, ks, causal = plan
    rows, cols = len(range(n)[qs]), len(range(n)[ks])
    return (causal_mask(rows, cols).sum() if causal else rows * cols) / (n * n)


def step_pairs(P, n, layout, causal):
    """(N, N) int: the step (0..P-1) at which each (query, key) pair is computed, -1 where the mask hides it."""
    N = P * n
    out = np.full((N, N), -1)
    for s, row in enumerate(fd.schedule(P, n, layout, causal)):
        for rank, (src, plan) in enumerate(row):
            if plan is None:
                continue
            qs, ks, c = plan
            qp = np.array(fd.positions(rank, P, n, layout))[qs]
            kp = np.array(fd.positions(src, P, n, layout))[ks]
            vis = causal_mask(len(qp), len(kp)) if c else np.ones((len(qp), len(kp)), bool)
            sub = out[np.ix_(qp, kp)]
            sub[vis] = s
            out[np.ix_(qp, kp)] = sub
    return out


def schedule_work(P, layout, causal, n=16):
    """(steps, ranks) array of block_work, and the ring's time in full-block units (a step lasts as long as its
    busiest rank) and the share of rank-steps left idle."""
    work = np.array([[block_work(plan, n) for _, plan in row] for row in fd.schedule(P, n, layout, causal)])
    steps = work.max(axis=1).sum()
    return work, steps, 1 - work.sum() / (P * steps)


def draw_schedule(ax, P, layout, causal, n=16):
    """Steps x ranks: the K/V block each rank holds (text) and the share of it computed (colour); the title gives
    schedule_work's time and idle share, which are returned."""
    work, steps, idle = schedule_work(P, layout, causal, n)
    ax.imshow(work, cmap="Blues", vmin=0, vmax=1.3)
    for s, row in enumerate(fd.schedule(P, n, layout, causal)):
        for r, (src, plan) in enumerate(row):
            ax.text(r, s, f"KV{src}" if plan else f"KV{src}\nidle", ha="center", va="center", fontsize=7,
                    color="k" if plan else "#999999")
    ax.set_xticks(range(P), [f"rank {r}" for r in range(P)], fontsize=7)
    ax.set_yticks(range(P), [f"step {s}" for s in range(P)], fontsize=7)
    ax.set_title(f"{layout}{', causal' if causal else ''}: {steps:.2f} block-times, {idle:.0%} idle", fontsize=9)
    return steps, idle


def draw_pairs(ax, P, n, layout, causal, step=None):
    """The global N x N score matrix coloured by the step that computes each pair (masked pairs white); with
    `step`, only that step's pairs are coloured and earlier ones grey. Lines mark the ranks' query rows."""
    st = step_pairs(P, n, layout, causal)
    colors = plt.get_cmap("viridis", P)(np.arange(P))
    if step is None:
        img = np.ones(st.shape + (4,))
        img[st >= 0] = colors[st[st >= 0]]
        ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colors[s], label=f"step {s}") for s in range(P)],
                  fontsize=7, loc="upper right")
    else:
        img = np.ones(st.shape + (4,))
        img[(st >= 0) & (st < step)] = (0.8, 0.8, 0.8, 1)
        img[st == step] = colors[step]
    ax.imshow(img, interpolation="nearest")
    pos = [fd.positions(r, P, n, layout) for r in range(P)]
    for r in range(P):
        for p in pos[r]:
            ax.add_patch(plt.Rectangle((-1.6, p - 0.5), 1, 1, color=plt.get_cmap("tab10")(r), clip_on=False))
    ax.set_xlim(-1.7, P * n - 0.5)
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_xlabel("key position", fontsize=8)
    ax.set_ylabel("query position (colour: owning rank)", fontsize=8)
    ax.set_title(f"{layout}{', causal' if causal else ''}" + (f": step {step}" if step is not None else ""), fontsize=9)


def draw_steps(P, n, layout, causal):
    """One panel per ring step: the pairs computed at that step, and which K/V block every rank holds."""
    fig, axes = plt.subplots(1, P, figsize=(2.6 * P, 3.0))
    for s, ax in enumerate(axes):
        draw_pairs(ax, P, n, layout, causal, step=s)
        held = ", ".join(f"{r}:KV{fd.block_of(r, s, P)}" for r in range(P))
        ax.set_xlabel(f"rank:block  {held}", fontsize=7)
        ax.set_ylabel("")
    fig.tight_layout()
    return fig


def draw_link_model(ax, links, tflops, d=128, heads=16, itemsize=2, lengths=None):
    """Per-step compute time (one line per kernel speed in `tflops`, a dict name -> TFLOP/s) and transfer time
    (one line per link in `links`, name -> GB/s one way) against the local length n, from distributed.step_seconds.
    The transfer hides where the compute line lies above it."""
    n = np.asarray(lengths if lengths is not None else np.logspace(8, 17, 60, base=2))
    for name, F in tflops.items():
        ax.loglog(n, [fd.step_seconds(x, d, heads, F, 1.0, itemsize)[0] for x in n], lw=2, label=f"compute, {name}")
    for name, W in links.items():
        ax.loglog(n, [fd.step_seconds(x, d, heads, 1.0, W, itemsize)[1] for x in n], "--", label=f"transfer, {name}")
    ax.set_xlabel("local length n = N/P (positions per GPU)", fontsize=8)
    ax.set_ylabel("seconds per ring step", fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
