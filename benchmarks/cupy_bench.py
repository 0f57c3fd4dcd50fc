"""The CuPy ladder beside PyTorch SDPA (each backend pinned) and naive attention, on the present GPU.

    python benchmarks/cupy_bench.py [--out DIR] [--quick]    # the grid; writes <DIR or flashlib/data/results>/cupy_<gpu>.json
    python benchmarks/cupy_bench.py --precompile [--sweep] [--bwd-sweep]  # compile in parallel (CuPy disk cache) the
                                                              # library's and the tests' instances [and the sweeps']
    python benchmarks/cupy_bench.py --smoke [RUNG ...]        # each kernel once at small shapes (for compute-sanitizer)
    python benchmarks/cupy_bench.py --bwd-sweep               # Tensor Core backward tiles, backward alone, N=4096, 16384
    python benchmarks/cupy_bench.py --sweep                   # rung-3 tiles at N=4096, 16384 (and |o - flash's o|)

On Hopper (compute capability 9.0) the grid also times rung 6, 'wgmma' (its backward: bwd_tc).
Shapes: B*H*N = 16*16384 tokens, H = 16; FLOPs = 4*B*H*N^2*d (half for causal); forward+backward counts 3.5x.
"""
import argparse
import concurrent.futures
import multiprocessing
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flashlib import bench  # noqa: E402
from flashlib import cupy_kernels as ck  # noqa: E402
from flashlib.bench.shapes import workload  # noqa: E402
from flashlib.constants import attention_flops, backward_flops, default_scale  # noqa: E402

NS = (512, 1024, 2048, 4096, 8192, 16384)
# rung-3 tiles to sweep per head dim: (warps, Bc, query rows per warp, Q in registers)
SWEEP_TILES = {64: [(4, 128, 16, 1), (4, 64, 32, 1), (4, 64, 32, 0), (4, 128, 32, 0), (4, 128, 32, 1), (8, 64, 32, 1)],
               128: [(8, 128, 16, 1), (4, 32, 32, 0), (4, 48, 32, 0), (4, 64, 32, 0), (8, 32, 32, 0), (8, 64, 32, 0)]}

# Tensor Core backward tiles to sweep per head dim: (warps, key m-tiles per warp, Br, BRC, K/V in registers)
BWD_SWEEP_TILES = {64: [(4, 2, 64, 32, False), (8, 1, 64, 64, True), (8, 1, 64, 64, False), (8, 1, 128, 64, True),
                        (8, 1, 64, 32, True), (4, 1, 64, 64, True)],
                   128: [(8, 1, 64, 64, False), (8, 1, 64, 32, False), (4, 1, 64, 32, False), (8, 1, 32, 32, False)]}


def _compile(job):
    f, name = job
    try:
        ck.compile_kernel(f, name)
        return None
    except Exception as e:  # report, do not stop the others
        return f"{name}: {type(e).__name__}: {str(e)[:500]}"


def precompile(extra=()):
    # (fa2_wgmma.cu is compiled by NVRTC directly, without CuPy's disk cache: nothing to gain in other processes)
    jobs = [(f, n) for f, names in ck.instances(ck.device_cc()).items() if f != "fa2_wgmma.cu" for n in names] + list(extra)
    with concurrent.futures.ProcessPoolExecutor(min(16, os.cpu_count() or 1), mp_context=multiprocessing.get_context("spawn")) as ex:
        errs = [e for e in ex.map(_compile, jobs) if e]
    print(f"compiled {len(jobs)} kernel instances, {len(errs)} failed", *errs, sep="\n")


def sweep_jobs():
    jobs = []
    for dtype in ("float16",):
        for d in (64, 128):
            for causal in (False, True):
                for tiles in SWEEP_TILES[d]:
                    try:
                        cfg = ck.choose_config(dtype, d, ck.device_cc(), causal, "tuned", tiles)
                    except ValueError:
                        continue
                    jobs.append((cfg.file, cfg.kernel))
    return jobs


