"""Rung 7 one change at a time: rung 6 ('wgmma') -> rung 7 without ping-pong ('plain': TMA + warp specialisation)
-> with ping-pong -> + the persistent grid, timed together (flashlib.bench.timing.compare) on one GPU; and at d = 256,
rung 7 beside the current default there (rung 3, 'tuned') and PyTorch's SDPA (cuDNN, flash).

    python benchmarks/fa3_ablation.py [--max-seconds S] [--out DIR] [--ncu [--ncu-out FILE]]
    python benchmarks/fa3_ablation.py --schedulers [--max-seconds S] [--out DIR]

Shapes: fp16, d = 64 and 128, N = 4096 and 16384, causal and not, H = 16, B = 16384 // N (d = 256: the same N).
FLOPs = 4*B*H*N^2*d, half when causal. Each output is compared with SDPA flash's (max |o - flash|). At d = 256,
N = 16384 also rung 7's tile (FA3_TILES) beside FA3_OTHER_TILES (impl rung7_tiles_BcxSTAGESxNCW). Saved through
flashlib.bench.save as fa3_ablation_<gpu>. --ncu: after the timing, each of the four at d = 128, N = 16384, not
causal, once under Nsight Compute (sections ComputeWorkloadAnalysis, SchedulerStats, WarpStateStats, raw page):
tensor-pipe utilisation, issue-active share and the top warp stall reasons, a compact table (and the record).
--schedulers: only SCHEDULERS (rung 7's grid, its persistent grid with the static order and with the dynamic
scheduler), at d = 64, 128, 256, N = 4096, 16384, causal and not, timed together; saved as fa3_schedulers_<gpu>.
"""
import argparse
import csv
import io
import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flashlib import bench  # noqa: E402
from flashlib import cupy_kernels as ck  # noqa: E402
from flashlib.cupy_kernels import tma  # noqa: E402

LADDER = ("rung6_wgmma", "rung7_plain", "rung7_pingpong", "rung7_persistent")
D256 = ("rung3_tuned", "rung7_pingpong", "rung7_persistent", "sdpa_cudnn", "sdpa_flash")
SCHEDULERS = ("rung7_pingpong", "rung7_persistent", "rung7_dynamic", "sdpa_cudnn")
NCU_SECTIONS = ("ComputeWorkloadAnalysis", "SchedulerStats", "WarpStateStats")


def _inputs(B, H, N, d, seed=0):
    import torch
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, H, N, d, device="cuda", generator=g).half() for _ in range(3)]


def candidates(names, q, k, v, causal):
    """{name: fn} launching each implementation once on q, k, v (torch fp16); the SDPA ones need `contexts`."""
    import torch
    from flashlib._arrays import to_cupy
    qc, kc, vc = (to_cupy(t) for t in (q, k, v))
    scale = q.shape[-1] ** -0.5
    rung = lambda r: lambda: ck.forward(qc, kc, vc, causal=causal, scale=scale, dtype="float16", rung=r)
    fa3 = lambda x: lambda: tma.forward_fa3(qc, kc, vc, causal, scale, variant=x)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    table = {"rung6_wgmma": rung("wgmma"), "rung3_tuned": rung("tuned"), "sdpa_cudnn": sdpa, "sdpa_flash": sdpa,
             **{f"rung7_{x}": fa3(x) for x in tma.VARIANTS}}
    return {n: table[n] for n in names}


def _contexts():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return {"sdpa_cudnn": lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION),
            "sdpa_flash": lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)}


def time_shape(names, d, N, causal, max_seconds):
    """Rows {impl, ms, spread, tflops, err_vs_flash, ...} of the implementations `names` at one shape."""
    import torch
    from flashlib._arrays import like
    from flashlib.bench.timing import compare
    H, B = 16, max(1, 16384 // N)
    q, k, v = _inputs(B, H, N, d)
    fns, ctx = candidates(names, q, k, v, causal), _contexts()
    with torch.no_grad(), ctx["sdpa_flash"]():
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal).float()
    errs = {}
    for name in list(fns):
        try:
            with ctx.get(name, lambda: torch.no_grad())():
                out = fns[name]()
            o = out if isinstance(out, torch.Tensor) else like(out[0], q, "float16")
            errs[name] = float((o.float() - ref).abs().max())
        except Exception as e:  # noqa: BLE001 (one GPU run: report and go on)
            print(f"{name} d={d} N={N} causal={causal} failed: {e!r}"[:300], flush=True)
            fns.pop(name)
    stats = compare(fns, host=False, min_rounds=3, max_rounds=10, max_seconds=max_seconds,
                    contexts={n: c for n, c in ctx.items() if n in fns})
    flops = 4 * B * H * N * N * d * (0.5 if causal else 1.0)
    rows = [dict(dtype="float16", d=d, n=N, B=B, H=H, causal=causal, impl=n, ms=st["median_ms"], spread=st["spread"],
                 tflops=flops / (st["median_ms"] * 1e-3) / 1e12, err_vs_flash=errs[n]) for n, st in stats.items()]
    print(f"d={d:3d} N={N:5d} causal={causal!s:5s}" + "".join(
        f" | {r['impl']} {r['tflops']:5.0f} ±{100 * r['spread']:.0f}%" for r in rows) + "  (TFLOP/s, IQR/median)  max err "
        + ", ".join(f"{errs[n]:.0e}" for n in fns), flush=True)
    return rows


