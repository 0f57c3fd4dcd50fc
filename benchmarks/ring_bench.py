"""Ring attention on P GPUs against the single-GPU flashlib kernel at the same per-GPU length.

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 8 benchmarks/ring_bench.py [--out DIR]   # NCCL, a GPU each
    python benchmarks/ring_bench.py --nproc 2 --lengths 8 16 --heads 2 --dim 8 --repeat 1 --out DIR
                                                                       # gloo on CPU processes (the test)

For every per-GPU length n = N/P (default 4k to 64k), layout (contiguous, zigzag) and causal flag it times
`flashlib.distributed.ring_attention` forward and forward + backward, and `flashlib.attention` /
`flashlib.torch.flash_attention` on one GPU at length n, and reports per-GPU TFLOP/s. FLOPs per GPU: the full
problem's 4 B H N^2 d (half when causal, flashlib.constants.attention_flops) divided by P; the single-GPU kernel
does the same count at length n; forward + backward counts 3.5x the forward. A ring at 100% of the single-GPU
figure hides every transfer and merge. Each row also checks the ring's O against the float64 reference at a small length
(check_n_local per rank, P * check_n_local <= 2048; max_err).
Writes ring_<gpu>_p<P>.json (ring_cpu_p<P>.json on CPUs) through flashlib.bench.save, provenance included and,
on NCCL, the NCCL version and `nvidia-smi topo -m`. With P = 1 (one GPU) the ring is one local block: the
record then measures the ring's own overhead (the merge, the float32 state) against the bare kernel, not scaling.
"""
import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import flashlib  # noqa: E402
from flashlib import bench, reference  # noqa: E402
from flashlib import distributed as fd  # noqa: E402
from flashlib.constants import attention_flops  # noqa: E402
from flashlib.torch import flash_attention  # noqa: E402

LENGTHS = (4096, 8192, 16384, 32768, 65536)


def _time(fn, device, repeat):
    """Median ms of fn() on this rank (CUDA events on a GPU), then the slowest rank's: the ring waits for it."""
    if device.type == "cuda":
        ms = bench.time_cuda(fn, warmup=1, repeat=repeat)
    else:
        fn()
        times = []
        for _ in range(repeat):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        ms = sorted(times)[len(times) // 2]
    t = torch.tensor([ms], dtype=torch.float64, device=device)        # NCCL reduces GPU tensors only
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _check(P, n, a, layout, causal, device, dtype):
    """max |O - reference| of the ring on random full tensors (same seed on every rank), the largest over ranks."""
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(a.batch, a.heads, P * n, a.dim, generator=g, dtype=torch.float64) for _ in range(3))
    O, _ = reference.attention_forward(q.numpy(), k.numpy(), v.numpy(), causal=causal)
    o = fd.ring_attention(*(fd.shard(t, layout=layout).to(device, dtype) for t in (q, k, v)), causal=causal,
                          layout=layout)
    err = torch.tensor([float((o.double().cpu() - fd.shard(torch.from_numpy(O), layout=layout)).abs().max())],
                       device=device)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    return float(err)


