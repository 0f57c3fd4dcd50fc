"""The host side every Numba kernel shares: argument checks, head-dim buckets, device arrays (contiguous copies,
zero-padded head dims, new outputs from the caller's allocator, views in the layouts kernels take), compute
capability queries, launches (cached configurations, opt-in shared memory) and the grouped-query sum of dK, dV.
Also the float32 forms of flashlib.constants that kernel code uses (a Python float in a kernel is a float64).
"""
import functools
import sys

import numpy as np
from numba import cuda, float32

from .. import constants
from ..env import simulated

from .._arrays import check_causal, check_scale  # the argument rules every entry point shares
from ..cupy_kernels import pair_grid  # pure Python (CuPy is imported only at a CuPy launch): one home for the grid rule

NEG_INF = float32(constants.NEG_INF)   # kernel code: a masked score, the lse of a row that sees no key
LN2 = float32(constants.LN2)           # kernel code: lse = m * LN2 + log(l) for a running max m in base 2

# Kernels are compiled for a fixed padded head dimension D (a compile-time constant: local arrays and loops over
# it need one). A head dim d <= D is zero-padded up to D in shared memory; columns >= d are never written.
HEAD_DIMS = (8, 16, 32, 64, 128, 256)
MAX_HEAD_DIM = HEAD_DIMS[-1]


# A kernel's (batch, head) pair is cuda.blockIdx.y + cuda.gridDim.y * cuda.blockIdx.z: pair_grid spreads the B*H pairs
# over grid.y (limit 65535) and grid.z, and blocks past the last pair return.


def kv_groups(q, k):
    """G = H // H_kv, the query heads per kv head (grouped-query attention: query head h reads kv head h // G)."""
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"k and v have {Hkv} heads, which must divide q's {H} heads (grouped-query attention)")
    return H // Hkv


@cuda.jit
def sum_groups(a, out):
    """out (B, H_kv, N, d) = the sum of a (B, H, N, d) over each kv head's G = H // H_kv query heads. Grid
    (ceil(N/128), B*H_kv pairs over y, z), block 128: one thread per row."""
    row, bh = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x, cuda.blockIdx.y + cuda.gridDim.y * cuda.blockIdx.z
    b, hk = bh // out.shape[1], bh % out.shape[1]
    G = a.shape[1] // out.shape[1]
    if b < out.shape[0] and row < out.shape[2]:
        for x in range(out.shape[3]):
            s = float32(0.0)
            for g in range(G):
                s += a[b, hk * G + g, row, x]
            out[b, hk, row, x] = s


def grouped(dk, dv, k, dk_out=None, dv_out=None):
    """dK, dV computed per query head, summed into k's H_kv heads (into dk_out, dv_out when given); unchanged when
    every kv head has one query head. Cost: H / H_kv times the dK, dV memory and one more pass over it."""
    if dk.shape[1] == k.shape[1]:
        return dk, dv
    B, Hkv, Nk, d = k.shape
    outs = tuple(cuda.device_array((B, Hkv, Nk, d), np.float32) if a is None else a for a in (dk_out, dv_out))
    if dk.size:
        for a, out in zip((dk, dv), outs):
            sum_groups[pair_grid(n_blocks(Nk, 128), B * Hkv), (128,)](a, out)
    return outs


def head_bucket(d, dims=HEAD_DIMS, who="the numba kernels"):
    """The smallest compiled head dimension D >= d among dims (a kernel pads a head dim d up to D)."""
    for D in dims:
        if d <= D:
            return D
    raise ValueError(f"head_dim {d} is not supported by {who}: head dims 1..{dims[-1]} are accepted")


TC_DTYPES = ("float16", "bfloat16")    # the 16-bit Tensor Core variants 'tc' (fa2_tc.py) and 'wgmma' (fa2_wgmma.py)
TC_VARIANTS = ("tc", "wgmma")
TF32_HEAD_DIMS = (32, 64, 96, 128)   # the head dims the 3xTF32 kernels (fa2_tf32, fa2_bwd_tf32) compile, unpadded


