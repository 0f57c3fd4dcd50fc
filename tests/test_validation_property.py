"""Property test of the shared argument rules (issue 17.1, 17.2, 17.7): random shapes (GQA included), layouts
(transposed, negative-stride, Fortran-order views), dtypes, scales and causal flags through flashlib.attention,
attention_backward and flashlib.torch on the CPU backends. Every call either matches the float64 reference or
raises a TypeError / ValueError that names the bad argument."""
import fractions

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashlib
from flashlib import reference as R
from flashlib.torch import scaled_dot_product_attention as sdpa

GOOD_SCALES = [None, 0.3, 2, np.float32(0.7), np.int64(1), fractions.Fraction(1, 3), np.array(0.5)]
BAD_SCALES = [("0.5", TypeError), (True, TypeError), (-1.0, ValueError), (float("nan"), ValueError),
              (1j, TypeError), (np.array([0.5]), TypeError)]
BAD_CAUSAL = [1, 0, "False", None, np.array(True)]


def _layout(a, how):
    """The same values as a, stored another way."""
    if how == "transposed":
        return np.ascontiguousarray(a.swapaxes(-1, -2)).swapaxes(-1, -2)
    if how == "reversed":
        return np.ascontiguousarray(a[..., ::-1, :])[..., ::-1, :]
    if how == "fortran":
        return np.asfortranarray(a)
    return a


case = st.fixed_dictionaries(dict(
    B=st.integers(1, 2), Hkv=st.integers(1, 2), group=st.integers(1, 3), Nq=st.integers(1, 9),
    Nk=st.integers(1, 9), d=st.integers(1, 8), dtype=st.sampled_from([np.float32, np.float64]),
    layout=st.sampled_from(["contiguous", "transposed", "reversed", "fortran"]),
    scale=st.integers(0, len(GOOD_SCALES) + len(BAD_SCALES) - 1), causal=st.integers(0, len(BAD_CAUSAL) + 1),
    backend=st.sampled_from(["reference", "tiled", "torch"]), seed=st.integers(0, 2**16)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case)
def test_every_call_is_right_or_refused_clearly(c):
    rng = np.random.default_rng(c["seed"])
    H = c["Hkv"] * c["group"]
    q = _layout(rng.standard_normal((c["B"], H, c["Nq"], c["d"])).astype(c["dtype"]), c["layout"])
    k, v = (_layout(rng.standard_normal((c["B"], c["Hkv"], c["Nk"], c["d"])).astype(c["dtype"]), c["layout"])
            for _ in range(2))
    scales = GOOD_SCALES + [s for s, _ in BAD_SCALES]
    scale = scales[c["scale"]]
    causal = [False, True, *BAD_CAUSAL][c["causal"]]
    bad = (None if c["scale"] < len(GOOD_SCALES) else BAD_SCALES[c["scale"] - len(GOOD_SCALES)][1],
           TypeError if c["causal"] >= 2 else None)

    def call():
        if c["backend"] == "torch":
            t = [torch.from_numpy(np.ascontiguousarray(a)).requires_grad_() for a in (q, k, v)]
            o = sdpa(*t, is_causal=causal, scale=scale, enable_gqa=True)
            do = torch.ones_like(o)
            return o.detach().numpy(), [g.numpy() for g in torch.autograd.grad(o, t, do)]
        o, lse = flashlib.attention(q, k, v, causal=causal, scale=scale, backend=c["backend"], return_lse=True)
        grads = flashlib.attention_backward(q, k, v, o, lse, np.ones_like(o), causal=causal, scale=scale,
                                            backend=c["backend"])
        return o, grads

    if bad != (None, None):
        exc = bad[1] or bad[0]
        with pytest.raises(exc, match="causal" if bad[1] else "scale"):
            call()
        return
    o, (dq, dk, dv) = call()
    kk, vv = (np.repeat(np.asarray(a, np.float64), c["group"], axis=1) for a in (k, v))
    s = None if scale is None else float(scale)
    o_ref, lse_ref = R.attention_forward(q, kk, vv, causal=causal, scale=s)
    dq_ref, dkk, dvv = R.attention_backward(q, kk, vv, o_ref, lse_ref, np.ones_like(o_ref), causal=causal, scale=s)
    fold = lambda g: g.reshape(c["B"], c["Hkv"], c["group"], c["Nk"], c["d"]).sum(2)
    tol = dict(rtol=1e-4, atol=1e-5) if c["dtype"] == np.float32 else dict(rtol=1e-9, atol=1e-11)
    assert o.dtype == c["dtype"] and dk.shape == k.shape
    np.testing.assert_allclose(o, o_ref, **tol)
    np.testing.assert_allclose(dq, dq_ref, **tol)
    np.testing.assert_allclose(dk, fold(dkk), **tol)
    np.testing.assert_allclose(dv, fold(dvv), **tol)
