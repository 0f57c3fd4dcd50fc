"""Rung 'fa3_fp8' without a GPU: the register permutation of P against the PTX fragment layouts, the Hadamard
rotation, quantisation, V's transpose, the tile-by-tile model of the kernel's arithmetic, the configuration, and
every instance compiled by nvcc/ptxas for sm_90a with no spills (skipped where nvcc is missing)."""
import collections
import math
import re

import numpy as np
import pytest

from flashlib import reference
from flashlib.cupy_kernels import HERE, fp8, fp8_model, fp8_tiles, tma
from tests.compile_jobs import NVCC, check_sm90a, sm90a_jobs

torch = pytest.importorskip("torch")


def test_key_permutation_matches_the_fragments():
    """Each byte the kernel packs into the k32 A fragment (pack_p_e4m3, read from fa3_fp8.cu) is the P entry of the
    row and key that A fragment position wants, given V^T's column order key_permutation: A register i, byte b of
    thread t is row g + 8 (i & 1), K position 16 (i >> 1) + 4 t + b (CUTLASS's ALayout_64x32); the S accumulator
    value x[4 n + 2 r + e] of 8-key group n of the chunk is row g + 8 r, key 8 n + 2 t + e."""
    src = (HERE / "fa3_fp8.cu").read_text()
    calls = re.findall(r"pa\[c\]\[(\d)\] = pack4_e4m3\(x\[(\d+)\], x\[(\d+)\], x\[(\d+)\], x\[(\d+)\]\)", src)
    assert len(calls) == 4
    perm = fp8.key_permutation()
    assert sorted(perm) == list(range(32))
    for t in range(4):
        for reg, *idx in calls:
            i = int(reg)
            for b, x in enumerate(map(int, idx)):
                n, r, e = x // 4, (x % 4) // 2, x % 2
                assert r == (i & 1)
                assert 8 * n + 2 * t + e == perm[16 * (i >> 1) + 4 * t + b], (t, i, b)


@pytest.mark.parametrize("d", [64, 128, 256])
def test_random_hadamard_is_orthogonal_and_keeps_qkt(d):
    h = fp8.sylvester(d)
    assert set(np.unique(h)) == {-1.0, 1.0} and np.allclose(h @ h.T, d * np.eye(d))
    m = fp8.random_hadamard(d, seed=3)
    assert np.allclose(m @ m.T, np.eye(d), atol=1e-12) and np.allclose(np.abs(m), 1 / np.sqrt(d))
    assert not np.allclose(m, fp8.random_hadamard(d, seed=4))
    g = np.random.default_rng(d)
    q, k = g.standard_normal((5, d)), g.standard_normal((7, d))
    assert np.allclose((q @ m) @ (k @ m).T, q @ k.T, atol=1e-10)
    with pytest.raises(ValueError, match="power of two"):
        fp8.sylvester(96)


def _outliers(shape, gen, frac=0.001, big=10.0):
    """Standard normal entries plus N(0, big^2) at a fraction `frac` of them (FlashAttention-3 section 4.3's kind)."""
    x = torch.randn(shape, generator=gen)
    return x + big * torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) < frac)


def test_hadamard_spreads_an_outlier():
    d = 128
    x = torch.zeros(1, 1, 1, d, dtype=torch.float64)
    x[..., 5] = 100.0
    y = fp8.rotate(x, fp8.random_hadamard(d))
    assert torch.allclose(y.abs(), torch.full_like(y, 100 / math.sqrt(d)))


def test_quantize_per_head():
    g = torch.Generator().manual_seed(0)
    x = _outliers((2, 3, 50, 64), g)
    x[1, 2] = 0.0                                             # an all-zero head: scale 1, zeros
    x8, sc = fp8.quantize_e4m3(x)
    assert x8.dtype == torch.float8_e4m3fn and sc.shape == (2, 3) and sc.dtype == torch.float32
    amax = x.abs().amax(dim=(2, 3))
    assert torch.allclose(sc[amax > 0], amax[amax > 0] / 448) and sc[1, 2] == 1
    back = x8.float() * sc[:, :, None, None]
    assert (x8.float().abs().amax(dim=(2, 3))[amax > 0] == 448).all()
    # e4m3 rounding: half an ulp, 2^-4 relative for normals (3 mantissa bits), 2^-10 absolute below 2^-6
    bound = torch.maximum(x.abs() * 2**-4, 2**-10 * sc[:, :, None, None]) * (1 + 1e-6)
    assert ((back - x).abs() <= bound).all()


