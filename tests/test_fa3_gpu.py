"""Rung 7 (fa3_forward.cu, TMA + warp specialisation) on a Hopper GPU against the float64 reference.

FlashAttention's rule, as tests/test_cupy_kernels.py: the error of O is at most twice that of naive attention in the
same precision (PyTorch on the GPU) plus a small atol; lse within 2e-3. Every CuPy allocation (o and lse among
them) starts as NaN bits, so a row the kernel forgets to write fails. Ragged lengths, Nq != Nk, causal and not,
grouped-query attention (G = 2, 4); every variant (plain, ping-pong, persistent) on the same inputs; d = 64, 128, 256.
The timeline's debug build: the same output, and events that make sense.""" 
import itertools
import zlib

import numpy as np
import pytest

from flashlib import reference
from flashlib.cupy_kernels import tma
from tests.test_cupy_kernels import ATOL, _err, _f64, _naive, poisoned  # noqa: F401 (poisoned: a fixture)

LENGTHS = (1, 3, 97, 113, 1023, 4096)
PAIRS = [(a, b) for a, b in itertools.permutations(LENGTHS, 2)]          # Nq != Nk
KINDS = [(t, d) for t in ("float16", "bfloat16") for d in tma.FA3_HEAD_DIMS]
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


def _check(B, H, Hkv, Nq, Nk, d, dtype, causal, tiles=None, narrow=False):
    """Every variant (plain, ping-pong, persistent) on one set of random inputs against one float64 reference;
    returns their outputs (o, lse as CuPy arrays) by variant."""
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
    out = {}
    for variant in tma.VARIANTS:
        out[variant] = tma.forward_fa3(to_cupy(q), to_cupy(k), to_cupy(v), causal, scale, tiles, variant, narrow=narrow)
        o, lse = like(out[variant][0], q, dtype), like(out[variant][1], q, "float32")
        where = (variant, tiles, narrow, B, H, Hkv, Nq, Nk, d, dtype, causal)
        assert o.shape == q.shape and o.dtype == q.dtype
        assert _err(o, o_ref) <= bound, (where, _err(o, o_ref), bound)   # NaN (an unwritten row) fails too
        assert _err(lse, lse_ref) <= 2e-3, (where, _err(lse, lse_ref))
    return out


# d = 256 (its float64 reference costs most) on the pairs of lengths up to 1023 and two with 4096
RAGGED = [(a, b, t, d) for a, b in PAIRS for t, d in KINDS if d < 256 or max(a, b) < 4096 or min(a, b) == 113]


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk,dtype,d", RAGGED, ids=str)
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


# the narrow last key tile (fa3_forward's NARROW, without the mask) on and off at every head dim, at lengths whose
# last tile is partial at the default Bc (64 and 128 keys at d = 64, 176 at d = 128, 80 at d = 256) and one with a
# single tile: each against the reference, and on against off bit for bit (narrow only in the persistent variants)
NARROW_NK = (97, 300, 1023, 4000)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,d", KINDS, ids=str)
@pytest.mark.parametrize("nk", NARROW_NK)
def test_fa3_narrow_last_tile_matches_reference_and_the_full_tile_bit_for_bit(nk, dtype, d, poisoned):
    _hopper()
    Bc = tma.fa3_tiles(d, False)[0]
    assert tma.fa3_config(dtype, d, False, variant="dynamic", Nk=nk, narrow=True).narrow == tma.fa3_narrow_width(nk, Bc)
    on, off = (_check(1, 4, 2, 131, nk, d, dtype, False, narrow=x) for x in (True, False))
    for variant in tma.VARIANTS:
        for a, b in zip(on[variant], off[variant]):
            assert (a.view("int32") == b.view("int32")).all(), (variant, nk, dtype, d)


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


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["pingpong", "persistent"])
def test_fa3_timeline_debug_build(variant):
    """The debug build (fa3_timeline.cu) computes what the plain build does, and its records are consistent: every
    event ends after it starts, a warpgroup's events follow each other, the producer issues K and V once per tile
    and item, every consumer runs one softmax per tile and item, one epilogue per item."""
    _hopper()
    import cupy as cp
    from flashlib.cupy_kernels import timeline
    B, H, N, d = 1, 48, 700, 128      # persistent: 288 work items on 132 SMs, 2 or 3 a CTA
    recs, o, lse = timeline.record(B, H, N, d, "float16", True, variant, seed=1)
    rng = cp.random.default_rng(1)      # the same inputs as record's
    q, k, v = (rng.standard_normal((B, H, N, d), dtype=cp.float32).astype(cp.float16) for _ in range(3))
    o2, lse2 = tma.forward_fa3(q, k, v, True, None, variant=variant)
    assert float(cp.abs(o.astype(cp.float32) - o2.astype(cp.float32)).max()) <= 1e-3   # the same arithmetic
    assert float(cp.abs(lse - lse2).max()) <= 1e-5
    cfg = tma.fa3_config("float16", d, True, variant=variant)
    grid = tma.fa3_grid(cfg, N, B * H, tma.sm_count(0))
    n_qt = -(-N // cfg.Br)
    for cta in (0, 1):
        if variant == "persistent":
            items = list(range(cta, n_qt * B * H, grid[0]))
            tiles = [n_qt - 1 - i // (B * H) for i in items]   # the longest tiles of every pair first
        else:
            tiles = [n_qt - 1 - cta]                      # blockIdx.x = cta, pair 0: the longest tiles first
        n_kv = sum(-(-min(N, (t + 1) * cfg.Br) // cfg.Bc) for t in tiles)
        mine = [r for r in recs if r["cta"] == cta]
        for wg in range(cfg.threads // 128):
            ev = [r for r in mine if r["warpgroup"] == wg]
            assert all(r["end_ns"] >= r["start_ns"] and r["end_clk"] >= r["start_clk"] for r in ev)
            assert all(a["end_clk"] <= b["start_clk"] for a, b in zip(ev, ev[1:]))
            count = lambda p: sum(r["phase"] == p for r in ev)
            if wg == 0:
                assert count("k_issue") == count("v_issue") == n_kv and count("q_issue") == len(tiles)
            else:
                assert count("softmax") == n_kv and count("epilogue") == count("wait_q") == len(tiles)
                assert count("turn") == n_kv + len(tiles)   # n_tiles + 1 turns an item
