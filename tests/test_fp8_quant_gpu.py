"""The fused FP8 quantisation (fp8_quant.cu, fp8.quantize_fused) on a GPU against the torch reference
(fp8.quantize_reference) at ragged shapes, and the FP8 forward fed by it against float64 attention.

What may differ: with the rotation, fp8_quant.cu sums the fast Walsh-Hadamard transform in another order than the
float32 matmul, so the descales may differ by float32 rounding (relative 1e-5) and an e4m3 byte whose value lies
within that rounding of a rounding boundary may round to the neighbouring e4m3 value: at least 99.9 % of the bytes
must be equal and the rest one e4m3 step apart. Without the rotation the same bound applies (the numbers it
measured are printed: expected all equal, the scale rule being the same multiply). V^T's padding keys (past Nk, up to Nk rounded to 32) must be exactly 0x00.
Outputs are NaN-filled (0x7f) before the kernels write, so a byte left unwritten fails."""
import itertools
import zlib

import pytest

from flashlib.cupy_kernels import fp8

# (B, H, H_kv, Nq, Nk): Nq != Nk, lengths not multiples of 32 (V^T padding), GQA, a V^T tile boundary (128 keys),
# one row / one key
SHAPES = [(2, 4, 2, 1000, 77), (1, 3, 1, 1, 130), (1, 2, 2, 257, 1), (2, 2, 1, 65, 300)]
CASES = list(itertools.product(SHAPES, fp8.FP8_HEAD_DIMS, ("float16", "bfloat16"), (True, False)))


@pytest.fixture(scope="module", autouse=True)
def _precompiled():
    """Both passes for each dtype and head dim, compiled in parallel threads (once per process)."""
    import concurrent.futures
    import torch
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        jobs = [(t, d) for t in fp8.QUANT_DTYPES for d in fp8.FP8_HEAD_DIMS]
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as ex:
            list(ex.map(lambda j: fp8._quant_launchers(torch.cuda.current_device(), *j), jobs))


def _gpu():
    import torch
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("the fused FP8 quantisation needs a GPU of compute capability 8.9+")


def _inputs(shape, d, dtype, seed, outliers=1e-3):
    import torch
    B, H, Hkv, Nq, Nk = shape
    g = torch.Generator(device="cuda").manual_seed(seed)

    def mk(h, n):
        x = torch.randn(B, h, n, d, device="cuda", generator=g)
        big = torch.randn(B, h, n, d, device="cuda", generator=g) * 10
        return (x + big * (torch.rand(B, h, n, d, device="cuda", generator=g) < outliers)).to(getattr(torch, dtype))
    q, k, v = mk(H, Nq), mk(Hkv, Nk), mk(Hkv, Nk)
    q[0, -1] = 0                                          # an all-zero head: scale 1
    return q, k, v


def _order(u8):
    """e4m3 bytes as integers in the order of their values (sign-magnitude -> signed; +0 and -0 both 0)."""
    import torch
    u = u8.view(torch.uint8).to(torch.int32)
    return torch.where(u >= 128, -(u - 128), u)


def _compare_bytes(got, want, where):
    """Fraction of equal bytes (>= 99.9 %) and the rest one e4m3 step apart; returns the number that differ."""
    a, b = _order(got), _order(want)
    assert got.shape == want.shape, where
    differ = int((a != b).sum())
    assert differ <= 1e-3 * a.numel(), (where, differ, a.numel())
    assert int((a - b).abs().max()) <= 1, where
    return differ


