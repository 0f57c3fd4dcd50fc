"""The Numba Tensor Core FA2 forward beside PyTorch SDPA flash and the tuned CuPy kernel, on the present GPU.

    python benchmarks/numba_tc_bench.py [--out DIR] [--quick] [--ns N ...] [--sweep-ns N ...] [--no-cupy] [--host]
    # writes <DIR or flashlib/data/results>/numba_tc_<gpu>.json (numba_tc_h100.json on an H100)

Shapes as benchmarks/cupy_bench.py: fp16, d = 64 and 128, causal or not, N = 1024 .. 16384, B = 16384 // N, H = 16
(flashlib.bench.shapes.workload);
FLOPs = 4*B*H*N^2*d (half for causal), forward only. Implementations:
  numba_tc         flashlib.numba_kernels.forward(..., dtype="float16", variant="tc"): the public call (checks,
                   output allocation, one kernel launch from Python), with fa2_tc.TILES
  numba_tc_kernel  the same kernel launched directly with prepared arguments (the Python preparation removed)
  numba_tc_<NW>_<Bc>_<NSTAGE>_<MT>_<MINB>  other tile configurations (N in --sweep-ns), to choose fa2_tc.TILES
  numba_tc_k8      the sm_75 (T4) path, m16n8k8 without cp.async, forced on this GPU (N in --sweep-ns)
  cupy_tuned       flashlib.cupy_kernels.forward(..., rung="tuned") (unless --no-cupy)
  flash            F.scaled_dot_product_attention with the flash backend pinned
Each numba row also records max |O - O_flash| (a sanity check; tests/test_numba_tc.py is the correctness test).
--host adds rows impl="host:<what>" with the host microseconds per call on a tiny problem (B=H=1, N=64), where
the GPU time is negligible: what the Python side costs around the launch.
Target (issue 8): numba_tc >= 0.5x flash at N >= 4096.
"""
import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flashlib import bench  # noqa: E402
from flashlib.bench.shapes import workload  # noqa: E402
from flashlib.constants import LOG2E, attention_flops, default_scale  # noqa: E402

NS = (1024, 2048, 4096, 8192, 16384)
# (NW, Bc, NSTAGE, MR, MINB): warps, keys per tile, K/V stages, 16-row m-tiles per warp, blocks per SM for ptxas
SWEEP = {64: [(4, 64, 2, 1, 4), (4, 32, 2, 1, 4), (4, 64, 2, 2, 0), (4, 32, 2, 2, 0), (8, 64, 2, 1, 2),
              (4, 64, 1, 1, 0)],
         128: [(2, 32, 2, 1, 0), (4, 64, 1, 1, 0), (4, 32, 2, 2, 0), (4, 32, 1, 1, 0)]}


def _inputs(B, H, N, d, seed=0):
    import torch
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, H, N, d, device="cuda", generator=g).half() for _ in range(3)]


def _time(fn, N):
    return bench.time_cuda(fn, warmup=2, repeat=10 if N <= 4096 else 5)


def _name(t):
    return "numba_tc_" + "_".join(map(str, t))


def measure(d, causal, N, sweep=False, cupy=True):
    import torch
    import torch.nn.functional as F
    from numba import cuda
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flashlib import numba_kernels as nk
    from flashlib.numba_kernels import fa2_tc, host
    B, H = workload(N)
    q, k, v = _inputs(B, H, N, d)
    scale = default_scale(d)
    flops = attention_flops(B, H, N, d, causal)
    nq, nk_, nv = (cuda.as_cuda_array(t) for t in (q, k, v))
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        o_flash = F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def sdpa():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def tc_call(**kw):
        return lambda: fa2_tc.fa2_forward_tc(nq, nk_, nv, causal=causal, scale=scale, dtype="float16", **kw)

    # the kernel alone: arguments prepared once, as fa2_forward_tc prepares them
    cc = host.device_cc()
    kern, NT, Br = fa2_tc.kernel(d, cc, "float16")
    o_k, lse_k = cuda.device_array(q.shape, np.float16), cuda.device_array((B, H, N), np.float32)
    args = (host.words(nq), host.words(nk_), host.words(nv), host.words(o_k), lse_k.reshape(B * H, N),
            np.int32(N), np.int32(N), bool(causal), np.float32(scale * LOG2E), np.int32(1))  # G = 1 (no GQA)
    launch = kern[(math.ceil(N / Br), B * H), (NT,)]

    impls = {"numba_tc": lambda: nk.forward(nq, nk_, nv, causal=causal, scale=scale, dtype="float16", variant="tc"),
             "numba_tc_kernel": lambda: launch(*args)}
    if cupy:
        from flashlib import cupy_kernels as ck
        from flashlib._arrays import to_cupy
        cq, ckk, cv = (to_cupy(t) for t in (q, k, v))
        impls["cupy_tuned"] = lambda: ck.forward(cq, ckk, cv, causal=causal, scale=scale, dtype="float16", rung="tuned")
    impls["flash"] = sdpa
    if sweep:
        for t in SWEEP[d]:
            impls[_name(t)] = tc_call(tiles=t)
        impls["numba_tc_k8"] = tc_call(k8=True)
    rows = []
    for name, fn in impls.items():
        row = dict(dtype="float16", d=d, n=N, B=B, H=H, causal=causal, impl=name)
        try:
            out = fn()
            if name.startswith("numba_tc"):
                o = torch.as_tensor(o_k if name == "numba_tc_kernel" else out[0], device="cuda")
                row["max_abs_diff_vs_flash"] = float((o.float() - o_flash.float()).abs().max())
            row["fwd_ms"] = _time(fn, N)
            row["fwd_tflops"] = flops / (row["fwd_ms"] * 1e-3) / 1e12
        except Exception as e:  # a configuration that does not fit, out of memory, ...
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
    flash = next((r.get("fwd_tflops") for r in rows if r["impl"] == "flash"), None)
    for r in rows:
        if flash and r.get("fwd_tflops"):
            r["x_flash"] = r["fwd_tflops"] / flash
    torch.cuda.empty_cache()
    return rows