def test_jobs():
    """The instances tests/test_cupy_kernels.py launches beyond the library's defaults: every tile the tuned rung can
    choose (TUNED_TILES, FALLBACK_TILES) and the backward tilings it checks."""
    cc, jobs = ck.device_cc(), set()
    for dt in ("float16", "bfloat16"):
        for d in ck.HEAD_DIMS:
            for c in (False, True):
                for t in set(ck.TUNED_TILES[d] + ck.FALLBACK_TILES[d]):
                    jobs.add(("fa2_tc.cu", ck.choose_config(dt, d, cc, c, "tuned", t).kernel))
    bwd = [(64, (4, 2, 64, 32, False)), (64, (8, 1, 128, 64, True)), (64, (8, 1, 64, 64, False)),
           (128, (4, 1, 64, 32, False)), (128, (8, 1, 32, 32, False)), (128, (8, 1, 64, 64, False)),
           (96, (4, 1, 32, 32, False))]
    for d, t in bwd:
        for c in (False, True):
            jobs.add(("fa2_bwd_tc.cu", ck.choose_config("float16", d, cc, c, "bwd_tc", t).kernel))
    return sorted(jobs)


def bwd_sweep_jobs():
    return [(f, ck.choose_config(dt, d, ck.device_cc(), c, "bwd_tc", t).kernel) for dt in ("float16",)
            for d, ts in BWD_SWEEP_TILES.items() for c in (False, True) for t in ts for f in ("fa2_bwd_tc.cu",)]


def bwd_sweep(out=None):
    """Backward alone (ck.backward: pre-pass, kernel, dQ conversion) for each tile of BWD_SWEEP_TILES, beside SDPA
    flash's backward (its forward+backward minus its forward); TFLOP/s = 2.5x the forward's FLOPs."""
    import torch
    rows = []
    for d, tiles in BWD_SWEEP_TILES.items():
        for causal in (False, True):
            for N in (4096, 16384):
                B, H = workload(N)
                q, k, v, do = _inputs(B, H, N, d, "float16")
                qc, kc, vc, doc = (_cupy(t) for t in (q, k, v, do))
                scale = default_scale(d)
                flops = backward_flops(B, H, N, d, causal)
                with torch.no_grad():
                    fwd = _time(lambda: _sdpa("flash")(q, k, v, causal), N)
                qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
                fb = _time(lambda: _sdpa("flash")(qg, kg, vg, causal).backward(do), N)
                row = dict(d=d, causal=causal, n=N, B=B, H=H, flash_bwd_ms=fb - fwd)
                o, lse = ck.forward(qc, kc, vc, causal=causal, scale=scale, dtype="float16")
                for t in tiles:
                    ms = _time(lambda: ck.backward(qc, kc, vc, o, lse, doc, causal=causal, scale=scale,
                                                   dtype="float16", rung="bwd_tc", tiles=t), N)
                    row["_".join(str(int(x)) for x in t)] = ms
                print(f"d={d} causal={causal} N={N}: bwd TFLOP/s " + " ".join(
                    f"{key}: {flops / (ms * 1e-3) / 1e12:.0f}" for key, ms in row.items() if key.endswith("ms") or key[0].isdigit()))
                rows.append(row)
                torch.cuda.empty_cache()
    return bench.save("cupy_bwd_sweep_" + bench.gpu_tag(), rows, directory=out, tiles=BWD_SWEEP_TILES,
                      flops="backward = 2.5 * 4*B*H*N^2*d, half when causal")


def _inputs(B, H, N, d, dtype, seed=0):
    import torch
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, H, N, d, device="cuda", generator=g).to(getattr(torch, dtype)) for _ in range(4)]


def _cupy(t):
    from flashlib._arrays import to_cupy
    return to_cupy(t)


