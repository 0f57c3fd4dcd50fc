"""Property tests (hypothesis): random shapes, memory layouts, dtypes, scales and masks through every backend that
runs on a CPU (the NumPy algorithms, flashlib.attention with backend reference/tiled, the Numba kernels in the
simulator), each compared with the float64 reference; bad input must raise a clear ValueError or TypeError.

Layouts: C order, transposed views, negative strides, Fortran order, read-only, stride 0 (np.broadcast_to /
torch.expand). The float64 truth is computed on the very values each backend received.
"""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import flashlib
from flashlib import block_sparse, reference as R, tiled as T

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LAYOUTS = ("C", "transposed", "negative", "fortran", "readonly", "stride0")
EPS = {"float64": 1e-13, "float32": 1e-6, "float16": 1e-3, "bfloat16": 8e-3}


def lay_out(x, how):
    """x in another memory layout: the same values, except stride0, which repeats x's first row along axis -2."""
    if how == "transposed":
        return np.ascontiguousarray(np.swapaxes(x, -1, -2)).swapaxes(-1, -2)
    if how == "negative":
        return np.ascontiguousarray(x[..., ::-1, ::-1])[..., ::-1, ::-1]
    if how == "fortran":
        return np.asfortranarray(x)
    if how == "readonly":
        x = x.copy()
        x.flags.writeable = False
        return x
    if how == "stride0":
        return np.broadcast_to(x[..., :1, :], x.shape)
    return x


def to_torch(x, dtype, how):
    t = torch.tensor(np.ascontiguousarray(x), dtype=getattr(torch, dtype))
    if how == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if how == "stride0":
        return t[..., :1, :].expand(t.shape)
    return t


def f64(x):
    return (x.float() if x.dtype == torch.bfloat16 else x).numpy().astype(np.float64) if isinstance(x, torch.Tensor) \
        else np.asarray(x, np.float64)


@st.composite
def problems(draw, gqa=True, max_n=12, max_d=9, dtypes=("float64", "float32", "float16"), torch_inputs=False):
    B, H_kv = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2]))
    H = H_kv * (draw(st.sampled_from([1, 2, 3])) if gqa else 1)
    Nq, Nk, d = draw(st.integers(1, max_n)), draw(st.integers(1, max_n)), draw(st.integers(1, max_d))
    dtype = draw(st.sampled_from(dtypes + (("bfloat16",) if torch_inputs else ())))
    kind = "torch" if torch_inputs and (dtype == "bfloat16" or draw(st.booleans())) else "numpy"
    layouts = ("C", "transposed", "stride0") if kind == "torch" else LAYOUTS
    how = [draw(st.sampled_from(layouts)) for _ in range(4)]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shapes = ((B, H, Nq, d), (B, H_kv, Nk, d), (B, H_kv, Nk, d), (B, H, Nq, d))
    arrays = [rng.standard_normal(s) for s in shapes]
    if kind == "torch":
        q, k, v, do = (to_torch(a, dtype, h) for a, h in zip(arrays, how))
    else:
        q, k, v, do = (lay_out(a.astype(dtype), h) for a, h in zip(arrays, how))
    return dict(q=q, k=k, v=v, do=do, dtype=dtype, causal=draw(st.booleans()),
                scale=draw(st.one_of(st.none(), st.floats(0.05, 3.0))), layouts=how)


def truth(p, mask=None):
    """Float64 O, lse and (dq, dk, dv) of the values p holds, with dO = p['do']."""
    q, k, v, do = (f64(p[n]) for n in ("q", "k", "v", "do"))
    o, lse = R.attention_forward(q, k, v, p["causal"], p["scale"], mask=mask)
    return o, lse, R.attention_backward(q, k, v, o, lse, do, p["causal"], p["scale"], mask=mask)


def close(got, want, dtype, factor=8.0):
    got = f64(got)
    assert got.shape == want.shape
    eps = factor * EPS[dtype]
    np.testing.assert_allclose(got, want, rtol=eps, atol=eps * max(1.0, np.abs(want).max()))


@settings(max_examples=150, **SETTINGS)
@given(problems(), st.integers(1, 13), st.integers(1, 13))
def test_numpy_algorithms_match_the_reference(p, Br, Bc):
    """reference, tiled.fa1_forward / fa2_forward / backward (GQA included) on any layout and dtype."""
    o, lse, grads = truth(p)
    args = (p["q"], p["k"], p["v"], p["causal"], p["scale"])
    o_ref, lse_ref = R.attention_forward(*args)
    close(o_ref, o, "float64"), close(lse_ref, lse, "float64")
    for fwd in (T.fa1_forward, T.fa2_forward):
        o2, lse2 = fwd(*args, Br=Br, Bc=Bc)
        close(o2, o, "float64", 1e3), close(lse2, lse, "float64", 1e3)
    mine = T.backward(p["q"], p["k"], p["v"], o, lse, p["do"], p["causal"], p["scale"], Br=Br, Bc=Bc)
    for g, want in zip(mine, grads):
        close(g, want, "float64", 1e4)


