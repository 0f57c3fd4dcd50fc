"""Shared helpers for the Numba kernels: head-dim buckets, checks, output allocation, the trace array."""
import os

import numpy as np
from numba import cuda, float32

from .._arrays import check_causal, check_scale  # the argument rules every entry point shares
from ..cupy_kernels import pair_grid  # pure Python (CuPy is imported only at a CuPy launch): one home for the grid rule

# Kernels are compiled for a fixed padded head dimension D (a compile-time constant: local arrays and loops over
# it need one). A head dim d <= D is zero-padded up to D in shared memory; columns >= d are never written.
HEAD_DIMS = (8, 16, 32, 64, 128, 256)
MAX_HEAD_DIM = HEAD_DIMS[-1]


# A kernel's (batch, head) pair is cuda.blockIdx.y + cuda.gridDim.y * cuda.blockIdx.z: pair_grid spreads the B*H pairs
# over grid.y (limit 65535) and grid.z, and blocks past the last pair return. (Spelled inline in every kernel: a
# kernel calling a device function cannot be compiled by cuda.compile_ptx without a GPU.)


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


def simulated():
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def head_bucket(d):
    """The smallest compiled head dimension D >= d."""
    for D in HEAD_DIMS:
        if d <= D:
            return D
    raise ValueError(f"head_dim {d} is not supported by the numba kernels: head dims 1..{MAX_HEAD_DIM} are accepted")


TC_DTYPES = ("float16", "bfloat16")                   # the Tensor Core variant 'tc' (fa2_tc.py) only


def check_dtype(dtype, variant=None):
    """float32 for every variant but 'tc', which takes float16 or bfloat16 (variant None: the float32 kernels)."""
    dtype = str(dtype)
    if variant == "tc":
        if dtype not in TC_DTYPES:
            raise ValueError(f"the numba variant 'tc' (Tensor Cores) accepts float16 or bfloat16, got {dtype}; "
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