def host_overhead(d=64, calls=300):
    """Host microseconds per call (wall clock, GPU work negligible: B = H = 1, N = 64) of the pieces around a launch."""
    import torch
    from numba import cuda

    from flashlib.numba_kernels import fa2_tc, host
    B, H, N = 1, 1, 64
    q, k, v = _inputs(B, H, N, d)
    nq, nk_, nv = (cuda.as_cuda_array(t) for t in (q, k, v))
    o, lse = cuda.device_array(q.shape, np.float16), cuda.device_array((B, H, N), np.float32)
    cc = host.device_cc()
    kern, NT, Br = fa2_tc.kernel(d, cc, "float16")
    launch = kern[(math.ceil(N / Br), B * H), (NT,)]
    args = (host.words(nq), host.words(nk_), host.words(nv), host.words(o), lse.reshape(B * H, N),
            np.int32(N), np.int32(N), False, np.float32(default_scale(d) * LOG2E), np.int32(1))  # G = 1 (no GQA)
    pieces = {
        "fa2_forward_tc (allocates o, lse)": lambda: fa2_tc.fa2_forward_tc(nq, nk_, nv),
        "fa2_forward_tc (o, lse given)": lambda: fa2_tc.fa2_forward_tc(nq, nk_, nv, o=o, lse=lse),
        "fa2_forward_tc (torch tensors in)": lambda: fa2_tc.fa2_forward_tc(q, k, v),
        "launch(*prepared args)": lambda: launch(*args),
        "run() with the launch stubbed": lambda: fa2_tc.run(lambda *a: None, nq, nk_, nv, o, lse, False, 0.125),
        "cuda.device_array o + lse (4096x64x64)": lambda: (cuda.device_array((4, 16, 4096, 64), np.float16),
                                                           cuda.device_array((4, 16, 4096), np.float32)),
        "host.empty o + lse (4096x64x64)": lambda: (host.empty((4, 16, 4096, 64), np.float16),
                                                    host.empty((4, 16, 4096), np.float32)),
        "cuda.get_current_device()": lambda: cuda.get_current_device(),
        "host.words x4 + lse view": lambda: [host.words(a) for a in (nq, nk_, nv, o)] + [
            host.view(lse, (B * H, N), np.float32)],
        "reshape+view x4 (before)": lambda: [a.reshape(B * H * N, d).view(np.uint32) for a in (nq, nk_, nv, o)],
    }
    rows = []
    for name, fn in pieces.items():
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        rows.append(dict(impl="host:" + name, d=d, n=N, B=B, H=H, causal=False, dtype="float16",
                         host_us=(time.perf_counter() - t0) / calls * 1e6))
        torch.cuda.empty_cache()
    return rows


def table(rows):
    """The rows as a flashlib.viz table (print() shows it aligned)."""
    from flashlib.viz.tables import table as make_table
    fmt = lambda x, spec: "-" if x is None else format(x, spec)     # noqa: E731
    cells = []
    for r in rows:
        if "host_us" in r:
            cells.append([r["d"], "-", r["n"], r["impl"], f"host {r['host_us']:.1f} us", "", "", "", ""])
            continue
        cells.append([r["d"], "yes" if r["causal"] else "no", r["n"], r["impl"], fmt(r.get("fwd_ms"), ".3f"),
                      fmt(r.get("fwd_tflops"), ".1f"), fmt(r.get("x_flash"), ".2f"),
                      fmt(r.get("max_abs_diff_vs_flash"), ".2e"), r.get("error", "")])
    return make_table(["d", "causal", "N", "impl", "fwd ms", "TFLOP/s", "x flash", "max diff vs flash", "error"],
                      cells)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="N = 1024, 4096, 16384 only")
    ap.add_argument("--ns", type=int, nargs="*", help="sequence lengths (default: all of NS, or --quick's)")
    ap.add_argument("--sweep-ns", type=int, nargs="*", default=[4096],
                    help="N at which the other tile configurations run")
    ap.add_argument("--no-cupy", action="store_true", help="leave out the CuPy tuned kernel")
    ap.add_argument("--host", action="store_true", help="also measure the host-side overhead pieces")
    a = ap.parse_args()
    rows = []
    name = "numba_tc_" + bench.gpu_tag()
    ns = a.ns or ((1024, 4096, 16384) if a.quick else NS)
    from flashlib.numba_kernels import fa2_tc
    info = dict(tiles={str(k): v for k, v in fa2_tc.TILES.items()}, sweep={str(k): v for k, v in SWEEP.items()},
                flops="4*B*H*N^2*d, half when causal; forward only", target=">= 0.5x flash at N >= 4096")
    if a.host:
        rows += host_overhead()
        print(table(rows), flush=True)
    for d in (64, 128):
        for causal in (False, True):
            for N in ns:
                new = measure(d, causal, N, sweep=N in a.sweep_ns, cupy=not a.no_cupy)
                rows += new
                print(str(table(new)).split("\n", 2)[2], flush=True)
                bench.save(name, rows, directory=a.out, partial=True, **info)  # survives a timeout
    print(table(rows))
    path = bench.save(name, rows, directory=a.out, **info)
    print("saved", path)


if __name__ == "__main__":
    main()
