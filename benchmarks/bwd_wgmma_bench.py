"""The Hopper backward 'bwd_wgmma' (fa3_backward.cu) against 'bwd_tc' (fa2_bwd_tc.cu) and PyTorch's SDPA flash.

    python benchmarks/bwd_wgmma_bench.py [--check] [--time] [--sanitize] [--out DIR]

--check: one line per (dtype, d, causal, shape): the errors of dq, dk, dv against the float64 reference and the
FlashAttention bound (3x naive attention's error in the same precision + atol), and where a failing one sits.
--time: at d = 64, 128 (or the head dims in $BWD_WGMMA_DIMS, e.g. "256": record bwd_wgmma_d256_<gpu>), N = 4096,
16384 (B = 16384 // N, H = 16), fp16 and bf16, causal and not, timed together by `flashlib.bench.timing.compare`: the backward alone (bwd_wgmma; bwd_wgmma_atomic, its first version, which adds dQ
with atomics; bwd_tc: `cupy_kernels.backward` with the forward's
o, lse; SDPA flash: torch.autograd.grad of its output) at backward FLOPs = 2.5x the forward's, and forward +
backward (rung 7 forward + each backward; SDPA flash's and, where it runs the shape, cuDNN's forward + backward) at 3.5x (flashlib.constants). Saved through
`flashlib.bench.save`. --sanitize: one small ragged call per instance (for compute-sanitizer). Neither: check, time.
"""
import os
import sys
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flashlib import bench  # noqa: E402
from flashlib import cupy_kernels as ck  # noqa: E402
from flashlib.constants import attention_flops, backward_flops  # noqa: E402

ATOL = {"float16": 1e-4, "bfloat16": 5e-4}
KINDS = [(t, d) for t in ("float16", "bfloat16") for d in ck.BWD_WGMMA_HEAD_DIMS]
CHECKS = [(1, 2, 2, 1, 1), (1, 2, 2, 97, 113), (2, 3, 3, 128, 128), (1, 2, 2, 1023, 257), (1, 4, 4, 300, 700),
          (1, 4, 2, 97, 113)]   # (B, H, H_kv, Nq, Nk)


def _dims(default="64 128 256"):
    """The head dims to run: $BWD_WGMMA_DIMS (e.g. "256"), else `default`."""
    return tuple(int(x) for x in os.environ.get("BWD_WGMMA_DIMS", default).split())


def _inputs(B, H, Hkv, Nq, Nk, d, dtype, seed=0, grad=False):
    import torch
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda h, n: torch.randn(B, h, n, d, device="cuda", generator=g).to(getattr(torch, dtype)).requires_grad_(grad)
    return mk(H, Nq), mk(Hkv, Nk), mk(Hkv, Nk), mk(H, Nq).detach()


def precompile(dims=ck.BWD_WGMMA_HEAD_DIMS):
    import concurrent.futures
    import time
    t = time.time()
    kinds = [(t_, d, c) for t_, d in KINDS if d in dims for c in (False, True)]
    jobs = [(x, r, t_) for x in kinds for r, t_ in (("bwd_wgmma", None), ("bwd_wgmma", ("atomic",)), ("bwd_tc", None))]
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda j: ck.backward_plan(*j[0], 0, j[1], j[2]), jobs))
        list(ex.map(lambda x: ck.forward_plan(*x, 0, None, None), kinds))
    print(f"compiled in {time.time() - t:.1f} s", flush=True)


def _where_bad(err, bound):
    bad = np.argwhere(err > bound)
    rows = sorted({int(r[2]) for r in bad})
    return (f" bad rows {len(rows)}/{err.shape[2]} first {rows[:6]} heads {sorted({int(r[1]) for r in bad})[:4]} "
            f"cols {sorted({int(r[3]) for r in bad})[:6]} nan {int(np.isnan(err).sum())}")