def run(rank, P, a):
    device = fd.rank_device()
    dtype = getattr(torch, a.dtype or ("float16" if device.type == "cuda" else "float32"))
    rows = []
    for n in a.lengths:
        nc = min(n, 2 * max(1, 1024 // P))                 # the reference check runs at P * nc <= 2048 positions
        g = torch.Generator(device=device).manual_seed(1000 * rank + n)
        q, k, v, do = (torch.randn(a.batch, a.heads, n, a.dim, generator=g, device=device, dtype=dtype)
                       for _ in range(4))
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

        def fwdbwd(attn):
            for t in (qg, kg, vg):
                t.grad = None
            attn(qg, kg, vg).backward(do)
        for causal in (False, True):
            single_f = _time(lambda: flashlib.attention(q, k, v, causal=causal), device, a.repeat)
            single_fb = _time(lambda: fwdbwd(lambda *t: flash_attention(*t, causal=causal)), device, a.repeat)
            for layout in fd.LAYOUTS:
                ring = lambda *t: fd.ring_attention(*t, causal=causal, layout=layout)   # noqa: E731
                ring_f = _time(lambda: ring(q, k, v), device, a.repeat)
                ring_fb = _time(lambda: fwdbwd(ring), device, a.repeat)
                fl = lambda N, bwd: attention_flops(a.batch, a.heads, N, a.dim, causal, backward=bwd)  # noqa: E731
                rows.append(dict(
                    n_local=n, N=P * n, layout=layout, causal=causal, dtype=str(dtype).replace("torch.", ""),
                    ring_fwd_ms=ring_f, ring_fwdbwd_ms=ring_fb, single_fwd_ms=single_f, single_fwdbwd_ms=single_fb,
                    ring_fwd_tflops=fl(P * n, False) / P / ring_f / 1e9,
                    ring_fwdbwd_tflops=fl(P * n, True) / P / ring_fb / 1e9,
                    single_fwd_tflops=fl(n, False) / single_f / 1e9, single_fwdbwd_tflops=fl(n, True) / single_fb / 1e9,
                    check_n_local=nc, max_err=_check(P, nc, a, layout, causal, device, dtype)))
                if rank == 0:
                    r = rows[-1]
                    print(f"n/P={n:6d} {layout:10s} causal={causal!s:5s} ring {r['ring_fwd_tflops']:8.3g} / "
                          f"{r['ring_fwdbwd_tflops']:8.3g}  one GPU {r['single_fwd_tflops']:8.3g} / "
                          f"{r['single_fwdbwd_tflops']:8.3g} TFLOP/s (fwd / fwd+bwd)", flush=True)
    return rows


def _nccl_and_topology(backend):
    """(NCCL version, `nvidia-smi topo -m`) under NCCL, else (None, None)."""
    if backend != "nccl":
        return None, None
    v = torch.cuda.nccl.version()
    version = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    try:
        topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        topo = f"nvidia-smi topo -m failed: {e}"
    return version, topo


def save(rows, P, backend, a):
    info = bench.provenance()
    tag = bench.gpu_tag(info["gpu"]) if info.get("gpu") and backend == "nccl" else "cpu"
    nccl, topo = _nccl_and_topology(backend)
    path = bench.save(f"ring_{tag}_p{P}", rows, directory=a.out, world_size=P, dist_backend=backend, nccl=nccl,
                      topology=topo, nvls=os.environ.get("NCCL_NVLS_ENABLE"),
                      shapes=f"B = {a.batch}, H = {a.heads}, d = {a.dim}; n = N/P per GPU",
                      flops="per GPU: 4 B H N^2 d / P (half when causal), x3.5 fwd+bwd; one GPU: the same at N = n",
                      script="benchmarks/ring_bench.py")
    print("wrote", path)


def precompile(dims):
    """Compile, on all cores into CuPy's disk cache, the default CuPy instances (forward, backward, fp32/fp16/bf16,
    causal and not) for head dims `dims`: the kernels the ring and the gpu tests launch. The Hopper wgmma forward
    has no disk cache (compiled in each process) and is left out."""
    import concurrent.futures
    import multiprocessing
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import cupy_bench
    from flashlib import cupy_kernels as ck
    cc, t0, jobs = ck.device_cc(), time.time(), set()
    for d in dims:
        for dt in ck.DTYPES:
            jobs.add(("fa2_bwd.cu", f"bwd_dot_do_o<{ck.CTYPE[dt]}, {d}>"))
            if dt != "float32":
                jobs.add(("fa2_bwd.cu", f"bwd_convert_dq<{ck.CTYPE[dt]}>"))
            for causal in (False, True):
                for rung in (None, ck.default_rung(dt, cc, "backward")):
                    cfg = ck.choose_config(dt, d, cc, causal, rung)
                    if cfg.file != "fa2_wgmma.cu":
                        jobs.add((cfg.file, cfg.kernel))
    with concurrent.futures.ProcessPoolExecutor(min(16, os.cpu_count() or 1),
                                                mp_context=multiprocessing.get_context("spawn")) as ex:
        errs = [e for e in ex.map(cupy_bench._compile, sorted(jobs)) if e]
    print(f"precompiled {len(jobs)} CuPy instances in {time.time() - t0:.0f} s, {len(errs)} failed", *errs, sep="\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2, help="processes to start when not run under torchrun")
    ap.add_argument("--lengths", type=int, nargs="+", default=LENGTHS, help="per-GPU lengths n = N/P")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtype", default=None, help="float16 on GPUs, float32 on CPUs unless given")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None, help="directory for the record (default: flashlib.bench.RESULTS)")
    ap.add_argument("--precompile", type=int, nargs="+", metavar="D", help="only compile the CuPy kernels for these "
                    "head dims (on a GPU machine, before a run) and exit")
    a = ap.parse_args(argv)
    if a.precompile:
        return precompile(a.precompile)
    if "RANK" in os.environ:                                # torchrun: this process is one rank
        backend = fd.init_from_env()                        # NCCL on GPU LOCAL_RANK where there is CUDA
        rows, P = run(dist.get_rank(), dist.get_world_size(), a), dist.get_world_size()
        if dist.get_rank() == 0:
            save(rows, P, backend, a)
        dist.destroy_process_group()
    else:
        backend = fd.default_backend(a.nproc)
        save(fd.launch(run, a.nproc, a, backend=backend)[0], a.nproc, backend, a)


if __name__ == "__main__":
    main()
