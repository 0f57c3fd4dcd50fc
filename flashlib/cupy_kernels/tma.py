"""Rung 7's host side: TMA tensor maps and `forward_fa3` (fa3_forward.cu, Hopper only).

A tensor map (CUtensorMap, 128 opaque bytes) tells the Tensor Memory Accelerator where a tensor lives, its sizes and
strides, the box one copy moves and how it is swizzled in shared memory. It is encoded on the host by the driver's
`cuTensorMapEncodeTiled` (CUDA Driver API, "Tensor Map Object Management"), here called through ctypes on libcuda,
and reaches the kernel by value as a `const __grid_constant__` parameter: build.Launcher packs its 128 bytes
(signature letter M) beside the other arguments, as CuPy's RawKernel call could not.

Every Q, K or V tensor is described in 3-D, innermost first: (d, N, pairs), so that a box of (64 columns, rows,
1 pair) that runs past the sequence's end reads zeros instead of the next head's rows, and 64 columns of 16-bit
values are one 128-byte swizzle row: the layout `sw128` of fa2_wgmma.cu / fa3_forward.cu.
The tile configuration (`fa3_config`, `smem_fa3`) is config_hopper.py's, pure Python; CuPy and libcuda are loaded
at the first launch. The launch layer (launch.py) runs rung 7 through `map_bytes` and build.Launcher; `forward_fa3`
here is the rung on its own (its tests and benchmark time the variants).
"""
import ctypes
import functools
import threading

from .._arrays import check_causal, check_scale
from .build import _kernel_on
from .config_hopper import (FA3_HEAD_DIMS, FA3_OTHER_TILES, FA3_TILES, FA3_VARIANTS, SIG_FA3, Fa3Config,  # noqa: F401
                            fa3_candidates, fa3_config, fa3_grid, fa3_instances, fa3_narrow_width, fa3_narrowed,
                            fa3_tiles, smem_fa3)

# cuda.h enums (CUtensorMapDataType, CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill)
_TMA_DTYPE = {"float16": 6, "bfloat16": 9, "float32": 7}
_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
_SWIZZLE_NONE, _SWIZZLE_128B, _L2_PROMOTION_128B, _OOB_FILL_ZERO, _INTERLEAVE_NONE = 0, 3, 2, 0, 0
VARIANTS = FA3_VARIANTS


def precompile(device=0, workers=16):
    """Compile and load every fa3_instances() kernel on GPU `device` in parallel threads (NVRTC releases the GIL);
    later launches find them in `_kernel`'s cache."""
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        list(ex.map(lambda c: _launcher(device, c), fa3_instances(configs=True)))


# ---------------------------------------------------------------- libcuda through ctypes

@functools.lru_cache(maxsize=None)
def _libcuda():
    return ctypes.CDLL("libcuda.so.1")


@functools.lru_cache(maxsize=None)
def _encode_fn():
    fn = _libcuda().cuTensorMapEncodeTiled
    u32, u64p, u32p = ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint32)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, u32, ctypes.c_void_p, u64p, u64p, u32p, u32p,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_INVALID_CONTEXT, _POINTER_ATTRIBUTE_CONTEXT = 201, 1     # CUDA_ERROR_INVALID_CONTEXT, CU_POINTER_ATTRIBUTE_CONTEXT


def _in_context_of(ptr, call):
    """call() with the CUDA context that owns device address ptr made current, the thread's own restored after:
    PyTorch may run a backward pass on a thread of its own where no context is current, and the driver encodes a
    tensor map only in one (CUDA Driver API: cuPointerGetAttribute, cuCtxGetCurrent, cuCtxSetCurrent)."""
    lib = _libcuda()
    owner, here = ctypes.c_void_p(), ctypes.c_void_p()
    rc = lib.cuPointerGetAttribute(ctypes.byref(owner), _POINTER_ATTRIBUTE_CONTEXT, ctypes.c_uint64(ptr))
    if rc != 0 or not owner.value:
        return _INVALID_CONTEXT
    lib.cuCtxGetCurrent(ctypes.byref(here))
    lib.cuCtxSetCurrent(owner)
    try:
        return call()
    finally:
        lib.cuCtxSetCurrent(here)


def encode_tiled(m, data_type, ptr, dims, strides, box, swizzle):
    """cuTensorMapEncodeTiled into TensorMap m: a 3-D tensor at ptr (dims innermost first, strides of dims 1, 2 in
    bytes, box), no interleave, the given swizzle, L2 promotion 128B, out-of-range elements read as 0. On a thread
    with no current context, encoded in the one that owns ptr; a failure raises RuntimeError naming the sizes."""
    one = (ctypes.c_uint32 * 3)(1, 1, 1)

    def encode():
        return _encode_fn()(ctypes.addressof(m.arg), data_type, 3, ctypes.c_void_p(ptr), dims, strides, box, one,
                            _INTERLEAVE_NONE, swizzle, _L2_PROMOTION_128B, _OOB_FILL_ZERO)
    rc = encode()
    if rc == _INVALID_CONTEXT:
        rc = _in_context_of(ptr, encode)
    if rc != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed with CUresult {rc} (dims {tuple(dims)}, box {tuple(box)})")


