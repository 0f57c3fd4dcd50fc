"""flashlib.cupy_kernels: host logic (CPU), nvcc/ptxas compile checks (CPU, needs nvcc), correctness (GPU).

GPU tests follow FlashAttention's rule: the error against the float64 reference is at most 2x (forward) / 3x
(gradients) the error of naive attention computed in the same precision on the GPU (PyTorch), plus a tiny atol.
Every CuPy allocation is filled with NaN bits first, so an output element a kernel forgets to write fails.
"""
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

import flashlib
from flashlib import cupy_kernels as ck
from flashlib import reference
from tests import jobs
from tests.compile_jobs import NVCC, nvcc, parse_ptxas

# ------------------------------------------------------------------ host logic, no GPU


def test_import_does_not_need_cupy_or_gpu():
    code = "import sys, flashlib.cupy_kernels as c; assert 'cupy' not in sys.modules; print(c.choose_config('float16', 64, 75).rung)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "sm75"


@pytest.mark.parametrize("dtype,cc,rung", [("float32", 90, "fp32"), ("float16", 90, "tuned"), ("bfloat16", 80, "tuned"),
                                           ("float16", 75, "sm75"), ("float32", 75, "fp32"), ("float16", (8, 6), "tuned"),
                                           ("bfloat16", 100, "tuned")])
