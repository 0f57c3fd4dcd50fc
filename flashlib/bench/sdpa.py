"""PyTorch's own SDPA from the outside: which backend runs, which refuse and why, how fast (chapter 11).

    from flashlib.bench import sdpa
    sdpa.sdpa_support(q, k, v, is_causal=True)     # {'flash': None, 'cudnn': None, 'efficient': None, 'math': None}
    sdpa.kernels_that_ran(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
"""
import torch

from ..constants import attention_flops
from .timing import time_cuda


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


def time_attention(impl, B, H, N, d, dtype=None, causal=False, backward=True):
    """Median ms of one forward (and forward+backward) of `impl` on CUDA: an SDPA backend name, 'naive' or
    'flashlib:<backend>'; plus the extra device memory of one forward (MB). None for what cannot run."""
    from flashlib.torch import naive_attention, scaled_dot_product_attention
    if impl == "naive":
        fn = lambda q, k, v: naive_attention(q, k, v, causal)
    elif impl.startswith("flashlib:"):
        fn = lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=causal, backend=impl.split(":")[1])
    else:
        fn = lambda q, k, v: sdpa_pinned(impl, q, k, v, is_causal=causal)
    dtype = dtype or torch.float16
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
    for key in ("fwd", "fwdbwd"):
        if row.get(f"{key}_ms"):
            flops = attention_flops(B, H, N, d, causal, backward=key == "fwdbwd")
            row[f"{key}_tflops"] = flops / (row[f"{key}_ms"] * 1e-3) / 1e12
    return row
