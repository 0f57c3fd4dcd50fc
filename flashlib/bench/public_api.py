"""What users call, beside PyTorch SDPA in one run: TFLOP/s of the public calls and their host time per call.

    python -m flashlib.bench.public_api [--quick] [--ds 64 128 256] [--Ns 4096 16384] [--out DIR] [--name NAME]

Per (dtype, d, N, causal), shapes `shapes.workload` (B = 16384 / N, H = 16), the forward (no grad) and forward +
backward (torch.autograd.grad) of:
  flashlib-cupy, flashlib-numba     flashlib.torch.scaled_dot_product_attention(..., backend=...): the public op
  flashlib-cupy-direct              flashlib.cupy_kernels.forward / backward on the tensors: the launches alone
  sdpa-flash, sdpa-cudnn, sdpa-efficient   F.scaled_dot_product_attention with that backend pinned (the pinning
                                    context is entered outside the timed region)
timed together by `flashlib.bench.timing.compare` (interleaved rounds, batches behind a hold kernel, median and
spread). The host table (`host_us`) times the calls at B = H = 1, N = 128, d = 64 fp16, where the kernel is
negligible: wall time per call with no synchronisation inside the batch.
"""
import argparse

from ..constants import attention_flops, default_scale
from .records import save
from .results import describe, gpu_tag  # noqa: F401 (describe: for the chapters)
from .sdpa import sdpa_backends
from .shapes import DESCRIPTION, workload
from .timing import compare

FULL = dict(dtypes=("float16", "bfloat16"), ds=(64, 128, 256), Ns=(1024, 4096, 16384), causals=(False, True))
QUICK = dict(dtypes=("float16", "bfloat16"), ds=(64, 128), Ns=(1024, 4096), causals=(False, True))
SDPA = ("flash", "cudnn", "efficient")


def _pinned(name):
    import torch
    from torch.nn.attention import sdpa_kernel
    member = sdpa_backends()[name]
    return (lambda q, k, v, c: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=c)), \
        (lambda: sdpa_kernel(member))


def candidates(causal):
    """{name: (forward(q, k, v), forward+backward(q, k, v, do), context factory or None)}."""
    from .. import cupy_kernels as ck
    from ..torch import scaled_dot_product_attention as fsdpa
    out = {}
    for b in ("cupy", "numba"):
        fwd = lambda q, k, v, b=b: fsdpa(q, k, v, is_causal=causal, backend=b)
        out[f"flashlib-{b}"] = (fwd, _fwdbwd(fwd), None)
    dt = lambda q: str(q.dtype).replace("torch.", "")

    def direct_fwd(q, k, v):
        return ck.forward(q, k, v, causal=causal, scale=default_scale(q.shape[-1]), dtype=dt(q))[0]

    def direct_fb(q, k, v, do):
        scale = default_scale(q.shape[-1])
        o, lse = ck.forward(q, k, v, causal=causal, scale=scale, dtype=dt(q))
        return ck.backward(q, k, v, o, lse, do, causal=causal, scale=scale, dtype=dt(q))
    out["flashlib-cupy-direct"] = (direct_fwd, direct_fb, None)
    for name in SDPA:
        fn, ctx = _pinned(name)
        fwd = lambda q, k, v, fn=fn: fn(q, k, v, causal)
        out[f"sdpa-{name}"] = (fwd, _fwdbwd(fwd), ctx)
    return out


def _fwdbwd(fwd):
    import torch

    def fb(q, k, v, do):
        return torch.autograd.grad(fwd(q, k, v), (q, k, v), do)
    return fb


def _usable(fn, args, ctx):
    """None if fn(*args) runs, else the error's first line."""
    import contextlib
    try:
        with (ctx or contextlib.nullcontext)():
            fn(*args)
        return None
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def precompile(grid, device=0):
    """Build the CuPy forward and backward plans of the grid's (dtype, d, causal) in 8 threads (NVRTC runs in
    parallel), so that compilation stays out of the timed rounds and the run's wall time."""
    import concurrent.futures
    from .. import cupy_kernels as ck
    kinds = [(t, d, c) for t in grid["dtypes"] for d in grid["ds"] for c in grid["causals"]]
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda x: (ck.forward_plan(*x, device), ck.backward_plan(*x, device)), kinds))


def run(grid, progress=print, on_rows=None, **timing_kw):
    """Rows, one per (dtype, d, N, causal, backend), with fwd_ms/_tflops/_spread and fwdbwd_ms/_tflops/_spread;
    on_rows(rows so far) after each case (to save partial results)."""
    import torch
    rows = []
    for dt in grid["dtypes"]:
        for d in grid["ds"]:
            for N in grid["Ns"]:
                for causal in grid["causals"]:
                    B, H = workload(N)
                    g = torch.Generator(device="cuda").manual_seed(N + d)
                    q, k, v, do = (torch.randn(B, H, N, d, device="cuda", dtype=getattr(torch, dt), generator=g)
                                   for _ in range(4))
                    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
                    cands = candidates(causal)
                    base = dict(dtype=dt, d=d, N=N, B=B, H=H, causal=causal)
                    res = {n: dict(base, backend=n) for n in cands}
                    for key, args, pick in (("fwd", (q, k, v), 0), ("fwdbwd", (qg, kg, vg, do), 1)):
                        fns, ctxs = {}, {}
                        for n, c in cands.items():
                            why = _usable(c[pick], args, c[2]) if pick == 1 else _usable_nograd(c[0], args, c[2])
                            if why:
                                res[n][f"{key}_error"] = why
                            else:
                                fns[n] = (lambda f=c[pick], a=args: f(*a)) if pick else _nograd(c[0], args)
                                if c[2]:
                                    ctxs[n] = c[2]
                        stats = compare(fns, contexts=ctxs, host=False, **timing_kw)
                        flops = attention_flops(B, H, N, d, causal, key == "fwdbwd")
                        for n, s in stats.items():
                            res[n].update({f"{key}_ms": s["median_ms"], f"{key}_spread": s["spread"],
                                           f"{key}_rounds": s["rounds"],
                                           f"{key}_tflops": flops / (s["median_ms"] * 1e-3) / 1e12})
                    rows += list(res.values())
                    if progress:
                        progress(_line(rows[-len(res):]))
                    if on_rows:
                        on_rows(rows)
                    del q, k, v, do, qg, kg, vg
                    torch.cuda.empty_cache()
    return rows


