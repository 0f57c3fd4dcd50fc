"""Layer 4: FlashAttention in Numba-CUDA, float32 (runs on a GPU, or at small sizes in Numba's CUDA simulator).

The rungs, each a module with a kernel factory and a host launcher taking and returning Numba device arrays:
  matmul      matmul(a, b, kernel="naive" | "tiled"): the tiling chapter
  fa1         fa1_forward: FlashAttention-1 loop order, O, l, m round-trip through global memory
  fa2         fa2_forward: FlashAttention-2 loop order, one thread per query row, readable
  fa2_fast    fa2_forward_fast: FlashAttention-2, register-tiled, warp shuffles on a GPU
  fa2_bwd     fa2_backward: D pre-pass + one block per K/V tile, dQ by atomic adds
  fa2_tc      fa2_forward_tc: FlashAttention-2 forward on Tensor Cores (mma.sync through inline PTX, mma.py),
              float16 / bfloat16, sm_75+ (bf16: sm_80+); a GPU only (the simulator cannot run PTX)

`forward` / `backward` are the backend contract flashlib.attention(..., backend="numba") calls.
"""
from ._common import HEAD_DIMS, MAX_HEAD_DIM, TC_DTYPES, check_dtype, head_bucket, simulated
from .fa2_bwd import fa2_backward
from .fa1 import fa1_forward
from .fa2 import fa2_forward
from .fa2_fast import fa2_forward_fast
from .fa2_tc import fa2_forward_tc
from .matmul import matmul

VARIANTS = {"fa1": fa1_forward, "fa2": fa2_forward, "fa2_fast": fa2_forward_fast}


def forward(q, k, v, *, causal=False, scale=None, dtype="float32", variant=None):
    """(o, lse): o (B, H, Nq, d) in q's dtype and lse (B, H, Nq) float32 Numba device arrays.

    q (B, H, Nq, d), k, v (B, H, Nk, d): Numba device arrays (any strides) of float32 for the variants in VARIANTS
    (default "fa2_fast"), or for variant "tc" (the default for those dtypes) of float16, or bfloat16 as int16/uint16
    bits. In the simulator "fa2_fast" runs its shuffle-free form (row maxima reduced through shared memory) with
    small blocks; "tc" needs a GPU.
    """
    dtype = str(dtype)
    variant = variant or ("tc" if dtype in TC_DTYPES else "fa2_fast")
    if variant != "tc" and variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, tc, got {variant!r}")
    check_dtype(dtype, variant)
    if variant == "tc":
        return fa2_forward_tc(q, k, v, causal=causal, scale=scale, dtype=dtype)
    head_bucket(q.shape[3])
    return VARIANTS[variant](q, k, v, causal=causal, scale=scale)


def backward(q, k, v, o, lse, do, *, causal=False, scale=None, dtype="float32"):
    """(dq, dk, dv) float32 Numba device arrays; shapes as q, k, v. float32 only (no Tensor Core backward here)."""
    check_dtype(dtype)
    head_bucket(q.shape[3])
    return fa2_backward(q, k, v, o, lse, do, causal=causal, scale=scale)


__all__ = ["forward", "backward", "fa2_backward", "fa1_forward", "fa2_forward", "fa2_forward_fast", "fa2_forward_tc",
           "matmul", "VARIANTS",
           "HEAD_DIMS", "MAX_HEAD_DIM", "head_bucket", "simulated"]
