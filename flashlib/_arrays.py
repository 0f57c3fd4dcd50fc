"""The one array-conversion helper: NumPy, CuPy, PyTorch and Numba device arrays, zero-copy on the GPU.

GPU arrays move between libraries through DLPack / `__cuda_array_interface__` without copying; NumPy
arrays are copied to the device and the results copied back.
"""
import math
import numbers

import numpy as np

from .constants import default_scale

DTYPES = ("float16", "bfloat16", "float32", "float64")


def kind_of(x):
    """'numpy', 'torch', 'cupy' or 'numba' (a Numba device array)."""
    mod = type(x).__module__.split(".")[0]
    if mod == "torch":
        return "torch"
    if mod == "cupy":
        return "cupy"
    if mod == "numba" or (mod != "numpy" and hasattr(x, "__cuda_array_interface__")):
        return "numba"
    if isinstance(x, np.ndarray):
        return "numpy"
    raise TypeError(f"expected a NumPy, CuPy or PyTorch array or a Numba device array, got {type(x).__name__}")


def dtype_name(x):
    """The element type as a string: 'float32', 'float16', 'bfloat16', ... (torch and NumPy spell them alike)."""
    return dtype_str(x.dtype).replace("torch.", "")


_DTYPE_STR = {}


def dtype_str(dt):
    """str(dt), cached by the dtype object: str() of a NumPy (or CuPy) dtype costs microseconds, on every call."""
    name = _DTYPE_STR.get(dt)
    if name is None:
        name = _DTYPE_STR[dt] = str(dt)
    return name


def on_gpu(x):
    k = kind_of(x)
    return k in ("cupy", "numba") or (k == "torch" and x.is_cuda)


def to_numpy(x):
    k = kind_of(x)
    if k == "torch":
        t = x.detach().cpu()
        return (t.float() if dtype_name(x) == "bfloat16" else t).numpy()
    if k == "cupy":
        return x.get()
    if k == "numba":
        return x.copy_to_host()
    return np.asarray(x)


def to_numba(x):
    """A Numba device array viewing x (GPU arrays) or holding a copy of it (host arrays). bfloat16 travels as its
    int16 bits, as for CuPy."""
    from numba import cuda
    if kind_of(x) == "numpy":
        return cuda.to_device(np.ascontiguousarray(x))
    if kind_of(x) == "torch":
        t = x.detach()
        if dtype_name(t) == "bfloat16":                  # not exported by __cuda_array_interface__: its bits are
            t = t.view(__import__("torch").int16)
        return cuda.as_cuda_array(t) if t.is_cuda else cuda.to_device(np.ascontiguousarray(t.numpy()))
    return cuda.as_cuda_array(x)


def to_cupy(x):
    """A CuPy array viewing x (GPU arrays) or holding a copy (host arrays). bfloat16 travels as its uint16 bits."""
    import cupy as cp
    k = kind_of(x)
    if k == "torch":
        t = x.detach()
        if t.dtype.is_floating_point and dtype_name(t) == "bfloat16":
            t = t.view(__import__("torch").int16)
        return cp.from_dlpack(t) if t.is_cuda else cp.asarray(t.numpy())
    if k == "numba":
        return cp.asarray(x)
    return cp.asarray(x)


def like(y, x, dtype):
    """Backend result y (NumPy, CuPy or Numba array) as the caller's kind of array on x's device, of `dtype`.

    CuPy has no bfloat16: a bfloat16 result arrives as uint16 bits and is viewed back here.
    """
    k = kind_of(x)
    if k == "torch":
        import torch
        yk = kind_of(y)
        if yk != "numpy" and x.is_cuda:                  # GPU to GPU: no copy
            t = torch.from_dlpack(y) if yk == "cupy" else torch.as_tensor(y, device=x.device)
        else:                                            # a host caller gets a host tensor back
            t = torch.from_numpy(np.ascontiguousarray(to_numpy(y)))
        if dtype == "bfloat16" and t.dtype in (torch.int16, torch.uint16):
            t = t.view(torch.bfloat16)
        return t.to(device=x.device, dtype=getattr(torch, dtype))
    if k == "numpy":
        return to_numpy(y).astype(dtype, copy=False)
    if k == "cupy":
        import cupy as cp
        return cp.asarray(y).astype(dtype, copy=False)
    return y if kind_of(y) == "numba" else to_numba(np.asarray(y).astype(dtype, copy=False))


# ---- the argument rules every entry point shares (flashlib.attention, attention_backward, flashlib.torch, the
# kernel modules): strict types, no bool()/float() coercion of what the user passed

def check_causal(causal):
    """causal must be a real boolean: True, False or numpy.bool_ (not 0/1, not "False", not a tensor)."""
    if causal is True or causal is False or isinstance(causal, np.bool_):
        return bool(causal)
    raise TypeError(f"causal / is_causal must be True or False, got {causal!r} ({type(causal).__name__})")


def check_scale(scale, d):
    """The softmax scale as a Python float: None -> 1/sqrt(d); else a real number (int, float, fractions.Fraction,
    NumPy integer or floating scalar, or a 0-d NumPy array of such) that is finite and > 0. Refused: bool, str,
    complex, tensors and GPU arrays (pass a Python float: reading a GPU scalar would stall the host)."""
    if scale is None:
        return default_scale(d)
    if type(scale) is float or type(scale) is int:
        value = float(scale)
    elif isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (numbers.Real, np.ndarray)):
        raise TypeError(f"scale must be a real number or None (1/sqrt(head_dim)), got {scale!r} "
                        f"({type(scale).__name__})")
    elif isinstance(scale, np.ndarray):
        if scale.ndim != 0 or scale.dtype.kind not in "iuf":
            raise TypeError(f"scale as an array must be 0-d of an integer or floating dtype, got shape "
                            f"{scale.shape}, dtype {scale.dtype}")
        value = float(scale)
    else:
        value = float(scale)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"scale must be finite and > 0, got {scale!r}")
    return value


def repeat_heads(x, group):
    """(B, H_kv, N, d) -> (B, H_kv * group, N, d), kv head j repeated for query heads j*group ... j*group+group-1."""
    kind = kind_of(x)
    if kind == "torch":
        return x.repeat_interleave(group, dim=1)
    if kind == "numpy":
        return np.repeat(x, group, axis=1)
    import cupy as cp
    return like(cp.repeat(to_cupy(x), group, axis=1), x, dtype_name(x) if kind != "numba" else str(x.dtype))


def sum_heads(dx, group):
    """(B, H_kv * group, N, d) -> (B, H_kv, N, d): the sum over each group of query heads, accumulated in float32
    (float64 for float64)."""
    B, H, N, d = dx.shape
    kind = kind_of(dx)
    if kind == "torch":
        import torch
        acc = torch.float64 if dx.dtype == torch.float64 else torch.float32
        return dx.reshape(B, H // group, group, N, d).sum(2, dtype=acc).to(dx.dtype)
    acc = np.float64 if dx.dtype == np.float64 else np.float32
    if kind == "numpy":
        return dx.reshape(B, H // group, group, N, d).sum(2, dtype=acc).astype(dx.dtype)
    import cupy as cp
    y = to_cupy(dx)
    return like(y.reshape(B, H // group, group, N, d).sum(2, dtype=acc).astype(y.dtype), dx, str(y.dtype))
