"""The self-check that `python -m flashlib.distributed --nproc P` runs, and PyTorch's own ring beside it."""
import torch

from .. import reference
from ._common import STATS
from .layouts import shard
from .processes import default_backend, launch, rank_device
from .ring import ring_attention
from .ulysses import ulysses_attention


def selfcheck(rank, P, n=16, B=1, d=8, seed=0):
    """Ring (both layouts, causal and not) and Ulysses on random tensors against the float64 reference on the full
    tensors (H = 2P heads, so that Ulysses can split them); returns rows of max |error| for O, dQ, dK, dV on this
    rank. Runs on this rank's GPU under NCCL."""
    H, device = 2 * P, rank_device()
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
            rows.append(dict(rank=rank, method=method, layout=layout, causal=causal, device=str(device),
                             fwd_bytes_sent=sent, **dict(zip(("O", "dQ", "dK", "dV"), err))))
    return rows


def torch_context_parallel(rank, P, n=16, H=4, d=8, seed=0):
    """PyTorch's own ring, torch.distributed.tensor.experimental.context_parallel, on causal SDPA: returns
    max |O - SDPA on the full tensors| on this rank, or the error it raises here (it has no CPU kernels in
    torch 2.13: SDPA's CPU op has no sharding rule)."""
    import torch.nn.functional as F
    device = rank_device()
    g = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(1, H, P * n, d, generator=g).to(device, dtype) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel
        from torch.distributed.tensor.experimental._attention import context_parallel_unshard
        mesh = init_device_mesh(device.type, (P,))
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
