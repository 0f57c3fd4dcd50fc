"""Rung 'fa3_fp8' (fa3_fp8.cu, e4m3) beside rung 7 fp16 and cuDNN SDPA fp16: TFLOP/s, the quantisation pass, and
the error table of FlashAttention-3's outlier experiment.

    python benchmarks/fp8_bench.py [--out DIR] [--max-seconds S] [--sanitize]
                                   [--quant | --emu | --persist | --trim | --narrow | --sweep [D]]

Timing (flashlib.bench.timing.compare, host=False): H = 16, B = 16384 // N, N = 4096 and 16384, d = 64 and 128,
causal and not; FLOPs 4*B*H*N^2*d, half when causal. fa3_fp8 is timed on pre-quantised inputs (the kernel alone,
default and other tiles); the host passes (quantise with and without the Hadamard rotation, V's transpose) are
timed apart, torch's (quantize_reference) beside the fused kernels' (fp8_quant.cu). --quant: only the record
"fp8_quant_<gpu>": those host passes and the end-to-end forward (quantisation + kernel, fused and torch) against
rung 7 fp16 (quant_main). Error table: RMSE of O against float64 attention (torch on the GPU) for standard normal
Q, K, V and for the same plus 0.1 % outliers of standard deviation 10 (FlashAttention-3 section 4.3), B = 1, H = 4,
N = 4096: rung 7 fp16, fa3_fp8 without and with the rotation. The record "fp8_forward_<gpu>" goes through
flashlib.bench.save. --emu: only the record "fp8_emu_<gpu>" (emu_main): the default tile at each share of
exponentials on the FMA pipe (fp8_tiles.FP8_EMU), timed interleaved at the same shapes, their errors, and Nsight
Compute's pipe counters at d = 128, N = 4096 (B = 4) for emu 0, 1, 2 (ncu_emu<e>.txt under --out). --persist: only
the record "fp8_persist_<gpu>" (grid_main): the default tiles with and without the persistent grid, interleaved at
the same shapes; --trim: "fp8_trim_<gpu>", the same for the trimmed kernel (also at N = 8192); --narrow:
"fp8_narrow_<gpu>", the same for the narrow last key tile, without the mask. --sanitize: small ragged calls at
d = 128, default and other tiles, the persistent grid with several items a CTA, the trimmed and narrow kernels, and
d = 256's and d = 64's defaults (for compute-sanitizer). --sweep [D]: "fp8_sweep_<gpu>", "fp8_sweep_d256_<gpu>" or
"fp8_sweep_d64_<gpu>" (sweep_main), other key tiles, stages and shares at d = 128 or 256, three consumer warpgroups
at d = 64.
"""
import argparse
import concurrent.futures
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flashlib import bench  # noqa: E402
from flashlib.cupy_kernels import fp8, fp8_tiles, tma  # noqa: E402

DIMS, LENGTHS, H = (64, 128), (4096, 16384), 16
QUANT_DIMS = DIMS + (256,)   # --quant: the public call at every head dim fa3_fp8 takes


def _inputs(B, Hh, N, d, outliers=0.0, seed=0, dtype="float16"):
    import torch
    g = torch.Generator(device="cuda").manual_seed(seed)

    def mk():
        x = torch.randn(B, Hh, N, d, device="cuda", generator=g)
        big = 10 * torch.randn(B, Hh, N, d, device="cuda", generator=g)
        return (x + big * (torch.rand(B, Hh, N, d, device="cuda", generator=g) < outliers)).to(getattr(torch, dtype))
    return mk(), mk(), mk()


def precompile():
    """The fp8 kernels (default and other tiles) and rung 7's fp16 ping-pong ones, compiled in parallel threads."""
    t = time.time()
    cfgs = [fp8_tiles.fp8_config(d, c, x) for d in DIMS for c in (False, True)
            for x in (fp8_tiles.default_tiles(d, False),) + fp8_tiles.FP8_OTHER_TILES[d]]
    r7 = [tma.fa3_config("float16", d, c) for d in DIMS for c in (False, True)]
    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda c: fp8._launcher(0, c), cfgs))
        list(ex.map(lambda c: tma._launcher(0, c), r7))
    print(f"compiled in {time.time() - t:.1f} s", flush=True)


