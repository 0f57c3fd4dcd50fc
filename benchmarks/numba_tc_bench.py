"""The Numba Tensor Core FA2 forward beside PyTorch SDPA flash and the tuned CuPy kernel, on the present GPU.

    python benchmarks/numba_tc_bench.py [--out DIR] [--quick]   # writes <DIR or benchmarks/results>/numba_tc_<gpu>.json

Shapes as benchmarks/cupy_bench.py: fp16, d = 64 and 128, causal or not, N = 1024 .. 16384, B = 16384 // N, H = 16;
FLOPs = 4*B*H*N^2*d (half for causal), forward only. Implementations:
  numba_tc         flashlib.numba_kernels.forward(..., dtype="float16", variant="tc"): the public call (checks,
                   output allocation, one kernel launch from Python)
  numba_tc_kernel  the same kernel launched directly with prepared arguments (the Python launch overhead removed)
  numba_tc_<NW>_<Bc>_<NSTAGE>  other tile configurations (N = 4096 only), to choose fa2_tc.TILES
  numba_tc_k8      the sm_75 (T4) path, m16n8k8 without cp.async, forced on this GPU (N = 4096 only)
  cupy_tuned       flashlib.cupy_kernels.forward(..., rung="tuned")
  flash            F.scaled_dot_product_attention with the flash backend pinned
Each numba row also records max |O - O_flash| (a sanity check; tests/test_numba_tc.py is the correctness test).
Target (issue 8): numba_tc >= 0.5x flash at N >= 4096.
"""
import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flashlib import bench  # noqa: E402

NS = (1024, 2048, 4096, 8192, 16384)
SWEEP = {64: [(4, 64, 1), (4, 32, 2), (2, 64, 2), (4, 128, 1)], 128: [(4, 64, 1), (2, 64, 1), (2, 32, 2), (4, 16, 2)]}


def _inputs(B, H, N, d, seed=0):
    import torch
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, H, N, d, device="cuda", generator=g).half() for _ in range(3)]


def _time(fn, N):
    return bench.time_cuda(fn, warmup=2, repeat=10 if N <= 4096 else 5)


def measure(d, causal, N, sweep=False):
    import torch
    import torch.nn.functional as F
    from numba import cuda
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flashlib import cupy_kernels as ck
    from flashlib import numba_kernels as nk
    from flashlib._arrays import to_cupy
    from flashlib.numba_kernels import fa2_tc
    H, B = 16, max(1, 16384 // N)
    q, k, v = _inputs(B, H, N, d)
    scale = d ** -0.5
    flops = 4 * B * H * N * N * d * (0.5 if causal else 1.0)
    nq, nk_, nv = (cuda.as_cuda_array(t) for t in (q, k, v))
    cq, ckk, cv = (to_cupy(t) for t in (q, k, v))
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        o_flash = F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def sdpa():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def tc_call(**kw):
        return lambda: fa2_tc.fa2_forward_tc(nq, nk_, nv, causal=causal, scale=scale, dtype="float16", **kw)

    # the kernel alone: arguments prepared once, as fa2_forward_tc prepares them
    cc = cuda.get_current_device().compute_capability
    NW, Bc, NSTAGE, K8 = fa2_tc.config(d, cc, "float16")
    kern, NT, Br = fa2_tc.make_fa2_tc(d, NW, Bc, NSTAGE, "float16", K8)
    o_k, lse_k = cuda.device_array(q.shape, np.float16), cuda.device_array((B, H, N), np.float32)
    args = (fa2_tc._words(nq), fa2_tc._words(nk_), fa2_tc._words(nv), fa2_tc._words(o_k), lse_k.reshape(B * H, N),
            np.int32(N), np.int32(N), bool(causal), np.float32(scale * fa2_tc.LOG2E))
    launch = kern[(math.ceil(N / Br), B * H), (NT,)]

    impls = {"numba_tc": lambda: nk.forward(nq, nk_, nv, causal=causal, scale=scale, dtype="float16", variant="tc"),
             "numba_tc_kernel": lambda: launch(*args),
             "cupy_tuned": lambda: ck.forward(cq, ckk, cv, causal=causal, scale=scale, dtype="float16", rung="tuned"),
             "flash": sdpa}
    if sweep:
        for t in SWEEP[d]:
            impls["numba_tc_%d_%d_%d" % t] = tc_call(tiles=t)
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


def table(rows):
    out = ["| d | causal | N | impl | fwd ms | TFLOP/s | x flash | max diff vs flash |", "|" + "---|" * 8]
    for r in rows:
        t, x, e = r.get("fwd_tflops"), r.get("x_flash"), r.get("max_abs_diff_vs_flash")
        out.append(f"| {r['d']} | {'yes' if r['causal'] else 'no'} | {r['n']} | {r['impl']} | "
                   f"{r.get('fwd_ms', float('nan')):.3f} | {t or float('nan'):.1f} | {x or float('nan'):.2f} | "
                   f"{'-' if e is None else f'{e:.2e}'} |" + (f" {r['error']}" if "error" in r else ""))
    return "\n".join(out)


def _gpu_tag():
    import torch
    name = torch.cuda.get_device_name().lower()
    return next((tag for tag in ("h100", "h200", "a100", "l4", "t4", "a10") if tag in name), "gpu")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="N = 1024, 4096, 16384 only")
    a = ap.parse_args()
    rows = []
    name = "numba_tc_" + _gpu_tag()
    for d in (64, 128):
        for causal in (False, True):
            for N in ((1024, 4096, 16384) if a.quick else NS):
                new = measure(d, causal, N, sweep=N == 4096)
                rows += new
                print(table(new).split("\n", 2)[2], flush=True)
                bench.save(name, rows, directory=a.out, partial=True)  # survives a timeout
    print(table(rows))
    from flashlib.numba_kernels import fa2_tc
    path = bench.save(name, rows, directory=a.out, tiles={str(k): v for k, v in fa2_tc.TILES.items()},
                      flops="4*B*H*N^2*d, half when causal; forward only", target=">= 0.5x flash at N >= 4096")
    print("saved", path)


if __name__ == "__main__":
    main()
