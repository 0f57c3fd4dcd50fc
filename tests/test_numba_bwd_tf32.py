"""flashlib.numba_kernels.fa2_bwd_tf32: the float32 (3xTF32) Tensor Core backward.

Without a GPU (the simulator cannot run PTX):
  * a NumPy model of the kernel's blocks, warps and lanes, built on the kernel's index maps (st_a, st_b, P_AS_A,
    dv_b, dq_a, dq_b) and the mma.m16n8k8 .tf32 fragment layouts, against the float64 reference: it checks the
    bookkeeping (which lane holds which element, the k permutations, masking, the atomic dQ sum) the kernel spells;
  * `cuda.compile_ptx` + `ptxas -v` (a subprocess without the simulator): tf32 mma present, fully unrolled loops
    (no local memory), no spills, registers and dynamic shared memory within sm_80 / sm_90 limits;
  * argument checks and the dispatch rule of `numba_kernels.backward`.
`gpu` tests: dq, dk, dv against the float64 reference on random shapes (ragged, Nq != Nk, causal, every head dim),
outputs NaN-poisoned. Tolerance: |x - ref| <= 1e-4 |ref| + 5e-5 max(1, max|ref|), the same bound the CUDA-core
backward meets (tests/test_numba_kernels.py): 3xTF32 products are float32-accurate (~1e-6 relative).
"""
import inspect
import math
import os
import textwrap
import zlib

import numpy as np
import pytest

from flashlib import reference
from flashlib.constants import LOG2E
from tests.conftest import HAS_GPU, ptx_script, ptx_script_rows, qkv

from flashlib import numba_kernels as nk  # noqa: E402  (after conftest chose the simulator or the GPU)
from flashlib.numba_kernels import fa2_bwd_tf32 as bt, lanes  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL, ATOL = 1e-4, 5e-5


def check_grads(grads, ref):
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref):
        assert np.isfinite(g).all(), name
        np.testing.assert_allclose(g, r, rtol=RTOL, atol=ATOL * max(1.0, np.abs(r).max()), err_msg=name)


# ---------------------------------------------------------------- a NumPy model of the kernel's lanes
def _mma(a_regs, b_regs, c_regs):
    """One m16n8k8 mma from per-lane registers (32, 4), (32, 2), (32, 4), per the .tf32 fragment layouts; the
    product in float64 (3xTF32 is float32-accurate; the model checks the bookkeeping, not the rounding)."""
    A, B = np.full((16, 8), np.nan), np.full((8, 8), np.nan)
    for lane in range(32):
        for i in range(4):
            A[lanes.tf32_a_index(lane, i)] = a_regs[lane][i]
        for i in range(2):
            B[lanes.tf32_b_index(lane, i)] = b_regs[lane][i]
    assert not np.isnan(A).any() and not np.isnan(B).any()
    Dm = A @ B
    return np.array([[c_regs[lane][i] + Dm[lanes.c_index(lane, i)] for i in range(4)] for lane in range(32)])


