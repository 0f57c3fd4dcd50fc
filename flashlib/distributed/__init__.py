"""Attention over a sequence split across processes, on torch.distributed (NCCL on GPUs, gloo on CPUs).

    import torch.distributed as dist
    from flashlib import distributed as fd
    q, k, v = (fd.shard(x, layout="zigzag") for x in (Q, K, V))       # full (B, H, N, d) -> this rank's part
    o = fd.ring_attention(q, k, v, causal=True, layout="zigzag")      # this rank's rows of O; o.backward() works
    O = fd.unshard(o, layout="zigzag")                                # every rank gets the whole O back

Ring attention (Liu, Zaharia and Abbeel 2023): rank r keeps its query shard Q_r and a running (m, l, O) in
float32 and, in P steps, attends to the K/V block it holds while it sends that block to rank r+1 and receives the
next one from rank r-1 (`batch_isend_irecv`, started before the block's compute and waited after it). Step s holds
the block of rank (r - s) mod P. Each block is folded in with `online_softmax.merge`, the merge of chapter 6.
The backward sends K/V around again, recomputing P from the saved lse; the dK/dV partials of each block follow
it and, one hop after the last visit, arrive at the block's owner. With P = 1 the ring is one local block and
sends nothing.

Layouts (`LAYOUTS`): "contiguous" gives rank r the positions [r n, (r+1) n); "zigzag" cuts the sequence into 2P
chunks and gives rank r the chunks r and 2P-1-r, so that every rank has the same causal work (the load balance of
Megatron's context parallelism, ring-flash-attention and PyTorch's context_parallel). Causal means the global
`is_causal`, top-left. Ulysses (Jacobs et al. 2023) instead exchanges heads for sequence with all-to-all: each
rank then attends over the whole sequence for H/P heads.

Per-block compute is `flashlib.attention(..., return_lse=True)` and `flashlib.attention_backward` on `backend`
('auto': the NumPy reference for CPU tensors, a GPU kernel for CUDA tensors, as `flashlib.torch` chooses; the
merge then runs in CuPy on the GPU). With NCCL each process drives one GPU (`use_gpu`, `init_from_env`).
`STATS` records, per phase, the point-to-point messages of every step and the most K/V blocks held at once.

Modules: layouts (who holds which positions; shard, unshard), plan (which block each rank computes at each
step), merge (fold, finish), ring, ulysses, linkmodel (when a step's transfer hides behind its compute),
processes (launch, one GPU per process), check (the self-check of `python -m flashlib.distributed --nproc P`).
"""
from ._common import STATS
from .check import main, selfcheck, torch_context_parallel
from .layouts import LAYOUTS, positions, shard, unshard
from .linkmodel import hiding_length, step_seconds
from .merge import finish, fold
from .plan import block_of, block_plan, schedule
from .processes import default_backend, init_from_env, launch, rank_device, use_gpu
from .ring import BlockTracker, RingAttention, ring_attention
from .ulysses import ulysses_attention

__all__ = ["ring_attention", "ulysses_attention", "shard", "unshard", "positions", "LAYOUTS", "STATS",
           "block_of", "block_plan", "schedule", "step_seconds", "hiding_length", "fold", "finish",
           "BlockTracker", "RingAttention", "launch", "use_gpu", "init_from_env", "rank_device", "default_backend",
           "selfcheck", "torch_context_parallel", "main"]