def time_tiles(d, N, causal, max_seconds):
    """Rows of rung 7 (ping-pong) at fa3_tiles(d, causal) and each of the others (fa3_candidates) (impl 'rung7_tiles_BcxSxNCW'),
    with max |o - o at the default tiles|."""
    from flashlib._arrays import to_cupy
    from flashlib.bench.timing import compare
    H, B = 16, max(1, 16384 // N)
    qc, kc, vc = (to_cupy(t) for t in _inputs(B, H, N, d))
    name = lambda t: "rung7_tiles_" + "x".join(map(str, t))
    fns = {name(t): (lambda t=t: tma.forward_fa3(qc, kc, vc, causal, None, tiles=t, variant="pingpong"))
           for t in tma.fa3_candidates(d, causal)}
    ref = fns[name(tma.fa3_tiles(d, causal))]()[0].astype("float32")
    errs = {n: float(abs(fn()[0].astype("float32") - ref).max()) for n, fn in fns.items()}
    stats = compare(fns, host=False, min_rounds=3, max_rounds=10, max_seconds=max_seconds)
    flops = 4 * B * H * N * N * d * (0.5 if causal else 1.0)
    rows = [dict(dtype="float16", d=d, n=N, B=B, H=H, causal=causal, impl=n, ms=st["median_ms"], spread=st["spread"],
                 tflops=flops / (st["median_ms"] * 1e-3) / 1e12, err_vs_default_tiles=errs[n])
            for n, st in stats.items()]
    print(f"tiles d={d} N={N} causal={causal}" + "".join(f" | {r['impl']} {r['tflops']:5.0f}" for r in rows), flush=True)
    return rows


def precompile():
    """The kernels timed here (rung 7 at the default tiles, every variant; rungs 6 and 3), compiled in threads."""
    import concurrent.futures
    jobs = [lambda d=d, c=c, x=x: tma._launcher(0, tma.fa3_config("float16", d, c, None, x))
            for d in tma.FA3_HEAD_DIMS for c in (False, True) for x in tma.VARIANTS]
    jobs += [lambda c=c, t=t: tma._launcher(0, tma.fa3_config("float16", 256, c, t)) for c in (False, True)
             for t in tma.FA3_OTHER_TILES[256]]
    jobs += [lambda d=d, c=c, r=r: ck.forward_plan("float16", d, c, 0, r, None)
             for d, r in ((64, "wgmma"), (128, "wgmma"), (256, "tuned")) for c in (False, True)]
    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda f: f(), jobs))


def table(rows):
    """The ladder's lines: TFLOP/s per step and the ratio to the step before."""
    out = ["d    N      causal | " + " | ".join(f"{n:>16s}" for n in LADDER)]
    for key in dict.fromkeys((r["d"], r["n"], r["causal"]) for r in rows if r["impl"] in LADDER):
        got = {r["impl"]: r["tflops"] for r in rows if (r["d"], r["n"], r["causal"]) == key}
        cells, prev = [], None
        for n in LADDER:
            tf = got.get(n)
            cells.append("" if tf is None else f"{tf:6.0f}" + (f" ({tf / prev:4.2f}x)" if prev else "        "))
            prev = tf or prev
        out.append(f"{key[0]:<4d} {key[1]:<6d} {key[2]!s:6s} | " + " | ".join(f"{c:>16s}" for c in cells))
    return "\n".join(out)


# ---------------------------------------------------------------- Nsight Compute

def ncu_case():
    """(inside ncu) each of LADDER once at d = 128, N = 16384, not causal, between profiler start and stop."""
    import torch
    q, k, v = _inputs(1, 16, 16384, 128)
    fns = candidates(LADDER, q, k, v, False)
    for fn in fns.values():     # compile and warm up outside the profiled range
        fn()
    torch.cuda.synchronize()
    for fn in fns.values():
        torch.cuda.profiler.start()
        fn()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()


