"""Rung 7 (fa3_forward.cu: TMA + warp specialisation; plain, ping-pong, persistent) against rung 6 and SDPA.

    python benchmarks/fa3_bench.py [--check] [--time] [--tiles] [--narrow] [--out DIR]

--check: quick correctness on ragged shapes against the float64 reference (FlashAttention's rule, as the GPU
tests), with where the error sits when it fails. --time: forward TFLOP/s of rung 7 (every variant), rung 6
(`cupy_kernels.forward(..., rung="wgmma")`), SDPA flash and SDPA cuDNN at d = 64, 128, N = 4096, 16384, fp16 and
bf16, causal and not, B = 16384 // N, H = 16, timed together by `flashlib.bench.timing.compare`; each rung 7 output
is also compared with SDPA flash's. FLOPs = 4*B*H*N^2*d, half when causal. Results: `flashlib.bench.save` into
--out, else $FLASHLIB_RESULTS, else the package's results folder. Neither flag: both. --tiles: the default tiles
against the others (tma.fa3_candidates) at the head dims in $FA3_TILE_DIMS (default "128"), each in the default
variant, with SDPA cuDNN, at N = 4096, 8192, 16384 (record fa3_tiles_d<dims>_<gpu>). --narrow: the narrow last key
tile against the full one without the mask (record fa3_narrow_<gpu>).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flashlib import bench, reference  # noqa: E402
from flashlib import cupy_kernels as ck  # noqa: E402
from flashlib.cupy_kernels import tma  # noqa: E402

ATOL = {"float16": 1e-4, "bfloat16": 5e-4}
CHECKS = [(1, 2, 2, 97, 113), (2, 2, 1, 1023, 3), (1, 4, 2, 3, 1023), (1, 2, 2, 300, 4096), (1, 1, 1, 4096, 97)]


def _inputs(B, H, Hkv, Nq, Nk, d, dtype, seed=0):
    import torch
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda h, n: torch.randn(B, h, n, d, device="cuda", generator=g).to(getattr(torch, dtype))
    return mk(H, Nq), mk(Hkv, Nk), mk(Hkv, Nk)


def _naive(q, k, v, causal, scale):
    import torch
    S = (q @ k.transpose(-1, -2)) * scale
    if causal:
        S = S.masked_fill(~torch.ones(S.shape[-2:], dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.softmax(S, dim=-1) @ v


def _fa3(q, k, v, causal, scale, variant, dtype, tiles=None, narrow=None):
    from flashlib._arrays import like, to_cupy
    o, lse = tma.forward_fa3(to_cupy(q), to_cupy(k), to_cupy(v), causal, scale, tiles, variant, narrow=narrow)
    return like(o, q, dtype), like(lse, q, "float32")


def precompile():
    """Rung 7's kernels (tma.precompile) and rung 6's, compiled in parallel threads before anything is timed."""
    import concurrent.futures
    import time
    t = time.time()
    tma.precompile()
    jobs = [(t_, d, c) for t_ in ("float16", "bfloat16") for d in ck.WGMMA_HEAD_DIMS for c in (False, True)]
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda j: ck.forward_plan(j[0], j[1], j[2], 0, "wgmma", None), jobs))
    print(f"compiled in {time.time() - t:.1f} s", flush=True)


def _f64(t):
    return t.double().cpu().numpy()


def _verdict(o, lse, o_ref, lse_ref, bound):
    """(ok, text): the errors of o, lse against the reference and, when over the bound, where they sit."""
    err = np.nan_to_num(np.abs(_f64(o) - o_ref), nan=np.inf)
    lerr = np.nan_to_num(np.abs(_f64(lse) - lse_ref), nan=np.inf)
    ok = err.max() <= bound and lerr.max() <= 2e-3
    text = f"err {err.max():.2e} (bound {bound:.2e}) lse {lerr.max():.2e}"
    if not ok:
        bad = np.argwhere(err.max(-1) > bound)
        rows = sorted({int(r[2]) for r in bad})
        text += (f" | bad rows {len(rows)}/{o_ref.shape[2]} first {rows[:8]} heads {sorted({int(r[1]) for r in bad})[:8]}"
                 f" cols {np.argwhere(err.max((0, 1, 2)) > bound).ravel()[:8].tolist()}"
                 f" nan {int(np.isnan(_f64(o)).sum())} lse bad rows {np.argwhere(lerr > 2e-3)[:4, 2].tolist()}")
    return ok, text


def check():
    """Every (dtype, d, causal, variant) on CHECKS (fp16 on the first two also with FA3_OTHER_TILES; without the
    mask also with the narrow last tile, asked for); one line each; returns the number of failures."""
    import torch
    precompile()
    fails = 0
    for dtype, d, causal in [(t, d, c) for t in ("float16", "bfloat16") for d in tma.FA3_HEAD_DIMS for c in (False, True)]:
        for i, (B, H, Hkv, Nq, Nk) in enumerate(CHECKS):
            q, k, v = _inputs(B, H, Hkv, Nq, Nk, d, dtype, seed=Nq * 7 + Nk)
            G, scale = H // Hkv, d ** -0.5
            kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
            o_ref, lse_ref = reference.attention_forward(_f64(q), _f64(kr), _f64(vr), causal, scale)
            bound = 2 * np.abs(_f64(_naive(q, kr, vr, causal, scale)) - o_ref).max() + ATOL[dtype]
            other = tma.FA3_OTHER_TILES[d] if i < 2 and dtype == "float16" else ()
            flip = () if causal else (True,)   # the narrow last tile (the persistent variants only)
            for variant, tiles, nar in [(x, t, None) for x in tma.VARIANTS for t in (None,) + other] + \
                    [(x, None, f) for x in tma.VARIANTS for f in flip]:
                where = (f"{dtype} d={d} causal={causal} (B,H,Hkv,Nq,Nk)={(B, H, Hkv, Nq, Nk)} {variant} "
                         f"{tiles or 'default'}" + ("" if nar is None else f" narrow={nar}"))
                try:
                    o, lse = _fa3(q, k, v, causal, scale, variant, dtype, tiles, nar)
                    torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001 (report and go on: one run on the GPU)
                    print(f"ERROR {where}: {e!r}", flush=True)
                    fails += 1
                    continue
                ok, text = _verdict(o, lse, o_ref, lse_ref, bound)
                fails += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {where}: {text}", flush=True)
    print(f"check: {fails} failures")
    return fails


def _sdpa(backend):
    from flashlib.bench.sdpa import sdpa_pinned
    return lambda q, k, v, causal: sdpa_pinned(backend, q, k, v, is_causal=causal)


def sweep(N=16384, dtype="float16"):
    """Rung 7 with tma.FA3_OTHER_TILES beside the default ones, fp16, N = 16384, every variant, causal and not."""
    from flashlib._arrays import like, to_cupy
    from flashlib.bench.timing import compare
    rows = []
    for d in tma.FA3_OTHER_TILES:
        for causal in (False, True):
            H, B = 16, max(1, 16384 // N)
            q, k, v = _inputs(B, H, H, N, N, d, dtype)
            qc, kc, vc = (to_cupy(t) for t in (q, k, v))
            flops = 4 * B * H * N * N * d * (0.5 if causal else 1.0)
            o_ref = like(tma.forward_fa3(qc, kc, vc, causal, None)[0], q, dtype).float()
            fns, errs = {}, {}
            for tiles in tma.fa3_candidates(d, causal):
                for x in tma.VARIANTS:
                    name = f"rung7_{x}_" + "x".join(map(str, tiles))
                    fn = lambda x=x, tiles=tiles: tma.forward_fa3(qc, kc, vc, causal, None, tiles=tiles, variant=x)
                    try:
                        errs[name] = float((like(fn()[0], q, dtype).float() - o_ref).abs().max())
                        fns[name] = fn
                    except Exception as e:  # noqa: BLE001
                        print(f"{name} failed: {e!r}")
            stats = compare(fns, host=False, min_rounds=5, max_rounds=12, max_seconds=4.0)
            line = f"sweep d={d} N={N} {dtype} causal={causal}:"
            for name, st in stats.items():
                tf = flops / (st["median_ms"] * 1e-3) / 1e12
                rows.append(dict(dtype=dtype, d=d, n=N, B=B, H=H, causal=causal, impl=name, ms=st["median_ms"],
                                 spread=st["spread"], tflops=tf, err_vs_default=errs[name]))
                line += f" | {name} {tf:5.0f} (err {errs[name]:.0e})"
            print(line, flush=True)
    return rows


def _time_shape(d, N, dtype, causal, max_seconds):
    """Rows {impl, ms, tflops, err_vs_flash, ...} of rung 7 (every variant), rung 6, SDPA flash and cuDNN."""
    import torch
    from flashlib._arrays import like, to_cupy
    from flashlib.bench.timing import compare
    from torch.nn.attention import SDPBackend, sdpa_kernel
    H, B = 16, max(1, 16384 // N)
    q, k, v = _inputs(B, H, H, N, N, d, dtype)
    qc, kc, vc = (to_cupy(t) for t in (q, k, v))
    scale = d ** -0.5
    fns = {f"rung7_{x}": (lambda x=x: tma.forward_fa3(qc, kc, vc, causal, scale, variant=x)) for x in tma.VARIANTS}
    fns["rung6_wgmma"] = lambda: ck.forward(qc, kc, vc, causal=causal, scale=scale, dtype=dtype, rung="wgmma")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    backends = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}
    for name in backends:   # the backend is pinned by the context, entered outside the timed region
        fns[name] = lambda: sdpa(q, k, v, is_causal=causal)
    contexts = {name: (lambda b=b: sdpa_kernel(b)) for name, b in backends.items()}
    with torch.no_grad():
        o_flash = _sdpa("flash")(q, k, v, causal).float()
    errs = {}
    for x in tma.VARIANTS:
        try:
            errs[f"rung7_{x}"] = float((like(fns[f"rung7_{x}"]()[0], q, dtype).float() - o_flash).abs().max())
        except Exception as e:  # noqa: BLE001
            print(f"rung7_{x} failed: {e!r}")
            fns.pop(f"rung7_{x}")
    stats = compare(fns, host=False, min_rounds=5, max_rounds=15, max_seconds=max_seconds, contexts=contexts)
    flops = 4 * B * H * N * N * d * (0.5 if causal else 1.0)
    rows = [dict(dtype=dtype, d=d, n=N, B=B, H=H, causal=causal, impl=name, ms=st["median_ms"], spread=st["spread"],
                 tflops=flops / (st["median_ms"] * 1e-3) / 1e12, err_vs_flash=errs.get(name))
            for name, st in stats.items()]
    print(f"d={d:3d} N={N:5d} {dtype:8s} causal={causal!s:5s}" + "".join(f" | {r['impl']} {r['tflops']:5.0f}" for r in rows)
          + "  (TFLOP/s; rung 7 max |o - flash| " + ", ".join(f"{e:.1e}" for e in errs.values()) + ")", flush=True)
    return rows


def tiles(out, max_seconds=4.0):
    """Rung 7 at its default tiles against the others (fa3_candidates), d in $FA3_TILE_DIMS, each in the default
    variant of its (d, causal), with SDPA cuDNN, interleaved; fp16 and bf16, N = 4096, 8192, 16384, causal and not."""
    import torch
    from flashlib._arrays import to_cupy
    from flashlib.bench.timing import compare
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dims = tuple(int(x) for x in os.environ.get("FA3_TILE_DIMS", "128").split())
    tma.precompile()
    rows = []
    for d, N, dtype, causal in [(d, N, t, c) for d in dims for N in (4096, 8192, 16384) for t in ("float16", "bfloat16")
                                for c in (False, True)]:
        H, B = 16, max(1, 16384 // N)
        q, k, v = _inputs(B, H, H, N, N, d, dtype)
        qc, kc, vc = (to_cupy(t) for t in (q, k, v))
        with torch.no_grad():
            o_flash = _sdpa("flash")(q, k, v, causal).float()
        fns, errs = {}, {}
        for t in tma.fa3_candidates(d, causal):
            name = "rung7_" + "x".join(map(str, t)) + ("_default" if t == tma.fa3_tiles(d, causal) else "")
            fns[name] = lambda t=t: tma.forward_fa3(qc, kc, vc, causal, None, tiles=t)
            errs[name] = float((_fa3(q, k, v, causal, None, None, dtype, t)[0].float() - o_flash).abs().max())
        fns["sdpa_cudnn"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        stats = compare(fns, host=False, min_rounds=5, max_rounds=15, max_seconds=max_seconds,
                        contexts={"sdpa_cudnn": lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)})
        flops = 4 * B * H * N * N * d * (0.5 if causal else 1.0)
        rows += [dict(dtype=dtype, d=d, n=N, B=B, H=H, causal=causal, impl=name, ms=st["median_ms"],
                      spread=st["spread"], tflops=flops / (st["median_ms"] * 1e-3) / 1e12, err_vs_flash=errs.get(name))
                 for name, st in stats.items()]
        print(f"tiles d={d:3d} N={N:5d} {dtype:8s} causal={causal!s:5s}" +
              "".join(f" | {r['impl']} {r['tflops']:5.0f} ({100 * r['spread']:.1f}%)" for r in rows[-len(stats):]),
              flush=True)
    tag = bench.gpu_tag(torch.cuda.get_device_name())
    return bench.save(f"fa3_tiles_d{'_'.join(map(str, dims))}_{tag}", rows, directory=out, tiles=tma.FA3_TILES,
                      other_tiles=tma.FA3_OTHER_TILES, flops="4*B*H*N^2*d, half when causal",
                      timing="flashlib.bench.timing.compare, host=False")


NARROW_SHAPES = {128: (1024, 4096, 8192, 16384), 256: (1024, 4096, 8192, 16384)}


def narrow(out, max_seconds=3.0):
    """Rung 7 with a narrow last key tile (fa3_forward's NARROW) against without, each at the default tiles and
    variant (d = 128 and 256: the persistent grid, "dynamic"), with SDPA cuDNN, interleaved; fp16 and bf16, without
    the mask, N in NARROW_SHAPES[d]. Each row also counts the output elements whose bits differ between the
    two (record fa3_narrow_<gpu>)."""
    import torch
    from flashlib._arrays import to_cupy
    from flashlib.bench.timing import compare
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import concurrent.futures
    cases = [(d, N, t) for d, Ns in NARROW_SHAPES.items() for N in Ns for t in ("float16", "bfloat16")]
    with concurrent.futures.ThreadPoolExecutor(16) as ex:   # the narrow instances, compiled before anything is timed
        list(ex.map(lambda c: tma._launcher(0, tma.fa3_config(c[2], c[0], False, Nk=c[1], narrow=c[3])),
                    [c + (x,) for c in cases for x in (True, False)]))
    rows = []
    for d, N, dtype in cases:
        H, B = 16, max(1, 16384 // N)
        q, k, v = _inputs(B, H, H, N, N, d, dtype)
        qc, kc, vc = (to_cupy(t) for t in (q, k, v))
        width = tma.fa3_config(dtype, d, False, Nk=N, narrow=True).narrow
        fns = {f"rung7_narrow{width}": lambda: tma.forward_fa3(qc, kc, vc, False, None, narrow=True),
               "rung7_full": lambda: tma.forward_fa3(qc, kc, vc, False, None, narrow=False)}
        a, b = (f()[0] for f in fns.values())
        differ = int((a.view("int16") != b.view("int16")).sum())
        fns["sdpa_cudnn"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)
        stats = compare(fns, host=False, min_rounds=5, max_rounds=15, max_seconds=max_seconds,
                        contexts={"sdpa_cudnn": lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)})
        flops = 4 * B * H * N * N * d
        rows += [dict(dtype=dtype, d=d, n=N, B=B, H=H, causal=False, impl=name, ms=st["median_ms"],
                      spread=st["spread"], tflops=flops / (st["median_ms"] * 1e-3) / 1e12, narrow_width=width,
                      elements_differing=differ) for name, st in stats.items()]
        print(f"narrow d={d:3d} N={N:5d} {dtype:8s} width {width:3d} differing {differ}" +
              "".join(f" | {r['impl']} {r['tflops']:5.0f} ({100 * r['spread']:.1f}%)" for r in rows[-len(stats):]),
              flush=True)
    tag = bench.gpu_tag(torch.cuda.get_device_name())
    return bench.save(f"fa3_narrow_{tag}", rows, directory=out, tiles=tma.FA3_TILES, narrow_shapes=NARROW_SHAPES,
                      flops="4*B*H*N^2*d", timing="flashlib.bench.timing.compare, host=False")


def time_all(out, max_seconds=4.0):
    """Every shape of the table (and the tile sweep), saved through flashlib.bench.save; returns the path."""
    import torch
    precompile()
    rows = []
    for d, N, dtype, causal in [(d, N, t, c) for d in (64, 128) for N in (4096, 16384) for t in ("float16", "bfloat16")
                                for c in (False, True)]:
        rows += _time_shape(d, N, dtype, causal, max_seconds)
    rows += sweep()
    tag = bench.gpu_tag(torch.cuda.get_device_name())
    return bench.save(f"fa3_forward_{tag}", rows, directory=out, tiles=tma.FA3_TILES, other_tiles=tma.FA3_OTHER_TILES,
                      flops="4*B*H*N^2*d, half when causal", timing="flashlib.bench.timing.compare, host=False")


def sanitize():
    """One small ragged call per variant and consumer count (for compute-sanitizer; CuPy only, no torch): GQA,
    causal and not, Nq != Nk, both head dims, fp16 and bf16; then three causal calls in a row through the default
    launch path ("dynamic", its counter set back to 0 by each launch)."""
    import cupy as cp
    rng = cp.random.default_rng(0)

    def arr(shape, dtype):
        x = rng.standard_normal(shape, dtype=cp.float32)
        return x.astype(cp.float16) if dtype == "float16" else (x.view(cp.uint32) >> 16).astype(cp.uint16).view(cp.int16)
    for variant in tma.VARIANTS:
        for dtype, d, causal, tiles, (B, H, Hkv, Nq, Nk) in (
                ("float16", 64, True, None, (1, 4, 2, 97, 113)), ("bfloat16", 128, False, None, (2, 2, 1, 113, 300)),
                ("float16", 64, False, (128, 2, 3), (1, 2, 1, 200, 77)),
                ("bfloat16", 128, False, (176, 2, 2), (1, 2, 1, 300, 401)),
                ("float16", 128, True, (176, 2, 2), (1, 4, 2, 353, 353)),
                ("float16", 256, False, None, (1, 2, 2, 130, 250))):   # a narrow last tile of 16 keys
            q, k, v = arr((B, H, Nq, d), dtype), arr((B, Hkv, Nk, d), dtype), arr((B, Hkv, Nk, d), dtype)
            o, lse = tma.forward_fa3(q, k, v, causal, None, tiles, variant)
            cp.cuda.Device().synchronize()
            print(f"sanitize {variant} {dtype} d={d} causal={causal} tiles={tiles}: lse finite "
                  f"{bool(cp.isfinite(lse).all())}", flush=True)
    for B, H, Hkv, Nq, Nk, d in ((1, 4, 2, 97, 113, 64), (2, 8, 4, 1000, 900, 128), (1, 1, 1, 3, 50, 64)):
        q, k, v = arr((B, H, Nq, d), "float16"), arr((B, Hkv, Nk, d), "float16"), arr((B, Hkv, Nk, d), "float16")
        o, lse = ck.forward(q, k, v, causal=True, scale=None, dtype="float16")   # the default path: "dynamic"
        cp.cuda.Device().synchronize()
        print(f"sanitize default path causal d={d} {ck.forward_plan('float16', d, True, 0).cfg.kernel}: lse finite "
              f"{bool(cp.isfinite(lse).all())}", flush=True)


def cli(doc, check, time_all, sanitize, extra=None):
    """The command line of a kernel benchmark (this one's and bwd_wgmma_bench.py's): --check, --time (neither: both),
    --sanitize (only the small calls for compute-sanitizer), --out, and a flag per entry of `extra` ({name: fn(out)},
    run alone); exits 1 if a check failed."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name in extra or {}:
        p.add_argument(f"--{name}", action="store_true")
    p.add_argument("--check", action="store_true")
    p.add_argument("--time", action="store_true")
    p.add_argument("--sanitize", action="store_true", help="only the small calls for compute-sanitizer")
    p.add_argument("--out", default=os.environ.get("FLASHLIB_RESULTS"))
    a = p.parse_args()
    if a.sanitize:
        return sanitize()
    for name, fn in (extra or {}).items():
        if getattr(a, name):
            return print(fn(a.out))
    both = not (a.check or a.time)
    fails = check() if a.check or both else 0
    if a.time or both:
        print(time_all(a.out))
    sys.exit(1 if fails else 0)


def main():
    cli(__doc__, check, time_all, sanitize, {"tiles": tiles, "narrow": narrow})


if __name__ == "__main__":
    main()