def check_dtype(dtype, variant=None):
    """float32 for every variant but 'tc' and 'wgmma', which take float16 or bfloat16 (variant None: the float32
    kernels)."""
    dtype = str(dtype)
    if variant in TC_VARIANTS:
        if dtype not in TC_DTYPES:
            raise ValueError(f"the numba variant {variant!r} (Tensor Cores) accepts float16 or bfloat16, got {dtype}; "
                             "float32 runs on the other variants")
    elif dtype != "float32":
        where = "the numba backend" if variant is None else f"the numba variant {variant!r}"
        raise ValueError(f"{where} accepts float32 only, got {dtype}; float16/bfloat16 run on Tensor Cores with "
                         "variant='tc' (forward only) or backend='cupy'")


def check_arrays(*arrays):
    for a in arrays:
        if a.dtype != np.float32:
            raise ValueError(f"the numba kernels accept float32 arrays only, got {a.dtype}")


def device(x):
    """A Numba device array: NumPy arrays are copied to the device (handy in tests and the book)."""
    if isinstance(x, np.ndarray):
        return cuda.to_device(np.ascontiguousarray(x))
    return x if hasattr(x, "copy_to_host") else cuda.as_cuda_array(x)


def out_arrays(q, o=None, lse=None):
    """O (B, H, Nq, d) and lse (B, H, Nq) float32 device arrays, or the caller's (tests pass NaN-poisoned ones)."""
    B, H, Nq, d = q.shape
    o = cuda.device_array((B, H, Nq, d), np.float32) if o is None else o
    lse = cuda.device_array((B, H, Nq), np.float32) if lse is None else lse
    return o, lse


def trace_arrays(trace):
    """(array, tracing flag): the caller's int32 (blocks, steps, 2) device array, or a 1x1x2 dummy."""
    if trace is None:
        return cuda.to_device(np.zeros((1, 1, 2), np.int32)), False
    return trace, True