@pytest.mark.parametrize("nk", [1, 31, 32, 77, 128])
def test_transpose_v_layout(nk):
    g = torch.Generator().manual_seed(nk)
    v8, _ = fp8.quantize_e4m3(torch.randn(2, 3, nk, 64, generator=g))
    vt = fp8.transpose_v(v8)
    n32 = -(-nk // 32) * 32
    assert vt.shape == (2, 3, 64, n32) and vt.dtype == torch.float8_e4m3fn and vt.is_contiguous()
    perm = fp8.key_permutation()
    vf, vtf = v8.float(), vt.float()
    for col in range(n32):
        key = 32 * (col // 32) + perm[col % 32]
        want = vf[:, :, key, :] if key < nk else torch.zeros_like(vf[:, :, 0, :])
        assert torch.equal(vtf[:, :, :, col], want), col
    assert torch.equal(fp8_model.untranspose_v(vt, nk).view(torch.uint8), v8.view(torch.uint8))


def _rmse(a, b):
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - b) ** 2)))


@pytest.mark.parametrize("causal", [False, True])
def test_model_against_float64_reference(causal):
    """The model of the kernel (fp8_model.emulate) on small ragged GQA inputs: close to float64 attention of the
    original inputs (FP8's few per cent), and near equal whatever the key tile (the online softmax is exact up to
    rounding)."""
    g = torch.Generator().manual_seed(1 + causal)
    B, H, Hkv, Nq, Nk, d = 1, 4, 2, 37, 77, 64
    q, k, v = (_outliers((B, h, n, d), g) for h, n in ((H, Nq), (Hkv, Nk), (Hkv, Nk)))
    rep = lambda x: x.repeat_interleave(H // Hkv, dim=1).double().numpy()
    o_ref, lse_ref = reference.attention_forward(q.double().numpy(), rep(k), rep(v), causal, 1 / math.sqrt(d))
    errs = {}
    for had in (False, True):
        inp = fp8.quantize(q, k, v, hadamard=had, seed=7)
        o, lse = fp8_model.emulate(inp, causal)
        o2, _ = fp8_model.emulate(inp, causal, Bc=32)
        assert o.shape == (B, H, Nq, d) and torch.isfinite(o).all() and torch.isfinite(lse).all()
        errs[had] = _rmse(o, o_ref)
        assert errs[had] <= 0.1 * np.sqrt(np.mean(o_ref ** 2)), errs
        assert _rmse(o2, o.numpy()) <= 0.5 * errs[had]
        o3, lse3 = fp8_model.emulate(inp, causal, Bc=32, reverse=True)     # the trimmed kernel's order
        assert _rmse(o3, o2.numpy()) <= 0.5 * errs[had] and not torch.equal(o3, o2)
        assert np.abs(lse3.numpy() - lse.numpy()).max() <= 1e-3
        assert np.abs(lse.numpy() - lse_ref).max() <= 0.25


def test_hadamard_lowers_the_error_with_outliers():
    """FlashAttention-3's experiment (section 4.3), on the model: standard normal Q, K, V with 0.1 % outliers of
    standard deviation 10; quantised after the rotation, O's RMSE against float64 falls (here 0.015 -> 0.008 at
    d = 128 over 1024 x 1024); without outliers the rotation changes little."""
    for frac, gain in ((0.001, 1.5), (0.0, 0.9)):
        g = torch.Generator().manual_seed(0)
        q, k, v = (_outliers((1, 2, 1024, 128), g, frac) for _ in range(3))
        o_ref, _ = reference.attention_forward(q.double().numpy(), k.double().numpy(), v.double().numpy(), False,
                                               1 / math.sqrt(128))
        plain, had = (_rmse(fp8_model.emulate(fp8.quantize(q, k, v, hadamard=h), False)[0], o_ref)
                      for h in (False, True))
        assert had * gain < plain, (frac, plain, had)


def test_model_of_exact_inputs_is_exact_up_to_p_rounding():
    """Inputs that e4m3 holds exactly after scaling (entries 0, +-1, +-2, amax 2: x / scale in {0, +-224, +-448}):
    the model's only rounding is P's, so the scores (lse) match float64 to fp32 precision."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randint(-2, 3, (1, 2, n, 64), generator=g).float() for n in (20, 50, 50))
    for x in (q, k, v):
        x[..., 0, 0] = 2.0
    inp = fp8.quantize(q, k, v, hadamard=False)
    for x, x8, sc in ((q, inp.q8, inp.q_descale), (k, inp.k8, inp.k_descale)):
        assert torch.allclose(x8.float() * sc[:, :, None, None], x, rtol=1e-6, atol=0)
    _, lse = fp8_model.emulate(inp, False, scale=1 / 8)
    _, lse_ref = reference.attention_forward(q.double().numpy(), k.double().numpy(), v.double().numpy(), False, 1 / 8)
    assert np.abs(lse.numpy() - lse_ref).max() <= 1e-4 * max(1.0, np.abs(lse_ref).max())


def test_fp8_config():
    cfg = fp8_tiles.fp8_config(128, True, (128, 2))
    assert cfg.kernel == "fa3_fp8<__nv_bfloat16, 128, 128, 2, true, 0>" and (cfg.Br, cfg.Bc, cfg.threads) == (128, 128, 384)
    assert cfg.smem == 1024 + 128 * 128 + 4 * 128 * 128 + 8 * 10
    assert fp8_tiles.fp8_config(64, False).kernel == \
        "fa3_fp8<__nv_bfloat16, 64, 160, 2, false, 1, true, false, 0, 3>"                        # the defaults
    assert fp8_tiles.fp8_config(128, True).kernel == "fa3_fp8<__nv_bfloat16, 128, 224, 2, true, 2>"
    assert fp8_tiles.fp8_config(256, False, out="float16").kernel == "fa3_fp8<__half, 256, 128, 2, false, 1, true>"
    assert fp8_tiles.fp8_config(128, False, Nk=4096).narrow == 64 and fp8_tiles.fp8_config(128, False).narrow == 0
    assert fp8_tiles.fp8_config(128, True, Nk=4096).narrow == 0           # FP8_NARROW's default, where Nk is given
    assert fp8_tiles.fp8_config(128, False, (192, 3, 16)).kernel == "fa3_fp8<__nv_bfloat16, 128, 192, 3, false, 16>"
    assert [fp8_tiles.tile_name(t) for t in ((224, 2, 2), (224, 2, 0), (128, 2))] == [
        "fa3_fp8_224x2e2", "fa3_fp8_224x2", "fa3_fp8_128x2"]
    for d in fp8_tiles.FP8_HEAD_DIMS:
        for t in (None,) + fp8_tiles.FP8_OTHER_TILES[d]:
            assert fp8_tiles.fp8_config(d, False, t).smem <= 227 * 1024
    with pytest.raises(ValueError, match="head_dim"):
        fp8_tiles.fp8_config(96, False)
    for d, bc in ((256, 160), (128, 256)):                               # spills: FP8_MAX_BC
        with pytest.raises(ValueError, match=f"up to {fp8_tiles.FP8_MAX_BC[d]} at d = {d}"):
            fp8_tiles.fp8_config(d, False, (bc, 2))
    assert fp8_tiles.fp8_config(256, False, (128, 2)).kernel == "fa3_fp8<__nv_bfloat16, 256, 128, 2, false, 0>"
    assert fp8_tiles.fp8_config(256, True, (96, 3)).smem == 1024 + 128 * 256 + 6 * 96 * 256 + 8 * 14
    for bad in ((112, 2), (80, 2), (32, 2), (288, 2), (256, 2), (128, 1), (128, 2, 17), (128, 2, -1), (128,),
                (128, 2, 1, 1)):                                       # not accepted, too small or large
        with pytest.raises(ValueError, match=r"Bc in \(64, 96, 128, 160"):
            fp8_tiles.fp8_config(128, False, bad)
    cfg = fp8_tiles.fp8_config(128, False, (224, 2))                             # FlashAttention-3's FP8 tile at d = 128
    assert cfg.kernel == "fa3_fp8<__nv_bfloat16, 128, 224, 2, false, 0>" and cfg.smem == 1024 + 128 * 128 + 4 * 224 * 128 + 8 * 10
    assert [fp8_tiles.block_bytes(x) for x in (64, 96, 128, 160, 192, 224, 256)] == [64, 32, 128, 32, 64, 32, 128]
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        fp8_tiles.fp8_config(64, False, out="float32")
    cfg = fp8_tiles.fp8_config(128, True, (224, 2, 2, True))                     # the persistent grid
    assert cfg.kernel == "fa3_fp8<__nv_bfloat16, 128, 224, 2, true, 2, true>" and cfg.persistent
    assert cfg.smem == fp8_tiles.fp8_config(128, True, (224, 2, 2)).smem            # q_empty: a barrier slot unused before
    assert not fp8_tiles.fp8_config(128, True, (224, 2, 2, False)).persistent
    assert fp8_tiles.tile_name((224, 2, 2, True)) == "fa3_fp8_224x2e2p" and fp8_tiles.tile_name((224, 2, 0, True)) \
        == "fa3_fp8_224x2p" and fp8_tiles.tile_name((224, 2, 2, False)) == "fa3_fp8_224x2e2"
    assert tma.fa3_grid(cfg, 4096, 64, 132) == (132, 1, 1) and tma.fa3_grid(cfg, 300, 7, 132) == (21, 1, 1)
    assert tma.fa3_grid(fp8_tiles.fp8_config(128, True, (224, 2, 2)), 300, 7, 132) == (3, 7, 1)
    for d in fp8_tiles.FP8_HEAD_DIMS:                                            # the defaults: FP8_PERSIST's choice
        for c in (False, True):
            assert fp8_tiles.fp8_config(d, c).persistent == fp8_tiles.FP8_PERSIST[d][c]
    with pytest.raises(ValueError, match="persist, trim and narrow bools"):
        fp8_tiles.fp8_config(128, False, (224, 2, 2, 1))
    cfg = fp8_tiles.fp8_config(128, True, (224, 2, 2, False, True))              # the trimmed kernel
    assert cfg.kernel == "fa3_fp8<__nv_bfloat16, 128, 224, 2, true, 2, false, true>" and cfg.trim
    assert not cfg.persistent and cfg.smem == fp8_tiles.fp8_config(128, True, (224, 2, 2)).smem
    assert fp8_tiles.tile_name((224, 2, 2, False, True)) == "fa3_fp8_224x2e2t"
    assert fp8_tiles.default_tiles(128, False, True) == (224, 2, 2, False, True, False, 2)
    for bad in ((224, 2, 2, True, True), (224, 2, 2, False, 1), (224, 2, 2, False, True, 0),
                (224, 2, 2, False, True, True), (224, 2, 2, True, False, True), (224, 2, 2, False, False, 1),
                (224, 2, 2, False, False, True, 0)):
        with pytest.raises(ValueError, match="at most one of them True"):
            fp8_tiles.fp8_config(128, False, bad, Nk=4096)
    assert [fp8_tiles.narrow_width(n, 224) for n in (1, 32, 33, 224, 225, 4096, 8192, 16384)] == \
        [32, 32, 64, 0, 32, 64, 128, 32]                                          # the narrow last key tile
    cfg = fp8_tiles.fp8_config(128, False, (224, 2, 2, False, False, True), Nk=4096)
    assert cfg.kernel == "fa3_fp8<__nv_bfloat16, 128, 224, 2, false, 2, false, false, 64>" and cfg.narrow == 64
    assert fp8_tiles.fp8_config(128, False, (224, 2, 2, False, False, True), Nk=300, out="float16").kernel == \
        "fa3_fp8<__half, 128, 224, 2, false, 2, false, false, 96>"
    assert fp8_tiles.fp8_config(128, False, (224, 2, 2, False, False, True), Nk=448) == \
        fp8_tiles.fp8_config(128, False, (224, 2, 2))                            # no partial tile: the plain kernel
    assert fp8_tiles.tile_name((224, 2, 2, False, False, True)) == "fa3_fp8_224x2e2n"
    cfg = fp8_tiles.fp8_config(64, True, (160, 2, 1, True, False, False, 3))         # three consumer warpgroups
    assert cfg.kernel == "fa3_fp8<__nv_bfloat16, 64, 160, 2, true, 1, true, false, 0, 3>"
    assert (cfg.Br, cfg.threads, cfg.smem) == (192, 512, 1024 + 192 * 64 + 4 * 160 * 64 + 8 * 10)
    assert tma.fa3_grid(cfg._replace(persistent=False), 385, 7, 132) == (3, 7, 1)   # ceil(385 / 192) query tiles
    assert fp8_tiles.fp8_config(64, False, (160, 2, 1, False, False, True, 3), Nk=4128).kernel == \
        "fa3_fp8<__nv_bfloat16, 64, 160, 2, false, 1, false, false, 128, 3>"
    assert fp8_tiles.tile_name((160, 2, 1, True, False, False, 3)) == "fa3_fp8_160x2e1pw3"
    for d, t in ((64, (192, 2, 1, False, False, False, 3)), (128, (128, 2, 1, False, False, False, 3)),
                 (64, (128, 2, 1, False, False, False, 4)), (64, (128, 2, 1, False, False, False, 3, 0))):
        with pytest.raises(ValueError, match=r"or with 3 \(160 each\) at d in \(64,\) up to \(160,\)"):
            fp8_tiles.fp8_config(d, False, t)
    for c, nk in ((True, 4096), (False, None), (False, 0), (False, 4096.0)):
        with pytest.raises(ValueError, match="without the causal mask and needs Nk"):
            fp8_tiles.fp8_config(128, c, (224, 2, 2, False, False, True), Nk=nk)
    for d in fp8_tiles.FP8_HEAD_DIMS:                                            # FP8_TRIM's choice
        for c in (False, True):
            assert fp8_tiles.fp8_config(d, c).trim == fp8_tiles.FP8_TRIM[d][c]
    n_other = sum(map(len, fp8_tiles.FP8_OTHER_TILES.values()))     # (d x out x (plain, persist, trim) + other) x causal
    n_narrow = 2 * sum(fp8_tiles.narrow_width(4096, t[0]) > 0 for t in fp8_tiles.FP8_TILES.values())   # + narrow
    assert n_narrow == 4 and len(set(fp8_tiles.fp8_instances())) == len(fp8_tiles.fp8_instances()) == \
        (3 * 2 * 3 + n_other) * 2 + n_narrow


def test_entries_refuse_cpu_tensors():
    q = torch.zeros(1, 1, 4, 64, dtype=torch.float16)
    with pytest.raises(TypeError, match="CUDA"):
        fp8.forward_fp8(q, q, q)
    from flashlib import cupy_kernels as ck
    assert ck.forward_fp8 is fp8.forward_fp8 and ck.forward_fp8_quantized is fp8.forward_fp8_quantized


def fp8_jobs():
    return sm90a_jobs("fa3_fp8.cu", fp8_tiles.fp8_instances())


def quant_jobs():
    return sm90a_jobs("fp8_quant.cu", fp8.quant_instances())


BACKGROUND = {"test_fp8_compiles_without_spills": fp8_jobs,    # compiled beside the other tests
              "test_fp8_quant_compiles_without_spills": quant_jobs}


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")
def test_fp8_compiles_without_spills():
    check_sm90a(fp8_jobs())


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")
def test_fp8_quant_compiles_without_spills():
    """fp8_quant.cu's passes (each 16-bit dtype and head dim) for sm_90a: no spills, no stack frame."""
    check_sm90a(quant_jobs())


def test_quantize_on_the_cpu_is_the_reference_and_the_fused_one_wants_cuda():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, n, 64, generator=g).half() for n in (33, 40, 40))
    a, b = fp8.quantize(q, k, v, seed=4), fp8.quantize_reference(q, k, v, seed=4)
    assert all(torch.equal(x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x,
                           y.view(torch.uint8) if y.dtype == torch.float8_e4m3fn else y)
               for x, y in zip(a[:6], b[:6])) and a.Nk == b.Nk == 40
    with pytest.raises(TypeError, match="CUDA"):
        fp8.quantize_fused(q, k, v)
    assert np.array_equal(fp8.random_hadamard(64, 4) * 8, fp8.hadamard_signs(64, 4)[:, None] * fp8.sylvester(64))
    assert len(set(fp8.quant_instances())) == 2 * 2 * 3 and fp8.quant_rows(128) == 64
    src = (HERE / "fp8_quant.cu").read_text()                 # its constants: E4M3_MAX and float32(1 / sqrt(d))
    assert float(re.search(r"constexpr float E4M3_MAX = ([0-9.]+)f;", src).group(1)) == fp8.E4M3_MAX
    rs = re.search(r"RS = D == 64 \? ([0-9.]+)f : D == 128 \? ([0-9.]+)f : ([0-9.]+)f;", src).groups()
    assert [np.float32(x) for x in rs] == [np.float32(1 / np.sqrt(d)) for d in fp8_tiles.FP8_HEAD_DIMS]


