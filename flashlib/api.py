"""`flashlib.attention` and `flashlib.attention_backward`, one entry point over every backend.

Inputs are (batch, heads, seq, head_dim) arrays of NumPy, CuPy, PyTorch or Numba; results come back as the
caller's kind of array. `backend` names one implementation:
  reference  float64 NumPy, materialises the N x N matrix (flashlib.reference)
  tiled      FlashAttention-2 in NumPy, tile by tile (flashlib.tiled)
  numba      Numba-CUDA kernels: float32 forward and backward; fp16/bf16 forward on Tensor Cores (flashlib.numba_kernels)
  cupy       CUDA C kernels through CuPy: float32 on CUDA cores, fp16/bf16 on Tensor Cores (flashlib.cupy_kernels)
  auto       for GPU arrays a GPU backend (cupy for fp16/bf16, numba then cupy for float32); host arrays and
             float64 stay on the host (reference)
"""
import contextlib
import functools
import importlib
import warnings

import numpy as np

from . import reference, tiled
from .env import simulated
from ._arrays import (DTYPES, check_causal, check_scale, dtype_name, kind_of, like, on_gpu, repeat_heads, sum_heads,
                      to_cupy, to_numba, to_numpy)

BACKENDS = ("reference", "tiled", "numba", "cupy")


def available_backends():
    """The backends that can run here, in BACKENDS order."""
    return tuple(b for b in BACKENDS if _unavailable_reason(b) is None)


@functools.lru_cache(maxsize=None)
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
    """One kind of array, one dtype of DTYPES, one device (torch) or side (GPU / host); returns the dtype name."""
    x = arrays[0]
    t, dtype = type(x), getattr(x, "dtype", None)
    for a in arrays:                                      # the common case, cheaply: one type, dtype (and device)
        if type(a) is not t or dtype is None or a.dtype != dtype:
            break
    else:
        dt = dtype_name(x)
        if dt in DTYPES:
            if t.__module__[:5] != "torch":
                return dt
            dev = x.get_device()
            for a in arrays:
                if a.get_device() != dev:
                    break
            else:
                return dt
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
    if kinds == {"torch"} and len({a.device for a in arrays}) > 1:
        raise ValueError(f"{', '.join(names)} must be on one device, got {sorted({str(a.device) for a in arrays})}")
    return dt


def validate(q, k, v, causal, scale):
    """The one check of attention's inputs, shared by every entry point; returns (dtype name, scale as a float).

    q (B, H, Nq, d), k and v (B, H_kv, Nk, d) with H_kv dividing H (grouped-query attention: query head h reads kv
    head h // (H // H_kv)); one kind of array, one dtype of DTYPES, one device; causal a real bool; scale as
    `check_scale` accepts it. Array signatures that passed once (kinds, shapes, dtypes, torch devices) are
    remembered, so a repeated call checks only causal and scale again.
    """
    key = _signature(q, k, v)
    try:
        dt = _VALID.get(key)
    except TypeError:                       # an unhashable shape or dtype: check every time
        key = dt = None
    if dt is None:
        dt = check_arrays(q, k, v)
        if key is not None:
            if len(_VALID) > 4096:          # a bound for programs that see endless shapes
                _VALID.clear()
            _VALID[key] = dt
    if causal is not True and causal is not False:
        check_causal(causal)
    return dt, check_scale(scale, q.shape[3])


class Route:
    """How a call with arrays of one signature runs: validate's verdict (dt, scale), the backend chosen (name), and
    where the backend prepares one (cupy on torch CUDA tensors or CuPy arrays), its forward and backward made for
    that signature, so that a repeated call skips the checks and look-ups (`route`)."""
    __slots__ = ("dt", "scale", "name", "causal", "fwd", "_bwd")

    def __init__(self, q, k, v, causal, scale, backend):
        self.dt, self.scale = validate(q, k, v, causal, scale)
        self.name, self.causal, self._bwd = choose_backend(backend, self.dt, on_gpu(q)), bool(causal), None
        self.fwd = None
        if self.name == "cupy" and kind_of(q) in ("torch", "cupy") and on_gpu(q):
            self.fwd = _cupy_kernels().prepare_forward(q, k, v, causal=self.causal, scale=self.scale, dtype=self.dt)

    def forward(self, q, k, v):
        """(O, lse) for q, k, v of the route's signature."""
        if self.fwd is not None:
            return self.fwd(q, k, v)
        return forward(self.name, q, k, v, self.causal, self.scale, self.dt)

    def backward(self, q, k, v, o, lse, do):
        """(dq, dk, dv) for the route's q, k, v, the o and lse its forward returned, and do of o's shape and dtype."""
        if self._bwd is None:
            self._bwd = self.fwd is not None and _cupy_kernels().prepare_backward(
                q, k, v, causal=self.causal, scale=self.scale, dtype=self.dt)
        if self._bwd:
            return self._bwd(q, k, v, o, lse, do)
        return backward(self.name, q, k, v, o, lse, do, self.causal, self.scale, self.dt)


