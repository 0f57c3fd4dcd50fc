"""The Hopper rungs' configuration (sm_90a): rung 6 'wgmma' (fa2_wgmma.cu), rung 7 'fa3' (fa3_forward.cu) and the
backward 'bwd_wgmma' (fa3_backward.cu): their tile tables, kernel signatures, shared memory and template instances.
Pure Python, testable without a GPU; config.choose_config dispatches to `fa3_config` and `bwd_wgmma_config`.
"""
from collections import namedtuple

from ..constants import SMEM_OPTIN_BYTES
from .shapes import CTYPE, pair_grid

# files compiled for an architecture-specific target (wgmma, TMA and setmaxnreg exist only in sm_90a code)
ARCH = {"fa2_wgmma.cu": "sm_90a", "fa3_forward.cu": "sm_90a", "fa3_backward.cu": "sm_90a",
        "fa3_timeline.cu": "sm_90a"}

# Rung 6 tiles per head dim, (non-causal, causal), each (warpgroups NWG, keys per tile Bc), Br = 64*NWG: the winners
# among one and two warpgroups on an H200 (logs/wgmma_explore_3_swizzled_h200.txt; tests/test_tuning_records.py).
# Three are refused: 168 registers a thread of 384 make ptxas serialise the wgmma (that sweep timed (3, 64) fastest).
WGMMA_TILES = {64: ((2, 64), (2, 64)), 128: ((2, 128), (2, 128))}
WGMMA_HEAD_DIMS = (64, 128)

# Rung 7 (fa3_forward.cu, FlashAttention-3's TMA and warp specialisation) per head dim, (non-causal, causal): (Bc keys
# per K/V tile, ring stages, consumer warpgroups NCW); 128 (NCW + 1) threads a block (one producer warpgroup), Br = 64
# NCW query rows. d = 64: (128, 2, 3), the winner of the H200 sweep in logs/fa3_gpu_session_h200_dee12ae.txt (fp16,
# N = 16384, ping-pong). d = 128: record fa3_tiles_d128_h200 (fa3_bench.py --tiles at d126e66: fp16 and bf16, N =
# 4096, 8192, 16384, each tile in the default variant; the rule: tests/test_tuning_records.py): without the mask
# FlashAttention-3's 128 x 176 tile (hopper/tile_size.h), 1.05-1.09x the (128, 2, 2) that the first sweep chose, level
# with cuDNN at N >= 8192; with it (128, 3, 2), 1.01-1.04x (FlashAttention-3 keeps Bc = 128 there; Bc = 176 was
# slower than (128, 2, 2) at N = 4096). d = 256: FlashAttention-3's tile (Br = 128, Bc = 80, 2 stages; Q 64 KB, K and
# V 40 KB a stage), timed beside (64, 2, 2) only: 685 and 666 TFLOP/s against 599 and 589 (N = 16384, not causal and
# causal; fa3_ablation_pair_major_h200).
FA3_TILES = {64: ((128, 2, 3),) * 2, 128: ((176, 2, 2), (128, 3, 2)), 256: ((80, 2, 2),) * 2}


def fa3_tiles(d, causal):
    """Rung 7's default tiles (Bc, stages, NCW) at head dim d, with the causal mask or without (FA3_TILES)."""
    return FA3_TILES[d][bool(causal)]


FA3_HEAD_DIMS = (64, 128, 256)
FA3_BC = (64, 80, 128, 176)   # the key tiles fa3_forward compiles (S: m64nBc; wgmma.cuh's Wgmma::ss forms)
# where rung 7 is Hopper's default (default_rung): checked and timed faster than the rung before. d = 256: 628-724
# TFLOP/s against rung 3's 220-233 (fp16, N = 4096, 16384, causal or not; record fa3_ablation_h200), the GPU tests
# passing (logs/fa3_ablation_session_h200_b753eb0.txt; the default path at d = 256: ..._41a1755.txt)
FA3_DEFAULT_HEAD_DIMS = (64, 128, 256)
# other tiles that benchmarks/fa3_bench.py times beside these and the tests check (three consumers: d = 64 only;
# at d = 128 the other mask's default is timed too; (128, 2, 2): the first sweep's tile)
FA3_OTHER_TILES = {64: ((128, 3, 2), (64, 4, 3), (64, 4, 2)), 128: ((128, 2, 2), (64, 3, 2), (128, 3, 2), (176, 2, 2)),
                   256: ((64, 2, 2),)}


def fa3_candidates(d, causal):
    """The tiles timed at (d, causal): the default first, then the others (FA3_OTHER_TILES[d] without it)."""
    return (fa3_tiles(d, causal),) + tuple(t for t in FA3_OTHER_TILES[d] if t != fa3_tiles(d, causal))


