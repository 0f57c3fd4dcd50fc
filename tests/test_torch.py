"""flashlib.torch: the registered operators (opcheck, torch.compile without graph breaks, no double backward),
gradcheck on the host backends, agreement with F.scaled_dot_product_attention (GQA too), strict arguments, and
(marked gpu) the numba (fp32) and cupy (fp16/bf16) backends on CUDA tensors, CUDA graphs and side streams."""
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import flashlib
import flashlib.torch as ft
from flashlib.torch import resolve_backend, scaled_dot_product_attention as sdpa


def _qkv(B, H, Nq, Nk, d, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
                 .requires_grad_() for n in (Nq, Nk, Nk))


@pytest.mark.parametrize("backend", ["reference", "tiled"])
@pytest.mark.parametrize("causal,Nq,Nk", [(False, 5, 7), (True, 5, 7), (True, 6, 3), (False, 1, 1)])
def test_gradcheck_host_backends(backend, causal, Nq, Nk):
    q, k, v = _qkv(1, 2, Nq, Nk, 3)
    fn = lambda q, k, v: ft.attention_forward(q, k, v, causal, 0.7, backend)[0]
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
    (dict(dropout_p="0"), "dropout_p"),
])
def test_unsupported_arguments_raise(kwargs, match):
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(NotImplementedError, match=match):
        sdpa(q, q, q, **kwargs)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(is_causal="False"), TypeError, "is_causal"),           # issue 17.2: was run as causal
    (dict(is_causal=1), TypeError, "is_causal"),
    (dict(is_causal=torch.tensor(True)), TypeError, "is_causal"),
    (dict(scale="0.5"), TypeError, "scale"),                     # issue 17.2: was accepted
    (dict(scale=True), TypeError, "scale"),                      # issue 17.7: was taken as 1.0
    (dict(scale=torch.tensor(0.5)), TypeError, "scale"),
    (dict(scale=1j), TypeError, "scale"),
    (dict(scale=-0.5), ValueError, "scale"),
    (dict(scale=float("inf")), ValueError, "scale"),
    (dict(enable_gqa="yes"), TypeError, "True or False"),
])
def test_strict_argument_types(kwargs, exc, match):
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(exc, match=match):
        sdpa(q, q, q, backend="reference", **kwargs)


@pytest.mark.parametrize("scale", [2, np.int64(2), np.float32(0.5), np.array(0.5), __import__("fractions").Fraction(1, 3)])
def test_real_scales_are_accepted(scale):
    q, k, v = (t.detach().float() for t in _qkv(1, 2, 5, 6, 4, seed=1))
    torch.testing.assert_close(sdpa(q, k, v, scale=scale, backend="reference"),
                               F.scaled_dot_product_attention(q, k, v, scale=float(scale)), rtol=1e-5, atol=1e-6)


def test_unsupported_shapes_raise():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="enable_gqa"):
        sdpa(q, torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8))            # fewer kv heads without enable_gqa
    with pytest.raises(ValueError, match="divide"):
        sdpa(torch.randn(1, 3, 4, 8), q, q, enable_gqa=True)                   # 2 kv heads do not divide 3
    with pytest.raises(NotImplementedError, match="leading dimensions"):
        sdpa(torch.randn(2, 4, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8))  # broadcasting
    with pytest.raises(NotImplementedError, match="head dim"):
        sdpa(q, q, torch.randn(1, 2, 4, 16))                                   # value head dim != d
    with pytest.raises(ValueError, match=">= 3"):
        sdpa(torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(TypeError, match="torch tensors"):
        sdpa(q.numpy(), q, q)


# ---- grouped-query attention (enable_gqa), forward and gradients against PyTorch's SDPA -------------------------

@pytest.mark.parametrize("H,Hkv", [(4, 2), (6, 1), (3, 3)])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_matches_torch(H, Hkv, causal):
    g = torch.Generator().manual_seed(H + Hkv)
    q = torch.randn(2, H, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, Hkv, 9, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    y = sdpa(q, k, v, is_causal=causal, enable_gqa=True, backend="reference")
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(y, want)
    dy = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (q, k, v), dy), torch.autograd.grad(want, (q, k, v), dy)):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda q, k, v: sdpa(q, k, v, is_causal=causal, enable_gqa=True), (q, k, v))


