"""The attention benchmark grid: flashlib's backends beside PyTorch SDPA (each backend pinned) and naive attention.

flashlib-<backend> is the public call (flashlib.torch.scaled_dot_product_attention, autograd for the backward);
flashlib-<backend>-direct calls flashlib.attention / attention_backward (no autograd). For the public calls beside
SDPA timed interleaved, with host time per call, see flashlib.bench.public_api.

    python -m flashlib.bench [--quick] [--out DIR] [--public]

For every (dtype, d, N, causal) it times the forward and forward+backward of each implementation with CUDA
events (median after warm-up) and measures the peak extra device memory of one forward. Shapes: `shapes.workload`
(B = 16384 / N, H = 16). FLOPs: `flashlib.constants.attention_flops` (4 B H N^2 d forward, half when causal;
forward+backward 3.5x the forward, as FlashAttention-2's paper counts).
"""
import argparse

from ..constants import attention_flops, default_scale
from .progress import progress_bar
from .records import save
from .results import gpu_tag
from .shapes import HEADS, workload
from .timing import time_cuda

FULL = dict(dtypes=("float16", "bfloat16", "float32"), ds=(64, 128), Ns=(512, 1024, 2048, 4096, 8192, 16384),
            causals=(False, True))
QUICK = dict(dtypes=("float16", "float32"), ds=(64,), Ns=(1024, 4096), causals=(False, True))
SDPA = ("flash", "cudnn", "efficient", "math")


def implementations(dtype):
    """name -> (forward(q, k, v, causal, scale), forward+backward(q, k, v, do, causal, scale)) for this dtype."""
    import flashlib
    from .sdpa import sdpa_pinned

    def torch_pair(fwd):
        def fb(q, k, v, do, causal, scale):
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            fwd(q, k, v, causal, scale).backward(do)
        return fwd, fb

    from ..torch import naive_attention
    impls = {"naive": torch_pair(naive_attention)}
    for name in SDPA:
        def sdpa(q, k, v, causal, scale, name=name):
            return sdpa_pinned(name, q, k, v, is_causal=causal, scale=scale)
        impls[f"sdpa-{name}"] = torch_pair(sdpa)
    from ..torch import scaled_dot_product_attention as public
    for b in flashlib.available_backends():
        if b in ("numba", "cupy") and not (b == "numba" and dtype != "float32"):
            def fwd(q, k, v, causal, scale, b=b):       # what users call: the registered operator
                return public(q, k, v, is_causal=causal, scale=scale, backend=b)
            impls[f"flashlib-{b}"] = torch_pair(fwd)

            def fwd_direct(q, k, v, causal, scale, b=b):
                return flashlib.attention(q, k, v, causal=causal, scale=scale, backend=b)

            def fb_direct(q, k, v, do, causal, scale, b=b):
                o, lse = flashlib.attention(q, k, v, causal=causal, scale=scale, backend=b, return_lse=True)
                return flashlib.attention_backward(q, k, v, o, lse, do, causal=causal, scale=scale, backend=b)
            impls[f"flashlib-{b}-direct"] = (fwd_direct, fb_direct)
    return impls


def peak_extra_mb(fn):
    """Peak device memory one call adds, in MB: allocator peaks around the call, inputs excluded
    (flashlib.bench.memory.peak_extra_bytes; CuPy and Numba allocations included)."""
    from .memory import peak_extra_bytes
    return peak_extra_bytes(fn)["bytes"] / 1e6


