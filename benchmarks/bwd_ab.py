"""The Hopper backward (fa3_backward.cu) as this checkout builds it against another version of the file, in one run.

    python benchmarks/bwd_ab.py PREV.cu [--name NAME] [--out DIR]

PREV.cu: the other fa3_backward.cu, compiled from its own path with the package's headers (fa3_ab.py does the same
for the forward; $BWD_AB_PREV_ARGS, one of PREV_ARGS: PREV takes other parameters, e.g. those before bc7a6a6).
At d = 64, 128 (or $BWD_WGMMA_DIMS, e.g. "64 128 256"), N = 4096, 16384, fp16 and bf16, causal and not, the
backward alone (`cupy_kernels.backward`, rung bwd_wgmma, the default dQ accumulation) of this checkout ('new') and
of PREV ('prev') is timed with SDPA cuDNN's backward by `flashlib.bench.timing.compare` (interleaved, host=False)
at backward FLOPs = 2.5x the forward's. Each row records the elements of dK and dV whose bits differ between the two and max |dQ_new -
dQ_prev| (dQ's additions at the L2 come in no fixed order). Saved as NAME (default bwd_ab_<gpu>) with PREV's sha256.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flashlib import cupy_kernels as ck  # noqa: E402
from flashlib.constants import backward_flops  # noqa: E402


def _prev(path, how=None):
    """cupy_kernels.backward with the bwd_wgmma kernel compiled from `path` instead of the package's file; how:
    None (PREV takes this checkout's parameters) or a key of PREV_ARGS, how PREV's differ."""
    from fa3_ab import swapped      # its sibling script's (this folder is sys.path[0])
    from flashlib.cupy_kernels import launch
    from flashlib.cupy_kernels.build import _kernel_on

    def plan(own):
        def fn(*kw_args, **kw):   # kw_args: dtype, d, causal, device, ...
            p = own(*kw_args, **kw)
            sig, convert = PREV_ARGS.get(how, (ck.config_hopper.SIG_BWD_WGMMA, None))
            k = _kernel_on(kw_args[3], str(path), p.cfg.kernel, p.cfg.smem, p.cfg.arch, sig)
            return p._replace(fn=k if convert is None else _converted(k, convert, p.cfg.D, p.cfg.Br))
        return fn
    return swapped(ck.backward, launch, "backward_plan", plan)


def _pointers(a, D, Br):
    """The parameters before bc7a6a6: pointers to Lb and delta where the (delta; Lb) map is now; found where
    launch.backward puts them for 16-bit inputs (after the fp32 dQ buffer, Nq padded to Br rows a pair, delta first)."""
    qm, km, vm, dom, dqm, _, dq_acc, dk, dv, Nq, Nk, scale, BH, G = a
    delta = dq_acc + 4 * BH * Nq * D
    return (qm, km, vm, dom, dqm, delta + 4 * BH * (-(-Nq // Br) * Br), delta, dq_acc, dk, dv, Nq, Nk, scale, BH, G)


# how PREV's parameters may differ from this checkout's: its signature and the conversion of today's arguments
PREV_ARGS = {"pointers": ("MMMMMPPPPPiifii", _pointers),
             "map_last": ("MMMMMPPPiifiiM", lambda a, D, Br: a[:5] + a[6:] + a[5:6]),   # the (delta; Lb) map last
             "pointers_map": ("MMMMMPPPPPiifiiM", lambda a, D, Br: _pointers(a, D, Br) + a[5:6]),   # and the map
             "pointers_map6": ("MMMMMMPPPPPiifii", lambda a, D, Br: a[:6] + _pointers(a, D, Br)[5:])}   # map 6th


def _converted(k, convert, D, Br):
    return lambda grid, block, args, smem, stream: k(grid, block, convert(args, D, Br), smem, stream)


def run(prev_path, max_seconds=3.0):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from flashlib.bench.timing import compare
    from bwd_wgmma_bench import _dims
    prev = _prev(prev_path, os.environ.get("BWD_AB_PREV_ARGS"))
    rows = []
    for d, N, dtype, causal in [(d, N, t, c) for d in _dims("64 128") for N in (4096, 16384)
                                for t in ("float16", "bfloat16") for c in (False, True)]:
        H, B = 16, max(1, 16384 // N)
        g = torch.Generator(device="cuda").manual_seed(N + d)
        q, k, v, do = (torch.randn(B, H, N, d, device="cuda", generator=g).to(getattr(torch, dtype)) for _ in range(4))
        o, lse = ck.forward(q, k, v, causal=causal, scale=None, dtype=dtype)
        kw = dict(causal=causal, scale=None, dtype=dtype, rung="bwd_wgmma")
        new_fn = lambda: ck.backward(q, k, v, o, lse, do, **kw)
        prev_fn = lambda: prev(q, k, v, o, lse, do, **kw)
        a, b = new_fn(), prev_fn()
        differ = sum(int((x.view(torch.int16) != y.view(torch.int16)).sum()) for x, y in zip(a[1:], b[1:]))
        dq_diff = float((a[0].float() - b[0].float()).abs().max())
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
        fns = {"new": new_fn, "prev": prev_fn,
               "sdpa_cudnn_bwd": lambda: torch.autograd.grad(out, (qg, kg, vg), do, retain_graph=True)}
        stats = compare(fns, host=False, min_rounds=5, max_rounds=15, max_seconds=max_seconds)
        flops = backward_flops(B, H, N, d, causal)
        got = {n: flops / (s["median_ms"] * 1e-3) / 1e12 for n, s in stats.items()}
        rows += [dict(dtype=dtype, d=d, n=N, B=B, H=H, causal=causal, impl=n, ms=s["median_ms"], spread=s["spread"],
                      tflops=got[n], dkdv_elements_differing=differ, max_dq_diff_new_prev=dq_diff)
                 for n, s in stats.items()]
        print(f"d={d:3d} N={N:5d} {dtype:8s} causal={causal!s:5s} new {got['new']:5.0f} prev {got['prev']:5.0f} "
              f"(x{got['new'] / got['prev']:.3f}) cudnn bwd {got['sdpa_cudnn_bwd']:5.0f} | spread new "
              f"{100 * stats['new']['spread']:.1f}% prev {100 * stats['prev']['spread']:.1f}% | dK, dV elements "
              f"differing {differ}, max |dQ diff| {dq_diff:.1e}", flush=True)
    return rows


def main():
    from fa3_ab import cli          # its sibling script's command line
    cli(__doc__, run, "bwd_ab", "backward: 2.5 x 4*B*H*N^2*d, half when causal")


if __name__ == "__main__":
    main()
