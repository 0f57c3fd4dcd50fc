"""Run every Numba kernel once on a few small ragged shapes and compare with the float64 reference.

`python -m flashlib.numba_kernels.selfcheck [--tc]` prints one line per kernel and shape and exits non-zero on a
mismatch; small enough to run under `compute-sanitizer --tool memcheck` / `--tool racecheck`. --tc: the Tensor
Core kernels alone (fa2_tc in float16, the 3xTF32 forward and backward; a GPU of compute capability 8.0+).
"""
import sys

import numpy as np

from .. import reference
from . import fa1_forward, fa2_backward, fa2_forward, fa2_forward_fast, matmul

SHAPES = [(1, 2, 19, 23, 5, False), (1, 1, 70, 45, 64, True), (1, 1, 33, 40, 128, True), (1, 1, 65, 65, 96, False)]


TC_SHAPES = [(1, 2, 19, 23, 64, False), (1, 1, 70, 45, 64, True), (1, 1, 33, 40, 128, True), (1, 1, 65, 97, 96, False)]


def _fwd_err(o, lse, O, L):
    return max(np.abs(o.copy_to_host() - O).max(), np.abs(lse.copy_to_host() - L).max())


def _grad_err(grads, ref):
    """Largest error of dq, dk, dv, relative to each reference gradient's largest entry (at least 1)."""
    return max(np.abs(x.copy_to_host() - r).max() / max(1, np.abs(r).max()) for x, r in zip(grads, ref))


def _report(name, shape, err, tol, note=""):
    """Print one line; 1 if err is not below tol (NaN included), else 0."""
    print(f"{name:14s} {shape} err {err:.2e}{note}")
    return int(not err < tol)


def tensor_cores(rng):
    """fa2_tc (float16, FlashAttention test rule against float16 naive attention's error) and the 3xTF32 forward and
    backward (float32 accuracy) on TC_SHAPES; returns the number of mismatches."""
    from .fa2_bwd_tf32 import fa2_backward_tf32
    from .fa2_tc import fa2_forward_tc
    from .fa2_tf32 import fa2_forward_tf32
    bad = 0
    for B, H, Nq, Nk, d, causal in TC_SHAPES:
        q, k, v = (rng.standard_normal((B, H, n, d)).astype(np.float32) for n in (Nq, Nk, Nk))
        O, L = reference.attention_forward(q, k, v, causal)
        shape = (B, H, Nq, Nk, d, causal)
        bad += _report("fa2_tf32", shape, _fwd_err(*fa2_forward_tf32(q, k, v, causal=causal), O, L), 2e-5)
        do = rng.standard_normal(q.shape).astype(np.float32)
        ref = reference.attention_backward(q, k, v, O, L, do, causal)
        g = fa2_backward_tf32(q, k, v, O.astype(np.float32), L.astype(np.float32), do, causal=causal)
        bad += _report("fa2_bwd_tf32", shape, _grad_err(g, ref), 1e-4)
        h = [x.astype(np.float16) for x in (q, k, v)]
        O16, _ = reference.attention_forward(*h, causal)
        S = np.einsum("bhqd,bhkd->bhqk", *h[:2]).astype(np.float16) * np.float16(d ** -0.5)   # naive, float16
        if causal:
            S[..., np.triu(np.ones((Nq, Nk), bool), 1)] = -np.inf
        P = np.exp(S.astype(np.float32) - S.max(-1, keepdims=True)).astype(np.float16)
        naive = (np.einsum("bhqk,bhkd->bhqd", P, h[2]) / P.astype(np.float32).sum(-1, keepdims=True)).astype(np.float16)
        bound = 2 * np.abs(naive - O16).max() + 1e-3
        err = np.abs(fa2_forward_tc(*h, causal=causal)[0].copy_to_host().astype(np.float64) - O16).max()
        bad += _report("fa2_tc fp16", shape, err, bound, f" (bound {bound:.2e})")
    return bad


def main():
    rng = np.random.default_rng(1)
    if "--tc" in sys.argv[1:]:
        bad = tensor_cores(rng)
        print("selfcheck --tc:", "FAILED" if bad else "all match the reference")
        return 1 if bad else 0
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
            bad += _report(name, (B, H, Nq, Nk, d, causal), _fwd_err(*fn(q, k, v, causal=causal, **kw), O, L), 1e-4)
        do = rng.standard_normal(q.shape).astype(np.float32)
        ref = reference.attention_backward(q, k, v, O, L, do, causal)
        g = fa2_backward(q, k, v, O.astype(np.float32), L.astype(np.float32), do, causal=causal)
        bad += _report("fa2_backward", (B, H, Nq, Nk, d, causal), _grad_err(g, ref), 1e-4)
    print("selfcheck:", "FAILED" if bad else "all match the reference")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
