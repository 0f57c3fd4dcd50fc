"""Rung 7 (fa3_forward.cu) without a GPU: host logic, and a sample of its instances (fa3_sample: every one the
library launches, every other tile and every other variant) compiled by nvcc/ptxas for sm_90a with no register
spills and no stack frame (skipped where nvcc is missing)."""
import pytest

from flashlib import cupy_kernels as ck
from flashlib.cupy_kernels import timeline, tma
from tests.compile_jobs import NVCC, check_sm90a, sm90a_jobs


def test_fa3_config():
    cfg = tma.fa3_config("bfloat16", 128, True, variant="plain")   # with the mask: 3 stages of Bc = 128
    assert cfg.kernel == "fa3_forward<__nv_bfloat16, 128, 128, 3, 2, false, true>"
    assert (cfg.Br, cfg.Bc, cfg.stages, cfg.threads) == (128, 128, 3, 384)
    assert cfg.smem == 1024 + 2 * 128 * (128 + 6 * 128) + 8 * 14 <= ck.SMEM_LIMIT[90]
    cfg = tma.fa3_config("float16", 128, False, variant="pingpong")   # without: FlashAttention-3's 128 x 176
    assert cfg.kernel == "fa3_forward<__half, 128, 176, 2, 2, true, false>" and (cfg.Br, cfg.Bc) == (128, 176)
    assert cfg.smem == 1024 + 2 * 128 * (128 + 4 * 176) + 8 * 10 <= ck.SMEM_LIMIT[90]
    assert tma.fa3_config("float16", 64, False).kernel == "fa3_forward<__half, 64, 128, 2, 3, true, false>"  # default
    cfg = tma.fa3_config("float16", 64, False, tiles=(64, 4, 3), variant="pingpong")
    assert cfg.kernel == "fa3_forward<__half, 64, 64, 4, 3, true, false>" and (cfg.Br, cfg.threads) == (192, 512)
    assert cfg.smem == tma.smem_fa3(64, 64, 4, 3) == 1024 + 2 * 64 * (192 + 8 * 64) + 8 * 18
    cfg = tma.fa3_config("float16", 256, True, variant="pingpong")   # FlashAttention-3's d = 256 tile: Br 128, Bc 80
    assert cfg.kernel == "fa3_forward<__half, 256, 80, 2, 2, true, true>" and (cfg.Br, cfg.Bc) == (128, 80)
    assert cfg.smem == 1024 + 2 * 256 * (128 + 4 * 80) + 8 * 10 <= ck.SMEM_LIMIT[90] and not cfg.persistent
    cfg = tma.fa3_config("bfloat16", 64, True, variant="persistent")   # ping-pong + the persistent grid
    assert cfg.kernel == "fa3_forward<__nv_bfloat16, 64, 128, 2, 3, true, true, true>" and cfg.persistent
    assert tma.fa3_grid(cfg, 1000, 7, 132) == (-(-1000 // 192) * 7, 1, 1) == (42, 1, 1)
    assert tma.fa3_grid(cfg, 16384, 16, 132) == (132, 1, 1)
    assert tma.fa3_grid(tma.fa3_config("float16", 64, True, variant="pingpong"), 1000, 7, 132) == (6, 7, 1)
    cfg = tma.fa3_config("float16", 128, True, variant="dynamic")   # the same grid, items from a global counter
    assert cfg.kernel == "fa3_forward<__half, 128, 128, 3, 2, true, true, true, true>" and cfg.persistent and cfg.dynamic
    assert cfg.smem == tma.fa3_config("float16", 128, True, variant="persistent").smem + 8   # the handed-over item
    assert tma.fa3_grid(cfg, 16384, 16, 132) == (132, 1, 1)
    with pytest.raises(ValueError, match="variant"):
        tma.fa3_config("float16", 64, True, variant="pingpong-persistent")
    with pytest.raises(ValueError, match="shared memory"):
        tma.fa3_config("float16", 256, False, tiles=(128, 2))
    # rung 7 is the default only where the GPU checked it (FA3_DEFAULT_HEAD_DIMS), elsewhere on request
    assert ck.choose_config("float16", 64, 90, rung="fa3").kernel == "fa3_forward<__half, 64, 128, 2, 3, true, false>"
    # the default variant: "dynamic" at FA3_DYNAMIC's (d, causal) (tests/test_tuning_records.py), else ping-pong
    for d in tma.FA3_HEAD_DIMS:
        for causal in (False, True):
            want = "dynamic" if (d, causal) in ck.config_hopper.FA3_DYNAMIC else "pingpong"
            assert tma.fa3_config("bfloat16", d, causal) == tma.fa3_config("bfloat16", d, causal, variant=want)
            assert ck.choose_config("float16", d, 90, causal).fa3 == tma.fa3_config("float16", d, causal, variant=want)
    for d in (64, 128, 256):
        assert (ck.choose_config("float16", d, 90).rung == "fa3") == (d in ck.FA3_DEFAULT_HEAD_DIMS)
    for d in tma.FA3_HEAD_DIMS:
        assert tma.fa3_config("float16", d, False).smem <= ck.SMEM_LIMIT[90]
    with pytest.raises(ValueError, match="consumer warpgroups"):
        tma.fa3_config("float16", 128, False, tiles=(128, 2, 3))
    with pytest.raises(ValueError, match="head_dim"):
        tma.fa3_config("float16", 96, False)
    with pytest.raises(ValueError, match="Bc in"):
        tma.fa3_config("float16", 256, False, tiles=(96, 2))
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        tma.fa3_config("float32", 64, False)
    with pytest.raises(ValueError, match="shared memory"):
        tma.fa3_config("float16", 128, False, tiles=(128, 4))
    n_other = sum(len(tma.fa3_candidates(d, c)) - 1 for d in tma.FA3_HEAD_DIMS for c in (False, True))
    n_dims, n_var = len(tma.FA3_HEAD_DIMS), len(tma.FA3_VARIANTS)
    every = tma.fa3_instances()
    assert len(set(every)) == len(every) == (2 * n_dims * 2 + n_other) * n_var  # (dtype x d x causal + other) x variant
    assert tma.fa3_config("float16", 128, False).Bc == 176 and tma.fa3_config("float16", 128, True).stages == 3


def test_fa3_narrow_last_tile():
    # the last of ceil(Nk / Bc) tiles' keys rounded up to 16; none where they fill it or there is one tile
    assert [tma.fa3_narrow_width(n, 176) for n in (4096, 8192, 16384, 1024, 176, 352, 100, 177)] == \
        [48, 96, 16, 144, 0, 0, 0, 16]
    assert [tma.fa3_narrow_width(n, 80) for n in (4096, 16384, 4000, 161)] == [16, 64, 0, 16]
    cfg = tma.fa3_config("float16", 128, False, variant="dynamic", Nk=4096, narrow=True)
    assert cfg.kernel == "fa3_forward<__half, 128, 176, 2, 2, true, false, true, true, 48>" and cfg.narrow == 48
    assert tma.fa3_config("float16", 128, False, variant="persistent", Nk=4096, narrow=True).kernel == \
        "fa3_forward<__half, 128, 176, 2, 2, true, false, true, false, 48>"
    cfg = tma.fa3_config("bfloat16", 256, False, variant="dynamic", Nk=1000, narrow=True)   # 1000 = 12 x 80 + 40
    assert cfg.kernel == "fa3_forward<__nv_bfloat16, 256, 80, 2, 2, true, false, true, true, 48>"
    for v in ("plain", "pingpong"):   # not in the grid of one item a CTA
        assert tma.fa3_config("float16", 128, False, variant=v, Nk=4096, narrow=True).narrow == 0
    base = tma.fa3_config("float16", 128, False, narrow=True)
    assert tma.fa3_config("float16", 128, False, Nk=4096 - 48, narrow=True) == base   # 23 full tiles
    assert tma.fa3_config("float16", 128, False, Nk=4096) == base._replace(narrowable=False)
    assert tma.fa3_narrowed(tma.fa3_narrowed(base, 4096), 1000).narrow == 48   # narrowed once
    for d in tma.FA3_HEAD_DIMS:   # never with the mask, only on request
        assert tma.fa3_config("float16", d, True, Nk=1000, narrow=True).narrow == 0
        assert tma.fa3_config("float16", d, False, variant="dynamic", Nk=1000).narrow == 0
    cfg = tma.fa3_config("float16", 64, False, variant="persistent", Nk=1000, narrow=True)
    assert cfg.narrow == 112   # 1000 = 7 x 128 + 104


@pytest.fixture
def fake_counters(monkeypatch):
    """tma.counter with a fake slab allocator (addresses 0x10000, 0x20000, ... a slab, recorded) and a switch for
    whether the stream captures a CUDA graph."""
    slabs, capturing = [], set()
    monkeypatch.setattr(tma, "_slabs", {})
    monkeypatch.setattr(tma, "_counters", {})
    monkeypatch.setattr(tma, "_new_slab", lambda device: slabs.append(device) or (None, 0x10000 * len(slabs)))
    monkeypatch.setattr(tma, "_capturing", lambda ctx, stream: stream in capturing)
    return slabs, capturing


def test_one_counter_per_device_and_stream_and_one_per_captured_launch(fake_counters):
    slabs, capturing = fake_counters
    a, b = tma.counter(0, 0xA, 1), tma.counter(0, 0xB, 1)
    assert tma.counter(0, 0xA, 1) == a == 0x10000 and b == a + 4 and slabs == [0]   # one zeroed slab per device
    c = tma.counter(1, 0xA, 2)
    assert c == 0x20000 and slabs == [0, 1]
    capturing.add(0xA)        # in a capture: a counter of its own per launch, the stream's own left for eager calls
    got = [tma.counter(0, 0xA, 1) for _ in range(3)]
    assert got == [a + 8, a + 12, a + 16]
    capturing.clear()
    assert tma.counter(0, 0xA, 1) == a and tma.counter(0, 0xB, 1) == b and tma.counter(0, 0xC, 1) == a + 20


def test_counters_come_from_slabs_allocated_outside_captures(fake_counters, monkeypatch):
    slabs, capturing = fake_counters
    capturing.add(0xA)
    with pytest.raises(RuntimeError, match="allocated outside CUDA graph captures"):   # the first call inside a capture
        tma.counter(0, 0xA, 1)
    assert slabs == []
    monkeypatch.setattr(tma, "SLAB", 2)
    capturing.clear()
    assert [tma.counter(0, s, 1) for s in (1, 2, 3)] == [0x10000, 0x10004, 0x20000]   # a used-up slab: a new one
    capturing.add(4)
    assert tma.counter(0, 4, 1) == 0x20004
    with pytest.raises(RuntimeError, match="allocated outside CUDA graph captures"):
        tma.counter(0, 4, 1)
    assert slabs == [0, 0]


# the timeline's debug build (fa3_timeline.cu): the cases the book draws and tests/test_fa3_gpu.py's
TIMELINE_INSTANCES = sorted({tma.fa3_config("float16", 128, c["causal"], variant=c["variant"]).kernel
                             for c in timeline.BOOK_CASES + tuple(dict(variant=v, causal=True)
                                                                  for v in ("pingpong", "persistent"))})


def fa3_sample():
    """The rung 7 instances compiled (of fa3_instances' full product): every one the library launches (ck.instances: both
    dtypes, the default tiles and variant), and in fp16 (bf16 is the same code) every other tile at the default
    variant and every variant at the default tiles; each causal and not."""
    dims = tma.FA3_HEAD_DIMS
    tiles = [tma.fa3_config("float16", d, c, x).kernel for d in dims for c in (False, True)
             for x in tma.fa3_candidates(d, c)[1:]]
    variants = [tma.fa3_config("float16", d, c, variant=v).kernel for d in dims for v in tma.FA3_VARIANTS
                for c in (False, True)]
    return list(dict.fromkeys(ck.instances(90)["fa3_forward.cu"] + tiles + variants))


def fa3_narrow_sample():
    """Instances with a narrow last key tile (fp16, without the mask, asked for at every head dim): both persistent
    variants at Nk = 1000 and at 4001 (two widths a head dim)."""
    cfgs = [tma.fa3_config("float16", d, False, variant=v, Nk=n, narrow=True) for d in tma.FA3_HEAD_DIMS
            for v in ("persistent", "dynamic") for n in (1000, 4001)]
    assert all(c.narrow for c in cfgs)
    return list(dict.fromkeys(c.kernel for c in cfgs))


def fa3_jobs():
    return (sm90a_jobs("fa3_forward.cu", fa3_sample() + fa3_narrow_sample()) +
            sm90a_jobs("fa3_timeline.cu", TIMELINE_INSTANCES))


BACKGROUND = {"test_fa3_compiles_without_spills": fa3_jobs}   # compiled beside the other tests


def test_fa3_sample():
    sample, every = fa3_sample(), tma.fa3_instances()
    assert len(set(sample)) == len(sample) and set(sample) <= set(every)
    n_dims, n_var = len(tma.FA3_HEAD_DIMS), len(tma.FA3_VARIANTS)
    n_other = sum(len(tma.fa3_candidates(d, c)) - 1 for d in tma.FA3_HEAD_DIMS for c in (False, True))
    assert len(sample) == 2 * n_dims * 2 + n_other + n_dims * 2 * (n_var - 1)
    assert {n for n in sample if n.startswith("fa3_forward<__nv_bfloat16")} == {
        tma.fa3_config("bfloat16", d, c).kernel for d in tma.FA3_HEAD_DIMS for c in (False, True)}


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")
def test_fa3_compiles_without_spills():
    check_sm90a(fa3_jobs())


def test_tensor_map_buffer_is_aligned():
    m = tma.TensorMap()  # the driver wants the CUtensorMap 64-byte aligned
    import ctypes
    assert ctypes.addressof(m.arg) % 64 == 0 and ctypes.sizeof(m.arg) == 128
