"""flashlib.numba_kernels against the float64 reference.

Simulator tests (run everywhere; tiny ragged shapes, small blocks), PTX/ptxas resource checks (a subprocess
without the simulator), and `gpu` tests at real sizes on a CUDA GPU.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import flashlib
from flashlib import reference, tiled
from tests.conftest import HAS_GPU, ptx_script, ptx_script_rows, qkv

from numba import cuda  # noqa: E402  (after conftest chose the simulator or the GPU)
from flashlib import numba_kernels as nk  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, launcher, small-block keyword arguments for the simulator)
SIM_VARIANTS = [
    ("fa1", nk.fa1_forward, dict(Br=8, Bc=8)),
    ("fa2", nk.fa2_forward, dict(Br=8, Bc=4)),
    ("fa2_fast", nk.fa2_forward_fast, dict(cfg=(8, 8, 2, 2, 2), shuffle=False)),
    ("fa2_fast_kv1", nk.fa2_forward_fast, dict(cfg=(4, 8, 2, 4, 1), shuffle=False)),
]
SIM_SHAPES = [(2, 1, 19, 23, 5), (1, 2, 23, 19, 8), (1, 1, 1, 7, 3), (1, 1, 9, 1, 2)]


def nan_device(shape):
    return cuda.to_device(np.full(shape, np.nan, np.float32))


def run_forward(fn, q, k, v, causal, scale=None, **kw):
    B, H, Nq, d = q.shape
    o, lse = nan_device(q.shape), nan_device((B, H, Nq))
    fn(q, k, v, causal=causal, scale=scale, o=o, lse=lse, **kw)
    return o.copy_to_host(), lse.copy_to_host()


def check_forward(o, lse, q, k, v, causal, scale=None):
    O, L = reference.attention_forward(q, k, v, causal, scale)
    assert np.isfinite(o).all() and np.isfinite(lse).all()
    np.testing.assert_allclose(o, O, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(lse, L, rtol=1e-4, atol=2e-5)


def check_backward(grads, q, k, v, do, causal, scale=None):
    O, L = reference.attention_forward(q, k, v, causal, scale)
    ref = reference.attention_backward(q, k, v, O, L, do, causal, scale)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref):
        assert np.isfinite(g).all(), name
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=5e-5 * max(1.0, np.abs(r).max()), err_msg=name)


def run_backward(q, k, v, do, causal, scale=None, **kw):
    O, L = reference.attention_forward(q, k, v, causal, scale)
    dk, dv = nan_device(k.shape), nan_device(v.shape)
    dq, dk, dv = nk.fa2_backward(q, k, v, O.astype(np.float32), L.astype(np.float32), do, causal=causal,
                                 scale=scale, dk=dk, dv=dv, **kw)
    return dq.copy_to_host(), dk.copy_to_host(), dv.copy_to_host()


# ---------------------------------------------------------------- simulator (and GPU) at tiny sizes
@pytest.mark.parametrize("name,fn,kw", SIM_VARIANTS, ids=[v[0] for v in SIM_VARIANTS])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_small(rng, name, fn, kw, causal):
    for B, H, Nq, Nk, d in SIM_SHAPES[:2] if not causal else SIM_SHAPES:
        q, k, v = qkv(rng, B, H, Nq, Nk, d)
        o, lse = run_forward(fn, q, k, v, causal, **kw)
        check_forward(o, lse, q, k, v, causal)


def test_forward_scale_and_large_scores(rng):
    q, k, v = qkv(rng, 1, 1, 11, 13, 4, scale=6.0)   # scores of order 100: exp would overflow without the max
    for name, fn, kw in SIM_VARIANTS[1:3]:
        o, lse = run_forward(fn, q, k, v, True, scale=0.7, **kw)
        check_forward(o, lse, q, k, v, True, scale=0.7)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d,G", [(5, 1), (12, 2)])
def test_backward_small(rng, causal, d, G):
    q, k, v = qkv(rng, 1, 2, 19, 23, d)
    do = rng.standard_normal(q.shape).astype(np.float32)
    check_backward(run_backward(q, k, v, do, causal, Br=8, Bc=8, G=G), q, k, v, do, causal)
    if causal:  # Nq < Nk and Nq > Nk, ragged in both
        q, k, v = qkv(rng, 1, 1, 23, 10, d)
        do = rng.standard_normal(q.shape).astype(np.float32)
        check_backward(run_backward(q, k, v, do, causal, Br=4, Bc=8, G=G), q, k, v, do, causal)


def test_matmul_small(rng):
    for M, K, N in [(19, 23, 17), (1, 5, 3), (33, 16, 20)]:
        a = rng.standard_normal((M, K)).astype(np.float32)
        b = rng.standard_normal((K, N)).astype(np.float32)
        for kernel in ("naive", "tiled"):
            np.testing.assert_allclose(nk.matmul(a, b, kernel).copy_to_host(), a.astype(np.float64) @ b,
                                       rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        nk.matmul(a, b, "blocked")


# ---------------------------------------------------------------- tile order equals flashlib.tiled's trace
def _ref_steps(algo, q, k, v, causal, Br, Bc):
    trace = []
    fn = tiled.fa1_forward if algo == "fa1" else tiled.fa2_forward
    fn(q[0, 0], k[0, 0], v[0, 0], causal=causal, Br=Br, Bc=Bc, trace=trace)
    return [(s["i"], s["j"]) for s in trace if not s["skipped"]]


def _recorded(row):
    return [tuple(int(x) for x in ij) for ij in row if ij[0] >= 0]


@pytest.mark.parametrize("causal", [False, True])
def test_trace_order_fa1(rng, causal):
    Br, Bc = 4, 8
    q, k, v = qkv(rng, 1, 2, 21, 18, 3)
    Tr, Tc = -(-21 // Br), -(-18 // Bc)
    tr = cuda.to_device(np.full((2, Tr * Tc, 2), -1, np.int32))
    nk.fa1_forward(q, k, v, causal=causal, Br=Br, Bc=Bc, trace=tr)
    want = _ref_steps("fa1", q, k, v, causal, Br, Bc)
    assert len(want) < Tr * Tc or not causal
    for row in tr.copy_to_host():                     # every (batch, head) block walks the same order
        assert _recorded(row) == want


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("variant", ["fa2", "fa2_fast"])
def test_trace_order_fa2(rng, causal, variant):
    Br, Bc = 4, 8
    q, k, v = qkv(rng, 1, 2, 21, 18, 3)
    Tr, Tc = -(-21 // Br), -(-18 // Bc)
    tr = cuda.to_device(np.full((Tr * 2, Tc, 2), -1, np.int32))
    if variant == "fa2":
        nk.fa2_forward(q, k, v, causal=causal, Br=Br, Bc=Bc, trace=tr)
    else:
        nk.fa2_forward_fast(q, k, v, causal=causal, cfg=(Br, Bc, 2, 2, 2), shuffle=False, trace=tr)
    want = _ref_steps("fa2", q, k, v, causal, Br, Bc)
    got = tr.copy_to_host()
    for bh in range(2):
        for i in range(Tr):                          # block (i, bh) visits the j's of row i, in order
            assert _recorded(got[i + Tr * bh]) == [s for s in want if s[0] == i]


# ---------------------------------------------------------------- the backend contract and flashlib.attention
def test_api_numba_backend(rng):
    q, k, v = qkv(rng, 1, 2, 13, 17, 6)
    for causal in (False, True):
        o, lse = flashlib.attention(q, k, v, causal=causal, backend="numba", return_lse=True)
        assert isinstance(o, np.ndarray) and o.dtype == np.float32 and lse.dtype == np.float32
        check_forward(o, lse, q, k, v, causal)
        do = rng.standard_normal(q.shape).astype(np.float32)
        grads = flashlib.attention_backward(q, k, v, o, lse, do, causal=causal, backend="numba")
        check_backward(grads, q, k, v, do, causal)
    for variant in ("fa1", "fa2", "fa2_fast"):
        o, lse = nk.forward(*(cuda.to_device(a) for a in (q, k, v)), causal=True, scale=None, dtype="float32",
                            variant=variant)
        check_forward(o.copy_to_host(), lse.copy_to_host(), q, k, v, True)


def test_rejects_what_it_cannot_do(rng):
    q, k, v = qkv(rng, 1, 1, 4, 4, 257)
    with pytest.raises(ValueError, match="head dims 1..256"):
        flashlib.attention(q, k, v, backend="numba")
    q, k, v = qkv(rng, 1, 1, 4, 4, 8)
    with pytest.raises(ValueError, match="float32"):
        nk.forward(q, k, v, causal=False, scale=None, dtype="float16")
    with pytest.raises(ValueError, match="float32"):
        nk.backward(q, k, v, q, q[..., 0], q, causal=False, scale=None, dtype="bfloat16")
    with pytest.raises(ValueError, match="variant"):
        nk.forward(q, k, v, causal=False, scale=None, dtype="float32", variant="fa3")


def test_import_does_not_pull_numba_cuda():
    code = "import sys, flashlib; assert 'numba.cuda' not in sys.modules and 'numba' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---------------------------------------------------------------- PTX: registers, shared memory, spills
CORE_SCRIPT = "import json\nfrom flashlib.numba_kernels import ptx\nprint(json.dumps(ptx.core_report()))"


def ptxas_jobs():
    return ptx_script(CORE_SCRIPT, 110, "test_numba_kernels")   # a rough number of seconds


BACKGROUND = {"test_ptx_resources": ptxas_jobs}   # compiled beside the other tests


@pytest.fixture(scope="module")
def ptxas_rows():
    return ptx_script_rows(ptxas_jobs())


def test_ptx_resources(ptxas_rows):
    kernels = {r["kernel"] for r in ptxas_rows}
    for name in ("fa1_forward", "fa2_forward", "fa2_forward_fast", "fa2_backward"):
        assert {f"{name} D={D}" for D in nk.HEAD_DIMS} <= kernels
    assert {r["cc"] for r in ptxas_rows} == {"7.5", "8.0", "9.0"}
    for r in ptxas_rows:
        where = f"{r['kernel']} sm_{r['cc']}: {r}"
        assert r["registers"] * r["threads"] <= 65536, where
        assert r["smem"] <= 48 * 1024, where
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, where


# ---------------------------------------------------------------- real GPU
GPU_SHAPES = [(1, 1, 1, 1, 1), (2, 3, 77, 131, 40), (1, 2, 1000, 999, 64), (1, 1, 513, 2049, 100),
              (1, 2, 2048, 1500, 96), (1, 1, 4096, 4096, 128), (1, 1, 4096, 4096, 64), (2, 1, 300, 300, 17),
              (1, 1, 129, 65, 128), (1, 1, 64, 64, 32)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_forward(rng, shape, causal):
    B, H, Nq, Nk, d = shape
    q, k, v = qkv(rng, B, H, Nq, Nk, d)
    for name, fn in (("fa1", nk.fa1_forward), ("fa2", nk.fa2_forward), ("fa2_fast", nk.fa2_forward_fast)):
        if name == "fa1" and Nq * Nk > 1100 * 1100:
            continue                                 # one block per head: too slow to be worth it at 4096
        o, lse = run_forward(fn, q, k, v, causal)
        check_forward(o, lse, q, k, v, causal)
    o, lse = run_forward(nk.fa2_forward_fast, q, k, v, causal, shuffle=False)
    check_forward(o, lse, q, k, v, causal)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES[:7], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_backward(rng, shape, causal):
    B, H, Nq, Nk, d = shape
    q, k, v = qkv(rng, B, H, Nq, Nk, d)
    do = rng.standard_normal(q.shape).astype(np.float32)
    check_backward(run_backward(q, k, v, do, causal), q, k, v, do, causal)


@pytest.mark.gpu
def test_gpu_trace_default_tiles(rng):
    q, k, v = qkv(rng, 1, 1, 300, 200, 64)
    Br, Bc = nk.fa2_fast.config(64, sim=False)[:2] if hasattr(nk, "fa2_fast") else (64, 32)
    Tr, Tc = -(-300 // Br), -(-200 // Bc)
    tr = cuda.to_device(np.full((Tr, Tc, 2), -1, np.int32))
    nk.fa2_forward_fast(q, k, v, causal=True, trace=tr)
    want = _ref_steps("fa2", q, k, v, True, Br, Bc)
    got = tr.copy_to_host()
    for i in range(Tr):
        assert _recorded(got[i]) == [s for s in want if s[0] == i]


@pytest.mark.gpu
def test_gpu_zero_copy_torch_and_cupy(rng):
    torch = pytest.importorskip("torch")
    cp = pytest.importorskip("cupy")
    from flashlib._arrays import to_numba
    q, k, v = qkv(rng, 2, 3, 257, 300, 64)
    do = rng.standard_normal(q.shape).astype(np.float32)
    O, L = reference.attention_forward(q, k, v, True)
    ref = reference.attention_backward(q, k, v, O, L, do, True)
    # torch, including a non-contiguous view (B, N, H, d) -> (B, H, N, d)
    tq, tk, tv, tdo = (torch.from_numpy(a).cuda() for a in (q, k, v, do))
    tqs = tq.transpose(1, 2).contiguous().transpose(1, 2)
    assert not tqs.is_contiguous()
    assert to_numba(tq).device_ctypes_pointer.value == tq.data_ptr()          # a view, not a copy
    for qq in (tq, tqs):
        o, lse = flashlib.attention(qq, tk, tv, causal=True, backend="numba", return_lse=True)
        assert isinstance(o, torch.Tensor) and o.is_cuda and o.dtype == torch.float32
        np.testing.assert_allclose(o.cpu().numpy(), O, rtol=1e-4, atol=2e-5)
        g = flashlib.attention_backward(qq, tk, tv, o, lse, tdo, causal=True, backend="numba")
        for x, r in zip(g, ref):
            assert isinstance(x, torch.Tensor) and x.is_cuda
            np.testing.assert_allclose(x.cpu().numpy(), r, rtol=1e-4, atol=5e-5 * max(1, np.abs(r).max()))
    cq, ck, cv = (cp.asarray(a) for a in (q, k, v))
    assert to_numba(cq).device_ctypes_pointer.value == cq.data.ptr
    o = flashlib.attention(cq, ck, cv, causal=True, backend="numba")
    assert isinstance(o, cp.ndarray)
    np.testing.assert_allclose(cp.asnumpy(o), O, rtol=1e-4, atol=2e-5)
