"""Ring attention: K/V blocks travel round the ring while each rank folds them into its queries' state."""
import torch
import torch.distributed as dist

from ..api import attention, attention_backward
from ._common import STATS, acc_dtype, group_info, prepare
from .layouts import check_layout
from .merge import as_array, as_tensor, finish, fold
from .plan import block_of, block_plan


class BlockTracker:
    """Counts the K/V blocks a rank holds (the one it computes on, the one arriving); raises past `limit`."""

    def __init__(self, limit=2):
        self.limit, self.held, self.peak = limit, set(), 0

    def take(self, name):
        self.held.add(name)
        self.peak = max(self.peak, len(self.held))
        if len(self.held) > self.limit:
            raise RuntimeError(f"a rank holds {len(self.held)} K/V blocks {sorted(self.held)}; the ring allows {self.limit}")

    def drop(self, name):
        self.held.discard(name)


def _new_stats(phase):
    STATS[phase] = {"messages": {}, "bytes": {}, "computed": [], "peak_kv_blocks": 0}
    return STATS[phase]


def _exchange(sends, recvs, nxt, prv, group, stats, key):
    """Send each tensor of `sends` to rank nxt and receive each of `recvs` from prv, asynchronously; returns the
    requests. Every point-to-point message of the ring goes through here and is counted in `stats` under `key`,
    (what, step) with what 'kv' or 'dkv': messages (each isend and irecv) and bytes sent. Never called with
    P = 1: a rank does not send to itself (NCCL would wait for a matching receive that is never posted)."""
    ops = [dist.P2POp(dist.isend, t, nxt, group) for t in sends] + [dist.P2POp(dist.irecv, t, prv, group) for t in recvs]
    stats["messages"][key] = stats["messages"].get(key, 0) + len(ops)
    stats["bytes"][key] = stats["bytes"].get(key, 0) + sum(t.numel() * t.element_size() for t in sends)
    return dist.batch_isend_irecv(ops)


def _wait(reqs):
    for r in reqs:
        r.wait()


def _peers(group):
    rank, P = group_info(group)
    glob = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
    return rank, P, glob((rank + 1) % P), glob((rank - 1) % P)


def _rows(x, s):
    return x[:, :, s].contiguous()


def _ring_steps(k, v, n, causal, group, layout, stats):
    """Walk the ring: yields (step, the K/V block held now, its plan) once per step. Before each yield the next
    block's transfer has started; after the caller's work on the step, it waits for that block and lets the
    used one go. Records the steps computed and the peak number of K/V blocks held in `stats`."""
    rank, P, nxt, prv = _peers(group)
    held, cur = BlockTracker(), (k, v)
    held.take(f"kv{rank}")
    for step in range(P):
        src = block_of(rank, step, P)
        nxt_kv, reqs = _pass_on(cur, rank, step, P, held, nxt, prv, group, stats)   # the next block's transfer first
        plan = block_plan(rank, src, P, n, layout, causal)
        stats["computed"].append(plan is not None)
        yield step, cur, plan
        cur = _arrived(cur, nxt_kv, reqs, src, held)
    stats["peak_kv_blocks"] = held.peak


def _ring_forward(q, k, v, causal, scale, group, layout, backend):
    stats, dt = _new_stats("forward"), acc_dtype(q)
    state = [torch.zeros(q.shape[:3], dtype=dt, device=q.device), torch.zeros(q.shape[:3], dtype=dt, device=q.device),
             torch.zeros(q.shape, dtype=dt, device=q.device)]
    m, l, acc = (as_array(t) for t in state)                # views: writing them writes the tensors
    for _, (kb, vb), plan in _ring_steps(k, v, q.shape[2], causal, group, layout, stats):
        if plan is not None:
            qs, ks, c = plan
            o_b, lse_b = attention(_rows(q, qs), _rows(kb, ks), _rows(vb, ks), causal=c, scale=scale,
                                   backend=backend, return_lse=True)
            m[..., qs], l[..., qs], acc[..., qs, :] = fold(m[..., qs], l[..., qs], acc[..., qs, :],
                                                          as_array(o_b.to(dt)), as_array(lse_b.to(dt)))
    o, lse = finish(m, l, acc)
    return as_tensor(o, q).to(q.dtype), as_tensor(lse, q)


