"""Layer 5: FlashAttention-2 in CUDA C, compiled at first use by CuPy (NVRTC) and launched from Python.

The kernels form a numbered ladder (each .cu file's header says grid, block, and what lives where):

  rung 1  'fp32'      fa2_fp32.cu   float32 on CUDA cores, online softmax, deferred normalisation
  rung 2  'tc'        fa2_tc.cu     Tensor Cores (mma.sync m16n8k16, ldmatrix), fp16/bf16, S/P/O in registers
  rung 3  'tuned'     fa2_tc.cu     + cp.async double buffering, exp2 with folded scale, 32 query rows per warp,
                                    2 blocks per SM, tiles per head dim
  rung 4  'sm75'      fa2_tc.cu     the T4 path: two m16n8k8 per k16, no cp.async, fp16 only
  rung 5  'bwd_fp32'  fa2_bwd.cu    backward on CUDA cores in fp32 arithmetic (any input dtype; float32, sm_75)
          'bwd_tc'    fa2_bwd_tc.cu backward on Tensor Cores, fp16/bf16, sm_80+, dQ by fp32 atomics
  rung 6  'wgmma'     fa2_wgmma.cu  Hopper only (sm_90a): the forward on warpgroup MMA, K and V read by the Tensor
                                    Cores straight from shared memory; d = 64 and 128

`forward` / `backward` follow flashlib's backend contract: q (B, H, Nq, d), k and v (B, H_kv, Nk, d) with H_kv
dividing H (grouped-query attention: query head h uses kv head h // (H // H_kv)); o like q and lse float32
(B, H, Nq). They take CuPy arrays (bfloat16 travels as 16-bit integers, its bits, and comes back the same way) or
torch CUDA tensors (any of the three dtypes), and answer in the caller's library, allocated by it and computed on
its current stream. Any head dim 1 ... 256: kernels are compiled for the buckets HEAD_DIMS and a head dim between
them is zero-padded up to the next (zero columns change no score; the padded columns of O are dropped). Per
configuration the kernels and launch rule are built once (`forward_plan`, `backward_plan`); `launch_forward` /
`launch_backward` take device pointers. The host logic (`choose_config`, `check_inputs`, `pair_grid`) is pure
Python and runs without a GPU; CuPy is
imported and the .cu files compiled only when a kernel is first launched.
"""
import functools
import os
import pathlib
from collections import namedtuple

import numpy as np

from .._arrays import check_causal, check_scale, dtype_str

HERE = pathlib.Path(__file__).resolve().parent
HEAD_DIMS = (32, 64, 96, 128, 256)  # compiled head dims; others are padded up to the next (head_bucket)
MAX_GRID_YZ = 65535  # grid.y and grid.z limit (grid.x: 2**31 - 1); (batch, head) pairs go on y and z (pair_grid)
DTYPES = ("float32", "float16", "bfloat16")
GQA = ("forward", "backward")   # the kernels take k, v with fewer heads than q (argument G; flashlib.api reads this)
FORWARD_RUNGS = ("fp32", "tc", "tuned", "sm75", "wgmma")
BACKWARD_RUNGS = ("bwd_fp32", "bwd_tc")
CTYPE = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
# largest dynamic shared memory per block (opt-in) by compute capability, CUDA C Programming Guide table 21
SMEM_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024,
              100: 227 * 1024, 120: 99 * 1024}
# rung 3 tiles per head dim, (non-causal, causal), each (warps NW, keys per tile Bc, query rows per warp RW in
# {16, 32}, Q fragments kept in registers), so Br = RW*NW. d = 64 and 128 chosen on an H100 (benchmarks/cupy_bench.py
# --sweep, fp16, 2026-11-25; x SDPA flash at N = 4096 / 16384): d=64 non-causal (4, 128, 32, False) 0.89 / 0.99,
# causal (4, 64, 32, False) 0.91 / 0.87; d=128 (4, 64, 32, False) 0.91 / 0.91 and causal 0.84 / 0.87 (the tiles as
# committed before: 0.81-0.83 at d=64 non-causal, 0.75-0.80 causal, 0.82-0.86 at d=128). d = 32 and 96 not swept.
# Every choice compiles without register spills for sm_80 ... sm_90 (tests/test_cupy_kernels.py).
# d = 128 causal: (4, 48, 32, False) since the mask moved into one branch per tile (2026-12-01), which left
# (4, 64, 32, False) 12-24 bytes of spill on sm_90. H200, fp16, x SDPA flash at N = 4096 / 16384
# (logs/tuned_d128_causal_sweep_h200.txt): (4, 48, 32, 0) 0.88 / 0.93, (4, 64, 32, 0) 0.87 / 0.99 (spills),
# (4, 32, 32, 0) 0.77 / 0.86, (4, 64, 16, 1) 0.81 / 0.85, (8, 64, 16, 1) 0.78 / 0.83.
# d = 256 (not swept): 16 rows per warp and Q re-read from shared memory, so that O (128 fp32 registers) fits beside S.
TUNED_TILES = {32: ((4, 64, 32, True),) * 2, 64: ((4, 128, 32, False), (4, 64, 32, False)),
               96: ((4, 32, 32, False),) * 2, 128: ((4, 64, 32, False), (4, 48, 32, False)),
               256: ((4, 32, 16, False),) * 2}