def check():
    import torch
    from tests.test_cupy_kernels import _gqa_naive, _gqa_reference
    dims = _dims()
    precompile(dims)
    fails = 0
    for (dtype, d), causal, (B, H, Hkv, Nq, Nk) in [(k, c, s) for k in KINDS if k[1] in dims for c in (False, True)
                                                    for s in CHECKS]:
        scale = d ** -0.5
        q, k, v, do = _inputs(B, H, Hkv, Nq, Nk, d, dtype, zlib.crc32(repr((B, H, Nq, Nk, d)).encode()))
        ref = _gqa_reference(q, k, v, do, causal, scale)
        naive = _gqa_naive(q, k, v, do, causal, scale)
        where = f"{dtype} d={d} causal={causal!s:5s} (B,H,Hkv,Nq,Nk)={(B, H, Hkv, Nq, Nk)}"
        try:
            o, lse = ck.forward(q, k, v, causal=causal, scale=scale, dtype=dtype)
            grads = ck.backward(q, k, v, o, lse, do, causal=causal, scale=scale, dtype=dtype, rung="bwd_wgmma")
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 (report and go on: one run on the GPU)
            print(f"ERROR {where}: {e!r}", flush=True)
            fails += 1
            continue
        text, ok = "", True
        for i, (name, got) in enumerate(zip(("dq", "dk", "dv"), grads)):
            err = np.nan_to_num(np.abs(got.double().cpu().numpy() - ref[2 + i]), nan=np.inf)
            bound = 3 * float(np.abs(naive[1 + i].double().cpu().numpy() - ref[2 + i]).max()) + ATOL[dtype]
            text += f" {name} {err.max():.1e}/{bound:.1e}"
            if err.max() > bound:
                ok = False
                text += _where_bad(err, bound)
        fails += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {where}:{text}", flush=True)
    print(f"check: {fails} failures", flush=True)
    return fails


def _time_shape(d, N, dtype, causal, max_seconds):
    import torch
    from flashlib.bench.timing import compare
    from torch.nn.attention import SDPBackend, sdpa_kernel
    H, B = 16, max(1, 16384 // N)
    scale = d ** -0.5
    q, k, v, do = _inputs(B, H, H, N, N, d, dtype, grad=True)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    o, lse = ck.forward(qd, kd, vd, causal=causal, scale=scale, dtype=dtype)
    bwd = lambda r, t=None: (lambda: ck.backward(qd, kd, vd, o, lse, do, causal=causal, scale=scale, dtype=dtype,
                                                 rung=r, tiles=t))

    def fwd_bwd(r):
        def f():
            o_, lse_ = ck.forward(qd, kd, vd, causal=causal, scale=scale, dtype=dtype)
            return ck.backward(qd, kd, vd, o_, lse_, do, causal=causal, scale=scale, dtype=dtype, rung=r)
        return f
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = sdpa(q, k, v, is_causal=causal, scale=scale)
    flash_grads = torch.autograd.grad(out, (q, k, v), do, retain_graph=True)

    def sdpa_fwd_bwd():
        o_ = sdpa(q, k, v, is_causal=causal, scale=scale)
        return torch.autograd.grad(o_, (q, k, v), do)
    fns = {"bwd_wgmma": bwd("bwd_wgmma"), "bwd_wgmma_atomic": bwd("bwd_wgmma", ("atomic",)), "bwd_tc": bwd("bwd_tc"),
           "sdpa_flash_bwd": lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True),
           "fwdbwd_fa3+bwd_wgmma": fwd_bwd("bwd_wgmma"), "fwdbwd_fa3+bwd_tc": fwd_bwd("bwd_tc"),
           "fwdbwd_sdpa_flash": sdpa_fwd_bwd}
    errs = {}
    for r in ("bwd_wgmma", "bwd_wgmma_atomic", "bwd_tc"):
        g = fns[r]()
        errs[r] = max(float((a.float() - b.float()).abs().max()) for a, b in zip(g, flash_grads))
    contexts = {"fwdbwd_sdpa_flash": lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)}
    try:   # cuDNN's SDPA, where this torch and GPU run the shape
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            sdpa_fwd_bwd()
        fns["fwdbwd_sdpa_cudnn"] = sdpa_fwd_bwd
        contexts["fwdbwd_sdpa_cudnn"] = lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)
    except RuntimeError as e:
        print(f"cuDNN SDPA skipped at d={d} N={N} {dtype} causal={causal}: {str(e).splitlines()[0][:120]}", flush=True)
    stats = compare(fns, host=False, min_rounds=5, max_rounds=12, max_seconds=max_seconds, contexts=contexts)
    rows = []
    for name, st in stats.items():
        fl = attention_flops(B, H, N, d, causal, backward=True) if name.startswith("fwdbwd") else \
            backward_flops(B, H, N, d, causal)
        rows.append(dict(dtype=dtype, d=d, n=N, B=B, H=H, causal=causal, impl=name, ms=st["median_ms"],
                         spread=st["spread"], tflops=fl / (st["median_ms"] * 1e-3) / 1e12,
                         max_err_vs_flash=errs.get(name)))
    t = {r["impl"]: r["tflops"] for r in rows}
    print(f"d={d:3d} N={N:5d} {dtype:8s} causal={causal!s:5s} bwd TFLOP/s: wgmma {t['bwd_wgmma']:5.0f} atomic "
          f"{t['bwd_wgmma_atomic']:5.0f} tc "
          f"{t['bwd_tc']:5.0f} flash {t['sdpa_flash_bwd']:5.0f} | fwd+bwd: fa3+wgmma {t['fwdbwd_fa3+bwd_wgmma']:5.0f} "
          f"fa3+tc {t['fwdbwd_fa3+bwd_tc']:5.0f} flash {t['fwdbwd_sdpa_flash']:5.0f} "
          f"(x{t['fwdbwd_fa3+bwd_wgmma'] / t['fwdbwd_sdpa_flash']:.2f} vs flash) cudnn "
          f"{t.get('fwdbwd_sdpa_cudnn', float('nan')):5.0f} | max|d - flash| wgmma "
          f"{errs['bwd_wgmma']:.1e} tc {errs['bwd_tc']:.1e}", flush=True)
    return rows


