"""The cupy backend's rung table and tile configuration: pure Python, testable without a GPU.

`choose_config` maps (dtype, head dim, compute capability, causal[, rung, tiles]) to a Config: the .cu file, the
C++ template instance to compile, the tile sizes, the block size, the dynamic shared memory and the target
architecture (None: CuPy's default for the GPU; "sm_90a" for Hopper's wgmma). `check_inputs` and `pair_grid` are
the shape and grid rules every launch obeys. Tile choices cite the sweep that chose them; the measurements
themselves are in the records (flashlib/data/results/) and logs (benchmarks/results/logs/) named.
"""
from collections import namedtuple

from .._arrays import dtype_str
from ..constants import SMEM_OPTIN_BYTES, smem_optin_bytes

HEAD_DIMS = (32, 64, 96, 128, 256)  # compiled head dims; others are padded up to the next (head_bucket)
MAX_GRID_YZ = 65535  # grid.y and grid.z limit (grid.x: 2**31 - 1); (batch, head) pairs go on y and z (pair_grid)
DTYPES = ("float32", "float16", "bfloat16")
FORWARD_RUNGS = ("fp32", "tc", "tuned", "sm75", "wgmma", "fa3")
BACKWARD_RUNGS = ("bwd_fp32", "bwd_tc", "bwd_wgmma")
CTYPE = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
# files compiled for an architecture-specific target (wgmma, TMA and setmaxnreg exist only in sm_90a code)
ARCH = {"fa2_wgmma.cu": "sm_90a", "fa3_forward.cu": "sm_90a", "fa3_backward.cu": "sm_90a",
        "fa3_timeline.cu": "sm_90a"}
SMEM_LIMIT = SMEM_OPTIN_BYTES   # opt-in dynamic shared memory per block by compute capability (flashlib.constants)

# Rung 3 tiles per head dim, (non-causal, causal), each (warps NW, keys per tile Bc, query rows per warp RW in
# {16, 32}, Q fragments kept in registers), so Br = RW*NW. d = 64 and 128: the winners of an H100 sweep
# (benchmarks/results/logs/tuned_tiles_h100_sweep.txt), except d = 128 causal: (4, 48, 32, False), the best tile
# without register spills on sm_90 once the mask moved into one branch per tile (logs/tuned_d128_causal_sweep_h200.txt,
# tests/test_tuning_records.py). d = 32, 96, 256: not swept; at d = 256 16 rows per warp and Q re-read from shared
# memory, so that O (128 fp32 registers) fits beside S. Every choice compiles without spills (test_cupy_kernels.py).
TUNED_TILES = {32: ((4, 64, 32, True),) * 2, 64: ((4, 128, 32, False), (4, 64, 32, False)),
               96: ((4, 32, 32, False),) * 2, 128: ((4, 64, 32, False), (4, 48, 32, False)),
               256: ((4, 32, 16, False),) * 2}
# for GPUs with less shared memory (sm_80: 163 KB, sm_86/89: 99 KB): the first that fits
FALLBACK_TILES = {D: ((4, 32, 32, False), (4, 64, 16, True), (4, 32, 16, True)) for D in HEAD_DIMS[:-1]}
FALLBACK_TILES[256] = ((4, 16, 16, False),)
# Rung 5 Tensor Core backward, per head dim: (warps NW, key m-tiles per warp KW, so Bc = 16*KW*NW keys per block;
# Br query rows per Q tile; BRC query rows per register chunk; KVREG: K/V fragments kept in registers). d = 64, 128
# swept on an H100 (logs/tuned_tiles_h100_sweep.txt); 32, 96, 256 not (256: two launches of 128 columns, bwd_columns).
BWD_TILES = {32: (8, 1, 64, 64, True), 64: (4, 2, 64, 32, False), 96: (8, 1, 64, 32, False), 128: (8, 1, 64, 64, False),
             256: (4, 1, 64, 32, False)}