def test_default_forward_rung(dtype, cc, rung):
    for d in ck.HEAD_DIMS:
        cfg = ck.choose_config(dtype, d, cc)
        if cc == 90 and dtype != "float32" and d in ck.FA3_DEFAULT_HEAD_DIMS:  # Hopper: rung 7 where checked
            assert cfg.rung == "fa3" and cfg.kernel.startswith("fa3_forward<") and cfg.arch == "sm_90a"
            assert cfg.Br == 64 * (cfg.warps // 4 - 1)                # one producer warpgroup, the rest consumers
        else:
            assert cfg.rung == rung
        assert cfg.smem <= ck.SMEM_LIMIT[ck._cc_int(cc)] and cfg.dtype == dtype
        if cfg.rung not in ("fp32", "fa3"):
            assert cfg.Br in (16 * cfg.warps, 32 * cfg.warps) and cfg.kernel.startswith("fa2_tc<")


def test_wgmma_config():
    cfg = ck.choose_config("bfloat16", 128, 90, causal=True, rung="wgmma", tiles=(1, 64))
    assert cfg.kernel == "fa2_wgmma<__nv_bfloat16, 128, 64, 1, true>" and (cfg.Br, cfg.Bc, cfg.warps) == (64, 64, 4)
    assert cfg.smem == 2 * 128 * (64 + 4 * 64) + 1024 == ck.smem_wgmma(128, 1, 64)
    for d in ck.WGMMA_HEAD_DIMS:  # the chosen tiles fit the H100's shared memory
        assert ck.choose_config("float16", d, 90).smem <= ck.SMEM_LIMIT[90]
    with pytest.raises(ValueError, match="Hopper"):
        ck.choose_config("float16", 64, 80, rung="wgmma")
    with pytest.raises(ValueError, match="head_dim"):
        ck.choose_config("float16", 96, 90, rung="wgmma")
    with pytest.raises(ValueError, match="warpgroups"):
        ck.choose_config("float16", 64, 90, rung="wgmma", tiles=(3, 64))


def test_backward_rungs():
    assert ck.default_rung("float16", 90, "backward") == "bwd_tc"
    assert ck.default_rung("bfloat16", 80, "backward") == "bwd_tc"
    assert ck.default_rung("float16", 75, "backward") == "bwd_fp32"
    assert ck.default_rung("float32", 90, "backward") == "bwd_fp32"
    cfg = ck.choose_config("float16", 128, 90, causal=True, rung="bwd_tc")
    nw, kw, Br, brc, kvreg = ck.BWD_TILES[128]
    assert cfg.kernel == f"fa2_bwd_tc<__half, 128, {nw}, {kw}, {Br}, {brc}, {str(kvreg).lower()}, true>"
    assert cfg.Bc == 16 * kw * nw and cfg.Br == Br and cfg.smem == ck.smem_backward(128, nw, kw, Br)
    assert ck.default_rung("float16", 80, "backward", 256) == "bwd_tc" == ck.default_rung("float16", 80, "backward", 111)
    # d = 256: two launches of 128 output columns (the template's DO); the others all columns in one (DO's default)
    assert ck.bwd_columns(256) == 128 and ck.bwd_columns(128) == 128
    assert ck.choose_config("float16", 200, 90, rung="bwd_tc").kernel.endswith(", false, 128>")
    assert ck.choose_config("float16", 111, 90, rung="bwd_tc").kernel.endswith(", false>")
    for d in ck.HEAD_DIMS:
        for cc in (80, 86, 89, 90):  # the table's tiles, or smaller ones where the shared memory is smaller
            cfg = ck.choose_config("bfloat16", d, cc, rung="bwd_tc")
            assert cfg.smem <= ck.SMEM_LIMIT[cc] and cfg.Bc % cfg.warps == 0
    assert ck.choose_config("float16", 128, 86, rung="bwd_tc").Bc < ck.choose_config("float16", 128, 90, rung="bwd_tc").Bc
    # the tile override: (warps, KW, Br, BRC, KVREG)
    cfg = ck.choose_config("float16", 64, 90, rung="bwd_tc", tiles=(4, 2, 64, 32, False))
    assert cfg.Bc == 128 and cfg.warps == 4 and cfg.kernel.endswith("4, 2, 64, 32, false, false>")
    with pytest.raises(ValueError, match="shared memory"):
        ck.choose_config("float16", 128, 86, rung="bwd_tc", tiles=(8, 1, 64, 32, False))


def test_kernel_names_and_tiles():
    cfg = ck.choose_config("bfloat16", 64, 90, causal=True, rung="tuned")
    nw, Bc, rw, qreg = ck.TUNED_TILES[64][True]
    assert cfg.kernel == f"fa2_tc<__nv_bfloat16, 64, {nw}, {Bc}, true, true, false, {rw // 16}, {str(qreg).lower()}>"
    assert cfg.smem == ck.smem_forward(64, nw, Bc, 2, rw, qreg) and cfg.Br == rw * nw
    assert ck.choose_config("float16", 96, 75).kernel.endswith("false, false, true, 1, true>")
    assert ck.choose_config("float16", 128, 90, rung="tc", tiles=(2, 32)).Br == 32
    cfg = ck.choose_config("float16", 128, 90, rung="tuned", tiles=(4, 64, 32, 0))
    assert cfg.Br == 128 and cfg.kernel.endswith("true, false, 2, false>")
    # Q, two stages of K and V, the row sums (L_SMEM); two blocks fit an H100 SM (228 KB, 1 KB reserved per block)
    assert cfg.smem == 2 * 136 * (128 + 4 * 64) + 4 * 128 * 4 and 2 * (cfg.smem + 1024) <= 228 * 1024
    # tiles that fit an H100 but not an RTX (sm_86) are replaced by smaller ones there
    assert ck.choose_config("float16", 128, 86).smem <= ck.SMEM_LIMIT[86]
    assert ck.choose_config("float16", 96, 90).kernel.startswith("fa2_tc<")  # no wgmma for d = 96: rung 3


@pytest.mark.parametrize("args,match", [
    (("float64", 64, 90), "dtype"), (("float16", 0, 90), "head_dim"), (("float16", 257, 90), "head_dim"),
    (("float16", 64.0, 90), "head_dim"),
    (("float16", 64, 70), "7.5"), (("bfloat16", 64, 75), "bfloat16 needs"), (("float16", 64, 75, False, "tuned"), "8.0"),
    (("float16", 64, 75, False, "bwd_tc"), "8.0"), (("bfloat16", 64, 90, False, "sm75"), "float16 only"),
    (("float32", 64, 90, False, "tc"), "Tensor Cores"), (("float16", 64, 90, False, "fastest"), "unknown rung"),
    (("float16", 128, 86, False, "tuned", (8, 128)), "shared memory"),
    (("float16", 64, 90, False, "tuned", (4, 64, 64)), "16 or 32"),
])
def test_choose_config_errors(args, match):
    with pytest.raises(ValueError, match=match):
        ck.choose_config(*args)


def test_head_dims_run_as_their_bucket():
    """Every head dim 1 ... 256 runs as the smallest compiled head dim >= it, on every rung and GPU generation,
    within the shared memory of that GPU; d = 256 keeps Q in shared memory (QREG false) on the Tensor Core rungs."""
    assert [ck.head_bucket(d) for d in (1, 3, 32, 33, 40, 59, 64, 80, 96, 111, 128, 129, 200, 256)] == \
        [32, 32, 32, 64, 64, 64, 64, 96, 96, 128, 128, 256, 256, 256]
    for bad in (0, -1, 257, True, 64.0, "64"):
        with pytest.raises(ValueError, match="head_dim"):
            ck.head_bucket(bad)
    for d in range(1, 257):
        for cc in (75, 80, 86, 90):
            for dtype in ("float16", "float32"):
                cfg = ck.choose_config(dtype, d, cc, causal=d % 2 == 0)
                assert cfg.D == ck.head_bucket(d) and f", {cfg.D}, " in cfg.kernel and cfg.smem <= ck.SMEM_LIMIT[cc]
                back = ck.choose_config(dtype, d, cc, rung=ck.default_rung(dtype, cc, "backward", d))
                assert back.D == cfg.D and back.smem <= ck.SMEM_LIMIT[cc]
    for rung in ("tc", "tuned", "sm75"):
        assert ck.choose_config("float16", 256, 80, rung=rung).kernel.endswith(", 1, false>")
    # the CUDA-core rungs: static shared memory under 48 KB, 256 threads sharing whole rows (fa2_fp32.cu, fa2_bwd.cu)
    for D in ck.HEAD_DIMS:
        Br, Bc = ck.fp32_tiles(D)
        fwd = 4 * (Br * D + Bc * (D + 1) + Bc * D + Br * (Bc + 1) + 2 * Br)
        bwd = 4 * (4 * Br * (D + 1) + 2 * Br * (Br + 1) + 2 * Br)
        assert fwd <= 48 * 1024 and bwd <= 48 * 1024 and Bc <= 32 and D % (256 // Br) == 0


def test_pair_grid_spreads_batch_heads_over_y_and_z():
    """B*H (batch, head) pairs beyond grid.y's 65535 continue on grid.z; every pair gets exactly one block row."""
    assert ck.pair_grid(5, 1) == (5, 1, 1) and ck.pair_grid(5, 65535) == (5, 65535, 1)
    assert ck.pair_grid(3, 65536) == (3, 65535, 2) and ck.pair_grid(1, 70000) == (1, 65535, 2)
    assert ck.pair_grid(1, 0) == (1, 1, 0)
    for BH in (1, 7, 65535, 65536, 70000, 65535 * 3 + 1):
        _, y, z = ck.pair_grid(1, BH)
        pairs = [yy + y * zz for zz in range(z) for yy in range(y)]  # pair_index() of every block
        assert y <= 65535 and z <= 65535 and [p for p in pairs if p < BH] == list(range(BH))
    with pytest.raises(ValueError, match="grid.x"):
        ck.pair_grid(2**31, 1)
    with pytest.raises(ValueError, match="pairs exceed"):
        ck.pair_grid(1, 65535**2 + 1)


def test_sequence_lengths_beyond_int32_are_refused():
    """The kernels take Nq, Nk as int32 (offsets are 64-bit): longer sequences get a clear error, not a wrapped int."""
    class Shape:  # only .shape and .dtype are looked at: no 4 GB array needed
        def __init__(self, *shape):
            self.shape, self.dtype = shape, np.dtype(np.float16)
    assert ck.check_inputs(Shape(1, 1, 2**31 - 1, 64), Shape(1, 1, 5, 64), Shape(1, 1, 5, 64), "float16")[2] == 2**31 - 1
    with pytest.raises(ValueError, match="2\\*\\*31 - 1"):
        ck.check_inputs(Shape(1, 1, 3, 64), Shape(1, 1, 2**31, 64), Shape(1, 1, 2**31, 64), "float16")


def test_sw128_layout_is_conflict_free():
    """The swizzled layout of rung 6: a permutation of the tile's 16-byte chunks in which the 8 chunks one thread
    group copies (one 128-byte row) and the 8 rows one ldmatrix phase reads (one chunk column) each fall in the
    8 distinct 16-byte bank groups of a 128-byte shared-memory wavefront."""
    for rows, d in ((64, 64), (128, 128), (64, 128)):
        offs = [ck.sw128(r, c, rows) for r in range(rows) for c in range(0, d, 8)]
        assert sorted(offs) == list(range(0, rows * d * 2, 16))
        for r in range(rows):
            for c0 in range(0, d, 64):
                assert len({ck.sw128(r, c, rows) % 128 for c in range(c0, c0 + 64, 8)}) == 8
        for r0 in range(0, rows, 8):
            for c in range(0, d, 8):
                assert len({ck.sw128(r, c, rows) % 128 for r in range(r0, r0 + 8)}) == 8
    assert ck.sw128(1, 0, 64) == 128 + 16 and ck.sw128(0, 64, 64) == 64 * 128  # row 1's chunk 0 sits in slot 1


def test_check_inputs_without_gpu():
    q = np.zeros((2, 3, 5, 64), np.float16)
    k = np.zeros((2, 3, 7, 64), np.float16)
    assert ck.check_inputs(q, k, k, "float16") == (2, 3, 5, 7, 64)
    with pytest.raises(ValueError, match="expects float16"):
        ck.check_inputs(q.astype(np.float32), k, k, "float16")
    with pytest.raises(ValueError, match="int16"):
        ck.check_inputs(q, k, k, "bfloat16")
    assert ck.check_inputs(q.view(np.int16), k.view(np.int16), k.view(np.int16), "bfloat16")[3] == 7
    assert ck.check_inputs(q[..., :48], k[..., :48], k[..., :48], "float16")[4] == 48  # padded to 64
    with pytest.raises(ValueError, match="head_dim"):
        ck.check_inputs(np.zeros((1, 1, 2, 257), np.float16), *[np.zeros((1, 1, 2, 257), np.float16)] * 2, "float16")
    with pytest.raises(ValueError, match="k and v"):
        ck.check_inputs(q, k, k[:, :, :3], "float16")
    # grouped-query attention: k, v with H_kv heads dividing H
    q6, k3, k2 = np.zeros((2, 6, 5, 64), np.float16), np.zeros((2, 3, 7, 64), np.float16), np.zeros((2, 4, 7, 64), np.float16)
    assert ck.check_inputs(q6, k3, k3, "float16") == (2, 6, 5, 7, 64)
    assert ck.check_inputs(q6, k3[:, :1], k3[:, :1], "float16") == (2, 6, 5, 7, 64)  # multi-query
    with pytest.raises(ValueError, match="dividing H = 6"):
        ck.check_inputs(q6, k2, k2, "float16")
    with pytest.raises(ValueError, match="k and v"):
        ck.check_inputs(q6, k3, k3[:, :1], "float16")


def test_instances_per_architecture():
    i75, i90 = ck.instances(75), ck.instances(90)
    assert "fa2_bwd_tc.cu" not in i75 and not any("bfloat16" in k for ks in i75.values() for k in ks)
    assert all(", false, true, 1, " in k for k in i75["fa2_tc.cu"])  # only the K8 (sm75) forward: TUNED=false, K8=true
    assert len(i90["fa2_tc.cu"]) == 2 * 5 * 2 * 2 + 5 * 2  # fp16/bf16 x d x causal x (tc, tuned) + sm75
    assert len(i90["fa2_bwd_tc.cu"]) == 2 * 5 * 2  # fp16/bf16 x d x causal
    assert len(i90["fa2_wgmma.cu"]) == 2 * 2 * 2 and "fa2_wgmma.cu" not in ck.instances(80)  # fp16/bf16 x d x causal
    assert len(i90["fa3_forward.cu"]) == 2 * len(ck.FA3_HEAD_DIMS) * 2  # default tiles: fp16/bf16 x d x causal
    assert "fa3_forward.cu" not in ck.instances(80)
    assert len(i90["fa3_backward.cu"]) == 2 * 3 * 2 and "fa3_backward.cu" not in ck.instances(80)  # d = 64, 128, 256


# ------------------------------------------------------------------ nvcc / ptxas, no GPU

# every instance for the archs we run on (sm_90) or most users have (sm_75 T4, sm_80 A100); the fp16 Tensor Core
# kernels for sm_86 / sm_89 (bf16 is the same code), to keep the whole check to a couple of minutes on 2 cores
ARCHS = (75, 80, 86, 89, 90)
CHUNK = 12   # instances a nvcc run (about 5 s): jobs short enough to share out over the cores


def _compile_jobs():
    """Job specs (tests/jobs.py): (cc, file, instances) chunks, each compiled by nvcc with ptxas -v."""
    if NVCC is None:
        return []
    specs = []
    for cc in ARCHS:
        for f, names in ck.instances(cc).items():
            if f in ("fa3_forward.cu", "fa3_backward.cu"):  # tests/test_fa3_compile.py, test_bwd_wgmma_compile.py
                continue
            if cc in (86, 89):
                if f not in ("fa2_tc.cu", "fa2_bwd_tc.cu"):
                    continue
                names = [n for n in names if "__half" in n]
            arch = ck.ARCH.get(f, f"sm_{cc}")  # wgmma exists only in sm_90a code
            for i in range(0, len(names), CHUNK):
                g = names[i:i + CHUNK]
                specs.append(((cc, f, *g), lambda a=arch, f=f, g=g: nvcc(a, f, g), len(g) / 2))
    return specs


BACKGROUND = {"test_every_kernel_compiles_without_spills": _compile_jobs}   # compiled beside the other tests


@pytest.fixture(scope="module")
def compiled():
    specs = _compile_jobs()
    if not specs:
        pytest.skip("nvcc not found on PATH")
    return [(key, *res) for (key, _, _), res in zip(specs, jobs.results(specs))]


def test_every_kernel_compiles_without_spills(compiled):
    lines, failures = [], []
    for (cc, f, *names), rc, log in compiled:
        if rc != 0:
            failures.append(f"sm_{cc} {f}: nvcc failed\n{log[-3000:]}")
            continue
        info = parse_ptxas(log)
        assert len(info) >= len(names), f"sm_{cc} {f}: {len(info)} kernels in the cubin, {len(names)} asked for"
        for name, (regs, spill) in info.items():
            if spill:  # the Tensor Core kernels must not spill; the CUDA-core ones do not either
                failures.append(f"sm_{cc} {f}: {name} spills {spill} bytes to local memory ({regs} registers)")
            lines.append(f"sm_{cc} {regs:4d} regs {spill:4d} B spill  {name}")
    print("\n".join(sorted(lines)))  # the register report (pytest -s shows it)
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------ GPU correctness

SHAPES = [  # (B, H, Nq, Nk, d, causal)
    (1, 1, 1, 1, 64, False), (2, 3, 77, 131, 32, True), (1, 2, 200, 65, 64, False), (1, 2, 200, 65, 64, True),
    (1, 1, 129, 257, 96, True), (2, 1, 255, 255, 128, True), (1, 2, 64, 300, 128, False), (1, 1, 300, 17, 96, False),
    (1, 2, 333, 333, 32, False),
]
ATOL = {"float16": 1e-4, "bfloat16": 5e-4}


@pytest.fixture
def poisoned():
    """Every CuPy allocation in the test starts as 0xFF bytes: NaN in float32/float16/bfloat16."""
    import cupy as cp
    pool = cp.get_default_memory_pool()

    def alloc(size):
        mem = pool.malloc(size)
        mem.memset_async(0xFF, size)
        return mem

    cp.cuda.set_allocator(alloc)
    yield
    cp.cuda.Device().synchronize()
    cp.cuda.set_allocator(pool.malloc)


def _torch_inputs(shape, dtype, seed):
    import torch
    B, H, Nq, Nk, d, _ = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda n: torch.randn(B, H, n, d, device="cuda", generator=g).to(getattr(torch, dtype))
    return mk(Nq), mk(Nk), mk(Nk), mk(Nq)


def _naive(q, k, v, causal, scale):
    """Attention in q's precision with PyTorch ops (matmul, softmax, matmul): the error yardstick."""
    import torch
    S = (q @ k.transpose(-1, -2)) * scale
    if causal:
        mask = torch.ones(S.shape[-2:], dtype=torch.bool, device=q.device).tril()
        S = S.masked_fill(~mask, float("-inf"))
    return torch.softmax(S, dim=-1) @ v


def _f64(t):
    return t.detach().double().cpu().numpy()


def _err(a, b):
    return float(np.abs(_f64(a) - b).max())


def _backend_call(fn, arrays, dtype, causal, scale, **kw):
    """Call ck.forward/backward on CuPy views of torch tensors (bf16 as int16 bits), results back as torch."""
    from flashlib._arrays import like, to_cupy
    outs = fn(*[to_cupy(a) for a in arrays], causal=causal, scale=scale, dtype=dtype, **kw)
    return [like(y, arrays[0], dtype if len(y.shape) == 4 else "float32") for y in outs]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype,rung", [("float16", "tc"), ("bfloat16", "tc"), ("float16", "tuned"),
                                        ("bfloat16", "tuned"), ("float16", "sm75"), ("float16", "fp32"),
                                        ("float16", "wgmma"), ("bfloat16", "wgmma"), ("float16", "fa3"),
                                        ("bfloat16", "fa3")])