def _poisoned(B, H, Hkv, Nq, Nk, d):
    import torch
    n32 = -(-Nk // 32) * 32
    return tuple(torch.full(s, 0x7F, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
                 for s in ((B, H, Nq, d), (B, Hkv, Nk, d), (B, Hkv, d, n32)))


@pytest.mark.gpu
@pytest.mark.parametrize("shape,d,dtype,hadamard", CASES, ids=str)
def test_fused_quantize_matches_the_reference(shape, d, dtype, hadamard):
    import torch
    _gpu()
    seed = zlib.crc32(repr((shape, d, dtype, hadamard)).encode())
    q, k, v = _inputs(shape, d, dtype, seed)
    out = _poisoned(*shape, d)
    got = fp8.quantize_fused(q, k, v, hadamard, seed=seed % 1000, out=out)
    want = fp8.quantize_reference(q, k, v, hadamard, seed=seed % 1000)
    torch.cuda.synchronize()
    where = (shape, d, dtype, hadamard)
    assert all(g is o for g, o in zip(got[:3], out)) and got.Nk == want.Nk == shape[4]
    rtol = 1e-5 if hadamard else 1e-6
    for name, a, b in zip(("q_descale", "k_descale", "v_descale"), got[3:6], want[3:6]):
        assert a.shape == b.shape and a.dtype == torch.float32, (where, name)
        assert torch.allclose(a, b, rtol=rtol, atol=0), (where, name, (a / b - 1).abs().max())
    assert float(got.q_descale[0, -1]) == 1.0, where                   # the all-zero head
    differ = [_compare_bytes(a, b, (where, name)) for name, a, b in zip(("q8", "k8", "vt8"), got[:3], want[:3])]
    col = torch.arange(got.vt8.shape[-1])
    key = 32 * (col // 32) + torch.as_tensor(fp8.key_permutation())[col % 32]
    pad = (key >= shape[4]).cuda()                                       # the columns of keys past Nk: +0 exactly
    assert (got.vt8.view(torch.uint8)[..., pad] == 0).all() and int(pad.sum()) == col.numel() - shape[4], where
    print(where, "bytes that differ (q8, k8, vt8):", differ)


@pytest.mark.gpu
def test_fused_quantize_refuses_what_it_cannot_take():
    import torch
    _gpu()
    q = torch.zeros(1, 2, 8, 64, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match="head_dim"):
        fp8.quantize_fused(q[..., :32].contiguous(), q[..., :32].contiguous(), q[..., :32].contiguous())
    with pytest.raises(ValueError, match="one dtype"):
        fp8.quantize_fused(q, q.bfloat16(), q)
    with pytest.raises(ValueError, match="float16 or torch.bfloat16"):
        fp8.quantize_fused(q.float(), q, q)
    with pytest.raises(ValueError, match="k and v"):
        fp8.quantize_fused(q, q, q[:, :, :4])
    with pytest.raises(ValueError, match="vt8 must have shape"):
        fp8.quantize_fused(q, q, q, out=_poisoned(1, 2, 2, 8, 8, 64)[:2] + _poisoned(1, 2, 2, 8, 40, 64)[2:])
    inp = fp8.quantize(q, q, q)                                          # zeros: scale 1, bytes 0
    assert (inp.q_descale == 1).all() and (inp.vt8.view(torch.uint8) == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("d", fp8.FP8_HEAD_DIMS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_forward_fp8_on_fused_inputs_against_float64(d, dtype):
    """forward_fp8 (quantize -> the fused kernels) within tests/test_fp8_gpu.py's FP8 bounds against float64
    attention, ragged and GQA, with and without the rotation; and the same bits as the kernel on the fused inputs."""
    import torch
    from tests import test_fp8_gpu as t8
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("fa3_fp8 runs on Hopper only")
    out = "float16" if dtype == "float16" else "bfloat16"
    t8._check(2, 4, 2, 131, 333, d, False, hadamard=True, out=out)
    t8._check(1, 2, 1, 97, 45, d, True, hadamard=False, out=out)
    q, k, v = _inputs((1, 2, 1, 100, 150), d, dtype, seed=d)
    o, lse = fp8.forward_fp8(q, k, v, causal=True, seed=3)
    o2, lse2 = fp8.forward_fp8_prepared(fp8.quantize_fused(q, k, v, True, 3), causal=True, out=dtype)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)
