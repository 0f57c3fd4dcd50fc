"""The Hopper backward 'bwd_wgmma' (fa3_backward.cu) without a GPU: its configuration, and its instances (bwd_sample:
every one the library launches, fp16 / bf16 x d = 64, 128, 256 x causal with dQ by TMA reductions, and in fp16 dQ by
atomics) compiled by nvcc/ptxas for sm_90a with no spills, no stack frame and no ptxas warning (e.g. a serialised
wgmma); skipped where nvcc is missing."""
import pytest

from flashlib import cupy_kernels as ck
from flashlib.cupy_kernels.config_hopper import BWD_WGMMA_DQ
from tests.compile_jobs import NVCC, check_sm90a, sm90a_jobs


def test_bwd_wgmma_config():
    cfg = ck.choose_config("bfloat16", 128, 90, causal=True, rung="bwd_wgmma")
    assert cfg.kernel == "fa3_backward<__nv_bfloat16, 128, true, true>" and cfg.file == "fa3_backward.cu"
    assert (cfg.Br, cfg.Bc, cfg.warps, cfg.arch) == (64, 128, 12, "sm_90a")
    # K, V (128 rows), 2 x (Q, dO) (64 rows), 2 dS^T buffers, 2 dQ staging tiles (64 x 64 fp32), 2 x (Lb, delta),
    # 5 mbarriers, 1 KB alignment slack
    assert cfg.smem == 1024 + 2 * 128 * (2 * 128 + 4 * 64) + 2 * 2 * 128 * 64 + 2 * 64 * 64 * 4 + 4 * 4 * 64 + 40
    assert cfg.smem <= ck.SMEM_LIMIT[90]
    assert ck.choose_config("float16", 64, 90, rung="bwd_wgmma").kernel == "fa3_backward<__half, 64, false, true>"
    assert ck.choose_config("float16", 64, 90, rung="bwd_wgmma", tiles=("atomic",)).kernel == \
        "fa3_backward<__half, 64, false, false>"
    assert ck.choose_config("float16", 50, 90, rung="bwd_wgmma").D == 64   # a head dim in the 64 bucket
    assert "bwd_wgmma" in ck.BACKWARD_RUNGS and ck.ARCH["fa3_backward.cu"] == "sm_90a"
    assert len(set(ck.bwd_wgmma_instances())) == 24   # dtype x d = 64, 128, 256 x causal x dQ 'tma' / 'atomic'
    # d = 256: fa3_backward_d256, 64 keys a block; K, V, 2 x Q (64 rows), 2 x dO or ('tma') one dO buffer and 2 dQ
    # staging tiles (64 x 64 fp32), 2 buffers each of dS^T and P^T (64 x 64), 2 x (Lb, delta), 5 (7) mbarriers, 1 KB
    # alignment slack: within Hopper's 227 KB; dQ by TMA reductions unless asked
    c256 = ck.choose_config("float16", 256, 90, causal=True, rung="bwd_wgmma", tiles=("atomic",))
    assert c256.kernel == "fa3_backward_d256<__half, true, false>" and (c256.Br, c256.Bc, c256.warps) == (64, 64, 12)
    assert c256.smem == 1024 + 2 * 256 * (2 * 64 + 4 * 64) + 4 * 2 * 64 * 64 + 4 * 4 * 64 + 40 <= ck.SMEM_LIMIT[90]
    t256 = ck.choose_config("float16", 256, 90, rung="bwd_wgmma")
    assert t256.kernel == "fa3_backward_d256<__half, false, true>"
    assert t256.smem == 1024 + 2 * 256 * (2 * 64 + 3 * 64) + 4 * 2 * 64 * 64 + 2 * 64 * 64 * 4 + 4 * 4 * 64 + 56
    assert t256.smem <= ck.SMEM_LIMIT[90]
    assert ck.choose_config("bfloat16", 200, 90, rung="bwd_wgmma").kernel == \
        "fa3_backward_d256<__nv_bfloat16, false, true>"
    # the default backward on Hopper at d = 64, 128 and 256 (33 ... 256: those buckets) after the H200 runs; bwd_tc
    # elsewhere
    assert ck.default_rung("float16", 90, "backward", 128) == "bwd_wgmma" == ck.default_rung("bfloat16", 90, "backward", 100)
    assert ck.default_rung("float16", 90, "backward", 64) == "bwd_wgmma" == ck.default_rung("bfloat16", 90, "backward", 40)
    assert ck.default_rung("float16", 90, "backward", 256) == "bwd_wgmma" == ck.default_rung("bfloat16", 90, "backward", 160)
    assert ck.default_rung("float16", 80, "backward", 128) == "bwd_tc"
    assert ck.default_rung("float16", 90, "backward", 32) == "bwd_tc"
    assert ck.default_rung("float32", 90, "backward", 128) == "bwd_fp32"
    assert ck.choose_config("float16", 128, 90, rung=ck.default_rung("float16", 90, "backward", 128)).file == "fa3_backward.cu"


@pytest.mark.parametrize("args,match", [
    (("float16", 128, 80, False), "Hopper"), (("float16", 96, 90, False), "head_dim"),
    (("float16", 32, 90, True), "head_dim"), (("float32", 64, 90, False), "float16 or bfloat16")])
def test_bwd_wgmma_refuses(args, match):
    with pytest.raises(ValueError, match=match):
        ck.choose_config(*args, rung="bwd_wgmma")


def test_bwd_wgmma_refuses_unknown_dq():
    with pytest.raises(ValueError, match=r"dQ by one of \('tma', 'atomic'\), got 'red'"):
        ck.choose_config("float16", 256, 90, rung="bwd_wgmma", tiles=("red",))


def bwd_sample():
    """The instances compiled (of bwd_wgmma_instances' full product): every one the library launches (ck.instances:
    both dtypes, dQ by TMA, at d = 256 by atomics), and in fp16 (bf16 is the same code) the other dQ accumulation;
    each d, causal and not."""
    other = [ck.bwd_wgmma_config("float16", d, c, q).kernel for d in ck.BWD_WGMMA_HEAD_DIMS for c in (False, True)
             for q in BWD_WGMMA_DQ]
    return list(dict.fromkeys(ck.instances(90)["fa3_backward.cu"] + other))


def bwd_jobs():
    return sm90a_jobs("fa3_backward.cu", bwd_sample())


BACKGROUND = {"test_bwd_wgmma_compiles_without_spills": bwd_jobs}   # compiled beside the other tests


def test_bwd_sample():
    sample = bwd_sample()
    assert len(set(sample)) == len(sample) and set(sample) <= set(ck.bwd_wgmma_instances())
    assert len(sample) == 2 * 3 * 2 + 3 * 2   # dtype x d x causal at TMA; fp16 atomic
    assert all("__half" in n for n in sample if n.endswith("false>"))    # dQ by atomics: fp16 only


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")
def test_bwd_wgmma_compiles_without_spills():
    check_sm90a(bwd_jobs())
