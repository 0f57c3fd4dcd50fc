"""Attention over a sequence split across processes, on torch.distributed (NCCL on GPUs, gloo on CPUs).

    import torch.distributed as dist
    from flashlib import distributed as fd
    q, k, v = (fd.shard(x, layout="zigzag") for x in (Q, K, V))       # full (B, H, N, d) -> this rank's part
    o = fd.ring_attention(q, k, v, causal=True, layout="zigzag")      # this rank's rows of O; o.backward() works
    O = fd.unshard(o, layout="zigzag")                                # every rank gets the whole O back

Ring attention (Liu, Zaharia and Abbeel 2023): rank r keeps its query shard Q_r and a running (m, l, O) in
float32 and, in P steps, attends to the K/V block it holds while it sends that block to rank r+1 and receives the
next one from rank r-1 (`batch_isend_irecv`, started before the block's compute and waited after it). Step s holds
the block of rank (r - s) mod P. Each block is folded in with `online_softmax.merge`, the merge of chapter 7.
The backward sends K/V around again, recomputing P from the saved lse; the dK/dV partials of each block follow
it and, one hop after the last visit, arrive at the block's owner.

Layouts (`LAYOUTS`): "contiguous" gives rank r the positions [r n, (r+1) n); "zigzag" cuts the sequence into 2P
chunks and gives rank r the chunks r and 2P-1-r, so that every rank has the same causal work (the load balance of
Megatron's context parallelism, ring-flash-attention and PyTorch's context_parallel). Causal means the global
`is_causal`, top-left. Ulysses (Jacobs et al. 2023) instead exchanges heads for sequence with all-to-all: each
rank then attends over the whole sequence for H/P heads.

Per-block compute is `flashlib.attention(..., return_lse=True)` and `flashlib.attention_backward` on `backend`
('auto': the NumPy reference for CPU tensors, a GPU kernel for CUDA tensors, as `flashlib.torch` chooses).
`STATS` records, per phase, the point-to-point messages of every step and the most K/V blocks held at once.
"""
import numpy as np
import torch
import torch.distributed as dist

from . import online_softmax, reference
from .api import attention, attention_backward
from .torch import cupy_allocates_from_torch, flash_attention, resolve_backend

LAYOUTS = ("contiguous", "zigzag")
STATS = {}   # phase (forward, backward, ulysses_forward, ulysses_backward) -> counters of the latest call, this rank


# ----- layouts: which positions a rank holds -------------------------------------------------------------------
def _check_layout(layout, n, P):
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
    if layout == "zigzag" and n % 2:
        raise ValueError(f"layout 'zigzag' needs an even local length (two equal chunks per rank), got {n}; "
                         f"the full length must be a multiple of 2P = {2 * P}")


def positions(rank, P, n, layout):
    """The global positions (a list of n ints) that `rank` of P holds, n per rank, in its local order."""
    _check_layout(layout, n, P)
    if layout == "contiguous":
        return list(range(rank * n, (rank + 1) * n))
    c = n // 2
    return list(range(rank * c, (rank + 1) * c)) + list(range((2 * P - 1 - rank) * c, (2 * P - rank) * c))


def _group_info(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call dist.init_process_group first "
                           "(or flashlib.distributed.launch)")
    return dist.get_rank(group), dist.get_world_size(group)


