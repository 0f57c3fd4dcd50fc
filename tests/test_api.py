"""flashlib.attention / attention_backward: results, array kinds, and the bad-input table."""
import numpy as np
import pytest
import torch

import flashlib
from flashlib import reference as R
from tests.conftest import qkv


@pytest.mark.parametrize("backend", ["reference", "tiled"])
@pytest.mark.parametrize("causal", [False, True])
def test_host_backends_forward_and_backward(rng, backend, causal):
    q, k, v = qkv(rng, 2, 3, 21, 34, 10)
    o, lse = flashlib.attention(q, k, v, causal=causal, scale=0.2, backend=backend, return_lse=True)
    ref_o, ref_lse = R.attention_forward(q, k, v, causal, 0.2)
    assert o.dtype == np.float32 and lse.dtype == np.float32 and lse.shape == (2, 3, 21)
    np.testing.assert_allclose(o, ref_o, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5)
    do = rng.standard_normal(o.shape).astype(np.float32)
    grads = flashlib.attention_backward(q, k, v, o, lse, do, causal=causal, scale=0.2, backend=backend)
    for g, want in zip(grads, R.attention_backward(q, k, v, ref_o, ref_lse, do, causal, 0.2)):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-5)


def test_returns_the_callers_kind_and_dtype(rng):
    q, k, v = (torch.tensor(a) for a in qkv(rng, 1, 2, 9, 9, 8))
    o = flashlib.attention(q, k, v, backend="tiled")
    assert isinstance(o, torch.Tensor) and o.dtype == torch.float32
    np.testing.assert_allclose(o.numpy(), torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)
    qb = q.to(torch.bfloat16)
    assert flashlib.attention(qb, qb, qb, backend="reference").dtype == torch.bfloat16
    q64 = np.asarray(q, np.float64)
    assert flashlib.attention(q64, q64, q64).dtype == np.float64


def test_auto_uses_reference_without_gpu(rng):
    if flashlib.gpu_count():
        pytest.skip("a GPU is present")
    q, k, v = qkv(rng, 1, 1, 5, 5, 4)
    np.testing.assert_allclose(flashlib.attention(q, k, v), R.attention_forward(q, k, v)[0], rtol=1e-6)


def _arrays(shape_q=(1, 2, 8, 4), shape_k=(1, 2, 8, 4), shape_v=None, dtype=np.float32):
    z = lambda s: np.zeros(s, dtype)
    return z(shape_q), z(shape_k), z(shape_v or shape_k)


BAD = [
    ("rank", dict(args=_arrays((2, 8, 4), (2, 8, 4))), ValueError, "4 dimensions"),
    ("empty", dict(args=_arrays((1, 2, 0, 4), (1, 2, 8, 4))), ValueError, "empty"),
    ("batch", dict(args=_arrays((2, 2, 8, 4), (1, 2, 8, 4))), ValueError, "batch and heads"),
    ("kv length", dict(args=_arrays((1, 2, 8, 4), (1, 2, 8, 4), (1, 2, 9, 4))), ValueError, "same sequence length"),
    ("head dim", dict(args=_arrays((1, 2, 8, 4), (1, 2, 8, 5))), ValueError, "head_dim"),
    ("dtype", dict(args=_arrays(dtype=np.int32)), TypeError, "unsupported dtype int32"),
    ("mixed dtype", dict(args=(np.zeros((1, 1, 2, 2), np.float32), np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2)))),
     TypeError, "one dtype"),
    ("mixed kinds", dict(args=(torch.zeros(1, 1, 2, 2), np.zeros((1, 1, 2, 2), np.float32),
                               np.zeros((1, 1, 2, 2), np.float32))), TypeError, "same kind"),
    ("not an array", dict(args=([[1.0]], [[1.0]], [[1.0]])), TypeError, "expected a NumPy"),
    ("scale", dict(args=_arrays(), scale=-1.0), ValueError, "scale"),
    ("scale nan", dict(args=_arrays(), scale=float("nan")), ValueError, "scale"),
    ("causal", dict(args=_arrays(), causal="yes"), TypeError, "causal"),
    ("backend", dict(args=_arrays(), backend="triton"), ValueError, "unknown backend 'triton'"),
]