def n_blocks(N, B):
    return -(-N // B)


def scale_of(scale, d):
    """The softmax scale as float32, checked as every entry point checks it (None: 1/sqrt(d))."""
    return np.float32(check_scale(scale, d))


# ---------------------------------------------------------------- devices, launches
@functools.lru_cache(maxsize=256)
def launcher(kern, grid, NT):
    """kern[grid, NT], kept: Numba builds a launch configuration object (and checks it) on every kern[...]."""
    return kern[grid, (NT,)]


@functools.lru_cache(maxsize=1)
def one_gpu():
    return len(cuda.gpus) == 1


@functools.lru_cache(maxsize=1)
def _cc_of_the_gpu():
    return cuda.get_current_device().compute_capability


def device_cc():
    """The current device's compute capability (a tuple); with one GPU, asked once. The one place the Numba kernels
    ask it."""
    return _cc_of_the_gpu() if one_gpu() else cuda.get_current_device().compute_capability


_OPTED_IN = {}


def launch_dynamic(kern, grid, block, nbytes, args):
    """kern[grid, block, 0, nbytes](*args), allowed nbytes of dynamic shared memory: above 48 KB the compiled
    kernel must opt in (a driver attribute, set once per compiled kernel and device)."""
    if nbytes > constants.STATIC_SMEM_BYTES:
        kernel = kern.compile(tuple(kern.typeof_pyval(a) for a in args))     # the overload the launch will use
        dev = cuda.get_current_device()
        key = (id(kernel), dev.id)
        if _OPTED_IN.get(key, 0) < nbytes:
            from numba.cuda.cudadrv.driver import binding, driver
            cufunc = kernel._codelibrary.get_cufunc()
            attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            driver.cuKernelSetAttribute(attr, nbytes, cufunc.handle, dev.id)
            _OPTED_IN[key] = nbytes
    kern[grid, block, 0, nbytes](*args)


# ---------------------------------------------------------------- device arrays
@cuda.jit
def copy3(src, dst):
    """dst = src for 3-D arrays of any strides."""
    B, H, N = src.shape
    idx = cuda.grid(1)
    if idx < B * H * N:
        dst[idx // (H * N), (idx // N) % H, idx % N] = src[idx // (H * N), (idx // N) % H, idx % N]


@cuda.jit
def copy4(src, dst):
    """dst (B, H, N, D) = src (B, H, N, d <= D), any strides, with zero columns d ... D-1 (a plain copy when d == D).
    One thread per element of dst."""
    B, H, N, D = dst.shape
    idx = cuda.grid(1)
    if idx < B * H * N * D:
        x = idx % D
        n = (idx // D) % N
        bh = idx // (D * N)
        dst[bh // H, bh % H, n, x] = src[bh // H, bh % H, n, x] if x < src.shape[3] else 0


def padded(a, D):
    """a (B, H, N, d) as a C-contiguous (B, H, N, D) array, zero-padded (a itself when d == D and usable)."""
    if a.shape[3] == D:
        return contiguous(a)
    out = empty(a.shape[:3] + (D,), a.dtype)
    if out.size:
        copy4[(out.size + 255) // 256, 256](a, out)
    return out


@cuda.jit
def zero2(a):
    """a (rows, d) = 0, one element per thread (coalesced)."""
    idx = cuda.grid(1)
    if idx < a.size:
        a[idx // a.shape[1], idx % a.shape[1]] = 0.0


def flat(a):
    """(B, H, N, d) contiguous device array -> (B*H*N, d) view."""
    B, H, N, d = a.shape
    return a.reshape(B * H * N, d)


def copy(src, dst):
    """dst = src for device arrays of one shape (4-D or 3-D), any strides."""
    if src.size:
        (copy4 if src.ndim == 4 else copy3)[(src.size + 255) // 256, 256](src, dst)


def usable(a):
    """True if the kernel can use `a` in place: C-contiguous, 16-byte aligned (cp.async, 16-byte loads)."""
    return a.is_c_contiguous() and (simulated() or a.device_ctypes_pointer.value % 16 == 0)


def contiguous(a):
    """a, or a C-contiguous copy of it."""
    if usable(a):
        return a
    out = empty(a.shape, a.dtype)
    copy(a, out)
    return out


@functools.lru_cache(maxsize=1)
def _torch_cuda():
    import torch
    return torch if torch.cuda.is_available() else None


def empty(shape, dtype):
    """A new C-contiguous device array. Memory comes from torch's caching allocator when torch is already imported
    (else CuPy's memory pool when CuPy is), so that a call does not pay a cudaMalloc (Numba's cuda.device_array:
    about 0.1 ms for a 32 MB output on an H100, and Numba's deferred frees synchronize the device). Only with one
    GPU (the allocators' current device is then Numba's). cuda.as_cuda_array(..., sync=False): the kernel runs on
    the legacy default stream, which is torch's and CuPy's default stream too, so stream order already protects
    fresh memory; sync=True would make Numba wait on the exporter's stream, stalling the host for nothing."""
    dtype = np.dtype(dtype)
    if not simulated() and one_gpu():
        torch = _torch_cuda() if "torch" in sys.modules else None
        if torch is not None:
            return cuda.as_cuda_array(torch.empty(shape, dtype=getattr(torch, dtype.name), device="cuda"), sync=False)
        if "cupy" in sys.modules:
            import cupy
            return cuda.as_cuda_array(cupy.empty(shape, dtype), sync=False)
    return cuda.device_array(shape, dtype)


def view(a, shape, dtype):
    """The C-contiguous array a seen as `shape` of `dtype` (same bytes). Built directly: reshape + view of a Numba
    device array cost about 5 microseconds each (they go through its dummy-array model); the simulator's arrays are
    NumPy ones."""
    dtype = np.dtype(dtype)
    if simulated():
        return a.reshape(shape[0], -1).view(dtype)
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    strides = (shape[1] * dtype.itemsize, dtype.itemsize)
    return DeviceNDArray(shape, strides, dtype, stream=a.stream, gpu_data=a.gpu_data)


def words(a):
    """(B, H, N, d) C-contiguous 16-bit device array -> (B*H*N, d/2) uint32 view."""
    B, H, N, d = a.shape
    return view(a, (B * H * N, d // 2), np.uint32)