def test_forward_matches_reference(shape, dtype, rung, poisoned):
    causal, d = shape[5], shape[4]
    scale = 1 / np.sqrt(d)
    if rung in ("wgmma", "fa3") and ck.device_cc() != 90:
        pytest.skip(f"the {rung} rung runs on Hopper (compute capability 9.0) only")
    if rung in ("wgmma", "fa3") and d not in {"wgmma": ck.WGMMA_HEAD_DIMS, "fa3": ck.FA3_HEAD_DIMS}[rung]:
        with pytest.raises(ValueError, match="head_dim"):
            ck.choose_config(dtype, d, 90, causal, rung)
        return
    q, k, v, _ = _torch_inputs(shape, dtype, seed=zlib.crc32(repr((shape, dtype)).encode()))
    o, lse = _backend_call(ck.forward, (q, k, v), dtype, causal, scale, rung=rung)
    o_ref, lse_ref = reference.attention_forward(_f64(q), _f64(k), _f64(v), causal, scale)
    bound = 2 * _err(_naive(q, k, v, causal, scale), o_ref) + ATOL[dtype]
    assert o.dtype == q.dtype and o.shape == q.shape
    assert _err(o, o_ref) <= bound, (_err(o, o_ref), bound)
    assert _err(lse, lse_ref) <= 2e-3