# less shared memory (sm_80 at d = 256: 163 KB; sm_86/89: 99 KB): the first that fits
BWD_FALLBACK_TILES = ((4, 1, 64, 32, False), (4, 1, 32, 32, False), (2, 1, 16, 16, False))
# Rung 6 tiles per head dim, (non-causal, causal), each (warpgroups NWG, keys per tile Bc), Br = 64*NWG: the winners
# among one and two warpgroups on an H200 (logs/wgmma_explore_3_swizzled_h200.txt; tests/test_tuning_records.py).
# Three are refused: 168 registers a thread of 384 make ptxas serialise the wgmma (that sweep timed (3, 64) fastest).
WGMMA_TILES = {64: ((2, 64), (2, 64)), 128: ((2, 128), (2, 128))}
WGMMA_HEAD_DIMS = (64, 128)

# Rung 7 (fa3_forward.cu, FlashAttention-3's TMA and warp specialisation) per head dim: (Bc keys per K/V tile, ring
# stages, consumer warpgroups NCW); 128 (NCW + 1) threads a block (one producer warpgroup), Br = 64 NCW query rows.
# The winners of the H200 sweep in logs/fa3_gpu_session_h200_dee12ae.txt (fp16, N = 16384, ping-pong): d = 64
# (128, 2, 3), d = 128 (128, 2, 2). d = 256: FlashAttention-3's tile (Br = 128, Bc = 80, 2 stages; Shah et al. 2024,
# hopper/; Q 64 KB, K and V 40 KB a stage), timed beside (64, 2, 2) only: 685 and 666 TFLOP/s against 599 and 589
# (N = 16384, not causal and causal; fa3_ablation_pair_major_h200).
FA3_TILES = {64: (128, 2, 3), 128: (128, 2, 2), 256: (80, 2, 2)}
FA3_HEAD_DIMS = (64, 128, 256)
# where rung 7 is Hopper's default (default_rung): checked and timed faster than the rung before. d = 256: 628-724
# TFLOP/s against rung 3's 220-233 (fp16, N = 4096, 16384, causal or not; record fa3_ablation_h200), the GPU tests
# passing (logs/fa3_ablation_session_h200_b753eb0.txt; the default path at d = 256: ..._41a1755.txt)
FA3_DEFAULT_HEAD_DIMS = (64, 128, 256)
# other tiles that benchmarks/fa3_bench.py times beside these and the tests check (three consumers: d = 64 only)
FA3_OTHER_TILES = {64: ((128, 3, 2), (64, 4, 3), (64, 4, 2)), 128: ((128, 3, 2), (64, 3, 2)), 256: ((64, 2, 2),)}
# the consumers take turns (PP, the default) or not; "persistent": ping-pong in a grid of one CTA per SM looping over
# work items in a static order (fa3_grid); "dynamic": each next item from a global counter (FlashAttention-3's)
FA3_VARIANTS = ("pingpong", "plain", "persistent", "dynamic")
SIG_FA3 = "MMMPPiifiiP"   # maps of q, k, v; o, lse; Nq, Nk, scale, BH, G; "dynamic"'s zeroed int32 counter (else 0)

# The Hopper backward 'bwd_wgmma' (fa3_backward.cu): Bc = 128 keys a block over two consumer warpgroups, Q tiles of
# Br = 64 rows, one producer warpgroup (384 threads); d = 64 and 128 (other head dims: bwd_tc).
BWD_WGMMA_HEAD_DIMS = (64, 128)
BWD_WGMMA_TILES = (64, 128)   # (Br, Bc), fixed by the kernel
# where it is Hopper's default backward: both buckets. The H200 timed it at 308-392 TFLOP/s at d = 64 and 414-512 at
# d = 128 against bwd_tc's 230-296 and 216-252 (fp16, bf16, N = 4096, 16384, causal or not; record bwd_wgmma_h200,
# logs/bwd_wgmma_gpu_session_h200_505b10e.txt); its first version ('atomic' below) was not faster at d = 64
BWD_WGMMA_DEFAULT_DIMS = (64, 128)
# how each Q tile's dQ reaches the fp32 buffer: 'tma', staged in shared memory and added by TMA reductions
# (FlashAttention-3's way), or 'atomic', red.global.add.v2.f32 from every thread (kept for bwd_wgmma_bench.py)
BWD_WGMMA_DQ = ("tma", "atomic")
SIG_BWD_WGMMA = "MMMMMPPPPPiifii"   # maps of q, k, v, do, dq_acc; lb, delta, dq_acc, dk, dv; Nq, Nk, scale, BH, G