_ROUTES = {}    # (array signature, causal, scale, backend) -> Route


def route(q, k, v, causal, scale, backend):
    """The Route of a call (validated, with its backend chosen, prepared at the first call of its signature);
    causal and scale must be exactly what the caller passed (the cache tells True from 1 and 1.0 from 1)."""
    try:
        key = _signature(q, k, v), causal, type(causal), scale, type(scale), backend
        found = _ROUTES.get(key) if key[0] is not None else None
    except TypeError:           # unhashable arguments: no cache
        key = found = None
    if found is None:
        found = Route(q, k, v, causal, scale, backend)
        if key is not None and key[0] is not None:
            if len(_ROUTES) > 4096:
                _ROUTES.clear()
            _ROUTES[key] = found
    return found


def check_arrays(q, k, v):
    """validate's check of the arrays themselves, remembering nothing; returns the dtype name."""
    dt = _check_arrays(("q", "k", "v"), (q, k, v))
    check_shapes(q, k, v)
    return dt


def check_shapes(q, k, v):
    """q (B, H, Nq, d), k and v (B, H_kv, Nk, d), no dimension 0, H_kv dividing H; else the error naming why."""
    qs, ks = tuple(q.shape), tuple(k.shape)
    if len(qs) != 4 or len(ks) != 4 or tuple(v.shape) != ks or 0 in qs or 0 in ks or ks[0] != qs[0] \
            or ks[3] != qs[3] or qs[1] % ks[1]:
        _shape_error(q, k, v)


_VALID = {}     # array signature -> dtype name, for signatures that passed validate


def _signature(q, k, v):
    """What validate's verdict (and a Route) depends on besides causal and scale: the three arrays' types, shapes and
    dtypes, and torch tensors' and CuPy arrays' devices; None for what is not an array (validate then explains)."""
    t = type(q)
    if t is not type(k) or t is not type(v) or not hasattr(q, "shape") or not hasattr(k, "shape") \
            or not hasattr(v, "shape"):
        return None
    key = (t, q.shape, k.shape, v.shape, getattr(q, "dtype", None), getattr(k, "dtype", None),
           getattr(v, "dtype", None))
    if t.__module__[:5] == "torch":
        key += (q.get_device(), k.get_device(), v.get_device())
    elif t.__module__[:4] == "cupy":
        key += (q.data.device_id, k.data.device_id, v.data.device_id)
    return key


