"""The float32 3xTF32 Tensor Core FA2 forward (numba_kernels.fa2_tf32) beside fa2_fast, naive torch and SDPA efficient.

    python benchmarks/numba_tf32_bench.py [--out DIR] [--quick]    # writes <DIR or flashlib/data/results>/numba_tf32_<gpu>.json

float32, H = 16, B*H*N = 262144 (B = 16384 // N), d = 64 and 128, causal or not, N = 4096 and 16384 (--quick:
4096 only). TFLOP/s = 4*B*H*N^2*d / t, half when causal; forward only. Implementations:
  tf32x3            flashlib.numba_kernels.forward(..., variant="tf32x3") (checks, allocation, one launch)
  tf32x3_<tiles>    fa2_forward_tf32 with other (NW, Bc, QPRE, MAXREG) (non-causal). The recorded run
                    flashlib/data/results/numba_tf32_h100.json was taken before TILES was set from it: its "tf32x3"
                    rows ran d=64 (4, 64, False, 0), d=128 (4, 32, False, 0) (its info.tiles)
  fa2_fast          the CUDA-core float32 kernel
  naive_torch       flashlib.gpt.naive_attention, torch.backends.cuda.matmul.allow_tf32 = False
  sdpa_efficient    F.scaled_dot_product_attention with the efficient backend pinned (3xTF32 in CUTLASS, sm_80+)
Before timing: max |O - O_ref| and |lse - lse_ref| against the float64 reference at a small shape, per rung.
Targets (issue 3): tf32x3 >= 1.0x naive_torch, toward 0.75x sdpa_efficient.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flashlib import bench, reference  # noqa: E402
from flashlib.bench.shapes import workload  # noqa: E402
from flashlib.constants import attention_flops  # noqa: E402

ALT = {64: [(4, 64, False, 0), (4, 64, True, 0), (4, 32, True, 0)], 128: [(4, 32, False, 0), (4, 16, False, 0)]}


def accuracy(nk, tf, cuda):
    """Max errors vs float64 at B=1, H=2, Nq=1000, Nk=777 (ragged), per rung, head dim and causal."""
    rows = []
    rng = np.random.default_rng(0)
    for d in (64, 128):
        q, k, v = (rng.standard_normal((1, 2, n, d)).astype(np.float32) for n in (1000, 777, 777))
        for causal in (False, True):
            O, L = reference.attention_forward(q, k, v, causal)
            runs = {"tf32x3": lambda: tf.fa2_forward_tf32(q, k, v, causal=causal),
                    "fa2_fast": lambda: nk.forward(*(cuda.to_device(a) for a in (q, k, v)), causal=causal,
                                                   variant="fa2_fast")}
            runs.update({f"tf32x3_{'_'.join(map(str, t))}": (lambda t=t: tf.fa2_forward_tf32(q, k, v, causal=causal, tiles=t))
                         for t in ALT[d]})
            for name, fn in runs.items():
                o, lse = fn()
                o, lse = o.copy_to_host(), lse.copy_to_host()
                rows.append(dict(kind="accuracy", impl=name, d=d, causal=causal, max_err_o=float(np.abs(o - O).max()),
                                 max_err_lse=float(np.abs(lse - L).max())))
                print(f"accuracy {name:24s} d={d:3d} causal={causal!s:5s} max|O-O64| {rows[-1]['max_err_o']:.2e} "
                      f"max|lse-lse64| {rows[-1]['max_err_lse']:.2e}", flush=True)
    import torch
    from flashlib.torch import naive_attention
    from flashlib.bench.sdpa import sdpa_pinned
    for d in (64, 128):
        q, k, v = (rng.standard_normal((1, 2, 1000, d)).astype(np.float32) for _ in range(3))
        O, _ = reference.attention_forward(q, k, v, True)
        tq, tk, tv = (torch.tensor(a, device="cuda") for a in (q, k, v))
        for name, fn in (("naive_torch", lambda: naive_attention(tq, tk, tv, is_causal=True)),
                         ("sdpa_efficient", lambda: sdpa_pinned("efficient", tq, tk, tv, is_causal=True))):
            err = float(np.abs(fn().cpu().numpy() - O).max())
            rows.append(dict(kind="accuracy", impl=name, d=d, causal=True, max_err_o=err))
            print(f"accuracy {name:24s} d={d:3d} causal=True  max|O-O64| {err:.2e}", flush=True)
    return rows


def measure(d, causal, N, nk, tf, cuda, alt):
    import torch
    from flashlib.torch import naive_attention
    from flashlib.bench.sdpa import sdpa_pinned
    B, H = workload(N)
    torch.cuda.empty_cache()                               # the previous shape's tensors are gone by now
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, d, device="cuda", generator=g) for _ in range(3))
    nq, nk_, nv = (cuda.as_cuda_array(t) for t in (q, k, v))
    flops = attention_flops(B, H, N, d, causal)
    impls = {"tf32x3": lambda: nk.forward(nq, nk_, nv, causal=causal, variant="tf32x3"),
             "fa2_fast": lambda: nk.forward(nq, nk_, nv, causal=causal, variant="fa2_fast"),
             "naive_torch": lambda: naive_attention(q, k, v, is_causal=causal),
             "sdpa_efficient": lambda: sdpa_pinned("efficient", q, k, v, is_causal=causal)}
    if alt:
        for t in ALT[d]:
            impls["tf32x3_" + "_".join(map(str, t))] = lambda t=t: tf.fa2_forward_tf32(nq, nk_, nv, causal=causal, tiles=t)
    rows = []
    for name, fn in impls.items():
        row = dict(kind="time", impl=name, d=d, N=N, B=B, H=H, causal=causal)
        try:
            ms = bench.time_cuda(fn, warmup=2, repeat=10 if N <= 4096 else 5)
            row.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
        except Exception as e:  # out of memory (naive at large N), a refused backend, ...
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            torch.cuda.empty_cache()
        rows.append(row)
    ref = {r["impl"]: r.get("tflops") for r in rows}
    for r in rows:
        for base in ("naive_torch", "sdpa_efficient"):
            if r.get("tflops") and ref.get(base):
                r["x_" + base] = r["tflops"] / ref[base]
        print(f"d={d:3d} causal={causal!s:5s} N={N:5d} {r['impl']:24s} " +
              (f"{r['ms']:8.3f} ms {r['tflops']:6.1f} TFLOP/s  x naive {r.get('x_naive_torch', float('nan')):.2f}  "
               f"x sdpa_eff {r.get('x_sdpa_efficient', float('nan')):.2f}" if "ms" in r else r["error"]), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-accuracy", action="store_true")
    a = ap.parse_args()
    import torch
    from numba import cuda
    from flashlib import numba_kernels as nk
    from flashlib.numba_kernels import fa2_tf32 as tf
    torch.backends.cuda.matmul.allow_tf32 = False          # naive torch in true float32
    name = "numba_tf32_" + bench.gpu_tag()
    rows = [] if a.no_accuracy else accuracy(nk, tf, cuda)
    for d in (64, 128):
        for causal in (False, True):
            for N in ((4096,) if a.quick else (4096, 16384)):
                rows += measure(d, causal, N, nk, tf, cuda, alt=not causal)
                bench.save(name, rows, directory=a.out, partial=True)
    path = bench.save(name, rows, directory=a.out, tiles={str(k): v for k, v in tf.TILES.items()},
                      flops="4*B*H*N^2*d, half when causal; forward only", allow_tf32=False,
                      target=">= 1.0x naive_torch, toward 0.75x sdpa_efficient (float32)")
    print("saved", path)


if __name__ == "__main__":
    main()
