"""flashlib.block_sparse against a dense float64 attention with the block mask expanded to elements."""
import numpy as np
import pytest

from flashlib import block_sparse, reference, tiled


def dense_masked(q, k, v, block_mask, causal, Br, Bc):
    """The float64 reference with the block mask expanded to an element mask."""
    mask = block_sparse.expand(block_mask, q.shape[-2], k.shape[-2], Br, Bc)
    return reference.attention_forward(q, k, v, causal, mask=mask)


@pytest.mark.parametrize("Nq,Nk,causal", [(48, 48, False), (37, 50, True), (64, 29, False), (1, 17, True)])
def test_matches_dense_masked(rng, Nq, Nk, causal):
    Br, Bc = 16, 8
    q, k, v = (rng.standard_normal((2, n, 5)) for n in (Nq, Nk, Nk))
    mask = rng.random((tiled.n_blocks(Nq, Br), tiled.n_blocks(Nk, Bc))) < 0.5
    mask[0, 0] = True
    mask[-1, :] = mask.shape[0] == 1                   # the last row block sees no key (when there are two)
    trace = []
    O, lse = block_sparse.fa2_forward(q, k, v, mask, causal, Br=Br, Bc=Bc, trace=trace)
    O_ref, lse_ref = dense_masked(q, k, v, mask, causal, Br, Bc)
    if mask.shape[0] > 1:                              # the -inf rule: O = 0, lse = -inf
        assert (O[..., -1, :] == 0).all() and np.isneginf(lse[..., -1]).all()
    np.testing.assert_allclose(O, O_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_ref))
    fin = np.isfinite(lse_ref)
    np.testing.assert_allclose(lse[fin], lse_ref[fin], rtol=1e-12)
    computed = {(s["i"], s["j"]) for s in trace if not s["skipped"]}
    visible = {(i, j) for (i, j), keep in np.ndenumerate(mask) if keep and tiled.tile_visible(i, j, Br, Bc, Nq, causal)}
    assert computed == visible
    per_head = block_sparse.hbm_bytes(Nq, Nk, 5, Br, Bc, mask, causal)         # q carries 2 heads
    assert (trace[-1]["hbm_read"], trace[-1]["hbm_written"]) == (2 * per_head[0], 2 * per_head[1])


def test_full_mask_is_fa2(rng):
    q, k, v = (rng.standard_normal((40, 8)) for _ in range(3))
    mask = np.ones((3, 3), bool)
    O, lse = block_sparse.fa2_forward(q, k, v, mask, True, Br=16, Bc=16)
    O2, lse2 = tiled.fa2_forward(q, k, v, True, Br=16, Bc=16)
    np.testing.assert_allclose(O, O2, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(lse, lse2, rtol=1e-13)
    assert block_sparse.hbm_bytes(40, 40, 8, 16, 16, mask, True) == __import__("flashlib.iomodel").iomodel.fa2_hbm_bytes(40, 40, 8, 16, 16, True)


def test_bad_mask_shape(rng):
    q = rng.standard_normal((20, 4))
    with pytest.raises(ValueError, match="block_mask"):
        block_sparse.fa2_forward(q, q, q, np.ones((1, 1), bool), Br=16, Bc=16)


@pytest.mark.parametrize("causal", [False, True])
def test_numba_kernel_skips_the_masked_tiles(rng, causal):
    """The readable Numba FA2 kernel with a block mask (simulator here, the GPU with -m gpu) against the NumPy
    block-sparse algorithm; every tile it visits is one the mask keeps."""
    import numpy as np
    from numba import cuda
    from flashlib.numba_kernels import fa2_forward
    Nq, Nk, d, Br, Bc = 37, 29, 5, 8, 8
    q, k, v = (rng.standard_normal((1, 2, n, d)).astype(np.float32) for n in (Nq, Nk, Nk))
    mask = rng.random((5, 4)) < 0.6
    mask[:, 0] = True                                    # every row keeps at least one tile
    want_o, want_lse = block_sparse.fa2_forward(q, k, v, mask, causal, Br=Br, Bc=Bc)
    o = cuda.to_device(np.full((1, 2, Nq, d), np.nan, np.float32))
    lse = cuda.to_device(np.full((1, 2, Nq), np.nan, np.float32))
    tr = cuda.to_device(np.full((5 * 2, 4, 2), -1, np.int32))
    fa2_forward(q, k, v, causal=causal, Br=Br, Bc=Bc, o=o, lse=lse, trace=tr, block_mask=mask)
    np.testing.assert_allclose(o.copy_to_host(), want_o, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse.copy_to_host(), want_lse, rtol=1e-5, atol=1e-6)
    visits = {tuple(p) for row in tr.copy_to_host() for p in row if p[0] >= 0}
    assert visits and all(mask[i, j] for i, j in visits)
    with pytest.raises(ValueError, match="block_mask must have shape"):
        fa2_forward(q, k, v, Br=Br, Bc=Bc, block_mask=mask[:, :3])


def test_random_mask_density_and_rows():
    from flashlib.block_sparse import random_mask
    m = random_mask(64, 48, 0.25, seed=1)
    assert m.shape == (64, 48) and m.dtype == bool
    assert m.any(axis=1).all()                                   # every row block keeps a tile
    assert abs(m.mean() - 0.25) < 0.05
    assert (random_mask(64, 48, 0.25, seed=1) == m).all() and not (random_mask(64, 48, 0.25, seed=2) == m).all()


def test_grouped_query_attention_and_block_sizes(rng):
    q, k, v = rng.standard_normal((1, 4, 21, 3)), rng.standard_normal((1, 2, 18, 3)), rng.standard_normal((1, 2, 18, 3))
    mask = rng.random((3, 3)) < 0.6
    mask[:, 0] = True
    O, lse = block_sparse.fa2_forward(q, k, v, mask, Br=8, Bc=8)
    want_o, want_lse = dense_masked(q, k, v, mask, False, 8, 8)
    np.testing.assert_allclose(O, want_o, rtol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12)
    with pytest.raises(ValueError, match="Br must be a positive int"):
        block_sparse.fa2_forward(q, k, v, mask, Br=-8, Bc=8)
    with pytest.raises(ValueError, match="bool array"):
        block_sparse.fa2_forward(q, k, v, mask.astype(int), Br=8, Bc=8)
