"""Benchmark flashlib's Numba kernels (float32) beside PyTorch SDPA (each backend pinned) and naive attention.

    FLASHLIB_COMMIT=$(git rev-parse --short HEAD) python benchmarks/numba_bench.py [--quick]

Writes flashlib/data/results/numba_h100.json (name from --name) via flashlib.bench.save and prints markdown tables.
TFLOP/s = 4*B*H*Nq*Nk*d / t, half for causal; fwd+bwd counts 3.5x the forward (backward = 2.5x).
B*H*N = 16 * 16384 tokens at every N (bench.shapes). All float32, TF32 matmuls off (PyTorch's default).
"""
import argparse
import sys
import time

import numpy as np

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))

import flashlib  # noqa: E402
from flashlib import bench  # noqa: E402
from flashlib.bench.shapes import HEADS, TOKENS, workload  # noqa: E402
from flashlib.constants import attention_flops  # noqa: E402
from flashlib.env import compute_capability  # noqa: E402


def flops(BH, N, d, causal, mode):
    return attention_flops(1, BH, N, d, causal, backward=mode == "fwd+bwd")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="numba_h100")
    ap.add_argument("--quick", action="store_true", help="N <= 4096 only")
    ap.add_argument("--sweep", action="store_true", help="time fa2_fast tile configurations only")
    ap.add_argument("--dir", default=None, help="results directory (default flashlib/data/results)")
    ap.add_argument("--budget", type=float, default=330.0, help="seconds for the timing grid")
    args = ap.parse_args()

    import torch
    from numba import cuda

    from flashlib import numba_kernels as nk
    from flashlib._arrays import to_numba
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = "cuda"
    if args.sweep:
        return sweep(nk, to_numba, torch)
    t_start = time.time()
    rows, notes = [], {}
    cc = compute_capability()

    from flashlib.torch import naive_attention as naive

    from flashlib.bench.sdpa import sdpa_pinned

    def sdpa(backend):
        return lambda q, k, v, causal: sdpa_pinned(backend, q, k, v, is_causal=causal)

    torch_methods = {f"sdpa_{b}": sdpa(b) for b in ("efficient", "math", "flash", "cudnn")}
    torch_methods["naive_torch"] = naive

    def record(method, mode, N, d, causal, BH, fn, reps):
        try:
            ms = bench.time_cuda(fn, warmup=1 if reps < 10 else 3, repeat=reps)
            row = dict(method=method, mode=mode, N=N, d=d, causal=causal, BH=BH, ms=ms,
                       tflops=flops(BH, N, d, causal, mode) / ms / 1e9)
        except Exception as e:  # refused backend or out of memory: record why
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            row = dict(method=method, mode=mode, N=N, d=d, causal=causal, BH=BH, ms=None, tflops=None, error=msg)
            torch.cuda.empty_cache()
        rows.append(row)
        print(f"{method:16s} {mode:8s} N={N:6d} d={d:3d} causal={causal!s:5s} BH={BH:4d} "
              + (f"{row['ms']:9.3f} ms {row['tflops']:6.2f} TFLOP/s" if row["ms"] else row["error"]), flush=True)

    Ns = [1024, 2048, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384]
    for N in Ns:
        for d in (64, 128):
            for causal in (False, True):
                B, H = workload(N)
                BH = B * H
                over = time.time() - t_start > args.budget
                reps = 10 if N <= 4096 else 4
                g = torch.Generator(device=dev).manual_seed(0)
                q, k, v, do = (torch.randn(B, H, N, d, device=dev, generator=g) for _ in range(4))
                nq, nk_, nv, ndo = (to_numba(x) for x in (q, k, v, do))
                default = nk.default_variant("float32", d, cc)   # tf32x3 on sm_80+, else fa2_fast
                rungs = ([default] if default != "fa2_fast" else []) + ["fa2_fast"] + (["fa2"] if N <= 4096 else [])
                rungs += ["fa1"] if N <= 1024 else []
                for rung in rungs:
                    if over and rung not in (default, "fa2_fast"):
                        continue
                    record(f"numba_{rung}", "fwd", N, d, causal, BH,
                           lambda: nk.forward(nq, nk_, nv, causal=causal, scale=None, dtype="float32", variant=rung),
                           reps if rung != "fa1" else 2)
                o, lse = nk.forward(nq, nk_, nv, causal=causal, scale=None, dtype="float32")
                def fb():
                    o, lse = nk.forward(nq, nk_, nv, causal=causal, scale=None, dtype="float32")
                    nk.backward(nq, nk_, nv, o, lse, ndo, causal=causal, scale=None, dtype="float32")
                record(f"numba_{default}+bwd", "fwd+bwd", N, d, causal, BH, fb, max(2, reps // 3))
                del o, lse
                for name, f in torch_methods.items():
                    if name in ("sdpa_flash", "sdpa_cudnn") and (N, d, causal) != (1024, 64, False):
                        continue                               # they refuse float32: record that once
                    if over and name in ("sdpa_math", "naive_torch"):
                        continue
                    record(name, "fwd", N, d, causal, BH, lambda: f(q, k, v, causal), reps)
                    if name in ("sdpa_efficient", "naive_torch") and not over:
                        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
                        def fbt():
                            f(qq, kk, vv, causal).backward(do)
                        record(name, "fwd+bwd", N, d, causal, BH, fbt, max(2, reps // 3))
                        del qq, kk, vv
                del q, k, v, do, nq, nk_, nv, ndo
                torch.cuda.empty_cache()

    # peak extra memory (beyond q, k, v) of one forward at B*H = 16, d = 64, up to N = 65536: allocator peaks
    # around the call (flashlib.bench.memory), never the outputs' sizes
    from flashlib.bench.memory import peak_extra_bytes
    mem = []
    default = nk.default_variant("float32", 64, cc)
    for N in (1024, 4096, 16384, 32768, 65536):
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(1, 16, N, 64, device=dev, generator=g) for _ in range(3))
        nq, nk_, nv = (to_numba(x) for x in (q, k, v))
        m = peak_extra_bytes(lambda: nk.forward(nq, nk_, nv, causal=False, scale=None, dtype="float32"))
        mem.append(dict(method=f"numba_{default}", N=N, extra_bytes=m["bytes"], torch_bytes=m["torch"],
                        numba_bytes=m["numba"], note="allocator peaks (flashlib.bench.memory.peak_extra_bytes)"))
        for name in ("sdpa_efficient", "sdpa_math", "naive_torch"):
            try:
                extra, err = peak_extra_bytes(lambda: torch_methods[name](q, k, v, False))["bytes"], None
            except torch.OutOfMemoryError:
                extra, err = None, "OutOfMemoryError"
            torch.cuda.empty_cache()
            mem.append(dict(method=name, N=N, extra_bytes=extra, error=err))
        print("memory N =", N, [(m["method"], m["extra_bytes"] and round(m["extra_bytes"] / 2**20, 1)) for m in mem[-4:]],
              flush=True)
        del q, k, v, nq, nk_, nv
        torch.cuda.empty_cache()

    path = bench.save(args.name, rows, directory=args.dir, memory=mem, tokens=HEADS * TOKENS, dtype="float32", allow_tf32=False,
                      flops="4*B*H*N*N*d (half causal); fwd+bwd = 3.5x", seconds=round(time.time() - t_start, 1))
    print(f"\nsaved {path}\n")
    print_tables(rows, mem)


SWEEP = {64: [(64, 32, 4, 4, 2), (64, 32, 4, 4, 1), (32, 64, 4, 8, 1), (64, 32, 8, 4, 2)],
         128: [(32, 32, 4, 4, 1), (32, 32, 2, 4, 1), (32, 32, 4, 2, 1)]}


def sweep(nk, to_numba, torch):
    """Forward TFLOP/s of fa2_forward_fast per tile configuration (checked against the reference first)."""
    from flashlib import reference
    rng = np.random.default_rng(0)
    for d, cfgs in SWEEP.items():
        qs, ks, vs = (rng.standard_normal((1, 2, n, d)).astype(np.float32) for n in (300, 333, 333))
        O, _ = reference.attention_forward(qs, ks, vs, True)
        N, BH = 4096, 64
        q, k, v = (to_numba(torch.randn(4, 16, N, d, device="cuda")) for _ in range(3))
        for cfg in cfgs:
            for shfl in (True, False):
                err = np.abs(nk.fa2_forward_fast(qs, ks, vs, causal=True, cfg=cfg, shuffle=shfl)[0].copy_to_host() - O).max()
                for causal in (False, True):
                    ms = bench.time_cuda(lambda: nk.fa2_forward_fast(q, k, v, causal=causal, cfg=cfg, shuffle=shfl))
                    print(f"sweep d={d} cfg={cfg} shfl={shfl} causal={causal} err={err:.1e} {ms:7.3f} ms "
                          f"{flops(BH, N, d, causal, 'fwd') / ms / 1e9:6.2f} TFLOP/s", flush=True)


def print_tables(rows, mem):
    from flashlib.viz.tables import table
    keys = sorted({(r["N"], r["d"], r["causal"]) for r in rows})
    fmt = lambda r: "" if r is None else (f"{r['tflops']:.1f}" if r.get("tflops") else "err")   # noqa: E731
    for mode in ("fwd", "fwd+bwd"):
        methods = sorted({r["method"] for r in rows if r["mode"] == mode})
        cells = []
        for N, d, c in keys:
            cell = {r["method"]: r for r in rows if (r["N"], r["d"], r["causal"], r["mode"]) == (N, d, c, mode)}
            if cell:
                cells.append([N, d, str(c)] + [fmt(cell.get(m)) for m in methods])
        print(f"\n### {mode} TFLOP/s (float32)\n\n" + table(["N", "d", "causal", *methods], cells).markdown())
    methods = sorted({m["method"] for m in mem})
    cells = []
    for N in sorted({m["N"] for m in mem}):
        by = {m["method"]: m for m in mem if m["N"] == N}
        cells.append([N] + ["" if k not in by else "OOM" if by[k].get("error") else
                            f"{by[k]['extra_bytes'] / 2**20:.1f}" for k in methods])
    print("\n### peak extra memory, MiB (B*H = 16, d = 64, forward)\n\n" + table(["N", *methods], cells).markdown())
    errs = {r["method"]: r["error"] for r in rows if r.get("error") and r["method"] in ("sdpa_flash", "sdpa_cudnn")}
    for k, e in errs.items():
        print(f"\n{k}: {e}")


if __name__ == "__main__":
    main()
