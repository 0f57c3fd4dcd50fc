"""flashlib.numba_kernels.fa2_tf32: float32 attention on TF32 Tensor Cores with the 3xTF32 split.

Without a GPU (Numba's simulator cannot run PTX):
  * the split in NumPy (lanes.split_model, bit for bit the kernel's PTX): 3xTF32 products are float32-accurate (~1e-6),
    1xTF32 products are not (~1e-3);
  * the fragment layouts (PTX ISA tables) and every index map the kernel writes inline (Q, K, V loads, P's C
    registers as the A operand, the output columns) against them, lane by lane;
  * the kernel's algorithm in NumPy (tiles, base-2 online softmax, causal skips, 3xTF32 products) against the
    float64 reference;
  * `cuda.compile_ptx` + `ptxas -v`: the tf32 mma are there, fully unrolled, 16-byte shared loads, no local
    memory, no spills; argument checks; which variant `forward` picks.
`gpu` tests: the intrinsics alone, then the kernel against the float64 reference on random shapes.
Tolerances on the GPU (inputs N(0, 1), |O| < ~4): max |O - O_ref| <= 2e-5 and max |lse - lse_ref| <= 2e-5, with
O and lse NaN-poisoned before the launch. (float32 naive attention is ~1e-6 off; one TF32 product ~1e-3.)
"""
import math
import os

import numpy as np
import pytest

from flashlib import reference
from flashlib.constants import LOG2E
from tests.conftest import HAS_GPU, ptx_script, ptx_script_rows, qkv

from flashlib import numba_kernels as nk  # noqa: E402  (after conftest chose the simulator or the GPU)
from flashlib.numba_kernels import fa2_tf32 as tf, lanes, mma  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 2e-5


# ---------------------------------------------------------------- the split
def test_split_is_exact_tf32(rng):
    x = (rng.standard_normal(100_000) * np.exp(rng.uniform(-20, 20, 100_000))).astype(np.float32)
    big, small = lanes.split_model(x)
    for part in (big, small):
        assert (part.view(np.uint32) & np.uint32(0x1FFF) == 0).all()        # TF32: low 13 mantissa bits zero
    assert (np.abs(big) <= np.abs(x)).all()                                 # big is x truncated
    rel = np.abs((big.astype(np.float64) + small) - x) / np.abs(x)
    assert rel.max() <= 2.0 ** -21                                          # big + small = x to ~21 bits
    np.testing.assert_array_equal(lanes.tf32_round(np.float32([1 + 2 ** -11, 1 + 2 ** -12, -1 - 2 ** -11])),
                                  np.float32([1 + 2 ** -10, 1, -1 - 2 ** -10]))   # nearest, ties away from zero


@pytest.mark.parametrize("K", [8, 64, 128])
def test_3xtf32_products_are_float32_accurate(rng, K):
    A = rng.standard_normal((64, K)).astype(np.float32)
    B = rng.standard_normal((K, 64)).astype(np.float32)
    exact = A.astype(np.float64) @ B
    scale = np.abs(A).astype(np.float64) @ np.abs(B)                      # the size of each dot product's terms
    err3 = (np.abs(lanes.matmul_model(A, B, 3) - exact) / scale).max()
    err1 = (np.abs(lanes.matmul_model(A, B, 1) - exact) / scale).max()
    err32 = (np.abs((A @ B).astype(np.float64) - exact) / scale).max()     # plain float32 (NumPy's BLAS)
    assert err3 < 2e-6 and err1 > 1e-4, (err3, err1)
    assert err3 < 20 * max(err32, 2 ** -24), (err3, err32)


# ---------------------------------------------------------------- fragment layouts and the kernel's index maps
def test_layouts_cover_each_element_once_and_match_the_ptx_isa():
    assert sorted(lanes.tf32_a_index(ln, i) for ln in range(32) for i in range(4)) == [(r, c) for r in range(16) for c in range(8)]
    assert sorted(lanes.tf32_b_index(ln, i) for ln in range(32) for i in range(2)) == [(r, c) for r in range(8) for c in range(8)]
    # PTX ISA "mma.m16n8k8 fragment layout for matrix A with .tf32": a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4)
    assert [lanes.tf32_a_index(5, i) for i in range(4)] == [(1, 1), (9, 1), (1, 5), (9, 5)]
    assert [lanes.tf32_b_index(30, i) for i in range(2)] == [(2, 7), (6, 7)]      # b0 (k = t, n = g), b1 (k = t + 4)
    assert [lanes.c_index(30, i) for i in range(4)] == [(7, 4), (7, 5), (15, 4), (15, 5)]