# the consumers take turns (PP) or not; "persistent": ping-pong in a grid of one CTA per SM looping over work items in
# a static order (fa3_grid); "dynamic": each next item from a global counter (FlashAttention-3's; tma.counter)
FA3_VARIANTS = ("pingpong", "plain", "persistent", "dynamic")
# the default variant: "dynamic" at these (head dim, causal), else "pingpong" (the grid): where the H200 timed it no
# slower than the grid at either N, and 1.1x at d = 64 with the mask (record fa3_schedulers_h200; the rule and its
# margins: tests/test_tuning_records.py). Not at d = 64 without the mask, nor at d = 256 with it: slower at one N
FA3_DYNAMIC = ((64, True), (128, False), (128, True), (256, False))
SIG_FA3 = "MMMPPiifiiP"   # maps of q, k, v; o, lse; Nq, Nk, scale, BH, G; "dynamic"'s counter (tma.counter; else 0)

# The Hopper backward 'bwd_wgmma' (fa3_backward.cu): Q tiles of Br = 64 rows, one producer warpgroup and two consumer
# warpgroups (384 threads). d = 64 and 128 (fa3_backward): Bc = 128 keys a block, 64 a warpgroup; d = 256
# (fa3_backward_d256): Bc = 64 keys, the warpgroups split d. Other head dims: bwd_tc.
BWD_WGMMA_HEAD_DIMS = (64, 128, 256)
BWD_WGMMA_TILES = {64: (64, 128), 128: (64, 128), 256: (64, 64)}   # d: (Br, Bc), fixed by the kernels
# where it is Hopper's default backward: every bucket. The H200 timed it at 308-392 TFLOP/s at d = 64 and 414-512 at
# d = 128 against bwd_tc's 230-296 and 216-252 (fp16, bf16, N = 4096, 16384, causal or not; record bwd_wgmma_h200,
# logs/bwd_wgmma_gpu_session_h200_505b10e.txt; its first version, 'atomic' below, was not faster at d = 64), and at
# 324-365 at d = 256 against bwd_tc's 119-132 (record bwd_wgmma_d256_h200, logs/bwd_wgmma_d256_session_h200.txt)
BWD_WGMMA_DEFAULT_DIMS = (64, 128, 256)
# how each Q tile's dQ reaches the fp32 buffer: 'tma' (the default), staged in shared memory and added by TMA
# reductions (FlashAttention-3's way at d = 64, 128), or 'atomic', red.global.add.v2.f32 from every thread (its way
# at d = 256; kept for bwd_wgmma_bench.py). At d = 256 'tma' finds room for its staging tiles only with one dO
# buffer; it timed 324-365 TFLOP/s there against 267-291 with atomics (record bwd_wgmma_d256_h200,
# logs/bwd_wgmma_d256_session_h200.txt)
BWD_WGMMA_DQ = ("tma", "atomic")
SIG_BWD_WGMMA = "MMMMMMPPPiifii"   # maps of q, k, v, do, dq_acc, (delta; lb); dq_acc, dk, dv; Nq, Nk, scale, BH, G


def smem_wgmma(d, nwg, Bc):
    """Bytes of dynamic shared memory of fa2_wgmma: the Q tile (64*nwg rows) and two stages of K and V (Bc rows),
    rows of d elements (no padding: the swizzled layout has no bank conflicts), and 1 KB to align them to 1024."""
    return 2 * d * (64 * nwg + 4 * Bc) + 1024


