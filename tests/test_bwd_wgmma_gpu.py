"""The Hopper backward 'bwd_wgmma' (fa3_backward.cu) on an H100/H200 against the float64 reference.

FlashAttention's rule, as tests/test_cupy_kernels.py: each of dq, dk, dv within 3x the error of naive attention in
the same precision (PyTorch autograd on the GPU) plus a small atol. Every CuPy allocation (dq, dk, dv and the
scratch buffers among them) starts as NaN bits, so a row the kernel forgets to write fails. Ragged lengths,
Nq != Nk both ways, causal and not, grouped-query attention, head dims padded into the 64 and 256 buckets."""
import pytest

from flashlib import cupy_kernels as ck
from tests.test_cupy_kernels import _check_gqa, poisoned  # noqa: F401 (poisoned: a fixture)

KINDS = [(t, d) for t in ("float16", "bfloat16") for d in (64, 128, 256)]
SHAPES = [(1, 2, 1, 1), (1, 2, 97, 113), (2, 3, 128, 128), (1, 2, 1023, 257), (1, 4, 300, 700), (1, 2, 257, 1023),
          (1, 1, 64, 4096)]                                   # (B, H, Nq, Nk)
GQA = [(1, 4, 2, 97, 113), (1, 4, 2, 300, 700), (2, 4, 1, 129, 257)]   # (B, H, H_kv, Nq, Nk)


@pytest.fixture(scope="module", autouse=True)
def _precompiled():
    """The sixteen instances compiled once, up front, in parallel threads (NVRTC releases the GIL)."""
    import concurrent.futures
    if ck.device_cc() != 90:
        return
    jobs = [(t, d, c, None) for t, d in KINDS for c in (False, True)]
    jobs += [(t, 256, c, ("atomic",)) for t in ("float16", "bfloat16") for c in (False, True)]
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda j: ck.backward_plan(j[0], j[1], j[2], 0, "bwd_wgmma", j[3]), jobs))


def _hopper():
    if ck.device_cc() != 90:
        pytest.skip("bwd_wgmma runs on Hopper (compute capability 9.0) only")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,d", KINDS, ids=str)
@pytest.mark.parametrize("B,H,nq,nk", SHAPES, ids=str)
def test_bwd_wgmma_matches_reference(B, H, nq, nk, dtype, d, causal, poisoned):
    _hopper()
    _check_gqa(B, H, H, nq, nk, d, causal, dtype, None, "bwd_wgmma")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,d", KINDS, ids=str)
@pytest.mark.parametrize("shape", GQA, ids=str)
def test_bwd_wgmma_gqa_matches_reference(shape, dtype, d, causal, poisoned):
    _hopper()
    _check_gqa(*shape, d, causal, dtype, None, "bwd_wgmma")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(B, H, H, nq, nk) for B, H, nq, nk in SHAPES] + GQA, ids=str)
def test_bwd_wgmma_d256_atomic_matches_reference(shape, dtype, causal, poisoned):
    """fa3_backward_d256 with dQ added by atomics (two dO stages; the default adds it by TMA reductions)."""
    _hopper()
    _check_gqa(*shape, 256, causal, dtype, None, "bwd_wgmma", bwd_tiles=("atomic",))


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_bwd_wgmma_padded_head_dim(causal, poisoned):
    _hopper()
    _check_gqa(1, 2, 1, 130, 77, 50, causal, "bfloat16", None, "bwd_wgmma")   # d = 50 runs as the 64 kernel
    _check_gqa(1, 2, 2, 97, 200, 200, causal, "float16", None, "bwd_wgmma")   # d = 200 as fa3_backward_d256


@pytest.mark.gpu
def test_bwd_wgmma_refused_off_hopper_head_dims():
    _hopper()
    import cupy as cp
    q = cp.zeros((1, 1, 8, 96), cp.float16)
    lse = cp.zeros((1, 1, 8), cp.float32)
    with pytest.raises(ValueError, match="head_dim"):
        ck.backward(q, q, q, q, lse, q, causal=False, scale=None, dtype="float16", rung="bwd_wgmma")