def time_shape(d, N, causal, max_seconds):
    """Rows {impl, ms, tflops, ...} for one shape: fa3_fp8 (the default tiles and consumers on the plain grid, and
    the other tiles), rung 7 fp16, cuDNN fp16; and the host passes."""
    import torch
    from flashlib._arrays import to_cupy
    from flashlib.bench.timing import compare
    from torch.nn.attention import SDPBackend, sdpa_kernel
    B = max(1, 16384 // N)
    q, k, v = _inputs(B, H, N, d)
    inp, v8 = fp8.quantize(q, k, v, hadamard=True), fp8.quantize_e4m3(v)[0]
    qc, kc, vc = (to_cupy(t) for t in (q, k, v))
    scale = d ** -0.5
    fns = {fp8_tiles.tile_name(x): (lambda x=x: fp8.forward_fp8_prepared(inp, causal, scale, tiles=x))
           for x in (fp8_tiles.default_tiles(d, False),) + fp8_tiles.FP8_OTHER_TILES[d]}
    fns["rung7_fp16"] = lambda: tma.forward_fa3(qc, kc, vc, causal, scale)
    fns["sdpa_cudnn_fp16"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    contexts = {"sdpa_cudnn_fp16": lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)}
    stats = compare(fns, host=False, min_rounds=5, max_rounds=12, max_seconds=max_seconds, contexts=contexts)
    pstats = compare(host_passes(q, k, v, v8), host=False, min_rounds=3, max_rounds=6, max_seconds=max_seconds / 2)
    flops = 4 * B * H * N * N * d * (0.5 if causal else 1.0)
    rows = [dict(kind="forward", d=d, n=N, B=B, H=H, causal=causal, impl=n, ms=st["median_ms"], spread=st["spread"],
                 tflops=flops / (st["median_ms"] * 1e-3) / 1e12) for n, st in stats.items()]
    rows += [dict(kind="host_pass", d=d, n=N, B=B, H=H, causal=causal, impl=n, ms=st["median_ms"], spread=st["spread"])
             for n, st in pstats.items()]
    print(f"d={d:3d} N={N:5d} causal={causal!s:5s}" + "".join(f" | {r['impl']} {r['tflops']:5.0f}" for r in rows
                                                             if r["kind"] == "forward")
          + "  TFLOP/s |" + "".join(f" {r['impl']} {r['ms']:.3f} ms" for r in rows if r["kind"] == "host_pass"),
          flush=True)
    return rows


def host_passes(q, k, v, v8):
    """The host passes: torch's (quantize_reference with and without the rotation; transpose_v alone, of e4m3 V)
    and the fused kernels' (fp8_quant.cu, both passes, V^T included)."""
    return {"quantize_hadamard": lambda: fp8.quantize_reference(q, k, v, hadamard=True),
            "quantize_plain": lambda: fp8.quantize_reference(q, k, v, hadamard=False),
            "transpose_v": lambda: fp8.transpose_v(v8),
            "quantize_fused_hadamard": lambda: fp8.quantize_fused(q, k, v, hadamard=True),
            "quantize_fused_plain": lambda: fp8.quantize_fused(q, k, v, hadamard=False)}


def quant_shape(d, N, max_seconds):
    """Rows for the record fp8_quant_<gpu> at one shape (H = 16, B = 16384 // N): kind 'host_pass' (host_passes,
    with bytes moved and the bandwidth of the fused pair: 16-bit Q, K, V read twice, e4m3 written once) and kind
    'end_to_end', causal and not: forward_fp8 (fused quantisation + kernel, with the rotation), the same with torch's
    quantisation, the kernel alone on prepared inputs, rung 7 fp16 and cuDNN's SDPA fp16, all in one run; ms, TFLOP/s
    of the attention's FLOPs."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from flashlib._arrays import to_cupy
    from flashlib.bench.timing import compare
    B = max(1, 16384 // N)
    q, k, v = _inputs(B, H, N, d)
    v8 = fp8.quantize_e4m3(v)[0]
    pstats = compare(host_passes(q, k, v, v8), host=False, min_rounds=5, max_rounds=12, max_seconds=max_seconds)
    moved = 3 * q.numel() * (2 * 2 + 1)
    rows = [dict(kind="host_pass", d=d, n=N, B=B, H=H, impl=n, ms=st["median_ms"], spread=st["spread"],
                 gbps=moved / (st["median_ms"] * 1e-3) / 1e9 if "fused" in n else None) for n, st in pstats.items()]
    print(f"d={d:3d} N={N:5d} host passes:" + "".join(f" {r['impl']} {r['ms']:.3f} ms" for r in rows)
          + f" | fused pair at {rows[-2]['gbps']:.0f} / {rows[-1]['gbps']:.0f} GB/s", flush=True)
    qc, kc, vc = (to_cupy(t) for t in (q, k, v))
    inp, scale = fp8.quantize(q, k, v, hadamard=True), d ** -0.5
    for causal in (False, True):
        fns = {"forward_fp8": lambda: fp8.forward_fp8(q, k, v, causal, scale, hadamard=True),
               "forward_fp8_torch_quant": lambda: fp8.forward_fp8_prepared(
                   fp8.quantize_reference(q, k, v, hadamard=True), causal, scale, out="float16"),
               "fa3_fp8_kernel": lambda: fp8.forward_fp8_prepared(inp, causal, scale, out="float16"),
               "rung7_fp16": lambda: tma.forward_fa3(qc, kc, vc, causal, scale),
               "sdpa_cudnn_fp16": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                                           scale=scale)}
        contexts = {"sdpa_cudnn_fp16": lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)}
        stats = compare(fns, host=False, min_rounds=5, max_rounds=12, max_seconds=max_seconds, contexts=contexts)
        flops = 4 * B * H * N * N * d * (0.5 if causal else 1.0)
        e2e = [dict(kind="end_to_end", d=d, n=N, B=B, H=H, causal=causal, impl=n, ms=st["median_ms"],
                    spread=st["spread"], tflops=flops / (st["median_ms"] * 1e-3) / 1e12) for n, st in stats.items()]
        print(f"d={d:3d} N={N:5d} causal={causal!s:5s} end to end:"
              + "".join(f" | {r['impl']} {r['ms']:.3f} ms ({r['tflops']:.0f})" for r in e2e), flush=True)
        rows += e2e
    torch.cuda.synchronize()
    return rows


def quant_main(out, max_seconds):
    """--quant: the record fp8_quant_<gpu> (quant_shape at d = 64, 128, 256 and N = 4096, 16384)."""
    import torch
    t = time.time()
    cases = [(d, c) for d in QUANT_DIMS for c in (False, True)]
    cfgs = {fp8_tiles.fp8_config(d, c, None, "float16", Nk=N) for d, c in cases for N in LENGTHS}   # the defaults
    jobs = [lambda cfg=cfg: fp8._launcher(0, cfg) for cfg in cfgs]
    jobs += [lambda d=d, c=c: tma._launcher(0, tma.fa3_config("float16", d, c)) for d, c in cases]
    jobs += [lambda d=d: fp8._quant_launchers(0, "float16", d) for d in QUANT_DIMS]
    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda j: j(), jobs))
    print(f"compiled in {time.time() - t:.1f} s", flush=True)
    rows = [r for d in QUANT_DIMS for N in LENGTHS for r in quant_shape(d, N, max_seconds)]
    tag = bench.gpu_tag(torch.cuda.get_device_name())
    path = bench.save(f"fp8_quant_{tag}", rows, directory=out, flops="4*B*H*N^2*d, half when causal",
                      timing="flashlib.bench.timing.compare, host=False, candidates interleaved",
                      inputs="standard normal float16, H=16, B=16384/N; forward_fp8 with the Hadamard rotation",
                      bytes_moved="fused passes: 3 * B*H*N*d * (2 reads of 2 bytes + 1 write of 1 byte)")
    print("saved", path)


NCU_METRICS = ("sm__pipe_tensor_cycles_active", "sm__inst_executed_pipe_xu", "sm__pipe_fma_cycles_active",
               "sm__inst_executed_pipe_alu", "smsp__issue_active")


def _emu_tiles(d, e):
    return fp8_tiles.FP8_TILES[d][:2] + (e,)


def emu_ncu(e, out=None):
    """One fa3_fp8 launch at d = 128, N = 4096, B = 4, H = 16 with emu e between profiler marks (out=None: inside
    ncu); else run ncu on it and keep its text as out/ncu_emu<e>.txt, returning {metric: value}."""
    import subprocess
    import torch
    if out is None:
        inp = fp8.quantize(*_inputs(4, 16, 4096, 128))
        f = lambda: fp8.forward_fp8_prepared(inp, False, 128 ** -0.5, tiles=_emu_tiles(128, e))
        f()
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        f()
        torch.cuda.synchronize()
        return torch.cuda.profiler.stop()
    mets = ",".join(m + ".avg.pct_of_peak_sustained_active" for m in NCU_METRICS) + ",gpu__time_duration.sum"
    r = subprocess.run(["ncu", "--profile-from-start", "off", "--clock-control", "none", "-k", "regex:fa3_fp8",
                        "--metrics", mets, sys.executable, os.path.abspath(__file__), "--ncu-case", str(e)],
                       capture_output=True, text=True, timeout=150)
    with open(os.path.join(out, f"ncu_emu{e}.txt"), "w") as fh:
        fh.write(r.stdout + r.stderr[-2000:])
    found = {ln.split()[0]: float(ln.split()[-1].replace(",", "")) for ln in r.stdout.splitlines()
             if ln.strip().startswith(("sm", "gpu__")) and len(ln.split()) >= 3}
    print(f"ncu emu {e}: " + ", ".join(f"{k.split('.')[0]} {v}" for k, v in found.items()), flush=True)
    return found


def emu_main(out, max_seconds):
    """--emu: the record fp8_emu_<gpu>: at each d the default (Bc, stages) with every emu of fp8_tiles.FP8_EMU, errors
    (relative RMSE against float64, normal and outlier inputs) and TFLOP/s, then emu_ncu for emu 0, 1, 2."""
    import torch
    from flashlib.bench.timing import compare
    cfgs = [fp8_tiles.fp8_config(d, c, _emu_tiles(d, e)) for d in DIMS for c in (False, True)
            for e in fp8_tiles.FP8_EMU[d]]
    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda c: fp8._launcher(0, c), cfgs))
    rows = []
    for d in DIMS:
        for name, frac in (("normal", 0.0), ("outliers_0.1%", 1e-3)):
            q, k, v = _inputs(1, 4, 4096, d, frac, seed=d)
            ref = _ref64(q, k, v, d ** -0.5)
            rms = float(ref.pow(2).mean().sqrt())
            for e in fp8_tiles.FP8_EMU[d]:
                o = fp8.forward_fp8(q, k, v, scale=d ** -0.5, tiles=_emu_tiles(d, e))[0]
                rows.append(dict(kind="error", d=d, n=4096, inputs=name, emu=e,
                                 rel_rmse=float((o.double() - ref).pow(2).mean().sqrt()) / rms))
            print(f"errors d={d} {name}: " + " ".join(f"emu{r['emu']} {r['rel_rmse']:.4%}" for r in rows[-len(
                fp8_tiles.FP8_EMU[d]):]), flush=True)
        for N in LENGTHS:
            for causal in (False, True):
                B = 16384 // N
                inp = fp8.quantize(*_inputs(B, H, N, d))
                fns = {fp8_tiles.tile_name(_emu_tiles(d, e)): (lambda e=e: fp8.forward_fp8_prepared(
                    inp, causal, d ** -0.5, tiles=_emu_tiles(d, e))) for e in fp8_tiles.FP8_EMU[d]}
                stats = compare(fns, host=False, min_rounds=8, max_rounds=20, max_seconds=max_seconds)
                flops = 4 * B * H * N * N * d * (0.5 if causal else 1.0)
                rows += [dict(kind="forward", d=d, n=N, B=B, H=H, causal=causal, impl=n, emu=e, ms=st["median_ms"],
                              spread=st["spread"], tflops=flops / (st["median_ms"] * 1e-3) / 1e12)
                         for e, (n, st) in zip(fp8_tiles.FP8_EMU[d], stats.items())]
                print(f"d={d:3d} N={N:5d} causal={causal!s:5s}" + "".join(
                    f" | {r['impl']} {r['tflops']:5.0f}" for r in rows[-len(fns):]), flush=True)
    for e in (0, 1, 2):
        rows.append(dict(kind="ncu", d=128, n=4096, B=4, H=H, causal=False, emu=e, metrics=emu_ncu(e, out or ".")))
    tag = bench.gpu_tag(torch.cuda.get_device_name())
    print("saved", bench.save(f"fp8_emu_{tag}", rows, directory=out, emu=fp8_tiles.FP8_EMU, tiles=fp8_tiles.FP8_TILES,
                              flops="4*B*H*N^2*d, half when causal", timing="flashlib.bench.timing.compare, host=False"
                              ", candidates interleaved; pre-quantised inputs", ncu_metrics=NCU_METRICS))


GRIDS = {"persist": ((True, False), LENGTHS, "FP8_PERSIST"), "trim": ((False, True), (4096, 8192, 16384), "FP8_TRIM"),
         "narrow": ((False, False, True), (4096, 8192, 16384), "FP8_NARROW")}   # narrow: without the mask only


def grid_main(which, out, max_seconds):
    """--persist / --trim / --narrow: the record fp8_<which>_<gpu>: at each d the default tiles plain and
    persistent, plain and trimmed, or plain and with the narrow last tile (fp8_tiles.default_tiles; GRIDS; narrow
    without the mask only), timed interleaved at the same shapes (more rounds, 1 % tolerance), and how far apart
    their outputs are (persistent: the same bits; trimmed: another order of the key tiles)."""
    import torch
    from flashlib.bench.timing import compare
    flags, lengths, table = GRIDS[which]
    variants, masks = [(False, False), flags], (False,) if which == "narrow" else (False, True)
    cfgs = {fp8_tiles.fp8_config(d, c, fp8_tiles.default_tiles(d, *v), Nk=N) for d in DIMS for c in masks
            for v in variants for N in lengths}
    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda c: fp8._launcher(0, c), cfgs))
    rows = []
    for d in DIMS:
        for N in lengths:
            B = max(1, 16384 // N)
            inp = fp8.quantize(*_inputs(B, H, N, d))
            for causal in masks:
                tiles = [fp8_tiles.default_tiles(d, *v) for v in variants]
                fns = {fp8_tiles.tile_name(t): (lambda t=t: fp8.forward_fp8_prepared(inp, causal, d ** -0.5, tiles=t))
                       for t in tiles}
                (o0, l0), (o1, l1) = (f() for f in fns.values())
                same = bool(torch.equal(o0, o1) and torch.equal(l0, l1))
                diff = float((o1.float() - o0.float()).abs().max() / o0.float().abs().max())
                stats = compare(fns, host=False, min_rounds=15, max_rounds=40, rel_tol=0.01, max_seconds=max_seconds)
                flops = 4 * B * H * N * N * d * (0.5 if causal else 1.0)
                rows += [dict(kind="forward", d=d, n=N, B=B, H=H, causal=causal, impl=n, persist=t[3], trim=t[4],
                              narrow=t[5], ms=st["median_ms"], q1_ms=st["q1_ms"], q3_ms=st["q3_ms"], spread=st["spread"],
                              rounds=st["rounds"], tflops=flops / (st["median_ms"] * 1e-3) / 1e12, same_bits=same,
                              max_rel_diff=diff)
                         for t, (n, st) in zip(tiles, stats.items())]
                print(f"d={d:3d} N={N:5d} causal={causal!s:5s}" + "".join(
                    f" | {r['impl']} {r['tflops']:5.0f} (spread {r['spread']:.1%})" for r in rows[-2:])
                      + f" | same bits {same}, max diff {diff:.1e} of max |O|", flush=True)
    tag = bench.gpu_tag(torch.cuda.get_device_name())
    print("saved", bench.save(f"fp8_{which}_{tag}", rows, directory=out, tiles=fp8_tiles.FP8_TILES,
                              **{which: getattr(fp8_tiles, table)}, flops="4*B*H*N^2*d, half when causal",
                              timing="flashlib.bench.timing.compare, host=False, rel_tol 0.01, candidates "
                              "interleaved; pre-quantised inputs"))


SWEEP = {64: ((256, 2, 1), (256, 2, 1, True)) + tuple(t[:3] + (p, False, False, 3) for t, p in (
                  ((128, 2, 1), False), ((128, 2, 0), False), ((160, 2, 0), False),
                  ((160, 2, 2), False), ((160, 3, 1), False), ((160, 4, 1), False), ((128, 3, 1), False),
                  ((160, 2, 1), True), ((128, 2, 1), True))),
         128: ((224, 2, 2, True), (192, 2, 2), (192, 3, 2), (160, 2, 2), (160, 3, 2), (160, 2, 1), (160, 2, 3),
               (128, 2, 2), (128, 3, 2), (128, 4, 2), (128, 2, 1), (128, 2, 3), (160, 3, 2, True), (128, 3, 2, True),
               (224, 3, 2), (224, 3, 2, True), (224, 2, 1, True), (224, 3, 1, True), (192, 4, 2, True)),
         256: ((128, 2, 1, True), (64, 2, 0), (64, 2, 0, True), (96, 2, 0), (96, 2, 1), (96, 3, 0), (128, 2, 0),
               (128, 2, 2), (128, 3, 0), (128, 3, 1), (128, 2, 0, True), (128, 3, 0, True), (128, 3, 1, True))}
SWEEP_RECORD = {64: "fp8_sweep_d64", 128: "fp8_sweep", 256: "fp8_sweep_d256"}


def sweep_main(out, max_seconds, d=128):
    """--sweep [D]: the record fp8_sweep_<gpu> (d = 128) or fp8_sweep_d256_<gpu>: at N = 4096 and 16384, causal and
    not, the default tiles beside SWEEP[d] (at d = 128 smaller key tiles waste fewer keys at N = 4096: 19 tiles of
    224 compute 4256 keys; at d = 256 key tiles of 64, 96 and 128, stages, exp2 shares and the persistent grid;
    at d = 64 three consumer warpgroups; at d = 64 and 256 with rung 7 and cuDNN in fp16 beside them), all
    interleaved in one run, with each FP8 candidate's largest difference from the default's O over the largest |O|.
    The default is the plain grid (default_tiles(d, False); SWEEP has its persistent twin) and is never narrow."""
    import torch
    import torch.nn.functional as F
    from flashlib._arrays import to_cupy
    from flashlib.bench.timing import compare
    from torch.nn.attention import SDPBackend, sdpa_kernel
    # name -> tiles, the default first; by name, so that a SWEEP entry equal to the default is timed once
    cands = {fp8_tiles.tile_name(t): fp8_tiles.full_tiles(t) for t in (fp8_tiles.default_tiles(d, False),) + SWEEP[d]}
    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda c: fp8._launcher(0, c), [fp8_tiles.fp8_config(d, c, t) for c in (False, True)
                                                    for t in cands.values()]))
        if d != 128:
            list(ex.map(lambda c: tma._launcher(0, tma.fa3_config("float16", d, c)), (False, True)))
    rows = []
    for N in LENGTHS:
        B = max(1, 16384 // N)
        q, k, v = _inputs(B, H, N, d)
        inp = fp8.quantize(q, k, v)
        qc, kc, vc = (to_cupy(t) for t in (q, k, v))
        for causal in (False, True):
            fns = {n: (lambda t=t: fp8.forward_fp8_prepared(inp, causal, d ** -0.5, tiles=t))
                   for n, t in cands.items()}
            o0 = next(iter(fns.values()))()[0].float()
            diffs = {n: float((f()[0].float() - o0).abs().max() / o0.abs().max()) for n, f in fns.items()}
            if d != 128:   # fp16 beside it: rung 7 and cuDNN (no max_rel_diff: FP8's own error is in it)
                fns["rung7_fp16"] = lambda: tma.forward_fa3(qc, kc, vc, causal, d ** -0.5)
                fns["sdpa_cudnn_fp16"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            stats = compare(fns, host=False, min_rounds=10, max_rounds=30, rel_tol=0.01, max_seconds=max_seconds,
                            contexts={"sdpa_cudnn_fp16": lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)})
            flops = 4 * B * H * N * N * d * (0.5 if causal else 1.0)
            new = [dict(kind="forward", d=d, n=N, B=B, H=H, causal=causal, impl=n,
                        tiles=list(cands[n]) if n in cands else None, ms=st["median_ms"],
                        q1_ms=st["q1_ms"], q3_ms=st["q3_ms"], spread=st["spread"], rounds=st["rounds"],
                        tflops=flops / (st["median_ms"] * 1e-3) / 1e12, max_rel_diff=diffs.get(n))
                   for n, st in stats.items()]
            rows += new
            best = max(new[:len(cands)], key=lambda r: r["tflops"])
            print(f"d={d} N={N:5d} causal={causal!s:5s} default {new[0]['tflops']:.0f} best "
                  f"{best['impl']} {best['tflops']:.0f} |" + "".join(f" {r['impl']} {r['tflops']:.0f}" for r in new),
                  flush=True)
    tag = bench.gpu_tag(torch.cuda.get_device_name())
    print("saved", bench.save(f"{SWEEP_RECORD[d]}_{tag}", rows, directory=out, tiles=fp8_tiles.FP8_TILES,
                              sweep=[list(t) for t in SWEEP[d]], flops="4*B*H*N^2*d, half when causal",
                              timing="flashlib.bench.timing.compare, host=False, rel_tol 0.01, candidates "
                              "interleaved; pre-quantised inputs"))


def _ref64(q, k, v, scale):
    import torch
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    return torch.softmax(s, -1) @ v.double()


def error_table(N=4096, Hh=4):
    """Rows {kind='error', d, inputs, impl, rmse, rel_rmse}: rung 7 fp16, fa3_fp8 without / with the rotation."""
    from flashlib._arrays import like, to_cupy
    rows = []
    for d in DIMS:
        for name, frac in (("normal", 0.0), ("outliers_0.1%", 1e-3)):
            q, k, v = _inputs(1, Hh, N, d, frac, seed=d)
            scale = d ** -0.5
            ref = _ref64(q, k, v, scale)
            rms = float(ref.pow(2).mean().sqrt())
            got = {"rung7_fp16": like(tma.forward_fa3(to_cupy(q), to_cupy(k), to_cupy(v), False, scale)[0], q,
                                      "float16"),
                   "fa3_fp8_plain": fp8.forward_fp8(q, k, v, scale=scale, hadamard=False)[0],
                   "fa3_fp8_hadamard": fp8.forward_fp8(q, k, v, scale=scale, hadamard=True)[0]}
            line = f"errors d={d} {name:14s}"
            for impl, o in got.items():
                e = float((o.double() - ref).pow(2).mean().sqrt())
                rows.append(dict(kind="error", d=d, n=N, B=1, H=Hh, inputs=name, impl=impl, rmse=e, rel_rmse=e / rms))
                line += f" | {impl} RMSE {e:.2e} ({e / rms:.1%} of rms O)"
            print(line, flush=True)
    return rows


def main():
    import torch
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--max-seconds", type=float, default=2.5)
    ap.add_argument("--sanitize", action="store_true")
    ap.add_argument("--quant", action="store_true", help="only the record fp8_quant_<gpu> (quant_main)")
    ap.add_argument("--emu", action="store_true", help="only the record fp8_emu_<gpu> (emu_main)")
    ap.add_argument("--persist", action="store_true", help="only the record fp8_persist_<gpu> (grid_main)")
    ap.add_argument("--trim", action="store_true", help="only the record fp8_trim_<gpu> (grid_main)")
    ap.add_argument("--narrow", action="store_true", help="only the record fp8_narrow_<gpu> (grid_main)")
    ap.add_argument("--sweep", type=int, nargs="?", const=128, choices=sorted(SWEEP),
                    help="only the record fp8_sweep[_d256]_<gpu> (sweep_main) at head dim SWEEP (default 128)")
    ap.add_argument("--ncu-case", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.ncu_case is not None:
        return emu_ncu(a.ncu_case)
    if a.emu:
        return emu_main(a.out, a.max_seconds)
    if a.quant:
        return quant_main(a.out, a.max_seconds)
    if a.sweep:
        return sweep_main(a.out, a.max_seconds, a.sweep)
    if a.persist or a.trim or a.narrow:
        return grid_main("persist" if a.persist else "trim" if a.trim else "narrow", a.out, a.max_seconds)
    if a.sanitize:
        q, k, v = _inputs(1, 4, 517, 128)
        for t in (None,) + fp8_tiles.FP8_OTHER_TILES[128]:    # Nk below one tile, and several tiles with a ragged last
            o, lse = fp8.forward_fp8(q[:, :, :97], k[:, :2, :45], v[:, :2, :45], causal=True, tiles=t)
            o2, _ = fp8.forward_fp8(q[:, :, :300], k[:, :2], v[:, :2], causal=False, tiles=t)
            torch.cuda.synchronize()
            print("sanitize calls done", t, bool(torch.isfinite(o).all() and torch.isfinite(o2).all()))
        q, k, v = _inputs(1, 64, 900, 128)        # the persistent grid: 8 ragged query tiles x 64 pairs over the SMs
        for c in (False, True):
            o, _ = fp8.forward_fp8(q, k[:, :8, :333], v[:, :8, :333], causal=c, tiles=fp8_tiles.default_tiles(128, True))
            torch.cuda.synchronize()
            print("sanitize persistent calls done", c, bool(torch.isfinite(o).all()))
            for nk in (45, 333, 900):           # the trimmed kernel: one tile, a narrowed partial tile, several
                o, _ = fp8.forward_fp8(q[:, :8], k[:, :8, :nk], v[:, :8, :nk], causal=c,
                                       tiles=fp8_tiles.default_tiles(128, False, True))
                torch.cuda.synchronize()
                print("sanitize trimmed calls done", c, nk, bool(torch.isfinite(o).all()))
        for nk in (45, 333, 900):               # the narrow last tile: one tile, a partial tile, several
            o, _ = fp8.forward_fp8(q[:, :8], k[:, :8, :nk], v[:, :8, :nk],
                                   tiles=fp8_tiles.default_tiles(128, False, False, True))
            torch.cuda.synchronize()
            print("sanitize narrow calls done", nk, bool(torch.isfinite(o).all()))
        for d in (256, 64):                       # d = 256's and 64's defaults (persistent without the mask; 64:
            q, k, v = _inputs(1, 64, 700, d)      # three consumer warpgroups): ragged, 6 or 4 query tiles x 64 pairs
            for c in (False, True):
                o, _ = fp8.forward_fp8(q, k[:, :8, :333], v[:, :8, :333], causal=c)
                torch.cuda.synchronize()
                print(f"sanitize d = {d} calls done", c, bool(torch.isfinite(o).all()))
        return
    precompile()
    rows = error_table()
    for d in DIMS:
        for N in LENGTHS:
            for causal in (False, True):
                rows += time_shape(d, N, causal, a.max_seconds)
    tag = bench.gpu_tag(torch.cuda.get_device_name())
    path = bench.save(f"fp8_forward_{tag}", rows, directory=a.out, tiles=fp8_tiles.FP8_TILES,
                      other_tiles=fp8_tiles.FP8_OTHER_TILES, flops="4*B*H*N^2*d, half when causal",
                      timing="flashlib.bench.timing.compare, host=False; fa3_fp8 on pre-quantised inputs",
                      error="RMSE of O against float64 attention, B=1, H=4, N=4096; outliers: 0.1% N(0, 100)")
    print("saved", path)


if __name__ == "__main__":
    main()
