"""The Numba Hopper forward (fa2_wgmma: wgmma from Numba) beside CuPy's rung 6 (the same algorithm in CUDA C), rung 7.

    python benchmarks/numba_wgmma_bench.py [--out DIR] [--ns N ...] [--ds D ...] [--max-seconds S]
    # writes <DIR or flashlib/data/results>/numba_wgmma_<gpu>.json (numba_wgmma_h200.json on an H200)

Shapes as the other ladders (flashlib.bench.shapes.workload): fp16, d = 64 and 128, N = 4096 and 16384, B = 16384 // N,
H = 16, causal or not; FLOPs = 4*B*H*N^2*d, half when causal, forward only. Implementations, timed interleaved by
flashlib.bench.timing.compare (host=False: GPU time per call):
  numba_wgmma         flashlib.numba_kernels.forward(..., variant="wgmma"): the public call (checks, allocation, launch)
  numba_wgmma_kernel  the same kernel launched with prepared arguments (the Python around the launch removed)
  numba_wgmma_<NWG>x<Bc>  other tiles (fa2_wgmma.TILES: the default ones; rung 6's are among the others)
  numba_tc            the Numba mma.sync kernel (variant "tc"), the rung this one follows
  cupy_rung6          cupy_kernels.forward(..., rung="wgmma"): fa2_wgmma.cu, the kernel this one translates
  cupy_rung7          cupy_kernels.forward(..., rung="fa3"): TMA, warp specialisation, ping-pong
Each numba row also records max |O - O_rung6|. Target (issue 19's stretch): numba_wgmma >= 0.8x cupy_rung6.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flashlib import bench  # noqa: E402
from flashlib.bench.shapes import workload  # noqa: E402
from flashlib.constants import LOG2E, attention_flops, default_scale  # noqa: E402

OTHER_TILES = {64: [(2, 64), (2, 128)], 128: [(2, 64), (2, 128)]}   # rung 6's tiles among them


def _inputs(B, H, N, d, seed=0):
    import torch
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, H, N, d, device="cuda", generator=g).half() for _ in range(3)]


def _kernel_alone(nq, nk_, nv, causal, scale):
    """A launch of fa2_wgmma's kernel with arguments prepared once (as fa2_forward_wgmma prepares them)."""
    from numba import cuda
    from flashlib.numba_kernels import fa2_wgmma, host
    B, H, N, d = nq.shape
    kern, NT, Br, nbytes = fa2_wgmma.kernel(d, "float16", causal)
    o, lse = cuda.device_array(nq.shape, np.float16), cuda.device_array((B, H, N), np.float32)
    args = (host.words(nq), host.words(nk_), host.words(nv), host.words(o), lse.reshape(B * H, N),
            np.int32(N), np.int32(N), bool(causal), np.float32(scale * LOG2E), np.int32(1))
    grid = host.pair_grid(-(-N // Br), B * H)
    host.launch_dynamic(kern, grid, (NT,), nbytes, args)      # compiles and opts in to the shared memory once
    launch = kern[grid, (NT,), 0, nbytes]
    return lambda: launch(*args), o


def measure(d, causal, N, max_seconds):
    import torch
    from numba import cuda
    from flashlib import cupy_kernels as ck
    from flashlib import numba_kernels as nk
    from flashlib._arrays import like, to_cupy
    from flashlib.bench.timing import compare
    from flashlib.numba_kernels import fa2_wgmma
    B, H = workload(N)
    q, k, v = _inputs(B, H, N, d)
    scale = default_scale(d)
    nq, nk_, nv = (cuda.as_cuda_array(t) for t in (q, k, v))
    cq, ckk, cv = (to_cupy(t) for t in (q, k, v))
    kernel_alone, o_alone = _kernel_alone(nq, nk_, nv, causal, scale)
    fns = {"numba_wgmma": lambda: nk.forward(nq, nk_, nv, causal=causal, scale=scale, dtype="float16", variant="wgmma"),
           "numba_wgmma_kernel": kernel_alone}
    for t in OTHER_TILES[d]:
        fns["numba_wgmma_%dx%d" % t] = (lambda t=t: fa2_wgmma.fa2_forward_wgmma(nq, nk_, nv, causal=causal,
                                                                                scale=scale, tiles=t))
    fns["numba_tc"] = lambda: nk.forward(nq, nk_, nv, causal=causal, scale=scale, dtype="float16", variant="tc")
    fns["cupy_rung6"] = lambda: ck.forward(cq, ckk, cv, causal=causal, scale=scale, dtype="float16", rung="wgmma")
    fns["cupy_rung7"] = lambda: ck.forward(cq, ckk, cv, causal=causal, scale=scale, dtype="float16", rung="fa3")
    o6 = like(fns["cupy_rung6"]()[0], q, "float16").float()
    errs = {}
    for name, fn in list(fns.items()):
        if not name.startswith("numba"):
            continue
        try:
            out = fn()
            o = o_alone if out is None else out[0]
            errs[name] = float((torch.as_tensor(o, device="cuda").float() - o6).abs().max())
        except Exception as e:  # noqa: BLE001 (report and go on: one run on the GPU)
            print(f"{name} failed: {e!r}", flush=True)
            fns.pop(name)
    stats = compare(fns, host=False, min_rounds=5, max_rounds=15, max_seconds=max_seconds)
    flops = attention_flops(B, H, N, d, causal)
    rows = [dict(dtype="float16", d=d, n=N, B=B, H=H, causal=causal, impl=name, ms=st["median_ms"],
                 spread=st["spread"], tflops=flops / (st["median_ms"] * 1e-3) / 1e12, err_vs_rung6=errs.get(name))
            for name, st in stats.items()]
    r6 = next(r["tflops"] for r in rows if r["impl"] == "cupy_rung6")
    for r in rows:
        r["x_rung6"] = r["tflops"] / r6
    print(f"d={d:3d} N={N:5d} causal={causal!s:5s}" + "".join(f" | {r['impl']} {r['tflops']:5.0f} ({r['x_rung6']:.2f}x)"
                                                                for r in rows) + "  TFLOP/s (x rung 6); max |o - o6| "
          + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()), flush=True)
    torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("FLASHLIB_RESULTS"))
    ap.add_argument("--ns", type=int, nargs="*", default=[4096, 16384])
    ap.add_argument("--ds", type=int, nargs="*", default=[64, 128])
    ap.add_argument("--max-seconds", type=float, default=3.0)
    a = ap.parse_args()
    from flashlib.numba_kernels import fa2_wgmma
    name, rows = "numba_wgmma_" + bench.gpu_tag(), []
    info = dict(tiles={str(k): v for k, v in fa2_wgmma.TILES.items()}, other_tiles=OTHER_TILES,
                flops="4*B*H*N^2*d, half when causal; forward only", timing="flashlib.bench.timing.compare, host=False",
                target=">= 0.8x cupy_rung6")
    for d in a.ds:
        for causal in (False, True):
            for N in a.ns:
                rows += measure(d, causal, N, a.max_seconds)
                bench.save(name, rows, directory=a.out, partial=True, **info)   # survives a timeout
    print("saved", bench.save(name, rows, directory=a.out, **info))


if __name__ == "__main__":
    main()