def smoke(only=()):
    """Each kernel once, small ragged shapes (compute-sanitizer runs this); only: just these forward rungs."""
    import cupy as cp
    for dtype in ("float16", "bfloat16", "float32"):
        for d in (32, 64, 96, 128):
            for causal in (False, True):
                q, k, v, do = (_cupy(t) for t in _inputs(1, 2, 70, d, dtype))
                k, v = k[:, :, :53], v[:, :, :53]
                rungs = ["fp32"] if dtype == "float32" else ["tc", "tuned"] + (["sm75"] if dtype == "float16" else [])
                if dtype != "float32" and ck.device_cc() == 90 and d in ck.WGMMA_HEAD_DIMS:
                    rungs.append("wgmma")
                for r in [r for r in rungs if r in only] if only else rungs:
                    o, lse = ck.forward(q, k, v, causal=causal, scale=0.1, dtype=dtype, rung=r)
                for r in [] if only else ["bwd_fp32"] + (["bwd_tc"] if dtype != "float32" else []):
                    ck.backward(q, k, v, o, lse, do, causal=causal, scale=0.1, dtype=dtype, rung=r)
    cp.cuda.Device().synchronize()
    print("smoke: every kernel ran")


def _sdpa(backend):
    from flashlib.bench.sdpa import sdpa_pinned
    return lambda q, k, v, causal: sdpa_pinned(backend, q, k, v, is_causal=causal)


def _time(fn, N):
    rep = 10 if N <= 4096 else 5
    return bench.time_cuda(fn, warmup=2, repeat=rep)


