"""flashlib.numba_kernels: grouped-query attention, head dims up to 256, and B*H beyond grid.y.

Simulator tests (tiny): GQA and head dims on the CUDA-core kernels, and the grid.z path of the (batch, head) pairs,
exercised by lowering the grid limit (cupy_kernels.shapes.MAX_GRID_YZ, which pair_grid reads) so that a handful of pairs
spill onto grid.z. GPU tests: the Tensor Core kernels too, and B*H = 70000 on every Numba kernel.
"""
import zlib

import numpy as np
import pytest

from flashlib import cupy_kernels as ck
from flashlib import reference
from tests.conftest import HAS_GPU, qkv

from numba import cuda  # noqa: E402  (after conftest chose the simulator or the GPU)
from flashlib import numba_kernels as nk  # noqa: E402
from flashlib.numba_kernels import fa2_tc  # noqa: E402


def gqa_reference(q, k, v, do, causal, scale=None):
    """float64 O, lse, dQ, dK, dV with k, v repeated to q's heads (query head h uses kv head h // G), dK, dV summed
    over each kv head's G query heads."""
    B, H, Hkv, Nk, d = q.shape[0], q.shape[1], k.shape[1], k.shape[2], k.shape[3]
    G = H // Hkv
    kr, vr = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    o, lse = reference.attention_forward(q, kr, vr, causal, scale)
    dq, dk, dv = reference.attention_backward(q, kr, vr, o, lse, do, causal, scale)
    return o, lse, dq, dk.reshape(B, Hkv, G, Nk, d).sum(2), dv.reshape(B, Hkv, G, Nk, d).sum(2)


def inputs(rng, B, H, Hkv, Nq, Nk, d):
    q = rng.standard_normal((B, H, Nq, d)).astype(np.float32)
    k, v = (rng.standard_normal((B, Hkv, Nk, d)).astype(np.float32) for _ in range(2))
    return q, k, v, rng.standard_normal(q.shape).astype(np.float32)


def nan_device(shape):
    return cuda.to_device(np.full(shape, np.nan, np.float32))


