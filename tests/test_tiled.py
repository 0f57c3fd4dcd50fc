"""flashlib.tiled against the float64 reference on random shapes (hypothesis), and its step trace."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from flashlib import iomodel, reference as R, tiled as T


@st.composite
def problems(draw, max_n=300):
    Nq, Nk = draw(st.integers(1, max_n)), draw(st.integers(1, max_n))
    d = draw(st.integers(1, 256))
    # keep Tr * Tc modest so hundreds of cases stay quick; blocks may or may not divide N
    Br = draw(st.integers(max(1, Nq // 12), Nq + 8))
    Bc = draw(st.integers(max(1, Nk // 12), Nk + 8))
    causal = draw(st.booleans())
    magnitude = draw(st.sampled_from([1.0, 30.0, 1e3]))   # 1e3: scores far beyond exp's float64 range
    seed = draw(st.integers(0, 2**32 - 1))
    return Nq, Nk, d, Br, Bc, causal, magnitude, seed


def inputs(Nq, Nk, d, magnitude, seed, B=1, H=2):
    rng = np.random.default_rng(seed)
    q = magnitude * rng.standard_normal((B, H, Nq, d))
    k, v = rng.standard_normal((B, H, Nk, d)), rng.standard_normal((B, H, Nk, d))
    return q, k, v


@settings(max_examples=300, deadline=None)
@given(problems())
def test_fa1_and_fa2_match_reference(p):
    Nq, Nk, d, Br, Bc, causal, magnitude, seed = p
    q, k, v = inputs(Nq, Nk, d, magnitude, seed)
    o, lse = R.attention_forward(q, k, v, causal)
    assert np.isfinite(o).all()
    for fwd in (T.fa1_forward, T.fa2_forward):
        o2, lse2 = fwd(q, k, v, causal, Br=Br, Bc=Bc)
        np.testing.assert_allclose(o2, o, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(lse2, lse, rtol=1e-12, atol=1e-9)


@settings(max_examples=150, deadline=None)
@given(problems(max_n=160))
def test_backward_matches_reference(p):
    Nq, Nk, d, Br, Bc, causal, magnitude, seed = p
    q, k, v = inputs(Nq, Nk, d, min(magnitude, 30.0), seed)
    o, lse = R.attention_forward(q, k, v, causal)
    do = np.random.default_rng(seed + 1).standard_normal(o.shape)
    ref = R.attention_backward(q, k, v, o, lse, do, causal)
    for mine, want in zip(T.backward(q, k, v, o, lse, do, causal, Br=Br, Bc=Bc), ref):
        np.testing.assert_allclose(mine, want, rtol=1e-8, atol=1e-9 * max(1.0, np.abs(want).max()))


def test_custom_scale(rng):
    q, k, v = (rng.standard_normal((1, 1, 9, 4)) for _ in range(3))
    for fwd in (T.fa1_forward, T.fa2_forward):
        np.testing.assert_allclose(fwd(q, k, v, scale=2.5, Br=4, Bc=3)[0], R.attention_forward(q, k, v, scale=2.5)[0])


@pytest.mark.parametrize("algo", ["fa1", "fa2", "bwd"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Nq,Nk,d,Br,Bc", [(64, 64, 16, 16, 16), (37, 53, 8, 8, 16), (53, 37, 5, 16, 7)])
def test_trace_bytes_equal_iomodel(rng, algo, causal, Nq, Nk, d, Br, Bc):
    q, k, v = (rng.standard_normal((1, 1, n, d)) for n in (Nq, Nk, Nk))
    trace = []
    if algo == "bwd":
        o, lse = R.attention_forward(q, k, v, causal)
        T.backward(q, k, v, o, lse, rng.standard_normal(o.shape), causal, Br=Br, Bc=Bc, trace=trace)
        model = iomodel.backward_hbm_bytes
    else:
        (T.fa1_forward if algo == "fa1" else T.fa2_forward)(q, k, v, causal, Br=Br, Bc=Bc, trace=trace)
        model = iomodel.fa1_hbm_bytes if algo == "fa1" else iomodel.fa2_hbm_bytes
    read, written = model(Nq, Nk, d, Br, Bc, causal)
    last = trace[-1]
    assert (last["hbm_read"], last["hbm_written"]) == (read, written)
    Tr, Tc = T.n_blocks(Nq, Br), T.n_blocks(Nk, Bc)
    assert len(trace) == Tr * Tc                         # one step per tile, skipped ones included
    assert any(s["skipped"] for s in trace) == (causal and any(
        not T.tile_visible(i, j, Br, Bc, Nq, True) for i in range(Tr) for j in range(Tc)))


def test_trace_follows_each_loop_order(rng):
    q, k, v = (rng.standard_normal((1, 1, 40, 4)) for _ in range(3))
    t1, t2 = [], []
    T.fa1_forward(q, k, v, Br=16, Bc=16, trace=t1)
    T.fa2_forward(q, k, v, Br=16, Bc=16, trace=t2)
    assert [(s["i"], s["j"]) for s in t1] == [(i, j) for j in range(3) for i in range(3)]  # K/V outer
    assert [(s["i"], s["j"]) for s in t2] == [(i, j) for i in range(3) for j in range(3)]  # Q outer
    assert t1[0]["loaded"] == ("K", "V", "Q", "O", "l", "m") and t1[1]["loaded"] == ("Q", "O", "l", "m")
    assert t2[0]["loaded"] == ("Q", "K", "V") and t2[1]["loaded"] == ("K", "V")
    # the O rows after the last step of a Q block are the final answer
    o = R.attention_forward(q, k, v)[0]
    np.testing.assert_allclose(t2[2]["O"], o[..., :16, :], rtol=1e-12)
    assert t2[0]["S"].shape == (1, 1, 16, 16) and t2[-1]["S"].shape == (1, 1, 8, 8)


def test_flash_moves_fewer_bytes_than_standard_and_follows_theorem2():
    N, d, M = 4096, 64, 100_000 // 4
    Br, Bc = iomodel.paper_block_sizes(M, d)
    std = sum(iomodel.standard_hbm_bytes(N, N, d))
    fa1 = sum(iomodel.fa1_hbm_bytes(N, N, d, Br, Bc))
    assert fa1 < std
    orders = iomodel.theorem2(N, d, M)
    # exact counts stay within a constant factor of the orders of Theorem 2
    assert 0.5 < std / 4 / orders["standard"] < 6 and 1 < fa1 / 4 / orders["flash"] < 20
    # doubling M roughly halves FlashAttention's traffic (the N^2 d^2 / M term dominates)
    Br2, Bc2 = iomodel.paper_block_sizes(2 * M, d)
    assert 0.4 < sum(iomodel.fa1_hbm_bytes(N, N, d, Br2, Bc2)) / fa1 < 0.65


@pytest.mark.parametrize("H,H_kv", [(4, 2), (3, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_grouped_query_attention_equals_repeat_then_sum(rng, H, H_kv, causal):
    from tests.test_reference import repeat_then_sum
    q = rng.standard_normal((2, H, 11, 6))
    k, v = rng.standard_normal((2, H_kv, 13, 6)), rng.standard_normal((2, H_kv, 13, 6))
    do = rng.standard_normal(q.shape)
    g = H // H_kv
    want_o, want_lse = repeat_then_sum(R.attention_forward, q, k, v, causal, g=g)
    for fwd in (T.fa1_forward, T.fa2_forward):
        o, lse = fwd(q, k, v, causal, Br=4, Bc=5)
        np.testing.assert_allclose(o, want_o, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(lse, want_lse, rtol=1e-13)
    grads = T.backward(q, k, v, want_o, want_lse, do, causal, Br=4, Bc=5)
    want = repeat_then_sum(R.attention_backward, q, k, v, want_o, want_lse, do, causal, g=g)
    for mine, theirs in zip(grads, want):
        assert mine.shape == theirs.shape
        np.testing.assert_allclose(mine, theirs, rtol=1e-11, atol=1e-13)


def test_a_row_that_sees_no_key_gives_zero_and_minus_inf(rng):
    """The -inf rule in both forward forms and the backward: O = 0, lse = -inf, zero gradients from that row."""
    from tests.test_reference import rows_without_keys
    q, k, v, _ = rows_without_keys(rng, Nq=9, Nk=7)
    do = rng.standard_normal(q.shape)
    with np.errstate(over="ignore"):
        o, lse = R.attention_forward(q, k, v)
        want = R.attention_backward(q, k, v, o, lse, do)
        assert (o[..., 0, :] == 0).all() and np.isneginf(lse[..., 0]).all()
        with np.errstate(invalid="raise"):
            for fwd in (T.fa1_forward, T.fa2_forward):
                o2, lse2 = fwd(q, k, v, Br=4, Bc=3)
                np.testing.assert_array_equal(o2[..., 0, :], 0.0)
                assert np.isneginf(lse2[..., 0]).all()
                np.testing.assert_allclose(o2, o, rtol=1e-12, atol=1e-14)
                np.testing.assert_allclose(lse2[..., 1:], lse[..., 1:], rtol=1e-13)
            grads = T.backward(q, k, v, o, lse, do, Br=4, Bc=3)
    for mine, theirs in zip(grads, want):
        assert np.isfinite(mine).all()
        np.testing.assert_allclose(mine, theirs, rtol=1e-11, atol=1e-13)
    assert (grads[0][..., 0, :] == 0).all()


@pytest.mark.parametrize("fn", ["fa1_forward", "fa2_forward", "backward"])
@pytest.mark.parametrize("arg,value,err", [("Br", -16, ValueError), ("Bc", -16, ValueError), ("Br", 0, ValueError),
                                           ("Bc", 0, ValueError), ("Br", 16.0, TypeError), ("Bc", "16", TypeError),
                                           ("Br", True, TypeError), ("Bc", None, TypeError)])
def test_block_sizes_must_be_positive_ints(rng, fn, arg, value, err):
    """Issue 17.5: Br=-16 returned uninitialised memory, Bc=-16 nan, Br=0 a bare ZeroDivisionError."""
    q, k, v = (rng.standard_normal((1, 1, 20, 4)) for _ in range(3))
    o, lse = R.attention_forward(q, k, v)
    args = (q, k, v, o, lse, o) if fn == "backward" else (q, k, v)
    with pytest.raises(err, match=f"{arg} must be a positive int"):
        getattr(T, fn)(*args, **{arg: value})
    out = getattr(T, fn)(*args, **{arg: np.int64(7)})            # NumPy ints are fine
    np.testing.assert_allclose(out[0], (R.attention_backward(*args) if fn == "backward" else (o,))[0], rtol=1e-10)


def test_backward_says_when_lse_does_not_fit_the_scores(rng):
    """Issue 17.6: with a float32 lse and |scores| ~ 1e20, exp(S - lse) is 0 or inf and dV came back 0 silently."""
    q = 1e20 * rng.standard_normal((1, 1, 8, 4))
    k, v, do = (rng.standard_normal((1, 1, 8, 4)) for _ in range(3))
    o, lse = R.attention_forward(q, k, v)
    T.backward(q, k, v, o, lse, do)                              # the float64 lse fits
    with pytest.raises(ValueError, match="lse does not fit the scores"), np.errstate(over="ignore", invalid="ignore"):
        T.backward(q, k, v, o, lse.astype(np.float32), do)
    o, lse = R.attention_forward(q / 1e20, k, v)
    with pytest.raises(ValueError, match="lse does not fit the scores"):
        T.backward(q / 1e20, k, v, o, lse - 0.01, do)            # an lse below the scores' own