Config = namedtuple("Config", "rung file kernel Br Bc warps smem D arch dtype", defaults=(None, None, None))
Config.__doc__ = """One kernel launch configuration: rung, .cu file, template instance, tiles Br x Bc, warps per
block, dynamic shared memory (bytes), the compiled head dim D, the target architecture (None: the GPU's own), the
dtype name."""


def bwd_columns(D):
    """Columns of dK, dV, dQ that one launch of fa2_bwd_tc computes (its DO): all of them up to d = 128; at d = 256
    half, in two launches (a warp's dK and dV rows over 256 columns would need 256 fp32 registers)."""
    return D if D <= 128 else D // 2


def head_bucket(d):
    """The compiled head dim D >= d that a head dim d (1 ... 256) runs as (zero-padded up to it)."""
    if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= HEAD_DIMS[-1]:
        raise ValueError(f"the cupy backend takes head_dim 1 ... {HEAD_DIMS[-1]}, got {d!r}")
    return next(D for D in HEAD_DIMS if D >= d)


def fp32_tiles(D):
    """(Br, Bc) of the CUDA-core rungs for compiled head dim D (the backward uses Br = Bc = BT = Br): the static
    shared memory of fa2_fp32.cu and fa2_bwd.cu stays under 48 KB."""
    return (32, 32) if D <= 64 else (16, 32) if D <= 128 else (8, 16)


