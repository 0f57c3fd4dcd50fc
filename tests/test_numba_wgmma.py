"""flashlib.numba_kernels.wgmma and fa2_wgmma: Hopper's warpgroup MMA from Numba (sm_90a).

Without a GPU: `cuda.compile_ptx(..., cc=(9, 0, "a"))` + `ptxas -arch=sm_90a -v` of the kernel's instances and of the
intrinsics' probe kernels (a subprocess without the simulator, beside the other tests): the target is sm_90a, every
wgmma is there, fully unrolled, no local memory, no spills, and no ptxas performance advisory (a wgmma serialised,
an injected warpgroup.arrive; a kernel built to draw one shows the check can see it); sm_90 code is refused.
`gpu` tests (a Hopper GPU): the probes against NumPy products, the kernel against the float64 reference.
"""
import math
import zlib

import numpy as np
import pytest

from tests.conftest import ptx_script, ptx_script_rows

from flashlib.cupy_kernels import config_hopper  # noqa: E402
from flashlib.numba_kernels import fa2_wgmma, lanes, wgmma  # noqa: E402
from tests.test_numba_tc import _check_against_reference, _torch_inputs  # noqa: E402

PROBES = [(64, "float16", "ss", 0), (64, "bfloat16", "rs", 1), (128, "float16", "rs", 0), (128, "bfloat16", "ss", 1)]

# ---------------------------------------------------------------- PTX and ptxas, without a GPU
PTX_SCRIPT = """
import json
from llvmlite import ir
from numba import cuda, float32, uint32
from flashlib.numba_kernels import fa2_wgmma, ptx, wgmma
rows = ptx.wgmma_report()
PROBE_SIG = "void(uint32[:, ::1], uint32[:, ::1], float32[:, ::1])"
probes = []
for args in %r:
    text = cuda.compile_ptx(wgmma.make_probe(*args).py_func, PROBE_SIG, cc=fa2_wgmma.CC)[0]
    probes.append({"args": list(args), "wgmma": text.count("wgmma.mma_async"), **ptx.ptxas(text, fa2_wgmma.CC)})
MMA = wgmma.mma_rs(64, "float16")

@cuda.jit
def unpinned(x, y, out):              # a wgmma's registers written while another is in flight: ptxas injects an arrive
    acc = cuda.local.array(32, float32)
    acc2 = cuda.local.array(32, float32)
    wgmma.fence()
    MMA(acc, x[0], x[1], x[2], x[3], 0, 0, 0)
    for i in range(32):
        acc2[i] = y[i]
    MMA(acc2, x[4], x[5], x[6], x[7], 0, 1, 0)
    wgmma.commit()
    wgmma.wait(0)
    for i in range(32):
        out[i] = acc[i] + acc2[i]
control = ptx.ptxas(cuda.compile_ptx(unpinned.py_func, "void(uint32[::1], float32[::1], float32[::1])",
                                       cc=fa2_wgmma.CC)[0],
                    fa2_wgmma.CC)
kern = fa2_wgmma.make_fa2_wgmma(64, 2, 64, "float16")[0]
text = cuda.compile_ptx(kern.py_func, fa2_wgmma.SIG, cc=(9, 0))[0]
try:
    ptx.ptxas(text, (9, 0))
    sm90 = "accepted"
except RuntimeError as e:
    sm90 = str(e)
print(json.dumps({"rows": rows, "probes": probes, "control": control, "sm90": sm90,
                  "targets_sm90a": fa2_wgmma.numba_targets_sm90a()}))
""" % (PROBES,)


def ptx_jobs():
    return ptx_script(PTX_SCRIPT, 40, "test_numba_wgmma")   # a rough number of seconds


BACKGROUND = {"test_ptx_kernel_has_its_wgmma_and_no_local_memory": ptx_jobs,
              "test_ptx_probes_and_the_target": ptx_jobs}


@pytest.fixture(scope="module")
def ptx_rows():
    return ptx_script_rows(ptx_jobs())