def test_exp2_fma_constants_give_exp2():
    """flash_common.cuh's exp2_fma, its clamp and coefficients read from the source and run in float32 numpy the
    same way (floor by the round-down add, the polynomial by fmaf, j added to the exponent bits): within 7.6e-5 of
    2^x over [-120, 8] (x <= 8: P is scaled by 2^8), no NaN or negative result down to -inf (the masked keys)."""
    src = (HERE / "flash_common.cuh").read_text()
    body = src[src.index("float exp2_fma(float x)"):]
    lo = np.float32(re.search(r"x = fmaxf\(x, (-[0-9.]+)f\);", body).group(1))
    c = [np.float32(v) for v in re.search(r"fmaf\(fmaf\(fmaf\(([0-9.]+)f, f, ([0-9.]+)f\), f, ([0-9.]+)f\), f, "
                                          r"([0-9.]+)f\)", body).groups()]
    x = np.concatenate([np.linspace(-140, 8, 400001, dtype=np.float32), np.float32([-np.inf, -126.5, 0, 8])])
    xc = np.maximum(x, lo)
    magic = np.float32(1.5 * 2 ** 23)
    j = magic + np.floor(xc)                                  # = __fadd_rd(x, MAGIC): exact below 2^22
    f = xc - (j - magic)
    p = np.float32(np.float32(np.float32(c[0] * f + c[1]) * f + c[2]) * f + c[3])
    y = (p.view(np.int32) + (j.view(np.int32) << np.int32(23))).view(np.float32)
    assert not np.isnan(y).any() and (y >= 0).all() and (y[x <= -126] < 2e-38).all()
    ok = x >= -120
    assert np.abs(y[ok] / np.exp2(x[ok].astype(np.float64)) - 1).max() < 7.6e-5


