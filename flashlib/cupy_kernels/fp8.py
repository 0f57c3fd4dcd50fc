"""Rung 'fa3_fp8' (fa3_fp8.cu): an FP8 (e4m3) forward on Hopper, with its host side: per-(batch, head) quantisation,
incoherent processing by a random Hadamard rotation, V transposed for the kernel, tensor maps, the launch.

FlashAttention-3 (Shah et al. 2024, section 3.3) runs both products in FP8 at twice the fp16 Tensor Core rate.
Two of its measures against FP8's 3 mantissa bits are here:
  * block quantisation: one scale per (batch, head) for each of Q, K, V (e4m3_scale: amax times float32(1 / 448),
    448 being e4m3's largest finite value); the kernel takes the descale factors (q_descale, k_descale, v_descale),
    folds q_descale * k_descale into the softmax scale and v_descale into the epilogue;
  * incoherent processing: Q and K multiplied by one random orthogonal matrix M = diag(s) H / sqrt(d) along d (H the
    Sylvester Hadamard matrix, s random signs), which leaves Q K^T unchanged, (Q M)(K M)^T = Q M M^T K^T = Q K^T,
    and spreads a few large entries (outliers) over all d columns before they are rounded.
The kernel reads V^T, its keys permuted within each 32 as fa3_fp8.cu's header derives (`key_permutation`).

Two implementations of that preparation, one answer (Fp8Inputs): `quantize_reference` in torch operations (M as a
float32 matrix product, quantize_e4m3, transpose_v; any device and dtype: the tests' oracle), and for 16-bit CUDA
tensors `quantize_fused` (fp8_quant.cu): pass 1 the amax per (batch, head), pass 2 the e4m3 bytes with V^T written
directly, M applied in both as the fast Walsh-Hadamard transform (d log d adds a row, in registers and warp
shuffles). `quantize` picks. They differ only in the rotation's rounding (summation order).
Their speed: fp8_quant.cu's header (record fp8_quant_h200).

Opt-in only: no default path runs FP8 (it changes the numbers). Entries: `forward_fp8(q, k, v, ...)` on 16-bit torch
CUDA tensors (quantises inside), `forward_fp8_quantized(q8, k8, v8, q_descale, k_descale, v_descale, ...)` on e4m3
tensors, and `forward_fp8_prepared(Fp8Inputs, ...)` on what `quantize` returns (the kernel alone).
"""
import ctypes
import functools
from collections import namedtuple

import numpy as np

from .._arrays import check_scale
from .config_hopper import fa3_grid
from .fp8_tiles import FP8_HEAD_DIMS, FP8_OTHER_TILES, SIG_FP8, block_bytes, default_tiles, fp8_config
from .tma import sm_count

E4M3_MAX = 448.0                 # the largest finite e4m3 value (OCP FP8 spec; torch.finfo(torch.float8_e4m3fn).max)
Fp8Inputs = namedtuple("Fp8Inputs", "q8 k8 vt8 q_descale k_descale v_descale Nk")
Fp8Inputs.__doc__ = """Kernel-ready FP8 inputs: q8 (B, H, Nq, d), k8 (B, H_kv, Nk, d) e4m3; vt8 (B, H_kv, d, Nk32)
e4m3, V transposed with keys permuted in 32s (transpose_v); descales float32 (B, H) and (B, H_kv); Nk."""


def key_permutation():
    """perm (32 ints): K position p of a 32-key chunk of P V holds key perm[p] (fa3_fp8.cu's header): position
    16 h + 4 t + i is key 16 h + 2 t + (i & 1) + 8 (i >> 1), the keys thread t of a quad holds in the S accumulator."""
    p = np.arange(32)
    h, t, i = p // 16, (p % 16) // 4, p % 4
    return 16 * h + 2 * t + (i & 1) + 8 * (i >> 1)


# ---------------------------------------------------------------- quantisation and the Hadamard rotation