def test_ptx_kernel_has_its_wgmma_and_no_local_memory(ptx_rows):
    rows = ptx_rows["rows"]
    assert {(int(r["kernel"].split("D=")[1].split()[0]), tuple(r["tiles"])) for r in rows if "float16" in r["kernel"]} \
        == {(D, t) for D in fa2_wgmma.HEAD_DIMS for t in fa2_wgmma.TILES[D]}
    for r in rows:
        where = f"{r['kernel']}: {r}"
        D = int(r["kernel"].split("D=")[1].split()[0])
        NWG, Bc = r["tiles"]
        KD, KB = D // 16, Bc // 16
        assert r["target"] == "sm_90a", where
        # S = Q K^T in the first step, S and P V in the loop, P V in the last step: every loop unrolled
        assert r["wgmma"] == 2 * (KD + KB), where
        assert r["wgmma_bf16"] == (r["wgmma"] if "bfloat16" in r["kernel"] else 0), where
        assert (r["fence"], r["commit"], r["wait"], r["fence_proxy"]) == (3, 4, 4, 3), where
        assert r["ldmatrix"] == KD, where                       # Q's A fragments, once
        assert r["cp_async"] > 0 and r["shfl"] >= 8, where
        assert r["spill_stores"] == r["spill_loads"] == r["stack"] == 0, where
        assert r["advisories"] == [], where                     # no serialised wgmma, no injected arrive
        assert r["registers"] <= 255 and r["registers"] * r["threads"] <= 65536, where
        assert r["smem"] == 0 and r["dyn_smem"] == config_hopper.smem_wgmma(D, NWG, Bc) <= 227 * 1024, where


def test_ptx_probes_and_the_target(ptx_rows):
    for p in ptx_rows["probes"]:
        assert p["wgmma"] == 4 and p["advisories"] == [] and p["stack"] == 0, p
    assert "C7519" in ptx_rows["control"]["advisories"], ptx_rows["control"]   # the check sees an injected arrive
    assert "ptxas failed for sm_90" in ptx_rows["sm90"] and "not supported on .target 'sm_90'" in ptx_rows["sm90"]
    assert ptx_rows["targets_sm90a"]            # this numba-cuda takes the suffix (the kernel's host check)


# ---------------------------------------------------------------- Python-side checks
def test_sw128_is_rung_6s_layout():
    """The device function is config_hopper.sw128 compiled: a permutation of 16-byte chunks within each 8-row atom."""
    assert wgmma.sw128.py_func is config_hopper.sw128
    offs = sorted(config_hopper.sw128(r, c, 64) for r in range(64) for c in range(0, 128, 8))
    assert offs == list(range(0, 64 * 256, 16))


def test_checks_name_what_is_wrong():
    with pytest.raises(ValueError, match="Hopper"):
        fa2_wgmma.check(64, "float16", (8, 0))
    with pytest.raises(ValueError, match="Hopper"):
        fa2_wgmma.check(64, "float16", (10, 0))
    fa2_wgmma.check(128, "bfloat16", (9, 0))
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        fa2_wgmma.check(64, "float32")
    with pytest.raises(ValueError, match="head dims"):
        fa2_wgmma.check(96, "float16")
    with pytest.raises(ValueError, match="NWG 1 or 2"):
        fa2_wgmma.make_fa2_wgmma(64, 3, 64, "float16")
    with pytest.raises(ValueError, match="N = 64 or 128"):
        wgmma.mma_rs(96, "float16")


def test_simulator_refuses_the_kernel(rng):
    from tests.conftest import HAS_GPU
    if HAS_GPU:
        pytest.skip("a GPU is present")
    q = rng.standard_normal((1, 1, 8, 64)).astype(np.float16)
    with pytest.raises(RuntimeError, match="simulator"):
        fa2_wgmma.fa2_forward_wgmma(q, q, q)


# ---------------------------------------------------------------- real GPU (Hopper)
def _hopper():
    from flashlib.numba_kernels import host
    if tuple(host.device_cc()) != (9, 0):
        pytest.skip("needs a Hopper GPU (sm_90)")


