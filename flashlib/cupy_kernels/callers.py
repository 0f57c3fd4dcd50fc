"""The cupy backend's callers' array libraries: CuPy arrays or torch CUDA tensors. One class per library answers
what the launch layer needs of an array (pointer, device, contiguity, padding, allocation, the current stream), so
that the launch layer (launch.py) is written once for both and outputs come back in the caller's kind."""
import functools

import numpy as np


@functools.lru_cache(maxsize=None)
def _cp():
    import cupy
    return cupy


def _cupy_contiguous(a):
    """a itself when C-contiguous, else a contiguous copy (ndarray._c_contiguous: no Flags object built per call)."""
    try:
        if a._c_contiguous:
            return a
    except AttributeError:          # a CuPy without the attribute
        if a.flags.c_contiguous:
            return a
    return _cp().ascontiguousarray(a)


def _cupy_padded(a, D):
    """a (..., d) zero-padded to (..., D), contiguous."""
    out = _cp().zeros(a.shape[:-1] + (D,), a.dtype)
    out[..., :a.shape[-1]] = a
    return out


def _one_device(get, arrays):
    dev = get(arrays[0])
    for a in arrays[1:]:
        if get(a) != dev:
            raise ValueError(f"all arrays must be on one GPU, got devices {[get(x) for x in arrays]}")
    return dev


class CupyIO:
    """CuPy callers: CuPy arrays, CuPy's current stream."""
    contiguous = staticmethod(_cupy_contiguous)
    copy = staticmethod(lambda a: a.copy(order="C"))
    contiguous_f32 = staticmethod(lambda a: _cp().ascontiguousarray(a, dtype="float32"))
    empty_like = staticmethod(lambda a: _cp().ndarray(a.shape, a.dtype))     # C order; faster than cupy.empty_like
    empty = staticmethod(lambda shape, a: _cp().empty(shape, dtype=a.dtype))
    empty_f32 = staticmethod(lambda shape, a: _cp().empty(shape, dtype="float32"))
    zeros = staticmethod(lambda shape, a: _cp().zeros(shape, dtype=a.dtype))
    full_f32 = staticmethod(lambda shape, value, a: _cp().full(shape, value, dtype="float32"))
    f32_maker = staticmethod(lambda shape, a: functools.partial(_cp().ndarray, shape, np.dtype("float32")))
    padded = staticmethod(_cupy_padded)
    unpadded = staticmethod(lambda a, d: _cp().ascontiguousarray(a[..., :d]))
    ptr = staticmethod(lambda a: a.data.ptr)
    devices = staticmethod(lambda *arrays: tuple(a.data.device_id for a in arrays))
    device = staticmethod(lambda *arrays: _one_device(lambda a: a.data.device_id, arrays))
    stream = staticmethod(lambda dev: _cp().cuda.get_current_stream().ptr)


class TorchIO:
    """torch callers: torch tensors allocated by PyTorch's caching allocator, torch's current stream (so CUDA graph
    capture and torch.cuda.stream(...) contexts see the launches)."""
    contiguous = staticmethod(lambda t: t.contiguous())
    copy = staticmethod(lambda t: t.clone(memory_format=_torch().contiguous_format))
    contiguous_f32 = staticmethod(lambda t: t.contiguous().float())
    empty_like = staticmethod(lambda t: _torch().empty_like(t))
    empty = staticmethod(lambda shape, t: t.new_empty(shape))
    empty_f32 = staticmethod(lambda shape, t: _torch().empty_like(_f32_template(t.get_device(), shape)))
    zeros = staticmethod(lambda shape, t: t.new_zeros(shape))
    full_f32 = staticmethod(lambda shape, value, t: t.new_full(shape, value, dtype=_torch().float32))
    f32_maker = staticmethod(lambda shape, t: functools.partial(_torch().empty_like, _f32_template(t.get_device(), shape)))
    padded = staticmethod(lambda t, D: _torch().nn.functional.pad(t, (0, D - t.shape[-1])))
    unpadded = staticmethod(lambda t, d: t[..., :d].contiguous())
    ptr = staticmethod(lambda t: t.data_ptr())
    devices = staticmethod(lambda *tensors: tuple(t.get_device() for t in tensors))
    device = staticmethod(lambda *tensors: _one_device(_torch_cuda_device, tensors))
    stream = staticmethod(lambda dev: _torch_stream(dev))


@functools.lru_cache(maxsize=1024)
def _f32_template(device, shape):
    """A float32 tensor of `shape` on `device` that owns 4 bytes (a stride-0 view): torch.empty_like of it
    allocates a contiguous tensor of that shape faster than torch.empty(shape, dtype=..., device=...) parses its
    arguments."""
    torch = _torch()
    dev = torch.device("cuda", device) if device >= 0 else torch.device("cpu")
    return torch.empty(1, dtype=torch.float32, device=dev).expand(shape)


def _torch_cuda_device(t):
    dev = t.get_device()
    if dev < 0:
        raise ValueError("the cupy backend takes CUDA tensors, got a CPU tensor")
    return dev


@functools.lru_cache(maxsize=None)
def _torch():
    import torch
    return torch


def _torch_stream(dev):
    """torch's current stream on GPU `dev` as a cudaStream_t (int)."""
    torch = _torch()
    try:
        return torch._C._cuda_getCurrentRawStream(dev)       # what torch.compile's generated code calls: cheap
    except AttributeError:
        return torch.cuda.current_stream(dev).cuda_stream


def io_of(x):
    """The IO class of x's library (torch tensors: TorchIO, else CupyIO)."""
    return TorchIO if type(x).__module__.startswith("torch") else CupyIO