def shard(x, *, layout, group=None, dim=2):
    """This rank's part of the full tensor x along `dim` (a copy), for `layout`."""
    rank, P = _group_info(group)
    if x.shape[dim] % P:
        raise ValueError(f"the sequence length {x.shape[dim]} (dim {dim}) must be a multiple of the world size {P}")
    idx = torch.tensor(positions(rank, P, x.shape[dim] // P, layout), device=x.device)
    return x.index_select(dim, idx).contiguous()


def unshard(x_local, *, layout, group=None, dim=2):
    """The full tensor from every rank's part (all_gather), in global order; every rank gets it."""
    rank, P = _group_info(group)
    n = x_local.shape[dim]
    parts = [torch.empty_like(x_local) for _ in range(P)]
    dist.all_gather(parts, x_local.contiguous(), group=group)
    return torch.cat(parts, dim).index_select(dim, _gather_order(P, n, layout).to(x_local.device))


def _gather_order(P, n, layout):
    """Index that puts rows gathered in rank order (rank 0's positions, then rank 1's, ...) into global order."""
    order = [p for r in range(P) for p in positions(r, P, n, layout)]
    inverse = torch.empty(P * n, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(P * n)
    return inverse


# ----- the ring schedule -------------------------------------------------------------------------------------------
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


def step_seconds(n, d, heads, tflops, link_GBps, itemsize=2, work=1.0, backward=False):
    """The link-level IO model of one ring step on one GPU: (compute s, transfer s).

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


# ----- bookkeeping the tests read --------------------------------------------------------------------------------
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
    (what, step) with what 'kv' or 'dkv': messages (each isend and irecv) and bytes sent."""
    ops = [dist.P2POp(dist.isend, t, nxt, group) for t in sends] + [dist.P2POp(dist.irecv, t, prv, group) for t in recvs]
    stats["messages"][key] = stats["messages"].get(key, 0) + len(ops)
    stats["bytes"][key] = stats["bytes"].get(key, 0) + sum(t.numel() * t.element_size() for t in sends)
    return dist.batch_isend_irecv(ops)


def _wait(reqs):
    for r in reqs:
        r.wait()


def _peers(group):
    rank, P = _group_info(group)
    glob = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
    return rank, P, glob((rank + 1) % P), glob((rank - 1) % P)


# ----- the running state (m, l, O), folded with online_softmax.merge ---------------------------------------------
def _xp(t):
    """A NumPy (CPU) or CuPy (CUDA) view of tensor t: online_softmax's NumPy code runs on both (NEP 13/18)."""
    if t.is_cuda:
        import cupy
        return cupy.from_dlpack(t.detach())
    return t.detach().numpy()


def _module(a):
    return np if isinstance(a, np.ndarray) else __import__("cupy")


def fold(m, l, acc, o_b, lse_b):
    """Fold one block's result (O_b, lse_b) into the running state of the same rows; returns the new (m, l, acc).

    A block is the state (m, l) = (lse_b, 1) with acc = O_b. A row the block leaves empty (lse_b = -inf, O_b = 0)
    enters as (m, 0), which adds nothing and never forms inf - inf; the empty running state is (0, 0, 0).
    m, l: (B, H, n), acc: (B, H, n, d), all of one float dtype."""
    xp = _module(m)
    empty = lse_b == -np.inf
    m_b = xp.where(empty, m, lse_b).astype(m.dtype)
    m_a = xp.where(l == 0, m_b, m)
    m_new, l_new = online_softmax.merge(m_a, l, m_b, (~empty).astype(l.dtype))
    add = xp.where(empty[..., None], 0, o_b * xp.exp(m_b - m_new)[..., None])
    return m_new, l_new, acc * xp.exp(m_a - m_new)[..., None] + add


def finish(m, l, acc):
    """(O, lse) from the running state; rows that saw no key give O = 0 and lse = -inf."""
    xp = _module(m)
    seen = l > 0
    safe = xp.where(seen, l, 1)
    return xp.where(seen[..., None], acc / safe[..., None], 0), xp.where(seen, m + xp.log(safe), -np.inf)


def _tensor(a, like):
    t = torch.from_numpy(a) if isinstance(a, np.ndarray) else torch.from_dlpack(a)
    return t.to(like.device)


def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _rows(x, s):
    return x[:, :, s].contiguous()


# ----- ring attention --------------------------------------------------------------------------------------------
def _ring_forward(q, k, v, causal, scale, group, layout, backend):
    rank, P, nxt, prv = _peers(group)
    n, stats, held, dt = q.shape[2], _new_stats("forward"), BlockTracker(), _acc_dtype(q)
    state = [torch.zeros(q.shape[:3], dtype=dt, device=q.device), torch.zeros(q.shape[:3], dtype=dt, device=q.device),
             torch.zeros(q.shape, dtype=dt, device=q.device)]
    m, l, acc = (_xp(t) for t in state)                     # views: writing them writes the tensors
    cur = (k, v)
    held.take(f"kv{rank}")
    for step in range(P):
        src = block_of(rank, step, P)
        if step + 1 < P:                                    # start the transfer of the next block first
            nxt_kv = (torch.empty_like(k), torch.empty_like(v))
            held.take(f"kv{block_of(rank, step + 1, P)}")
            reqs = _exchange(cur, nxt_kv, nxt, prv, group, stats, ("kv", step))
        plan = block_plan(rank, src, P, n, layout, causal)
        stats["computed"].append(plan is not None)
        if plan is not None:
            qs, ks, c = plan
            o_b, lse_b = attention(_rows(q, qs), _rows(cur[0], ks), _rows(cur[1], ks), causal=c, scale=scale,
                                   backend=backend, return_lse=True)
            m[..., qs], l[..., qs], acc[..., qs, :] = fold(m[..., qs], l[..., qs], acc[..., qs, :],
                                                          _xp(o_b.to(dt)), _xp(lse_b.to(dt)))
        if step + 1 < P:
            _wait(reqs)
            held.drop(f"kv{src}")
            cur = nxt_kv
    stats["peak_kv_blocks"] = held.peak
    o, lse = finish(m, l, acc)
    return _tensor(o, q).to(q.dtype), _tensor(lse, q)


def _ring_backward(q, k, v, o, lse, do, causal, scale, group, layout, backend):
    """dQ stays home; K/V go round as in the forward. The float32 dK/dV accumulator of each block follows the
    block round the ring, sent on once a rank has added its share, and makes one hop more: home to its owner."""
    rank, P, nxt, prv = _peers(group)
    n, stats, held, dt = q.shape[2], _new_stats("backward"), BlockTracker(), _acc_dtype(q)
    dq = torch.zeros(q.shape, dtype=dt, device=q.device)
    cur = (k, v)
    held.take(f"kv{rank}")
    for step in range(P):
        src = block_of(rank, step, P)
        if step + 1 < P:
            nxt_kv = (torch.empty_like(k), torch.empty_like(v))
            held.take(f"kv{block_of(rank, step + 1, P)}")
            reqs = _exchange(cur, nxt_kv, nxt, prv, group, stats, ("kv", step))
        plan = block_plan(rank, src, P, n, layout, causal)
        stats["computed"].append(plan is not None)
        if plan is not None:
            qs, ks, c = plan
            dq_b, dk_b, dv_b = attention_backward(_rows(q, qs), _rows(cur[0], ks), _rows(cur[1], ks), _rows(o, qs),
                                                  lse[:, :, qs].contiguous(), _rows(do, qs), causal=c, scale=scale,
                                                  backend=backend)
            dq[:, :, qs] += dq_b.to(dt)
        if step == 0:
            dkv = (torch.zeros(k.shape, dtype=dt, device=k.device), torch.zeros(v.shape, dtype=dt, device=v.device))
        else:                                               # block src's accumulator, sent by rank-1 last step
            _wait(dkv_reqs)
            dkv = dkv_in
        if plan is not None:
            dkv[0][:, :, ks] += dk_b.to(dt)
            dkv[1][:, :, ks] += dv_b.to(dt)
        dkv_in = (torch.empty_like(dkv[0]), torch.empty_like(dkv[1]))
        dkv_reqs = _exchange(dkv, dkv_in, nxt, prv, group, stats, ("dkv", step))
        if step + 1 < P:
            _wait(reqs)
            held.drop(f"kv{src}")
            cur = nxt_kv
    _wait(dkv_reqs)                                         # our own block's dK, dV, home after P visits
    stats["peak_kv_blocks"] = held.peak
    return dq.to(q.dtype), dkv_in[0].to(k.dtype), dkv_in[1].to(v.dtype)


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


def _prepare(q, k, v, scale, backend):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise TypeError(f"{name} must be a 4-d torch tensor (batch, heads, local seq, head_dim), got "
                            f"{type(t).__name__} of shape {tuple(getattr(t, 'shape', ()))}")
    if not (q.shape[2] == k.shape[2] == v.shape[2] and k.shape == v.shape):
        raise ValueError(f"q, k, v must hold the same positions: shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)} (local lengths must agree, and k, v must match)")
    backend = resolve_backend(q, backend)
    if backend == "cupy" and q.is_cuda:
        cupy_allocates_from_torch()
    scale = reference.default_scale(q.shape[3]) if scale is None else scale
    return q.contiguous(), k.contiguous(), v.contiguous(), scale, backend


def ring_attention(q, k, v, *, causal=False, scale=None, group=None, layout="contiguous", backend="auto"):
    """This rank's rows of softmax(scale Q K^T [+ global causal mask]) V, with the sequence spread over `group`.

    q, k, v: this rank's shards (B, H, n, d) of the full (B, H, P n, d) tensors, placed as `layout` says (see
    `shard`). Returns O (B, H, n, d) in q's dtype; differentiable."""
    _, P = _group_info(group)
    q, k, v, scale, backend = _prepare(q, k, v, scale, backend)
    _check_layout(layout, q.shape[2], P)
    return RingAttention.apply(q, k, v, causal, scale, group, layout, backend)


# ----- Ulysses: all-to-all between sequence and heads ------------------------------------------------------------
def _all_to_all(parts, group, phase):
    """dist.all_to_all, counted: parts[p] goes to rank p; returns what each rank sent us."""
    rank, _ = _group_info(group)
    outs = [torch.empty_like(p) for p in parts]
    STATS.setdefault(phase, {"collectives": 0, "bytes": 0})
    STATS[phase]["collectives"] += 1
    STATS[phase]["bytes"] += sum(p.numel() * p.element_size() for i, p in enumerate(parts) if i != rank)
    dist.all_to_all(outs, parts, group=group)
    return outs


def _seq_to_heads(x, group, layout, phase):
    """(B, H, n, d) sequence-sharded -> (B, H/P, P n, d): rank p gets head group p over the whole sequence."""
    _, P = _group_info(group)
    y = torch.cat(_all_to_all([c.contiguous() for c in x.chunk(P, dim=1)], group, phase), dim=2)
    return y if layout == "contiguous" else y.index_select(2, _gather_order(P, x.shape[2], layout).to(y.device))


def _heads_to_seq(y, group, layout, phase):
    """The inverse of _seq_to_heads: (B, H/P, P n, d) -> (B, H, n, d)."""
    _, P = _group_info(group)
    n = y.shape[2] // P
    parts = [y.index_select(2, torch.tensor(positions(p, P, n, layout), device=y.device)) for p in range(P)]
    return torch.cat(_all_to_all(parts, group, phase), dim=1)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, layout):
        ctx.args = (group, layout)
        return _seq_to_heads(x, group, layout, "ulysses_forward")

    @staticmethod
    def backward(ctx, g):                        # an all-to-all is a permutation: its adjoint is the inverse one
        return _heads_to_seq(g.contiguous(), *ctx.args, "ulysses_backward"), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, group, layout):
        ctx.args = (group, layout)
        return _heads_to_seq(y, group, layout, "ulysses_forward")

    @staticmethod
    def backward(ctx, g):
        return _seq_to_heads(g.contiguous(), *ctx.args, "ulysses_backward"), None, None


def ulysses_attention(q, k, v, *, causal=False, scale=None, group=None, backend="auto", layout="contiguous"):
    """DeepSpeed-Ulysses: all-to-all q, k, v from sequence shards to head groups, attend over the whole sequence
    for H/P heads with flashlib's kernel, all-to-all O back. q, k, v: (B, H, n, d) shards; H (and the K/V heads)
    must be multiples of P. Returns this rank's O shard (B, H, n, d); differentiable."""
    _, P = _group_info(group)
    q, k, v, scale, backend = _prepare(q, k, v, scale, backend)
    _check_layout(layout, q.shape[2], P)
    for name, t in (("q", q), ("k", k)):
        if t.shape[1] % P:
            raise ValueError(f"ulysses_attention gives each of the P = {P} ranks H/P heads: {name} has "
                             f"{t.shape[1]} heads, not a multiple of {P}; use ring_attention, which has no such limit")
    STATS["ulysses_forward"] = {"collectives": 0, "bytes": 0}
    STATS["ulysses_backward"] = {"collectives": 0, "bytes": 0}
    qh, kh, vh = (_SeqToHeads.apply(t, group, layout) for t in (q, k, v))
    return _HeadsToSeq.apply(flash_attention(qh, kh, vh, causal=causal, scale=scale, backend=backend), group, layout)


# ----- running it: processes, and a self-check against the float64 reference --------------------------------------
def _free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def use_gpu(index):
    """Make GPU `index` this process's current device for torch, CuPy and Numba: flashlib's kernels launch on
    the current device, so with one process per GPU each process must choose its own."""
    torch.cuda.set_device(index)
    try:
        import cupy
        cupy.cuda.Device(index).use()
    except ImportError:
        pass
    from .env import simulated
    if not simulated():
        try:
            from numba import cuda
            cuda.select_device(index)
        except Exception:  # noqa: BLE001  (no usable Numba CUDA here: the cupy backend still works)
            pass


def _worker(rank, P, backend, port, fn, args, out_dir):
    import os
    import pickle
    torch.set_num_threads(1)                                # P processes share the cores
    if backend == "nccl":
        use_gpu(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=P)
    try:
        result = fn(rank, P, *args)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def default_backend(nprocs):
    """'nccl' when there is a CUDA GPU for each of nprocs processes, else 'gloo' (CPU tensors)."""
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= nprocs else "gloo"


def launch(fn, nprocs, *args, backend=None):
    """Run fn(rank, nprocs, *args) in nprocs new processes with torch.distributed initialised (NCCL on one GPU
    each, else gloo); returns the list of what fn returned on each rank. fn must be importable by name."""
    import pickle
    import tempfile
    import torch.multiprocessing as mp
    backend = backend or default_backend(nprocs)
    method = "fork" if backend == "gloo" and "fork" in mp.get_all_start_methods() else "spawn"
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(nprocs, backend, _free_port(), fn, args, out), nprocs=nprocs,
                           start_method=method)
        results = []
        for r in range(nprocs):
            with open(f"{out}/{r}.pkl", "rb") as f:
                results.append(pickle.load(f))
    return results


