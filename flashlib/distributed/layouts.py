"""Which positions of the sequence each rank holds, and cutting a full tensor into shards and back."""
import torch
import torch.distributed as dist

from ._common import group_info

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout, n, P):
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
    if layout == "zigzag" and n % 2:
        raise ValueError(f"layout 'zigzag' needs an even local length (two equal chunks per rank), got {n}; "
                         f"the full length must be a multiple of 2P = {2 * P}")


def positions(rank, P, n, layout):
    """The global positions (a list of n ints) that `rank` of P holds, n per rank, in its local order."""
    check_layout(layout, n, P)
    if layout == "contiguous":
        return list(range(rank * n, (rank + 1) * n))
    c = n // 2
    return list(range(rank * c, (rank + 1) * c)) + list(range((2 * P - 1 - rank) * c, (2 * P - rank) * c))


def gather_order(P, n, layout):
    """Index that puts rows gathered in rank order (rank 0's positions, then rank 1's, ...) into global order."""
    order = [p for r in range(P) for p in positions(r, P, n, layout)]
    inverse = torch.empty(P * n, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(P * n)
    return inverse


def shard(x, *, layout, group=None, dim=2):
    """This rank's part of the full tensor x along `dim` (a copy), for `layout`."""
    rank, P = group_info(group)
    if x.shape[dim] % P:
        raise ValueError(f"the sequence length {x.shape[dim]} (dim {dim}) must be a multiple of the world size {P}")
    idx = torch.tensor(positions(rank, P, x.shape[dim] // P, layout), device=x.device)
    return x.index_select(dim, idx).contiguous()


def unshard(x_local, *, layout, group=None, dim=2):
    """The full tensor from every rank's part (all_gather), in global order; every rank gets it. Under NCCL
    x_local must be a CUDA tensor (NCCL moves GPU memory only)."""
    rank, P = group_info(group)
    n = x_local.shape[dim]
    parts = [torch.empty_like(x_local) for _ in range(P)]
    dist.all_gather(parts, x_local.contiguous(), group=group)
    return torch.cat(parts, dim).index_select(dim, gather_order(P, n, layout).to(x_local.device))