def ncu_profile(raw_out=None):
    """Rows {impl, metrics...} of one ncu run over ncu_case (kernels in LADDER's order); the raw CSV to raw_out."""
    cmd = ["ncu", "--profile-from-start", "off", "--clock-control", "none", "--csv", "--page", "raw"]
    cmd += [a for s in NCU_SECTIONS for a in ("--section", s)] + [sys.executable, os.path.abspath(__file__), "--ncu-case"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    text = res.stdout
    if raw_out:
        with open(raw_out, "w") as fh:
            fh.write(text[text.find('"ID"'):] if '"ID"' in text else text + res.stderr[-3000:])
    if '"ID"' not in text:
        raise RuntimeError(f"ncu gave no table (rc {res.returncode}): {res.stderr[-1500:]}")
    table_ = list(csv.reader(io.StringIO(text[text.index('"ID"'):])))
    head, body = table_[0], [r for r in table_[2:] if len(r) == len(table_[0])]   # row 1: units
    rows = []
    for impl, r in zip(LADDER, body):
        vals = dict(zip(head, r))
        keep = {k: _num(x) for k, x in vals.items() if re.search(r"pipe_tensor|issue_active|issue_stalled", k)}
        rows.append(dict(impl=impl, kernel=vals.get("Kernel Name", "")[:120], metrics=keep))
    return rows


def _num(x):
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return x


TENSOR_METRICS = ("sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",       # the tensor pipe busy
                  "sm__inst_executed_pipe_tensor_op_gmma.avg.pct_of_peak_sustained_active")  # wgmma issue rate
ISSUE_METRIC = "smsp__issue_active.avg.pct_of_peak_sustained_active"


def ncu_table(rows):
    """One line per kernel: tensor pipe busy, wgmma instructions (% of peak), issue-active share, the four largest
    stall reasons (warps stalled per issued instruction; 'selected', the issuing warp itself, left out)."""
    out = [f"{'':17s} {'tensor pipe':>11s} {'gmma inst':>9s} {'issue':>6s}  top stalls (warps per issue)"]
    for r in rows:
        m = r["metrics"]
        stalls = {re.search(r"issue_stalled_(\w+?)_per", k).group(1): v for k, v in m.items()
                  if re.search(r"average_warps?_issue_stalled_\w+?_per_issue_active\.ratio$", k)
                  and isinstance(v, float)}
        stalls.pop("selected", None)
        top = sorted(stalls.items(), key=lambda kv: -kv[1])[:4]
        cell = lambda k: f"{m[k]:.1f}%" if isinstance(m.get(k), float) else "?"
        out.append(f"{r['impl']:17s} {cell(TENSOR_METRICS[0]):>11s} {cell(TENSOR_METRICS[1]):>9s} "
                   f"{cell(ISSUE_METRIC):>6s}  " + ", ".join(f"{k} {v:.2f}" for k, v in top))
    return "\n".join(out)


def schedulers(max_seconds, out):
    """SCHEDULERS at every head dim, N = 4096 and 16384, causal and not, one record (fa3_schedulers_<gpu>)."""
    import torch
    rows = []
    for d, N, causal in [(d, N, c) for d in tma.FA3_HEAD_DIMS for N in (4096, 16384) for c in (False, True)]:
        rows += time_shape(SCHEDULERS, d, N, causal, max_seconds)
    tag = bench.gpu_tag(torch.cuda.get_device_name())
    print(bench.save(f"fa3_schedulers_{tag}", rows, directory=out, schedulers=SCHEDULERS, tiles=tma.FA3_TILES,
                     flops="4*B*H*N^2*d, half when causal", timing="flashlib.bench.timing.compare, host=False"))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-seconds", type=float, default=2.5, help="timing budget per shape (compare)")
    p.add_argument("--out", default=os.environ.get("FLASHLIB_RESULTS"))
    p.add_argument("--ncu", action="store_true")
    p.add_argument("--ncu-out", default=None, help="where to write ncu's raw CSV")
    p.add_argument("--no-d256", action="store_true")
    p.add_argument("--schedulers", action="store_true", help="time only SCHEDULERS (record fa3_schedulers_<gpu>)")
    p.add_argument("--ncu-case", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.ncu_case:
        return ncu_case()
    import torch
    precompile()
    if a.schedulers:
        return schedulers(a.max_seconds, a.out)
    rows = []
    for d, N, causal in [(d, N, c) for d in (64, 128) for N in (4096, 16384) for c in (False, True)]:
        rows += time_shape(LADDER, d, N, causal, a.max_seconds)
    print(table(rows), flush=True)
    if not a.no_d256:
        for N, causal in [(N, c) for N in (4096, 16384) for c in (False, True)]:
            rows += time_shape(D256, 256, N, causal, a.max_seconds)
        for causal in (False, True):    # d = 256's tile (FlashAttention-3's) beside the other one it compiles
            rows += time_tiles(256, 16384, causal, a.max_seconds)
    info = {}
    if a.ncu:
        try:
            prof = ncu_profile(a.ncu_out)
            print(ncu_table(prof), flush=True)
            info["ncu"] = dict(shape="d=128 N=16384 B=1 H=16 fp16 not causal", sections=NCU_SECTIONS, rows=prof)
        except Exception as e:  # noqa: BLE001
            print(f"ncu failed: {e!r}"[:2000], flush=True)
    tag = bench.gpu_tag(torch.cuda.get_device_name())
    print(bench.save(f"fa3_ablation_{tag}", rows, directory=a.out, ladder=LADDER, d256=D256, tiles=tma.FA3_TILES,
                     flops="4*B*H*N^2*d, half when causal", timing="flashlib.bench.timing.compare, host=False",
                     **info))
    print(json.dumps({"rows": len(rows)}))


if __name__ == "__main__":
    main()