def selfcheck(rank, P, n=16, B=1, d=8, seed=0):
    """Ring (both layouts, causal and not) and Ulysses on random tensors against the float64 reference on the full
    tensors (H = 2P heads, so that Ulysses can split them); returns rows of max |error| for O, dQ, dK, dV on this
    rank. Runs on cuda:rank under NCCL."""
    H = 2 * P
    device = f"cuda:{rank}" if dist.get_backend() == "nccl" else "cpu"
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, P * n, d, generator=g, dtype=torch.float64) for _ in range(4))
    rows = []
    for causal in (False, True):
        O, lse = reference.attention_forward(q.numpy(), k.numpy(), v.numpy(), causal=causal)
        want = [torch.from_numpy(a) for a in
                (O, *reference.attention_backward(q.numpy(), k.numpy(), v.numpy(), O, lse, do.numpy(), causal=causal))]
        for method, layout in (("ring", "contiguous"), ("ring", "zigzag"), ("ulysses", "contiguous")):
            loc = [shard(t, layout=layout).to(device, torch.float32).requires_grad_() for t in (q, k, v)]
            fn = ring_attention if method == "ring" else ulysses_attention
            o = fn(*loc, causal=causal, layout=layout)
            o.backward(shard(do, layout=layout).to(device, torch.float32))
            got = [o.detach()] + [t.grad for t in loc]
            err = [float((a.double().cpu() - shard(w, layout=layout)).abs().max()) for a, w in zip(got, want)]
            sent = (sum(STATS["forward"]["bytes"].values()) if method == "ring" else STATS["ulysses_forward"]["bytes"])
            rows.append(dict(rank=rank, method=method, layout=layout, causal=causal, device=device, fwd_bytes_sent=sent,
                             **dict(zip(("O", "dQ", "dK", "dV"), err))))
    return rows