# ---- the registered operators -------------------------------------------------------------------------------------

def test_opcheck_forward_and_backward():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, n, 16, generator=g) for n in (7, 9, 9))
    for causal in (False, True):
        torch.library.opcheck(ft.attention_forward, (q, k, v, causal, 0.25, "reference"))
        torch.library.opcheck(ft.attention_forward, tuple(t.clone().requires_grad_() for t in (q, k, v))
                              + (causal, 0.25, "reference"))
        o, lse = ft.attention_forward(q, k, v, causal, 0.25, "reference")
        torch.library.opcheck(ft.attention_backward, (torch.randn_like(o), q, k, v, o, lse, causal, 0.25, "reference"))


def test_torch_compile_fullgraph_has_no_graph_break():
    """A small attention block compiled whole (fullgraph=True raises at any graph break); same values and grads."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 48, generator=g, requires_grad=True)

    def block(x, attend):
        q, k, v = (x @ w).view(2, 12, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return attend(q, k, v).transpose(1, 2).reshape(2, 12, 16).square().mean()

    x = torch.randn(2, 12, 16, generator=g)
    ours = lambda q, k, v: sdpa(q, k, v, is_causal=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    loss = compiled(x, ours)
    (gw,) = torch.autograd.grad(loss, w)
    want = block(x, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    (gw_want,) = torch.autograd.grad(want, w)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, gw_want, rtol=1e-4, atol=1e-6)
    explain = torch._dynamo.explain(lambda x: block(x, ours))(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1


def test_double_backward_raises_never_silently_wrong():
    """Issue 17.1: with create_graph=True the attention's part of the second-order gradient was dropped."""
    q, k, v = _qkv(1, 1, 3, 3, 4)
    y = sdpa(q, k, v, backend="reference")
    (gq,) = torch.autograd.grad(y.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gq.sum().backward()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.gradgradcheck(lambda q, k, v: sdpa(q, k, v), (q, k, v))


def test_lse_output_has_no_gradient():
    q, k, v = _qkv(1, 1, 4, 4, 4)
    o, lse = ft.attention_forward(q, k, v, False, 0.5, "reference")
    assert o.requires_grad and not lse.requires_grad


def test_flashlib_attention_warns_that_it_detaches():
    """Issue 17.7: flashlib.attention on tensors that require grad says that it does not record gradients."""
    q, k, v = _qkv(1, 1, 4, 4, 4)
    with pytest.warns(UserWarning, match="detached"):
        o = flashlib.attention(q, k, v, backend="reference")
    assert not o.requires_grad
    with torch.no_grad(), __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")
        flashlib.attention(q, k, v, backend="reference")            # no warning: nothing to record


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
@pytest.mark.parametrize("backend,dtype", [("cupy", torch.float16), ("cupy", torch.bfloat16), ("cupy", torch.float32),
                                           ("numba", torch.float32)])
@pytest.mark.parametrize("d", [40, 256])
def test_gpu_gqa_and_padded_head_dims_through_the_op(backend, dtype, d):
    """Grouped-query attention (6 query heads on 2 kv heads) and head dims off the buckets (40 runs as 64) or the
    largest (256), through flashlib.torch on torch tensors (the cupy backend's torch path: padding, G, its
    allocations), causal with Nq > Nk, forward and gradients against float64."""
    _need(backend)
    g = torch.Generator().manual_seed(3)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).cuda()
    q64, k64, v64, dy = mk(2, 6, 67, d), mk(2, 2, 45, d), mk(2, 2, 45, d), mk(2, 6, 67, d)
    ours = [t.to(dtype).requires_grad_() for t in (q64, k64, v64)]
    y = sdpa(*ours, is_causal=True, enable_gqa=True, backend=backend)
    y.backward(dy.to(dtype))
    exact = [t.detach().double().requires_grad_() for t in ours]
    y64 = F.scaled_dot_product_attention(*exact, is_causal=True, enable_gqa=True)
    y64.backward(dy.to(dtype).double())
    tol = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    err = lambda a, b: ((a.double() - b).abs().max() / b.abs().max().clamp_min(1)).item()
    assert y.shape == q64.shape and err(y, y64) < tol
    for a, b in zip(ours, exact):
        assert a.grad.shape == a.shape and err(a.grad, b.grad) < tol, (a.shape, err(a.grad, b.grad))


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
    """The same operator over the Numba kernels; here in Numba's CUDA simulator (tiny), on a GPU for real."""
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


