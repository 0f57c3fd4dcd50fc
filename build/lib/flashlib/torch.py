"""flashlib as a PyTorch operator: an autograd Function and a drop-in for F.scaled_dot_product_attention.

    from flashlib.torch import scaled_dot_product_attention as sdpa
    y = sdpa(q, k, v, is_causal=True)             # q: (B, H, Nq, d), k, v: (B, H, Nk, d); y.backward() works

The forward calls `flashlib.attention(..., return_lse=True)` and keeps (q, k, v, O, lse) for the backward, which
calls `flashlib.attention_backward`: the FlashAttention recipe (store O and the logsumexp, recompute S and P in
the backward), so nothing of size N x N is kept between the passes. On CUDA tensors the GPU backends see the
tensors' own memory through DLPack / the CUDA array interface: no copies.
"""
import math

import torch

from . import api

__all__ = ["FlashAttentionFunction", "flash_attention", "scaled_dot_product_attention", "resolve_backend",
           "cupy_allocates_from_torch"]


def resolve_backend(q, backend="auto"):
    """The backend that will run for tensor q: 'auto' keeps CPU tensors on the host ('reference', exact and
    vectorised) and lets flashlib.attention choose for CUDA tensors (cupy for fp16/bf16, numba or cupy for fp32)."""
    if backend != "auto":
        return backend
    if not q.is_cuda:
        return "reference"
    return api.choose_backend("auto", q, api.dtype_name(q))


_CUPY_ON_TORCH = False


def cupy_allocates_from_torch():
    """Make CuPy take its device memory from PyTorch's caching allocator (once per process).

    Without this, CuPy keeps a memory pool of its own beside PyTorch's: two caches competing for the GPU, and
    torch.cuda.max_memory_allocated() does not see what the cupy kernels allocate (O, lse, dQ, dK, dV). With it,
    one allocator serves both and PyTorch's memory statistics are complete. flashlib.torch calls it before the
    first cupy-backend call; it changes CuPy's allocator for the whole process.
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


class FlashAttentionFunction(torch.autograd.Function):
    """O = softmax(scale * Q K^T [+ causal mask]) V with a FlashAttention backward.

    q: (B, H, Nq, d), k and v: (B, H, Nk, d), one dtype; returns O (B, H, Nq, d) of that dtype.
    Saved for backward: q, k, v, O and lse (B, H, Nq) float32; never S or P.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, backend):
        if backend == "cupy" and q.is_cuda:
            cupy_allocates_from_torch()
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = api.attention(q, k, v, causal=causal, scale=scale, backend=backend, return_lse=True)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = api.attention_backward(q, k, v, o, lse, do.contiguous(), causal=ctx.causal,
                                            scale=ctx.scale, backend=ctx.backend)
        return dq, dk, dv, None, None, None