def test_the_h200_record_holds_what_the_docstrings_say():
    """fp8_forward_h200 (benchmarks/fp8_bench.py at 1032231), as fp8_tiles.py's FP8_TILES comment and chapter 8
    quote it: the default tile (on the plain grid) is the fastest fa3_fp8 tile timed in every shape, within 1 % at
    d = 128 and 2 % at d = 64 (where 128 keys with three consumers lead by up to 1.6 % on the plain grid and trail
    on the persistent one flashlib runs without the mask: fp8_sweep_d64_h200), 1.5 % or more above Bc = 128 (two
    consumers) at d = 128 and 6 % at d = 64; at d = 128, N = 16384 it is over 900 TFLOP/s, causal or not; at d = 128 it beats rung 7 fp16 and cuDNN fp16 by 1.15x in every shape; at
    d = 64 it is within 3 % of rung 7 or above it. The error table: the rotation halves O's RMSE on inputs with
    outliers and changes it by under 3 % without; fp16 rung 7 is over 100x more accurate."""
    from flashlib import bench
    rows = bench.load("fp8_forward_h200")["rows"]
    fwd = collections.defaultdict(dict)
    for r in rows:
        if r["kind"] == "forward":
            fwd[(r["d"], r["n"], r["causal"])][r["impl"]] = r["tflops"]
    assert len(fwd) == 8
    for (d, n, causal), t in fwd.items():
        mine = t[fp8_tiles.tile_name(fp8_tiles.default_tiles(d, False))]
        assert mine >= (0.99 if d == 128 else 0.98) * max(v for k, v in t.items() if k.startswith("fa3_fp8_")), \
            (d, n, causal, t)
        assert mine >= (1.015 if d == 128 else 1.06) * t["fa3_fp8_128x2"], (d, n, causal, t)
        if d == 128:
            assert mine > 1.15 * max(t["rung7_fp16"], t["sdpa_cudnn_fp16"]), (n, causal, t)
            assert n < 16384 or mine > 900, (n, causal, t)
        else:
            assert mine > 0.97 * t["rung7_fp16"], (n, causal, t)
    err = {(r["d"], r["inputs"], r["impl"]): r["rmse"] for r in rows if r["kind"] == "error"}
    for d in (64, 128):
        assert err[(d, "outliers_0.1%", "fa3_fp8_plain")] > 1.9 * err[(d, "outliers_0.1%", "fa3_fp8_hadamard")]
        assert abs(err[(d, "normal", "fa3_fp8_plain")] / err[(d, "normal", "fa3_fp8_hadamard")] - 1) < 0.03
        for inputs in ("normal", "outliers_0.1%"):
            assert 100 * err[(d, inputs, "rung7_fp16")] < err[(d, inputs, "fa3_fp8_hadamard")]