# ---- real GPU: the operator inside CUDA graphs, torch.compile and side streams ----------------------------------

def _cuda_qkv(B=2, H=4, Hkv=4, Nq=200, Nk=177, d=64, dtype=torch.float16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, h, n, d, device="cuda", dtype=dtype, generator=g) for h, n in ((H, Nq), (Hkv, Nk), (Hkv, Nk))]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_graph_capture_and_replay_equal_eager(dtype):
    """Forward and forward + backward captured into one torch.cuda.CUDAGraph; replay on new inputs equals eager."""
    _need("cupy")
    q, k, v = (t.requires_grad_() for t in _cuda_qkv(dtype=dtype))
    do = torch.randn_like(q)

    def step():
        o = sdpa(q, k, v, is_causal=True, backend="cupy")
        return (o, *torch.autograd.grad(o, (q, k, v), do))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):                        # warm-up off the capture (kernels compiled, plans built)
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    for seed in (1, 2):
        with torch.no_grad():
            for t, new in zip((q, k, v), _cuda_qkv(dtype=dtype, seed=seed)):
                t.copy_(new)
            do.copy_(torch.randn_like(do))
        graph.replay()
        eager = step()
        torch.cuda.synchronize()
        assert torch.equal(static[0], eager[0])
        for a, b in zip(static[1:], eager[1:]):          # dQ sums by atomics: the order, hence rounding, varies
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=2e-3)


@pytest.mark.gpu
def test_side_stream_launches_on_the_current_stream():
    """q is written on a side stream after a 20 ms spin; the op must run after it on that stream, not on another."""
    _need("cupy")
    q0, k, v = _cuda_qkv(Hkv=2, seed=4)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        q = torch.full_like(q0, float("nan"))
        torch.cuda._sleep(40_000_000)                  # ~20 ms of GPU time before q holds its values
        q.copy_(q0)
        o = sdpa(q, k, v, is_causal=True, enable_gqa=True, backend="cupy")
    s.synchronize()
    want = F.scaled_dot_product_attention(q0.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o.float(), want, rtol=2e-2, atol=2e-3)


def _numpy_calls_first():
    """Regression (torch 2.11's Dynamo, on the H200: the CUDA fullgraph test failed only after other tests): once
    flashlib has seen NumPy arrays its dtype-name cache holds NumPy dtypes, which Dynamo could not hash; the traced
    path must not consult it."""
    import numpy as np
    import flashlib
    for dt in (np.float16, np.float32):
        x = np.random.default_rng(0).standard_normal((1, 1, 4, 8)).astype(dt)
        flashlib.attention(x, x, x)                        # NumPy dtypes enter the caches


def test_torch_compile_fullgraph_after_numpy_calls():
    _numpy_calls_first()
    torch._dynamo.reset()
    q = torch.randn(1, 2, 5, 8)
    fn = lambda q: sdpa(q * 1.5, q, q, is_causal=True).sum()
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(q), fn(q))


@pytest.mark.gpu
def test_torch_compile_fullgraph_on_cuda():
    _need("cupy")
    _numpy_calls_first()
    torch._dynamo.reset()
    q, k, v = _cuda_qkv(Hkv=2, seed=5)
    fn = lambda q, k, v: (sdpa(q * 1.5, k, v, is_causal=True, enable_gqa=True) + 1).sum(-1)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), fn(q, k, v))
    assert torch._dynamo.explain(fn)(q, k, v).graph_break_count == 0


