"""Rung 7 (fa3_forward.cu) without a GPU: host logic, and a sample of its instances (fa3_sample: every one the
library launches, every other tile and every other variant) compiled by nvcc/ptxas for sm_90a with no register
spills and no stack frame (skipped where nvcc is missing)."""
import pytest

from flashlib import cupy_kernels as ck
from flashlib.cupy_kernels import timeline, tma
from tests.compile_jobs import NVCC, check_sm90a, sm90a_jobs


def test_fa3_config():
    cfg = tma.fa3_config("bfloat16", 128, True, variant="plain")
    assert cfg.kernel == "fa3_forward<__nv_bfloat16, 128, 128, 2, 2, false, true>"
    assert (cfg.Br, cfg.Bc, cfg.stages, cfg.threads) == (128, 128, 2, 384)
    assert cfg.smem == 1024 + 2 * 128 * (128 + 4 * 128) + 8 * 10 <= ck.SMEM_LIMIT[90]
    assert tma.fa3_config("float16", 64, False).kernel == "fa3_forward<__half, 64, 128, 2, 3, true, false>"  # default
    cfg = tma.fa3_config("float16", 64, False, tiles=(64, 4, 3), variant="pingpong")
    assert cfg.kernel == "fa3_forward<__half, 64, 64, 4, 3, true, false>" and (cfg.Br, cfg.threads) == (192, 512)
    assert cfg.smem == tma.smem_fa3(64, 64, 4, 3) == 1024 + 2 * 64 * (192 + 8 * 64) + 8 * 18
    cfg = tma.fa3_config("float16", 256, True)            # FlashAttention-3's d = 256 tile: Br 128, Bc 80, 2 stages
    assert cfg.kernel == "fa3_forward<__half, 256, 80, 2, 2, true, true>" and (cfg.Br, cfg.Bc) == (128, 80)
    assert cfg.smem == 1024 + 2 * 256 * (128 + 4 * 80) + 8 * 10 <= ck.SMEM_LIMIT[90] and not cfg.persistent
    cfg = tma.fa3_config("bfloat16", 64, True, variant="persistent")   # ping-pong + the persistent grid
    assert cfg.kernel == "fa3_forward<__nv_bfloat16, 64, 128, 2, 3, true, true, true>" and cfg.persistent
    assert tma.fa3_grid(cfg, 1000, 7, 132) == (-(-1000 // 192) * 7, 1, 1) == (42, 1, 1)
    assert tma.fa3_grid(cfg, 16384, 16, 132) == (132, 1, 1)
    assert tma.fa3_grid(tma.fa3_config("float16", 64, True), 1000, 7, 132) == (6, 7, 1)
    cfg = tma.fa3_config("float16", 128, True, variant="dynamic")   # the same grid, items from a global counter
    assert cfg.kernel == "fa3_forward<__half, 128, 128, 2, 2, true, true, true, true>" and cfg.persistent and cfg.dynamic
    assert cfg.smem == tma.fa3_config("float16", 128, True, variant="persistent").smem + 8   # the handed-over item
    assert tma.fa3_grid(cfg, 16384, 16, 132) == (132, 1, 1)
    with pytest.raises(ValueError, match="variant"):
        tma.fa3_config("float16", 64, True, variant="pingpong-persistent")
    with pytest.raises(ValueError, match="shared memory"):
        tma.fa3_config("float16", 256, False, tiles=(128, 2))
    # rung 7 is the default only where the GPU checked it (FA3_DEFAULT_HEAD_DIMS), elsewhere on request
    assert ck.choose_config("float16", 256, 90, rung="fa3").kernel == "fa3_forward<__half, 256, 80, 2, 2, true, false>"
    for d in (64, 128, 256):
        assert (ck.choose_config("float16", d, 90).rung == "fa3") == (d in ck.FA3_DEFAULT_HEAD_DIMS)
    for d in tma.FA3_HEAD_DIMS:
        assert tma.fa3_config("float16", d, False).smem <= ck.SMEM_LIMIT[90]
    with pytest.raises(ValueError, match="consumer warpgroups"):
        tma.fa3_config("float16", 128, False, tiles=(128, 2, 3))
    with pytest.raises(ValueError, match="head_dim"):
        tma.fa3_config("float16", 96, False)
    with pytest.raises(ValueError, match="Bc 64, 80 or 128"):
        tma.fa3_config("float16", 256, False, tiles=(96, 2))
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        tma.fa3_config("float32", 64, False)
    with pytest.raises(ValueError, match="shared memory"):
        tma.fa3_config("float16", 128, False, tiles=(128, 4))
    n_other = sum(map(len, tma.FA3_OTHER_TILES.values()))
    n_dims, n_var = len(tma.FA3_HEAD_DIMS), len(tma.FA3_VARIANTS)
    assert len(set(tma.fa3_instances())) == (2 * n_dims + n_other) * 2 * n_var  # (dtype x d + other) x causal x variant


# the timeline's debug build (fa3_timeline.cu): the cases the book draws and tests/test_fa3_gpu.py's
TIMELINE_INSTANCES = sorted({tma.fa3_config("float16", 128, c["causal"], variant=c["variant"]).kernel
                             for c in timeline.BOOK_CASES + tuple(dict(variant=v, causal=True)
                                                                  for v in ("pingpong", "persistent"))})


def fa3_sample():
    """The rung 7 instances compiled (of fa3_instances' full product): every one the library launches (ck.instances: both
    dtypes, the default tiles and variant), and in fp16 (bf16 is the same code) every other tile at the default
    variant and every variant at the default tiles; each causal and not."""
    dims, other = tma.FA3_HEAD_DIMS, tma.FA3_OTHER_TILES
    tiles = [tma.fa3_config("float16", d, c, x).kernel for d in dims for x in other[d] for c in (False, True)]
    variants = [tma.fa3_config("float16", d, c, variant=v).kernel for d in dims for v in tma.FA3_VARIANTS
                for c in (False, True)]
    return list(dict.fromkeys(ck.instances(90)["fa3_forward.cu"] + tiles + variants))


def fa3_jobs():
    return sm90a_jobs("fa3_forward.cu", fa3_sample()) + sm90a_jobs("fa3_timeline.cu", TIMELINE_INSTANCES)


BACKGROUND = {"test_fa3_compiles_without_spills": fa3_jobs}   # compiled beside the other tests


def test_fa3_sample():
    sample, every = fa3_sample(), tma.fa3_instances()
    assert len(set(sample)) == len(sample) and set(sample) <= set(every)
    n_other, n_dims, n_var = sum(map(len, tma.FA3_OTHER_TILES.values())), len(tma.FA3_HEAD_DIMS), len(tma.FA3_VARIANTS)
    assert len(sample) == 2 * n_dims * 2 + n_other * 2 + n_dims * 2 * (n_var - 1)
    assert {n for n in sample if n.startswith("fa3_forward<__nv_bfloat16")} == {
        tma.fa3_config("bfloat16", d, c).kernel for d in tma.FA3_HEAD_DIMS for c in (False, True)}


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")
def test_fa3_compiles_without_spills():
    check_sm90a(fa3_jobs())


def test_tensor_map_buffer_is_aligned():
    m = tma.TensorMap()  # the driver wants the CUtensorMap 64-byte aligned
    import ctypes
    assert ctypes.addressof(m.arg) % 64 == 0 and ctypes.sizeof(m.arg) == 128