@pytest.mark.gpu
@pytest.mark.parametrize("N,dtype,form,trans_b", PROBES)
def test_gpu_probe_is_a_matrix_product(rng, N, dtype, form, trans_b):
    from numba import cuda
    _hopper()
    A = lanes.from_bits(lanes.to_bits(rng.standard_normal((64, 64)), dtype), dtype)
    Bm = lanes.from_bits(lanes.to_bits(rng.standard_normal((64, N)), dtype), dtype)   # B: k x n
    stored = Bm if trans_b else Bm.T                                                # MN-major: B; K-major: B^T
    words = lambda x: np.ascontiguousarray(lanes.to_bits(x, dtype)).view(np.uint32)  # noqa: E731
    out = cuda.to_device(np.full((64, N), np.nan, np.float32))
    wgmma.make_probe(N, dtype, form, trans_b)[1, 128](words(A), words(np.ascontiguousarray(stored)), out)
    np.testing.assert_allclose(out.copy_to_host(), A.astype(np.float64) @ Bm, rtol=1e-5, atol=1e-4)


GPU_SHAPES = [(1, 1, 1, 1, 64), (2, 3, 77, 131, 64), (1, 2, 1000, 999, 64), (1, 1, 513, 2049, 128),
              (1, 2, 300, 257, 128), (3, 2, 17, 333, 128), (1, 1, 4096, 4096, 64), (1, 1, 129, 65, 100),
              (1, 1, 64, 64, 128), (2, 1, 200, 190, 40)]


def _run(q, k, v, causal, scale, dtype, **kw):
    """fa2_forward_wgmma on Numba views of torch tensors (bf16 as int16 bits), outputs NaN-poisoned first."""
    import torch
    from numba import cuda
    bits = (lambda t: t.view(torch.int16)) if dtype == "bfloat16" else (lambda t: t)
    o = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device="cuda", dtype=torch.float32)
    nq, nk_, nv, no = (cuda.as_cuda_array(bits(t)) for t in (q, k, v, o))
    fa2_wgmma.fa2_forward_wgmma(nq, nk_, nv, causal=causal, scale=scale, dtype=dtype, o=no,
                                lse=cuda.as_cuda_array(lse), **kw)
    cuda.synchronize()
    return o, lse


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_forward_matches_reference(shape, dtype, causal):
    _hopper()
    q, k, v = _torch_inputs(shape, dtype, seed=zlib.crc32(repr((shape, dtype, causal, "wgmma")).encode()))
    scale = 1 / math.sqrt(shape[4])
    o, lse = _run(q, k, v, causal, scale, dtype)
    _check_against_reference(q, k, v, o, lse, causal, scale, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tiles", [(1, 64), (2, 64), (1, 128), (2, 128)])   # the default and rung 6's among them
def test_gpu_other_tiles(d, causal, tiles):
    _hopper()
    q, k, v = _torch_inputs((2, 2, 333, 517, d), "float16", seed=11)
    o, lse = _run(q, k, v, causal, 0.125, "float16", tiles=tiles)
    _check_against_reference(q, k, v, o, lse, causal, 0.125, "float16")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_grouped_query_and_the_public_call(causal):
    """H = 6 query heads on 2 kv heads, through numba_kernels.forward(variant='wgmma'); the reference sees each kv
    head repeated for its 3 query heads."""
    import torch
    from numba import cuda
    from flashlib import numba_kernels as nk
    _hopper()
    q = _torch_inputs((2, 6, 250, 10, 64), "float16", seed=5)[0]
    _, k, v = _torch_inputs((2, 2, 1, 301, 64), "float16", seed=6)
    o, lse = nk.forward(*(cuda.as_cuda_array(t) for t in (q, k, v)), causal=causal, dtype="float16", variant="wgmma")
    o, lse = torch.as_tensor(o, device="cuda"), torch.as_tensor(lse, device="cuda")
    kr, vr = (t.repeat_interleave(3, dim=1) for t in (k, v))
    _check_against_reference(q, kr, vr, o, lse, causal, 1 / 8, "float16")
