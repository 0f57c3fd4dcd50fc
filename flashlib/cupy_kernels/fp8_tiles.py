"""Rung 'fa3_fp8's tile table and configuration (fa3_fp8.cu): pure Python, testable without a GPU.

`fp8_config` maps (head dim, causal, tiles, O's dtype) to the template instance, its tiles, threads and dynamic
shared memory; fp8.py quantises the inputs and launches it.
"""
from collections import namedtuple

from .._arrays import check_causal
from ..constants import SMEM_OPTIN_BYTES

FP8_HEAD_DIMS = (64, 128, 256)
# (Bc keys per K/V tile, ring stages, emu) per head dim; Br = 64 query rows a consumer warpgroup (FP8_CONSUMERS). Bc
# is a multiple of 32 (the key permutation's chunk) from 64 to 256; V^T's rows of Bc bytes are cut into 128-, 64- or
# 32-byte swizzled blocks (block_bytes). emu: of each 16 exponentials of the softmax, how many exp2_fma computes on
# the FMA pipe rather than MUFU (flash_common.cuh). Tiles from record fp8_forward_h200 (benchmarks/fp8_bench.py;
# f1ca19b first): the largest Bc that fits was the fastest at every shape, causal or not (d = 128: 224 against 128,
# 160, 192; d = 64: 256 against 128, 160, 192); Bc = 256 at d = 128 spills (FP8_MAX_BC); 3 or 4 stages were within 1 %
# of 2. d = 256: Bc = 128, FlashAttention-3's tile, from the d = 256 sweep (fp8_bench.py --sweep 256; first at
# d9c787c, logs/fp8_narrow_d256_tiles_h200_d9c787c.txt, TFLOP/s at N = 4096 / 16384): (128, 2, 1) persistent 1174 /
# 1171 without the mask, plain 984 / 1161 with it, against (64, 2, 0)'s 954 / 922 and 847 / 984 (the earlier default:
# a 64-key tile was thought the only one to fit beside O's 128 registers; ptxas fits 96 and 128); Bc = 96 gave
# 881-1093; the record fp8_sweep_d256_h200 is the run at the new default. d = 64: (160, 2, 1) with three consumer
# warpgroups (FP8_CONSUMERS), from record fp8_sweep_d64_h200 (fp8_bench.py --sweep 64 at 1032231; a first run,
# logs/fp8_sweep_d64_h200_4fd1f14.txt, agrees): persistent 592 / 644 without the mask, plain 447 / 590 with it,
# against two consumers' (256, 2, 1) at 516 / 549 persistent and 427 / 534 plain (fp8_forward_h200); 128 keys lead on
# the plain grid by under 2 % without the mask and trail on the persistent one. emu from record fp8_emu_h200
# (fp8_bench.py --emu at 921a671, two consumers at d = 64; TFLOP/s at N = 4096 / 16384): d = 128: emu 2 the fastest
# causal (740 / 908, emu 0 670 / 818) and within 0.5 % of emu 1 without the mask (869 / 922, emu 0 768 / 805); d = 64:
# emu 1 the fastest at every shape, 4-6 % above emu 0. More than 2 of 16 was slower again: the FMA pipe's extra
# instructions then cost issue slots.
FP8_TILES = {64: (160, 2, 1), 128: (224, 2, 2), 256: (128, 2, 1)}
# persist (a fourth tile entry): fa3_fp8's PERSIST instance, a grid of one CTA per SM over the (query tile, pair)
# items in rung 7's static order (tma.cuh's WorkItems, config_hopper.fa3_grid). The default per head dim,
# (not causal, causal): where record fp8_persist_h200 (fp8_bench.py --persist at 485380b; d = 64 and 256: the
# sweeps' records) timed it faster at both N = 4096 and 16384: d = 64 and 256 without the mask. At 485380b,
# TFLOP/s, persistent against not, N = 4096 / 16384: d = 128 887 / 949 against 882 / 954, causal 744 / 883 against
# 735 / 939; d = 64 (two consumers, Bc = 256) 517 / 547 against 515 / 555, causal 451 / 510 against 428 / 535. (Causal
# over groups of pairs, for L2, was slower still: logs/persist_h200_d82ceff.txt.) d = 256, from fp8_sweep_d256_h200:
# without the mask, 939 / 970 against 919 / 965 (an earlier run, logs/fp8_sweep_d256_h200_51cd13b.txt: 944 / 959
# against 927 / 948); causal 782 / 889 against 810 / 967. At (128, 2, 1), in d9c787c's sweep: 1174 / 1171 against
# 1126 / 1119, causal 942 / 1093 against 984 / 1161. d = 64 with three consumers, from fp8_sweep_d64_h200: 592 / 644
# against 554 / 622, causal 481 / 579 against 447 / 590.
FP8_PERSIST = {64: (True, False), 128: (False, False), 256: (True, False)}
# trim (a fifth entry): fa3_fp8's TRIM instance, which walks an item's key tiles from the last down (as
# FlashAttention-3 does), so that the partial tile (ragged Nk, or the causal diagonal) comes first, and runs its S,
# softmax and P V over only the keys the warpgroup's rows see there, rounded up to 32 (fa3_fp8.cu's at_width). Not
# with persist (ptxas then serialises the wgmma at d = 128). The default per head dim, (not causal, causal): where
# record fp8_trim_h200 (fp8_bench.py --trim at 5e16e6e) timed it faster, beyond both spreads, at N = 4096, 8192 and
# 16384: nowhere. TFLOP/s, trim against not, N = 4096 / 16384: d = 128 862 / 902 against 885 / 938, causal 687 / 833
# against 733 / 869; d = 64 514 / 564 against 514 / 559, causal 431 / 540 against 430 / 539. d = 256: not timed.
FP8_TRIM = {64: (False, False), 128: (False, False), 256: (False, False)}
# narrow (a sixth entry, not with the mask, nor with persist (ptxas then serialises the wgmma at d = 128) or trim):
# the key tiles in order, and the last one, partial where Nk is not a multiple of Bc, has its softmax and P V over
# its keys rounded up to 32 (fa3_fp8.cu's NARROW template argument: one more instance per width, chosen from Nk;
# its S stays Bc wide: a narrower S made ptxas serialise the wgmma), giving the same bits as without it. The default
# per head dim, (not causal, causal), applied where fp8_config is given Nk: on where record fp8_narrow_h200
# (fp8_bench.py --narrow at d9c787c; N = 4096, 8192, 16384) timed it faster beyond both spreads at one length and
# slower beyond them at none: d = 128, 888 -> 907 TFLOP/s at N = 4096 (4096 = 18 x 224 + 64), 958 -> 959 and
# 973 -> 970 (within the spreads) at 8192 and 16384; d = 64 (Bc = 256 divides all three): the same kernel;
# d = 256: not timed.
FP8_NARROW = {64: (False, False), 128: (True, False), 256: (False, False)}
# consumers (a seventh entry): two consumer warpgroups (Br = 128 query rows) or three (Br = 192, 160 registers each
# rather than 240: d = 64 only, Bc up to FP8_MAX_BC3; FlashAttention-3's FP8 tile at d = 64 is 192 x 160,
# hopper/tile_size.h). The default per head dim: three at d = 64 (record fp8_sweep_d64_h200, FP8_TILES' comment).
FP8_CONSUMERS = {64: 3, 128: 2, 256: 2}
FP8_MAX_BC3 = {64: 160}   # ptxas -v: none spilled at 96-160 keys; 192 spilled 208 bytes; 224 failed to assemble
FP8_OTHER_TILES = {64: ((160, 2, 0, False, False, False, 3), (128, 2, 0), (256, 2, 1),
                        (128, 2, 1, False, False, False, 3)),
                   128: ((224, 2, 0), (128, 2, 0), (192, 2, 0)),
                   256: ((64, 3, 0), (128, 2, 0), (96, 2, 0))}   # timed beside them
