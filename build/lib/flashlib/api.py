"""Layer 6: `flashlib.attention` and `flashlib.attention_backward`, one entry point over every backend.

Inputs are (batch, heads, seq, head_dim) arrays of NumPy, CuPy, PyTorch or Numba; results come back as the
caller's kind of array. `backend` names one implementation:
  reference  float64 NumPy, materialises the N x N matrix (flashlib.reference)
  tiled      FlashAttention-2 in NumPy, tile by tile (flashlib.tiled)
  numba      Numba-CUDA kernels: float32 forward and backward; fp16/bf16 forward on Tensor Cores (flashlib.numba_kernels)
  cupy       CUDA C kernels through CuPy: float32 on CUDA cores, fp16/bf16 on Tensor Cores (flashlib.cupy_kernels)
  auto       a GPU backend when a GPU and a GPU dtype are present, else reference
"""
import importlib

import numpy as np

from . import reference, tiled
from .env import simulated
from ._arrays import DTYPES, dtype_name, kind_of, like, on_gpu, to_cupy, to_numba, to_numpy

BACKENDS = ("reference", "tiled", "numba", "cupy")


def available_backends():
    """The backends that can run here, in BACKENDS order."""
    return tuple(b for b in BACKENDS if _unavailable_reason(b) is None)


def _unavailable_reason(name):
    if name in ("reference", "tiled"):
        return None
    try:
        if name == "numba":
            from numba import cuda
            return None if cuda.is_available() else "Numba finds no CUDA GPU (set NUMBA_ENABLE_CUDASIM=1 for the simulator)"
        import cupy
        return None if cupy.cuda.is_available() else "CuPy finds no CUDA GPU"
    except Exception as e:  # an import error or a broken CUDA install
        return f"{name} cannot be imported here ({type(e).__name__}: {e})"


def _check_arrays(names, arrays):
    kinds = {kind_of(a) for a in arrays}
    if len(kinds) > 1:
        raise TypeError(f"{', '.join(names)} must be the same kind of array, got {sorted(kinds)}")
    dts = {dtype_name(a) for a in arrays}
    if len(dts) > 1:
        raise TypeError(f"{', '.join(names)} must share one dtype, got {sorted(dts)}")
    dt = dts.pop()
    if dt not in DTYPES:
        raise TypeError(f"unsupported dtype {dt}; accepted: {', '.join(DTYPES)}")
    if len({on_gpu(a) for a in arrays}) > 1:
        raise ValueError(f"{', '.join(names)} must all be on the GPU or all on the host")
    return dt


def _validate(q, k, v, causal, scale):
    """Check shapes and types; return (dtype name, scale). Shapes: q (B, H, Nq, d), k and v (B, H, Nk, d)."""
    dt = _check_arrays(("q", "k", "v"), (q, k, v))
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.ndim != 4:
            raise ValueError(f"{name} must have 4 dimensions (batch, heads, seq, head_dim), got shape {tuple(a.shape)}")
        if 0 in tuple(a.shape):
            raise ValueError(f"{name} is empty (shape {tuple(a.shape)}); every dimension must be at least 1")
    if tuple(q.shape[:2]) != tuple(k.shape[:2]) or tuple(k.shape[:2]) != tuple(v.shape[:2]):
        raise ValueError(f"batch and heads must match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same sequence length, got {k.shape[2]} and {v.shape[2]}")
    if q.shape[3] != k.shape[3] or k.shape[3] != v.shape[3]:
        raise ValueError(f"q, k and v must share one head_dim, got {q.shape[3]}, {k.shape[3]}, {v.shape[3]}")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be True or False, got {causal!r}")
    if scale is None:
        scale = reference.default_scale(q.shape[3])
    if not (isinstance(scale, (int, float, np.floating)) and np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number or None (1/sqrt(head_dim)), got {scale!r}")
    return dt, float(scale)


def choose_backend(backend, x, dt):
    """The backend that runs for `backend` ('auto' or a name) on array x of dtype name dt; errors if unavailable."""
    if backend == "auto":
        if dt != "float64":                        # the kernels take float32 (both) and fp16/bf16 (cupy)
            for b in ("numba", "cupy") if dt == "float32" else ("cupy",):
                if _unavailable_reason(b) is None and not (b == "numba" and simulated()):
                    return b
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of: auto, {', '.join(BACKENDS)}")
    why = _unavailable_reason(backend)
    if why:
        raise RuntimeError(f"backend {backend!r} is not available: {why}. Available here: {', '.join(available_backends())}")
    return backend


def _host(fn, arrays, dt, x):
    """Run a NumPy backend on host copies; hand results back as x's kind."""
    outs = fn(*[to_numpy(a).astype(np.float64) for a in arrays])
    return [like(o, x, dt if o.ndim == 4 else _lse_dtype(dt)) for o in outs]


def _lse_dtype(dt):
    return "float64" if dt == "float64" else "float32"


def attention(q, k, v, causal=False, scale=None, backend="auto", return_lse=False):
    """softmax(scale * q k^T [+ causal mask]) v.

    q: (B, H, Nq, d), k and v: (B, H, Nk, d), one dtype of float16, bfloat16, float32, float64.
    Returns O (B, H, Nq, d) in q's dtype and kind, and with return_lse the logsumexp (B, H, Nq) in float32
    (float64 for float64 input).
    """
    dt, scale = _validate(q, k, v, causal, scale)
    name = choose_backend(backend, q, dt)
    if name in ("reference", "tiled"):
        fwd = reference.attention_forward if name == "reference" else tiled.fa2_forward
        o, lse = _host(lambda q_, k_, v_: fwd(q_, k_, v_, causal=causal, scale=scale), (q, k, v), dt, q)
    else:
        o, lse = _gpu_call(name, "forward", (q, k, v), dt, causal, scale)
    return (o, lse) if return_lse else o


def attention_backward(q, k, v, o, lse, do, causal=False, scale=None, backend="auto"):
    """Gradients (dq, dk, dv) of attention, given the forward's O and logsumexp and the output gradient dO.

    Shapes as in `attention`; o and do (B, H, Nq, d), lse (B, H, Nq). Results have q's dtype and kind.
    """
    dt, scale = _validate(q, k, v, causal, scale)
    _check_arrays(("q", "o", "do"), (q, o, do))
    for name, a in (("o", o), ("do", do)):
        if tuple(a.shape) != tuple(q.shape):
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(a.shape)}")
    if tuple(lse.shape) != tuple(q.shape[:3]):
        raise ValueError(f"lse must have shape (B, H, Nq) = {tuple(q.shape[:3])}, got {tuple(lse.shape)}")
    name = choose_backend(backend, q, dt)
    if name in ("reference", "tiled"):
        bwd = reference.attention_backward if name == "reference" else tiled.backward
        return tuple(_host(lambda *a: bwd(*a, causal=causal, scale=scale), (q, k, v, o, lse, do), dt, q))
    return _gpu_call(name, "backward", (q, k, v, o, lse, do), dt, causal, scale)


def _gpu_call(name, fn, arrays, dt, causal, scale):
    """Convert to the backend's arrays (zero-copy on the GPU), run, convert back to the caller's kind."""
    mod = importlib.import_module(f"flashlib.{name}_kernels")
    x = arrays[0]
    conv = to_numba if name == "numba" else to_cupy
    outs = getattr(mod, fn)(*[conv(a) for a in arrays], causal=causal, scale=scale, dtype=dt)
    return tuple(like(y, x, dt if len(y.shape) == 4 else "float32") for y in outs)