def test_the_h200_quant_record_holds_what_the_docstrings_say():
    """fp8_quant_h200 (benchmarks/fp8_bench.py --quant at 2f905df): the fused passes are over 9x faster than torch's
    (both with and without the rotation) and faster than V's transpose alone; end to end, forward_fp8 beats rung 7
    fp16 and cuDNN's SDPA fp16 (timed in the same run) at d = 128, N = 16384 (causal and not) and rung 7 at N = 4096
    without the mask; at d = 256, N = 16384 it takes under 0.75 of rung 7's time and of cuDNN's, causal and not."""
    from flashlib import bench
    rows = bench.load("fp8_quant_h200")["rows"]
    hp = {(r["d"], r["n"], r["impl"]): r["ms"] for r in rows if r["kind"] == "host_pass"}
    e2e = {(r["d"], r["n"], r["causal"], r["impl"]): r["ms"] for r in rows if r["kind"] == "end_to_end"}
    assert len(hp) == 6 * 5 and len(e2e) == 12 * 5
    for d in (64, 128, 256):
        for n in (4096, 16384):
            for way in ("hadamard", "plain"):
                assert 9 * hp[(d, n, f"quantize_fused_{way}")] < hp[(d, n, f"quantize_{way}")], (d, n, way)
            assert hp[(d, n, "quantize_fused_hadamard")] < hp[(d, n, "transpose_v")]
    for causal in (False, True):
        for other in ("rung7_fp16", "sdpa_cudnn_fp16"):
            assert e2e[(128, 16384, causal, "forward_fp8")] < 0.95 * e2e[(128, 16384, causal, other)], (causal, other)
            assert e2e[(256, 16384, causal, "forward_fp8")] < 0.75 * e2e[(256, 16384, causal, other)], (causal, other)
    assert e2e[(128, 4096, False, "forward_fp8")] < e2e[(128, 4096, False, "rung7_fp16")]