FP8_EMU = {64: (0, 1, 2, 4, 6), 128: (0, 1, 2, 3, 4)}   # the shares fp8_bench.py --emu times at the default Bc
FP8_BC = (64, 96, 128, 160, 192, 224, 256)   # key tiles accepted: multiples of 32 (V^T's key permutation) the GPU checked
# the largest Bc whose S, P and O fit the consumers' 240 registers: ptxas -v (CUDA 13.0, sm_90a) spills 144-160
# bytes at d = 128, Bc = 256 and 160-176 at d = 256, Bc = 160; none at d = 256, Bc = 128 (FlashAttention-3's FP8
# tile there, hopper/tile_size.h: 128 x 128)
FP8_MAX_BC = {64: 256, 128: 224, 256: 128}
FP8_OUT = {"bfloat16": "__nv_bfloat16", "float16": "__half"}
SIG_FP8 = "MMMPPPPPiifii"        # maps of q, k, v^T; o, lse, q/k/v descale; Nq, Nk, scale, BH, G
Fp8Config = namedtuple("Fp8Config", "kernel Br Bc stages threads smem persistent trim narrow",
                       defaults=(False, False, 0))
TILE_DEFAULTS = (0, False, False, False, 2)   # emu, persist, trim, narrow, consumers where a tiles tuple leaves them out


