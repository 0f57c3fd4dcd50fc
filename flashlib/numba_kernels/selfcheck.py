"""Run every Numba kernel once on a few small ragged shapes and compare with the float64 reference.

`python -m flashlib.numba_kernels.selfcheck` prints one line per kernel and shape and exits non-zero on a
mismatch; small enough to run under `compute-sanitizer --tool memcheck` / `--tool racecheck`.
"""
import sys

import numpy as np

from .. import reference
from . import fa1_forward, fa2_backward, fa2_forward, fa2_forward_fast, matmul

SHAPES = [(1, 2, 19, 23, 5, False), (1, 1, 70, 45, 64, True), (1, 1, 33, 40, 128, True), (1, 1, 65, 65, 96, False)]


def main():
    rng = np.random.default_rng(1)
    bad = 0
    a, b = rng.standard_normal((37, 29)).astype(np.float32), rng.standard_normal((29, 41)).astype(np.float32)
    for kernel in ("naive", "tiled"):
        err = np.abs(matmul(a, b, kernel).copy_to_host() - a.astype(np.float64) @ b).max()
        bad += err > 1e-4
        print(f"matmul {kernel:8s} err {err:.2e}")
    for B, H, Nq, Nk, d, causal in SHAPES:
        q, k, v = (rng.standard_normal((B, H, n, d)).astype(np.float32) for n in (Nq, Nk, Nk))
        O, L = reference.attention_forward(q, k, v, causal)
        for name, fn, kw in (("fa1", fa1_forward, {}), ("fa2", fa2_forward, {}), ("fa2_fast", fa2_forward_fast, {}),
                             ("fa2_fast/smem", fa2_forward_fast, {"shuffle": False})):
            o, lse = fn(q, k, v, causal=causal, **kw)
            err = max(np.abs(o.copy_to_host() - O).max(), np.abs(lse.copy_to_host() - L).max())
            bad += not err < 1e-4
            print(f"{name:14s} {(B, H, Nq, Nk, d, causal)} err {err:.2e}")
        do = rng.standard_normal(q.shape).astype(np.float32)
        ref = reference.attention_backward(q, k, v, O, L, do, causal)
        g = fa2_backward(q, k, v, O.astype(np.float32), L.astype(np.float32), do, causal=causal)
        err = max(np.abs(x.copy_to_host() - r).max() / max(1, np.abs(r).max()) for x, r in zip(g, ref))
        bad += not err < 1e-4
        print(f"{'fa2_backward':14s} {(B, H, Nq, Nk, d, causal)} err {err:.2e}")
    print("selfcheck:", "FAILED" if bad else "all match the reference")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