# every tile the tuned rung can choose (TUNED_TILES on an H100, FALLBACK_TILES on GPUs with less shared memory)
TILE_CHOICES = sorted({(d, tuple(t)) for d in ck.HEAD_DIMS for t in ck.TUNED_TILES[d] + ck.FALLBACK_TILES[d]})


def _check_tiles(rung, d, tiles, dtype, shapes):
    """The forward of `rung` with `tiles` against float64 on ragged (Nq, Nk, causal) shapes, FlashAttention's rule."""
    scale = 1 / np.sqrt(d)
    for Nq, Nk, causal in shapes:
        shape = (1 + (Nq % 2), 2 - (Nq % 2), Nq, Nk, d, causal)
        q, k, v, _ = _torch_inputs(shape, dtype, seed=zlib.crc32(repr((shape, dtype, tiles)).encode()))
        o, lse = _backend_call(ck.forward, (q, k, v), dtype, causal, scale, rung=rung, tiles=tiles)
        o_ref, lse_ref = reference.attention_forward(_f64(q), _f64(k), _f64(v), causal, scale)
        bound = 2 * _err(_naive(q, k, v, causal, scale), o_ref) + ATOL[dtype]
        assert _err(o, o_ref) <= bound, (shape, _err(o, o_ref), bound)
        assert _err(lse, lse_ref) <= 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("d,tiles", TILE_CHOICES, ids=str)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tuned_tile_choices_match_reference(d, tiles, dtype, poisoned):
    _check_tiles("tuned", d, tiles, dtype, [(300, 333, True), (129, 65, False), (200, 521, True)])