# for GPUs with less shared memory (sm_80: 163 KB, sm_86/89: 99 KB): the first that fits
FALLBACK_TILES = {D: ((4, 32, 32, False), (4, 64, 16, True), (4, 32, 16, True)) for D in HEAD_DIMS[:-1]}
FALLBACK_TILES[256] = ((4, 16, 16, False),)
# rung 5 Tensor Core backward, per head dim: (warps NW, key m-tiles per warp KW, so Bc = 16*KW*NW keys per block;
# Br query rows per Q tile; BRC query rows per register chunk; KVREG: K/V fragments kept in registers).
# Swept on an H100 (fp16, N = 4096 and 16384, causal and not; backward alone, TFLOP/s = 2.5x the forward's FLOPs):
# d=64 (4, 2, 64, 32, F) 213-287 (SDPA flash 198-274), (8, 1, 128, 64, T) 194-245, (8, 1, 64, 64, T) 187-232;
# d=128 (8, 1, 64, 64, F) 205-260 (flash 230-301), (8, 1, 64, 32, F) 194-241, (4, 1, 64, 32, F) 185-213.
# d=32 and 96: not swept (tiles checked for correctness on the H100).
# d = 256 (not swept; two launches of 128 output columns each, bwd_columns): 4 warps, Bc = 64, 213 KB of shared memory.
BWD_TILES = {32: (8, 1, 64, 64, True), 64: (4, 2, 64, 32, False), 96: (8, 1, 64, 32, False), 128: (8, 1, 64, 64, False),
             256: (4, 1, 64, 32, False)}
# less shared memory (sm_80 at d = 256: 163 KB; sm_86/89: 99 KB): the first that fits
BWD_FALLBACK_TILES = ((4, 1, 64, 32, False), (4, 1, 32, 32, False), (2, 1, 16, 16, False))


def bwd_columns(D):
    """Columns of dK, dV, dQ that one launch of fa2_bwd_tc computes (its DO): all of them up to d = 128; at d = 256
    half, in two launches (a warp's dK and dV rows over 256 columns would need 256 fp32 registers)."""
    return D if D <= 128 else D // 2

# rung 6 tiles per head dim, (non-causal, causal), each (warpgroups NWG, keys per tile Bc), Br = 64*NWG. Chosen on an
# H200 (fp16, N = 4096 / 16384, TFLOP/s, SDPA flash in the same run; benchmarks/results/logs/wgmma_explore_3_swizzled_h200.txt):
# d=64 (2, 64) 324 / 333, causal 287 / 317 (flash 274 / 291, 244 / 277); (1, 64) 283 / 283, (2, 128) 260 / 269;
# d=128 (2, 128) 364 / 379, causal 339 / 384 (flash 347 / 345, 290 / 304); (2, 64) 331 / 341, (1, 64) 316 / 315.
# Three warpgroups would need more than the 168 registers a thread 384 threads leave (ptxas serialises the wgmma).
WGMMA_TILES = {64: ((2, 64), (2, 64)), 128: ((2, 128), (2, 128))}
WGMMA_HEAD_DIMS = (64, 128)