def pair_grid(n_tiles, BH):
    """Launch grid (n_tiles, y, z) for n_tiles tiles of each of BH (batch, head) pairs: the pairs fill grid.y up
    to its limit 65535 and continue on grid.z (the kernels' pair_index; blocks past BH return at once)."""
    if n_tiles > 2**31 - 1:
        raise ValueError(f"{n_tiles} tiles per (batch, head) pair exceed grid.x's limit 2**31 - 1")
    y = max(1, min(BH, MAX_GRID_YZ))
    z = -(-BH // y)
    if z > MAX_GRID_YZ:
        raise ValueError(f"B*H = {BH} (batch, head) pairs exceed the {MAX_GRID_YZ}**2 this launch can address")
    return (n_tiles, y, z)


def _cc_int(cc):
    """(9, 0), '90', 90 or 9.0 -> 90."""
    if isinstance(cc, (tuple, list)):
        return 10 * int(cc[0]) + int(cc[1])
    if isinstance(cc, float):
        return int(round(cc * 10))
    return int(cc)


def default_rung(dtype, cc, direction="forward", d=None):
    """The rung `forward`/`backward` use for this dtype (and head dim d) on a GPU of compute capability cc: on Hopper
    (9.0) rung 7 (fa3) for the head dims it has, else rung 3 (sm_80+) or the T4 path; backward: on Hopper
    'bwd_wgmma' for the head dims of BWD_WGMMA_DEFAULT_DIMS, else 'bwd_tc' (sm_80+) or 'bwd_fp32'."""
    cc = _cc_int(cc)
    D = None if d is None else head_bucket(d)
    if direction == "backward":
        if dtype != "float32" and cc == 90 and D in BWD_WGMMA_DEFAULT_DIMS:
            return "bwd_wgmma"
        return "bwd_tc" if dtype != "float32" and cc >= 80 else "bwd_fp32"
    if dtype == "float32":
        return "fp32"
    if cc == 90 and D in FA3_DEFAULT_HEAD_DIMS:
        return "fa3"
    return "tuned" if cc >= 80 else "sm75"


def choose_config(dtype, d, cc, causal=False, rung=None, tiles=None):
    """Pick the kernel for (dtype, head dim d, compute capability cc): Config(rung, file, kernel, Br, Bc, warps, smem).

    `kernel` is the C++ name expression CuPy instantiates, smem the dynamic shared memory in bytes. rung=None picks
    `default_rung`; tiles overrides the tile size: (warps, Bc[, rows per warp 16 or 32[, Q in registers]]) for the
    Tensor Core forward rungs, (warpgroups, Bc) for wgmma, (warps, KW, Br, BRC, KVREG) as in BWD_TILES for bwd_tc.
    d may be any head dim 1 ... 256: the kernel is the one of its bucket D = head_bucket(d) (Config.D).
    Raises ValueError for what cannot run: unknown dtype or rung, a head dim outside 1 ... 256 (a bucket outside
    WGMMA_HEAD_DIMS for wgmma), bf16 below sm_80, cc below 7.5, a sm_80 rung on sm_75, wgmma off Hopper, tiles that
    do not fit."""
    cc = _cc_int(cc)
    if dtype not in DTYPES:
        raise ValueError(f"the cupy backend takes dtype float32, float16 or bfloat16, got {dtype!r}")
    d = D = head_bucket(d)
    if cc < 75:
        raise ValueError(f"the cupy backend needs compute capability 7.5 or newer (Turing), got {cc / 10:.1f}")
    if dtype == "bfloat16" and cc < 80:
        raise ValueError(f"bfloat16 needs compute capability 8.0 or newer (Ampere); this GPU is {cc / 10:.1f}: use float16")
    rung = rung or default_rung(dtype, cc, d=d)
    c = "true" if causal else "false"
    T = CTYPE[dtype]
    if rung == "fp32":
        Br, Bc = fp32_tiles(D)
        return Config(rung, "fa2_fp32.cu", f"fa2_fp32<{T}, {D}, {Br}, {Bc}, {c}>", Br, Bc, 8, 0, D, None, dtype)
    if rung == "bwd_fp32":
        BT = fp32_tiles(D)[0]
        return Config(rung, "fa2_bwd.cu", f"fa2_bwd_fp32<{T}, {D}, {BT}, {c}>", BT, BT, 8, 0, D, None, dtype)
    if rung not in FORWARD_RUNGS + BACKWARD_RUNGS:
        raise ValueError(f"unknown rung {rung!r}; choose one of {FORWARD_RUNGS + BACKWARD_RUNGS}")
    if dtype == "float32":
        raise ValueError(f"rung {rung!r} runs on Tensor Cores and takes float16 or bfloat16; float32 uses 'fp32'/'bwd_fp32'")
    if rung == "sm75" and dtype != "float16":
        raise ValueError("the sm75 rung (m16n8k8) takes float16 only")
    if rung in ("tc", "tuned", "bwd_tc") and cc < 80:
        raise ValueError(f"rung {rung!r} needs compute capability 8.0+ (m16n8k16, cp.async); on {cc / 10:.1f} use 'sm75'")
    limit = smem_optin_bytes(cc)
    if rung == "fa3":
        if cc != 90:
            raise ValueError(f"rung 'fa3' is Hopper's (compute capability 9.0, sm_90a code); this GPU is {cc / 10:.1f}: "
                             "use 'tuned'")
        f = fa3_config(dtype, d, causal, tiles)
        return Config(rung, "fa3_forward.cu", f.kernel, f.Br, f.Bc, f.threads // 32, f.smem, D, "sm_90a", dtype)
    if rung == "wgmma":
        if cc != 90:
            raise ValueError(f"rung 'wgmma' is Hopper's (compute capability 9.0, sm_90a code); this GPU is {cc / 10:.1f}: "
                             "use 'tuned'")
        if d not in WGMMA_HEAD_DIMS:
            raise ValueError(f"rung 'wgmma' takes head_dim in {WGMMA_HEAD_DIMS}, got {d}: use 'tuned'")
        nwg, Bc = tiles if tiles is not None else WGMMA_TILES[d][bool(causal)]
        if nwg not in (1, 2) or Bc not in (64, 128):
            raise ValueError(f"rung 'wgmma' takes tiles (warpgroups 1 or 2, Bc 64 or 128), got ({nwg}, {Bc})")
        kernel = f"fa2_wgmma<{T}, {d}, {Bc}, {nwg}, {c}>"
        cfg = Config(rung, "fa2_wgmma.cu", kernel, 64 * nwg, Bc, 4 * nwg, smem_wgmma(d, nwg, Bc), D, "sm_90a", dtype)
    elif rung == "bwd_wgmma":
        if cc != 90:
            raise ValueError(f"rung 'bwd_wgmma' is Hopper's (compute capability 9.0, sm_90a code); this GPU is "
                             f"{cc / 10:.1f}: use 'bwd_tc'")
        f = bwd_wgmma_config(dtype, d, causal, *(tiles or ()))   # tiles: () or (dq,), one of BWD_WGMMA_DQ
        cfg = Config(rung, "fa3_backward.cu", f.kernel, f.Br, f.Bc, f.threads // 32, f.smem, D, "sm_90a", dtype)
    elif rung == "bwd_tc":
        if tiles is None:
            tiles = next((t for t in (BWD_TILES[d],) + BWD_FALLBACK_TILES if smem_backward(d, t[0], t[1], t[2]) <= limit),
                         BWD_FALLBACK_TILES[-1])
        nw, kw, Br, brc, kvreg = tiles
        DO = f", {bwd_columns(D)}" if bwd_columns(D) != D else ""  # the template's default: all columns
        kernel = f"fa2_bwd_tc<{T}, {d}, {nw}, {kw}, {Br}, {brc}, {str(bool(kvreg)).lower()}, {c}{DO}>"
        cfg = Config(rung, "fa2_bwd_tc.cu", kernel, Br, 16 * kw * nw, nw, smem_backward(d, nw, kw, Br), D, None, dtype)
    else:
        if tiles is not None:
            nw, Bc, rw, qreg = _forward_tiles(tiles)
        elif rung == "tuned":
            nw, Bc, rw, qreg = next((t for t in (TUNED_TILES[d][bool(causal)],) + FALLBACK_TILES[d]
                                     if smem_forward(d, t[0], t[1], 2, t[2], t[3]) <= limit), FALLBACK_TILES[d][-1])
        elif d == 256:  # Q re-read from shared memory (O alone is 128 registers); T4: 64 KB of shared memory
            nw, Bc, rw, qreg = 4, (32 if rung == "tc" else 16), 16, False
        else:
            nw, Bc, rw, qreg = 4, (64 if d <= 64 or rung == "tc" else 32), 16, True
        if rw not in (16, 32):
            raise ValueError(f"a warp owns 16 or 32 query rows, got {rw}")
        tuned, k8 = rung == "tuned", rung == "sm75"
        smem = smem_forward(d, nw, Bc, 2 if tuned else 1, rw, qreg)
        low = lambda b: str(bool(b)).lower()
        kernel = f"fa2_tc<{T}, {d}, {nw}, {Bc}, {c}, {low(tuned)}, {low(k8)}, {rw // 16}, {low(qreg)}>"
        cfg = Config(rung, "fa2_tc.cu", kernel, rw * nw, Bc, nw, smem, D, None, dtype)
    if cfg.smem > limit:
        raise ValueError(f"{cfg.kernel} needs {cfg.smem} bytes of shared memory; compute capability {cc / 10:.1f} "
                         f"allows {limit}")
    return cfg


def _forward_tiles(tiles):
    """(warps, Bc[, rows per warp[, Q in registers]]) -> all four; rows per warp default 16, Q in registers."""
    t = tuple(tiles)
    return t[0], t[1], (t[2] if len(t) > 2 else 16), bool(t[3]) if len(t) > 3 else True


def smem_forward(d, nw, Bc, stages, rw=16, qreg=True):
    """Bytes of dynamic shared memory of fa2_tc: Q tile (rw*nw rows) and `stages` K and V tiles, rows of d+8; and
    where the kernel keeps its row sums in shared memory (L_SMEM: rung 3, 32 rows per warp, Q not in registers,
    d >= 128) 2*(rw/16) floats per thread."""
    l_smem = stages == 2 and rw == 32 and not qreg and d >= 128
    return 2 * (d + 8) * (rw * nw + 2 * stages * Bc) + (4 * 32 * nw * 2 * (rw // 16) if l_smem else 0)


def smem_wgmma(d, nwg, Bc):
    """Bytes of dynamic shared memory of fa2_wgmma: the Q tile (64*nwg rows) and two stages of K and V (Bc rows),
    rows of d elements (no padding: the swizzled layout has no bank conflicts), and 1 KB to align them to 1024."""
    return 2 * d * (64 * nwg + 4 * Bc) + 1024


def smem_fa3(d, Bc, stages, ncw=2):
    """Bytes of dynamic shared memory of fa3_forward: 1 KB of alignment slack, Q (Br = 64 ncw rows), `stages` K and
    V tiles (Bc rows), rows of d 16-bit values, and the 2 + 4*stages mbarriers (8 bytes each)."""
    return 1024 + 2 * d * (64 * ncw + 2 * stages * Bc) + 8 * (2 + 4 * stages)


Fa3Config = namedtuple("Fa3Config", "kernel Br Bc stages threads smem persistent dynamic", defaults=(False, False))


def fa3_grid(cfg, Nq, BH, n_sm):
    """Launch grid of rung 7: one CTA per (query tile, pair) (pair_grid), or for a persistent cfg min(n_sm, work
    items) CTAs (one per SM: a CTA's shared memory leaves room for one), each looping over the work items."""
    n_qt = -(-Nq // cfg.Br)
    if cfg.persistent and n_qt * BH >= 2 ** 31:   # the kernel counts work items in int32
        raise ValueError(f"{n_qt} query tiles x {BH} pairs are too many work items for the persistent grid")
    return (max(1, min(n_sm, n_qt * BH)), 1, 1) if cfg.persistent else pair_grid(n_qt, BH)


def fa3_config(dtype, d, causal, tiles=None, variant="pingpong"):
    """Fa3Config(kernel name expression, Br, Bc, stages, threads, smem bytes, persistent) of rung 7 for dtype
    float16/bfloat16, head dim in FA3_HEAD_DIMS, tiles (Bc, stages[, consumer warpgroups]) (default FA3_TILES[d]),
    variant in FA3_VARIANTS."""
    if dtype not in ("float16", "bfloat16"):
        raise ValueError(f"rung 7 (fa3_forward) takes float16 or bfloat16, got {dtype!r}")
    if d not in FA3_HEAD_DIMS:
        raise ValueError(f"rung 7 (fa3_forward) takes head_dim in {FA3_HEAD_DIMS}, got {d!r}: use 'tuned'")
    Bc, stages, ncw = (tuple(tiles) + (2,))[:3] if tiles is not None else FA3_TILES[d]
    if Bc not in (64, 80, 128) or stages < 2 or ncw not in (2, 3) or (ncw == 3 and d != 64):
        raise ValueError(f"rung 7 takes tiles (Bc 64, 80 or 128, stages >= 2, consumer warpgroups 2, or 3 at d = 64), "
                         f"got {tiles} at d = {d}")
    smem = smem_fa3(d, Bc, stages, ncw)
    if smem > SMEM_OPTIN_BYTES[90]:
        raise ValueError(f"tiles {tiles} at d = {d} need {smem} bytes of shared memory; Hopper allows "
                         f"{SMEM_OPTIN_BYTES[90]}")
    if variant not in FA3_VARIANTS:
        raise ValueError(f"rung 7 variant must be one of {FA3_VARIANTS}, got {variant!r}")
    c, pp = ("true" if causal else "false"), ("false" if variant == "plain" else "true")
    persist, dynamic = variant in ("persistent", "dynamic"), variant == "dynamic"
    extra = ", true, true" if dynamic else ", true" if persist else ""
    return Fa3Config(f"fa3_forward<{CTYPE[dtype]}, {d}, {Bc}, {stages}, {ncw}, {pp}, {c}{extra}>",
                     64 * ncw, Bc, stages, 128 * (ncw + 1), smem + 8 * dynamic, persist, dynamic)


def smem_bwd_wgmma(d, Br=64, Bc=128, dq="tma"):
    """Bytes of dynamic shared memory of fa3_backward: 1 KB of alignment slack, K, V (Bc rows), 2 stages of Q, dO (Br
    rows), rows of d 16-bit values; 2 dS^T buffers (Bc x Br, 16-bit); dq 'tma': a dQ staging tile (Br x 64 fp32) per
    consumer warpgroup; 2 stages of Lb and delta (Br floats) and 5 mbarriers (8 bytes each)."""
    staging = 2 * Br * 64 * 4 if dq == "tma" else 0
    return 1024 + 2 * d * (2 * Bc + 4 * Br) + 2 * 2 * Bc * Br + staging + 4 * 4 * Br + 8 * 5


Fa3BwdConfig = namedtuple("Fa3BwdConfig", "kernel Br Bc threads smem")


def bwd_wgmma_config(dtype, d, causal, dq="tma"):
    """Fa3BwdConfig(kernel name expression, Br, Bc, threads, smem bytes) of the Hopper backward for dtype
    float16/bfloat16, head dim 64 or 128 and dQ accumulation `dq` (one of BWD_WGMMA_DQ)."""
    if dtype not in ("float16", "bfloat16"):
        raise ValueError(f"rung 'bwd_wgmma' (fa3_backward) takes float16 or bfloat16, got {dtype!r}")
    if d not in BWD_WGMMA_HEAD_DIMS:
        raise ValueError(f"rung 'bwd_wgmma' takes head_dim in {BWD_WGMMA_HEAD_DIMS}, got {d!r}: use 'bwd_tc'")
    if dq not in BWD_WGMMA_DQ:
        raise ValueError(f"rung 'bwd_wgmma' accumulates dQ by one of {BWD_WGMMA_DQ}, got {dq!r}")
    Br, Bc = BWD_WGMMA_TILES
    c, t = ("true" if causal else "false"), ("true" if dq == "tma" else "false")
    return Fa3BwdConfig(f"fa3_backward<{CTYPE[dtype]}, {d}, {c}, {t}>", Br, Bc, 384, smem_bwd_wgmma(d, Br, Bc, dq))


def bwd_wgmma_instances():
    """Kernel name expressions of every fa3_backward instance (dtype x head dim x causal x dQ), for the compile test."""
    return [bwd_wgmma_config(t, d, c, q).kernel for t in ("float16", "bfloat16") for d in BWD_WGMMA_HEAD_DIMS
            for c in (False, True) for q in BWD_WGMMA_DQ]


def fa3_instances(configs=False):
    """Kernel name expressions (configs=True: their Fa3Config) for the compile test: every dtype with the default
    tiles, fp16 with the other tiles (bf16 is the same code), each causal and not, each variant."""
    tiles = [(t, d, None) for t in ("float16", "bfloat16") for d in FA3_HEAD_DIMS]
    tiles += [("float16", d, x) for d in FA3_HEAD_DIMS for x in FA3_OTHER_TILES[d]]
    out = [fa3_config(t, d, c, x, v) for t, d, x in tiles for c in (False, True) for v in FA3_VARIANTS]
    return out if configs else [c.kernel for c in out]


def sw128(r, c, rows):
    """Byte offset of element (r, c) of a 16-bit tile with `rows` rows in the 128-byte-swizzled shared-memory layout
    of rung 6 (fa2_wgmma.cu's sw128, for c a multiple of 8): blocks of 64 columns, rows of 128 bytes, and within each
    8-row atom the 16-byte chunk c//8 % 8 of row r stored at chunk position (c//8 % 8) ^ (r % 8)."""
    return (c // 64) * rows * 128 + r * 128 + ((((c // 8) % 8) ^ (r % 8)) << 4)


def smem_backward(d, nw, kw, Br):
    """Bytes of dynamic shared memory of fa2_bwd_tc: K, V (Bc = 16*kw*nw rows), two stages of Q, dO (Br rows),
    dS^T (Bc x Br+8), two stages of lse and Dlt (Br floats)."""
    Bc = 16 * kw * nw
    return 2 * (2 * Bc * (d + 8) + 4 * Br * (d + 8) + Bc * (Br + 8)) + 4 * 4 * Br


def instances(cc):
    """{file: [kernel name expressions]} that this library can launch on compute capability cc (for compile tests)."""
    cc = _cc_int(cc)
    out = {}
    for dtype in DTYPES:
        if dtype == "bfloat16" and cc < 80:
            continue
        T = CTYPE[dtype]
        out.setdefault("fa2_bwd.cu", set()).add(f"bwd_sum_groups<{T}>")
        if dtype != "float32":
            out.setdefault("fa2_bwd.cu", set()).add(f"bwd_convert_dq<{T}>")
        for d in HEAD_DIMS:
            out.setdefault("fa2_bwd.cu", set()).add(f"bwd_dot_do_o<{T}, {d}>")
            for causal in (False, True):
                for rung in FORWARD_RUNGS + BACKWARD_RUNGS:
                    try:
                        cfg = choose_config(dtype, d, cc, causal, rung)
                    except ValueError:
                        continue
                    out.setdefault(cfg.file, set()).add(cfg.kernel)
    return {f: sorted(v) for f, v in out.items()}


def check_inputs(q, k, v, dtype):
    """Shapes q (B, H, Nq, d), k and v (B, H_kv, Nk, d) with H_kv dividing H, d in 1 ... 256, one dtype: CuPy arrays
    (bfloat16 as 16-bit integers, CuPy has no bfloat16) or torch CUDA tensors of that dtype; returns (B, H, Nq, Nk, d). The kv heads: k.shape[1]."""
    if dtype not in DTYPES:
        raise ValueError(f"the cupy backend takes dtype float32, float16 or bfloat16, got {dtype!r}")
    want = _STORED[dtype]
    for name, a in (("q", q), ("k", k), ("v", v)):
        if len(a.shape) != 4:
            raise ValueError(f"{name} must be (B, H, N, d), got shape {tuple(a.shape)}")
        if dtype_str(a.dtype) not in want:
            raise ValueError(f"{name} has dtype {a.dtype}; dtype={dtype!r} expects {' or '.join(want)}")
    B, H, Nq, d = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if tuple(k.shape) != (B, Hkv, Nk, d) or tuple(v.shape) != (B, Hkv, Nk, d) or Hkv == 0 or H % Hkv:
        raise ValueError(f"k and v must be (B, H_kv, Nk, d) = ({B}, H_kv, Nk, {d}) with H_kv dividing H = {H}; "
                         f"got {tuple(k.shape)}, {tuple(v.shape)}")
    head_bucket(d)
    if max(Nq, Nk) > 2**31 - 1:
        raise ValueError(f"sequence lengths up to 2**31 - 1 (the kernels take them as int32), got Nq={Nq}, Nk={Nk}")
    return B, H, Nq, Nk, d


# how each dtype is stored in the arrays the backend accepts: CuPy (bfloat16 as its bits) or torch
_STORED = {"float32": ("float32", "torch.float32"), "float16": ("float16", "torch.float16"),
           "bfloat16": ("int16", "uint16", "torch.bfloat16")}

