"""flashlib.torch: gradcheck on the host backends, agreement with F.scaled_dot_product_attention, clear errors,
and (marked gpu) the numba (fp32) and cupy (fp16/bf16) backends on CUDA tensors."""
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import flashlib
from flashlib.torch import FlashAttentionFunction, resolve_backend, scaled_dot_product_attention as sdpa


def _qkv(B, H, Nq, Nk, d, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
                 .requires_grad_() for n in (Nq, Nk, Nk))


@pytest.mark.parametrize("backend", ["reference", "tiled"])
@pytest.mark.parametrize("causal,Nq,Nk", [(False, 5, 7), (True, 5, 7), (True, 6, 3), (False, 1, 1)])
def test_gradcheck_host_backends(backend, causal, Nq, Nk):
    q, k, v = _qkv(1, 2, Nq, Nk, 3)
    fn = lambda q, k, v: FlashAttentionFunction.apply(q, k, v, causal, 0.7, backend)
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "tiled"])
@pytest.mark.parametrize("shape", [(2, 3, 17, 17, 8), (1, 2, 33, 20, 12), (2, 1, 9, 40, 5), (1, 1, 1, 13, 4)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_matches_torch_sdpa_forward_and_gradients(backend, shape, causal):
    B, H, Nq, Nk, d = shape
    ours = _qkv(B, H, Nq, Nk, d, torch.float32, seed=sum(shape))
    theirs = [t.detach().clone().requires_grad_() for t in ours]
    y, want = sdpa(*ours, is_causal=causal, backend=backend), F.scaled_dot_product_attention(*theirs, is_causal=causal)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    want.backward(dy)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_scale_and_three_dimensional_inputs():
    q, k, v = (t.detach().float() for t in _qkv(1, 4, 6, 9, 8, seed=3))
    q3, k3, v3 = (t.reshape(4, *t.shape[-2:]) for t in (q, k, v))   # (N, L, E): no heads dimension
    y = sdpa(q3, k3, v3, scale=0.3, is_causal=True, backend="reference")
    assert y.shape == (4, 6, 8)
    torch.testing.assert_close(y, F.scaled_dot_product_attention(q3, k3, v3, scale=0.3, is_causal=True),
                               rtol=1e-5, atol=1e-6)


def test_auto_on_cpu_tensors_uses_the_host():
    q = torch.zeros(1, 1, 2, 2)
    assert resolve_backend(q) == "reference"
    assert resolve_backend(q, "tiled") == "tiled"


def test_saves_no_n_by_n_tensor():
    q, k, v = _qkv(1, 1, 64, 64, 4, torch.float32)
    y = sdpa(q, k, v, backend="reference")
    saved = [tuple(t.shape) for t in y.grad_fn.saved_tensors]
    assert max(np.prod(s) for s in saved) == 64 * 4, saved          # q, k, v, O (N x d) and lse (N)
    assert (1, 1, 64) in saved


@pytest.mark.parametrize("kwargs,match", [
    (dict(attn_mask=torch.ones(4, 4, dtype=torch.bool)), "attn_mask"),
    (dict(dropout_p=0.1), "dropout_p"),
    (dict(enable_gqa=True), "enable_gqa"),
])
def test_unsupported_arguments_raise(kwargs, match):
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(NotImplementedError, match=match):
        sdpa(q, q, q, **kwargs)


def test_unsupported_shapes_raise():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(NotImplementedError, match="leading dimensions"):
        sdpa(q, torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8))            # GQA-style broadcast
    with pytest.raises(NotImplementedError, match="head dim"):
        sdpa(q, q, torch.randn(1, 2, 4, 16))                                   # value head dim != d
    with pytest.raises(ValueError, match="at least 3"):
        sdpa(torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8))


# ---- real GPU: the kernel backends through the autograd Function -------------------------------------------------

def _need(backend):
    try:
        importlib.import_module(f"flashlib.{backend}_kernels")
    except Exception as e:
        pytest.skip(f"flashlib.{backend}_kernels does not import: {type(e).__name__}: {e}")
    if backend not in flashlib.available_backends():
        pytest.skip(f"backend {backend} not available here")


@pytest.mark.gpu
@pytest.mark.parametrize("backend,dtype", [("numba", torch.float32), ("cupy", torch.float32),
                                           ("cupy", torch.float16), ("cupy", torch.bfloat16)])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_backends_match_float64(backend, dtype, causal):
    _need(backend)
    B, H, Nq, Nk, d = 2, 3, 131, 97, 64
    q64, k64, v64 = _qkv(B, H, Nq, Nk, d, torch.float64, "cuda", seed=7)
    ours = [t.detach().to(dtype).requires_grad_() for t in (q64, k64, v64)]
    y = sdpa(*ours, is_causal=causal, backend=backend)
    assert y.dtype == dtype and y.is_cuda and torch.isfinite(y).all()
    dy = torch.randn_like(y)
    y.backward(dy)
    # float64 truth from the same (rounded) inputs, and the naive low-precision computation as a yardstick
    exact = [t.detach().double().requires_grad_() for t in ours]
    y64 = F.scaled_dot_product_attention(*exact, is_causal=causal)
    y64.backward(dy.double())
    low = [t.detach().clone().requires_grad_() for t in ours]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        ylow = F.scaled_dot_product_attention(*low, is_causal=causal)
    ylow.backward(dy)
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), y64, rtol=1e-4, atol=1e-5)
        for a, b in zip(ours, exact):
            torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-3, atol=1e-4)
        return
    err = lambda a, b: (a.double() - b).abs().max().item()
    assert err(y, y64) <= 2 * err(ylow, y64) + 1e-4
    for a, b, c in zip(ours, exact, low):
        assert err(a.grad, b.grad) <= 3 * err(c.grad, b.grad) + 1e-4


@pytest.mark.gpu
def test_gpu_autograd_in_a_model_step():
    """One optimizer step of a small attention layer: flashlib.torch and PyTorch SDPA give the same update."""
    backend = "cupy" if "cupy" in flashlib.available_backends() else "numba"
    _need(backend)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if backend == "cupy" else torch.float32
    x = torch.randn(4, 256, 128, device="cuda", dtype=dtype)
    proj = torch.nn.Linear(128, 3 * 128, device="cuda", dtype=dtype)
    outs = []
    for attend in (lambda q, k, v: sdpa(q, k, v, is_causal=True, backend=backend),
                   lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)):
        proj.zero_grad()
        q, k, v = proj(x).view(4, 256, 3, 2, 64).permute(2, 0, 3, 1, 4)      # non-contiguous views
        attend(q, k, v).float().square().mean().backward()
        outs.append(proj.weight.grad.float().clone())
    torch.testing.assert_close(outs[0], outs[1], rtol=5e-2, atol=5e-3)


def test_numba_kernels_through_autograd_in_the_simulator():
    """The same autograd Function over the Numba kernels; here in Numba's CUDA simulator (tiny), on a GPU for real."""
    _need("numba")
    q, k, v = _qkv(1, 1, 16, 11, 32, torch.float32, seed=11)
    theirs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    y = sdpa(q, k, v, is_causal=True, backend="numba")
    want = F.scaled_dot_product_attention(*theirs, is_causal=True)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    want.backward(dy)
    for a, b in zip((q, k, v), theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-4)
