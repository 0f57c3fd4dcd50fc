"""FlashAttention in Numba-CUDA, float32 (runs on a GPU, or at small sizes in Numba's CUDA simulator).

The rungs, each a module with a kernel factory, its tiles and a host launcher taking and returning Numba device
arrays (siblings: none imports another's kernel, fa2_bwd_tf32 reuses fa2_bwd's delta pre-pass):
  matmul      matmul(a, b, kernel="naive" | "tiled"): the tiling chapter
  fa1         fa1_forward: FlashAttention-1 loop order, O, l, m round-trip through global memory
  fa2         fa2_forward: FlashAttention-2 loop order, one thread per query row, readable
  fa2_fast    fa2_forward_fast: FlashAttention-2, register-tiled, warp shuffles on a GPU
  fa2_bwd     fa2_backward: delta = rowsum(dO * O) pre-pass + one block per K/V tile, dQ by atomic adds
  fa2_bwd_tf32 fa2_backward_tf32: the same on Tensor Cores in float32 accuracy (3xTF32), sm_80+, a GPU only
  fa2_tc      fa2_forward_tc: FlashAttention-2 forward on Tensor Cores (mma.sync through inline PTX),
              float16 / bfloat16, sm_75+ (bf16: sm_80+); a GPU only (the simulator cannot run PTX)
  fa2_wgmma   fa2_forward_wgmma: the same on Hopper's warpgroup MMA (wgmma.mma_async, B read from swizzled shared
              memory by descriptor): CuPy rung 6 in Numba; fp16 / bf16, sm_90 only (variant "wgmma")
  fa2_tf32    fa2_forward_tf32: float32 FlashAttention-2 forward on TF32 Tensor Cores, 3xTF32 (float32 accuracy),
              sm_80+, head dims 32, 64, 96, 128: variant "tf32x3", the float32 default on such GPUs
What the kernels share, one module each:
  host        argument checks, head-dim buckets, device arrays (contiguous, padded, new outputs, views), compute
              capability, launches, the grouped-query sum of dK, dV; float32 forms of flashlib.constants
  mma         inline-PTX intrinsics (mma.sync, ldmatrix, cp.async, the 3xTF32 split, ...) for the Tensor Core kernels
  wgmma       inline-PTX intrinsics of Hopper's wgmma (fences, descriptors, m64nNk16) for fa2_wgmma (sm_90a)
  lanes       what each lane holds: fragment layouts, the kernels' index maps, a NumPy warp model (no Numba)
  warp        device code fa2_tc and fa2_tf32 share (the online-softmax step), compiled inline
  ptx         cuda.compile_ptx + ptxas -v of every kernel without a GPU: `python -m flashlib.numba_kernels.ptx`
  selfcheck   every kernel once against the float64 reference (small enough for compute-sanitizer)

`forward` / `backward` are the backend contract flashlib.attention(..., backend="numba") calls.
"""
from ..env import simulated
from .host import (HEAD_DIMS, MAX_HEAD_DIM, TC_DTYPES, TF32_HEAD_DIMS, check_causal, check_dtype, check_scale,
                   device_cc, head_bucket)
from .fa2_bwd import fa2_backward
from .fa1 import fa1_forward
from .fa2 import fa2_forward
from .fa2_fast import fa2_forward_fast
from .fa2_tc import fa2_forward_tc
from .fa2_tf32 import fa2_forward_tf32
from .fa2_wgmma import fa2_forward_wgmma
from .matmul import matmul

GQA = ("forward", "backward")   # every variant takes k, v with fewer heads than q (flashlib.api reads this)
VARIANTS = {"fa1": fa1_forward, "fa2": fa2_forward, "fa2_fast": fa2_forward_fast}


def default_variant(dtype, d, cc):
    """'tc' for 16-bit dtypes; float32: 'tf32x3' on compute capability cc >= 8.0 (a tuple; None in the simulator)
    for its head dims, else 'fa2_fast'."""
    if str(dtype) in TC_DTYPES:
        return "tc"
    return "tf32x3" if cc is not None and tuple(cc) >= (8, 0) and d in TF32_HEAD_DIMS else "fa2_fast"


def forward(q, k, v, *, causal=False, scale=None, dtype="float32", variant=None):
    """(o, lse): o (B, H, Nq, d) in q's dtype and lse (B, H, Nq) float32 Numba device arrays.

    q (B, H, Nq, d), k, v (B, H_kv, Nk, d) with H_kv dividing H (grouped-query attention: query head h uses kv head
    h // (H // H_kv)), d in 1 ... 256: Numba device arrays (any strides) of float32 for the variants in VARIANTS
    or "tf32x3" (float32 default on sm_80+ for head dims 32, 64, 96, 128; else "fa2_fast"), or for variant "tc"
    (the default for those dtypes) or "wgmma" (Hopper only, d up to 128) of float16, or bfloat16 as int16/uint16
    bits. In the simulator "fa2_fast" runs its shuffle-free form (row maxima reduced through shared memory) with
    small blocks; "tc", "wgmma", "tf32x3" need a GPU.
    """
    causal, scale = check_causal(causal), check_scale(scale, q.shape[3])
    dtype = str(dtype)
    if variant is None:
        cc = None if simulated() else device_cc()
        variant = default_variant(dtype, q.shape[3], cc)
    if variant not in ("tc", "wgmma", "tf32x3") and variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, tc, wgmma, tf32x3, got {variant!r}")
    check_dtype(dtype, variant)
    if variant == "tc":
        return fa2_forward_tc(q, k, v, causal=causal, scale=scale, dtype=dtype)
    if variant == "wgmma":
        return fa2_forward_wgmma(q, k, v, causal=causal, scale=scale, dtype=dtype)
    if variant == "tf32x3":
        return fa2_forward_tf32(q, k, v, causal=causal, scale=scale)
    head_bucket(q.shape[3])
    return VARIANTS[variant](q, k, v, causal=causal, scale=scale)


def backward(q, k, v, o, lse, do, *, causal=False, scale=None, dtype="float32"):
    """(dq, dk, dv) float32 Numba device arrays; shapes as q, k, v (dk, dv summed over the query heads that share a kv
    head). float32 only. On sm_80+ GPUs with head dim in
    TF32_HEAD_DIMS: the 3xTF32 Tensor Core backward (fa2_bwd_tf32); else (sm_75, the simulator, other
    head dims) fa2_backward on CUDA cores."""
    causal, scale = check_causal(causal), check_scale(scale, q.shape[3])
    check_dtype(dtype)
    head_bucket(q.shape[3])
    if not simulated():
        from . import fa2_bwd_tf32                  # imported here: it needs a GPU to be of use
        if fa2_bwd_tf32.fits(q.shape[3]):
            return fa2_bwd_tf32.fa2_backward_tf32(q, k, v, o, lse, do, causal=causal, scale=scale)
    return fa2_backward(q, k, v, o, lse, do, causal=causal, scale=scale)


__all__ = ["forward", "backward", "default_variant", "fa2_backward", "fa1_forward", "fa2_forward", "fa2_forward_fast",
           "fa2_forward_tc", "fa2_forward_tf32", "fa2_forward_wgmma",
           "matmul", "VARIANTS",
           "HEAD_DIMS", "MAX_HEAD_DIM", "TF32_HEAD_DIMS", "head_bucket", "simulated"]
