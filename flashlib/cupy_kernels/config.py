"""The cupy backend's rung table and tile configuration: pure Python, testable without a GPU.

`choose_config` maps (dtype, head dim, compute capability, causal[, rung, tiles]) to a Config: the .cu file, the
C++ template instance to compile, the tile sizes, the block size, the dynamic shared memory and the target
architecture (None: CuPy's default for the GPU; "sm_90a" for Hopper's wgmma). The tiles of the rungs before Hopper
are here; the Hopper rungs' (wgmma, fa3, bwd_wgmma) in config_hopper.py, the shape and grid rules every launch
obeys (`check_inputs`, `pair_grid`) in shapes.py. Tile choices cite the sweep that chose them; the measurements
themselves are in the records (flashlib/data/results/) and logs (benchmarks/results/logs/) named.
"""
from collections import namedtuple

from ..constants import SMEM_OPTIN_BYTES, smem_optin_bytes
from .config_hopper import (BWD_WGMMA_DEFAULT_DIMS, FA3_DEFAULT_HEAD_DIMS, WGMMA_HEAD_DIMS, WGMMA_TILES,
                            bwd_wgmma_config, fa3_config, smem_wgmma)
from .shapes import CTYPE, DTYPES, HEAD_DIMS, head_bucket

FORWARD_RUNGS = ("fp32", "tc", "tuned", "sm75", "wgmma", "fa3")
BACKWARD_RUNGS = ("bwd_fp32", "bwd_tc", "bwd_wgmma")
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

Config = namedtuple("Config", "rung file kernel Br Bc warps smem D arch dtype fa3", defaults=(None,) * 4)
Config.__doc__ = """One kernel launch configuration: rung, .cu file, template instance, tiles Br x Bc, warps per
block, dynamic shared memory (bytes), the compiled head dim D, the target architecture (None: the GPU's own), the
dtype name; rung 7: its Fa3Config (grid and counter)."""


def bwd_columns(D):
    """Columns of dK, dV, dQ that one launch of fa2_bwd_tc computes (its DO): all of them up to d = 128; at d = 256
    half, in two launches (a warp's dK and dV rows over 256 columns would need 256 fp32 registers)."""
    return D if D <= 128 else D // 2



def fp32_tiles(D):
    """(Br, Bc) of the CUDA-core rungs for compiled head dim D (the backward uses Br = Bc = BT = Br): the static
    shared memory of fa2_fp32.cu and fa2_bwd.cu stays under 48 KB."""
    return (32, 32) if D <= 64 else (16, 32) if D <= 128 else (8, 16)



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
        return Config(rung, "fa3_forward.cu", f.kernel, f.Br, f.Bc, f.threads // 32, f.smem, D, "sm_90a", dtype, f)
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