def _pass_on(cur, rank, step, P, held, nxt, prv, group, stats):
    """Start sending the K/V block held at `step` on to the next rank and receiving the next one into new buffers;
    (buffers, requests), or (None, None) at the last step."""
    if step + 1 == P:
        return None, None
    nxt_kv = (torch.empty_like(cur[0]), torch.empty_like(cur[1]))
    held.take(f"kv{block_of(rank, step + 1, P)}")
    return nxt_kv, _exchange(cur, nxt_kv, nxt, prv, group, stats, ("kv", step))


def _arrived(cur, nxt_kv, reqs, src, held):
    """The block to use next: once the transfer is done, the received one (block src is let go); else cur."""
    if nxt_kv is None:
        return cur
    _wait(reqs)
    held.drop(f"kv{src}")
    return nxt_kv


def _ring_backward(q, k, v, o, lse, do, causal, scale, group, layout, backend):
    """dQ stays home; K/V go round as in the forward. The float32 dK/dV accumulator of each block follows the
    block round the ring, sent on once a rank has added its share, and makes one hop more: home to its owner.
    With P = 1 the accumulator never leaves: it is home already."""
    _, P, nxt, prv = _peers(group)
    stats, dt = _new_stats("backward"), acc_dtype(q)
    dq = torch.zeros(q.shape, dtype=dt, device=q.device)
    dkv = (torch.zeros(k.shape, dtype=dt, device=k.device), torch.zeros(v.shape, dtype=dt, device=v.device))
    for step, (kb, vb), plan in _ring_steps(k, v, q.shape[2], causal, group, layout, stats):
        if plan is not None:
            qs, ks, c = plan
            dq_b, dk_b, dv_b = attention_backward(_rows(q, qs), _rows(kb, ks), _rows(vb, ks), _rows(o, qs),
                                                  lse[:, :, qs].contiguous(), _rows(do, qs), causal=c, scale=scale,
                                                  backend=backend)
            dq[:, :, qs] += dq_b.to(dt)
        if step > 0:                                        # block src's accumulator, sent by rank-1 last step
            _wait(dkv_reqs)
            dkv = dkv_in
        if plan is not None:
            dkv[0][:, :, ks] += dk_b.to(dt)
            dkv[1][:, :, ks] += dv_b.to(dt)
        if P > 1:
            dkv_in = (torch.empty_like(dkv[0]), torch.empty_like(dkv[1]))
            dkv_reqs = _exchange(dkv, dkv_in, nxt, prv, group, stats, ("dkv", step))
    if P > 1:
        _wait(dkv_reqs)                                     # our own block's dK, dV, home after P visits
        dkv = dkv_in
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class RingAttention(torch.autograd.Function):
    """Ring attention on this rank's shards q, k, v (B, H, n, d); saves (q, k, v, O, lse), never S, P or other
    ranks' blocks."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, group, layout, backend):
        o, lse = _ring_forward(q, k, v, causal, scale, group, layout, backend)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (causal, scale, group, layout, backend)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        return (*_ring_backward(q, k, v, o, lse, do.contiguous(), *ctx.args), None, None, None, None, None)


def ring_attention(q, k, v, *, causal=False, scale=None, group=None, layout="contiguous", backend="auto"):
    """This rank's rows of softmax(scale Q K^T [+ global causal mask]) V, with the sequence spread over `group`.

    q, k, v: this rank's shards (B, H, n, d) of the full (B, H, P n, d) tensors, placed as `layout` says (see
    `shard`). CPU tensors under gloo, CUDA tensors on this process's GPU under NCCL. Returns O (B, H, n, d) in
    q's dtype; differentiable."""
    _, P = group_info(group)
    q, k, v, scale, backend = prepare(q, k, v, scale, backend)
    check_layout(layout, q.shape[2], P)
    return RingAttention.apply(q, k, v, causal, scale, group, layout, backend)