def model_backward(Q, K, V, dO, lse, Dr, causal, scale, D, Br):
    """The kernel for one (batch, head), block by block, warp by warp, in NumPy. Returns dq, dk, dv."""
    Nq, Nk, Bc = Q.shape[0], K.shape[0], bt.BC
    KD, NQ, MQ, DQN = D // 8, Br // 8, Br // 16, D // (8 * bt.NW)
    lane_ids = range(32)
    dq, dk, dv = np.zeros((Nq, D)), np.full((Nk, D), np.nan), np.full((Nk, D), np.nan)

    def tile(X, r0, rows):
        s = np.zeros((rows, D))
        n = max(0, min(rows, X.shape[0] - r0))
        s[:n] = X[r0:r0 + n]
        return s

    for j in range(-(-Nk // Bc)):
        kv0 = j * Bc
        Ks, Vs = tile(K, kv0, Bc), tile(V, kv0, Bc)
        acc_k = np.zeros((bt.NW, KD, 32, 4))
        acc_v = np.zeros((bt.NW, KD, 32, 4))
        for i in range(kv0 // Br if causal else 0, -(-Nq // Br)):
            q0 = i * Br
            Qs, dOs = tile(Q, q0, Br), tile(dO, q0, Br)
            L = np.array([lse[q0 + r] if q0 + r < Nq else np.inf for r in range(Br)])
            Dl = np.array([Dr[q0 + r] if q0 + r < Nq else 0.0 for r in range(Br)])
            dS = np.full((Br, Bc), np.nan)
            for w in range(bt.NW):
                kw = 16 * w
                s = np.zeros((NQ, 32, 4))
                dp = np.zeros((NQ, 32, 4))
                for kk in range(KD):
                    ak = [[Ks[rc] for rc in lanes.st_a(ln, kw, kk)] for ln in lane_ids]
                    av = [[Vs[rc] for rc in lanes.st_a(ln, kw, kk)] for ln in lane_ids]
                    for n in range(NQ):
                        s[n] = _mma(ak, [[Qs[rc] for rc in lanes.st_b(ln, n, kk)] for ln in lane_ids], s[n])
                        dp[n] = _mma(av, [[dOs[rc] for rc in lanes.st_b(ln, n, kk)] for ln in lane_ids], dp[n])
                for n in range(NQ):
                    for ln in lane_ids:
                        g, t = ln >> 2, ln & 3
                        for e in range(4):
                            kr, qr = kw + g + 8 * (e >> 1), 8 * n + 2 * t + (e & 1)
                            assert lanes.c_index(ln, e) == (kr - kw, qr - 8 * n)
                            p = np.exp2(s[n, ln, e] * scale * LOG2E - L[qr] * LOG2E)
                            if kv0 + kr >= Nk or (causal and kv0 + kr > q0 + qr):
                                p = 0.0
                            ds = p * (dp[n, ln, e] - Dl[qr])
                            s[n, ln, e], dp[n, ln, e] = p, ds
                            dS[qr, kr] = ds
                for kk in range(NQ):
                    pa = [[s[kk, ln, lanes.P_AS_A[e]] for e in range(4)] for ln in lane_ids]
                    da = [[dp[kk, ln, lanes.P_AS_A[e]] for e in range(4)] for ln in lane_ids]
                    for n in range(KD):
                        acc_v[w, n] = _mma(pa, [[dOs[rc] for rc in lanes.dv_b(ln, kk, n)] for ln in lane_ids], acc_v[w, n])
                        acc_k[w, n] = _mma(da, [[Qs[rc] for rc in lanes.dv_b(ln, kk, n)] for ln in lane_ids], acc_k[w, n])
            assert not np.isnan(dS).any()
            for w in range(bt.NW):                   # dQ: after the barrier, from the whole dS
                for m in range(MQ):
                    for n in range(DQN):
                        col0 = 8 * (DQN * w + n)
                        acc = np.zeros((32, 4))
                        for kk in range(Bc // 8):
                            a = [[dS[rc] for rc in lanes.dq_a(ln, m, kk)] for ln in lane_ids]
                            acc = _mma(a, [[Ks[rc] for rc in lanes.dq_b(ln, kk, col0)] for ln in lane_ids], acc)
                        for ln in lane_ids:
                            for e in range(4):
                                r, c = lanes.c_index(ln, e)
                                if q0 + 16 * m + r < Nq:
                                    dq[q0 + 16 * m + r, col0 + c] += acc[ln, e] * scale   # the atomic add
        for w in range(bt.NW):
            for n in range(KD):
                for ln in lane_ids:
                    for e in range(4):
                        r, c = lanes.c_index(ln, e)
                        if kv0 + 16 * w + r < Nk:
                            dk[kv0 + 16 * w + r, 8 * n + c] = acc_k[w, n, ln, e] * scale
                            dv[kv0 + 16 * w + r, 8 * n + c] = acc_v[w, n, ln, e]
    return dq, dk, dv


@pytest.mark.parametrize("D,Br,Nq,Nk,causal", [(32, 16, 37, 70, False), (32, 16, 70, 37, True),
                                               (32, 32, 33, 129, True), (64, 16, 17, 65, False)])
def test_lane_model_matches_reference(rng, D, Br, Nq, Nk, causal):
    q, k, v = qkv(rng, 1, 1, Nq, Nk, D)
    do = rng.standard_normal(q.shape)
    scale = 1 / math.sqrt(D)
    O, L = reference.attention_forward(q, k, v, causal, scale)
    ref = reference.attention_backward(q, k, v, O, L, do, causal, scale)
    Dr = (do * O).sum(-1)
    got = model_backward(q[0, 0], k[0, 0], v[0, 0], do[0, 0], L[0, 0], Dr[0, 0], causal, scale, D, Br)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r[0, 0], rtol=1e-9, atol=1e-9)


def test_index_maps_hit_distinct_banks():
    """Every shared-memory fragment load of the kernel: the 32 lanes of a warp hit 32 different banks
    (row stride D + 4 words), except dQ's A loads of dS (row stride Bc + 4: 2-way, 4 loads per 8 keys)."""
    for D in bt.TF32_HEAD_DIMS:
        LD = D + 4
        bank = lambda rc, ld: (rc[0] * ld + rc[1]) % 32
        for i in range(4):
            assert len({bank(lanes.st_a(ln, 16, 3)[i], LD) for ln in range(32)}) == 32
        for i in range(2):
            assert len({bank(lanes.st_b(ln, 1, 2)[i], LD) for ln in range(32)}) == 32
            assert len({bank(lanes.dv_b(ln, 1, 2)[i], LD) for ln in range(32)}) == 32
            assert len({bank(lanes.dq_b(ln, 3, 16)[i], LD) for ln in range(32)}) == 32
    # dS writes: row qr = 8n + 2t + u, column kw + g + 8h
    assert len({((2 * (ln & 3)) * (bt.BC + 4) + (ln >> 2)) % 32 for ln in range(32)}) == 32


def test_p_as_a_is_a_permutation_of_k():
    """C register P_AS_A[i] of S^T's n-tile kk holds the element (key row, query) that A register i of the P^T dO
    k-step kk stands for, with k slot t = query 2t and slot t+4 = query 2t+1 (the rows dv_b loads)."""
    for ln in range(32):
        for i in range(4):
            row, slot = lanes.tf32_a_index(ln, i)
            r, c = lanes.c_index(ln, lanes.P_AS_A[i])
            assert (r, c) == (row, 2 * (slot & 3) + (slot >> 2))
        for i in range(2):
            slot, col = lanes.tf32_b_index(ln, i)
            assert lanes.dv_b(ln, 0, 0)[i] == (2 * (slot & 3) + (slot >> 2), col)


def test_kernel_spells_the_index_maps():
    """The kernel's inline address expressions equal the maps the model uses (evaluated for every lane)."""
    src = textwrap.dedent(inspect.getsource(bt.make_bwd_tf32))
    assert "(kw + g + 8 * (e & 1)) * LD + 8 * kk + t + 4 * (e >> 1)" in src          # st_a
    assert "(8 * n + g) * LD + 8 * kk + t]" in src and "(8 * n + g) * LD + 8 * kk + t + 4]" in src   # st_b
    assert "(8 * kk + 2 * t) * LD + 8 * n + g]" in src and "(8 * kk + 2 * t + 1) * LD + 8 * n + g]" in src  # dv_b
    assert "(16 * m + g + 8 * (e & 1)) * LDS + 8 * kk + 2 * t + (e >> 1)" in src    # dq_a
    assert "(e & 1) * 2 + (e >> 1)" in src                                          # P_AS_A
    for ln in range(32):
        g, t = ln >> 2, ln & 3
        for e in range(4):
            assert lanes.st_a(ln, 0, 0)[e] == (g + 8 * (e & 1), t + 4 * (e >> 1))
            assert lanes.dq_a(ln, 0, 0)[e] == (g + 8 * (e & 1), 2 * t + (e >> 1))
            assert lanes.P_AS_A[e] == (e & 1) * 2 + (e >> 1)


# ---------------------------------------------------------------- PTX and ptxas, without a GPU
PTX_SCRIPT = """
import json
from flashlib.numba_kernels import ptx
print(json.dumps(ptx.bwd_tf32_report()))
"""


def ptx_jobs():
    return ptx_script(PTX_SCRIPT, 35, "test_numba_bwd_tf32")   # a rough number of seconds


BACKGROUND = {"test_ptx_has_tf32_mma_unrolled_and_no_local_memory": ptx_jobs}   # compiled beside the other tests


@pytest.fixture(scope="module")
def ptx_rows():
    return ptx_script_rows(ptx_jobs())


def test_ptx_has_tf32_mma_unrolled_and_no_local_memory(ptx_rows):
    assert {(r["D"], r["cc"]) for r in ptx_rows} == {(D, cc) for D in bt.TF32_HEAD_DIMS for cc in ("8.0", "9.0")}
    for r in ptx_rows:
        where = f"{r['kernel']} sm_{r['cc']}: {r}"
        D, Br = r["D"], r["Br"]
        KD, NQ = D // 8, Br // 8
        # the inner loops over fragments are unrolled: S^T and dP^T (NQ per k-step), dV and dK (KD per k-step),
        # dQ (Br/16 * D/32 per k-step), 3 mma each; outer k loops may stay loops (their bodies repeat in PTX 1x+)
        assert r["mma"] % 3 == 0 and r["mma"] >= 3 * (2 * NQ + 2 * KD + (Br // 16) * (D // 32)), where
        assert r["atom"] >= 1, where
        assert r["stack"] == 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0, where
        assert r["registers"] <= 255 and r["registers"] * r["threads"] <= 65536, where
        if r["maxreg"]:                              # sm_90, d <= 96: three blocks per SM
            assert r["registers"] <= r["maxreg"] and 3 * r["threads"] * r["registers"] <= 65536, where
            assert 3 * r["dyn_smem"] <= 227 * 1024, where
        assert r["smem"] == 0 and r["dyn_smem"] == bt.smem_bytes(D) <= 163 * 1024, where   # sm_80's opt-in limit


# ---------------------------------------------------------------- arguments and dispatch
def test_rejects_what_it_cannot_do(rng):
    with pytest.raises(ValueError, match="head_dim"):
        bt.check(48)
    with pytest.raises(ValueError, match="8.0"):
        bt.check(64, (7, 5))
    bt.check(128, (9, 0))
    assert not bt.fits(48)
    if not HAS_GPU:
        assert not bt.fits(64)                       # the simulator: fa2_backward runs
        q, k, v = qkv(rng, 1, 1, 8, 8, 64)
        with pytest.raises(RuntimeError, match="simulator"):
            bt.fa2_backward_tf32(q, k, v, q, np.zeros((1, 1, 8), np.float32), q)


def test_layout_and_smem():
    for D in bt.TF32_HEAD_DIMS:
        off, nbytes = bt.layout(D, bt.TILES[D])
        assert sorted(off.values()) == list(off.values())
        assert nbytes == 4 * (2 * bt.BC * (D + 4) + 2 * bt.TILES[D] * (D + 4) + bt.TILES[D] * (bt.BC + 4)
                              + 2 * bt.TILES[D])
        assert nbytes <= 99 * 1024 or D > 128     # fits the 99 KB of sm_86 / sm_89 too


# ---------------------------------------------------------------- real GPU
GPU_SHAPES = [(1, 1, 1, 1, 64), (2, 3, 77, 131, 64), (1, 2, 1000, 999, 64), (1, 1, 513, 2049, 128),
              (1, 2, 2048, 1500, 128), (1, 1, 4096, 4096, 128), (1, 1, 4096, 4096, 64), (2, 1, 300, 300, 32),
              (1, 1, 129, 65, 96), (3, 2, 17, 333, 128), (1, 1, 64, 64, 32), (1, 2, 700, 64, 96)]


def _run(q, k, v, do, causal, scale=None):
    from numba import cuda
    B, H, Nq, d = q.shape
    O, L = reference.attention_forward(q, k, v, causal, scale)
    dq = cuda.to_device(np.zeros(q.shape, np.float32))              # accumulated into: must be zero
    dk, dv = (cuda.to_device(np.full(k.shape, np.nan, np.float32)) for _ in range(2))   # poisoned
    bt.fa2_backward_tf32(q, k, v, O.astype(np.float32), L.astype(np.float32), do, causal=causal, scale=scale,
                         dq=dq, dk=dk, dv=dv)
    ref = reference.attention_backward(q, k, v, O, L, do, causal, scale)
    return (dq.copy_to_host(), dk.copy_to_host(), dv.copy_to_host()), ref


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_backward_matches_reference(shape, causal):
    rng = np.random.default_rng(zlib.crc32(repr((shape, causal)).encode()))
    B, H, Nq, Nk, d = shape
    q, k, v = qkv(rng, B, H, Nq, Nk, d)
    do = rng.standard_normal(q.shape).astype(np.float32)
    grads, ref = _run(q, k, v, do, causal)
    check_grads(grads, ref)


@pytest.mark.gpu
def test_gpu_scale_large_scores_and_dispatch(rng):
    """scale given, scores of order 50; the backend contract picks this kernel for float32 on sm_80+."""
    from numba import cuda
    q, k, v = qkv(rng, 2, 2, 200, 300, 64, scale=3.0)
    do = rng.standard_normal(q.shape).astype(np.float32)
    grads, ref = _run(q, k, v, do, True, scale=0.3)
    check_grads(grads, ref)
    assert bt.fits(64) and bt.fits(128) == (cuda.get_current_device().compute_capability >= (8, 0))
    O, L = reference.attention_forward(q, k, v, False)
    g = nk.backward(*(cuda.to_device(x) for x in (q, k, v, O.astype(np.float32), L.astype(np.float32), do)),
                    causal=False, scale=None, dtype="float32")
    check_grads([x.copy_to_host() for x in g], reference.attention_backward(q, k, v, O, L, do, False))


@pytest.mark.gpu
def test_gpu_strided_torch_inputs():
    torch = pytest.importorskip("torch")
    from flashlib._arrays import to_numba
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, 2, 3, 257, 300, 128)
    do = rng.standard_normal(q.shape).astype(np.float32)
    O, L = reference.attention_forward(q, k, v, True)
    ref = reference.attention_backward(q, k, v, O, L, do, True)
    tq = torch.from_numpy(q).cuda().transpose(1, 2).contiguous().transpose(1, 2)
    assert not tq.is_contiguous()
    tk, tv, tdo, to_, tl = (torch.from_numpy(np.ascontiguousarray(a, np.float32)).cuda() for a in (k, v, do, O, L))
    g = bt.fa2_backward_tf32(*(to_numba(x) for x in (tq, tk, tv, to_, tl, tdo)), causal=True)
    check_grads([x.copy_to_host() for x in g], ref)
