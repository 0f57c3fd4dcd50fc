"""The float32 backward on Tensor Cores (fa2_bwd_tf32, 3xTF32) beside the CUDA-core fa2_backward and SDPA efficient.

    python benchmarks/numba_bwd_tf32_bench.py [--ns 4096 16384] [--out DIR]   # writes <DIR>/numba_bwd_tf32_<gpu>.json

Flops as benchmarks/numba_bench.py: forward 4*B*H*N^2*d (half if causal), backward 2.5x that, fwd+bwd 3.5x.
B*H*N = 16 * 16384 tokens, H = 16 (bench.shapes); all float32 (TF32 matmuls off in torch). Every kernel is
compiled (warmed up) before any timing. Backward alone: the Numba call (D pre-pass, dq zeroing, kernel); SDPA
efficient's backward alone = its fwd+bwd (autograd) minus its forward. fwd+bwd for Numba = nk.forward (whatever
float32 forward it dispatches to) + the backward, timed together.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flashlib import bench  # noqa: E402
from flashlib.bench.shapes import HEADS, TOKENS, workload  # noqa: E402
from flashlib.constants import attention_flops, backward_flops  # noqa: E402


def flops(BH, N, d, causal, mode):
    if mode == "bwd":
        return backward_flops(1, BH, N, d, causal)
    return attention_flops(1, BH, N, d, causal, backward=mode == "fwd+bwd")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--ds", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--old-max-n", type=int, default=4096, help="time the CUDA-core fa2_backward up to this N")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch
    from numba import cuda

    from flashlib import numba_kernels as nk
    from flashlib._arrays import to_numba
    from flashlib.numba_kernels import fa2_bwd_tf32 as bt
    from flashlib.bench.sdpa import sdpa_pinned
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        from flashlib.numba_kernels.fa2_tf32 import fa2_forward_tf32
    except Exception:                                 # noqa: BLE001  (the 3xTF32 forward may not be there)
        fa2_forward_tf32 = None

    def inputs(B, N, d):
        g = torch.Generator(device="cuda").manual_seed(0)
        return [torch.randn(B, HEADS, N, d, device="cuda", generator=g) for _ in range(4)]

    # warm-up: compile every kernel once at a small size
    t0 = time.time()
    for d in args.ds:
        for causal in (False, True):
            q, k, v, do = inputs(1, 256, d)
            nq, nk_, nv, ndo = (to_numba(x) for x in (q, k, v, do))
            o, lse = nk.forward(nq, nk_, nv, causal=causal, dtype="float32")
            bt.fa2_backward_tf32(nq, nk_, nv, o, lse, ndo, causal=causal)
            nk.fa2_backward(nq, nk_, nv, o, lse, ndo, causal=causal)
            if fa2_forward_tf32 is not None:
                try:
                    fa2_forward_tf32(nq, nk_, nv, causal=causal)
                except Exception as e:                # noqa: BLE001
                    print("fa2_forward_tf32 failed:", type(e).__name__, str(e)[:200])
                    fa2_forward_tf32 = None
            qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
            sdpa_pinned("efficient", qq, kk, vv, is_causal=causal).backward(do)
    cuda.synchronize()
    print(f"warm-up (compile) {time.time() - t0:.1f} s", flush=True)

    rows = []

    def record(method, mode, N, d, causal, BH, ms):
        tf = flops(BH, N, d, causal, mode) / ms / 1e9
        rows.append(dict(method=method, mode=mode, N=N, d=d, causal=causal, BH=BH, ms=round(ms, 3),
                         tflops=round(tf, 2)))
        print(f"{method:22s} {mode:8s} N={N:6d} d={d:3d} causal={causal!s:5s} {ms:9.3f} ms {tf:6.2f} TFLOP/s",
              flush=True)

    for N in args.ns:
        for d in args.ds:
            for causal in (False, True):
                B, H = workload(N)
                BH = B * H
                q, k, v, do = inputs(B, N, d)
                nq, nk_, nv, ndo = (to_numba(x) for x in (q, k, v, do))
                reps = 5 if N <= 4096 else 3
                o, lse = nk.forward(nq, nk_, nv, causal=causal, dtype="float32")
                ms = bench.time_cuda(lambda: bt.fa2_backward_tf32(nq, nk_, nv, o, lse, ndo, causal=causal),
                                     warmup=1, repeat=reps)
                record("numba_bwd_tf32", "bwd", N, d, causal, BH, ms)
                ms = bench.time_cuda(lambda: nk.forward(nq, nk_, nv, causal=causal, dtype="float32"),
                                     warmup=1, repeat=reps)
                record("numba_fwd_default", "fwd", N, d, causal, BH, ms)

                def fb():
                    o, lse = nk.forward(nq, nk_, nv, causal=causal, dtype="float32")
                    bt.fa2_backward_tf32(nq, nk_, nv, o, lse, ndo, causal=causal)
                record("numba_fwd+bwd_tf32", "fwd+bwd", N, d, causal, BH, bench.time_cuda(fb, warmup=1, repeat=reps))
                if fa2_forward_tf32 is not None:
                    ms = bench.time_cuda(lambda: fa2_forward_tf32(nq, nk_, nv, causal=causal), warmup=1, repeat=reps)
                    record("numba_fwd_tf32", "fwd", N, d, causal, BH, ms)

                    def fb2():
                        o, lse = fa2_forward_tf32(nq, nk_, nv, causal=causal)
                        bt.fa2_backward_tf32(nq, nk_, nv, o, lse, ndo, causal=causal)
                    record("numba_fwdtf32+bwdtf32", "fwd+bwd", N, d, causal, BH,
                           bench.time_cuda(fb2, warmup=1, repeat=reps))
                if N <= args.old_max_n:
                    ms = bench.time_cuda(lambda: nk.fa2_backward(nq, nk_, nv, o, lse, ndo, causal=causal),
                                         warmup=1, repeat=2)
                    record("numba_fa2_backward", "bwd", N, d, causal, BH, ms)
                ms_f = bench.time_cuda(lambda: sdpa_pinned("efficient", q, k, v, is_causal=causal), warmup=1,
                                       repeat=reps)
                record("sdpa_efficient", "fwd", N, d, causal, BH, ms_f)
                qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
                ms_fb = bench.time_cuda(lambda: sdpa_pinned("efficient", qq, kk, vv, is_causal=causal).backward(do),
                                        warmup=1, repeat=reps)
                record("sdpa_efficient", "fwd+bwd", N, d, causal, BH, ms_fb)
                record("sdpa_efficient", "bwd", N, d, causal, BH, ms_fb - ms_f)
                del q, k, v, do, nq, nk_, nv, ndo, o, lse, qq, kk, vv
                torch.cuda.empty_cache()

    from flashlib.viz.tables import table
    methods = sorted({r["method"] for r in rows})
    cells = []
    for key in sorted({(r["N"], r["d"], r["causal"], r["mode"]) for r in rows}):
        cell = {r["method"]: r for r in rows if (r["N"], r["d"], r["causal"], r["mode"]) == key}
        cells.append([*map(str, key)] + [f"{cell[m]['tflops']:.1f}" if m in cell else "" for m in methods])
    print("\n" + table(["N", "d", "causal", "mode", *methods], cells).markdown())
    path = bench.save("numba_bwd_tf32_" + bench.gpu_tag(), rows, directory=args.out,
                      tokens=HEADS * TOKENS, allow_tf32=False,
                      tiles={str(k): v for k, v in bt.TILES.items()},
                      flops="4*B*H*N^2*d (half causal); bwd 2.5x, fwd+bwd 3.5x",
                      target="backward >= 0.5x sdpa_efficient's backward (float32)")
    print("saved", path)


if __name__ == "__main__":
    main()