def full_tiles(tiles):
    """(Bc, stages, emu, persist, trim, narrow, consumers) of a tiles tuple of 2 to 7 entries, the missing ones from
    TILE_DEFAULTS (None where the tuple has fewer than 2 or more than 7 entries)."""
    t = tuple(tiles)
    return t + TILE_DEFAULTS[len(t) - 2:] if 2 <= len(t) <= 7 else None


def block_bytes(x):
    """Block width (bytes a row, the swizzle's) of a tile row of x bytes, x a multiple of 32: 128 where x is a
    multiple of 128, else 64 where a multiple of 64, else 32 (fa3_fp8.cu's block_bytes)."""
    return 128 if x % 128 == 0 else 64 if x % 64 == 0 else 32


def smem_fp8(d, Bc, stages, ncw=2):
    """Dynamic shared memory of fa3_fp8: 1 KB alignment slack, Q (Br = 64 ncw rows x d bytes), `stages` K and V^T
    tiles (Bc x d bytes each), 2 + 4 stages mbarriers."""
    return 1024 + 64 * ncw * d + 2 * stages * Bc * d + 8 * (2 + 4 * stages)


def tile_name(tiles):
    """The benchmark's name of fa3_fp8 at tiles (Bc, stages[, emu[, persist[, trim[, narrow[, consumers]]]]]):
    'fa3_fp8_224x2', with 'e2' added if emu > 0, 'p' if persistent, 't' if trimmed, 'n' if narrow and 'w3' with
    three consumer warpgroups."""
    t = full_tiles(tiles)
    return (f"fa3_fp8_{t[0]}x{t[1]}" + (f"e{t[2]}" if t[2] else "") + ("p" if t[3] is True else "") +
            ("t" if t[4] is True else "") + ("n" if t[5] is True else "") + (f"w{t[6]}" if t[6] != 2 else ""))