class TensorMap:
    """A CUtensorMap in a 64-byte-aligned host buffer (the driver wants it so); `.arg` is its 128 bytes."""
    __slots__ = ("_buf", "arg")

    def __init__(self):
        self._buf = ctypes.create_string_buffer(128 + 64)
        addr = ctypes.addressof(self._buf)
        self.arg = (ctypes.c_uint64 * 16).from_address(addr + (-addr) % 64)


def tensor_map_3d(ptr, dtype, d, n, pairs, box_rows):
    """Tensor map of a contiguous (pairs, n, d) tensor of `dtype` (float16, bfloat16: boxes of 64 columns; float32,
    the backward's dQ buffer: 32) at device address ptr (16-byte aligned): dims (d, n, pairs) innermost first, boxes
    of (128 bytes of columns, box_rows, 1), 128-byte swizzle, out-of-range rows read as 0 (and skipped by stores)."""
    if ptr % 16:
        raise ValueError(f"TMA needs a 16-byte-aligned tensor, got address {ptr:#x}")
    m = TensorMap()
    dims = (ctypes.c_uint64 * 3)(d, n, pairs)
    size = _BYTES[dtype]
    strides = (ctypes.c_uint64 * 2)(size * d, size * d * n)    # bytes, of dims 1 and 2
    box = (ctypes.c_uint32 * 3)(128 // size, box_rows, 1)
    encode_tiled(m, _TMA_DTYPE[dtype], ptr, dims, strides, box, _SWIZZLE_128B)
    return m


@functools.lru_cache(maxsize=1024)
def map_bytes(ptr, dtype, d, n, pairs, box_rows):
    """The 128 bytes of tensor_map_3d(...): a pure function of its arguments, so remembered (a caching allocator
    hands the same addresses out again; encoding costs microseconds of ctypes)."""
    return ctypes.string_at(ctypes.addressof(tensor_map_3d(ptr, dtype, d, n, pairs, box_rows).arg), 128)


@functools.lru_cache(maxsize=1024)
def rows_map_bytes(ptr, n, rows, box):
    """The 128 bytes of a tensor map of a contiguous (rows, n) float32 array at ptr (16-byte aligned, n a multiple
    of 4): dims (n, rows, 1), boxes of (box, 1, 1) elements, no swizzle; the Hopper backward's delta and Lb."""
    if ptr % 16 or n % 4:
        raise ValueError(f"TMA needs 16-byte-aligned rows, got address {ptr:#x} and rows of {n} floats")
    m = TensorMap()
    dims, strides = (ctypes.c_uint64 * 3)(n, rows, 1), (ctypes.c_uint64 * 2)(4 * n, 4 * n * rows)
    encode_tiled(m, _TMA_DTYPE["float32"], ptr, dims, strides, (ctypes.c_uint32 * 3)(box, 1, 1), _SWIZZLE_NONE)
    return ctypes.string_at(ctypes.addressof(m.arg), 128)


def _dtype_of(a):
    s = str(a.dtype)
    if s == "float16":
        return "float16"
    if s in ("int16", "uint16"):
        return "bfloat16"
    raise ValueError(f"forward_fa3 takes float16, or bfloat16 as int16 bits, got {s}")


def _launcher(device, cfg, file="fa3_forward.cu", sig=SIG_FA3):
    """rung 7's kernel `cfg.kernel` as a build.Launcher on GPU `device` (compiled once, for sm_90a); file and sig:
    the timeline's debug build (fa3_timeline.cu, one more pointer)."""
    return _kernel_on(device, file, cfg.kernel, cfg.smem, "sm_90a", sig)


@functools.lru_cache(maxsize=None)
def sm_count(device):
    """Streaming multiprocessors of GPU `device` (the persistent variant's grid)."""
    import cupy as cp
    return int(cp.cuda.Device(device).attributes["MultiProcessorCount"])


# ---------------------------------------------------------------- the dynamic scheduler's counters

SLAB = 1 << 16      # int32 counters allocated at once per device (256 KB)
_slabs = {}         # device -> [the slab (kept alive), its address, counters handed out]
_counters = {}      # (device, stream) -> the address of that stream's counter
_lock = threading.Lock()


def counter(device, stream, ctx):
    """Device address of a zero int32 for the "dynamic" variant's next_item on GPU `device`, for a launch on
    `stream` (a cudaStream_t, int); ctx: the kernel's CUDA context (build.Launcher.ctx). A launch sets its counter
    back to 0 (fa3_forward.cu), and launches on one stream run one after another, so each (device, stream) keeps
    one counter, handed out once from a zeroed slab. Inside a CUDA graph capture each launch gets a counter of its
    own instead: a graph keeps its counters, and its replays may run on any stream beside other work. The slab is
    allocated at the first call, which must not be inside a capture (RuntimeError there: call once before, as
    PyTorch's recipe warms up before capturing); a slab's counters are never handed out twice."""
    if not _capturing(ctx, stream):
        ptr = _counters.get((device, stream))
        if ptr is None:
            ptr = _counters.setdefault((device, stream), _take(device, False))
        return ptr
    return _take(device, True)


def _take(device, capturing):
    """The address of the next unused counter of `device`'s slab (a new slab when it is used up, not in a capture)."""
    with _lock:
        slab = _slabs.get(device)
        if slab is None or slab[2] == SLAB:
            if capturing:
                raise RuntimeError(f"rung 7's dynamic scheduler takes its counters from a slab allocated outside CUDA "
                                   f"graph captures, and none is left: run the attention once before the capture (a "
                                   f"slab serves {SLAB} captured launches)")
            slab = _slabs[device] = [*_new_slab(device), 0]
        slab[2] += 1
        return slab[1] + 4 * (slab[2] - 1)


def _new_slab(device):
    """(owner, address) of SLAB zeroed int32 on GPU `device`, written (on CuPy's current stream, then waited for)
    before any stream reads them."""
    import cupy as cp
    with cp.cuda.Device(device):
        buf = cp.zeros(SLAB, dtype=cp.int32)
        cp.cuda.get_current_stream().synchronize()
    return buf, buf.data.ptr


def _capturing(ctx, stream):
    """Whether `stream` is capturing a CUDA graph, asked in context ctx (a thread with another context current, or
    none, keeps it: the runtime would bind its primary context to the thread)."""
    from cupy_backends.cuda.api import driver, runtime
    here = driver.ctxGetCurrent()
    if here == ctx:
        return runtime.streamIsCapturing(stream)
    driver.ctxSetCurrent(ctx)
    try:
        return runtime.streamIsCapturing(stream)
    finally:
        driver.ctxSetCurrent(here)


def forward_fa3(q, k, v, causal, scale, tiles=None, variant=None, _debug=None, narrow=False):
    """Rung 7 forward on CuPy arrays: q (B, H, Nq, d), k and v (B, H_kv, Nk, d), H_kv dividing H, d in
    FA3_HEAD_DIMS, float16 or bfloat16 (as int16 bits); Nq, Nk >= 1. Returns (o like q, lse (B, H, Nq) float32,
    natural log), computed on CuPy's current stream. tiles: (Bc, stages[, consumer warpgroups]), default
    fa3_tiles(d, causal); variant: one of VARIANTS (default fa3_config's); narrow: a narrow last key tile where Nk
    leaves a partial one, in the persistent variants without the mask (config_hopper.fa3_narrowed; measured no
    faster, so not the default). _debug: a device pointer for the timeline build (timeline.py)."""
    import cupy as cp
    dtype = _dtype_of(q)
    if len(q.shape) != 4 or len(k.shape) != 4 or k.shape != v.shape or q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError(f"q (B, H, Nq, d) and k, v (B, H_kv, Nk, d) of one dtype; got {q.shape}, {k.shape}, {v.shape}")
    B, H, Nq, d = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != d or Hkv == 0 or H % Hkv:
        raise ValueError(f"k, v must be ({B}, H_kv, Nk, {d}) with H_kv dividing H = {H}; got {k.shape}")
    if Nq < 1 or Nk < 1 or B * H < 1:
        raise ValueError(f"forward_fa3 needs Nq, Nk, B*H >= 1, got Nq={Nq}, Nk={Nk}, B*H={B * H}")
    causal, scale = check_causal(causal), check_scale(scale, d)
    cfg = fa3_config(dtype, d, causal, tiles, variant, Nk, narrow)
    q, k, v = (cp.ascontiguousarray(a) for a in (q, k, v))
    o, lse = cp.empty_like(q), cp.empty((B, H, Nq), dtype=cp.float32)
    BH = B * H       # the tensor maps: (d, N, pairs), boxes of Br rows (q) or Bc rows (k, v); rows past N read as 0
    maps = [map_bytes(a.data.ptr, dtype, d, n, pairs, rows) for a, n, pairs, rows in
            ((q, Nq, BH, cfg.Br), (k, Nk, BH // (H // Hkv), cfg.Bc), (v, Nk, BH // (H // Hkv), cfg.Bc))]
    dev, stream = q.device.id, cp.cuda.get_current_stream().ptr
    fn = _launcher(dev, cfg) if _debug is None else _launcher(dev, cfg, "fa3_timeline.cu", SIG_FA3 + "P")
    tail = (counter(dev, stream, fn.ctx) if cfg.dynamic else 0,) + (() if _debug is None else (_debug,))
    fn(fa3_grid(cfg, Nq, BH, sm_count(dev)), (cfg.threads,),
       (*maps, o.data.ptr, lse.data.ptr, Nq, Nk, scale, BH, H // Hkv) + tail, cfg.smem, stream)
    return o, lse