Config = namedtuple("Config", "rung file kernel Br Bc warps smem D", defaults=(None,))  # D: the compiled head dim


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
    (9.0) the wgmma forward for the head dims it has, else rung 3 (sm_80+) or the T4 path."""
    cc = _cc_int(cc)
    D = None if d is None else head_bucket(d)
    if direction == "backward":
        return "bwd_tc" if dtype != "float32" and cc >= 80 else "bwd_fp32"
    if dtype == "float32":
        return "fp32"
    if cc == 90 and D in WGMMA_HEAD_DIMS:
        return "wgmma"
    return "tuned" if cc >= 80 else "sm75"


def choose_config(dtype, d, cc, causal=False, rung=None, tiles=None):
    """Pick the kernel for (dtype, head dim d, compute capability cc): Config(rung, file, kernel, Br, Bc, warps, smem).

    `kernel` is the C++ name expression CuPy instantiates, smem the dynamic shared memory in bytes. rung=None picks
    `default_rung`; tiles overrides the tile size: (warps, Bc[, rows per warp 16 or 32[, Q in registers]]) for the
    Tensor Core forward rungs, (warpgroups, Bc) for wgmma, (warps, KW, Br, BRC, KVREG) as in BWD_TILES for bwd_tc.
    d may be any head dim 1 ... 256: the kernel is the one of its bucket D = head_bucket(d) (Config.D).
    Raises ValueError for what cannot run: unknown dtype or rung, a head dim outside 1 ... 256 (a bucket outside
    WGMMA_HEAD_DIMS for wgmma), bf16 below sm_80, cc below 7.5, a sm_80 rung on sm_75, wgmma off Hopper, or tiles that do not fit.
    """
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
        return Config(rung, "fa2_fp32.cu", f"fa2_fp32<{T}, {D}, {Br}, {Bc}, {c}>", Br, Bc, 8, 0, D)
    if rung == "bwd_fp32":
        BT = fp32_tiles(D)[0]
        return Config(rung, "fa2_bwd.cu", f"fa2_bwd_fp32<{T}, {D}, {BT}, {c}>", BT, BT, 8, 0, D)
    if rung not in FORWARD_RUNGS + BACKWARD_RUNGS:
        raise ValueError(f"unknown rung {rung!r}; choose one of {FORWARD_RUNGS + BACKWARD_RUNGS}")
    if dtype == "float32":
        raise ValueError(f"rung {rung!r} runs on Tensor Cores and takes float16 or bfloat16; float32 uses 'fp32'/'bwd_fp32'")
    if rung == "sm75" and dtype != "float16":
        raise ValueError("the sm75 rung (m16n8k8) takes float16 only")
    if rung in ("tc", "tuned", "bwd_tc") and cc < 80:
        raise ValueError(f"rung {rung!r} needs compute capability 8.0+ (m16n8k16, cp.async); on {cc / 10:.1f} use 'sm75'")
    limit = SMEM_LIMIT.get(cc, 99 * 1024 if cc >= 80 else 48 * 1024)
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
        cfg = Config(rung, "fa2_wgmma.cu", kernel, 64 * nwg, Bc, 4 * nwg, smem_wgmma(d, nwg, Bc), D)
    elif rung == "bwd_tc":
        if tiles is None:
            tiles = next((t for t in (BWD_TILES[d],) + BWD_FALLBACK_TILES if smem_backward(d, t[0], t[1], t[2]) <= limit),
                         BWD_FALLBACK_TILES[-1])
        nw, kw, Br, brc, kvreg = tiles
        DO = f", {bwd_columns(D)}" if bwd_columns(D) != D else ""  # the template's default: all columns
        kernel = f"fa2_bwd_tc<{T}, {d}, {nw}, {kw}, {Br}, {brc}, {str(bool(kvreg)).lower()}, {c}{DO}>"
        cfg = Config(rung, "fa2_bwd_tc.cu", kernel, Br, 16 * kw * nw, nw, smem_backward(d, nw, kw, Br), D)
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
        cfg = Config(rung, "fa2_tc.cu", kernel, rw * nw, Bc, nw, smem, D)
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


# ---------------------------------------------------------------- GPU side (CuPy imported lazily)

def _kernel(file, name, smem=0):
    """Compile `file` with the one template instance `name` (NVRTC, cached by CuPy on disk) for CuPy's current GPU
    and return it (cached per GPU: a loaded CUDA module belongs to one device's context)."""
    import cupy as cp
    return _compiled(cp.cuda.Device().id, file, name, smem)


@functools.lru_cache(maxsize=None)
def _compiled(device, file, name, smem):
    import cupy as cp
    if file == "fa2_wgmma.cu":
        return _kernel_sm90a(file, name, smem)
    src = (HERE / file).read_text()
    mod = cp.RawModule(code=src, options=("-std=c++17", f"-I{HERE}"), name_expressions=[name])
    fn = mod.get_function(name)
    if smem > 48 * 1024:
        fn.max_dynamic_shared_size_bytes = smem
    return fn


def _kernel_sm90a(file, name, smem):
    """Compile for sm_90a (wgmma exists only there) with NVRTC directly: CuPy adds its own -arch=sm_90 and NVRTC
    refuses two. Not cached on disk (a few seconds a kernel, once per process)."""
    import cupy as cp
    from cupy_backends.cuda.libs import nvrtc
    prog = nvrtc.createProgram((HERE / file).read_text(), file, (), ())
    includes = tuple(f"-I{d}" for d in _cuda_include_dirs())
    try:
        nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, ("-std=c++17", f"-I{HERE}", *includes, "-arch=sm_90a", "-ftz=true"))
        except nvrtc.NVRTCError as e:
            raise RuntimeError(f"NVRTC failed on {name}:\n{nvrtc.getProgramLog(prog)}") from e
        cubin, lowered = nvrtc.getCUBIN(prog), nvrtc.getLoweredName(prog, name)
    finally:
        nvrtc.destroyProgram(prog)
    mod = cp.cuda.function.Module()
    mod.load(cubin)
    fn = mod.get_function(lowered)
    if smem > 48 * 1024:
        cp.cuda.driver.funcSetAttribute(fn.ptr, cp.cuda.driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
    return fn


def _cuda_include_dirs():
    """Where cuda_fp16.h lives (CuPy's own NVRTC calls add this for us): the CUDA toolkit CuPy found, else the pip
    wheels' include folders (nvidia/cu13 for CUDA 13, nvidia/cuda_runtime for CUDA 12)."""
    import importlib.util
    import cupy as cp
    roots = [cp.cuda.get_cuda_path()]
    for mod in ("nvidia.cu13", "nvidia.cuda_runtime"):
        try:
            spec = importlib.util.find_spec(mod)
        except ImportError:
            spec = None
        roots += list(spec.submodule_search_locations or []) if spec else []
    dirs = dict.fromkeys(os.path.join(r, "include") for r in roots if r)
    return [d for d in dirs if os.path.exists(os.path.join(d, "cuda_fp16.h"))]


def device_cc():
    """Compute capability of CuPy's current GPU, e.g. 90."""
    import cupy as cp
    return _device_cc(cp.cuda.Device().id)


def _rung_override(direction):
    r = os.environ.get("FLASHLIB_CUPY_RUNG")
    if r and (r in FORWARD_RUNGS if direction == "forward" else r in BACKWARD_RUNGS):
        return r
    return None


# ---------------------------------------------------------------- the launch layer
# One plan per (direction, dtype, head dim, causal, device, rung, tiles), built once: the Config, the compiled kernels
# and their launch rule. A call then costs a dictionary look-up, output allocation in the caller's library and one
# launch per kernel on the caller's stream. The grid rule and each kernel's argument list live in `launch_forward` /
# `launch_backward` alone (plain device pointers and sizes), whoever the caller is. Head dims that are not a bucket
# are zero-padded by `forward` / `backward` (a copy only then); grouped-query attention is the kernels' argument G.

Plan = namedtuple("Plan", "cfg d fn pre post sum")   # main kernel; backward's pre-pass, dQ conversion, group sum


@functools.lru_cache(maxsize=None)
def forward_plan(dtype, d, causal, device, rung=None, tiles=None):
    """The forward's Plan on GPU `device` (an ordinal); compiles its kernel at the first call."""
    cfg = choose_config(dtype, d, _device_cc(device), causal, rung, tiles)
    return Plan(cfg, d, _kernel_on(device, cfg.file, cfg.kernel, cfg.smem), None, None, None)


@functools.lru_cache(maxsize=None)
def backward_plan(dtype, d, causal, device, rung=None, tiles=None):
    """The backward's Plan: the kernel, its pre-pass (Dlt = rowsum(dO * O), the lse it reads, the float32 dQ zeroed),
    for 16-bit dtypes the kernel that converts dQ to the input dtype, and the sum of dK, dV over query-head groups
    (grouped-query attention; compiled at its first use)."""
    cc = _device_cc(device)
    cfg = choose_config(dtype, d, cc, causal, rung or default_rung(dtype, cc, "backward", d), tiles)
    T = CTYPE[dtype]
    pre = _kernel_on(device, "fa2_bwd.cu", f"bwd_dot_do_o<{T}, {cfg.D}>")
    post = None if dtype == "float32" else _kernel_on(device, "fa2_bwd.cu", f"bwd_convert_dq<{T}>")
    sum_ = functools.partial(_kernel_on, device, "fa2_bwd.cu", f"bwd_sum_groups<{T}>")
    return Plan(cfg, d, _kernel_on(device, cfg.file, cfg.kernel, cfg.smem), pre, post, sum_)


def launch_forward(plan, q, k, v, o, lse, B, H, Nq, Nk, scale, G=1, stream=None):
    """Launch the forward: q, k, v, o, lse are device pointers (ints) of C-contiguous arrays with plan.cfg.D columns
    (q, o: B*H heads; k, v: B*H/G), stream an object with the stream's handle in `.ptr` (None: CuPy's current
    stream). Needs Nk >= 1 (`forward` answers Nk = 0 on the host); nothing to launch when B*H*Nq = 0."""
    cfg, BH = plan.cfg, B * H
    if BH * Nq == 0:
        return
    plan.fn(pair_grid(-(-Nq // cfg.Br), BH), (32 * cfg.warps,),
            (_ptr(q), _ptr(k), _ptr(v), _ptr(o), _ptr(lse), _i32(Nq), _i32(Nk), _f32(scale), _i32(BH), _i32(G)),
            shared_mem=cfg.smem, stream=stream)


def launch_backward(plan, q, k, v, o, lse, do, dq, dk, dv, dq_acc, delta, lb, B, H, Nq, Nk, scale, G=1,
                    dk_h=None, dv_h=None, stream=None):
    """Launch the backward's kernels; pointers as in launch_forward. dq_acc (float32, q's shape), delta and lb
    (float32, (B, H, Nq)) are scratch; for float32 input dq_acc is dq itself. With G > 1, dk_h and dv_h (q's head
    count, k's other sizes, k's dtype) take dK, dV per query head, which are then summed into dk, dv."""
    cfg, BH, D = plan.cfg, B * H, plan.cfg.D
    rows = BH * Nq
    if rows:
        plan.pre((-(-rows // 8),), (256,), (_ptr(do), _ptr(o), _ptr(lse), _ptr(delta), _ptr(lb), _ptr(dq_acc),
                                            _u64(rows)), stream=stream)
    kh, vh = (dk, dv) if G == 1 else (dk_h, dv_h)
    if BH * Nk:
        args = (_ptr(q), _ptr(k), _ptr(v), _ptr(do), _ptr(lb), _ptr(delta), _ptr(dq_acc), _ptr(kh), _ptr(vh),
                _i32(Nq), _i32(Nk), _f32(scale), _i32(BH), _i32(G))
        grid, block = pair_grid(-(-Nk // cfg.Bc), BH), (32 * cfg.warps,)
        if cfg.rung == "bwd_tc":   # at d = 256 two launches of 128 output columns (bwd_columns)
            for c_out in range(0, D, bwd_columns(D)):
                plan.fn(grid, block, args + (_i32(c_out),), shared_mem=cfg.smem, stream=stream)
        else:
            plan.fn(grid, block, args, shared_mem=cfg.smem, stream=stream)
        if G > 1:
            n = (BH // G) * Nk * D
            fn = plan.sum()
            for a, out in ((kh, dk), (vh, dv)):
                fn((min(-(-n // 256), 65535),), (256,), (_ptr(a), _ptr(out), _i32(G), _u64(Nk * D), _u64(n)),
                   stream=stream)
    if plan.post is not None and rows:
        n = rows * D
        plan.post((min(-(-n // 256), 65535),), (256,), (_ptr(dq_acc), _ptr(dq), _u64(n)), stream=stream)


def forward(q, k, v, *, causal, scale, dtype, rung=None, tiles=None):
    """FlashAttention-2 forward. q: (B, H, Nq, d), k, v: (B, H_kv, Nk, d), H_kv dividing H, d in 1 ... 256: CuPy
    arrays of `dtype` (bfloat16 as int16 bits), or torch CUDA tensors. Returns o (B, H, Nq, d), q's dtype, and lse
    (B, H, Nq) float32, allocated by the caller's library and computed on its current stream (CuPy's, or
    torch.cuda.current_stream()). A row that sees no key (Nk = 0) gets o = 0 and lse = -inf.

    rung: one of FORWARD_RUNGS (default: by dtype and compute capability, or env FLASHLIB_CUPY_RUNG, e.g. 'sm75'
    to run the T4 path on a newer GPU).
    """
    B, H, Nq, Nk, d = check_inputs(q, k, v, dtype)
    causal, scale = check_causal(causal), check_scale(scale, d)
    io = _io(q)
    if Nk == 0:  # no key at all (the kernels would read an empty K): O = 0, lse = -inf, the rule for such rows
        return io.zeros(tuple(q.shape), q), io.full_f32((B, H, Nq), -np.inf, q)
    dev = io.device(q)
    plan = forward_plan(dtype, d, causal, dev, rung or _rung_override("forward"), _hashable(tiles))
    D = plan.cfg.D
    q, k, v = (io.contiguous(a) if D == d else io.padded(a, D) for a in (q, k, v))
    o, lse = io.empty_like(q), io.empty_f32((B, H, Nq), q)
    launch_forward(plan, io.ptr(q), io.ptr(k), io.ptr(v), io.ptr(o), io.ptr(lse), B, H, Nq, Nk, scale,
                   H // k.shape[1], io.stream(dev))
    return (o if D == d else io.unpadded(o, d)), lse


def backward(q, k, v, o, lse, do, *, causal, scale, dtype, rung=None, tiles=None):
    """FlashAttention-2 backward. q, o, do: (B, H, Nq, d), k, v: (B, H_kv, Nk, d), lse (B, H, Nq) float32, all CuPy
    arrays or all torch CUDA tensors. Returns dq, dk, dv in q's dtype, the caller's kind, on its current stream (dk,
    dv summed over the H // H_kv query heads that share a kv head). rung: 'bwd_tc' (fp16/bf16 on sm_80+, the default
    there) or 'bwd_fp32'; tiles: bwd_tc's (warps, KW, Br, BRC, KVREG), default BWD_TILES[d]."""
    B, H, Nq, Nk, d = check_inputs(q, k, v, dtype)
    if tuple(o.shape) != tuple(q.shape) or tuple(do.shape) != tuple(q.shape) or tuple(lse.shape) != (B, H, Nq):
        raise ValueError(f"o and do must be {tuple(q.shape)} and lse {(B, H, Nq)}")
    causal, scale = check_causal(causal), check_scale(scale, d)
    io = _io(q)
    dev = io.device(q)
    plan = backward_plan(dtype, d, causal, dev, rung or _rung_override("backward"), _hashable(tiles))
    D, Hkv = plan.cfg.D, k.shape[1]
    G = H // Hkv
    q, k, v, o, do = (io.contiguous(a) if D == d else io.padded(a, D) for a in (q, k, v, o, do))
    lse = io.contiguous_f32(lse)
    rows = B * H * Nq
    # one float32 scratch buffer: dQ's accumulator (16-bit input; for float32 dQ accumulates in place, zeroed by the
    # pre-pass), then Dlt and Lb
    acc = 0 if dtype == "float32" else rows * D
    scratch = io.empty_f32((acc + 2 * rows,), q)
    base = io.ptr(scratch)
    dq, dk, dv = io.empty_like(q), io.empty_like(k), io.empty_like(v)
    dq_acc = base if acc else io.ptr(dq)
    dk_h = dv_h = None
    if G > 1:   # dK, dV per query head (one buffer), then summed over each kv head's G query heads
        per = io.empty((2, B, H, Nk, D), k)
        dk_h = io.ptr(per)
        dv_h = dk_h + per.nbytes // 2
    launch_backward(plan, io.ptr(q), io.ptr(k), io.ptr(v), io.ptr(o), io.ptr(lse), io.ptr(do), io.ptr(dq),
                    io.ptr(dk), io.ptr(dv), dq_acc, base + 4 * acc, base + 4 * (acc + rows), B, H, Nq, Nk, scale, G,
                    dk_h, dv_h, io.stream(dev))
    if D != d:
        dq, dk, dv = (io.unpadded(a, d) for a in (dq, dk, dv))
    return dq, dk, dv


def _hashable(tiles):
    return None if tiles is None else tuple(tiles)


# ---- the caller's library: pointers, allocation, padding, stream

_ptr = _u64 = np.uint64                     # a device pointer travels as its 64 bits
_i32, _f32 = np.int32, np.float32


class _Stream:
    """A stream handle for CuPy's launch (which reads only `.ptr`): here, a torch stream's cudaStream_t."""
    __slots__ = ("ptr",)

    def __init__(self, ptr):
        self.ptr = ptr


def _cp():
    import cupy
    return cupy


def _cupy_padded(a, D):
    """a (..., d) zero-padded to (..., D), contiguous."""
    out = _cp().zeros(a.shape[:-1] + (D,), a.dtype)
    out[..., :a.shape[-1]] = a
    return out


class _CupyIO:
    """CuPy callers: CuPy arrays, CuPy's current stream."""
    contiguous = staticmethod(lambda a: a if a.flags.c_contiguous else _cp().ascontiguousarray(a))
    contiguous_f32 = staticmethod(lambda a: _cp().ascontiguousarray(a, dtype="float32"))
    empty_like = staticmethod(lambda a: _cp().empty_like(a))
    empty = staticmethod(lambda shape, a: _cp().empty(shape, dtype=a.dtype))
    empty_f32 = staticmethod(lambda shape, a: _cp().empty(shape, dtype="float32"))
    zeros = staticmethod(lambda shape, a: _cp().zeros(shape, dtype=a.dtype))
    full_f32 = staticmethod(lambda shape, value, a: _cp().full(shape, value, dtype="float32"))
    padded = staticmethod(_cupy_padded)
    unpadded = staticmethod(lambda a, d: _cp().ascontiguousarray(a[..., :d]))
    ptr = staticmethod(lambda a: a.data.ptr)
    device = staticmethod(lambda a: a.device.id)
    stream = staticmethod(lambda dev: None)


class _TorchIO:
    """torch callers: torch tensors allocated by PyTorch's caching allocator, torch's current stream (so CUDA graph
    capture and torch.cuda.stream(...) contexts see the launches)."""
    contiguous = staticmethod(lambda t: t.contiguous())
    contiguous_f32 = staticmethod(lambda t: t.contiguous().float())
    empty_like = staticmethod(lambda t: __import__("torch").empty_like(t, memory_format=_torch_contiguous()))
    empty = staticmethod(lambda shape, t: t.new_empty(shape))
    empty_f32 = staticmethod(lambda shape, t: t.new_empty(shape, dtype=_torch_f32()))
    zeros = staticmethod(lambda shape, t: t.new_zeros(shape))
    full_f32 = staticmethod(lambda shape, value, t: t.new_full(shape, value, dtype=_torch_f32()))
    padded = staticmethod(lambda t, D: __import__("torch").nn.functional.pad(t, (0, D - t.shape[-1])))
    unpadded = staticmethod(lambda t, d: t[..., :d].contiguous())
    ptr = staticmethod(lambda t: t.data_ptr())
    device = staticmethod(lambda t: t.get_device())
    stream = staticmethod(lambda dev: _torch_stream(dev))


@functools.lru_cache(maxsize=None)
def _torch_f32():
    import torch
    return torch.float32


@functools.lru_cache(maxsize=None)
def _torch_contiguous():
    import torch
    return torch.contiguous_format


_STREAMS = {}


def _torch_stream(dev):
    import torch
    try:
        raw = torch._C._cuda_getCurrentRawStream(dev)       # what torch.compile's generated code calls: cheap
    except AttributeError:
        raw = torch.cuda.current_stream(dev).cuda_stream
    s = _STREAMS.get(raw)
    if s is None:
        s = _STREAMS[raw] = _Stream(raw)
    return s


def _io(x):
    return _TorchIO if type(x).__module__.startswith("torch") else _CupyIO


@functools.lru_cache(maxsize=None)
def _device_cc(device):
    import cupy as cp
    return _cc_int(cp.cuda.Device(device).compute_capability)


@functools.lru_cache(maxsize=None)
def _kernel_on(device, file, name, smem=0):
    """_kernel compiled and loaded for GPU `device` (a CUDA module belongs to one device's context)."""
    import cupy as cp
    with cp.cuda.Device(device):
        fn = _kernel(file, name, smem)
        return getattr(fn, "kernel", fn)   # a RawKernel's loaded cupy.cuda.function.Function: one Python layer less
