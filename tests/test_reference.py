"""The float64 reference against PyTorch (CPU), finite differences, and the online-softmax pieces."""
import numpy as np
import pytest
import torch

from flashlib import online_softmax as osm
from flashlib import reference as R
from tests.conftest import qkv


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Nq,Nk,d", [(1, 1, 1), (7, 13, 5), (13, 7, 3), (33, 33, 16)])
def test_forward_and_gradients_match_torch_autograd(rng, causal, Nq, Nk, d):
    q, k, v = qkv(rng, 2, 3, Nq, Nk, d, np.float64)
    scale = 0.37
    o, lse = R.attention_forward(q, k, v, causal, scale)
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    to = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal, scale=scale)
    np.testing.assert_allclose(o, to.detach().numpy(), rtol=1e-12, atol=1e-12)
    S = scale * np.einsum("bhid,bhjd->bhij", q, k)
    if causal:
        S = np.where(np.tril(np.ones((Nq, Nk), bool)), S, -np.inf)
    np.testing.assert_allclose(lse, np.log(np.exp(S).sum(-1)), rtol=1e-12)
    do = rng.standard_normal(o.shape)
    to.backward(torch.tensor(do))
    for mine, theirs in zip(R.attention_backward(q, k, v, o, lse, do, causal, scale), (tq, tk, tv)):
        np.testing.assert_allclose(mine, theirs.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_gradients_match_finite_differences(rng):
    q, k, v = qkv(rng, 1, 1, 5, 6, 3, np.float64)
    do = rng.standard_normal((1, 1, 5, 3))
    loss = lambda q_, k_, v_: (R.attention_forward(q_, k_, v_, True)[0] * do).sum()
    o, lse = R.attention_forward(q, k, v, True)
    grads = R.attention_backward(q, k, v, o, lse, do, True)
    eps = 1e-6
    for x, g in zip((q, k, v), grads):
        num = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            xp, xm = x.copy(), x.copy()
            xp[idx] += eps
            xm[idx] -= eps
            args = [xp if a is x else a for a in (q, k, v)], [xm if a is x else a for a in (q, k, v)]
            num[idx] = (loss(*args[0]) - loss(*args[1])) / (2 * eps)
        np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-8)


def test_causal_is_top_left_when_nq_differs_from_nk():
    mask = R.causal_mask(3, 5)
    assert mask.tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]