def test_the_emu_record_holds_what_fp8_tiles_says():
    """fp8_emu_h200 (benchmarks/fp8_bench.py --emu at 921a671): the default emu of each head dim is within 2 % of the
    fastest emu timed at every shape, and at d = 128 at least 5 % above emu 0; the errors do not change (within 0.1 %
    of emu 0's); Nsight Compute saw the tensor pipe busier and MUFU (the xu pipe) no busier with emu 2 than with 0."""
    from flashlib import bench
    rows = bench.load("fp8_emu_h200")["rows"]
    fwd = collections.defaultdict(dict)
    for r in rows:
        if r["kind"] == "forward":
            fwd[(r["d"], r["n"], r["causal"])][r["emu"]] = r["tflops"]
    assert len(fwd) == 8
    for (d, n, causal), t in fwd.items():
        mine = t[fp8_tiles.FP8_TILES[d][2]]
        assert mine >= 0.98 * max(t.values()), (d, n, causal, t)
        assert d != 128 or mine >= 1.05 * t[0], (n, causal, t)
    err = {(r["d"], r["inputs"], r["emu"]): r["rel_rmse"] for r in rows if r["kind"] == "error"}
    for (d, inputs, e), v in err.items():
        assert abs(v / err[(d, inputs, 0)] - 1) < 1e-3, (d, inputs, e)
    ncu = {r["emu"]: r["metrics"] for r in rows if r["kind"] == "ncu"}
    tensor, xu = "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active", \
        "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active"
    assert ncu[2][tensor] > 1.1 * ncu[0][tensor] and ncu[2][xu] <= ncu[0][xu]