def torch_context_parallel(rank, P, n=16, H=4, d=8, seed=0):
    """PyTorch's own ring, torch.distributed.tensor.experimental.context_parallel, on causal SDPA: returns
    max |O - SDPA on the full tensors| on this rank, or the error it raises here (it has no CPU kernels in
    torch 2.13: SDPA's CPU op has no sharding rule)."""
    import torch.nn.functional as F
    cuda = dist.get_backend() == "nccl"
    g = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if cuda else torch.float32
    q, k, v = (torch.randn(1, H, P * n, d, generator=g).to("cuda" if cuda else "cpu", dtype) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel
        from torch.distributed.tensor.experimental._attention import context_parallel_unshard
        mesh = init_device_mesh("cuda" if cuda else "cpu", (P,))
        with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):   # shards q, k, v in place
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        (full,) = context_parallel_unshard(mesh, [o], [2])
        return f"max |O - SDPA| = {float((full.float() - want.float()).abs().max()):.1e} ({dtype})"
    except Exception as e:  # noqa: BLE001  (report what PyTorch says where it cannot run)
        return f"{type(e).__name__}: {e}"


def _demo(rank, P):
    return selfcheck(rank, P), torch_context_parallel(rank, P)


def main(argv=None):
    """python -m flashlib.distributed [--nproc P]: the self-check on P processes, one line per case."""
    import argparse
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--backend", default=None, help="nccl or gloo (default: nccl if there are P GPUs)")
    a = ap.parse_args(argv)
    backend = a.backend or default_backend(a.nproc)
    results = launch(_demo, a.nproc, backend=backend)
    rows = [r for ranks, _ in results for r in ranks]
    worst, sent = {}, {}
    for r in rows:
        key = (r["method"], r["layout"], r["causal"])
        worst[key] = max(worst.get(key, 0.0), r["O"], r["dQ"], r["dK"], r["dV"])
        sent[key] = r["fwd_bytes_sent"]
    print(f"{a.nproc} processes, {backend}, float32 against the float64 reference on the full tensors:")
    for (method, layout, causal), e in worst.items():
        print(f"  {method:8s} {layout:10s} causal={causal!s:5s}  max |error| over O, dQ, dK, dV: {e:.1e}   "
              f"forward bytes sent per rank: {sent[method, layout, causal]}")
    ok = max(worst.values()) < 1e-4
    print("all within 1e-4" if ok else "FAILED: an error above 1e-4")
    print("torch context_parallel (causal SDPA), rank 0:", results[0][1])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
