"""Rung 7's "dynamic" variant (the default at config_hopper.FA3_DYNAMIC, causal d = 64 and 128 among them) through the
launch paths on a Hopper GPU: each launch takes its work items from a counter that it sets back to 0 itself
(tma.counter: one per stream, one per launch captured into a CUDA graph). A counter left non-zero by the launch
before would skip work items, whose rows then keep the NaN they start with: CuPy outputs are poisoned (the `poisoned`
fixture), a graph's outputs are filled with NaN before each replay. Calls in a row with changing shapes (from 2 work
items, far fewer than the SMs, to 192), two streams at once, graph capture and replays, a grid with more CTAs than
work items."""
import zlib

import numpy as np
import pytest

import flashlib
from flashlib import cupy_kernels as ck
from flashlib import reference
from flashlib.cupy_kernels import tma
from tests.test_cupy_kernels import ATOL, _err, _f64, _naive, poisoned  # noqa: F401 (poisoned: a fixture)

# (B, H, Hkv, Nq, Nk, d); work items ceil(Nq / Br) * B * H: 2, 176, 192, 1, 64, 176 (132 SMs)
SHAPES = [(1, 2, 2, 97, 113, 64), (2, 8, 4, 2000, 2000, 64), (2, 8, 8, 1500, 1700, 128), (1, 1, 1, 3, 4096, 64),
          (2, 4, 2, 1023, 97, 256), (2, 8, 4, 2000, 2000, 64)]


def _hopper():
    if ck.device_cc() != 90:
        pytest.skip("rung 7 runs on Hopper (compute capability 9.0) only")


def _inputs(shape, dtype, seed=0):
    import torch
    B, H, Hkv, Nq, Nk, d = shape
    g = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr((shape, dtype, seed)).encode()))
    mk = lambda h, n: torch.randn(B, h, n, d, device="cuda", generator=g).to(getattr(torch, dtype))
    return mk(H, Nq), mk(Hkv, Nk), mk(Hkv, Nk)


def _reference(q, k, v, dtype):
    """(o, lse) of causal attention in float64 and the bound on O's error: FlashAttention's rule (test_fa3_gpu)."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    scale = 1 / np.sqrt(q.shape[-1])
    o_ref, lse_ref = reference.attention_forward(_f64(q), _f64(k), _f64(v), True, scale)
    return o_ref, lse_ref, 2 * _err(_naive(q, k, v, True, scale), o_ref) + ATOL[dtype]


def _check(o, lse, q, ref, dtype, where):
    """o, lse (CuPy or torch) against _reference's answer for q."""
    from flashlib._arrays import like
    o_ref, lse_ref, bound = ref
    o, lse = like(o, q, dtype), like(lse, q, "float32")
    assert _err(o, o_ref) <= bound, (where, _err(o, o_ref), bound)       # NaN (a skipped work item) fails too
    assert _err(lse, lse_ref) <= 2e-3, (where, _err(lse, lse_ref))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_default_path_calls_in_a_row(dtype, poisoned):
    """`forward` and the prepared call (the thin launch path), one shape after another on one stream ("dynamic" at
    d = 64 and 128; ping-pong in between at d = 256, where it is the default with the mask)."""
    _hopper()
    from flashlib._arrays import to_cupy
    for i, shape in enumerate(SHAPES):
        d = shape[-1]
        assert ck.forward_plan(dtype, d, True, 0).cfg.fa3.dynamic == ((d, True) in ck.config_hopper.FA3_DYNAMIC)
        q, k, v = _inputs(shape, dtype, i)
        ref = _reference(q, k, v, dtype)
        qc, kc, vc = (to_cupy(t) for t in (q, k, v))
        _check(*ck.forward(qc, kc, vc, causal=True, scale=None, dtype=dtype), q, ref, dtype, ("forward", shape))
        run = ck.launch.prepare_forward(qc, kc, vc, causal=True, scale=None, dtype=dtype)
        for n in range(2):
            _check(*run(qc, kc, vc), q, ref, dtype, ("prepared", n, shape))


