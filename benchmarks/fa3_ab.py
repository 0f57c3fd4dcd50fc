"""Rung 7 as this checkout builds it against another version of fa3_forward.cu, in one run (a kernel change's A/B).

    python benchmarks/fa3_ab.py PREV.cu [--name NAME] [--out DIR]

PREV.cu: the other fa3_forward.cu (e.g. `git show HEAD~1:flashlib/cupy_kernels/fa3_forward.cu > /tmp/prev.cu`),
compiled from its own path with the package's headers. At d = 64, 128, 256, N = 4096, 16384, fp16 and bf16, causal
and not, each in the default tiles and variant, rung 7 ('new') and PREV ('prev') are timed with SDPA cuDNN by
`flashlib.bench.timing.compare` (interleaved, host=False); the elements of o whose bits differ between the two and
max |lse_new - lse_prev| are recorded (a change that keeps the arithmetic gives 0 and 0). Saved as NAME (default
fa3_ab_<gpu>) with PREV's sha256.
"""
import argparse
import hashlib
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flashlib import bench  # noqa: E402
from flashlib.cupy_kernels import tma  # noqa: E402


def swapped(call, module, name, make):
    """call with module.name replaced, for each call, by make(the original); put back afterwards (this A/B's and
    bwd_ab.py's way of running another kernel file through the package's own host code)."""
    own = getattr(module, name)

    def fn(*args, **kw):
        setattr(module, name, make(own))
        try:
            return call(*args, **kw)
        finally:
            setattr(module, name, own)
    return fn


def _prev(path):
    """forward_fa3 with rung 7's kernel compiled from `path` instead of the package's fa3_forward.cu."""
    return swapped(tma.forward_fa3, tma, "_launcher", lambda own: (
        lambda device, cfg, file="fa3_forward.cu", sig=tma.SIG_FA3: own(device, cfg, str(path), sig)))


def run(prev_path, max_seconds=3.0):
    import cupy as cp
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from flashlib._arrays import to_cupy
    from flashlib.bench.timing import compare
    prev = _prev(prev_path)
    rows = []
    for d, N, dtype, causal in [(d, N, t, c) for d in tma.FA3_HEAD_DIMS for N in (4096, 16384)
                                for t in ("float16", "bfloat16") for c in (False, True)]:
        H, B = 16, max(1, 16384 // N)
        g = torch.Generator(device="cuda").manual_seed(N + d)
        q, k, v = (torch.randn(B, H, N, d, device="cuda", generator=g).to(getattr(torch, dtype)) for _ in range(3))
        qc, kc, vc = (to_cupy(t) for t in (q, k, v))
        new_fn = lambda: tma.forward_fa3(qc, kc, vc, causal, None)
        prev_fn = lambda: prev(qc, kc, vc, causal, None)
        (o1, l1), (o2, l2) = new_fn(), prev_fn()
        diff = int((o1.view(cp.uint16) != o2.view(cp.uint16)).sum())   # elements whose bits differ
        ldiff = float(cp.abs(l1 - l2).max())
        fns = {"new": new_fn, "prev": prev_fn,
               "sdpa_cudnn": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)}
        stats = compare(fns, host=False, min_rounds=5, max_rounds=15, max_seconds=max_seconds,
                        contexts={"sdpa_cudnn": lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)})
        flops = 4 * B * H * N * N * d * (0.5 if causal else 1.0)
        got = {n: flops / (s["median_ms"] * 1e-3) / 1e12 for n, s in stats.items()}
        rows += [dict(dtype=dtype, d=d, n=N, B=B, H=H, causal=causal, impl=n, ms=s["median_ms"], spread=s["spread"],
                      tflops=got[n], o_elements_differing=diff, max_lse_diff_new_prev=ldiff) for n, s in stats.items()]
        print(f"d={d:3d} N={N:5d} {dtype:8s} causal={causal!s:5s} new {got['new']:5.0f} prev {got['prev']:5.0f} "
              f"(x{got['new'] / got['prev']:.3f}) cudnn {got['sdpa_cudnn']:5.0f} | spread new "
              f"{100 * stats['new']['spread']:.1f}% prev {100 * stats['prev']['spread']:.1f}% | "
              f"o elements differing {diff} "
              f"max lse diff {ldiff:g} | {tma.fa3_config(dtype, d, causal).kernel}", flush=True)
    return rows


def cli(doc, run, prefix, flops, before=None):
    """The command line of an A/B against another kernel file (this one's and bwd_ab.py's): PREV.cu [--name]
    [--out]; before(), then run(PREV's absolute path) -> rows, saved as NAME (default <prefix>_<gpu>) with PREV's
    path and sha256."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("prev", type=pathlib.Path)
    p.add_argument("--name", default=None)
    p.add_argument("--out", default=os.environ.get("FLASHLIB_RESULTS"))
    a = p.parse_args()
    import torch
    if before:
        before()
    rows = run(a.prev.resolve())
    name = a.name or f"{prefix}_{bench.gpu_tag(torch.cuda.get_device_name())}"
    print(bench.save(name, rows, directory=a.out, prev_file=str(a.prev),
                     prev_sha256=hashlib.sha256(a.prev.read_bytes()).hexdigest(), flops=flops,
                     timing="flashlib.bench.timing.compare, host=False"))


def main():
    cli(__doc__, run, "fa3_ab", "4*B*H*N^2*d, half when causal", tma.precompile)


if __name__ == "__main__":
    main()