def _beats(fast, slow):
    """True where record row `fast`'s median time is below `slow`'s by more than both rows' spreads (relative IQR)."""
    return slow["ms"] - fast["ms"] > max(fast["spread"], slow["spread"]) * slow["ms"]


def test_the_trim_record_sets_the_defaults():
    """fp8_trim_h200 (benchmarks/fp8_bench.py --trim): the default tiles with and without TRIM at d = 64, 128,
    N = 4096, 8192, 16384, causal and not, agreeing to FP8's rounding; FP8_TRIM is on for (d, causal) exactly where
    the trimmed kernel's median time was lower by more than both runs' spreads at every length (d = 256: not timed,
    off)."""
    from flashlib import bench
    rows = [r for r in bench.load("fp8_trim_h200")["rows"] if r["kind"] == "forward"]
    t = {(r["d"], r["n"], r["causal"], r["trim"]): r for r in rows}
    assert len(t) == 24 and all(r["max_rel_diff"] < 0.05 for r in rows)
    for d in fp8_tiles.FP8_HEAD_DIMS:
        for c in (False, True):
            on = d != 256 and all(_beats(t[(d, n, c, True)], t[(d, n, c, False)]) for n in (4096, 8192, 16384))
            assert fp8_tiles.FP8_TRIM[d][c] == on, (d, c)


def test_the_narrow_record_sets_the_defaults():
    """fp8_narrow_h200 (benchmarks/fp8_bench.py --narrow): the default tiles with and without the narrow last key
    tile at d = 64, 128, N = 4096, 8192, 16384, without the mask, giving the same bits; FP8_NARROW is on for
    (d, not causal) exactly where narrow was faster beyond both spreads at one length at least and slower beyond
    them at none (never with the mask; d = 256: not timed, off)."""
    from flashlib import bench
    rows = [r for r in bench.load("fp8_narrow_h200")["rows"] if r["kind"] == "forward"]
    t = {(r["d"], r["n"], r["narrow"]): r for r in rows}
    assert len(t) == 12 and all(r["same_bits"] and not r["causal"] for r in rows)
    for d in fp8_tiles.FP8_HEAD_DIMS:
        on = d != 256 and any(_beats(t[(d, n, True)], t[(d, n, False)]) for n in (4096, 8192, 16384)) and \
            not any(_beats(t[(d, n, False)], t[(d, n, True)]) for n in (4096, 8192, 16384))
        assert fp8_tiles.FP8_NARROW[d] == (on, False), d


def test_the_sweep_record_keeps_the_default_tiles():
    """fp8_sweep_h200 (benchmarks/fp8_bench.py --sweep): at d = 128, N = 4096 and 16384, causal and not, every other
    key tile, stage count and exp2 share of SWEEP beside FP8_TILES[128], interleaved; none is faster than the
    default beyond both spreads at both lengths (a smaller tile wastes fewer keys at N = 4096 but runs slower), and
    all agree with it to FP8's rounding."""
    from flashlib import bench
    rec = bench.load("fp8_sweep_h200")
    rows = [r for r in rec["rows"] if r["kind"] == "forward"]
    assert tuple(rec["info"]["tiles"]["128"]) == fp8_tiles.FP8_TILES[128]
    assert len(rows) == 4 * (1 + len(rec["info"]["sweep"])) and all(r["max_rel_diff"] < 0.05 for r in rows)
    t = {(r["n"], r["causal"], r["impl"]): r for r in rows}
    default = fp8_tiles.tile_name(fp8_tiles.FP8_TILES[128])
    for impl in {r["impl"] for r in rows} - {default}:
        for c in (False, True):
            wins = [_beats(t[(n, c, impl)], t[(n, c, default)]) for n in (4096, 16384)]
            assert not all(wins), (impl, c)


