"""Which thread blocks run at once: a grid of `blocks` thread blocks on `sms` SMs holding `per_sm` blocks each
runs in waves of sms x per_sm blocks (if every block takes as long as the others); the last, partial wave is the
tail, when some SMs sit idle.

    wave_of(blocks, sms, per_sm)        # (number of waves, blocks in the last one)
    draw_waves(ax, blocks, sms, per_sm, wave)   # the SMs as a grid of slots, coloured by the wave each block runs in
    HTML(waves_player(blocks, sms, per_sm))     # one frame per wave
"""
import math

import matplotlib
import numpy as np
from matplotlib.collections import PatchCollection
from matplotlib.patches import Rectangle

from .players import FONT, WIDTH, animate


def wave_of(blocks, sms, per_sm):
    """(waves, blocks in the last wave, share of the SM slots the last wave uses) for a grid of `blocks`."""
    if blocks < 1 or sms < 1 or per_sm < 1:
        raise ValueError(f"need blocks, sms, per_sm >= 1, got {blocks}, {sms}, {per_sm}")
    slots = sms * per_sm
    n = math.ceil(blocks / slots)
    last = blocks - (n - 1) * slots
    return n, last, last / slots


def draw_waves(ax, blocks, sms, per_sm, wave=None):
    """SM s is a column of per_sm slots (SMs wrapped into rows of up to 22); slot (s, r) of wave w runs block
    w * sms * per_sm + r * sms + s (blocks go to SMs round-robin, as the hardware scheduler roughly does).
    wave=None colours every slot by how many waves it is busy; else wave w's blocks are orange, the finished
    ones green, the waiting ones white."""
    n, last, share = wave_of(blocks, sms, per_sm)
    cols = min(sms, 22)
    slots = sms * per_sm
    if wave is None:
        colors = matplotlib.colormaps["Blues"](np.linspace(0, 0.9, n + 1))
        title = (f"{blocks:,} blocks on {sms} SMs x {per_sm} slots: {n} wave{'s' if n > 1 else ''}, "
                 f"the last {share:.0%} full\n(darker: a slot busy in more waves)")
    else:
        colors = {0: "#ffffff", 1: "#b7e4c7", 3: "#f28e2b"}
        running = min(slots, blocks - wave * slots)
        title = (f"wave {wave + 1}/{n}: blocks {wave * slots}..{wave * slots + running - 1} run "
                 f"({running} of {slots} slots)")
    boxes, faces = [], []
    for s in range(sms):
        for r in range(per_sm):
            busy = sum(1 for w in range(n) if w * slots + r * sms + s < blocks)
            if wave is None:
                value = busy
            else:                                   # 3 running now, 1 its blocks finished, 0 never used
                value = 3 if wave * slots + r * sms + s < blocks else 1 if busy else 0
            boxes.append(Rectangle((s % cols, (s // cols) * (per_sm + 0.6) + r), 0.9, 0.9))
            faces.append(colors[value])
    ax.add_collection(PatchCollection(boxes, facecolors=faces, edgecolors="0.5", linewidths=0.5))
    ax.set_xlim(-0.2, cols)
    ax.set_ylim(math.ceil(sms / cols) * (per_sm + 0.6), -0.2)
    ax.set_axis_off()
    ax.text(0.5, -0.04, f"SMs ({cols} per row), each a column of {per_sm} resident block slot"
            f"{'s' if per_sm > 1 else ''}", fontsize=FONT, ha="center", va="top", transform=ax.transAxes)
    ax.set_title(title, fontsize=FONT)
    return n


def draw_wave_frame(fig, blocks, sms, per_sm, wave, label=""):
    fig.clear()
    ax = fig.add_subplot()
    n = draw_waves(ax, blocks, sms, per_sm, wave)
    fig.suptitle((label + "\n" if label else "") + "orange: running now, green: finished", fontsize=FONT + 1)
    fig.subplots_adjust(left=0.03, right=0.97, top=0.8, bottom=0.12)
    return n


def waves_player(blocks, sms, per_sm, label="", interval=1200):
    n = wave_of(blocks, sms, per_sm)[0]
    return animate(lambda fig, w: draw_wave_frame(fig, blocks, sms, per_sm, w, label), n, figsize=(WIDTH, 3.0),
                   interval=interval)
