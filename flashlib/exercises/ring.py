"""Chapter 15: the zigzag layout's positions and the kind of each ring block under causality."""
from .grading import _grade


def check_zigzag_positions(fn, strict=False):
    """fn(rank, P, N) -> the global positions (a list or array of N // P ints, in local order) that `rank` of P
    holds in the zigzag layout: the sequence cut into 2P equal chunks, rank r holding chunks r and 2P-1-r."""
    from ..distributed.layouts import positions

    def case(P, N):
        def run():
            for r in range(P):
                got = [int(x) for x in fn(r, P, N)]
                want = positions(r, P, N // P, "zigzag")
                if got != want:
                    return f"rank {r} of P = {P}, N = {N}: expected {want}, got {got}"
        return run

    cases = [(f"P = {P}, N = {N}", case(P, N)) for P, N in ((2, 8), (3, 12), (4, 8), (4, 32), (1, 6))]
    return _grade("check_zigzag_positions", cases, strict)


def _block_kind(q_pos, k_pos):
    """'skip' when every key comes after every query (top-left causal), 'full' when every key is at or before
    every query, else 'mask'."""
    if min(k_pos) > max(q_pos):
        return "skip"
    return "full" if max(k_pos) <= min(q_pos) else "mask"


def check_block_kind(fn, strict=False):
    """fn(q_pos, k_pos) -> 'skip' | 'mask' | 'full': what a rank does with one K/V block under a causal mask,
    given the global positions of its queries and of the block's keys (contiguous runs or zigzag pairs)."""
    from ..distributed.layouts import positions

    def case(P, n, layout):
        def run():
            for r in range(P):
                for s in range(P):
                    q, k = positions(r, P, n, layout), positions(s, P, n, layout)
                    want, got = _block_kind(q, k), fn(list(q), list(k))
                    if got != want:
                        return (f"queries of rank {r} (positions {q[0]}..{q[-1]}), keys of rank {s} (positions "
                                f"{k[0]}..{k[-1]}): expected {want!r}, got {got!r}")
        return run

    cases = [(f"P = {P}, {n} positions per rank, {layout}", case(P, n, layout))
             for P, n, layout in ((2, 4, "contiguous"), (4, 3, "contiguous"), (2, 4, "zigzag"), (4, 6, "zigzag"))]
    return _grade("check_block_kind", cases, strict)