def run(grid, repeat=10, out=None, progress=True):
    import torch
    rows, cases = [], [(dt, d, N, c) for dt in grid["dtypes"] for d in grid["ds"] for N in grid["Ns"]
                       for c in grid["causals"]]
    for dt, d, N, causal in progress_bar(cases, "attention grid", disable=not progress):
        B, H = workload(N)
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, do = (torch.randn(B, H, N, d, device="cuda", dtype=getattr(torch, dt), generator=g)
                       for _ in range(4))
        scale = default_scale(d)
        for name, (fwd, fb) in implementations(dt).items():
            row = dict(dtype=dt, d=d, n=N, B=B, H=H, causal=causal, impl=name)
            try:
                row["fwd_ms"] = time_cuda(lambda: fwd(q, k, v, causal, scale), repeat=repeat)
                row["fwd_tflops"] = attention_flops(B, H, N, d, causal) / row["fwd_ms"] / 1e9
                row["peak_extra_MB"] = peak_extra_mb(lambda: fwd(q, k, v, causal, scale))
                row["fwdbwd_ms"] = time_cuda(lambda: fb(q, k, v, do, causal, scale), repeat=max(3, repeat // 2))
                row["fwdbwd_tflops"] = attention_flops(B, H, N, d, causal, True) / row["fwdbwd_ms"] / 1e9
            except Exception as e:  # a backend that refuses this case (e.g. flash in fp32) or runs out of memory
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                torch.cuda.empty_cache()
            rows.append(row)
    return rows


def memory_sweep(Ns=(1024, 4096, 16384, 32768, 65536), d=64, dtype="float16"):
    """Peak extra memory of one forward, B = 1, H = 16, up to N where naive attention runs out of memory."""
    import torch
    rows = []
    for N in Ns:
        q = torch.randn(1, HEADS, N, d, device="cuda", dtype=getattr(torch, dtype))
        for name, (fwd, _) in implementations(dtype).items():
            if name == "sdpa-math" and N > 16384:
                continue
            try:
                rows.append(dict(n=N, d=d, dtype=dtype, impl=name,
                                 peak_extra_MB=peak_extra_mb(lambda: fwd(q, q, q, False, default_scale(d)))))
            except Exception as e:
                rows.append(dict(n=N, d=d, dtype=dtype, impl=name, error=f"{type(e).__name__}"))
                torch.cuda.empty_cache()
    return rows


def table(rows, key="fwd_tflops"):
    """One line per case, one column per implementation: a flashlib.viz table (display() it in a notebook,
    print() it in a terminal)."""
    from ..viz.tables import table as make_table
    impls = sorted({r["impl"] for r in rows})
    cases = sorted({(r["dtype"], r["d"], r["n"], r["causal"]) for r in rows})
    by = {(r["dtype"], r["d"], r["n"], r["causal"], r["impl"]): r for r in rows}
    cells = lambda c: [f"{by[c + (i,)][key]:.1f}" if key in by.get(c + (i,), {}) else "–" for i in impls]
    return make_table(["dtype", "d", "N", "causal"] + impls, [[*c[:3], str(c[3]), *cells(c)] for c in cases])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small grid (a minute or two)")
    ap.add_argument("--out", default=None, help="directory for the JSON (default flashlib.bench.RESULTS)")
    ap.add_argument("--name", default=None, help="file name (default attention_<gpu>[_quick])")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory sweep up to N = 65536")
    ap.add_argument("--public", action="store_true",
                    help="instead: the public calls beside SDPA, interleaved, with host time (flashlib.bench.public_api)")
    a = ap.parse_args(argv)
    if a.public:
        from .public_api import main as public_main
        return public_main((["--quick"] if a.quick else []) + (["--out", a.out] if a.out else [])
                           + (["--name", a.name] if a.name else []))
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("flashlib.bench needs a CUDA GPU (torch.cuda.is_available() is False)")
    rows = run(QUICK if a.quick else FULL, repeat=5 if a.quick else 10)
    mem = [] if a.no_memory or a.quick else memory_sweep()
    path = save(a.name or f"attention_{gpu_tag()}{'_quick' if a.quick else ''}", rows, directory=a.out, memory=mem)
    print(table(rows, "fwd_tflops"), "\n\nforward+backward TFLOP/s\n", table(rows, "fwdbwd_tflops"), sep="\n")
    for png in plots(rows, mem, path.with_suffix("")):
        print(f"plot: {png}")
    print(f"\nwritten: {path}")
    return path


def plots(rows, mem, stem):
    """Runtime and TFLOP/s against N for each (dtype, d), and memory against N: PNG files beside the JSON."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ..viz import bench_plots as vb
    out = []
    for dt, d in sorted({(r["dtype"], r["d"]) for r in rows}):
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        vb.runtime_vs_n({"rows": rows}, dt, d, False, "fwd_ms", ax=axes[0])
        vb.runtime_vs_n({"rows": rows}, dt, d, False, "fwd_tflops", ax=axes[1])
        out.append(stem.parent / f"{stem.name}_{dt}_d{d}.png")
        fig.tight_layout(); fig.savefig(out[-1], dpi=100); plt.close(fig)
    if mem:
        ax = vb.memory_vs_n(mem, title="one forward, B = 1, H = 16")
        out.append(stem.parent / f"{stem.name}_memory.png")
        ax.figure.savefig(out[-1], dpi=100); plt.close(ax.figure)
    return out