def measure(dtype, d, causal, N, impls, with_bwd=True, check=False):
    """Rows {impl, fwd_ms, fwd_tflops, fwdbwd_ms, fwdbwd_tflops} for one shape; check: also max |o - o of SDPA
    flash| of each CuPy forward (err_vs_flash)."""
    import torch
    B, H = workload(N)
    q, k, v, do = _inputs(B, H, N, d, dtype)
    qc, kc, vc, doc = (_cupy(t) for t in (q, k, v, do))
    scale = default_scale(d)
    rows = []
    for impl in impls:
        row = dict(dtype=dtype, d=d, n=N, B=B, H=H, causal=causal, impl=impl)
        try:
            if impl in ck.FORWARD_RUNGS or impl.startswith("tuned"):
                rung, tiles = impl, None
                if impl.startswith("tuned_"):
                    rung, tiles = "tuned", tuple(int(x) for x in impl.split("_")[1:])
                fwd = lambda: ck.forward(qc, kc, vc, causal=causal, scale=scale, dtype=dtype, rung=rung, tiles=tiles)
                row["fwd_ms"] = _time(fwd, N)
                if check:
                    from flashlib._arrays import like
                    with torch.no_grad():
                        o_flash = _sdpa("flash")(q, k, v, causal)
                    row["err_vs_flash"] = float((like(fwd()[0], q, dtype).float() - o_flash.float()).abs().max())
                    del o_flash
                brung = "bwd_fp32" if impl == "fp32" or impl == "sm75" else "bwd_tc"
                if with_bwd and not impl.startswith("tuned_") and (brung == "bwd_tc" or N <= 2048):
                    row["bwd_rung"] = brung

                    def fb():
                        o, lse = fwd()
                        ck.backward(qc, kc, vc, o, lse, doc, causal=causal, scale=scale, dtype=dtype, rung=brung)
                    row["fwdbwd_ms"] = _time(fb, N)
            else:
                from flashlib.torch import naive_attention
                f = naive_attention if impl == "naive" else _sdpa(impl)
                with torch.no_grad():
                    row["fwd_ms"] = _time(lambda: f(q, k, v, causal), N)
                if with_bwd:
                    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
                    row["fwdbwd_ms"] = _time(lambda: f(qg, kg, vg, causal).backward(do), N)
        except Exception as e:  # e.g. out of memory, a backend that refuses the shape
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        for key in ("fwd", "fwdbwd"):
            if f"{key}_ms" in row:
                flops = attention_flops(B, H, N, d, causal, backward=key == "fwdbwd")
                row[f"{key}_tflops"] = flops / (row[f"{key}_ms"] * 1e-3) / 1e12
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def table(rows):
    """One line per (shape, impl) with TFLOP/s and the share of SDPA flash: a flashlib.viz table (print() it)."""
    from flashlib.viz.tables import table as make_table
    flash = {(r["dtype"], r["d"], r["causal"], r["n"]): r for r in rows if r["impl"] == "flash"}
    out = []
    for r in rows:
        f = flash.get((r["dtype"], r["d"], r["causal"], r["n"]), {})
        cells = []
        for key in ("fwd", "fwdbwd"):
            t = r.get(f"{key}_tflops")
            ft = f.get(f"{key}_tflops")
            cells += [f"{t:.1f}" if t else "-", f"{t / ft:.2f}" if t and ft else "-"]
        out.append([r["dtype"], r["d"], "yes" if r["causal"] else "no", r["n"], r["impl"], *cells])
    return make_table(["dtype", "d", "causal", "N", "impl", "fwd TFLOP/s", "x flash", "fwd+bwd TFLOP/s", "x flash"],
                      out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", nargs="*", metavar="RUNG", help="each kernel once (or only these forward rungs)")
    ap.add_argument("--precompile", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--bwd-sweep", action="store_true")
    ap.add_argument("--quick", action="store_true", help="N = 1024, 4096, 16384 only")
    a = ap.parse_args()
    if a.precompile:
        extra = test_jobs() + (sweep_jobs() if a.sweep else []) + (bwd_sweep_jobs() if a.bwd_sweep else [])
        return precompile(sorted(set(extra)))
    if a.smoke is not None:
        return smoke(a.smoke)
    if a.bwd_sweep:
        return bwd_sweep(a.out)
    rows = []
    if a.sweep:
        for d in (64, 128):
            for causal in (False, True):
                for N in (4096, 16384):
                    impls = ["flash", "tuned"] + ["tuned_" + "_".join(map(str, t)) for t in SWEEP_TILES[d]]
                    rows += measure("float16", d, causal, N, impls, with_bwd=False, check=True)
        print(table(rows))
        print("max |o - o of SDPA flash|:", {f"{r['d']} {r['causal']} {r['n']} {r['impl']}": round(r["err_vs_flash"], 5)
                                             for r in rows if "err_vs_flash" in r})
        return bench.save("cupy_sweep_" + bench.gpu_tag(), rows, directory=a.out)
    for dtype in ("float16", "bfloat16"):
        for d in (64, 128):
            for causal in (False, True):
                for N in ((1024, 4096, 16384) if a.quick else NS):
                    impls = ["tc", "tuned"] + (["sm75"] if dtype == "float16" else [])
                    impls += ["wgmma"] if ck.device_cc() == 90 else []
                    impls += ["flash", "cudnn", "efficient"]
                    if N <= 4096:
                        impls += ["math", "naive"]
                    if N <= 2048 and dtype == "float16":
                        impls = ["fp32"] + impls
                    rows += measure(dtype, d, causal, N, impls)
                    bench.save("cupy_" + bench.gpu_tag(), rows, directory=a.out, partial=True)  # survives a timeout
                    print(str(table([r for r in rows if r["n"] == N and r["d"] == d and r["causal"] == causal and r["dtype"] == dtype])).split("\n", 2)[2], flush=True)
    print(table(rows))
    path = bench.save("cupy_" + bench.gpu_tag(), rows, directory=a.out, tuned_tiles=ck.TUNED_TILES, wgmma_tiles=ck.WGMMA_TILES,
                      flops="4*B*H*N^2*d, half when causal; fwd+bwd = 3.5x")
    print("saved", path)


if __name__ == "__main__":
    main()