@pytest.mark.gpu
@pytest.mark.parametrize("d", ck.WGMMA_HEAD_DIMS)
@pytest.mark.parametrize("tiles", [(1, 64), (2, 64), (1, 128), (2, 128)], ids=str)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_wgmma_tiles_match_reference(d, tiles, dtype, poisoned):
    if ck.device_cc() != 90:
        pytest.skip("the wgmma rung runs on Hopper (compute capability 9.0) only")
    _check_tiles("wgmma", d, tiles, dtype, [(300, 333, True), (129, 65, False), (200, 521, True), (64, 640, False)])


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_float32(shape, poisoned):
    causal, d = shape[5], shape[4]
    q, k, v, _ = _torch_inputs(shape, "float32", seed=7)
    o, lse = _backend_call(ck.forward, (q, k, v), "float32", causal, 0.3)
    o_ref, lse_ref = reference.attention_forward(_f64(q), _f64(k), _f64(v), causal, 0.3)
    assert _err(o, o_ref) <= 1e-5 * max(1.0, np.abs(o_ref).max())
    assert _err(lse, lse_ref) <= 1e-5 * max(1.0, np.abs(lse_ref).max())


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype,rung", [("float16", "bwd_tc"), ("bfloat16", "bwd_tc"), ("float16", "bwd_fp32"),
                                        ("bfloat16", "bwd_fp32"), ("float32", "bwd_fp32")])
def test_backward_matches_reference(shape, dtype, rung, poisoned):
    import torch
    causal, d = shape[5], shape[4]
    scale = 1 / np.sqrt(d)
    q, k, v, do = _torch_inputs(shape, dtype, seed=zlib.crc32(repr((shape, dtype, 1)).encode()))
    o, lse = _backend_call(ck.forward, (q, k, v), dtype, causal, scale)
    dq, dk, dv = _backend_call(ck.backward, (q, k, v, o, lse, do), dtype, causal, scale, rung=rung)
    o64, lse64 = reference.attention_forward(_f64(q), _f64(k), _f64(v), causal, scale)
    refs = reference.attention_backward(_f64(q), _f64(k), _f64(v), o64, lse64, _f64(do), causal, scale)
    if dtype == "float32":
        for got, ref in zip((dq, dk, dv), refs):
            assert _err(got, ref) <= 1e-4 * max(1.0, np.abs(ref).max())
        return
    qn, kn, vn = (t.detach().clone().requires_grad_() for t in (q, k, v))
    _naive(qn, kn, vn, causal, scale).backward(do)
    for name, got, naive, ref in zip("qkv", (dq, dk, dv), (qn.grad, kn.grad, vn.grad), refs):
        assert got.dtype == q.dtype
        bound = 3 * _err(naive, ref) + ATOL[dtype]
        assert _err(got, ref) <= bound, (name, _err(got, ref), bound)
    assert torch.isfinite(dq).all()