def run_cuda_core(q, k, v, do, causal, sim=True):
    """(name, o, lse) of each CUDA-core forward, and the backward's (dq, dk, dv); outputs NaN-poisoned."""
    small = dict(fa1=dict(Br=8, Bc=8), fa2=dict(Br=8, Bc=4), fa2_fast=dict(cfg=(8, 8, 2, 2, 2), shuffle=False))
    outs = []
    for name, fn in (("fa1", nk.fa1_forward), ("fa2", nk.fa2_forward), ("fa2_fast", nk.fa2_forward_fast)):
        o, lse = nan_device(q.shape), nan_device(q.shape[:3])
        fn(q, k, v, causal=causal, o=o, lse=lse, **(small[name] if sim else {}))
        outs.append((name, o.copy_to_host(), lse.copy_to_host()))
    O, L = reference.attention_forward(q, np.repeat(k, q.shape[1] // k.shape[1], 1),
                                       np.repeat(v, q.shape[1] // k.shape[1], 1), causal)
    dk, dv = nan_device(k.shape), nan_device(v.shape)
    grads = nk.fa2_backward(q, k, v, O.astype(np.float32), L.astype(np.float32), do, causal=causal, dk=dk, dv=dv,
                            **(dict(Br=4, Bc=4, G=2) if sim else {}))
    return outs, tuple(g.copy_to_host() for g in grads)


def check(outs, grads, ref, rtol=1e-4):
    for name, o, lse in outs:
        np.testing.assert_allclose(o, ref[0], rtol=rtol, atol=3e-5, err_msg=name)
        np.testing.assert_allclose(lse, ref[1], rtol=rtol, atol=3e-5, err_msg=name)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref[2:]):
        np.testing.assert_allclose(g, r, rtol=rtol, atol=1e-4 * max(1.0, np.abs(r).max()), err_msg=name)


@pytest.mark.parametrize("B,H,Hkv,Nq,Nk,d,causal", [(1, 4, 2, 9, 11, 5, True), (2, 3, 1, 7, 5, 8, False)])
def test_grouped_query_attention_cuda_core(rng, B, H, Hkv, Nq, Nk, d, causal):
    q, k, v, do = inputs(rng, B, H, Hkv, Nq, Nk, d)
    check(*run_cuda_core(q, k, v, do, causal, sim=not HAS_GPU), gqa_reference(q, k, v, do, causal))


def test_head_dim_256_bucket_cuda_core(rng):
    """A head dim between 128 and 256 (the D = 256 kernels and their smaller tiles)."""
    q, k, v, do = inputs(rng, 1, 1, 1, 5, 3, 130)
    assert nk.head_bucket(130) == 256 and nk.MAX_HEAD_DIM == 256
    check(*run_cuda_core(q, k, v, do, True, sim=not HAS_GPU), gqa_reference(q, k, v, do, True))
    with pytest.raises(ValueError, match="1..256"):
        nk.head_bucket(257)


def test_pairs_spill_onto_grid_z(rng, monkeypatch):
    """With grid.y capped at 3, B*H = 5 pairs run as grid (x, 3, 2): each kernel must find its pair at
    blockIdx.y + gridDim.y * blockIdx.z, and the sixth block row, past the last pair, must return."""
    monkeypatch.setattr(ck.shapes, "MAX_GRID_YZ", 3)      # pair_grid reads its module's limit
    assert ck.pair_grid(4, 5) == (4, 3, 2)
    q, k, v, do = inputs(rng, 1, 5, 5, 6, 7, 4)
    check(*run_cuda_core(q, k, v, do, True, sim=not HAS_GPU), gqa_reference(q, k, v, do, True))


def test_rejects_heads_that_do_not_divide(rng):
    q, k, v, do = inputs(rng, 1, 4, 3, 4, 4, 8)
    for fn in (nk.fa1_forward, nk.fa2_forward, nk.fa2_forward_fast):
        with pytest.raises(ValueError, match="must divide"):
            fn(q, k, v)


# ---------------------------------------------------------------- real GPU

def _torch(shape, dtype, seed):
    import torch
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", generator=g).to(getattr(torch, dtype))


def _run_tc(q, k, v, causal, scale, dtype):
    import torch
    bits = (lambda t: t.view(torch.int16)) if dtype == "bfloat16" else (lambda t: t)
    o = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device="cuda", dtype=torch.float32)
    fa2_tc.fa2_forward_tc(*(cuda.as_cuda_array(bits(t)) for t in (q, k, v)), causal=causal, scale=scale, dtype=dtype,
                          o=cuda.as_cuda_array(bits(o)), lse=cuda.as_cuda_array(lse))
    cuda.synchronize()
    return o, lse


def _f64(t):
    import torch
    return t.detach().to(torch.float64).cpu().numpy()


def _check_tc(B, H, Hkv, Nq, Nk, d, causal, dtype):
    """fa2_forward_tc against float64 with FlashAttention's rule (2x naive attention's error in the same precision)."""
    import torch
    scale = 1 / np.sqrt(d)
    seed = zlib.crc32(repr((B, H, Hkv, Nq, Nk, d, causal, dtype)).encode())
    q, k, v = _torch((B, H, Nq, d), dtype, seed), _torch((B, Hkv, Nk, d), dtype, seed + 1), _torch((B, Hkv, Nk, d), dtype, seed + 2)
    o, lse = _run_tc(q, k, v, causal, scale, dtype)
    G = H // Hkv
    kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    o_ref, lse_ref = reference.attention_forward(_f64(q), _f64(kr), _f64(vr), causal, scale)
    S = (q @ kr.transpose(-1, -2)) * scale
    if causal:
        S = S.masked_fill(~torch.ones(S.shape[-2:], dtype=torch.bool, device="cuda").tril(), float("-inf"))
    naive = torch.softmax(S, dim=-1) @ vr
    bound = 2 * np.abs(_f64(naive) - o_ref).max() + {"float16": 1e-4, "bfloat16": 5e-4}[dtype]
    err = np.abs(_f64(o) - o_ref).max()
    assert err <= bound, ((B, H, Hkv, Nq, Nk, d, causal, dtype), err, bound)
    assert np.abs(_f64(lse) - lse_ref).max() <= 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("d", [1, 3, 32, 40, 59, 64, 80, 96, 111, 128, 200, 256])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_tc_any_head_dim_and_gqa(d, dtype):
    for i, (Nq, Nk, causal) in enumerate([(1, 1, False), (3, 97, True), (113, 1023, False), (1023, 113, True)]):
        _check_tc(1, 4 if i % 2 else 2, 2 if i % 2 else 1, Nq, Nk, d, causal, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [32, 64, 96, 128])
def test_gpu_tf32_forward_and_backward_gqa(rng, d):
    from flashlib.numba_kernels import fa2_bwd_tf32
    q, k, v, do = inputs(rng, 1, 4, 2, 97, 113, d)
    ref = gqa_reference(q, k, v, do, True)
    o, lse = nk.fa2_forward_tf32(cuda.to_device(q), cuda.to_device(k), cuda.to_device(v), causal=True)
    dk, dv = nan_device(k.shape), nan_device(v.shape)
    grads = fa2_bwd_tf32.fa2_backward_tf32(q, k, v, ref[0].astype(np.float32), ref[1].astype(np.float32), do,
                                           causal=True, dk=dk, dv=dv)
    check([("tf32x3", o.copy_to_host(), lse.copy_to_host())], tuple(g.copy_to_host() for g in grads), ref, rtol=2e-4)


@pytest.mark.gpu
def test_gpu_batch_heads_beyond_grid_y(rng):
    """B*H = 70000 pairs on every Numba kernel (fa1 has them on grid.x): NaN-poisoned outputs all written, right."""
    import torch
    from flashlib.numba_kernels import fa2_bwd_tf32
    B, H, Hkv, Nq, Nk, d = 17500, 4, 2, 3, 5, 32
    q, k, v, do = inputs(rng, B, H, Hkv, Nq, Nk, d)
    ref = gqa_reference(q, k, v, do, True)
    check(*run_cuda_core(q, k, v, do, True, sim=False), ref)
    o, lse = nk.fa2_forward_tf32(cuda.to_device(q), cuda.to_device(k), cuda.to_device(v), causal=True)
    grads = fa2_bwd_tf32.fa2_backward_tf32(q, k, v, ref[0].astype(np.float32), ref[1].astype(np.float32), do,
                                           causal=True)
    check([("tf32x3", o.copy_to_host(), lse.copy_to_host())], tuple(g.copy_to_host() for g in grads), ref, rtol=2e-4)
    for dtype in ("float16", "bfloat16"):
        qt, kt, vt = (torch.from_numpy(a).cuda().to(getattr(torch, dtype)) for a in (q, k, v))
        o16, lse16 = _run_tc(qt, kt, vt, True, 1 / np.sqrt(d), dtype)
        assert torch.isfinite(o16).all() and torch.isfinite(lse16).all()
        o_ref, _ = reference.attention_forward(_f64(qt), np.repeat(_f64(kt), 2, 1), np.repeat(_f64(vt), 2, 1), True)
        assert np.abs(_f64(o16) - o_ref).max() <= 2e-2
