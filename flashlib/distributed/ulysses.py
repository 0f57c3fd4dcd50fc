"""DeepSpeed-Ulysses: all-to-all from sequence shards to head groups, attention over the whole sequence, and back."""
import torch
import torch.distributed as dist

from ..torch import flash_attention
from ._common import STATS, group_info, prepare
from .layouts import check_layout, gather_order, positions


def _all_to_all(parts, group, phase):
    """dist.all_to_all, counted: parts[p] goes to rank p; returns what each rank sent us. Alone (P = 1) a rank
    keeps its one part and makes no collective."""
    rank, P = group_info(group)
    if P == 1:
        return list(parts)
    outs = [torch.empty_like(p) for p in parts]
    STATS.setdefault(phase, {"collectives": 0, "bytes": 0})
    STATS[phase]["collectives"] += 1
    STATS[phase]["bytes"] += sum(p.numel() * p.element_size() for i, p in enumerate(parts) if i != rank)
    if dist.get_backend(group) == "gloo":      # gloo has no all_to_all in some torch releases (2.11): the same
        _exchange(outs, parts, rank, P, group)   # exchange as point-to-point messages
    else:
        dist.all_to_all(outs, parts, group=group)
    return outs


def _exchange(outs, parts, rank, P, group):
    """all_to_all by batched isend/irecv: parts[p] to rank p, outs[p] from rank p."""
    peer = (lambda p: p) if group is None else (lambda p: dist.get_global_rank(group, p))
    outs[rank].copy_(parts[rank])
    ops = [op for p in range(P) if p != rank
           for op in (dist.P2POp(dist.isend, parts[p], peer(p), group), dist.P2POp(dist.irecv, outs[p], peer(p), group))]
    for work in dist.batch_isend_irecv(ops):
        work.wait()


def _seq_to_heads(x, group, layout, phase):
    """(B, H, n, d) sequence-sharded -> (B, H/P, P n, d): rank p gets head group p over the whole sequence."""
    _, P = group_info(group)
    y = torch.cat(_all_to_all([c.contiguous() for c in x.chunk(P, dim=1)], group, phase), dim=2)
    return y if layout == "contiguous" else y.index_select(2, gather_order(P, x.shape[2], layout).to(y.device))


def _heads_to_seq(y, group, layout, phase):
    """The inverse of _seq_to_heads: (B, H/P, P n, d) -> (B, H, n, d)."""
    _, P = group_info(group)
    n = y.shape[2] // P
    parts = [y.index_select(2, torch.tensor(positions(p, P, n, layout), device=y.device)) for p in range(P)]
    return torch.cat(_all_to_all(parts, group, phase), dim=1)


class _AllToAll(torch.autograd.Function):
    """One all-to-all, `to_heads` (sequence shards -> head groups) or back, differentiable: an all-to-all is a
    permutation, so its adjoint is the inverse one."""

    @staticmethod
    def forward(ctx, x, group, layout, to_heads):
        ctx.args = (group, layout, to_heads)
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, group, layout, "ulysses_forward")

    @staticmethod
    def backward(ctx, g):
        group, layout, to_heads = ctx.args
        inverse = _heads_to_seq if to_heads else _seq_to_heads
        return inverse(g.contiguous(), group, layout, "ulysses_backward"), None, None, None


def ulysses_attention(q, k, v, *, causal=False, scale=None, group=None, backend="auto", layout="contiguous"):
    """DeepSpeed-Ulysses: all-to-all q, k, v from sequence shards to head groups, attend over the whole sequence
    for H/P heads with flashlib's kernel, all-to-all O back. q, k, v: (B, H, n, d) shards; H (and the K/V heads)
    must be multiples of P. Returns this rank's O shard (B, H, n, d); differentiable."""
    _, P = group_info(group)
    q, k, v, scale, backend = prepare(q, k, v, scale, backend)
    check_layout(layout, q.shape[2], P)
    for name, t in (("q", q), ("k", k)):
        if t.shape[1] % P:
            raise ValueError(f"ulysses_attention gives each of the P = {P} ranks H/P heads: {name} has "
                             f"{t.shape[1]} heads, not a multiple of {P}; use ring_attention, which has no such limit")
    STATS["ulysses_forward"] = {"collectives": 0, "bytes": 0}
    STATS["ulysses_backward"] = {"collectives": 0, "bytes": 0}
    qh, kh, vh = (_AllToAll.apply(t, group, layout, True) for t in (q, k, v))
    o = flash_attention(qh, kh, vh, causal=causal, scale=scale, backend=backend)
    return _AllToAll.apply(o, group, layout, False)
