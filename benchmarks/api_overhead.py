"""Where the time goes between `flashlib.attention(torch tensors)` and the CuPy kernel called directly.

    python benchmarks/api_overhead.py [--out DIR]      # writes api_overhead_h100.json

fp16, d = 64, N = 4096, B = 4, H = 16 (the quick grid's shape). Each row is one step of the API path, timed alone
with CUDA events (GPU time, median) and with the host clock (wall time per call over 50 back-to-back calls).
"""
import argparse
import os
import time


def _wall_ms(fn, n=50):
    import cupy as cp
    fn()
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    cp.cuda.Device().synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def main(out=None, N=4096, d=64, B=4, H=16):
    import torch
    import flashlib
    from flashlib import bench, cupy_kernels as ck
    from flashlib._arrays import like, to_cupy
    q, k, v = (torch.randn(B, H, N, d, device="cuda", dtype=torch.float16) for _ in range(3))
    qc, kc, vc = (to_cupy(t) for t in (q, k, v))
    oc, _ = ck.forward(qc, kc, vc, causal=False, scale=0.125, dtype="float16")
    steps = {
        "kernel via cupy_kernels.forward (CuPy arrays)": lambda: ck.forward(qc, kc, vc, causal=False, scale=0.125,
                                                                           dtype="float16"),
        "flashlib.attention (CuPy arrays)": lambda: flashlib.attention(qc, kc, vc, backend="cupy"),
        "flashlib.attention (torch tensors)": lambda: flashlib.attention(q, k, v, backend="cupy"),
        "to_cupy x3 (torch -> CuPy)": lambda: [to_cupy(t) for t in (q, k, v)],
        "like (CuPy -> torch)": lambda: like(oc, q, "float16"),
        "device_cc()": ck.device_cc,
        "choose_config": lambda: ck.choose_config("float16", d, 90),
    }
    rows = []
    for name, fn in steps.items():
        rows.append(dict(step=name, gpu_ms=bench.time_cuda(fn, warmup=3, repeat=20), wall_ms=_wall_ms(fn)))
        print(f"{name:48s} gpu {rows[-1]['gpu_ms']:8.3f} ms   wall {rows[-1]['wall_ms']:8.3f} ms", flush=True)
    if out:
        print(bench.save("api_overhead_h100", rows, directory=out, N=N, d=d, B=B, H=H, dtype="float16"))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT"))
    main(p.parse_args().out)