def narrow_width(Nk, Bc):
    """The width fa3_fp8's NARROW gives the last of the ceil(Nk / Bc) key tiles: its Nk - (tiles - 1) Bc keys
    rounded up to 32, or 0 (no narrow tile) where that is Bc."""
    w = -(-(Nk - (-(-Nk // Bc) - 1) * Bc) // 32) * 32
    return 0 if w >= Bc else w


def fp8_config(d, causal, tiles=None, out="bfloat16", Nk=None):
    """Fp8Config of fa3_fp8 for head dim d in FP8_HEAD_DIMS, tiles (Bc, stages[, emu[, persist[, trim[, narrow[,
    consumers]]]]]), the missing entries emu 0, not persistent, not trimmed, not narrow, two consumer warpgroups
    (default: FP8_TILES[d] with FP8_PERSIST[d][causal], FP8_TRIM[d][causal], FP8_NARROW[d][causal] where Nk is
    given, and FP8_CONSUMERS[d]), O's dtype `out` (bfloat16 or float16); Nk, the number of keys, needed where
    narrow (its width: narrow_width)."""
    if d not in FP8_HEAD_DIMS:
        raise ValueError(f"fa3_fp8 takes head_dim in {FP8_HEAD_DIMS}, got {d!r}")
    if out not in FP8_OUT:
        raise ValueError(f"fa3_fp8 writes O as bfloat16 or float16, got {out!r}")
    causal = check_causal(causal)
    t = full_tiles(tiles if tiles is not None else FP8_TILES[d] + (
        FP8_PERSIST[d][causal], FP8_TRIM[d][causal], FP8_NARROW[d][causal] and Nk is not None, FP8_CONSUMERS[d]))
    Bc, stages, emu, persist, trim, narrow, ncw = t or (None, 0, 0, False, False, False, 0)
    max_bc = FP8_MAX_BC[d] if ncw == 2 else FP8_MAX_BC3.get(d, 0) if ncw == 3 else 0
    if (Bc not in FP8_BC or stages < 2 or Bc > max_bc or emu not in range(17) or
            any(type(x) is not bool for x in (persist, trim, narrow)) or persist + trim + narrow > 1):
        raise ValueError(f"fa3_fp8 takes tiles (Bc, stages[, emu[, persist[, trim[, narrow[, consumers]]]]]): Bc in "
                         f"{FP8_BC} up to {FP8_MAX_BC[d]} at d = {d} with 2 consumer warpgroups (240 registers "
                         f"each), or with 3 (160 each) at d in {tuple(FP8_MAX_BC3)} up to "
                         f"{tuple(FP8_MAX_BC3.values())}, stages >= 2, emu 0 ... 16, persist, trim and narrow "
                         f"bools, at most one of them True; got {tiles}")
    if narrow and (causal or not isinstance(Nk, int) or Nk < 1):
        raise ValueError(f"fa3_fp8's narrow last key tile is for attention without the causal mask and needs Nk, "
                         f"the number of keys (an int >= 1); got causal={causal}, Nk={Nk!r}")
    width = narrow_width(Nk, Bc) if narrow else 0
    smem = smem_fp8(d, Bc, stages, ncw)
    if smem > SMEM_OPTIN_BYTES[90]:
        raise ValueError(f"tiles {tiles} at d = {d} need {smem} bytes of shared memory; Hopper allows "
                         f"{SMEM_OPTIN_BYTES[90]}")
    c = "true" if causal else "false"
    if ncw != 2:
        p = f", {str(persist).lower()}, {str(trim).lower()}, {width}, {ncw}"
    else:
        p = f", false, false, {width}" if width else ", true" if persist else ", false, true" if trim else ""
    return Fp8Config(f"fa3_fp8<{FP8_OUT[out]}, {d}, {Bc}, {stages}, {c}, {emu}{p}>", 64 * ncw, Bc, stages,
                     128 * (ncw + 1), smem, persist, trim, width)


def default_tiles(d, persist, trim=False, narrow=False):
    """FP8_TILES[d] with persist, trim and narrow as the fourth to sixth entries (fp8_bench.py --persist, --trim and
    --narrow time them against the plain grid) and FP8_CONSUMERS[d] as the seventh."""
    return FP8_TILES[d] + (persist, trim, narrow, FP8_CONSUMERS[d])


def fp8_instances():
    """Kernel name expressions for the compile test: every head dim with its tiles and the other tiles, bf16 O
    (and fp16 O at the default tiles), causal and not; the default tiles plain, persistent and trimmed, and narrow
    at Nk = 4096 where that leaves a partial key tile."""
    outs = ("bfloat16", "float16")
    out = [fp8_config(d, c, t, o).kernel for d in FP8_HEAD_DIMS for t in FP8_OTHER_TILES[d]
           for c in (False, True) for o in outs[:1]]
    out += [fp8_config(d, c, default_tiles(d, p, r), o).kernel for d in FP8_HEAD_DIMS
            for p, r in ((False, False), (True, False), (False, True)) for c in (False, True) for o in outs]
    out += [fp8_config(d, False, default_tiles(d, False, False, True), o, Nk=4096).kernel for d in FP8_HEAD_DIMS
            for o in outs if narrow_width(4096, FP8_TILES[d][0])]   # narrow where N = 4096 has a partial tile
    return out
