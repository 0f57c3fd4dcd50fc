"""Rung 7's timeline drawn: one lane per warpgroup of a CTA (the producer at the top, then the consumers), each
phase a bar from its start to its end, coloured by what it is. The records come from
`flashlib.cupy_kernels.timeline.record` (or a saved result: `flashlib.bench.load`)."""
import matplotlib.pyplot as plt
from matplotlib.patches import Patch

from ..cupy_kernels.timeline import PHASES
from . import OKABE_ITO

# what the colours stand for: waits grey, TMA issues blue, wgmma issues orange, the softmax green, the rescale sky
# blue, the epilogue purple, the ping-pong turn black
KIND = {"q_wait": "wait", "k_wait": "wait", "v_wait": "wait", "wait_q": "wait", "wait_k": "wait", "wait_v": "wait",
        "q_issue": "TMA copy", "k_issue": "TMA copy", "v_issue": "TMA copy",
        "issue": "wgmma issue", "wait_s": "wgmma wait", "wait_pv": "wgmma wait",
        "softmax": "softmax", "rescale": "rescale O", "epilogue": "epilogue", "turn": "ping-pong wait"}
COLOUR = {"wait": "#BBBBBB", "TMA copy": OKABE_ITO[0], "wgmma issue": OKABE_ITO[1], "wgmma wait": "#F5D6A8",
          "softmax": OKABE_ITO[2], "rescale O": OKABE_ITO[4], "epilogue": OKABE_ITO[5], "ping-pong wait": "#444444"}
assert set(KIND) == set(PHASES)


def lanes(records, cta=0):
    """The lane names of CTA `cta`'s records, producer first, then consumers in order."""
    found = {r["warpgroup"]: r["lane"] for r in records if r["cta"] == cta}
    return [found[w] for w in sorted(found)]


def draw_timeline(records, cta=0, clock="ns", window=None, ax=None, title=None):
    """Broken-bar chart of CTA `cta`'s records on ax (a new figure if None); clock 'ns' (%globaltimer) or 'clk'
    (%clock64 cycles); window (t0, t1) restricts the time axis. Returns the axes."""
    if clock not in ("ns", "clk"):
        raise ValueError(f"clock must be 'ns' or 'clk', got {clock!r}")
    rec = [r for r in records if r["cta"] == cta]
    if not rec:
        raise ValueError(f"no records of CTA {cta} (CTAs present: {sorted({r['cta'] for r in records})})")
    names = lanes(records, cta)
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 0.6 + 0.55 * len(names)))
    start, end = f"start_{clock}", f"end_{clock}"
    row = {w: i for i, w in enumerate(sorted({r["warpgroup"] for r in rec}))}
    for w, i in row.items():
        for kind, colour in COLOUR.items():
            bars = [(r[start], max(r[end] - r[start], 1)) for r in rec
                    if r["warpgroup"] == w and KIND[r["phase"]] == kind]
            if bars:
                ax.broken_barh(bars, (i - 0.4, 0.8), facecolors=colour, edgecolor="none", label=kind)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("time (ns, %globaltimer)" if clock == "ns" else "SM cycles (%clock64)")
    if window is not None:
        ax.set_xlim(*window)
    used = [k for k in COLOUR if any(KIND[r["phase"]] == k for r in rec)]
    ax.legend(handles=[Patch(color=COLOUR[k], label=k) for k in used], loc="upper center", ncol=min(len(used), 8),
              bbox_to_anchor=(0.5, -0.35 if len(names) < 4 else -0.2), frameon=False, fontsize="small")
    if title:
        ax.set_title(title)
    return ax