def flash_attention(q, k, v, causal=False, scale=None, backend="auto"):
    """Differentiable flashlib attention on (B, H, N, d) tensors; see FlashAttentionFunction."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return FlashAttentionFunction.apply(q, k, v, bool(causal), scale, resolve_backend(q, backend))


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, backend="auto"):
    """torch.nn.functional.scaled_dot_product_attention's signature, computed by flashlib.

    Supported: query (..., Nq, d), key and value (..., Nk, d) with the same leading dimensions (batch, heads),
    is_causal (top-left aligned when Nq != Nk, as in PyTorch), scale. Everything else raises NotImplementedError
    naming the argument: an attn_mask, dropout, grouped-query attention, a value head dim different from d.
    """
    if attn_mask is not None:
        raise NotImplementedError("flashlib.torch: attn_mask is not supported (only is_causal); "
                                  "use torch.nn.functional.scaled_dot_product_attention for arbitrary masks")
    if dropout_p != 0.0:
        raise NotImplementedError(f"flashlib.torch: dropout_p must be 0.0, got {dropout_p} (no attention dropout)")
    if enable_gqa:
        raise NotImplementedError("flashlib.torch: enable_gqa is not supported; repeat key/value heads first")
    if query.dim() < 3:
        raise ValueError(f"query must have at least 3 dimensions (..., seq, head_dim), got shape {tuple(query.shape)}")
    lead = tuple(query.shape[:-2])
    if tuple(key.shape[:-2]) != lead or tuple(value.shape[:-2]) != lead:
        raise NotImplementedError(f"flashlib.torch: query, key and value must share their leading dimensions "
                                  f"(no broadcasting, no GQA), got {tuple(query.shape)}, {tuple(key.shape)}, "
                                  f"{tuple(value.shape)}")
    if value.shape[-1] != query.shape[-1] or key.shape[-1] != query.shape[-1]:
        raise NotImplementedError(f"flashlib.torch: query, key and value must share one head dim, got "
                                  f"{query.shape[-1]}, {key.shape[-1]}, {value.shape[-1]}")
    if query.dim() == 4:
        return flash_attention(query, key, value, is_causal, scale, backend)
    four = [t.reshape(-1, 1, *t.shape[-2:]) for t in (query, key, value)]   # (prod(lead), 1, N, d)
    return flash_attention(*four, is_causal, scale, backend).reshape(*lead, *query.shape[-2:])


# ---- PyTorch's own SDPA: which backend runs, which refuse, how fast (chapter 12) ---------------------------------

def sdpa_backends():
    """{'flash', 'cudnn', 'efficient', 'math'} -> torch.nn.attention.SDPBackend member."""
    from torch.nn.attention import SDPBackend
    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def sdpa_pinned(backend, q, k, v, **kwargs):
    """F.scaled_dot_product_attention with only `backend` ('flash', 'cudnn', 'efficient', 'math') allowed."""
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel(sdpa_backends()[backend]):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)


def sdpa_support(q, k, v, **kwargs):
    """Try each pinned SDPA backend on these inputs: {backend: None if it ran, else PyTorch's reasons}.

    A pinned backend that cannot take the inputs makes PyTorch warn why ("... not used because ...") and then
    raise "No available kernel"; we keep the warnings' text, which is the useful part.
    """
    import re
    import warnings
    out = {}
    for name in sdpa_backends():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                sdpa_pinned(name, q, k, v, **kwargs)
                out[name] = None
            except RuntimeError as e:
                why = [re.sub(r"\s*\(Triggered internally at [^)]*\)\.?", "", str(w.message)).strip()
                       for w in caught]
                why = [w for w in why if w and "runtime disabled" not in w]   # the backends we pinned away
                # PyTorch warns "<X> kernel not used because:" and then the reason; drop headers left without one
                why = [w for i, w in enumerate(why)
                       if not (w.endswith("because:") and (i + 1 == len(why) or why[i + 1].endswith("because:")))]
                out[name] = " ".join(why) or str(e).splitlines()[0]
    return out


def kernels_that_ran(fn, pattern=("attention", "flash", "fmha", "cudnn", "sdpa", "fa2", "softmax", "gemm")):
    """Names of the operators and GPU kernels whose name contains one of `pattern`, seen by torch.profiler
    while fn() runs: how to tell which SDPA implementation actually ran."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages()]
    return [n for n in names if any(p in n.lower() for p in pattern)]


def time_attention(impl, B, H, N, d, dtype=torch.float16, causal=False, backward=True):
    """Median ms of one forward (and forward+backward) of `impl` on CUDA: an SDPA backend name, 'naive' or
    'flashlib:<backend>'; plus the extra device memory of one forward (MB). None for what cannot run."""
    from .bench import time_cuda
    from .gpt import naive_attention
    if impl == "naive":
        fn = lambda q, k, v: naive_attention(q, k, v, causal)
    elif impl.startswith("flashlib:"):
        fn = lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=causal, backend=impl.split(":")[1])
    else:
        fn = lambda q, k, v: sdpa_pinned(impl, q, k, v, is_causal=causal)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, d, device="cuda", dtype=dtype, generator=g).requires_grad_() for _ in range(3))
    do = torch.randn_like(q)
    row = {"impl": impl, "B": B, "H": H, "N": N, "d": d, "dtype": str(dtype).replace("torch.", ""), "causal": causal}
    try:
        with torch.no_grad():
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn(q, k, v)
            torch.cuda.synchronize()
            row["fwd_peak_extra_MB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            if impl == "flashlib:numba":        # Numba allocates outside PyTorch's allocator: not seen here
                row["fwd_peak_extra_MB"] = None
            row["fwd_ms"] = time_cuda(lambda: fn(q, k, v))
        if backward:
            row["fwdbwd_ms"] = time_cuda(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do), repeat=5)
    except Exception as e:                      # a backend that refuses these inputs, or is missing a piece
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    flops = 4 * B * H * N * N * d / (2 if causal else 1)
    for key, mult in (("fwd", 1.0), ("fwdbwd", 3.5)):
        if row.get(f"{key}_ms"):
            row[f"{key}_tflops"] = mult * flops / (row[f"{key}_ms"] * 1e-3) / 1e12
    return row


# ---- launch overhead and CUDA Graphs (chapter 14) ----------------------------------------------------------------

def graph_of(fn, warmup=3):
    """Capture fn() (which must only launch work on fixed tensors) into a torch.cuda.CUDAGraph; returns it.

    PyTorch's recipe: warm up on a side stream (lazy initialisation must not happen inside the capture), then
    capture; `graph.replay()` launches every captured kernel with one CPU call.
    """
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def eager_vs_graph(fn, n_kernels, repeat=20):
    """ms of fn() launched kernel by kernel vs the same work replayed from a CUDA graph, and the speed-up."""
    from .bench import time_cuda
    eager = time_cuda(fn, repeat=repeat)
    graph = graph_of(fn)
    replay = time_cuda(graph.replay, repeat=repeat)
    per = (lambda ms: 1e3 * ms / n_kernels) if n_kernels else (lambda ms: None)
    return {"n_kernels": n_kernels, "eager_ms": eager, "graph_ms": replay, "speedup": eager / replay,
            "eager_us_per_kernel": per(eager), "graph_us_per_kernel": per(replay)}


def elementwise_chain(numel, n_ops, device="cuda"):
    """fn() launching n_ops tiny elementwise kernels in a row on one tensor of numel float32 values."""
    x = torch.zeros(numel, device=device)

    def fn():
        for _ in range(n_ops):
            x.mul_(0.5).add_(1.0)                      # two kernels; x stays bounded (fixed point 2)
    return fn, 2 * n_ops


def cupy_eager_vs_graph(numel, n_ops, repeat=20):
    """The same chain in CuPy, captured with Stream.begin_capture() / end_capture() and replayed with launch()."""
    import cupy as cp
    from .bench import time_cuda
    x = cp.zeros(numel, dtype=cp.float32)

    def fn():
        for _ in range(n_ops):
            cp.multiply(x, 0.5, out=x)
            cp.add(x, 1.0, out=x)
    fn()
    eager = time_cuda(fn, repeat=repeat)
    stream = cp.cuda.Stream(non_blocking=True)     # the legacy default stream cannot be captured
    with stream:
        stream.begin_capture()
        fn()
        graph = stream.end_capture()
    replay = time_cuda(graph.launch, repeat=repeat)
    n = 2 * n_ops
    return {"n_kernels": n, "eager_ms": eager, "graph_ms": replay, "speedup": eager / replay,
            "eager_us_per_kernel": 1e3 * eager / n, "graph_us_per_kernel": 1e3 * replay / n}
