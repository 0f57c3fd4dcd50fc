"""flashlib as a PyTorch operator: registered custom ops and a drop-in for F.scaled_dot_product_attention.

    from flashlib.torch import scaled_dot_product_attention as sdpa
    y = sdpa(q, k, v, is_causal=True)             # q: (B, H, Nq, d), k, v: (B, H_kv, Nk, d); y.backward() works

Two operators are registered with torch.library.custom_op, each with a fake (meta) kernel:

  flashlib::attention_forward(q, k, v, causal, scale, backend) -> (O, lse)
  flashlib::attention_backward(dO, q, k, v, O, lse, causal, scale, backend) -> (dQ, dK, dV)

and the forward's autograd formula (register_autograd) saves (q, k, v, O, lse) and calls the backward operator: the
FlashAttention recipe, nothing of size N x N kept between the passes. Because they are registered operators,
torch.compile traces them without a graph break, torch.library.opcheck checks them, and on CUDA tensors the cupy
backend allocates its outputs with PyTorch's allocator and launches on torch.cuda.current_stream(), so CUDA graph
capture and side streams work. The backward operator is not differentiable: a double backward raises.
"""
import numbers

import torch
from torch import Tensor

from . import api
from ._arrays import check_causal, check_scale
from .constants import NEG_INF, default_scale

__all__ = ["attention_forward", "attention_backward", "flash_attention", "scaled_dot_product_attention",
           "resolve_backend", "naive_attention", "cupy_allocates_from_torch"]

_DTYPE = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float64: "float64"}


def resolve_backend(q, backend="auto"):
    """The backend that runs for tensor q: 'auto' keeps CPU tensors on the host ('reference', exact and vectorised)
    and picks a GPU backend for CUDA tensors (cupy for fp16/bf16, numba or cupy for fp32); a name is checked."""
    return _resolve(backend, _DTYPE.get(q.dtype, str(q.dtype)), q.is_cuda)


@torch.compiler.assume_constant_result          # torch.compile calls it once while tracing and keeps the answer
def _resolve(backend, dt, is_cuda):
    return api.choose_backend(backend, dt, is_cuda)


# ---- the operators -----------------------------------------------------------------------------------------------

@torch.library.custom_op("flashlib::attention_forward", mutates_args=())
def attention_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    """(O, lse) of attention by flashlib backend `backend`. q (B, H, Nq, d), k, v (B, H_kv, Nk, d), H_kv | H;
    O (B, H, Nq, d) contiguous in q's dtype, lse (B, H, Nq) float32 (float64 for float64). lse has no gradient."""
    return api.forward(backend, q, k, v, causal, scale, _DTYPE[q.dtype])


@attention_forward.register_fake
def _(q, k, v, causal, scale, backend):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=lse_dtype)


@torch.library.custom_op("flashlib::attention_backward", mutates_args=())
def attention_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool,
                       scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dQ, dK, dV) for output gradient dO; dK, dV have k's shape (summed over the query heads sharing a kv head)."""
    return api.backward(backend, q, k, v, o, lse, do, causal, scale, _DTYPE[q.dtype])


@attention_backward.register_fake
def _(do, q, k, v, o, lse, causal, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_forward(ctx, inputs, output):
    q, k, v, causal, scale, backend = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend


def _backward_of_forward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = attention_backward(do, q, k, v, o, lse, ctx.causal, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None


def _no_double_backward(ctx, *grads):
    raise RuntimeError("flashlib.torch: double backward is not implemented (the gradient of attention's gradient, "
                       "as create_graph=True followed by another backward needs); use "
                       "torch.nn.functional.scaled_dot_product_attention with the math backend for that")


attention_forward.register_autograd(_backward_of_forward, setup_context=_setup_forward)
attention_backward.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


# ---- the Python entry points ---------------------------------------------------------------------------------------

def flash_attention(q, k, v, causal=False, scale=None, backend="auto"):
    """Differentiable flashlib attention on (B, H, N, d) tensors (k, v may have fewer heads: GQA); returns O.

    Under torch.compile, tensor subclasses (FakeTensor) and dispatch or function modes: the registered operator.
    Plain eager calls run the operators' implementations directly, the same launches, without the dispatcher's
    round trips through Python (custom_op's autograd wrapper costs more host time than the kernels at small
    shapes): with no gradient needed, a plain call; else `_EagerAttention`, whose backward is the backward operator
    when a graph of the gradient is asked for (create_graph=True), so a double backward raises the same error."""
    if _plain_eager(q, k, v):
        r = api.route(q, k, v, causal, scale, backend)
        if (q.requires_grad or k.requires_grad or v.requires_grad) and torch.is_grad_enabled():
            return _eager_apply(q, k, v, r)
        return r.forward(q, k, v)[0]
    dt = _traced_check(q, k, v)
    check_causal(causal)
    scale = check_scale(scale, q.shape[3])
    return attention_forward(q, k, v, bool(causal), scale, _resolve(backend, dt, q.is_cuda))[0]


def _traced_check(q, k, v):
    """api.validate's rules in what torch.compile traces: torch dtypes looked up here, no cache (a dictionary of
    NumPy dtypes is beyond Dynamo); any error comes from api.check_arrays, which names it."""
    dt = _DTYPE.get(q.dtype)
    if dt is None or k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device \
            or not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)):
        return api.check_arrays(q, k, v)
    api.check_shapes(q, k, v)
    return dt


def _plain_eager(q, k, v):
    T = torch.Tensor
    return (type(q) is T and type(k) is T and type(v) is T and not torch.compiler.is_compiling()
            and not torch._C._is_torch_function_mode_enabled() and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._are_functorch_transforms_active())          # torch.func's transforms: the operator


