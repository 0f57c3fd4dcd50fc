"""The ring's schedule: which K/V block each rank holds at each step, and which part of it it computes."""


def block_of(rank, step, P):
    """The rank whose K/V block `rank` holds at `step`: blocks travel to rank+1 every step."""
    return (rank - step) % P


def block_plan(rank, src, P, n, layout, causal):
    """What `rank` computes with the K/V block of rank `src`: None (skipped) or (q_rows, k_rows, causal) as
    slices of the local length n. The diagonal block is causal in either layout (zigzag's two chunks keep their
    global order); off the diagonal a zigzag rank sees the first half of an earlier rank's keys with all its
    queries, or all of a later rank's keys with the second half of its queries."""
    every = slice(0, n)
    if not causal:
        return every, every, False
    if src == rank:
        return every, every, True
    if layout == "contiguous":
        return (every, every, False) if src < rank else None
    h = n // 2
    return (every, slice(0, h), False) if src < rank else (slice(h, n), every, False)


def schedule(P, n, layout, causal):
    """schedule[step][rank] = (src, plan): the whole ring at a glance, for the book's figures."""
    return [[(block_of(r, s, P), block_plan(r, block_of(r, s, P), P, n, layout, causal)) for r in range(P)]
            for s in range(P)]