def test_safe_and_online_softmax_survive_large_scores(rng):
    x = 1000.0 + 50 * rng.standard_normal((4, 37))
    with np.errstate(over="ignore", invalid="ignore"):
        assert np.isnan(osm.naive_softmax(x)).any()     # the naive form overflows
    ref = np.exp(x - x.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    np.testing.assert_allclose(osm.safe_softmax(x), ref, rtol=1e-12)
    trace = []
    np.testing.assert_allclose(osm.online_softmax(x, trace), ref, rtol=1e-12)
    assert len(trace) == 37 and np.array_equal(trace[-1][1], x.max(-1))


def test_merging_two_chunks_equals_one_pass(rng):
    x = rng.standard_normal(50) * 20
    m0, l0 = -np.inf, 0.0
    ma, la = osm.online_update(m0, l0, x[:17])
    mb, lb = osm.online_update(m0, l0, x[17:])
    m, l = osm.merge(ma, la, mb, lb)
    assert m == x.max() and np.isclose(l, np.exp(x - x.max()).sum(), rtol=1e-13)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_attention_matches_reference(rng, chunk):
    q, k, v = qkv(rng, 2, 2, 19, 45, 6, np.float64, scale=4.0)
    np.testing.assert_allclose(osm.chunked_attention(q, k, v, chunk), R.attention_forward(q, k, v)[0], rtol=1e-11)


def repeat_then_sum(fn, q, k, v, *rest, g):
    """GQA by hand: repeat each kv head g times (repeat_interleave order), run per head, sum dK/dV per group."""
    out = fn(q, np.repeat(k, g, axis=-3), np.repeat(v, g, axis=-3), *rest)
    if len(out) == 3:                                   # (dq, dk, dv): fold the repeated heads back
        dq, dk, dv = out
        fold = lambda x: x.reshape(x.shape[:-3] + (x.shape[-3] // g, g) + x.shape[-2:]).sum(axis=-3)
        return dq, fold(dk), fold(dv)
    return out


@pytest.mark.parametrize("H,H_kv", [(4, 2), (6, 1), (3, 3)])
@pytest.mark.parametrize("causal", [False, True])
def test_grouped_query_attention_equals_repeat_then_sum(rng, H, H_kv, causal):
    q = rng.standard_normal((2, H, 7, 5))
    k, v = rng.standard_normal((2, H_kv, 9, 5)), rng.standard_normal((2, H_kv, 9, 5))
    do = rng.standard_normal(q.shape)
    o, lse = R.attention_forward(q, k, v, causal)
    want_o, want_lse = repeat_then_sum(R.attention_forward, q, k, v, causal, g=H // H_kv)
    np.testing.assert_allclose(o, want_o, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-13)
    grads = R.attention_backward(q, k, v, o, lse, do, causal)
    want = repeat_then_sum(R.attention_backward, q, k, v, o, lse, do, causal, g=H // H_kv)
    for mine, theirs in zip(grads, want):
        assert mine.shape == theirs.shape
        np.testing.assert_allclose(mine, theirs, rtol=1e-12, atol=1e-13)
    # and against torch autograd through SDPA's enable_gqa
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    to = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal, enable_gqa=True)
    to.backward(torch.tensor(do))
    np.testing.assert_allclose(o, to.detach().numpy(), rtol=1e-12, atol=1e-12)
    for mine, t in zip(grads, (tq, tk, tv)):
        np.testing.assert_allclose(mine, t.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("qs,ks", [((2, 4, 3, 2), (2, 3, 3, 2)), ((2, 4, 3, 2), (1, 2, 3, 2))])
def test_heads_that_do_not_divide_are_refused(qs, ks):
    with pytest.raises(ValueError, match="grouped-query"):
        R.attention_forward(np.ones(qs), np.ones(ks), np.ones(ks))


def rows_without_keys(rng, B=1, H=2, Nq=6, Nk=5, d=3):
    """q, k, v in which query row 0 of every head sees no key: its scores overflow to -inf in float64, from finite
    inputs; and a mask that hides row 2 from every key."""
    q, k, v = rng.standard_normal((B, H, Nq, d)), -np.abs(rng.standard_normal((B, H, Nk, d))) - 1, rng.standard_normal((B, H, Nk, d))
    q[..., 0, :] = 1e308
    mask = np.ones((Nq, Nk), bool)
    mask[2] = False
    return q, k, v, mask


def test_a_row_that_sees_no_key_gives_zero_and_minus_inf(rng):
    q, k, v, mask = rows_without_keys(rng)
    do = rng.standard_normal(q.shape)
    with np.errstate(over="ignore"):
        assert np.isneginf(R.scores(q, k)[..., 0, :]).all()
        o, lse = R.attention_forward(q, k, v, mask=mask)
        dq, dk, dv = R.attention_backward(q, k, v, o, lse, do, mask=mask)
    for r in (0, 2):
        assert (o[..., r, :] == 0).all() and np.isneginf(lse[..., r]).all() and (dq[..., r, :] == 0).all()
    # the other rows, and dK, dV, are what attention over those rows alone gives
    keep = [1, 3, 4, 5]
    o2, lse2 = R.attention_forward(q[..., keep, :], k, v)
    np.testing.assert_allclose(o[..., keep, :], o2, rtol=1e-13)
    np.testing.assert_allclose(lse[..., keep], lse2, rtol=1e-13)
    want = R.attention_backward(q[..., keep, :], k, v, o2, lse2, do[..., keep, :])
    np.testing.assert_allclose(dq[..., keep, :], want[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dk, want[1], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dv, want[2], rtol=1e-12, atol=1e-14)


def test_torch_cpu_sdpa_also_gives_zero_for_a_row_without_keys():
    q = torch.ones(1, 1, 2, 2)
    mask = torch.tensor([[False, False], [True, True]])
    o = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert (o[0, 0, 0] == 0).all()


@pytest.mark.parametrize("magnitude", [1e3, 1e20])
def test_dv_with_a_float32_lse_and_large_scores(rng, magnitude):
    """Issue 17.6: the lse a float32 forward returns is rounded to float32; rebuilding P = exp(S - lse) from it put
    that rounding (|lse| * 6e-8) into every P: dV off by 1e-4 at |S| ~ 1e3, and 0 or nan at 1e20. The reference
    snaps an lse that is the rows' own, rounded, to the exact one and must be as accurate as torch's float32 autograd."""
    q = (magnitude * rng.standard_normal((1, 2, 8, 4))).astype(np.float32)
    k, v, do = (rng.standard_normal((1, 2, 8, 4)).astype(np.float32) for _ in range(3))
    o, lse = R.attention_forward(q, k, v)
    lse32 = lse.astype(np.float32)
    grads = R.attention_backward(q, k, v, o.astype(np.float32), lse32, do)
    t64 = [torch.tensor(a.astype(np.float64), requires_grad=True) for a in (q, k, v)]
    torch.nn.functional.scaled_dot_product_attention(*t64).backward(torch.tensor(do.astype(np.float64)))
    t32 = [torch.tensor(a, requires_grad=True) for a in (q, k, v)]
    torch.nn.functional.scaled_dot_product_attention(*t32).backward(torch.tensor(do))
    want, torch32 = t64[2].grad.numpy(), t32[2].grad.numpy()
    assert np.isfinite(grads[2]).all() and np.abs(grads[2]).max() > 0.1
    assert np.abs(grads[2] - want).max() <= max(2 * np.abs(torch32 - want).max(), 1e-6)


def test_lse_of_the_wrong_shape_is_refused(rng):
    q, k, v = qkv(rng, 1, 1, 4, 5, 3, np.float64)
    o, lse = R.attention_forward(q, k, v)
    with pytest.raises(ValueError, match="lse must have shape"):
        R.attention_backward(q, k, v, o, lse[..., :3], o)


def test_online_softmax_keeps_all_minus_inf_rows_at_zero():
    x = np.array([[-np.inf, -np.inf, -np.inf], [0.0, -np.inf, 1.0]])
    with np.errstate(all="raise"):                           # no nan from -inf - (-inf) anywhere
        for f in (osm.safe_softmax, osm.online_softmax):
            p = f(x)
            assert (p[0] == 0).all() and np.isclose(p[1].sum(), 1.0)
        m, l = osm.merge(-np.inf, 0.0, -np.inf, 0.0)
        assert np.isneginf(m) and l == 0
        m, l = osm.online_update(np.array(-np.inf), np.array(0.0), np.array([-np.inf, -np.inf]))
        assert np.isneginf(m) and l == 0
        m, l = osm.merge(m, l, np.float64(2.0), np.float64(3.0))
        assert m == 2.0 and l == 3.0


@pytest.mark.parametrize("chunk,err", [(0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError),
                                       ("4", TypeError), (None, TypeError)])
def test_chunk_must_be_a_positive_int(rng, chunk, err):
    q, k, v = qkv(rng, 1, 1, 3, 5, 2, np.float64)
    with pytest.raises(err, match="chunk must be a positive int"):
        osm.chunked_attention(q, k, v, chunk)
    np.testing.assert_allclose(osm.chunked_attention(q, k, v, np.int64(2)), R.attention_forward(q, k, v)[0], rtol=1e-12)