class _EagerAttention(torch.autograd.Function):
    """flashlib::attention_forward's autograd formula (see _setup_forward, _backward_of_forward) as a plain
    autograd.Function over the same implementations, for eager calls: the call's api.Route (validated, backend
    chosen, prepared for its signature) runs both passes."""

    @staticmethod
    def forward(ctx, q, k, v, r):
        o, lse = r.forward(q, k, v)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.route = r
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        r = ctx.route
        if torch.is_grad_enabled():              # create_graph=True: the operator, whose own backward raises
            dq, dk, dv = attention_backward(do, q, k, v, o, lse, r.causal, r.scale, r.name)
        else:
            dq, dk, dv = r.backward(q, k, v, o, lse, do)
        return dq, dk, dv, None


# _EagerAttention.apply without autograd.Function.apply's Python layer (functorch's unwrapping and argument binding,
# which plain tensors and this Function's positional arguments do not need): the C++ apply it calls in the end
_C_APPLY = torch._C._FunctionBase.__dict__.get("apply")
_eager_apply = _C_APPLY.__get__(None, _EagerAttention) if _C_APPLY is not None else _EagerAttention.apply


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, backend="auto"):
    """torch.nn.functional.scaled_dot_product_attention's signature, computed by flashlib.

    Supported: query (..., H, Nq, d), key and value (..., H_kv, Nk, d) with the same leading dimensions; H_kv = H,
    or with enable_gqa=True any H_kv dividing H (4-D inputs); is_causal (top-left aligned when Nq != Nk, as in
    PyTorch); scale (a real number). Refused with NotImplementedError naming the argument: attn_mask, dropout_p
    other than 0, a value head dim different from d, broadcasting. Strict types: is_causal and enable_gqa must be
    bools, scale a real number or None.
    """
    if attn_mask is not None:
        raise NotImplementedError("flashlib.torch: attn_mask is not supported (only is_causal); "
                                  "use torch.nn.functional.scaled_dot_product_attention for arbitrary masks")
    if not (dropout_p == 0.0 and type(dropout_p) is float) and (
            isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or dropout_p != 0):
        raise NotImplementedError(f"flashlib.torch: dropout_p must be 0.0, got {dropout_p!r} (no attention dropout)")
    check_causal(enable_gqa)
    if not (isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and isinstance(value, torch.Tensor)):
        raise TypeError(f"query, key and value must be torch tensors, got {type(query).__name__}, "
                        f"{type(key).__name__}, {type(value).__name__}")
    qs, ks, vs = query.shape, key.shape, value.shape
    if len(qs) < 3 or len(ks) != len(qs) or len(vs) != len(qs):
        raise ValueError(f"query, key and value must have one number (>= 3) of dimensions (..., seq, head_dim), got "
                         f"shapes {tuple(qs)}, {tuple(ks)}, {tuple(vs)}")
    if vs[-1] != qs[-1] or ks[-1] != qs[-1]:
        raise NotImplementedError(f"flashlib.torch: query, key and value must share one head dim, got "
                                  f"{qs[-1]}, {ks[-1]}, {vs[-1]}")
    if len(qs) == 4:
        if not enable_gqa and ks[1] != qs[1]:
            raise ValueError(f"key/value have {key.shape[1]} heads and query {query.shape[1]}: pass enable_gqa=True "
                             "for grouped-query attention")
        return flash_attention(query, key, value, is_causal, scale, backend)
    lead = tuple(query.shape[:-2])
    if tuple(key.shape[:-2]) != lead or tuple(value.shape[:-2]) != lead:
        raise NotImplementedError(f"flashlib.torch: query, key and value must share their leading dimensions "
                                  f"(no broadcasting; GQA takes 4-D inputs), got {tuple(query.shape)}, "
                                  f"{tuple(key.shape)}, {tuple(value.shape)}")
    four = [t.reshape(-1, 1, *t.shape[-2:]) for t in (query, key, value)]   # (prod(lead), 1, N, d)
    return flash_attention(*four, is_causal, scale, backend).reshape(*lead, *query.shape[-2:])


def naive_attention(q, k, v, is_causal=True, scale=None):
    """matmul - softmax - matmul, as a transformer was written before fused attention: S and P hit memory.
    The one naive attention of flashlib (the GPT of chapter 12 and the benchmarks use it)."""
    S = (q @ k.transpose(-2, -1)) * (default_scale(q.shape[-1]) if scale is None else scale)
    if is_causal:
        Nq, Nk = S.shape[-2:]
        mask = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).tril()   # top-left, like PyTorch
        S = S.masked_fill(~mask, NEG_INF)
    P = torch.softmax(S, dim=-1)
    return P @ v


_CUPY_ON_TORCH = False


def cupy_allocates_from_torch():
    """Make CuPy take its device memory from PyTorch's caching allocator (once per process), for code that mixes
    CuPy arrays with torch tensors.

    flashlib.torch itself no longer needs it (the cupy backend allocates torch callers' outputs with PyTorch's
    allocator), and does not call it: it changes CuPy's allocator for the whole process.
    """
    global _CUPY_ON_TORCH
    if _CUPY_ON_TORCH:
        return
    import cupy

    def alloc(size):
        t = torch.empty(max(size, 1), dtype=torch.uint8, device=f"cuda:{cupy.cuda.Device().id}")
        return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(t.data_ptr(), size, t), 0)   # t lives as long as the memory
    cupy.cuda.set_allocator(alloc)
    _CUPY_ON_TORCH = True