@settings(max_examples=40, **SETTINGS)
@given(problems(), st.integers(1, 6), st.integers(1, 6), st.floats(0.0, 1.0), st.integers(0, 2**32 - 1))
def test_block_sparse_matches_the_masked_reference(p, Br, Bc, density, seed):
    """Random block masks, rows with no visible tile included: those give O = 0 and lse = -inf."""
    Nq, Nk = p["q"].shape[-2], p["k"].shape[-2]
    mask = np.random.default_rng(seed).random((T.n_blocks(Nq, Br), T.n_blocks(Nk, Bc))) < density
    o, lse, _ = truth(p, block_sparse.expand(mask, Nq, Nk, Br, Bc))
    o2, lse2 = block_sparse.fa2_forward(p["q"], p["k"], p["v"], mask, p["causal"], p["scale"], Br=Br, Bc=Bc)
    close(o2, o, "float64", 1e3)
    np.testing.assert_array_equal(np.isneginf(lse2), np.isneginf(lse))
    close(np.where(np.isneginf(lse), 0, lse2), np.where(np.isneginf(lse), 0, lse), "float64", 1e3)


@settings(max_examples=100, **SETTINGS)
@given(problems(gqa=False, torch_inputs=True), st.sampled_from(["reference", "tiled"]))
def test_public_api_matches_the_reference(p, backend):
    """flashlib.attention and attention_backward on NumPy arrays and CPU tensors of every dtype and layout."""
    o, lse, grads = truth(p)
    q, k, v, do = p["q"], p["k"], p["v"], p["do"]
    o2, lse2 = flashlib.attention(q, k, v, causal=p["causal"], scale=p["scale"], backend=backend, return_lse=True)
    assert type(o2) is type(q) and str(o2.dtype).replace("torch.", "") == p["dtype"]
    close(o2, o, p["dtype"]), close(lse2, lse, "float32" if p["dtype"] != "float64" else "float64")
    mine = flashlib.attention_backward(q, k, v, o2, lse2, do, causal=p["causal"], scale=p["scale"], backend=backend)
    for g, want, x in zip(mine, grads, (q, k, v)):
        assert type(g) is type(x) and tuple(g.shape) == tuple(x.shape)
        close(g, want, p["dtype"], 40.0)                  # o, lse and dO arrive rounded to the dtype


def corrupt(p, how):
    """p with one thing wrong: (call arguments, keyword arguments)."""
    q, k, v = p["q"], p["k"], p["v"]
    kw = dict(causal=p["causal"], scale=p["scale"], backend="reference")
    if how == "int dtype":
        q = np.asarray(f64(q)).astype(np.int32)
    elif how == "complex dtype":
        k = np.asarray(f64(k)).astype(np.complex64)
    elif how == "bool dtype":
        v = np.asarray(f64(v)) > 0
    elif how == "mixed dtypes":
        v = np.asarray(f64(v)).astype(np.float32 if p["dtype"] == "float64" else np.float64)
    elif how == "3-d q":
        q = q[0]
    elif how == "head dims differ":
        k = np.concatenate([f64(k), f64(k)], axis=-1)
    elif how == "k and v lengths differ":
        v = np.concatenate([f64(v), f64(v)[..., :1, :]], axis=-2)
    elif how == "empty":
        q = np.asarray(f64(q))[..., :0, :]
    elif how == "a list":
        q = f64(q).tolist()
    else:                                                  # a bad keyword: name=value
        name, value = how.split("=", 1)
        kw[name] = {"'False'": "False", "1": 1, "None": None, "0.0": 0.0, "-1.0": -1.0, "nan": float("nan"),
                    "inf": float("inf"), "'0.5'": "0.5", "'fast'": "fast"}[value]
    return (q, k, v), kw


BAD = ("int dtype", "complex dtype", "bool dtype", "mixed dtypes", "3-d q", "head dims differ",
       "k and v lengths differ", "empty", "a list", "causal='False'", "causal=1", "causal=None", "scale=0.0",
       "scale=-1.0", "scale=nan", "scale=inf", "scale='0.5'", "backend='fast'")


@settings(max_examples=60, **SETTINGS)
@given(problems(gqa=False, max_n=6, max_d=4), st.sampled_from(BAD))
def test_public_api_refuses_bad_input_clearly(p, how):
    args, kw = corrupt(p, how)
    with pytest.raises((ValueError, TypeError)) as e:
        flashlib.attention(*args, **kw)
    assert len(str(e.value)) > 20, str(e.value)


@settings(max_examples=30, **SETTINGS)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.sampled_from(["Br", "Bc"]),
       st.sampled_from([0, -1, -16, 2.0, "8", None, True]))
def test_block_sizes_are_checked(Nq, Nk, d, name, value):
    q, k = np.ones((1, 1, Nq, d)), np.ones((1, 1, Nk, d))
    with pytest.raises((ValueError, TypeError), match=f"{name} must be a positive int"):
        T.fa2_forward(q, k, k, **{name: value})


@settings(max_examples=12, **SETTINGS)
@given(problems(gqa=False, max_n=8, max_d=8, dtypes=("float32",)))
def test_numba_kernels_in_the_simulator_match_the_reference(p):
    """The Numba backend (here in the CUDA simulator, tiny shapes) on host float32 arrays of any layout."""
    o, lse, grads = truth(p)
    q, k, v, do = p["q"], p["k"], p["v"], p["do"]
    o2, lse2 = flashlib.attention(q, k, v, causal=p["causal"], scale=p["scale"], backend="numba", return_lse=True)
    close(o2, o, "float32", 20.0), close(lse2, lse, "float32", 20.0)
    mine = flashlib.attention_backward(q, k, v, o2, lse2, do, causal=p["causal"], scale=p["scale"], backend="numba")
    for g, want in zip(mine, grads):
        close(g, want, "float32", 100.0)