@pytest.mark.parametrize("name,kw,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_error(name, kw, exc, msg):
    kw = dict(kw)
    with pytest.raises(exc, match=msg):
        flashlib.attention(*kw.pop("args"), **kw)


def test_unavailable_backend_names_the_available_ones():
    missing = [b for b in flashlib.BACKENDS if b not in flashlib.available_backends()]
    if not missing:
        pytest.skip("every backend is available here")
    with pytest.raises(RuntimeError, match="Available here: reference, tiled"):
        flashlib.attention(*_arrays(), backend=missing[0])


def test_backward_checks_its_extra_arguments(rng):
    q, k, v = qkv(rng, 1, 1, 6, 7, 4)
    o, lse = flashlib.attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match="lse must have shape"):
        flashlib.attention_backward(q, k, v, o, lse[..., :3], o)
    with pytest.raises(ValueError, match="do must have q's shape"):
        flashlib.attention_backward(q, k, v, o, lse, o[..., :3, :])


def test_host_torch_tensors_come_back_on_the_host_from_a_device_backend(rng):
    """A CPU tensor sent to the numba backend (the simulator here, the GPU on a GPU machine) returns on the CPU."""
    if "numba" not in flashlib.available_backends():
        pytest.skip("no numba backend here")
    q, k, v = (torch.tensor(a) for a in qkv(rng, 1, 1, 9, 7, 4))
    o, lse = flashlib.attention(q, k, v, backend="numba", return_lse=True)
    assert o.device.type == "cpu" and lse.device.type == "cpu" and o.dtype == torch.float32
    np.testing.assert_allclose(o.numpy(), R.attention_forward(q.numpy(), k.numpy(), v.numpy())[0], rtol=1e-5, atol=1e-6)


def test_lse_is_type_checked(rng):
    """Issue 17.7: a list lse gave AttributeError, a torch lse beside NumPy q was accepted."""
    q, k, v = qkv(rng, 1, 1, 6, 7, 4)
    o, lse = flashlib.attention(q, k, v, return_lse=True)
    for bad, exc in ((lse.tolist(), TypeError), (torch.tensor(lse), TypeError), (lse.astype(np.float16), TypeError)):
        with pytest.raises(exc, match="lse"):
            flashlib.attention_backward(q, k, v, o, bad, o)


@pytest.mark.parametrize("scale", [np.int64(2), np.array(0.5), np.float16(0.25), __import__("fractions").Fraction(1, 3), 3])
def test_real_scales_are_taken(rng, scale):
    q, k, v = qkv(rng, 1, 2, 5, 6, 4)
    np.testing.assert_allclose(flashlib.attention(q, k, v, scale=scale, backend="reference"),
                               R.attention_forward(q, k, v, scale=float(scale))[0], rtol=1e-6)


@pytest.mark.parametrize("scale,exc", [(True, TypeError), (np.bool_(True), TypeError), ("0.5", TypeError),
                                       (np.array([0.5]), TypeError), (np.array("1"), TypeError), (0, ValueError),
                                       (1 + 0j, TypeError)])
def test_non_real_scales_are_refused(scale, exc):
    with pytest.raises(exc, match="scale"):
        flashlib.attention(*_arrays(), scale=scale)


@pytest.mark.parametrize("causal", [1, 0, "False", None, np.array(True)])
def test_causal_must_be_a_bool(causal):
    with pytest.raises(TypeError, match="causal"):
        flashlib.attention(*_arrays(), causal=causal)


@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_grouped_query_attention(rng, backend):
    """k, v with H_kv = 2 heads for q's 6: query head h reads kv head h // 3; dk, dv summed over each group."""
    q = rng.standard_normal((2, 6, 9, 5))
    k, v = rng.standard_normal((2, 2, 11, 5)), rng.standard_normal((2, 2, 11, 5))
    kk, vv = np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1)
    o, lse = flashlib.attention(q, k, v, causal=True, backend=backend, return_lse=True)
    o_ref, lse_ref = R.attention_forward(q, kk, vv, causal=True)
    np.testing.assert_allclose(o, o_ref, rtol=1e-10, atol=1e-12)
    do = rng.standard_normal(q.shape)
    dq, dk, dv = flashlib.attention_backward(q, k, v, o, lse, do, causal=True, backend=backend)
    dq_ref, dkk, dvv = R.attention_backward(q, kk, vv, o_ref, lse_ref, do, causal=True)
    assert dk.shape == k.shape and dv.shape == v.shape
    np.testing.assert_allclose(dq, dq_ref, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dk, dkk.reshape(2, 2, 3, 11, 5).sum(2), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dv, dvv.reshape(2, 2, 3, 11, 5).sum(2), rtol=1e-9, atol=1e-11)