@pytest.mark.parametrize("D", tf.TF32_HEAD_DIMS)
def test_permutations_are_permutations(D):
    for c in range(D // 16):                         # the two k-steps of a 16-dim chunk use each dim once
        assert sorted(lanes.slot_dim(c, h, s) for h in range(2) for s in range(8)) == list(range(16 * c, 16 * c + 16))
    for jj in range(4):
        assert sorted(lanes.slot_key(jj, s) for s in range(8)) == list(range(8 * jj, 8 * jj + 8))
    assert sorted(lanes.o_dim(n, col) for n in range(D // 8) for col in range(8)) == list(range(D))


def test_kernel_index_maps_against_the_layouts():
    """Each expression below is the kernel's (fa2_tf32.make_fa2_tf32), lane by lane, checked against the PTX layout
    and the permutations: what a lane loads or keeps in a register is the element the mma expects there."""
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for c in range(2):
            for h in range(2):
                for hr in range(2):                  # Q: x = Q[g + 8hr][16c + 4t ..]; x[2h+u] -> a[2u + hr]
                    for u in range(2):
                        row, slot = lanes.tf32_a_index(lane, 2 * u + hr)
                        assert (row, lanes.slot_dim(c, h, slot)) == (g + 8 * hr, 16 * c + 4 * t + 2 * h + u)
                        assert lanes.q_frag(lane, c, h)[2 * u + hr] == (row, 16 * c + 4 * t + 2 * h + u)
                for n in range(2):                   # K: x = K[8n + g][16c + 4t ..]; x[2h + u] is b_u of step 2c+h
                    key, d0 = lanes.k_frag(lane, n, c)
                    assert (key, d0) == (8 * n + g, 16 * c + 4 * t)
                    for u in range(2):
                        slot, col = lanes.tf32_b_index(lane, u)
                        assert (8 * n + col, lanes.slot_dim(c, h, slot)) == (key, d0 + 2 * h + u)
        for jj in range(2):
            for i in range(4):                       # P: a_i = C register 2(i & 1) + (i >> 1) of S's n-tile jj
                e = 2 * (i & 1) + (i >> 1)
                assert e == lanes.P_AS_A[i]
                row, slot = lanes.tf32_a_index(lane, i)
                crow, ccol = lanes.c_index(lane, e)
                assert (row, lanes.slot_key(jj, slot)) == (crow, 8 * jj + ccol)
            for mm in range(2):                      # V: x0 = V[8jj + 2t][32mm + 4g ..], x1 = V[8jj + 2t + 1][..]
                loads = lanes.v_frag(lane, jj, mm)
                assert loads == ((8 * jj + 2 * t, 32 * mm + 4 * g), (8 * jj + 2 * t + 1, 32 * mm + 4 * g))
                for u in range(4):                   # word u of load w is b_w of n-tile 4mm + u
                    for w in range(2):
                        slot, col = lanes.tf32_b_index(lane, w)
                        assert (lanes.slot_key(jj, slot), lanes.o_dim(4 * mm + u, col)) == (loads[w][0], loads[w][1] + u)
        for mm in range(2):                          # epilogue: acc[4mm + u, 2h + w] -> O[g + 8h][32mm + 8t + 4w + u]
            for u in range(4):
                for h in range(2):
                    for w in range(2):
                        row, col = lanes.c_index(lane, 2 * h + w)
                        assert (row, lanes.o_dim(4 * mm + u, col)) == (g + 8 * h, 32 * mm + 8 * t + 4 * w + u)


# ---------------------------------------------------------------- the kernel's algorithm in NumPy
def model_forward(Q, K, V, causal, scale, Br, Bc, terms=3):
    """fa2_tf32's loops with whole tiles: per warp (16 rows) S = Q K_j^T and O += P V_j as the mma compute them
    (lanes.matmul_model: 3 or 1 TF32 products, float64 sums), base-2 online softmax, causal tile skips and masks.
    Q (Nq, D), K, V (Nk, D) float32. Returns O, lse (float64)."""
    Nq, D = Q.shape
    Nk = K.shape[0]
    sl = scale * LOG2E
    O, lse = np.full((Nq, D), np.nan), np.full(Nq, np.nan)
    for q0 in range(0, Nq, Br):
        kv_end = min(Nk, q0 + Br) if causal else Nk
        for qw in range(q0, min(q0 + Br, Nq), 16):
            rows = np.arange(qw, min(qw + 16, Nq))
            m, l = np.full(len(rows), -np.inf), np.zeros(len(rows))
            acc = np.zeros((len(rows), D))
            for kv0 in range(0, kv_end, Bc):
                if causal and kv0 > qw + 15:
                    continue
                cols = np.arange(kv0, min(kv0 + Bc, Nk))
                S = lanes.matmul_model(Q[rows], np.ascontiguousarray(K[cols].T), terms).astype(np.float32)
                if causal:
                    S = np.where(cols[None, :] > rows[:, None], -np.inf, S)
                m_new = np.maximum(m, S.max(1) * np.float32(sl))
                base = np.where(m_new == -np.inf, 0.0, m_new)
                alpha = np.exp2(m - base)
                P = np.exp2(S * np.float32(sl) - base[:, None]).astype(np.float32)
                m, l = m_new, l * alpha + P.sum(1)
                acc = acc * alpha[:, None] + lanes.matmul_model(P, V[cols], terms)
            O[rows] = acc / l[:, None]
            lse[rows] = m * math.log(2.0) + np.log(l)
    return O, lse


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Nq,Nk,D,Br,Bc", [(37, 45, 32, 32, 16), (45, 37, 64, 64, 32), (70, 70, 128, 64, 32)])
def test_model_matches_reference(rng, causal, Nq, Nk, D, Br, Bc):
    Q, K, V = (rng.standard_normal((n, D)).astype(np.float32) for n in (Nq, Nk, Nk))
    scale = 1 / math.sqrt(D)
    O_ref, lse_ref = (x[0, 0] for x in reference.attention_forward(Q[None, None], K[None, None], V[None, None],
                                                                      causal, scale))
    O, lse = model_forward(Q, K, V, causal, scale, Br, Bc, terms=3)
    assert np.isfinite(O).all() and np.isfinite(lse).all()
    assert np.abs(O - O_ref).max() < 5e-6 and np.abs(lse - lse_ref).max() < 5e-6
    O1, _ = model_forward(Q, K, V, causal, scale, Br, Bc, terms=1)          # one TF32 product: not float32
    assert np.abs(O1 - O_ref).max() > 1e-4


# ---------------------------------------------------------------- PTX and ptxas, without a GPU
PTX_SCRIPT = """
import json
from flashlib.numba_kernels import ptx
extra = [("fa2_tf32 alt D=64", (9, 0), (64, 4, 64, True, 0)), ("fa2_tf32 alt D=64", (9, 0), (64, 4, 64, False, 0)),
         ("fa2_tf32 alt D=128", (9, 0), (128, 4, 32, False, 0))]
print(json.dumps(ptx.tf32_report(extra=extra)))
"""


def ptx_jobs():
    return ptx_script(PTX_SCRIPT, 40, "test_numba_tf32")   # a rough number of seconds


BACKGROUND = {"test_ptx_has_tf32_mma_and_no_local_memory": ptx_jobs}   # compiled beside the other tests


@pytest.fixture(scope="module")
def ptx_rows():
    return ptx_script_rows(ptx_jobs())


def test_ptx_has_tf32_mma_and_no_local_memory(ptx_rows):
    assert {(int(r["kernel"].split("D=")[1]), r["cc"]) for r in ptx_rows if "alt" not in r["kernel"]} == {
        (D, cc) for D in tf.TF32_HEAD_DIMS for cc in ("8.0", "9.0")}
    for r in ptx_rows:
        where = f"{r['kernel']} sm_{r['cc']}: {r}"
        D = int(r["kernel"].split("D=")[1])
        NW, Bc, QPRE, MAXREG = r["tiles"]
        NB, DC, DM = Bc // 8, D // 16, D // 32
        # fully unrolled: 3 mma per (k-step, n-tile) of S and of P V, one 16-byte load per (chunk, key n-tile) of K
        # and two per (key step, 4 n-tiles) of V; nothing else on the Tensor Cores
        assert r["mma_tf32"] == 3 * (DC * NB * 2 + NB * DM * 4) and r["mma_other"] == 0, where
        assert r["ld_shared_v4"] == DC * NB + NB * DM * 2, where
        assert r["cp_async"] > 0 and r["shfl"] >= 8 and r["smem_align16"], where
        if not MAXREG:
            assert r["stack"] == 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0, where
        else:                                        # a register cap trades a few spilled words for occupancy
            assert r["spill_stores"] <= 32 and r["spill_loads"] <= 64, where
        assert r["registers"] <= (MAXREG or 255) and r["registers"] * r["threads"] <= 65536, where
        assert r["smem"] == tf.smem_bytes(D, Bc) <= 48 * 1024, where


# ---------------------------------------------------------------- arguments and the default variant
def test_rejects_what_it_cannot_do(rng):
    q, k, v = qkv(rng, 1, 1, 8, 8, 64)
    with pytest.raises(ValueError, match="float32"):
        tf.fa2_forward_tf32(*(a.astype(np.float16) for a in (q, k, v)))
    with pytest.raises(ValueError, match="head_dim"):
        nk.forward(*qkv(rng, 1, 1, 8, 8, 48), causal=False, scale=None, variant="tf32x3")
    with pytest.raises(ValueError, match="Nk"):
        tf.fa2_forward_tf32(q, k[:, :, :, :32], v)
    with pytest.raises(ValueError, match="8.0"):
        tf.check(64, cc=(7, 5))
    with pytest.raises(ValueError, match="48 KB"):
        tf.config(128, tiles=(4, 64, False))
    assert tf.config(64) == tf.TILES[64] and tf.config(64, (4, 32, True)) == (4, 32, True, 0)
    with pytest.raises(ValueError, match="unroll|pieces"):
        tf.parts(3, 48)
    if not HAS_GPU:
        with pytest.raises(RuntimeError, match="simulator"):
            nk.forward(q, k, v, causal=False, scale=None, variant="tf32x3")


def test_default_variant():
    assert nk.default_variant("float32", 64, (9, 0)) == "tf32x3"
    assert nk.default_variant("float32", 128, (8, 0)) == "tf32x3"
    assert nk.default_variant("float32", 64, (7, 5)) == "fa2_fast"   # a T4: no TF32
    assert nk.default_variant("float32", 48, (9, 0)) == "fa2_fast"   # a head dim the kernel does not take
    assert nk.default_variant("float32", 64, None) == "fa2_fast"     # the simulator
    assert nk.default_variant("float16", 64, (9, 0)) == "tc"


# ---------------------------------------------------------------- real GPU
def _intrinsic_kernels():
    from numba import cuda

    @cuda.jit
    def one(a, b, c, d):                             # a (32, 4), b (32, 2) TF32 bits; c, d (32, 4) float32
        ln = cuda.threadIdx.x
        x = mma.mma_m16n8k8_tf32(a[ln, 0], a[ln, 1], a[ln, 2], a[ln, 3], b[ln, 0], b[ln, 1],
                                c[ln, 0], c[ln, 1], c[ln, 2], c[ln, 3])
        for i in range(4):
            d[ln, i] = x[i]

    @cuda.jit
    def three(a, b, c, d, bits):                     # a (32, 4), b (32, 2) float32
        ln = cuda.threadIdx.x
        a0, a1, a2, a3 = mma.split_tf32(a[ln, 0]), mma.split_tf32(a[ln, 1]), mma.split_tf32(a[ln, 2]), mma.split_tf32(a[ln, 3])
        x = mma.mma_3xtf32(a0[0], a1[0], a2[0], a3[0], a0[1], a1[1], a2[1], a3[1], b[ln, 0], b[ln, 1],
                          c[ln, 0], c[ln, 1], c[ln, 2], c[ln, 3])     # B: raw float32, split inside
        for i in range(4):
            d[ln, i] = x[i]
            y = mma.split_tf32(a[ln, i])
            bits[ln, 2 * i] = y[0]
            bits[ln, 2 * i + 1] = y[1]
            bits[ln, 8 + i] = mma.cvt_rna_tf32(a[ln, i])
    return one, three


def _frags(M, operand):
    index = lanes.tf32_a_index if operand == "a" else lanes.tf32_b_index
    return np.array([[M[index(ln, i)] for i in range(4 if operand == "a" else 2)] for ln in range(32)], M.dtype)


def _gather(regs):
    C = np.full((16, 8), np.nan, np.float32)
    for ln in range(32):
        for i in range(4):
            C[lanes.c_index(ln, i)] = regs[ln][i]
    return C


@pytest.mark.gpu
def test_gpu_intrinsics(rng):
    from numba import cuda
    one, three = _intrinsic_kernels()
    for _ in range(3):
        A = lanes.tf32_round(rng.standard_normal((16, 8)).astype(np.float32))
        B = lanes.tf32_round(rng.standard_normal((8, 8)).astype(np.float32))
        C = rng.standard_normal((16, 8)).astype(np.float32)
        d = cuda.to_device(np.full((32, 4), np.nan, np.float32))
        one[1, 32](_frags(A, "a").view(np.uint32), _frags(B, "b").view(np.uint32), _frags_c(C), d)
        np.testing.assert_allclose(_gather(d.copy_to_host()), A.astype(np.float64) @ B + C, rtol=1e-5, atol=1e-5)
        A, B = (rng.standard_normal(s).astype(np.float32) for s in ((16, 8), (8, 8)))
        d = cuda.to_device(np.full((32, 4), np.nan, np.float32))
        bits = cuda.to_device(np.zeros((32, 12), np.uint32))
        three[1, 32](_frags(A, "a"), _frags(B, "b"), _frags_c(C), d, bits)
        exact = A.astype(np.float64) @ B + C
        assert np.abs(_gather(d.copy_to_host()) - exact).max() < 1e-5
        got = bits.copy_to_host()
        big, small = lanes.split_model(_frags(A, "a"))
        np.testing.assert_array_equal(got[:, 0:8:2], big.view(np.uint32))
        np.testing.assert_array_equal(got[:, 1:8:2], small.view(np.uint32))
        np.testing.assert_array_equal(got[:, 8:], lanes.tf32_round(_frags(A, "a")).view(np.uint32))


def _frags_c(C):
    return np.array([[C[lanes.c_index(ln, i)] for i in range(4)] for ln in range(32)], np.float32)


GPU_SHAPES = [(1, 2, 1, 1, 64), (2, 3, 37, 45, 32), (1, 2, 45, 37, 64), (1, 1, 200, 131, 96), (2, 2, 129, 257, 128),
              (1, 3, 333, 333, 64), (1, 1, 1000, 1000, 128), (1, 2, 63, 64, 32), (1, 1, 4096, 4096, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_forward_matches_reference(rng, shape, causal):
    from numba import cuda
    B, H, Nq, Nk, d = shape
    q, k, v = qkv(rng, B, H, Nq, Nk, d)
    o = cuda.to_device(np.full(q.shape, np.nan, np.float32))
    lse = cuda.to_device(np.full((B, H, Nq), np.nan, np.float32))
    tf.fa2_forward_tf32(q, k, v, causal=causal, o=o, lse=lse)
    O, L = reference.attention_forward(q, k, v, causal)
    o, lse = o.copy_to_host(), lse.copy_to_host()
    assert np.isfinite(o).all() and np.isfinite(lse).all()
    assert np.abs(o - O).max() <= TOL and np.abs(lse - L).max() <= TOL, (np.abs(o - O).max(), np.abs(lse - L).max())


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", [(4, 64, True, 0), (4, 32, False, 0), (2, 16, True, 0), (4, 64, False, 0)])
def test_gpu_forward_other_tiles(rng, tiles):
    for causal in (False, True):
        q, k, v = qkv(rng, 1, 2, 150, 170, 64)
        o, lse = tf.fa2_forward_tf32(q, k, v, causal=causal, scale=0.3, tiles=tiles)
        O, L = reference.attention_forward(q, k, v, causal, 0.3)
        assert np.abs(o.copy_to_host() - O).max() <= TOL and np.abs(lse.copy_to_host() - L).max() <= TOL


@pytest.mark.gpu
def test_gpu_forward_default_is_tf32x3(rng):
    from numba import cuda
    q, k, v = qkv(rng, 1, 2, 100, 90, 64)
    assert nk.default_variant("float32", 64, cuda.get_current_device().compute_capability) == "tf32x3"
    o, lse = nk.forward(*(cuda.to_device(a) for a in (q, k, v)), causal=True, scale=None)
    O, L = reference.attention_forward(q, k, v, True)
    assert np.abs(o.copy_to_host() - O).max() <= TOL and np.abs(lse.copy_to_host() - L).max() <= TOL
