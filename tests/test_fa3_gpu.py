"""Rung 7 (fa3_forward.cu, TMA + warp specialisation) on a Hopper GPU against the float64 reference.

FlashAttention's rule, as tests/test_cupy_kernels.py: the error of O is at most twice that of naive attention in the
same precision (PyTorch on the GPU) plus a small atol; lse within 2e-3. Every CuPy allocation (o and lse among
them) starts as NaN bits, so a row the kernel forgets to write fails. Ragged lengths, Nq != Nk, causal and not,
grouped-query attention (G = 2, 4)."""
import itertools
import zlib

import numpy as np
import pytest

from flashlib import reference
from flashlib.cupy_kernels import tma
from tests.test_cupy_kernels import ATOL, _err, _f64, _naive, poisoned  # noqa: F401 (poisoned: a fixture)

LENGTHS = (1, 3, 97, 113, 1023, 4096)
PAIRS = [(a, b) for a, b in itertools.permutations(LENGTHS, 2)]          # Nq != Nk
KINDS = [("float16", 64), ("float16", 128), ("bfloat16", 64), ("bfloat16", 128)]
GQA_PAIRS = [(97, 1023), (1023, 97), (113, 4096), (4096, 3), (1, 113)]


@pytest.fixture(scope="module", autouse=True)
def _precompiled():
    """Every kernel compiled once, up front, in parallel (only where a test of this module runs)."""
    from flashlib import cupy_kernels as ck
    if ck.device_cc() == 90:
        tma.precompile()


def _hopper():
    from flashlib import cupy_kernels as ck
    if ck.device_cc() != 90:
        pytest.skip("rung 7 runs on Hopper (compute capability 9.0) only")


def _check(B, H, Hkv, Nq, Nk, d, dtype, causal, tiles=None):
    """Both variants (plain, ping-pong) on one set of random inputs against one float64 reference."""
    import torch
    from flashlib._arrays import like, to_cupy
    seed = zlib.crc32(repr((B, H, Hkv, Nq, Nk, d, dtype, causal, tiles)).encode())
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda h, n: torch.randn(B, h, n, d, device="cuda", generator=g).to(getattr(torch, dtype))
    q, k, v = mk(H, Nq), mk(Hkv, Nk), mk(Hkv, Nk)
    scale = 1 / np.sqrt(d)
    G = H // Hkv
    k_rep, v_rep = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    o_ref, lse_ref = reference.attention_forward(_f64(q), _f64(k_rep), _f64(v_rep), causal, scale)
    bound = 2 * _err(_naive(q, k_rep, v_rep, causal, scale), o_ref) + ATOL[dtype]
    for variant in tma.VARIANTS:
        o, lse = tma.forward_fa3(to_cupy(q), to_cupy(k), to_cupy(v), causal, scale, tiles, variant)
        o, lse = like(o, q, dtype), like(lse, q, "float32")
        where = (variant, tiles, B, H, Hkv, Nq, Nk, d, dtype, causal)
        assert o.shape == q.shape and o.dtype == q.dtype
        assert _err(o, o_ref) <= bound, (where, _err(o, o_ref), bound)   # NaN (an unwritten row) fails too
        assert _err(lse, lse_ref) <= 2e-3, (where, _err(lse, lse_ref))


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,d", KINDS, ids=str)
@pytest.mark.parametrize("nq,nk", PAIRS, ids=str)
def test_fa3_ragged_matches_reference(nq, nk, dtype, d, causal, poisoned):
    _hopper()
    _check(2, 2, 2, nq, nk, d, dtype, causal)


@pytest.mark.gpu
@pytest.mark.parametrize("G", [2, 4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,d", KINDS, ids=str)
@pytest.mark.parametrize("nq,nk", GQA_PAIRS, ids=str)
def test_fa3_gqa_matches_reference(nq, nk, dtype, d, causal, G, poisoned):
    _hopper()
    _check(1, 4, 4 // G, nq, nk, d, dtype, causal)


OTHER = [(d, t) for d, ts in tma.FA3_OTHER_TILES.items() for t in ts]


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d,tiles", OTHER, ids=str)
@pytest.mark.parametrize("nq,nk", [(97, 1023), (1023, 113), (3, 4096), (4096, 1)], ids=str)
def test_fa3_other_tiles_match_reference(nq, nk, d, tiles, dtype, causal, poisoned):
    _hopper()
    _check(1, 4, 2, nq, nk, d, dtype, causal, tiles)


@pytest.mark.gpu
def test_fa3_rejects_bad_input():
    _hopper()
    import cupy as cp
    q = cp.zeros((1, 2, 8, 96), cp.float16)
    with pytest.raises(ValueError, match="head_dim"):
        tma.forward_fa3(q, q, q, False, None)
    q = cp.zeros((1, 3, 8, 64), cp.float16)
    k = cp.zeros((1, 2, 8, 64), cp.float16)
    with pytest.raises(ValueError, match="dividing"):
        tma.forward_fa3(q, k, k, False, None)
    with pytest.raises(ValueError, match="float16"):
        tma.forward_fa3(q.astype(cp.float32), k.astype(cp.float32), k.astype(cp.float32), False, None)