def sylvester(d):
    """The d x d Sylvester Hadamard matrix (d a power of two) as a float64 NumPy array: entries +-1, H H^T = d I."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs d a power of two, got {d}")
    h = np.ones((1, 1))
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h


def hadamard_signs(d, seed=0):
    """s, the d random signs (+-1.0, float64 NumPy) of random_hadamard(d, seed), drawn from `seed`."""
    return np.random.default_rng(seed).choice((-1.0, 1.0), size=d)


def random_hadamard(d, seed=0):
    """M = diag(s) H / sqrt(d), s = hadamard_signs(d, seed): orthogonal (M M^T = I), float64 NumPy."""
    return hadamard_signs(d, seed)[:, None] * sylvester(d) / np.sqrt(d)


def e4m3_scale(amax):
    """The per-(batch, head) scale (= the descale factor) of float32 amax: amax / 448 as amax times float32(1 / 448)
    (what torch's CUDA division by a Python number computes, here on every device, and fp8_quant.cu's pair_scale),
    1 where amax is 0."""
    import torch
    return torch.where(amax > 0, amax * (1.0 / E4M3_MAX), torch.ones_like(amax))


def quantize_e4m3(x):
    """x (B, H, N, d) float tensor -> (x8 e4m3 of x / scale, descale = scale float32 (B, H)), one scale per (batch,
    head): amax / 448, so that the largest |x| of each head maps to e4m3's largest finite value (1 where x is 0)."""
    import torch
    scale = e4m3_scale(x.detach().abs().float().amax(dim=(2, 3)))
    x8 = (x.float() / scale[:, :, None, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return x8, scale.contiguous()


def transpose_v(v8):
    """v8 (B, H_kv, Nk, d) e4m3 -> V^T (B, H_kv, d, Nk32), Nk32 = Nk rounded up to 32 (zero keys), the keys of each
    32 in key_permutation's order (column 32 c + p holds key 32 c + perm[p])."""
    import torch
    B, Hkv, Nk, d = v8.shape
    n32 = -(-Nk // 32) * 32
    u = torch.nn.functional.pad(v8.view(torch.uint8), (0, 0, 0, n32 - Nk))       # e4m3 0x00 is +0
    perm = torch.as_tensor(key_permutation(), device=v8.device)
    u = u.view(B, Hkv, n32 // 32, 32, d)[:, :, :, perm].reshape(B, Hkv, n32, d)
    return u.transpose(2, 3).contiguous().view(torch.float8_e4m3fn)


def rotate(x, m):
    """x (..., d) times the d x d matrix m (NumPy), as float32 (quantised next: no rounding to x's dtype between)."""
    import torch
    mt = torch.as_tensor(m, dtype=torch.float32, device=x.device)
    return x.float() @ mt


def quantize_reference(q, k, v, hadamard=True, seed=0):
    """`quantize` in torch operations (any device, float32 too; the tests' oracle for the fused kernels): with
    hadamard, q and k times random_hadamard(d, seed) as a float32 matmul; quantize_e4m3 each; transpose_v."""
    if hadamard:
        m = random_hadamard(q.shape[-1], seed)
        q, k = rotate(q, m), rotate(k, m)
    (q8, qd), (k8, kd), (v8, vd) = quantize_e4m3(q), quantize_e4m3(k), quantize_e4m3(v)
    return Fp8Inputs(q8, k8, transpose_v(v8), qd, kd, vd, v.shape[2])


def quantize(q, k, v, hadamard=True, seed=0):
    """Fp8Inputs of q (B, H, Nq, d), k, v (B, H_kv, Nk, d): with hadamard, q and k rotated by random_hadamard(d, seed)
    first; each of q, k, v quantised per (batch, head) (quantize_e4m3's scale); V transposed (transpose_v's layout).
    float16/bfloat16 torch CUDA tensors go to the fused kernels (quantize_fused: two passes, fp8_quant.cu) on GPUs
    with e4m3 conversion (compute capability 8.9+); anything else (CPU, float32, older GPUs) to quantize_reference."""
    import torch
    fused = all(isinstance(x, torch.Tensor) and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
                for x in (q, k, v))
    if fused and torch.cuda.get_device_capability(q.device) >= (8, 9):
        return quantize_fused(q, k, v, hadamard, seed)
    return quantize_reference(q, k, v, hadamard, seed)


# ---------------------------------------------------------------- the fused quantisation (fp8_quant.cu)

QUANT_DTYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16"}
SIG_QUANT = {"fp8_amax": "PPPPPiiiii", "fp8_quant": "PPPPPPPPPiiiii"}   # q, k, v, signs, amax, [descale, q8, k8,
QUANT_THREADS, VT_KEYS = 256, 128   # vt8], Nq, Nk, BH, BHkv, had; threads a block; keys of a V^T tile


def quant_rows(d):
    """Rows of Q or K a block of fp8_quant.cu takes: 4 steps of 256 threads, d / 8 threads a row (16 KB of input)."""
    return 4 * QUANT_THREADS // (d // 8)


def quant_instances():
    """Kernel name expressions of fp8_quant.cu: both passes for each 16-bit dtype and head dim."""
    return [f"{k}<{t}, {d}>" for k in SIG_QUANT for t in QUANT_DTYPES.values() for d in FP8_HEAD_DIMS]


def _quant_launchers(device, dtype, d):
    """(pass 1, pass 2) Launchers for torch dtype name `dtype`, head dim d, compiled for the GPU's own architecture."""
    from .build import _kernel_on
    return tuple(_kernel_on(device, "fp8_quant.cu", f"{k}<{QUANT_DTYPES[dtype]}, {d}>", 0, None, sig)
                 for k, sig in SIG_QUANT.items())


@functools.lru_cache(maxsize=64)
def _signs_on(d, seed, device):
    import torch
    return torch.as_tensor(hadamard_signs(d, seed), dtype=torch.float32, device=device)


def _quant_inputs(q, k, v):
    """Checked, contiguous, 16-byte-aligned q, k, v and the dtype name; clear errors for what the kernels refuse."""
    import torch
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check(x, name, dtypes=(torch.float16, torch.bfloat16))
        if x.dim() != 4:
            raise ValueError(f"{name} must be (B, H, N, d), got shape {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype and q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share one dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on "
                         f"{q.device}/{k.device}/{v.device}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k and v must be (B, H_kv, Nk, d) like q's B and d, got {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[3] not in FP8_HEAD_DIMS:
        raise ValueError(f"the fused FP8 quantisation takes head_dim in {FP8_HEAD_DIMS}, got {q.shape[3]}")
    if min(q.shape[:3]) < 1 or min(k.shape[1:3]) < 1:
        raise ValueError(f"empty q or k: shapes {tuple(q.shape)}, {tuple(k.shape)}")
    if torch.cuda.get_device_capability(q.device) < (8, 9):
        raise ValueError("the fused FP8 quantisation needs compute capability 8.9+ (e4m3 conversion); "
                         "quantize_reference runs anywhere")
    out = []
    for x in (q, k, v):
        x = x.contiguous()
        out.append(x if x.data_ptr() % 16 == 0 else x.clone())   # 16-byte loads
    return (*out, str(q.dtype).removeprefix("torch."))


def quantize_fused(q, k, v, hadamard=True, seed=0, out=None):
    """`quantize` of float16/bfloat16 torch CUDA tensors by fp8_quant.cu on torch's current stream: pass 1 the amax
    per (batch, head) (of x M for q, k with hadamard, the rotation as a fast Walsh-Hadamard transform), pass 2 the
    rotation again, x / scale to e4m3, V^T written directly. Same Fp8Inputs as quantize_reference, up to the
    rotation's rounding (summation order). out: (q8, k8, vt8) contiguous e4m3 tensors to write into (the tests pass
    NaN-filled ones), else new."""
    import torch
    q, k, v, dtype = _quant_inputs(q, k, v)
    (B, H, Nq, d), (Hkv, Nk) = q.shape, k.shape[1:3]
    n32, BH, BHkv, dev = -(-Nk // 32) * 32, B * H, B * Hkv, q.device
    shapes = ((B, H, Nq, d), (B, Hkv, Nk, d), (B, Hkv, d, n32))
    if out is None:
        out = tuple(torch.empty(s, dtype=torch.float8_e4m3fn, device=dev) for s in shapes)
    for name, x, s in zip(("q8", "k8", "vt8"), out, shapes):
        _check(x, name, s, (torch.float8_e4m3fn,))
        if not x.is_contiguous() or x.device != dev:
            raise ValueError(f"{name} must be contiguous on {dev}")
    nd = BH + 2 * BHkv
    buf = torch.zeros(2 * nd, dtype=torch.float32, device=dev)     # amax (float bits, zeroed), then the descales
    signs = _signs_on(d, int(seed), dev) if hadamard else buf      # not read without the rotation
    r = quant_rows(d)
    g1 = max(BH * -(-Nq // r), BHkv * -(-Nk // r))
    g2 = max(g1, BHkv * -(-Nk // VT_KEYS))
    if g2 >= 2 ** 31:
        raise ValueError(f"too many blocks ({g2}) for one launch: B*H*N too large")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    amax_k, quant_k = _quant_launchers(index, dtype, d)
    stream = torch.cuda.current_stream(dev).cuda_stream
    xs = (q.data_ptr(), k.data_ptr(), v.data_ptr(), signs.data_ptr(), buf.data_ptr())
    tail = (Nq, Nk, BH, BHkv, int(bool(hadamard)))
    amax_k((g1, 3), (QUANT_THREADS,), xs + tail, 0, stream)
    quant_k((g2, 3), (QUANT_THREADS,), xs + (buf.data_ptr() + 4 * nd,) + tuple(x.data_ptr() for x in out) + tail,
            0, stream)
    qd, kd, vd = buf[nd:].split((BH, BHkv, BHkv))
    return Fp8Inputs(*out, qd.view(B, H), kd.view(B, Hkv), vd.view(B, Hkv), Nk)


# ---------------------------------------------------------------- tensor maps and the launch

@functools.lru_cache(maxsize=1024)
def map8(ptr, cols, rows, pairs, box_cols, box_rows):
    """128 bytes of a CUtensorMap over a contiguous (pairs, rows, cols) byte tensor at ptr: dims (cols, rows, pairs)
    innermost first, boxes (box_cols, box_rows, 1), box_cols = 32, 64 or 128 bytes with the swizzle of that width,
    out-of-range elements read as 0."""
    from .tma import TensorMap, encode_tiled
    if ptr % 16 or cols % 16:
        raise ValueError(f"TMA needs 16-byte-aligned rows, got address {ptr:#x}, {cols} bytes a row")
    m = TensorMap()
    dims = (ctypes.c_uint64 * 3)(cols, rows, pairs)
    strides = (ctypes.c_uint64 * 2)(cols, cols * rows)
    box = (ctypes.c_uint32 * 3)(box_cols, box_rows, 1)
    swizzle = {32: 1, 64: 2, 128: 3}[box_cols]          # CU_TENSOR_MAP_SWIZZLE_32B, _64B, _128B
    encode_tiled(m, 0, ptr, dims, strides, box, swizzle)    # 0: CU_TENSOR_MAP_DATA_TYPE_UINT8
    return ctypes.string_at(ctypes.addressof(m.arg), 128)


def _launcher(device, cfg):
    from .build import _kernel_on
    return _kernel_on(device, "fa3_fp8.cu", cfg.kernel, cfg.smem, "sm_90a", SIG_FP8)


def precompile(device=0, out="bfloat16", workers=8, other_tiles=False):
    """Compile every default-tile fa3_fp8 kernel (each head dim, causal and not; plain, persistent and trimmed; with
    other_tiles FP8_OTHER_TILES' too) in parallel threads."""
    import concurrent.futures
    cfgs = [fp8_config(d, c, t, out) for d in FP8_HEAD_DIMS for c in (False, True)
            for t in (default_tiles(d, False), default_tiles(d, True), default_tiles(d, False, True)) +
            (FP8_OTHER_TILES[d] if other_tiles else ())]
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        list(ex.map(lambda c: _launcher(device, c), cfgs))


def _check(x, name, shape=None, dtypes=None):
    import torch
    if not isinstance(x, torch.Tensor) or not x.is_cuda:
        raise TypeError(f"{name} must be a torch CUDA tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {x.dtype}; fa3_fp8 expects {' or '.join(map(str, dtypes))}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def forward_fp8_prepared(inp, causal=False, scale=None, out="bfloat16", tiles=None, o=None, lse=None):
    """fa3_fp8 on Fp8Inputs (`quantize`'s answer): returns o (B, H, Nq, d) in `out` (bfloat16 or float16) and lse
    (B, H, Nq) float32 (natural log), on torch's current stream. scale: of the original (unquantised) scores.
    o, lse: contiguous tensors of those shapes to write into (the tests pass NaN-filled ones), else new."""
    import torch
    q8, k8, vt8, qd, kd, vd, Nk = inp
    e4m3 = (torch.float8_e4m3fn,)
    _check(q8, "q8", dtypes=e4m3)
    if q8.dim() != 4:
        raise ValueError(f"q8 must be (B, H, Nq, d), got shape {tuple(q8.shape)}")
    B, H, Nq, d = q8.shape
    Hkv, n32 = k8.shape[1], -(-Nk // 32) * 32
    _check(k8, "k8", (B, Hkv, Nk, d), e4m3)
    _check(vt8, "vt8", (B, Hkv, d, n32), e4m3)
    for name, x, h in (("q_descale", qd, H), ("k_descale", kd, Hkv), ("v_descale", vd, Hkv)):
        _check(x, name, (B, h), (torch.float32,))
    if Hkv == 0 or H % Hkv or Nq < 1 or Nk < 1:
        raise ValueError(f"fa3_fp8 needs H_kv dividing H and Nq, Nk >= 1; got H={H}, H_kv={Hkv}, Nq={Nq}, Nk={Nk}")
    if torch.cuda.get_device_capability(q8.device) != (9, 0):
        raise ValueError("fa3_fp8 runs on Hopper (compute capability 9.0, sm_90a code) only")
    cfg = fp8_config(d, causal, tiles, out, Nk)
    scale = check_scale(scale, d)
    q8, k8, vt8, qd, kd, vd = (x.contiguous() for x in (q8, k8, vt8, qd, kd, vd))
    if o is None:
        o = torch.empty(B, H, Nq, d, dtype=getattr(torch, out), device=q8.device)
    if lse is None:
        lse = torch.empty(B, H, Nq, dtype=torch.float32, device=q8.device)
    _check(o, "o", (B, H, Nq, d), (getattr(torch, out),))
    _check(lse, "lse", (B, H, Nq), (torch.float32,))
    if not (o.is_contiguous() and lse.is_contiguous()):
        raise ValueError("o and lse must be contiguous")
    BH, BHkv, sw = B * H, B * Hkv, block_bytes(d)
    maps = (map8(q8.data_ptr(), d, Nq, BH, sw, cfg.Br), map8(k8.data_ptr(), d, Nk, BHkv, sw, cfg.Bc),
            map8(vt8.data_ptr(), n32, d, BHkv, block_bytes(cfg.Bc), d))
    args = maps + tuple(x.data_ptr() for x in (o, lse, qd, kd, vd)) + (Nq, Nk, scale, BH, H // Hkv)
    dev = q8.device.index if q8.device.index is not None else torch.cuda.current_device()
    _launcher(dev, cfg)(fa3_grid(cfg, Nq, BH, sm_count(dev)), (cfg.threads,), args, cfg.smem,
                        torch.cuda.current_stream(q8.device).cuda_stream)
    return o, lse


def forward_fp8_quantized(q8, k8, v8, q_descale, k_descale, v_descale, causal=False, scale=None, out="bfloat16",
                          tiles=None):
    """fa3_fp8 on already-quantised e4m3 q8 (B, H, Nq, d), k8, v8 (B, H_kv, Nk, d) with float32 descale factors
    (B, H), (B, H_kv), (B, H_kv): q = q8 * q_descale etc. V is transposed here (transpose_v, an extra pass)."""
    import torch
    _check(v8, "v8", k8.shape, (torch.float8_e4m3fn,))
    return forward_fp8_prepared(Fp8Inputs(q8, k8, transpose_v(v8), q_descale, k_descale, v_descale, v8.shape[2]),
                                causal, scale, out, tiles)


def forward_fp8(q, k, v, causal=False, scale=None, hadamard=True, seed=0, out=None, tiles=None):
    """FP8 attention forward of 16-bit torch CUDA tensors q (B, H, Nq, d), k, v (B, H_kv, Nk, d), d in
    FP8_HEAD_DIMS: quantised per (batch, head) to e4m3, with hadamard (incoherent processing) q and k rotated by
    random_hadamard(d, seed) first. Returns (o in q's dtype, or `out`; lse float32 (B, H, Nq))."""
    import torch
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check(x, name, dtypes=(torch.float16, torch.bfloat16))
        if x.dim() != 4:
            raise ValueError(f"{name} must be (B, H, N, d), got shape {tuple(x.shape)}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k and v must be (B, H_kv, Nk, d) like q's B and d, got {tuple(k.shape)}, {tuple(v.shape)}")
    out = out or str(q.dtype).removeprefix("torch.")
    return forward_fp8_prepared(quantize(q, k, v, hadamard, seed), causal, scale, out, tiles)