def _shape_error(q, k, v):
    """Raise the error that names what is wrong with these shapes."""
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.ndim != 4:
            raise ValueError(f"{name} must have 4 dimensions (batch, heads, seq, head_dim), got shape {tuple(a.shape)}")
        if 0 in tuple(a.shape):
            raise ValueError(f"{name} is empty (shape {tuple(a.shape)}); every dimension must be at least 1")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same sequence length, got {k.shape[2]} and {v.shape[2]}")
    if k.shape[3] != q.shape[3] or v.shape[3] != q.shape[3]:
        raise ValueError(f"q, k and v must share one head_dim, got {q.shape[3]}, {k.shape[3]}, {v.shape[3]}")
    raise ValueError(f"batch and heads must match (or, grouped-query, k and v's H_kv heads divide q's H): "
                     f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")


def check_lse(lse, q, dt):
    """lse must be q's kind of array on q's device, (B, H, Nq), float32 (float64 for float64 inputs; float32 is also
    taken there)."""
    if type(lse) is not type(q) or on_gpu(lse) != on_gpu(q) or (kind_of(q) == "torch" and lse.device != q.device):
        raise TypeError(f"lse must be the same kind of array as q on q's device ({kind_of(q)}), got "
                        f"{type(lse).__module__}.{type(lse).__name__}")
    want = ("float32", "float64") if dt == "float64" else ("float32",)
    if dtype_name(lse) not in want:
        raise TypeError(f"lse must have dtype {' or '.join(want)} for {dt} inputs, got {dtype_name(lse)}")
    if tuple(lse.shape) != tuple(q.shape[:3]):
        raise ValueError(f"lse must have shape (B, H, Nq) = {tuple(q.shape[:3])}, got {tuple(lse.shape)}")


@functools.lru_cache(maxsize=None)
def _auto(dt, gpu):
    """What backend='auto' picks for dtype dt on the GPU (gpu=True) or the host: a GPU backend for GPU dtypes on a
    GPU (cupy for fp16/bf16, numba then cupy for float32), else reference. Host arrays stay on the host."""
    if gpu and dt != "float64":
        for b in ("numba", "cupy") if dt == "float32" else ("cupy",):
            if _unavailable_reason(b) is None and not (b == "numba" and simulated()):
                return b
    return "reference"


def choose_backend(backend, dt, gpu):
    """The backend that runs for `backend` ('auto' or a name) on arrays of dtype name dt, on the GPU (gpu=True) or
    the host; errors name what is unavailable and what would be accepted."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string (auto, {', '.join(BACKENDS)}), got {backend!r}")
    return _choose(backend, dt, bool(gpu))


@functools.lru_cache(maxsize=None)
def _choose(backend, dt, gpu):                # only answers are cached: an error is raised again at every call
    if backend == "auto":
        return _auto(dt, gpu)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of: auto, {', '.join(BACKENDS)}")
    why = _unavailable_reason(backend)
    if why:
        raise RuntimeError(f"backend {backend!r} is not available: {why}. Available here: {', '.join(available_backends())}")
    return backend


def _warn_if_detaching(q, k, v):
    if kind_of(q) == "torch" and (q.requires_grad or k.requires_grad or v.requires_grad):
        import torch
        if torch.is_grad_enabled():
            warnings.warn("flashlib.attention does not record gradients: its result is detached from q, k, v. "
                          "Use flashlib.torch.scaled_dot_product_attention for autograd.", stacklevel=3)


def attention(q, k, v, causal=False, scale=None, backend="auto", return_lse=False):
    """softmax(scale * q k^T [+ causal mask]) v.

    q: (B, H, Nq, d), k and v: (B, H_kv, Nk, d) with H_kv dividing H, one dtype of float16, bfloat16, float32,
    float64. Returns O (B, H, Nq, d) in q's dtype and kind, and with return_lse the logsumexp (B, H, Nq) in float32
    (float64 for float64 input). torch tensors that require grad are read detached (with a warning): autograd goes
    through flashlib.torch.
    """
    r = route(q, k, v, causal, scale, backend)
    _warn_if_detaching(q, k, v)
    o, lse = r.forward(q, k, v)
    return (o, lse) if return_lse else o


def attention_backward(q, k, v, o, lse, do, causal=False, scale=None, backend="auto"):
    """Gradients (dq, dk, dv) of attention, given the forward's O and logsumexp and the output gradient dO.

    Shapes as in `attention`; o and do (B, H, Nq, d), lse (B, H, Nq) as `check_lse` says. Results have q's dtype
    and kind; dk, dv have k's shape (summed over the query heads that share a kv head).
    """
    dt, scale = validate(q, k, v, causal, scale)
    _check_arrays(("q", "o", "do"), (q, o, do))
    for name, a in (("o", o), ("do", do)):
        if tuple(a.shape) != tuple(q.shape):
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(a.shape)}")
    check_lse(lse, q, dt)
    return backward(choose_backend(backend, dt, on_gpu(q)), q, k, v, o, lse, do, causal, scale, dt)


# ---- running a backend on validated inputs (flashlib.torch's operator calls these too)

_HOST = {"reference": (reference.attention_forward, reference.attention_backward),
         "tiled": (tiled.fa2_forward, tiled.backward)}


@functools.lru_cache(maxsize=None)
def native_gqa(name):
    """The directions ('forward', 'backward') in which backend `name` takes k, v with fewer heads than q itself
    (its module's GQA attribute); for the others flashlib repeats k, v per query head and sums dk, dv back."""
    mod = {"reference": reference, "tiled": tiled}.get(name) or importlib.import_module(f"flashlib.{name}_kernels")
    return tuple(getattr(mod, "GQA", ()))


def forward(name, q, k, v, causal, scale, dt):
    """(O, lse) of backend `name` for inputs that passed `validate`, in q's kind."""
    group = q.shape[1] // k.shape[1]
    if group > 1 and "forward" not in native_gqa(name):
        k, v = repeat_heads(k, group), repeat_heads(v, group)
    if name in _HOST:
        fwd = _HOST[name][0]
        return tuple(_host(lambda q_, k_, v_: fwd(q_, k_, v_, causal=causal, scale=scale), (q, k, v), dt, q))
    return _gpu_call(name, "forward", (q, k, v), dt, causal, scale)


def backward(name, q, k, v, o, lse, do, causal, scale, dt):
    """(dq, dk, dv) of backend `name` for validated inputs, in q's kind; dk, dv of k's shape."""
    group = q.shape[1] // k.shape[1]
    if group > 1 and "backward" not in native_gqa(name):
        dq, dk, dv = backward(name, q, repeat_heads(k, group), repeat_heads(v, group), o, lse, do, causal, scale, dt)
        return dq, sum_heads(dk, group), sum_heads(dv, group)
    if name in _HOST:
        bwd = _HOST[name][1]
        return tuple(_host(lambda *a: bwd(*a, causal=causal, scale=scale), (q, k, v, o, lse, do), dt, q))
    return _gpu_call(name, "backward", (q, k, v, o, lse, do), dt, causal, scale)


def _host(fn, arrays, dt, x):
    """Run a NumPy backend on host copies; hand results back as x's kind."""
    outs = fn(*[to_numpy(a).astype(np.float64) for a in arrays])
    return [like(o, x, dt if o.ndim == 4 else _lse_dtype(dt)) for o in outs]


def _lse_dtype(dt):
    return "float64" if dt == "float64" else "float32"


def _gpu_call(name, fn, arrays, dt, causal, scale):
    """Run a GPU backend. torch and CuPy arrays go to the cupy backend as they are (it allocates and launches in
    their library, on their current stream); the rest is viewed as the backend's arrays (zero-copy on the GPU) and
    the results as the caller's kind."""
    x = arrays[0]
    if name == "cupy":
        cupy_kernels = _cupy_kernels()
        kind = kind_of(x)
        if (kind == "torch" and x.is_cuda) or kind == "cupy":
            return getattr(cupy_kernels, fn)(*arrays, causal=causal, scale=scale, dtype=dt)
        outs = getattr(cupy_kernels, fn)(*[to_cupy(a) for a in arrays], causal=causal, scale=scale, dtype=dt)
    else:
        from . import numba_kernels
        with _numba_stream_order(x):
            outs = getattr(numba_kernels, fn)(*[to_numba(a) for a in arrays], causal=causal, scale=scale, dtype=dt)
    return tuple(like(y, x, dt if len(y.shape) == 4 else "float32") for y in outs)


@functools.lru_cache(maxsize=None)
def _cupy_kernels():
    from . import cupy_kernels
    return cupy_kernels


@contextlib.contextmanager
def _numba_stream_order(x):
    """The Numba kernels launch on the legacy default stream. For a torch caller on another stream, order them after
    its pending work and its later work after them (GPU-side waits); inside a CUDA graph capture, refuse."""
    if kind_of(x) != "torch" or not x.is_cuda:
        yield
        return
    import torch
    cur, legacy = torch.cuda.current_stream(x.device), torch.cuda.default_stream(x.device)
    if cur == legacy:
        yield
        return
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("the numba backend launches on the legacy default stream and cannot be captured into a "
                           "CUDA graph; use backend='cupy'")
    legacy.wait_stream(cur)
    yield
    cur.wait_stream(legacy)