def time_all(out, max_seconds=2.5):
    import torch
    dims = _dims("64 128")
    precompile(dims)
    rows = []
    for d, N, dtype, causal in [(d, N, t, c) for d in dims for N in (4096, 16384) for t in ("float16", "bfloat16")
                                for c in (False, True)]:
        rows += _time_shape(d, N, dtype, causal, max_seconds)
    tag = bench.gpu_tag(torch.cuda.get_device_name())
    name = "bwd_wgmma" if dims == (64, 128) else "bwd_wgmma_d" + "_".join(map(str, dims))
    return bench.save(f"{name}_{tag}", rows, directory=out, tiles=ck.config_hopper.BWD_WGMMA_TILES,
                      flops="backward 2.5x, forward + backward 3.5x of 4*B*H*N^2*d, half when causal",
                      timing="flashlib.bench.timing.compare, host=False")


def sanitize():
    """Two small ragged calls per instance (each dQ accumulation), CuPy only (for compute-sanitizer): GQA, Nq != Nk;
    the second with 11 Q tiles, so that every stage and dS^T buffer is reused several times."""
    import cupy as cp
    rng = cp.random.default_rng(0)

    def arr(shape, dtype):
        x = rng.standard_normal(shape, dtype=cp.float32)
        return x.astype(cp.float16) if dtype == "float16" else (x.view(cp.uint32) >> 16).astype(cp.uint16).view(cp.int16)
    dims = _dims()
    for (dtype, d), causal, (B, H, Hkv, Nq, Nk) in [(k, c, s) for k in KINDS if k[1] in dims for c in (False, True)
                                                    for s in ((1, 4, 2, 97, 200), (1, 2, 2, 700, 300))]:
        q, k, v, do = arr((B, H, Nq, d), dtype), arr((B, Hkv, Nk, d), dtype), arr((B, Hkv, Nk, d), dtype), arr((B, H, Nq, d), dtype)
        o, lse = ck.forward(q, k, v, causal=causal, scale=None, dtype=dtype)
        for dq_way in ck.config_hopper.BWD_WGMMA_DQ:
            ck.backward(q, k, v, o, lse, do, causal=causal, scale=None, dtype=dtype, rung="bwd_wgmma", tiles=(dq_way,))
            cp.cuda.Device().synchronize()
        print(f"sanitize {dtype} d={d} causal={causal} Nq={Nq} Nk={Nk}: done", flush=True)


def main():
    from fa3_bench import cli          # its sibling script's command line (this folder is sys.path[0])
    cli(__doc__, check, time_all, sanitize)


if __name__ == "__main__":
    main()
