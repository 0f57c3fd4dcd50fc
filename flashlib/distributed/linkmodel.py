"""The link-level IO model of one ring step: when the transfer of a K/V block hides behind its compute."""


def step_seconds(n, d, heads, tflops, link_GBps, itemsize=2, work=1.0, backward=False):
    """(compute s, transfer s) of one ring step on one GPU.

    Compute: 4 n^2 d FLOPs per head for the block (x work, the fraction of the block computed; x2.5 backward) at
    `tflops`. Transfer: K and V of n positions sent on, plus the float32 dK, dV accumulators in the backward, over
    a link of `link_GBps` in one direction. The transfer hides when compute >= transfer."""
    f = 4 * n * n * d * heads * work * (2.5 if backward else 1.0)
    sent = 2 * n * d * heads * (itemsize + (4 if backward else 0))
    return f / (tflops * 1e12), sent / (link_GBps * 1e9)


def hiding_length(tflops, link_GBps, itemsize=2, work=1.0, backward=False):
    """The smallest local length n at which a step's compute covers its transfer (step_seconds equal):
    forward n = b F / (2 W work); backward n = (b + 4) F / (5 W work)."""
    per_n = step_seconds(1, 1, 1, tflops, link_GBps, itemsize, work, backward)    # both terms scale with d, heads
    return per_n[1] / per_n[0]