BWD_TILE_VARIANTS = [  # (shape, tiles): other tilings of fa2_bwd_tc than the defaults (two key m-tiles per warp,
    # Br = 128, register chunks, 4 warps, Br = 32), ragged and causal
    ((1, 2, 200, 65, 64, True), (4, 2, 64, 32, False)), ((2, 1, 130, 257, 64, False), (4, 2, 64, 32, False)),
    ((1, 2, 300, 190, 64, True), (8, 1, 128, 64, True)), ((1, 1, 100, 333, 64, False), (8, 1, 64, 64, False)),
    ((1, 2, 255, 190, 128, True), (4, 1, 64, 32, False)), ((1, 1, 100, 333, 128, False), (8, 1, 32, 32, False)),
    ((1, 2, 255, 190, 128, True), (8, 1, 64, 64, False)), ((1, 1, 129, 70, 96, True), (4, 1, 32, 32, False)),
    # d = 256: two launches of 128 output columns; the tiles of H100/H200, A100 and sm_86/89
    ((1, 2, 255, 190, 256, True), (4, 1, 64, 32, False)), ((1, 1, 100, 333, 256, False), (4, 1, 32, 32, False)),
    ((1, 2, 97, 113, 256, True), (2, 1, 16, 16, False)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape,tiles", BWD_TILE_VARIANTS, ids=str)
def test_backward_tile_variants(shape, tiles, poisoned):
    """The tile override of the Tensor Core backward, against float64 with the FlashAttention rule."""
    import torch
    causal = shape[5]
    dtype = "float16"
    q, k, v, do = _torch_inputs(shape, dtype, seed=zlib.crc32(repr((shape, tiles)).encode()))
    o64, lse64 = reference.attention_forward(_f64(q), _f64(k), _f64(v), causal, 0.1)
    refs = reference.attention_backward(_f64(q), _f64(k), _f64(v), o64, lse64, _f64(do), causal, 0.1)
    o, lse = torch.from_numpy(o64).to(q), torch.from_numpy(lse64).float().cuda()
    dq, dk, dv = _backend_call(ck.backward, (q, k, v, o, lse, do), dtype, causal, 0.1, rung="bwd_tc", tiles=tiles)
    qn, kn, vn = (t.detach().clone().requires_grad_() for t in (q, k, v))
    _naive(qn, kn, vn, causal, 0.1).backward(do)
    for name, got, naive, ref in zip("qkv", (dq, dk, dv), (qn.grad, kn.grad, vn.grad), refs):
        bound = 3 * _err(naive, ref) + ATOL[dtype]
        assert _err(got, ref) <= bound, (name, _err(got, ref), bound)


@pytest.mark.gpu
def test_sm75_path_forced_by_env(monkeypatch, poisoned):
    monkeypatch.setenv("FLASHLIB_CUPY_RUNG", "sm75")
    shape = (1, 2, 100, 90, 64, True)
    q, k, v, _ = _torch_inputs(shape, "float16", seed=3)
    calls = []
    real = ck.build.compile_kernel
    monkeypatch.setattr(ck.build, "compile_kernel", lambda f, n, s=0, arch=None: calls.append(n) or real(f, n, s, arch))
    ck.forward_plan.cache_clear()                      # a plan or a module loaded earlier would skip the compile step
    ck._kernel_on.cache_clear()
    try:
        o, _ = _backend_call(ck.forward, (q, k, v), "float16", True, 0.125)
    finally:
        ck.forward_plan.cache_clear()                  # the environment is read when a plan is built: drop this one
    assert calls and calls[0] == ck.choose_config("float16", 64, 75, True).kernel
    o_ref, _ = reference.attention_forward(_f64(q), _f64(k), _f64(v), True, 0.125)
    assert _err(o, o_ref) <= 2 * _err(_naive(q, k, v, True, 0.125), o_ref) + 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_api_with_torch_and_cupy(dtype, poisoned):
    import cupy as cp
    import torch
    shape = (2, 2, 97, 113, 64, True)
    q, k, v, do = _torch_inputs(shape, dtype, seed=11)
    o_ref, lse_ref = reference.attention_forward(_f64(q), _f64(k), _f64(v), True, 0.125)
    bound = 2 * _err(_naive(q, k, v, True, 0.125), o_ref) + ATOL[dtype]
    o, lse = flashlib.attention(q, k, v, causal=True, scale=0.125, backend="cupy", return_lse=True)
    assert isinstance(o, torch.Tensor) and o.dtype == q.dtype and o.is_cuda
    assert _err(o, o_ref) <= bound
    dq, dk, dv = flashlib.attention_backward(q, k, v, o, lse, do, causal=True, scale=0.125, backend="cupy")
    assert isinstance(dq, torch.Tensor) and dq.dtype == q.dtype
    if dtype == "float16":  # CuPy arrays in, CuPy arrays out, zero-copy
        qc, kc, vc = (cp.from_dlpack(t) for t in (q, k, v))
        oc = flashlib.attention(qc, kc, vc, causal=True, scale=0.125, backend="cupy")
        assert isinstance(oc, cp.ndarray) and oc.dtype == cp.float16
        assert _err(torch.from_dlpack(oc), o_ref) <= bound
        # a non-contiguous view (a transpose of (B, N, H, d) storage) gives the same result
        qt = q.transpose(1, 2).contiguous().transpose(1, 2)
        assert not qt.is_contiguous()
        assert torch.equal(flashlib.attention(qt, k, v, causal=True, scale=0.125, backend="cupy"), o)


# ------------------------------------------------------------------ GPU: grouped-query attention, any head dim,
# B*H beyond grid.y, rows that see no key

def _gqa_inputs(B, H, Hkv, Nq, Nk, d, dtype, seed):
    import torch
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda h, n: torch.randn(B, h, n, d, device="cuda", generator=g).to(getattr(torch, dtype))
    return mk(H, Nq), mk(Hkv, Nk), mk(Hkv, Nk), mk(H, Nq)


def _gqa_reference(q, k, v, do, causal, scale):
    """float64 forward and gradients with k, v repeated to H heads (query head h uses kv head h // G), dK, dV summed
    over the G query heads of each kv head."""
    B, H, Hkv, Nk, d = q.shape[0], q.shape[1], k.shape[1], k.shape[2], k.shape[3]
    G = H // Hkv
    k64, v64 = (np.repeat(_f64(t), G, axis=1) for t in (k, v))
    o, lse = reference.attention_forward(_f64(q), k64, v64, causal, scale)
    dq, dk, dv = reference.attention_backward(_f64(q), k64, v64, o, lse, _f64(do), causal, scale)
    return o, lse, dq, dk.reshape(B, Hkv, G, Nk, d).sum(2), dv.reshape(B, Hkv, G, Nk, d).sum(2)


def _gqa_naive(q, k, v, do, causal, scale):
    """The error yardstick in q's precision (PyTorch), k and v repeated; their gradients summed back by autograd."""
    G = q.shape[1] // k.shape[1]
    qn, kn, vn = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if q.dtype.is_floating_point and q.element_size() == 4:
        return None
    o = _naive(qn, kn.repeat_interleave(G, 1), vn.repeat_interleave(G, 1), causal, scale)
    o.backward(do)
    return o.detach(), qn.grad, kn.grad, vn.grad


def _check_gqa(B, H, Hkv, Nq, Nk, d, causal, dtype, fwd_rung=None, bwd_rung=None, backward=True, bwd_tiles=None):
    """ck.forward (and ck.backward, with bwd_tiles as its tiles) against float64 with the FlashAttention rule
    (float32: a fixed relative bound)."""
    scale = 1 / np.sqrt(d)
    q, k, v, do = _gqa_inputs(B, H, Hkv, Nq, Nk, d, dtype, zlib.crc32(repr((B, H, Hkv, Nq, Nk, d, causal, dtype)).encode()))
    o, lse = _backend_call(ck.forward, (q, k, v), dtype, causal, scale, rung=fwd_rung)
    ref = _gqa_reference(q, k, v, do, causal, scale)
    naive = _gqa_naive(q, k, v, do, causal, scale)
    assert o.shape == q.shape and o.dtype == q.dtype and lse.shape == q.shape[:3]
    where = (B, H, Hkv, Nq, Nk, d, causal, dtype, fwd_rung, bwd_rung)
    bound = (lambda i: 1e-5 * max(1.0, np.abs(ref[i]).max())) if naive is None else \
        (lambda i: (2 if i == 0 else 3) * _err(naive[i if i == 0 else i - 1], ref[i]) + ATOL[dtype])
    assert _err(o, ref[0]) <= bound(0), (where, _err(o, ref[0]), bound(0))
    assert _err(lse, ref[1]) <= 2e-3, where
    if not backward:
        return
    grads = _backend_call(ck.backward, (q, k, v, o, lse, do), dtype, causal, scale, rung=bwd_rung, tiles=bwd_tiles)
    for i, (name, got) in enumerate(zip(("dq", "dk", "dv"), grads), start=2):
        assert got.shape == (q, k, v)[i - 2].shape and got.dtype == q.dtype, (where, name)
        b = 1e-4 * max(1.0, np.abs(ref[i]).max()) if naive is None else bound(i)
        assert _err(got, ref[i]) <= b, (where, name, _err(got, ref[i]), b)


GQA_SHAPES = [(1, 4, 2, 97, 113, 64, True), (2, 6, 1, 33, 1023, 128, False), (1, 8, 2, 200, 65, 96, True),
              (1, 4, 1, 113, 97, 32, False), (1, 2, 1, 130, 130, 40, True)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GQA_SHAPES, ids=str)
@pytest.mark.parametrize("dtype,fwd,bwd", [("float16", "tuned", "bwd_tc"), ("bfloat16", "tc", "bwd_tc"),
                                           ("float16", "sm75", "bwd_fp32"), ("bfloat16", "wgmma", "bwd_fp32"),
                                           ("float16", "fa3", "bwd_tc"), ("float32", "fp32", "bwd_fp32")])
def test_grouped_query_attention(shape, dtype, fwd, bwd, poisoned):
    dims = {"wgmma": ck.WGMMA_HEAD_DIMS, "fa3": ck.FA3_HEAD_DIMS}
    if fwd in dims and (ck.device_cc() != 90 or ck.head_bucket(shape[5]) not in dims[fwd]):
        fwd = None  # the default rung for this head dim and GPU
    _check_gqa(*shape, dtype, fwd, bwd)


HEAD_DIM_SHAPES = [(1, 1, False), (3, 97, True), (113, 1023, False), (1023, 113, True)]  # (Nq, Nk, causal)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [1, 3, 32, 40, 59, 64, 80, 96, 111, 128, 256])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_any_head_dim_forward_and_gradients(d, dtype, poisoned):
    """FlashAttention's test-suite head dims and odd ones, Nq != Nk, lengths 1, 3, 97, 113, 1023: the default rungs
    (and, fp16, the T4 path and rung 2 forward, the CUDA-core backward)."""
    for i, (Nq, Nk, causal) in enumerate(HEAD_DIM_SHAPES):
        H, Hkv = (2, 1) if i % 2 else (1, 1)
        _check_gqa(1, H, Hkv, Nq, Nk, d, causal, dtype)
        if dtype == "float16" and Nq * Nk < 200000:
            _check_gqa(1, H, Hkv, Nq, Nk, d, causal, dtype, "sm75", "bwd_fp32")
            _check_gqa(1, H, Hkv, Nq, Nk, d, causal, dtype, "tc", backward=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,fwd,bwd", [("float16", "tuned", "bwd_tc"), ("float16", "sm75", "bwd_fp32"),
                                           ("bfloat16", "wgmma", "bwd_tc"), ("float32", "fp32", "bwd_fp32"),
                                           ("float16", "tc", None), ("float16", "fa3", None)])
def test_batch_heads_beyond_grid_y(dtype, fwd, bwd, poisoned):
    """B*H = 70000 (batch, head) pairs: more than grid.y's 65535; every pair computed (NaN-poisoned outputs)."""
    if fwd in ("wgmma", "fa3") and ck.device_cc() != 90:
        fwd = None
    _check_gqa(17500, 4, 2, 3, 5, 64, True, dtype, fwd, bwd)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,fwd,bwd", [("float16", "tuned", "bwd_tc"), ("float16", "sm75", "bwd_fp32"),
                                           ("bfloat16", "tc", "bwd_tc"), ("float16", "wgmma", "bwd_tc"),
                                           ("bfloat16", "fa3", "bwd_tc"), ("float32", "fp32", "bwd_fp32")])
