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
