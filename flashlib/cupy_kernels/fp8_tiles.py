"""Rung 'fa3_fp8's tile table and configuration (fa3_fp8.cu): pure Python, testable without a GPU.

`fp8_config` maps (head dim, causal, tiles, O's dtype) to the template instance, its tiles, threads and dynamic
shared memory; fp8.py quantises the inputs and launches it.
"""
from collections import namedtuple

from .._arrays import check_causal
from ..constants import SMEM_OPTIN_BYTES

FP8_HEAD_DIMS = (64, 128, 256)
# (Bc keys per K/V tile, ring stages) per head dim; Br = 128 (two consumer warpgroups). Bc is a multiple of 32 (the
# key permutation's chunk) from 64 to 256; V^T's rows of Bc bytes are cut into 128-, 64- or 32-byte swizzled blocks
# (block_bytes). Chosen from record fp8_forward_h200 (benchmarks/fp8_bench.py at f1ca19b, H200, H = 16,
# B = 16384 / N, kernel on pre-quantised inputs; TFLOP/s at N = 4096 / 16384 non-causal, then the same causal):
#   d = 128: Bc 128: 758 / 795, 653 / 760; 160: 746 / 791, 647 / 766; 192: 765 / 820, 662 / 796;
#            224: 771 / 824, 667 / 814 (FlashAttention-3's kBlockN for FP8 at d = 128, hopper/tile_size.h at 0251105)
#   d = 64:  Bc 128: 451 / 483, 390 / 466; 160: 456 / 494, 387 / 477; 192: 465 / 513, 402 / 499;
#            256: 500 / 538, 416 / 517 (rung 7 fp16: 512 / 542, 398 / 489)
# The largest tile is the fastest in every shape, causal or not, so one default per head dim. Bc = 256 at d = 128
# spills (S 128 + O 64 + P 32 registers live at once; FP8_MAX_BC). d = 256 keeps Bc = 64 (O alone is 128
# registers); it is tested, not timed. Ring depth: 3 or 4 stages were within 1 % of 2 at Bc = 128 (the record at
# 2944140, superseded). Not tried yet towards FlashAttention-3's speed: the V transpose inside the kernel, a
# persistent grid, three consumer warpgroups at d = 64, some exp2 on the FMA pipe instead of MUFU.
FP8_TILES = {64: (256, 2), 128: (224, 2), 256: (64, 2)}
FP8_OTHER_TILES = {64: ((128, 2), (192, 2)), 128: ((128, 2), (192, 2)), 256: ((64, 3),)}   # timed beside them
FP8_BC = (64, 128, 160, 192, 224, 256)   # key tiles accepted: multiples of 32 (V^T's key permutation) the GPU checked
FP8_MAX_BC = {64: 256, 128: 224, 256: 64}   # the largest Bc whose S, P and O fit the consumers' 240 registers
FP8_OUT = {"bfloat16": "__nv_bfloat16", "float16": "__half"}
SIG_FP8 = "MMMPPPPPiifii"        # maps of q, k, v^T; o, lse, q/k/v descale; Nq, Nk, scale, BH, G
Fp8Config = namedtuple("Fp8Config", "kernel Br Bc stages threads smem")


def block_bytes(x):
    """Block width (bytes a row, the swizzle's) of a tile row of x bytes, x a multiple of 32: 128 where x is a
    multiple of 128, else 64 where a multiple of 64, else 32 (fa3_fp8.cu's block_bytes)."""
    return 128 if x % 128 == 0 else 64 if x % 64 == 0 else 32


def smem_fp8(d, Bc, stages):
    """Dynamic shared memory of fa3_fp8: 1 KB alignment slack, Q (128 x d bytes), `stages` K and V^T tiles (Bc x d
    bytes each), 2 + 4 stages mbarriers."""
    return 1024 + 128 * d + 2 * stages * Bc * d + 8 * (2 + 4 * stages)


def fp8_config(d, causal, tiles=None, out="bfloat16"):
    """Fp8Config of fa3_fp8 for head dim d in FP8_HEAD_DIMS, tiles (Bc, stages) (default FP8_TILES[d]), O's dtype
    `out` (bfloat16 or float16)."""
    if d not in FP8_HEAD_DIMS:
        raise ValueError(f"fa3_fp8 takes head_dim in {FP8_HEAD_DIMS}, got {d!r}")
    if out not in FP8_OUT:
        raise ValueError(f"fa3_fp8 writes O as bfloat16 or float16, got {out!r}")
    Bc, stages = tuple(tiles) if tiles is not None else FP8_TILES[d]
    if Bc not in FP8_BC or stages < 2 or Bc > FP8_MAX_BC[d]:
        raise ValueError(f"fa3_fp8 takes tiles (Bc, stages): Bc in {FP8_BC} up to {FP8_MAX_BC[d]} at d = {d} "
                         f"(the consumers' 240 registers), stages >= 2; got {tiles}")
    smem = smem_fp8(d, Bc, stages)
    if smem > SMEM_OPTIN_BYTES[90]:
        raise ValueError(f"tiles {tiles} at d = {d} need {smem} bytes of shared memory; Hopper allows "
                         f"{SMEM_OPTIN_BYTES[90]}")
    c = "true" if check_causal(causal) else "false"
    return Fp8Config(f"fa3_fp8<{FP8_OUT[out]}, {d}, {Bc}, {stages}, {c}>", 128, Bc, stages, 384, smem)


def fp8_instances():
    """Kernel name expressions for the compile test: every head dim with its tiles and the other tiles, bf16 O
    (and fp16 O at the default tiles), causal and not."""
    out = [fp8_config(d, c, t, o).kernel for d in FP8_HEAD_DIMS for t in (None,) + FP8_OTHER_TILES[d]
           for c in (False, True) for o in (("bfloat16", "float16") if t is None else ("bfloat16",))]
    return out