def test_rows_that_see_no_key(dtype, fwd, bwd, poisoned):
    """The -inf rule: Nk = 0 gives O = 0, lse = -inf, dQ = 0; a row given lse = -inf adds nothing to dQ, dK, dV."""
    import torch
    if fwd in ("wgmma", "fa3") and ck.device_cc() != 90:
        fwd = None
    q, k, v, do = _gqa_inputs(1, 4, 2, 37, 0, 64, dtype, 5)
    o, lse = _backend_call(ck.forward, (q, k, v), dtype, False, 0.125, rung=fwd)
    assert (o == 0).all() and torch.isneginf(lse).all()
    dq, dk, dv = _backend_call(ck.backward, (q, k, v, o, lse, do), dtype, False, 0.125, rung=bwd)
    assert (dq == 0).all() and dk.shape == k.shape and dv.shape == v.shape
    q, k, v, do = _gqa_inputs(1, 4, 2, 37, 41, 64, dtype, 6)
    o, lse = _backend_call(ck.forward, (q, k, v), dtype, True, 0.125, rung=fwd)
    o[:, :, 5], lse[:, :, 5] = 0, float("-inf")  # row 5 as if it saw no key
    dq, dk, dv = _backend_call(ck.backward, (q, k, v, o, lse, do), dtype, True, 0.125, rung=bwd)
    do0 = do.clone()
    do0[:, :, 5] = 0  # the reference without row 5's contribution
    _, _, dq_ref, dk_ref, dv_ref = _gqa_reference(q, k, v, do0, True, 0.125)
    assert (dq[:, :, 5] == 0).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    tol = {"float16": 1e-2, "bfloat16": 3e-2, "float32": 1e-4}[dtype]
    for got, ref in ((dq, dq_ref), (dk, dk_ref), (dv, dv_ref)):
        assert _err(got, ref) <= tol * max(1.0, np.abs(ref).max())
    q, k, v, do = _gqa_inputs(1, 4, 2, 0, 9, 64, dtype, 7)  # no query: dK = dV = 0
    o, lse = _backend_call(ck.forward, (q, k, v), dtype, False, 0.125, rung=fwd)
    dq, dk, dv = _backend_call(ck.backward, (q, k, v, o, lse, do), dtype, False, 0.125, rung=bwd)
    assert o.shape == q.shape and (dk == 0).all() and (dv == 0).all()