def _nograd(fn, args):
    import torch

    def call():
        with torch.no_grad():
            return fn(*args)
    return call


def _usable_nograd(fn, args, ctx):
    import torch
    with torch.no_grad():
        return _usable(fn, args, ctx)


def _line(rows):
    r0 = rows[0]
    cells = [f"{r['backend']} {r.get('fwd_tflops', float('nan')):.0f}/{r.get('fwdbwd_tflops', float('nan')):.0f}"
             for r in rows]
    return f"{r0['dtype']} d={r0['d']} N={r0['N']} causal={r0['causal']}: " + ", ".join(cells)


def host_table(**timing_kw):
    """{call: host microseconds per call} at B = H = 1, N = 128, d = 64, fp16 (issue 16's table), plus spread."""
    import cupy as cp
    import torch
    import flashlib
    from .. import cupy_kernels as ck
    from ..torch import scaled_dot_product_attention as fsdpa
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(1, 1, 128, 64, device="cuda", dtype=torch.float16, generator=g) for _ in range(4))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    qc, kc, vc = (cp.asarray(t) for t in (q, k, v))
    flash, flash_ctx = _pinned("flash")
    cudnn, cudnn_ctx = _pinned("cudnn")
    grad = lambda o, inputs: torch.autograd.grad(o, inputs, do)
    fns = {
        "sdpa-flash forward": _nograd(lambda: flash(q, k, v, False), ()),
        "sdpa-cudnn forward": _nograd(lambda: cudnn(q, k, v, False), ()),
        "flashlib.torch sdpa forward (no grad)": _nograd(lambda: fsdpa(q, k, v), ()),
        "flashlib.torch sdpa forward (inputs require grad)": lambda: fsdpa(qg, kg, vg),
        "flashlib.attention on torch tensors": lambda: flashlib.attention(q, k, v, backend="cupy"),
        "flashlib.attention on CuPy arrays": lambda: flashlib.attention(qc, kc, vc, backend="cupy"),
        "cupy_kernels.forward on CuPy arrays": lambda: ck.forward(qc, kc, vc, causal=False, scale=0.125,
                                                                  dtype="float16"),
        "cupy_kernels.forward on torch tensors": lambda: ck.forward(q, k, v, causal=False, scale=0.125,
                                                                    dtype="float16"),
        "sdpa-flash forward + backward": lambda: grad(flash(qg, kg, vg, False), (qg, kg, vg)),
        "flashlib.torch forward + backward": lambda: grad(fsdpa(qg, kg, vg), (qg, kg, vg)),
    }
    ctxs = {n: (flash_ctx if "sdpa-flash" in n else cudnn_ctx) for n in fns if n.startswith("sdpa-")}
    timing_kw = {"min_rounds": 10, "host_calls": 100, **timing_kw}
    stats = compare(fns, contexts=ctxs, host=True, **timing_kw)
    return {n: {"host_us": s["host_us"], "host_spread": s["host_spread"], "gpu_ms": s["median_ms"]}
            for n, s in stats.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 1024 and 4096 only")
    ap.add_argument("--ds", type=int, nargs="+", default=None, help="head dims (default: the grid's)")
    ap.add_argument("--Ns", type=int, nargs="+", default=None, help="sequence lengths (default: the grid's)")
    ap.add_argument("--out", default=None, help="directory for the JSON (default: flashlib.bench.save's)")
    ap.add_argument("--name", default=None, help="file name (default public_api_<gpu>)")
    a = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("flashlib.bench.public_api needs a CUDA GPU (torch.cuda.is_available() is False)")
    host = host_table()
    from ..viz.tables import table
    print(table(["call", "host us per call", "spread"],
                [[n, round(s["host_us"], 1), f"{100 * s['host_spread']:.0f}%"] for n, s in host.items()]))
    name = a.name or f"public_api_{gpu_tag()}"
    method = ("flashlib.bench.timing.compare: interleaved rounds, batches behind a hold kernel; host_us: wall time "
              f"per call, no sync inside a batch of 100, median of 10 interleaved rounds; {DESCRIPTION}")
    write = lambda rows, done=False: save(name, rows, directory=a.out, host_us=host, method=method, complete=done)
    write([])
    grid = dict(QUICK if a.quick else FULL)
    grid.update({k: tuple(v) for k, v in (("ds", a.ds), ("Ns", a.Ns)) if v})
    precompile(grid)
    rows = run(grid, on_rows=write, max_seconds=20.0)
    path = write(rows, True)
    print(f"written: {path}")
    return path


if __name__ == "__main__":
    main()
