"""flashlib.numba_kernels.lanes, mma and fa2_tc: Tensor Cores from Numba.

Numba's simulator cannot run PTX, so without a GPU these kernels are checked three ways:
  * the fragment layouts (lanes.a_index, b_index, c_index, ldmatrix_index) and a NumPy model of a warp built on them
    against NumPy matrix products, and one NumPy warp running fa2_tc's exact steps (ldmatrix addresses, mma
    fragments, shuffles, P from S's accumulators as the A operand of P V) against the float64 reference;
  * `cuda.compile_ptx` + `ptxas -v` for every kernel instance (a subprocess without the simulator): the mma.sync
    instructions are there, fully unrolled, no local memory, no spills;
  * argument checks.
`gpu` tests run the intrinsics alone and the attention kernel against the float64 reference on a real GPU.
"""
import inspect
import math
import os
import zlib

import numpy as np
import pytest

from flashlib import reference
from flashlib.constants import LOG2E
from tests.conftest import HAS_GPU, ptx_script, ptx_script_rows, qkv

from flashlib import numba_kernels as nk  # noqa: E402  (after conftest chose the simulator or the GPU)
from flashlib.numba_kernels import fa2_tc, lanes, mma  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- fragment layouts
@pytest.mark.parametrize("shape", lanes.SHAPES)
def test_layouts_cover_each_element_once(shape):
    K = 16 if shape == "m16n8k16" else 8
    for index, n, dims in ((lanes.a_index, K // 2, (16, K)), (lanes.b_index, K // 4, (K, 8))):
        seen = [index(lane, i, shape) for lane in range(32) for i in range(n)]
        assert sorted(seen) == [(r, c) for r in range(dims[0]) for c in range(dims[1])]
    seen = [lanes.c_index(lane, i) for lane in range(32) for i in range(4)]
    assert sorted(seen) == [(r, c) for r in range(16) for c in range(8)]
    with pytest.raises(ValueError):
        lanes.a_index(32, 0, shape)


def test_layouts_match_the_ptx_isa_tables():
    # PTX ISA, "Matrix fragments for mma.m16n8k16 with floating point type": spot values from its figures
    assert lanes.a_index(0, 0) == (0, 0) and lanes.a_index(5, 3) == (9, 3) and lanes.a_index(31, 7) == (15, 15)
    assert lanes.a_index(6, 4) == (1, 12)
    assert lanes.b_index(0, 0) == (0, 0) and lanes.b_index(5, 2) == (10, 1) and lanes.b_index(31, 3) == (15, 7)
    assert lanes.c_index(0, 0) == (0, 0) and lanes.c_index(7, 3) == (9, 7) and lanes.c_index(31, 2) == (15, 6)
    assert lanes.a_index(7, 2, "m16n8k8") == (9, 6) and lanes.b_index(7, 1, "m16n8k8") == (7, 1)
    assert lanes.ldmatrix_index(9, 1) == (0, 2, 3) and lanes.ldmatrix_index(9, 7, trans=True) == (3, 3, 2)


@pytest.mark.parametrize("shape,dtype", [("m16n8k16", "float16"), ("m16n8k16", "bfloat16"), ("m16n8k8", "float16")])
def test_mma_model_is_a_matrix_product(rng, shape, dtype):
    K = 16 if shape == "m16n8k16" else 8
    A = lanes.from_bits(lanes.to_bits(rng.standard_normal((16, K)), dtype), dtype)
    B = lanes.from_bits(lanes.to_bits(rng.standard_normal((K, 8)), dtype), dtype)
    C = rng.standard_normal((16, 8)).astype(np.float32)
    D = lanes.mma_model(lanes.fragments(A, "a", shape, dtype), lanes.fragments(B, "b", shape, dtype), lanes.c_fragments(C),
                      shape, dtype)
    np.testing.assert_allclose(lanes.gather_c(D), A.astype(np.float64) @ B + C, rtol=1e-6, atol=1e-5)


def test_k16_step_is_two_k8_steps(rng):
    """The sm_75 path: (a0, a1, b0) then (a2, a3, b1) of the m16n8k16 fragments give the same D."""
    A = lanes.from_bits(lanes.to_bits(rng.standard_normal((16, 16))))
    B = lanes.from_bits(lanes.to_bits(rng.standard_normal((16, 8))))
    a, b = lanes.fragments(A, "a"), lanes.fragments(B, "b")
    d = lanes.mma_model(a[:, 0:2], b[:, 0:1], np.zeros((32, 4)), "m16n8k8")
    d = lanes.mma_model(a[:, 2:4], b[:, 1:2], d, "m16n8k8")
    np.testing.assert_allclose(lanes.gather_c(d), A.astype(np.float64) @ B, rtol=1e-6, atol=1e-5)


def test_p_accumulators_are_the_a_operand():
    """C fragments of key n-tiles 2kk, 2kk+1 are, register for register in the same lane, the A fragment of the
    16-key k-step kk (what lets P stay in registers between S = Q K^T and O += P V)."""
    for lane in range(32):
        for i in range(8):
            u, c = lanes.a_from_c(i)
            row, col = lanes.c_index(lane, c)
            assert lanes.a_index(lane, i) == (row, col + 8 * u)


def test_packing_order(rng):
    x = rng.standard_normal(64).astype(np.float32)
    w = lanes.words(lanes.to_bits(x).reshape(32, 2))[:, 0]
    assert (w & 0xFFFF == lanes.to_bits(x[0::2])).all() and (w >> 16 == lanes.to_bits(x[1::2])).all()
    np.testing.assert_allclose(lanes.from_bits(lanes.to_bits(x, "bfloat16"), "bfloat16"), x, rtol=2 ** -8)


# ---------------------------------------------------------------- ldmatrix addresses of the kernel
def _tile(rng, rows, D):
    return lanes.to_bits(rng.standard_normal((rows, D)))


def test_ldmatrix_addresses_give_the_fragments(rng):
    D, Bc, NW = 32, 32, 2
    Q, K, V = _tile(rng, 16 * NW, D), _tile(rng, Bc, D), _tile(rng, Bc, D)
    for warp in range(NW):
        for kk in range(D // 16):
            got = lanes.ldmatrix_model(Q, [lanes.q_ldm(lane, warp, kk) for lane in range(32)])
            want = lanes.fragments(lanes.from_bits(Q[16 * warp:16 * warp + 16, 16 * kk:16 * kk + 16]), "a")
            np.testing.assert_array_equal(got, want)
    for kk in range(D // 16):                        # K: B[k][n] = K[key n][dim k]
        for nn in range(Bc // 16):
            got = lanes.ldmatrix_model(K, [lanes.k_ldm(lane, nn, kk) for lane in range(32)])
            for u in range(2):
                Bm = lanes.from_bits(K[16 * nn + 8 * u:16 * nn + 8 * u + 8, 16 * kk:16 * kk + 16]).T
                np.testing.assert_array_equal(got[:, 2 * u:2 * u + 2], lanes.fragments(Bm, "b"))
    for kk in range(Bc // 16):                       # V (.trans): B[k][n] = V[key k][dim n]
        for nn in range(D // 16):
            got = lanes.ldmatrix_model(V, [lanes.v_ldm(lane, kk, nn) for lane in range(32)], trans=True)
            for u in range(2):
                Bm = lanes.from_bits(V[16 * kk:16 * kk + 16, 16 * nn + 8 * u:16 * nn + 8 * u + 8])
                np.testing.assert_array_equal(got[:, 2 * u:2 * u + 2], lanes.fragments(Bm, "b"))


def test_kernel_compiles_the_lane_functions():
    """The kernel calls lanes.q_ldm, k_ldm, v_ldm themselves (inline device functions): Q's address per m-tile and
    k-step, K's and V's once per lane for fragment (0, 0); fragment (x, y) is then 16x rows and 16y elements further,
    the constant byte offset the kernel adds ((16 * ROW) * nn + 32 * kk: ROW bytes a row, 2 bytes an element)."""
    for compiled, fn in ((fa2_tc.q_ldm, lanes.q_ldm), (fa2_tc.k_ldm, lanes.k_ldm), (fa2_tc.v_ldm, lanes.v_ldm)):
        assert getattr(compiled, "py_func", getattr(compiled, "fn", None)) is fn    # (GPU target, simulator)
    src = inspect.getsource(fa2_tc.make_fa2_tc)
    assert "rq, cq = q_ldm(lane, MT * warp + mt, kk)" in src and "mma.ldmatrix_x4(sm, rq, cq >> 1)" in src
    assert "rk, ck = k_ldm(lane, 0, 0)" in src and "rv, cv = v_ldm(lane, NSTAGE * Bc // 16, 0)" in src
    for fn in (lanes.k_ldm, lanes.v_ldm):
        for lane in range(32):
            r, c = fn(lane, 0, 0)
            for x in range(4):                       # fragment (x, y) = fragment (0, 0) + 16x rows + 16y elements
                for y in range(4):
                    assert fn(lane, x, y) == (r + 16 * x, c + 16 * y)
    for MT in (1, 2):                                # Q: m-tile MT*warp + mt of the block, rows 16 apart
        for lane in range(32):
            for warp in range(3):
                for mt in range(MT):
                    assert lanes.q_ldm(lane, MT * warp + mt, 0) == (16 * (MT * warp + mt) + (lane & 15), (lane >> 4) * 8)
    # ... and the kernel adds exactly those offsets (ROW bytes per row, 2 bytes per element)
    assert "mma.ldmatrix_x4_at(kst + (16 * ROW) * nn + 32 * kk)" in src       # k_ldm(lane, nn, kk)
    assert "mma.ldmatrix_x4_trans_at(vst + (16 * ROW) * kk + 32 * nn)" in src  # v_ldm(lane, kk, nn)


# ---------------------------------------------------------------- one warp of fa2_tc, in NumPy
def warp_model_forward(Q, K, V, causal, scale, Bc, NW, dtype="float16", k8=False, MR=1):
    """Every warp of every block of fa2_tc, fragment by fragment: 16-bit tiles in 'shared memory', registers per
    lane, ldmatrix / mma / shfl_xor modelled by lanes.py; each warp holds MR m-tiles of 16 rows (modelled one after
    the other: they share the warp's K/V fragments, not their arithmetic). Q: (Nq, D), K, V: (Nk, D) values
    representable in dtype. Returns (O rounded to dtype, lse)."""
    Nq, D = Q.shape
    Nk = K.shape[0]
    Br, KD, NB, KB, ND = 16 * NW * MR, D // 16, Bc // 8, Bc // 16, D // 8
    sl = scale * LOG2E
    shape = "m16n8k8" if k8 else "m16n8k16"
    lane_ids = np.arange(32)
    g, t = lane_ids >> 2, lane_ids & 3
    O = np.full((Nq, D), np.nan)
    lse = np.full(Nq, np.nan)

    def mma16(a, b0b1, c):
        if not k8:
            return lanes.mma_model(a, b0b1, c, shape, dtype)
        c = lanes.mma_model(a[:, 0:2], b0b1[:, 0:1], c, shape, dtype)
        return lanes.mma_model(a[:, 2:4], b0b1[:, 1:2], c, shape, dtype)

    def smem(X, r0, rows):
        s = np.zeros((rows, D), np.uint16)
        n = max(0, min(rows, X.shape[0] - r0))
        s[:n] = lanes.to_bits(X[r0:r0 + n], dtype)
        return s

    for i in range(-(-Nq // Br)):
        q0 = i * Br
        Qs = smem(Q, q0, Br)
        kv_end = min(Nk, q0 + Br) if causal else Nk
        for warp, mr in ((w, r) for w in range(NW) for r in range(MR)):
            qw = q0 + 16 * (MR * warp + mr)          # this m-tile's first row
            last = q0 + 16 * MR * warp + 16 * MR - 1     # the warp's last row: it skips tiles right of it
            qf = [lanes.ldmatrix_model(Qs, [lanes.q_ldm(ln, MR * warp + mr, kk) for ln in lane_ids]) for kk in range(KD)]
            m, l = np.full((32, 2), -np.inf), np.zeros((32, 2))
            acc = np.zeros((ND, 32, 4))
            for j in range(-(-kv_end // Bc)):
                kv0 = j * Bc
                if causal and kv0 > last:
                    continue
                Ks, Vs = smem(K, kv0, Bc), smem(V, kv0, Bc)
                s = np.zeros((NB, 32, 4))
                for kk in range(KD):
                    for nn in range(NB // 2):
                        b = lanes.ldmatrix_model(Ks, [lanes.k_ldm(ln, nn, kk) for ln in lane_ids])
                        for u in range(2):
                            s[2 * nn + u] = mma16(qf[kk], b[:, 2 * u:2 * u + 2], s[2 * nn + u])
                for n in range(NB):
                    for e in range(4):
                        col, row = kv0 + 8 * n + 2 * t + (e & 1), qw + g + 8 * (e >> 1)
                        s[n, :, e] = np.where((col >= Nk) | (causal & (col > row)), -np.inf, s[n, :, e])
                mx = np.stack([s[:, :, 2 * h:2 * h + 2].max(axis=(0, 2)) for h in range(2)], axis=1)
                mx = np.maximum(mx, mx[lane_ids ^ 1])   # cuda.shfl_xor_sync(mask, x, 1), then 2
                mx = np.maximum(mx, mx[lane_ids ^ 2])
                m_new = np.maximum(m, mx * sl)
                base = np.where(m_new == -np.inf, 0.0, m_new)
                alpha = np.exp2(m - base)
                m, l = m_new, l * alpha
                acc *= np.repeat(alpha, 2, axis=1)[None]
                p = np.exp2(s * sl - np.repeat(base, 2, axis=1)[None])
                l += p[:, :, 0:2].sum(axis=(0, 2))[:, None] * [1, 0] + p[:, :, 2:4].sum(axis=(0, 2))[:, None] * [0, 1]
                for kk in range(KB):                 # A fragment of P from the C registers (lanes.a_from_c)
                    elems = np.stack([p[2 * kk + lanes.a_from_c(e)[0], :, lanes.a_from_c(e)[1]] for e in range(8)], 1)
                    a = lanes.words(lanes.to_bits(elems, dtype))
                    for nn in range(ND // 2):
                        b = lanes.ldmatrix_model(Vs, [lanes.v_ldm(ln, kk, nn) for ln in lane_ids], trans=True)
                        for u in range(2):
                            acc[2 * nn + u] = mma16(a, b[:, 2 * u:2 * u + 2], acc[2 * nn + u])
            l = l + l[lane_ids ^ 1]
            l = l + l[lane_ids ^ 2]
            for lane in range(32):
                for h in range(2):
                    row = qw + lane // 4 + 8 * h
                    if row >= Nq:
                        continue
                    lse[row] = m[lane, h] * math.log(2.0) + math.log(l[lane, h])
                    for n in range(ND):
                        for e in (2 * h, 2 * h + 1):
                            r, c = lanes.c_index(lane, e)
                            O[row, 8 * n + c] = lanes.from_bits(lanes.to_bits(acc[n, lane, e] / l[lane, h], dtype), dtype)
    return O, lse


def naive_low_precision(Q, K, V, causal, scale, dtype):
    """softmax(Q K^T * scale) V with every intermediate rounded to dtype (the yardstick of the FlashAttention rule)."""
    rnd = lambda x: lanes.from_bits(lanes.to_bits(x, dtype), dtype).astype(np.float64)
    S = rnd(rnd(Q.astype(np.float64) @ K.T) * scale)
    if causal:
        S = np.where(np.tril(np.ones(S.shape, bool)), S, -np.inf)
    P = rnd(np.exp(S - S.max(1, keepdims=True)) / np.exp(S - S.max(1, keepdims=True)).sum(1, keepdims=True))
    return rnd(P @ V)


@pytest.mark.parametrize("dtype,k8,D,Bc,NW,MR", [("float16", False, 32, 32, 2, 1), ("bfloat16", False, 32, 16, 1, 1),
                                                 ("float16", True, 16, 32, 2, 1), ("float16", False, 16, 16, 1, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_warp_model_matches_reference(rng, dtype, k8, D, Bc, NW, MR, causal):
    Nq, Nk = (37, 45) if not causal else (45, 37)    # ragged tiles in both; causal with Nq > Nk
    Q, K, V = (lanes.from_bits(lanes.to_bits(rng.standard_normal((n, D)), dtype), dtype) for n in (Nq, Nk, Nk))
    scale = 1 / math.sqrt(D)
    O, lse = warp_model_forward(Q, K, V, causal, scale, Bc, NW, dtype, k8, MR)
    O_ref, lse_ref = reference.attention_forward(Q[None, None], K[None, None], V[None, None], causal, scale)
    O_ref, lse_ref = O_ref[0, 0], lse_ref[0, 0]
    bound = 2 * np.abs(naive_low_precision(Q, K, V, causal, scale, dtype) - O_ref).max() + 1e-4
    assert np.isfinite(O).all() and np.isfinite(lse).all()
    assert np.abs(O - O_ref).max() <= bound, (np.abs(O - O_ref).max(), bound)
    np.testing.assert_allclose(lse, lse_ref, rtol=0, atol=1e-3)


# ---------------------------------------------------------------- arguments
def test_rejects_what_it_cannot_do(rng):
    q16 = [a.astype(np.float16) for a in qkv(rng, 1, 1, 8, 8, 64)]
    with pytest.raises(ValueError, match="float32"):
        nk.forward(*q16, causal=False, scale=None, dtype="float16", variant="fa2_fast")
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        nk.forward(*qkv(rng, 1, 1, 8, 8, 64), causal=False, scale=None, dtype="float32", variant="tc")
    with pytest.raises(ValueError, match="head_dim"):
        nk.forward(*[a.astype(np.float16) for a in qkv(rng, 1, 1, 8, 8, 257)], causal=False, scale=None,
                   dtype="float16", variant="tc")
    assert fa2_tc.head_bucket(48) == 64 and fa2_tc.head_bucket(200) == 256
    with pytest.raises(ValueError, match="expects int16 or uint16"):
        nk.forward(*q16, causal=False, scale=None, dtype="bfloat16", variant="tc")
    with pytest.raises(ValueError, match="float16 only"):
        fa2_tc.check(64, "bfloat16", k8=True)
    with pytest.raises(ValueError, match="8.0"):
        fa2_tc.check(64, "bfloat16", cc=(7, 5))
    with pytest.raises(ValueError, match="7.5"):
        fa2_tc.check(64, "float16", cc=(7, 0))
    with pytest.raises(ValueError, match="48 KB"):
        fa2_tc.config(128, (9, 0), "float16", tiles=(4, 64, 2))
    with pytest.raises(ValueError, match="cp.async"):
        fa2_tc.config(64, (7, 5), "float16", tiles=(4, 64, 2))
    assert fa2_tc.config(64, (7, 5), "float16") == (*fa2_tc.TILES_SM75[64], True)
    assert fa2_tc.config(256, (7, 5), "float16") == (*fa2_tc.TILES_SM75[256], True)   # two warps, a small spill
    assert fa2_tc.config(256, (9, 0), "float16") == (*fa2_tc.TILES[256], False)
    assert fa2_tc.config(128, (9, 0), "bfloat16") == (*fa2_tc.TILES[128], False)
    if not HAS_GPU:
        with pytest.raises(RuntimeError, match="simulator"):
            nk.forward(*q16, causal=False, scale=None, dtype="float16")


@pytest.mark.skipif(HAS_GPU, reason="the simulator's arrays: on a GPU, test_gpu_strided_inputs_and_scale... covers it")
def test_host_path_with_strided_arrays_in_the_simulator():
    """fa2_tc.run (everything fa2_forward_tc does around the launch) with a Python stand-in for the kernel that
    copies Q's words into O's and writes row numbers into lse: strided q, o and lse must come out right, the kernel
    must see contiguous (B*H*N, d/2) word views and (B*H, Nq) rows."""
    from numba import cuda
    B, H, Nq, Nk, d = 1, 2, 5, 3, 32
    rng = np.random.default_rng(0)
    q_host = rng.standard_normal((B, H, Nq, d)).astype(np.float16)
    q = cuda.to_device(np.ascontiguousarray(q_host.transpose(0, 2, 1, 3))).transpose((0, 2, 1, 3))   # strided view
    k, v = (cuda.to_device(rng.standard_normal((B, H, Nk, d)).astype(np.float16)) for _ in range(2))
    o = cuda.to_device(np.zeros((B, Nq, H, d), np.float16)).transpose((0, 2, 1, 3))
    lse = cuda.to_device(np.zeros((B, H, 2 * Nq), np.float32))[:, :, ::2]
    assert not (q.is_c_contiguous() or o.is_c_contiguous() or lse.is_c_contiguous())
    seen = []

    def launch(qw, kw, vw, ow, lse_rows, Nq_, Nk_, causal, sl, G):
        seen.append((qw.shape, kw.shape, vw.shape, ow.shape, lse_rows.shape, int(Nq_), int(Nk_), causal, float(sl),
                     int(G)))
        assert qw.dtype == np.uint32 and qw.is_c_contiguous() and lse_rows.is_c_contiguous()
        ow.copy_to_device(qw)
        lse_rows.copy_to_device(np.arange(B * H * Nq, dtype=np.float32).reshape(B * H, Nq))

    o2, lse2 = fa2_tc.run(launch, q, k, v, o, lse, True, 0.5)
    assert o2 is o and lse2 is lse
    assert seen == [((B * H * Nq, d // 2), (B * H * Nk, d // 2), (B * H * Nk, d // 2), (B * H * Nq, d // 2),
                     (B * H, Nq), Nq, Nk, True, pytest.approx(0.5 * LOG2E), 1)]
    np.testing.assert_array_equal(o.copy_to_host(), q_host)
    np.testing.assert_array_equal(lse.copy_to_host(), np.arange(B * H * Nq, dtype=np.float32).reshape(B, H, Nq))
    o3, lse3 = fa2_tc.run(launch, q, k, v, None, None, False, 0.5)    # outputs allocated: contiguous
    assert o3.is_c_contiguous() and o3.shape == q.shape and o3.dtype == np.float16 and lse3.shape == (B, H, Nq)
    np.testing.assert_array_equal(o3.copy_to_host(), q_host)
    with pytest.raises(ValueError, match="lse must be"):
        fa2_tc.run(launch, q, k, v, None, cuda.to_device(np.zeros((B, H, Nq + 1), np.float32)), False, 0.5)


def test_tiles_and_the_kernel_lookup_are_cached():
    assert fa2_tc.tiles_of((4, 64, 2)) == (4, 64, 2, 1, 0) and fa2_tc.tiles_of([2, 32, 2, 2]) == (2, 32, 2, 2, 0)
    with pytest.raises(ValueError):
        fa2_tc.tiles_of((4, 64))
    assert fa2_tc.config(64, (9, 0), "float16", tiles=(4, 32, 2, 2, 0)) == (4, 32, 2, 2, 0, False)
    with pytest.raises(ValueError, match="48 KB"):                  # Br = 16*NW*MR rows must fit the stages
        fa2_tc.config(64, (9, 0), "float16", tiles=(8, 32, 1, 2))
    assert fa2_tc.factory_args(64, (4, 64, 2), "float16", False) == (64, 4, 64, 2, "float16", False, 1, 0)
    assert fa2_tc.jit_options(4, 0) == {} and fa2_tc.jit_options(4, 3) == {"launch_bounds": (128, 3)}


# ---------------------------------------------------------------- PTX and ptxas, without a GPU
PTX_SCRIPT = """
import json
from numba import cuda
from flashlib.numba_kernels import fa2_tc, ptx
rows = ptx.tc_report()
kern = fa2_tc.make_fa2_tc(64, 4, 64, 2, "float16", False)[0]       # m16n8k16 has no sm_75 form: ptxas refuses
text = cuda.compile_ptx(kern.py_func, fa2_tc.SIG, cc=(7, 5))[0]
try:
    ptx.ptxas(text, (7, 5))
    k16_on_75 = "accepted"
except RuntimeError as e:
    k16_on_75 = str(e)
print(json.dumps({"rows": rows, "k16_on_75": k16_on_75}))
"""


def ptx_jobs():
    return ptx_script(PTX_SCRIPT, 90, "test_numba_tc")   # a rough number of seconds


BACKGROUND = {"test_ptx_has_mma_and_no_local_memory": ptx_jobs}   # compiled beside the other tests


@pytest.fixture(scope="module")
def ptx_rows():
    return ptx_script_rows(ptx_jobs())


def test_ptx_has_mma_and_no_local_memory(ptx_rows):
    rows = ptx_rows["rows"]
    assert {(r["kernel"].split(" D=")[0], r["cc"]) for r in rows} == {
        ("fa2_tc float16", "8.0"), ("fa2_tc float16", "9.0"), ("fa2_tc bfloat16", "8.0"), ("fa2_tc bfloat16", "9.0"),
        ("fa2_tc_k8 float16", "7.5"), ("fa2_tc_k8 float16", "8.0")}
    assert {int(r["kernel"].split("D=")[1]) for r in rows} == set(fa2_tc.HEAD_DIMS)
    for r in rows:
        where = f"{r['kernel']} sm_{r['cc']}: {r}"
        D = int(r["kernel"].split("D=")[1])
        NW, Bc, NSTAGE = r["tiles"]
        MR = r["mt"]
        k8 = "k8" in r["kernel"]
        per_tile = MR * ((D // 16) * (Bc // 8) + (Bc // 16) * (D // 8))   # Q K^T and P V mma per 16-deep step
        # every loop over fragments fully unrolled: one mma per (k-step, n-tile), two on the k8 path
        assert (r["mma_k8"], r["mma_k16"]) == ((2 * per_tile, 0) if k8 else (0, per_tile)), where
        assert r["bf16"] == (per_tile if "bfloat16" in r["kernel"] else 0), where
        # Q once per m-tile; one K (V) fragment feeds the warp's MR m-tiles
        assert r["ldmatrix"] == MR * (D // 16) + (D // 16) * (Bc // 16) + (Bc // 16) * (D // 16), where
        assert r["ldmatrix_trans"] == (Bc // 16) * (D // 16), where
        assert (r["cp_async"] > 0) == (NSTAGE == 2), where
        assert r["shfl"] >= 8, where                 # row max and row sum over the 4 lanes of a row, 2 rows
        spill = fa2_tc.SM75_SPILL_BYTES.get(D, 0) if k8 else 0     # d = 256 on the k8 path: a known, small spill
        assert r["spill_stores"] <= spill and r["spill_loads"] <= spill and r["stack"] <= 32 * (spill > 0), where
        assert r["smem"] == fa2_tc.smem_bytes(D, Bc, NSTAGE) <= 48 * 1024 and r["smem_align16"], where
        assert r["registers"] * r["threads"] <= 65536 and r["registers"] <= 255, where
        if r["minb"]:                                # launch bounds honoured: MINB blocks fit the register file
            assert r["registers"] * r["threads"] * r["minb"] <= 65536, where
    assert "ptxas failed for sm_75" in ptx_rows["k16_on_75"], ptx_rows["k16_on_75"]


# ---------------------------------------------------------------- real GPU: the intrinsics alone
def _intrinsic_kernels():
    from numba import cuda, float32, uint32

    @cuda.jit
    def mma_k16(a, b, c, d, bf16):                  # a (32, 4), b (32, 2) uint32 registers; c, d (32, 4) float32
        ln = cuda.threadIdx.x
        if bf16:
            x = mma.mma_m16n8k16_bf16(a[ln, 0], a[ln, 1], a[ln, 2], a[ln, 3], b[ln, 0], b[ln, 1],
                                      c[ln, 0], c[ln, 1], c[ln, 2], c[ln, 3])
        else:
            x = mma.mma_m16n8k16_f16(a[ln, 0], a[ln, 1], a[ln, 2], a[ln, 3], b[ln, 0], b[ln, 1],
                                     c[ln, 0], c[ln, 1], c[ln, 2], c[ln, 3])
        for i in range(4):
            d[ln, i] = x[i]

    @cuda.jit
    def mma_k8(a, b, c, d):
        ln = cuda.threadIdx.x
        x = mma.mma_m16n8k8_f16(a[ln, 0], a[ln, 1], b[ln, 0], c[ln, 0], c[ln, 1], c[ln, 2], c[ln, 3])
        for i in range(4):
            d[ln, i] = x[i]

    @cuda.jit
    def ldm(src, rows, cols, out, out_t, packed):   # src (16, 8) uint32 = a 16x16 16-bit tile
        sm = cuda.shared.array((16, 12), uint32, alignment=16)   # padded rows, as in the kernel
        ln = cuda.threadIdx.x
        if ln < 16:
            mma.store16(sm, ln, 0, mma.load16(src, ln, 0))
            mma.store16(sm, ln, 4, mma.load16(src, ln, 4))
        cuda.syncthreads()
        x = mma.ldmatrix_x4(sm, rows[ln], cols[ln])
        y = mma.ldmatrix_x4_trans(sm, rows[ln], cols[ln])
        for i in range(4):
            out[ln, i] = x[i]
            out_t[ln, i] = y[i]
        # -float32(ln), not float32(-ln): the latter negates the integer, so lane 0 would pack +0.0, while the
        # test expects the bits of -0.0 (that was the H100 failure: the conversions keep the sign of zero)
        packed[ln, 0] = mma.pack_f16x2(float32(ln) + float32(0.25), -float32(ln))
        packed[ln, 1] = mma.pack_bf16x2(float32(ln) + float32(0.25), -float32(ln))
    return mma_k16, mma_k8, ldm


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype", [("m16n8k16", "float16"), ("m16n8k16", "bfloat16"), ("m16n8k8", "float16")])
def test_gpu_intrinsic_mma(rng, shape, dtype):
    from numba import cuda
    mma_k16, mma_k8, _ = _intrinsic_kernels()
    K = 16 if shape == "m16n8k16" else 8
    for _ in range(5):
        A = lanes.from_bits(lanes.to_bits(rng.standard_normal((16, K)), dtype), dtype)
        B = lanes.from_bits(lanes.to_bits(rng.standard_normal((K, 8)), dtype), dtype)
        C = rng.standard_normal((16, 8)).astype(np.float32)
        a, b, c = lanes.fragments(A, "a", shape, dtype), lanes.fragments(B, "b", shape, dtype), lanes.c_fragments(C)
        d = cuda.to_device(np.full((32, 4), np.nan, np.float32))
        if K == 16:
            mma_k16[1, 32](a, b, c, d, dtype == "bfloat16")
        else:
            mma_k8[1, 32](a, b, c, d)
        np.testing.assert_allclose(lanes.gather_c(d.copy_to_host()), A.astype(np.float64) @ B + C, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_intrinsic_ldmatrix_and_pack(rng):
    from numba import cuda
    _, _, ldm = _intrinsic_kernels()
    T = lanes.to_bits(rng.standard_normal((16, 16)))
    addrs = [lanes.q_ldm(lane, 0, 0) for lane in range(32)]        # four 8x8 quadrants
    rows = np.array([r for r, _ in addrs], np.int32)
    cols = np.array([c // 2 for _, c in addrs], np.int32)
    out, out_t = (cuda.to_device(np.zeros((32, 4), np.uint32)) for _ in range(2))
    packed = cuda.to_device(np.zeros((32, 2), np.uint32))
    ldm[1, 32](np.ascontiguousarray(T).view(np.uint32), rows, cols, out, out_t, packed)
    np.testing.assert_array_equal(out.copy_to_host(), lanes.ldmatrix_model(T, addrs))
    np.testing.assert_array_equal(out_t.copy_to_host(), lanes.ldmatrix_model(T, addrs, trans=True))
    p = packed.copy_to_host()
    x = np.arange(32, dtype=np.float32)
    for col, dt in ((0, "float16"), (1, "bfloat16")):
        np.testing.assert_array_equal(p[:, col] & 0xFFFF, lanes.to_bits(x + 0.25, dt), err_msg=dt)
        np.testing.assert_array_equal(p[:, col] >> 16, lanes.to_bits(-x, dt), err_msg=dt)   # lane 0: -0.0, 0x8000
    assert p[0, 0] >> 16 == 0x8000 and p[0, 1] >> 16 == 0x8000


# ---------------------------------------------------------------- real GPU: the attention kernel
GPU_SHAPES = [(1, 1, 1, 1, 64), (2, 3, 77, 131, 64), (1, 2, 1000, 999, 64), (1, 1, 513, 2049, 128),
              (1, 2, 2048, 1500, 128), (1, 1, 4096, 4096, 128), (1, 1, 4096, 4096, 64), (2, 1, 300, 300, 32),
              (1, 1, 129, 65, 96), (1, 1, 64, 64, 128), (3, 2, 17, 333, 128)]
ATOL = {"float16": 1e-4, "bfloat16": 5e-4}


def _torch_inputs(shape, dtype, seed):
    import torch
    B, H, Nq, Nk, d = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda n: torch.randn(B, H, n, d, device="cuda", generator=gen).to(getattr(torch, dtype))
    return mk(Nq), mk(Nk), mk(Nk)


def _naive_torch(q, k, v, causal, scale):
    import torch
    S = (q @ k.transpose(-1, -2)) * scale
    if causal:
        S = S.masked_fill(~torch.ones(S.shape[-2:], dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.softmax(S, dim=-1) @ v


def _f64(t):
    import torch
    return t.detach().to(torch.float64).cpu().numpy()


def _run_tc(q, k, v, causal, scale, dtype, **kw):
    """fa2_forward_tc on Numba views of torch tensors (bf16 as int16 bits), outputs NaN-poisoned; torch results."""
    import torch
    from numba import cuda
    bits = (lambda t: t.view(torch.int16)) if dtype == "bfloat16" else (lambda t: t)
    o = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device="cuda", dtype=torch.float32)
    nq, nk_, nv, no = (cuda.as_cuda_array(bits(t)) for t in (q, k, v, o))
    fa2_tc.fa2_forward_tc(nq, nk_, nv, causal=causal, scale=scale, dtype=dtype, o=no, lse=cuda.as_cuda_array(lse), **kw)
    cuda.synchronize()
    return o, lse


def _check_against_reference(q, k, v, o, lse, causal, scale, dtype):
    o_ref, lse_ref = reference.attention_forward(_f64(q), _f64(k), _f64(v), causal, scale)
    bound = 2 * np.abs(_f64(_naive_torch(q, k, v, causal, scale)) - o_ref).max() + ATOL[dtype]
    err = np.abs(_f64(o) - o_ref).max()
    assert np.isfinite(_f64(o)).all() and np.isfinite(_f64(lse)).all()
    assert err <= bound, (err, bound)
    assert np.abs(_f64(lse) - lse_ref).max() <= 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_forward_matches_reference(shape, dtype, causal):
    q, k, v = _torch_inputs(shape, dtype, seed=zlib.crc32(repr((shape, dtype, causal)).encode()))
    scale = 1 / math.sqrt(shape[4])
    o, lse = _run_tc(q, k, v, causal, scale, dtype)
    _check_against_reference(q, k, v, o, lse, causal, scale, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("variant", ["k8", "tiles_a", "tiles_b", "mr2", "minb"])
def test_gpu_forward_other_paths(d, causal, variant):
    """The sm_75 path (m16n8k8, forced on a newer GPU) and the tile configurations the benchmark sweeps: one
    stage, two warps, two m-tiles per warp, launch bounds."""
    shape = (2, 2, 333, 517, d)
    q, k, v = _torch_inputs(shape, "float16", seed=7)
    kw = {"k8": dict(k8=True), "tiles_a": dict(tiles=(4, 64, 1)), "tiles_b": dict(tiles=(2, 32, 2)),
          "mr2": dict(tiles=(4, 32, 2, 2)), "minb": dict(tiles=(4, 32, 2, 1, 3))}[variant]
    o, lse = _run_tc(q, k, v, causal, 0.125, "float16", **kw)
    _check_against_reference(q, k, v, o, lse, causal, 0.125, "float16")


@pytest.mark.gpu
@pytest.mark.parametrize("d", [256, 200, 131])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_t4_path_takes_head_dims_up_to_256(d, causal):
    """The sm_75 path (m16n8k8, forced here) at the d = 256 bucket: 256 itself and head dims padded up to it, ragged
    lengths, Nq != Nk."""
    q, k, v = _torch_inputs((1, 2, 97, 301, d), "float16", seed=8)
    o, lse = _run_tc(q, k, v, causal, d ** -0.5, "float16", k8=True)
    _check_against_reference(q, k, v, o, lse, causal, d ** -0.5, "float16")


@pytest.mark.gpu
def test_gpu_strided_inputs_and_scale_and_large_scores():
    import torch
    q, k, v = _torch_inputs((2, 3, 200, 300, 64), "float16", seed=3)
    q = (q * 4).transpose(1, 2).contiguous().transpose(1, 2)   # strided view, scores of order 100
    assert not q.is_contiguous()
    o, lse = _run_tc(q, k, v, True, 0.7, "float16")   # o = full_like(q): strided too
    assert not o.is_contiguous()
    _check_against_reference(q, k, v, o, lse, True, 0.7, "float16")
    assert o.dtype == torch.float16
    from numba import cuda                           # a strided lse (every other element of a larger array)
    lse2 = torch.full((2, 3, 400), float("nan"), device="cuda")[:, :, ::2]
    o2, _ = fa2_tc.fa2_forward_tc(*(cuda.as_cuda_array(t) for t in (q, k, v)), causal=True, scale=0.7,
                                  lse=cuda.as_cuda_array(lse2))
    cuda.synchronize()
    torch.testing.assert_close(lse2, lse, rtol=0, atol=0)
    torch.testing.assert_close(torch.as_tensor(o2, device="cuda"), o, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_backend_contract_float16():
    """flashlib.attention(..., backend='numba') with fp16 torch tensors runs the tc variant."""
    import flashlib
    import torch
    q, k, v = _torch_inputs((1, 2, 100, 120, 64), "float16", seed=5)
    o, lse = flashlib.attention(q, k, v, causal=True, backend="numba", return_lse=True)
    assert isinstance(o, torch.Tensor) and o.dtype == torch.float16 and o.is_cuda
    _check_against_reference(q, k, v, o, lse, True, 1 / 8, "float16")


@pytest.mark.gpu
def test_gpu_backend_contract_bfloat16():
    import flashlib
    import torch
    q, k, v = _torch_inputs((1, 2, 100, 120, 64), "bfloat16", seed=6)
    o, lse = flashlib.attention(q, k, v, causal=False, backend="numba", return_lse=True)
    assert isinstance(o, torch.Tensor) and o.dtype == torch.bfloat16
    _check_against_reference(q, k, v, o, lse, False, 1 / 8, "bfloat16")