def _on_a_fresh_thread(work):
    """(work()'s result, the current CUDA context before and after it) on a new thread, where no CUDA call has been
    made yet; an exception in work is raised here, in the test's thread."""
    import threading
    from cupy_backends.cuda.api import driver
    seen = {}

    def run():
        try:
            seen["before"] = driver.ctxGetCurrent()
            seen["result"] = work()
            seen["after"] = driver.ctxGetCurrent()
        except Exception as e:  # noqa: BLE001 (re-raised below)
            seen["error"] = e
    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in seen:
        raise seen["error"]
    return seen["result"], seen["before"], seen["after"]


@pytest.mark.gpu
def test_kernels_loaded_on_a_thread_without_a_cuda_context_launch_anywhere(poisoned):
    """A kernel first asked for on a thread that has made no CUDA call (a pool compiling instances up front, as
    tests/test_bwd_wgmma_gpu.py does) when its module is already loaded: its Launcher must still record the primary
    context, not NULL (NULL failed the next launch with CUDA_ERROR_INVALID_CONTEXT), and the thread gets its own
    (none) back."""
    import torch
    from cupy_backends.cuda.api import driver
    from flashlib.cupy_kernels import build, launch
    q, k, v, do = _gqa_inputs(1, 4, 2, 70, 53, 64, "float16", 11)
    o, lse = ck.forward(q, k, v, causal=True, scale=0.125, dtype="float16")        # modules loaded here
    grads = ck.backward(q, k, v, o, lse, do, causal=True, scale=0.125, dtype="float16")
    torch.cuda.synchronize()
    for f in (build._kernel_on, launch.forward_plan, launch.backward_plan):
        f.cache_clear()      # Launchers made anew, from modules that _compiled keeps loaded
    ctx, before, after = _on_a_fresh_thread(lambda: [
        f.ctx for p in (launch.forward_plan("float16", 64, True, 0), launch.backward_plan("float16", 64, True, 0))
        for f in p[2:5] if f])
    assert before == 0 == after
    assert len(ctx) == 4 and all(c == driver.ctxGetCurrent() for c in ctx), ctx
    o2, lse2 = ck.forward(q, k, v, causal=True, scale=0.125, dtype="float16")     # those Launchers, here
    grads2 = ck.backward(q, k, v, o2, lse2, do, causal=True, scale=0.125, dtype="float16")
    torch.cuda.synchronize()
    assert torch.equal(o2, o) and torch.equal(lse2, lse)
    for a, b in zip(grads2, grads):                                      # dQ by atomics: equal to rounding
        assert torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-3)


@pytest.mark.gpu
def test_a_plan_built_before_any_other_cuda_call_of_the_process():
    """A process whose first CUDA call is a kernel's compile and load, on a pool's threads (fp8_bench.py's
    precompile did this and failed with CUDA_ERROR_NOT_INITIALIZED): the driver is initialised there."""
    import subprocess
    import sys
    import torch
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("fa3_fp8 (the kernel built here) is Hopper's")
    code = ("import concurrent.futures as f; from flashlib.cupy_kernels import fp8, fp8_tiles\n"
            "with f.ThreadPoolExecutor(2) as ex:\n"
            "    print(all(ex.map(lambda c: fp8._launcher(0, fp8_tiles.fp8_config(64, c)), (False, True))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-2000:]


@pytest.mark.gpu
def test_launch_from_a_thread_without_a_cuda_context(poisoned):
    """PyTorch runs backward passes on threads of its own, where no CUDA context need be current (a launch there
    failed with CUDA_ERROR_INVALID_CONTEXT): each launch runs in the context its kernel was loaded in."""
    import torch
    q, k, v, do = _gqa_inputs(1, 4, 2, 70, 53, 64, "float16", 9)
    o, lse = ck.forward(q, k, v, causal=True, scale=0.125, dtype="float16")        # kernels loaded here
    grads = ck.backward(q, k, v, o, lse, do, causal=True, scale=0.125, dtype="float16")
    torch.cuda.synchronize()
    (out, grads2), before, after = _on_a_fresh_thread(lambda: (
        ck.forward(q, k, v, causal=True, scale=0.125, dtype="float16"),
        ck.backward(q, k, v, o, lse, do, causal=True, scale=0.125, dtype="float16")))
    assert before == 0 == after                                          # the thread's own (none) given back
    torch.cuda.synchronize()
    assert torch.equal(out[0], o) and torch.equal(out[1], lse)
    for a, b in zip(grads2, grads):                                      # dQ by atomics: equal to rounding
        assert torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-3)