@pytest.mark.gpu
def test_two_streams_at_once(poisoned):
    """Launches alternating between two streams, no wait between them (64 and 48 work items: both kernels fit on
    the GPU at once); each stream has its own counter."""
    _hopper()
    import cupy as cp
    import torch
    from flashlib._arrays import to_cupy
    shapes = [(1, 8, 8, 1500, 1500, 64), (1, 6, 3, 1000, 1200, 128)]
    inputs = [_inputs(s, "float16", 7) for s in shapes]
    torch.cuda.synchronize()
    streams = [cp.cuda.Stream(non_blocking=True) for _ in shapes]
    outs = [[], []]
    for _ in range(3):
        for j, (s, (q, k, v)) in enumerate(zip(streams, inputs)):
            with s:
                outs[j].append(ck.forward(*(to_cupy(t) for t in (q, k, v)), causal=True, scale=None, dtype="float16"))
    for s in streams:
        s.synchronize()
    assert tma._counters[(0, streams[0].ptr)] != tma._counters[(0, streams[1].ptr)]
    for j, (q, k, v) in enumerate(inputs):
        ref = _reference(q, k, v, "float16")
        for n, (o, lse) in enumerate(outs[j]):
            _check(o, lse, q, ref, "float16", ("stream", j, n))


@pytest.mark.gpu
def test_cuda_graph_capture_and_replays():
    """flashlib.attention (torch tensors, the prepared route) at two shapes captured into one torch.cuda.CUDAGraph,
    warmed up on a side stream first (PyTorch's recipe), replayed three times on new inputs with the outputs set to
    NaN before each replay: every replay equals the eager call and the reference. The captured launches took
    counters of their own (none kept for the capture stream)."""
    _hopper()
    import torch
    shapes = [(1, 2, 2, 97, 113, 64), (2, 8, 4, 1023, 1023, 64)]
    static = [_inputs(s, "float16") for s in shapes]
    step = lambda: [flashlib.attention(q, k, v, causal=True, backend="cupy", return_lse=True) for q, k, v in static]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    used = tma._slabs[0][2]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        capture_stream = torch.cuda.current_stream().cuda_stream
        outs = step()
    assert tma._slabs[0][2] == used + len(shapes) and (0, capture_stream) not in tma._counters
    for seed in (1, 2, 3):
        with torch.no_grad():
            for (q, k, v), shape in zip(static, shapes):
                for t, new in zip((q, k, v), _inputs(shape, "float16", seed)):
                    t.copy_(new)
            for t in (t for pair in outs for t in pair):
                t.fill_(float("nan"))
        graph.replay()
        eager = step()
        torch.cuda.synchronize()
        for (o, lse), (eo, else_), (q, k, v) in zip(outs, eager, static):
            assert torch.equal(o, eo) and torch.equal(lse, else_), seed
            _check(o, lse, q, _reference(q, k, v, "float16"), "float16", ("replay", seed))


@pytest.mark.gpu
def test_a_first_call_inside_a_capture_is_refused(monkeypatch):
    """Where no counter was allocated yet (no slab: the first "dynamic" launch of the process), a call inside a CUDA
    graph capture raises before it launches anything, the capture itself intact (it ends and replays)."""
    _hopper()
    import torch
    q, k, v = _inputs((1, 2, 2, 97, 113, 64), "float16")
    flashlib.attention(q, k, v, causal=True, backend="cupy")        # the route and its kernel, before the capture
    torch.cuda.synchronize()
    monkeypatch.setattr(tma, "_slabs", {})
    monkeypatch.setattr(tma, "_counters", {})
    x = torch.zeros(4, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x.add_(1)
        with pytest.raises(RuntimeError, match="allocated outside CUDA graph captures"):
            flashlib.attention(q, k, v, causal=True, backend="cupy")
    graph.replay()
    torch.cuda.synchronize()
    assert x.tolist() == [1.0] * 4 and tma._slabs == {}


@pytest.mark.gpu
def test_grid_beyond_the_work_items(poisoned, monkeypatch):
    """A persistent grid of one CTA per SM however few the work items (2, 1): the CTAs without a first item fetch
    nothing, and the counter is 0 again for the next call (the launch layer's grid is min(SMs, items))."""
    _hopper()
    from flashlib._arrays import to_cupy
    n_sm = tma.sm_count(0)
    monkeypatch.setattr(ck.launch, "fa3_grid", lambda cfg, Nq, BH, n: (n_sm, 1, 1) if cfg.persistent else
                        ck.config_hopper.fa3_grid(cfg, Nq, BH, n))
    for i, shape in enumerate([SHAPES[0], SHAPES[3], SHAPES[0], SHAPES[1]]):
        q, k, v = _inputs(shape, "float16", i)
        o, lse = ck.forward(*(to_cupy(t) for t in (q, k, v)), causal=True, scale=None, dtype="float16")
        _check(o, lse, q, _reference(q, k, v, "float16"), "float16", ("grid", n_sm, shape))