def test_eager_calls_skip_the_dispatcher_but_not_under_modes(monkeypatch):
    """Plain eager calls run the operators' implementations directly (no grad: a call; grad: _EagerAttention);
    under a dispatch mode (here FakeTensorMode, as torch.compile's tracing uses) they go through the operator.
    Both give the same values and gradients."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    calls = []
    real = ft.attention_forward
    monkeypatch.setattr(ft, "attention_forward", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64) for n in (5, 7, 7))
    with torch.no_grad():
        o = sdpa(q, k, v, is_causal=True)
    torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    eager = sdpa(qg, kg, vg, is_causal=True)
    assert not calls and type(eager.grad_fn).__name__ == "_EagerAttentionBackward"
    op = real(qg, kg, vg, True, 8 ** -0.5, "reference")[0]
    do = torch.randn_like(op)
    torch.testing.assert_close(eager, op)
    for a, b in zip(torch.autograd.grad(eager, (qg, kg, vg), do), torch.autograd.grad(op, (qg, kg, vg), do)):
        torch.testing.assert_close(a, b)
    with FakeTensorMode():
        fq = torch.empty(1, 2, 5, 8)
        assert sdpa(fq, fq, fq).shape == (1, 2, 5, 8)
    assert len(calls) == 1


def test_the_package_does_not_import_the_training_script():
    """Issue 15's layering: flashlib.gpt (model and training) imports flashlib.torch, never the other way round;
    flashlib.torch imports nothing from flashlib.bench."""
    import ast
    import pathlib
    root = pathlib.Path(flashlib.__file__).parent
    for path in root.rglob("*.py"):
        if path.name == "gpt.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
            module = getattr(node, "module", None) or ""
            assert "gpt" not in module.split(".") and "gpt" not in names, (path, module, names)
            if path.name == "torch.py" and isinstance(node, ast.ImportFrom):
                assert "bench" not in module.split("."), (path, module)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_operator_and_eager_paths_agree_on_cuda(dtype):
    """The registered operator (with its register_autograd formula) and the eager path give one result."""
    _need("cupy")
    q, k, v = (t.requires_grad_() for t in _cuda_qkv(Hkv=2, dtype=dtype, seed=9))
    do = torch.randn_like(q)
    eager = sdpa(q, k, v, is_causal=True, enable_gqa=True, backend="cupy")
    op = ft.attention_forward(q, k, v, True, 64 ** -0.5, "cupy")[0]
    assert type(eager.grad_fn).__name__ == "_EagerAttentionBackward"
    assert torch.equal(eager, op)
    for a, b in zip(torch.autograd.grad(eager, (q, k, v), do), torch.autograd.grad(op, (q, k, v), do)):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 96, 128])
def test_prepared_route_equals_the_general_path_on_cuda(dtype, d):
    """A call's api.Route launches what cupy_kernels.forward / backward launch: equal O and lse (bitwise), dQ, dK, dV
    alike (dQ by atomics: close), for contiguous, strided and 16-byte-misaligned inputs of one signature, torch
    tensors and CuPy arrays, called repeatedly (fresh outputs each time)."""
    _need("cupy")
    import cupy as cp
    from flashlib import api, cupy_kernels as ck
    q, k, v = _cuda_qkv(B=2, H=4, Hkv=4, Nq=300, Nk=257, d=d, dtype=dtype, seed=11)
    do = torch.randn_like(q)
    dt = str(dtype).replace("torch.", "")
    strided = q.transpose(2, 3).contiguous().transpose(2, 3)
    misaligned = torch.empty(q.numel() + 1, device="cuda", dtype=dtype)[1:].view_as(q).copy_(q)
    for x in (q, strided, misaligned, q):
        r = api.route(x, k, v, True, None, "cupy")
        o, lse = r.forward(x, k, v)
        o_ref, lse_ref = ck.forward(x, k, v, causal=True, scale=None, dtype=dt)
        assert torch.equal(o, o_ref) and torch.equal(lse, lse_ref)
        grads = r.backward(x, k, v, o, lse, do)
        for a, b in zip(grads, ck.backward(x, k, v, o_ref, lse_ref, do, causal=True, scale=None, dtype=dt)):
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=2e-3)
    if dtype == torch.float16:
        qc, kc, vc = (cp.asarray(t) for t in (q, k, v))
        for x in (qc, cp.asarray(strided), qc):              # CuPy arrays: contiguous and strided, one signature
            assert x.flags.c_contiguous == (x is qc)
            oc = flashlib.attention(x, kc, vc, causal=True, backend="cupy")
            assert type(oc) is cp.ndarray and torch.equal(torch.as_tensor(oc, device="cuda"), ck.forward(
                q, k, v, causal=True, scale=None, dtype=dt)[0])