def _base(tiles):
    """(Bc, stages, emu, consumers) of a record's tiles entry (records before the seventh entry: two consumers)."""
    t = fp8_tiles.full_tiles(tiles)
    return t[:3] + (t[6],)


@pytest.mark.parametrize("d", (64, 256))
def test_the_sweep_record_sets_the_default_tiles(d):
    """fp8_sweep_d64_h200 and fp8_sweep_d256_h200 (fp8_bench.py --sweep 64 / 256): other key tiles, stages, exp2
    shares and consumer warpgroups, plain and persistent, beside the default tiles, interleaved with rung 7 and
    cuDNN in fp16; no other (Bc, stages, emu, consumers), taken with FP8_PERSIST's grid, is faster than the default
    beyond both spreads at all four shapes (N = 4096 and 16384, causal and not); the FP8 ones agree with the default
    to FP8's rounding, and the default is faster than both fp16 kernels everywhere."""
    from flashlib import bench
    rec = bench.load(f"fp8_sweep_d{d}_h200")
    mine = fp8_tiles.FP8_TILES[d] + (fp8_tiles.FP8_CONSUMERS[d],)
    assert tuple(rec["info"]["tiles"][str(d)]) == fp8_tiles.FP8_TILES[d]
    rows = {(r["n"], r["causal"], r["impl"]): r for r in rec["rows"] if r["kind"] == "forward"}
    fp8_rows = [r for r in rows.values() if r["tiles"] is not None]
    names = {fp8_tiles.tile_name(t) for t in rec["info"]["sweep"]} | {fp8_tiles.tile_name(fp8_tiles.default_tiles(d, False))}
    assert {r["impl"] for r in fp8_rows} == names and len(fp8_rows) == 4 * len(names)   # the default timed once
    assert all(r["max_rel_diff"] < 0.05 and fp8_tiles.tile_name(r["tiles"]) == r["impl"] for r in fp8_rows)
    name = lambda b, p: fp8_tiles.tile_name(b[:3] + (p, False, False, b[3]))
    for b in {_base(r["tiles"]) for r in fp8_rows} - {mine}:
        wins = []
        for n in (4096, 16384):
            for c in (False, True):
                p = fp8_tiles.FP8_PERSIST[d][c]
                ours, other = rows[(n, c, name(mine, p))], rows.get((n, c, name(b, p)))
                wins.append(other is not None and _beats(other, ours))   # a grid the sweep did not time: no win
                assert ours["tflops"] > max(rows[(n, c, f)]["tflops"] for f in ("rung7_fp16", "sdpa_cudnn_fp16"))
        assert not all(wins), b


def test_the_persist_record_sets_the_defaults():
    """fp8_persist_h200 (benchmarks/fp8_bench.py --persist) at d = 128, and the sweeps' default tiles plain and
    persistent at d = 64 and 256 (fp8_sweep_d64_h200, fp8_sweep_d256_h200), at N = 4096, 16384, causal and not,
    both grids giving the same bits; FP8_PERSIST is on for (d, causal) exactly where the persistent grid's median
    was faster at both lengths."""
    from flashlib import bench
    rows = bench.load("fp8_persist_h200")["rows"]
    t = {(r["d"], r["n"], r["causal"], r["persist"]): r["tflops"] for r in rows if r["kind"] == "forward" and
         r["d"] == 128}
    assert len(t) == 8 and all(r["same_bits"] for r in rows)
    for d in (64, 256):                                          # the sweep's plain and persistent default
        for r in bench.load(f"fp8_sweep_d{d}_h200")["rows"]:
            for p in (False, True):
                if r["impl"] == fp8_tiles.tile_name(fp8_tiles.default_tiles(d, p)):
                    assert r["max_rel_diff"] == 0.0                 # the same bits as the plain default
                    t[(d, r["n"], r["causal"], p)] = r["tflops"]
    assert len(t) == 24
    for d in fp8_tiles.FP8_HEAD_DIMS:
        for c in (False, True):
            faster = all(t[(d, n, c, True)] > t[(d, n, c, False)] for n in (4096, 16384))
            assert fp8_tiles.FP8_PERSIST[d][c] == faster, (d, c, {k: v for k, v in t.items() if k[0] == d})


