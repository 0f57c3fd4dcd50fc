"""Shared helpers for the Numba kernels: head-dim buckets, checks, output allocation, the trace array."""
import math
import os

import numpy as np
from numba import cuda

# Kernels are compiled for a fixed padded head dimension D (a compile-time constant: local arrays and loops over
# it need one). A head dim d <= D is zero-padded up to D in shared memory; columns >= d are never written.
HEAD_DIMS = (8, 16, 32, 64, 128)
MAX_HEAD_DIM = HEAD_DIMS[-1]


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
    return np.float32(1.0 / math.sqrt(d) if scale is None else scale)
