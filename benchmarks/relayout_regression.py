"""Did the re-layout make any kernel slower? An older flashlib, imported as `flashlib_old`, against the current one,
the public kernel calls of both timed interleaved in one run by flashlib.bench.timing.compare.

    mkdir -p OLD && git archive OLD_COMMIT flashlib | tar -x -C OLD && mv OLD/flashlib OLD/flashlib_old
    python benchmarks/relayout_regression.py OLD OLD_COMMIT --out DIR   # -> DIR/relayout_regression_<gpu>.json

Cases: the cupy backend's forward (rung 6 'wgmma', rung 3 'tuned', float32 'fp32') and backward (fp16 'bwd_tc',
float32 'bwd_fp32'), the numba backend's fp16 Tensor Core forward and float32 forward and backward; fp16 unless
named, B = 4, H = 16, N = 2048 (numba float32: N = 1024), d = 64 and 128, causal and not. Each candidate's own
output is checked against the other's before timing (the same kernels must give the same numbers).
"""
import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cases():
    for d in (64, 128):
        for causal in (False, True):
            yield "cupy", "forward", "float16", "wgmma", d, causal, 2048     # rung 6 (the old default on Hopper)
            yield "cupy", "forward", "float16", "tuned", d, causal, 2048
            yield "cupy", "backward", "float16", None, d, causal, 2048
    for causal in (False, True):
        yield "cupy", "forward", "float32", None, 64, causal, 2048
        yield "cupy", "backward", "float32", None, 64, causal, 1024
    yield "numba", "forward", "float16", None, 64, False, 2048
    yield "numba", "forward", "float32", None, 64, False, 1024
    yield "numba", "backward", "float32", None, 64, False, 1024


def calls(pkg, backend, direction, dtype, rung, d, causal, N):
    """A no-argument function launching the case with package `pkg` (flashlib or flashlib_old) on fixed inputs."""
    import cupy as cp
    import numpy as np
    mod = importlib.import_module(f"{pkg}.{backend}_kernels")
    rng = np.random.default_rng(d + N + causal)
    B, H = 4, 16
    arr = lambda: rng.standard_normal((B, H, N, d)).astype(dtype)
    q, k, v, do = (cp.asarray(arr()) for _ in range(4))
    kw = dict(causal=causal, scale=d ** -0.5, dtype=dtype)
    if rung:
        kw["rung"] = rung
    if backend == "numba":
        from numba import cuda
        q, k, v, do = (cuda.as_cuda_array(a) for a in (q, k, v, do))
    o, lse = mod.forward(q, k, v, **kw)
    if direction == "forward":
        return lambda: mod.forward(q, k, v, **kw)
    kb = {key: val for key, val in kw.items() if key != "rung"}
    return lambda: mod.backward(q, k, v, o, lse, do, **kb)


def _f64(a):
    import cupy as cp
    x = cp.asarray(a)
    return cp.asnumpy(x.view(cp.float16) if x.dtype == cp.int16 else x).astype("float64")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old_parent", help="folder holding the old package as flashlib_old/")
    ap.add_argument("old_commit")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    sys.path.insert(0, os.path.abspath(a.old_parent))
    import cupy as cp
    import numpy as np
    from flashlib import bench
    from flashlib.bench.timing import compare
    rows = []
    for case in cases():
        backend, direction, dtype, rung, d, causal, N = case
        fns = {"old": calls("flashlib_old", *case), "new": calls("flashlib", *case)}
        outs = {n: fn() for n, fn in fns.items()}
        diff = max(float(np.abs(_f64(x) - _f64(y)).max() / max(np.abs(_f64(y)).max(), 1e-30))
                   for x, y in zip(outs["old"], outs["new"]))
        same = diff <= 2e-3            # dQ sums by atomics in no fixed order: equal to rounding, not bit for bit
        stats = compare(fns, host=False, max_seconds=4.0)
        ratio = stats["old"]["median_ms"] / stats["new"]["median_ms"]
        row = dict(backend=backend, direction=direction, dtype=dtype, rung=rung or "default", d=d, causal=causal,
                   N=N, old_ms=stats["old"]["median_ms"], new_ms=stats["new"]["median_ms"],
                   old_spread=stats["old"]["spread"], new_spread=stats["new"]["spread"], old_over_new=ratio,
                   max_rel_diff=diff, same_output=bool(same))
        rows.append(row)
        print(f"{backend:5s} {direction:8s} {dtype:8s} {row['rung']:7s} d={d:3d} causal={causal!s:5s} N={N:5d}  "
              f"old {row['old_ms']:.3f} ms  new {row['new_ms']:.3f} ms  old/new {ratio:.3f}  "
              f"diff {diff:.1e}{'' if same else '  OUTPUT DIFFERS'}", flush=True)
    name = f"relayout_regression_{bench.gpu_tag(cp.cuda.runtime.getDeviceProperties(0)['name'].decode())}"
    path = bench.save(name, rows, directory=a.out, old_commit=a.old_commit,
                      method="flashlib.bench.timing.compare, old and new interleaved, median GPU ms per call")
    print("written:", path)


if __name__ == "__main__":
    main()