def sw128(r, c, rows):
    """Byte offset of element (r, c) of a 16-bit tile with `rows` rows in the 128-byte-swizzled shared-memory layout
    of rung 6 (fa2_wgmma.cu's sw128, for c a multiple of 8): blocks of 64 columns, rows of 128 bytes, and within each
    8-row atom the 16-byte chunk c//8 % 8 of row r stored at chunk position (c//8 % 8) ^ (r % 8)."""
    return (c // 64) * rows * 128 + r * 128 + ((((c // 8) % 8) ^ (r % 8)) << 4)


def smem_fa3(d, Bc, stages, ncw=2):
    """Bytes of dynamic shared memory of fa3_forward: 1 KB of alignment slack, Q (Br = 64 ncw rows), `stages` K and
    V tiles (Bc rows), rows of d 16-bit values, and the 2 + 4*stages mbarriers (8 bytes each)."""
    return 1024 + 2 * d * (64 * ncw + 2 * stages * Bc) + 8 * (2 + 4 * stages)


# narrow (fa3_forward's NARROW, without the mask, in the persistent grid; asked for: forward_fa3(..., narrow=True)):
# where Nk is not a multiple of Bc, every item's last key tile has the same Nk - (n_tiles - 1) Bc real keys (at N =
# 4096 and Bc = 176: 48); its softmax, P and P V then run over them rounded up to 16 (its S stays Bc wide), one more
# instance per width, the same bits as without it. Not in the grid of one item a CTA: there ptxas spilled at widths
# of 96 or more. Off by default: record fa3_narrow_h200 (fa3_bench.py --narrow at f0ae579: the default tiles and
# variant, fp16 and bf16, N = 1024, 4096, 8192, 16384) timed it faster at every N at no head dim. Narrow against
# full: d = 128 1.006-1.009x at N = 1024 and 8192 but 0.98x at 4096 and 0.97x at 16384, where the tile has only 16
# real keys; d = 256 1.01x at N = 4096 and 8192, 0.98-0.99x at 1024 and 16384. Less work ran slower: the narrow
# instance is another program for ptxas (3064 instructions against 2768 at d = 128), scheduled differently
# throughout, not only in its last tile (tests/test_tuning_records.py ties the default to the record).
Fa3Config = namedtuple("Fa3Config", "kernel Br Bc stages threads smem persistent dynamic narrowable narrow",
                       defaults=(False, False, False, 0))


def fa3_narrow_width(Nk, Bc):
    """The width of the last of ceil(Nk / Bc) key tiles under fa3_forward's NARROW: its keys rounded up to 16, or 0
    (no narrow tile) where that is Bc or there is only one tile."""
    n = -(-Nk // Bc)
    w = -(-(Nk - (n - 1) * Bc) // 16) * 16
    return 0 if n < 2 or w >= Bc else w


def fa3_narrowed(cfg, Nk):
    """cfg for Nk keys: with a narrow last tile (NARROW = fa3_narrow_width) where cfg is narrowable and Nk leaves a
    partial last tile, else cfg itself."""
    w = fa3_narrow_width(Nk, cfg.Bc) if cfg.narrowable and not cfg.narrow else 0
    if not w:
        return cfg
    tail = ("" if cfg.persistent else ", false") + ("" if cfg.dynamic else ", false") + f", {w}>"
    return cfg._replace(kernel=cfg.kernel[:-1] + tail, narrow=w)


def fa3_grid(cfg, Nq, BH, n_sm):
    """Launch grid of rung 7 and of fa3_fp8 (cfg: a Fa3Config or Fp8Config): one CTA per (query tile, pair)
    (pair_grid), or for a persistent cfg min(n_sm, work items) CTAs (one per SM: a CTA's shared memory or registers
    leave room for one), each looping over the work items (tma.cuh's WorkItems)."""
    n_qt = -(-Nq // cfg.Br)
    if cfg.persistent and n_qt * BH >= 2 ** 31:   # the kernel counts work items in int32
        raise ValueError(f"{n_qt} query tiles x {BH} pairs are too many work items for the persistent grid")
    return (max(1, min(n_sm, n_qt * BH)), 1, 1) if cfg.persistent else pair_grid(n_qt, BH)


def fa3_config(dtype, d, causal, tiles=None, variant=None, Nk=None, narrow=False):
    """Fa3Config(kernel name expression, Br, Bc, stages, threads, smem bytes, persistent, dynamic, narrowable,
    narrow) of rung 7 for dtype float16/bfloat16, head dim in FA3_HEAD_DIMS, tiles (Bc, stages[, consumer
    warpgroups]) (default fa3_tiles(d, causal)), variant in FA3_VARIANTS (default: "dynamic" at FA3_DYNAMIC, else
    "pingpong"). narrowable: asked for (narrow), in the persistent grid, without the mask; given Nk, the instance
    for Nk keys (fa3_narrowed; its field narrow: the last tile's width, 0 for none)."""
    if dtype not in ("float16", "bfloat16"):
        raise ValueError(f"rung 7 (fa3_forward) takes float16 or bfloat16, got {dtype!r}")
    if d not in FA3_HEAD_DIMS:
        raise ValueError(f"rung 7 (fa3_forward) takes head_dim in {FA3_HEAD_DIMS}, got {d!r}: use 'tuned'")
    Bc, stages, ncw = (tuple(tiles) + (2,))[:3] if tiles is not None else fa3_tiles(d, causal)
    if Bc not in FA3_BC or stages < 2 or ncw not in (2, 3) or (ncw == 3 and d != 64):
        raise ValueError(f"rung 7 takes tiles (Bc in {FA3_BC}, stages >= 2, consumer warpgroups 2, or 3 at d = 64), "
                         f"got {tiles} at d = {d}")
    smem = smem_fa3(d, Bc, stages, ncw)
    if smem > SMEM_OPTIN_BYTES[90]:
        raise ValueError(f"tiles {tiles} at d = {d} need {smem} bytes of shared memory; Hopper allows "
                         f"{SMEM_OPTIN_BYTES[90]}")
    variant = variant or ("dynamic" if (d, bool(causal)) in FA3_DYNAMIC else "pingpong")
    if variant not in FA3_VARIANTS:
        raise ValueError(f"rung 7 variant must be one of {FA3_VARIANTS}, got {variant!r}")
    c, pp = ("true" if causal else "false"), ("false" if variant == "plain" else "true")
    persist, dynamic = variant in ("persistent", "dynamic"), variant == "dynamic"
    extra = ", true, true" if dynamic else ", true" if persist else ""
    narrowable = bool(narrow) and persist and not causal
    cfg = Fa3Config(f"fa3_forward<{CTYPE[dtype]}, {d}, {Bc}, {stages}, {ncw}, {pp}, {c}{extra}>",
                    64 * ncw, Bc, stages, 128 * (ncw + 1), smem + 8 * dynamic, persist, dynamic, narrowable)
    return cfg if Nk is None else fa3_narrowed(cfg, Nk)


def smem_bwd_wgmma(d, Br=64, Bc=128, dq="tma"):
    """Bytes of dynamic shared memory of fa3_backward (d = 64, 128) or fa3_backward_d256: 1 KB of alignment slack,
    K, V (Bc rows), 2 stages of Q, dO (Br rows; at d = 256 with dq 'tma' one dO buffer), rows of d 16-bit values;
    2 dS^T buffers (Bc x Br, 16-bit), at d = 256 2 P^T buffers too; dq 'tma': a dQ staging tile (Br x 64 fp32) per
    consumer warpgroup; 2 stages of Lb and delta (Br floats) and 5 mbarriers (8 bytes each; 7 with one dO buffer)."""
    staging = 2 * Br * 64 * 4 if dq == "tma" else 0
    buffers = (4 if d == 256 else 2) * 2 * Bc * Br
    do1 = d == 256 and dq == "tma"
    return 1024 + 2 * d * (2 * Bc + (3 if do1 else 4) * Br) + buffers + staging + 4 * 4 * Br + 8 * (7 if do1 else 5)


Fa3BwdConfig = namedtuple("Fa3BwdConfig", "kernel Br Bc threads smem")


def bwd_wgmma_config(dtype, d, causal, dq=None):
    """Fa3BwdConfig(kernel name expression, Br, Bc, threads, smem bytes) of the Hopper backward for dtype
    float16/bfloat16, head dim in BWD_WGMMA_HEAD_DIMS and dQ accumulation `dq`, one of BWD_WGMMA_DQ (None: 'tma')."""
    if dtype not in ("float16", "bfloat16"):
        raise ValueError(f"rung 'bwd_wgmma' (fa3_backward) takes float16 or bfloat16, got {dtype!r}")
    if d not in BWD_WGMMA_HEAD_DIMS:
        raise ValueError(f"rung 'bwd_wgmma' takes head_dim in {BWD_WGMMA_HEAD_DIMS}, got {d!r}: use 'bwd_tc'")
    dq = BWD_WGMMA_DQ[0] if dq is None else dq
    if dq not in BWD_WGMMA_DQ:
        raise ValueError(f"rung 'bwd_wgmma' accumulates dQ by one of {BWD_WGMMA_DQ}, got {dq!r}")
    (Br, Bc), c = BWD_WGMMA_TILES[d], ("true" if causal else "false")
    t = "true" if dq == "tma" else "false"
    kernel = f"fa3_backward_d256<{CTYPE[dtype]}, {c}, {t}>" if d == 256 else f"fa3_backward<{CTYPE[dtype]}, {d}, {c}, {t}>"
    return Fa3BwdConfig(kernel, Br, Bc, 384, smem_bwd_wgmma(d, Br, Bc, dq))


def bwd_wgmma_instances():
    """Kernel name expressions of every fa3_backward instance (dtype x head dim x causal x dQ), for the compile test."""
    return [bwd_wgmma_config(t, d, c, q).kernel for t in ("float16", "bfloat16") for d in BWD_WGMMA_HEAD_DIMS
            for c in (False, True) for q in BWD_WGMMA_DQ]


def fa3_instances(configs=False):
    """Kernel name expressions (configs=True: their Fa3Config) for the compile test: every dtype with the default
    tiles, fp16 with the other tiles (bf16 is the same code), each causal and not, each variant; no name twice."""
    tiles = [(t, d, None) for t in ("float16", "bfloat16") for d in FA3_HEAD_DIMS]
    out = [fa3_config(t, d, c, x, v) for t, d, x in tiles for c in (False, True) for v in FA3_VARIANTS]
    out += [fa3_config("float16", d, c, x, v) for d in FA3_HEAD_DIMS for c in (False, True)
            for x in fa3_candidates(d, c)[1:] for v in FA3_VARIANTS]
    return out if configs else [c.kernel for c in out]
