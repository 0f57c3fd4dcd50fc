"""The cupy backend's launch layer without a GPU: plans are built once per configuration, outputs are allocated by
the caller's library (torch here), the grid rule and argument lists reach the kernel, and the launch goes to the
stream the caller's library reports. A recording fake stands in for the compiled kernels."""
import math

import numpy as np
import pytest
import torch

from flashlib import cupy_kernels as ck


class Recorder:
    """Stands in for build.Launcher: records each launch with the kernel's parameter signature."""
    ctx = 0x77                                       # the CUDA context it was loaded in (build.Launcher.ctx)

    def __init__(self, name, sig, log):
        self.name, self.sig, self.log = name, sig, log

    def __call__(self, grid, block, args, shared_mem=0, stream=0):
        assert len(args) == len(self.sig), (self.name, self.sig, args)
        self.log.append(dict(kernel=self.name, grid=grid, block=block, args=args, smem=shared_mem, stream=stream,
                             sig=self.sig))

    def launch(self, gx, gy, gz, bx, by, bz, shared_mem, stream, args):
        assert (by, bz) == (1, 1)
        self((gx, gy, gz), (bx,), args, shared_mem, stream)


COUNTERS = {}   # the fake tma.counter's answers: an address per (device, stream, context)


@pytest.fixture
def fake_gpu(monkeypatch):
    log, built = [], []
    monkeypatch.setattr(ck.launch, "_device_cc", lambda device: 90)
    monkeypatch.setattr(ck.launch, "_kernel_on", lambda device, file, name, smem=0, arch=None, sig="":
                        built.append(name) or Recorder(name, sig, log))
    monkeypatch.setattr(ck.callers, "_torch_stream", lambda dev: 0xABC)
    monkeypatch.setattr(ck.callers, "_torch_cuda_device", lambda t: 0)     # CPU tensors stand in for CUDA ones
    monkeypatch.setattr(ck.launch, "_tensor_map", lambda ptr, *dims: ("map", ptr) + dims)   # libcuda's encoder
    monkeypatch.setattr(ck.launch, "_rows_map", lambda ptr, *dims: ("rows map", ptr) + dims)
    monkeypatch.setattr(ck.launch, "_sm_count", lambda device: 132)
    monkeypatch.setattr(ck.launch, "_counter", lambda device, stream, ctx: COUNTERS.setdefault((device, stream, ctx),
                                                                                               0xC000 + 256 * len(COUNTERS)))
    COUNTERS.clear()
    ck.forward_plan.cache_clear()
    ck.backward_plan.cache_clear()
    yield log, built
    ck.forward_plan.cache_clear()
    ck.backward_plan.cache_clear()


def _ptrs(call):
    """The pointer and 64-bit size arguments of a recorded launch (signature letters P and Q; for a tensor map, M,
    the address it maps)."""
    return [a[1] if c == "M" else a for a, c in zip(call["args"], call["sig"]) if c in "PQM"]


@pytest.mark.parametrize("dtype,rung,pick", [(torch.float16, "fa3", None), (torch.bfloat16, "fa3", None),
                                             (torch.float16, "wgmma", "wgmma"), (torch.float32, "fp32", None)])
def test_forward_plan_built_once_and_launched_on_the_callers_stream(fake_gpu, dtype, rung, pick):
    log, built = fake_gpu
    q = torch.randn(2, 3, 100, 64).to(dtype).transpose(2, 3).contiguous().transpose(2, 3)   # not contiguous
    k = v = torch.randn(2, 3, 77, 64).to(dtype)
    name = str(dtype).replace("torch.", "")
    for _ in range(3):
        o, lse = ck.forward(q, k, v, causal=True, scale=0.125, dtype=name, rung=pick)
    assert len(built) == 1 and len(log) == 3                                   # compiled once, launched thrice
    cfg = ck.choose_config(name, 64, 90, True, pick)
    assert cfg.rung == rung and built[0] == cfg.kernel
    call = log[-1]
    grid = (6, 1, 1) if rung == "fa3" else (-(-100 // cfg.Br), 6, 1)        # fa3: "dynamic", 6 items on 132 SMs
    assert call["grid"] == grid and call["block"] == (32 * cfg.warps,) and call["smem"] == cfg.smem
    assert call["stream"] == 0xABC
    assert type(o) is torch.Tensor and o.dtype == dtype and o.shape == q.shape and o.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 100)
    if rung == "fa3":      # q, k, v reach rung 7 as tensor maps: (d, N, pairs), boxes of Br (q) or Bc (k, v) rows
        assert cfg.fa3.dynamic and call["sig"] == "MMMPPiifiiP"      # causal d = 64: the dynamic scheduler's counter
        assert _ptrs(call)[3:] == [o.data_ptr(), lse.data_ptr(), COUNTERS[(0, 0xABC, Recorder.ctx)]]
        qm, km, vm = call["args"][:3]
        assert qm[1] != q.data_ptr() and qm[2:] == (name, 64, 100, 6, cfg.Br)   # a contiguous copy of q was mapped
        assert km == ("map", k.data_ptr(), name, 64, 77, 6, cfg.Bc) and vm == km
    else:
        ptrs = _ptrs(call)
        assert ptrs[1:] == [k.data_ptr(), v.data_ptr(), o.data_ptr(), lse.data_ptr()]
        assert ptrs[0] != q.data_ptr()                                         # a contiguous copy of q was passed
    assert list(call["args"][5:7]) == [100, 77] and call["args"][7] == 0.125
    assert list(call["args"][8:10]) == [6, 1]                                 # B*H pairs, G = 1 (no GQA)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_backward_launches_pre_pass_kernel_and_conversion(fake_gpu, dtype):
    log, built = fake_gpu
    name = str(dtype).replace("torch.", "")
    q, do = torch.randn(1, 2, 50, 64).to(dtype), torch.randn(1, 2, 50, 64).to(dtype)
    k = v = torch.randn(1, 2, 40, 64).to(dtype)
    o, lse = torch.randn_like(q), torch.randn(1, 2, 50)
    dq, dk, dv = ck.backward(q, k, v, o, lse, do, causal=False, scale=0.5, dtype=name)
    kernels = [c["kernel"] for c in log]
    T = ck.CTYPE[name]
    assert kernels[0] == f"bwd_dot_do_o<{T}, 64>"
    rung = ck.default_rung(name, 90, "backward", 64)
    assert rung == ("bwd_fp32" if dtype == torch.float32 else "bwd_wgmma")
    assert kernels[1] == ck.choose_config(name, 64, 90, False, rung).kernel
    assert kernels[2:] == ([] if dtype == torch.float32 else [f"bwd_convert_dq<{T}>"])
    pre, main = _ptrs(log[0]), _ptrs(log[1])
    # delta, Lb: bwd_wgmma's rows padded to whole Q tiles (its producer copies a tile's in one piece), in log2 units
    nqp, lscale = (64, math.log2(math.e)) if rung == "bwd_wgmma" else (50, 1.0)
    assert pre[:2] == [do.data_ptr(), o.data_ptr()] and pre[2] == lse.data_ptr() and pre[-1] == 2 * nqp
    assert list(log[0]["args"][-3:]) == [50, nqp, lscale]
    delta, lb, dq_acc = pre[3], pre[4], pre[5]
    assert lb - delta == 4 * 2 * nqp and (delta % 16, lb % 16) == (0, 0)
    if rung == "bwd_wgmma":   # tensor maps of q, k, v, dO, then of the fp32 dQ buffer: the TMA reductions' target
        assert log[1]["args"][4] == ("map", dq_acc, "float32", 64, 50, 2, 64)   # (d, Nq, pairs), boxes of Br rows
        # and of delta and Lb (which follows it) as one (2 pairs, nqp) tensor, boxes of Br values
        assert log[1]["args"][5] == ("rows map", delta, nqp, 2 * 2, 64)
        assert main[6] == dq_acc
    else:
        assert main[4:7] == [lb, delta, dq_acc]                                # the kernel reads Lb, not lse
    assert main[7:9] == [dk.data_ptr(), dv.data_ptr()] and dk.shape == k.shape and dq.shape == q.shape
    if dtype == torch.float32:
        assert dq_acc == dq.data_ptr()                                         # float32: dQ accumulates in place
    else:
        assert _ptrs(log[2]) == [dq_acc, dq.data_ptr(), dq.numel()]          # n travels as uint64 too
    assert all(c["stream"] == 0xABC for c in log)


def test_gqa_passes_G_and_sums_dk_dv_per_kv_head(fake_gpu):
    log, built = fake_gpu
    q = do = o = torch.randn(2, 6, 30, 64).half()
    k = v = torch.randn(2, 2, 20, 64).half()
    lse = torch.randn(2, 6, 30)
    ck.forward(q, k, v, causal=False, scale=0.5, dtype="float16")
    assert [int(a) for a in log[-1]["args"][8:10]] == [12, 3]                 # B*H = 12 pairs, G = 3
    log.clear()
    dq, dk, dv = ck.backward(q, k, v, o, lse, do, causal=False, scale=0.5, dtype="float16")
    names = [c["kernel"] for c in log]
    assert names[2:4] == ["bwd_sum_groups<__half>"] * 2 and dk.shape == dv.shape == k.shape
    main = log[1]["args"]   # bwd_wgmma: maps of q, k, v, dO, dQ, (delta; Lb), then dQ's buffer, dK, dV as the others
    assert names[1].startswith("fa3_backward") and log[1]["sig"].startswith("MMMMMMPPP")   # Hopper's default, d = 64
    assert [int(a) for a in main[12:14]] == [12, 3]
    per_head = _ptrs(log[1])[7:9]                                                # dK, dV of each query head
    for c, out, src in zip(log[2:4], (dk, dv), per_head):
        p = _ptrs(c)
        assert p[:2] == [src, out.data_ptr()] and int(c["args"][2]) == 3 and p[2:] == [20 * 64, 2 * 2 * 20 * 64]


def test_head_dim_padded_to_its_bucket_only_when_needed(fake_gpu):
    log, built = fake_gpu
    q, k = torch.randn(1, 2, 10, 40).half(), torch.randn(1, 2, 12, 40).half()
    o, lse = ck.forward(q, k, k, causal=False, scale=None, dtype="float16")
    assert o.shape == q.shape and o.is_contiguous() and ck.choose_config("float16", 40, 90).D == 64
    assert built[0] == ck.choose_config("float16", 40, 90).kernel and "64" in built[0]
    assert float(log[-1]["args"][7]) == pytest.approx(40 ** -0.5)             # the scale of d, not of the bucket
    assert _ptrs(log[-1])[1] != k.data_ptr()                          # a padded copy
    q64 = torch.randn(1, 2, 10, 64).half()
    k64 = torch.randn(1, 2, 12, 64).half()
    o64, _ = ck.forward(q64, k64, k64, causal=False, scale=None, dtype="float16")
    assert _ptrs(log[-1])[:2] == [q64.data_ptr(), k64.data_ptr()]     # a bucket: no copy


def test_d256_backward_is_two_launches_of_128_columns(fake_gpu):
    log, built = fake_gpu
    q = torch.randn(1, 1, 16, 256).half()
    ck.backward(q, q, q, q, torch.randn(1, 1, 16), q, causal=True, scale=None, dtype="float16", rung="bwd_tc")
    main = [c for c in log if c["kernel"].startswith("fa2_bwd_tc")]
    assert [int(c["args"][-1]) for c in main] == [0, 128]


def test_no_key_answered_on_the_host_and_many_pairs_on_grid_z(fake_gpu):
    log, built = fake_gpu
    q = torch.randn(1, 2, 5, 64)
    o, lse = ck.forward(q, q[:, :, :0], q[:, :, :0], causal=False, scale=None, dtype="float32")
    assert not log and torch.equal(o, torch.zeros_like(q)) and torch.isinf(lse).all() and (lse < 0).all()
    q = torch.randn(70000, 1, 1, 32)
    ck.forward(q, q, q, causal=False, scale=None, dtype="float32")
    assert log[-1]["grid"] == (1, 65535, 2) and int(log[-1]["args"][8]) == 70000


def test_check_inputs_takes_torch_dtypes():
    q = torch.zeros(1, 1, 4, 64, dtype=torch.bfloat16)
    assert ck.check_inputs(q, q, q, "bfloat16") == (1, 1, 4, 4, 64)
    with pytest.raises(ValueError, match="expects"):
        ck.check_inputs(q.half(), q.half(), q.half(), "bfloat16")


def test_gpu_backends_take_gqa_natively():
    """flashlib.api repeats k, v only for backends without native GQA: the CuPy and Numba kernels take G themselves."""
    from flashlib import api
    assert api.native_gqa("cupy") == api.native_gqa("numba") == ("forward", "backward")


def test_launcher_packs_each_argument_where_its_parameter_pointer_points():
    """build.Launcher lays the arguments out as the C struct of the signature's fields; cuLaunchKernel reads
    parameter i through pointer i. Read them back through those pointers."""
    import ctypes
    from flashlib.cupy_kernels.build import Launcher
    scalar = {"P": ctypes.c_uint64, "Q": ctypes.c_uint64, "i": ctypes.c_int32, "f": ctypes.c_float}
    read = lambda c, p: ctypes.string_at(p, 128) if c == "M" else scalar[c].from_address(p).value   # noqa: E731
    for sig, args in (("PPPPPiifii", (1, 2, 3, 2**63, 5, -6, 7, 0.5, 9, 10)), ("PPiQQ", (11, 12, 3, 2**40, 5)),
                      ("PPPPPPPPPiifiii", tuple(range(9)) + (1, 2, 0.25, 3, 4, 128)),
                      ("MMMPPiifiiP", (b"q" * 128, b"k" * 128, b"v" * 128, 7, 8, 1, 2, 0.5, 3, 4, 5))):
        L = Launcher(None, sig, 1)             # ctx: any non-NULL handle (nothing is launched)
        L._fmt.pack_into(L._buf, L._at, *args)
        back = [read(c, p) for c, p in zip(sig, L._params)]
        assert back == list(args), (sig, back)
        assert len(set(L._params)) == len(sig) and L._params[0] % 64 == 0       # a tensor map's 64-byte alignment
    with pytest.raises(TypeError, match="do not fit"):
        Launcher(type("F", (), {"ptr": 0})(), "Pi", 1)((1,), (32,), (1, 2**31))   # an int32 out of range
    with pytest.raises(ValueError, match="context"):
        Launcher(None, "Pi", 0)                                                  # no context: refused up front


def _same_launches(a, b):
    """Two launch logs that differ only in the addresses of freshly allocated outputs and scratch."""
    assert [c["kernel"] for c in a] == [c["kernel"] for c in b]
    for x, y in zip(a, b):
        assert (x["grid"], x["block"], x["smem"], x["stream"], x["sig"]) == (y["grid"], y["block"], y["smem"],
                                                                          y["stream"], y["sig"])
        assert [v for v, c in zip(x["args"], x["sig"]) if c in "if"] == [v for v, c in zip(y["args"], y["sig"]) if c in "if"]


@pytest.mark.parametrize("dtype,pick", [(torch.float16, None), (torch.bfloat16, "wgmma"), (torch.float32, None)])
def test_prepared_forward_launches_as_forward_does(fake_gpu, dtype, pick):
    """prepare_forward's run: the launch `forward` makes (kernel, grid, sizes, stream), fresh outputs each call,
    the same inputs' addresses (tensor maps of them for rung 7), a contiguous copy of a strided input."""
    log, built = fake_gpu
    name = str(dtype).replace("torch.", "")
    q, k, v = torch.randn(2, 4, 100, 64).to(dtype), torch.randn(2, 2, 77, 64).to(dtype), torch.randn(2, 2, 77, 64).to(dtype)
    o_ref, _ = ck.forward(q, k, v, causal=True, scale=0.125, dtype=name, rung=pick)
    run = ck.launch.prepare_forward(q, k, v, causal=True, scale=0.125, dtype=name, rung=pick)
    o1, lse1 = run(q, k, v)
    o2, lse2 = run(q, k, v)
    assert len(built) == 1 and len(log) == 3
    _same_launches(log[:1], log[1:2])
    _same_launches(log[1:2], log[2:])
    assert o1.data_ptr() != o2.data_ptr() and o1.shape == q.shape and o1.dtype == dtype and lse1.shape == (2, 4, 100)
    addr = lambda a: a[1] if isinstance(a, tuple) else a
    assert [addr(a) for a in log[1]["args"][:3]] == [q.data_ptr(), k.data_ptr(), v.data_ptr()]
    assert list(log[1]["args"][3:5]) == [o1.data_ptr(), lse1.data_ptr()] and log[1]["args"][9] == 2    # G = 2
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)                    # same signature, not contiguous
    run(qt, k, v)
    assert addr(log[-1]["args"][0]) not in (qt.data_ptr(), q.data_ptr())


def test_rung7_launches_pass_the_counter_of_their_stream(fake_gpu, monkeypatch):
    """Rung 7's default variant (config_hopper.FA3_DYNAMIC): "dynamic" (causal d = 64) launches a persistent grid,
    min(SMs, work items) CTAs, with tma.counter's address for the launch's stream, in `forward` and the prepared call alike;
    "pingpong" (d = 64 not causal) the grid of tiles and 0. The counter is asked for at each launch (the stream may
    change between calls), for the device and the kernel's context."""
    log, built = fake_gpu
    streams = iter([0xA, 0xA, 0xB, 0xB, 0xA, 0xC])
    monkeypatch.setattr(ck.callers, "_torch_stream", lambda dev: next(streams))
    q, k = torch.randn(2, 8, 1000, 64).half(), torch.randn(2, 4, 900, 64).half()
    run = ck.launch.prepare_forward(q, k, k, causal=True, scale=None, dtype="float16")
    for call in (lambda: ck.forward(q, k, k, causal=True, scale=None, dtype="float16"), lambda: run(q, k, k)) * 3:
        call()
    cfg = ck.choose_config("float16", 64, 90, True).fa3
    assert cfg.dynamic and len(built) == 1 and len(log) == 6
    for c, stream in zip(log, (0xA, 0xA, 0xB, 0xB, 0xA, 0xC)):
        assert c["stream"] == stream and c["args"][-1] == COUNTERS[(0, stream, Recorder.ctx)]
        assert c["grid"] == (min(132, -(-1000 // cfg.Br) * 16), 1, 1) == (96, 1, 1)
    assert len(set(COUNTERS.values())) == 3
    monkeypatch.setattr(ck.callers, "_torch_stream", lambda dev: 0xA)
    ck.forward(q, k, k, causal=False, scale=None, dtype="float16")
    ck.launch.prepare_forward(q, k, k, causal=False, scale=None, dtype="float16")(q, k, k)
    pp = ck.choose_config("float16", 64, 90, False)
    assert not pp.fa3.persistent and "true, false>" in pp.kernel
    for c in log[-2:]:
        assert c["args"][-1] == 0 and c["grid"] == (-(-1000 // pp.Br), 16, 1)


def test_prepared_routes_fall_back_where_the_general_path_is_needed(fake_gpu):
    """No prepared call for a padded head dim, no key, or a grouped-query backward: `forward`/`backward` run those."""
    q, k = torch.randn(1, 2, 10, 50).half(), torch.randn(1, 2, 12, 50).half()
    assert ck.launch.prepare_forward(q, k, k, causal=False, scale=None, dtype="float16") is None
    assert ck.launch.prepare_backward(q, k, k, causal=False, scale=None, dtype="float16") is None
    q, k = torch.randn(1, 2, 10, 64).half(), torch.randn(1, 2, 0, 64).half()
    assert ck.launch.prepare_forward(q, k, k, causal=False, scale=None, dtype="float16") is None
    q, k = torch.randn(1, 4, 10, 64).half(), torch.randn(1, 2, 12, 64).half()
    assert ck.launch.prepare_forward(q, k, k, causal=False, scale=None, dtype="float16") is not None
    assert ck.launch.prepare_backward(q, k, k, causal=False, scale=None, dtype="float16") is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_prepared_backward_launches_as_backward_does(fake_gpu, dtype):
    log, built = fake_gpu
    name = str(dtype).replace("torch.", "")
    q, k, v = torch.randn(1, 2, 50, 64).to(dtype), torch.randn(1, 2, 40, 64).to(dtype), torch.randn(1, 2, 40, 64).to(dtype)
    o, lse, do = torch.randn_like(q), torch.randn(1, 2, 50), torch.randn(1, 2, 64, 50).to(dtype).transpose(2, 3)
    ck.backward(q, k, v, o, lse, do, causal=True, scale=0.5, dtype=name)
    n = len(log)
    run = ck.launch.prepare_backward(q, k, v, causal=True, scale=0.5, dtype=name)
    dq, dk, dv = run(q, k, v, o, lse, do)
    _same_launches(log[:n], log[n:])
    pre, main = _ptrs(log[n]), _ptrs(log[n + 1])
    assert pre[2] == lse.data_ptr() and pre[0] != do.data_ptr()               # dO (strided here) copied
    # (bwd_wgmma: maps of q, k, v, dO, dQ, (delta; Lb) stand where the others take q, k, v, dO, Lb, delta)
    assert main[:3] == [q.data_ptr(), k.data_ptr(), v.data_ptr()] and main[7:9] == [dk.data_ptr(), dv.data_ptr()]
    assert dq.shape == q.shape and dk.shape == k.shape and dq.dtype == dtype


def test_torch_calls_reach_the_prepared_launches(fake_gpu, monkeypatch):
    """flashlib.torch's eager call on (here: stand-in) CUDA tensors runs through api.route into the cupy backend's
    prepared forward and, for the gradient, its prepared backward: one plan each, launches recorded."""
    import flashlib.torch as ft
    from flashlib import api
    log, built = fake_gpu
    monkeypatch.setattr(api, "on_gpu", lambda x: True)
    monkeypatch.setattr(api, "choose_backend", lambda backend, dt, gpu: "cupy")
    api._ROUTES.clear()
    q, k, v = (torch.randn(1, 2, 40, 64, dtype=torch.float16, requires_grad=True) for _ in range(3))
    for _ in range(2):
        o = ft.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cupy")
        torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    r = api.route(q, k, v, True, None, "cupy")
    assert r.fwd is not None and r._bwd and len(api._ROUTES) == 1
    kernels = [c["kernel"] for c in log]
    assert len(kernels) == 2 * (1 + 2 + 1) and kernels[0] == kernels[4]      # forward, pre-pass, main, dQ conversion
    api._ROUTES.clear()


@pytest.mark.parametrize("pick", [None, "tuned"])
def test_misaligned_inputs_are_copied_before_any_kernel_reads_them(fake_gpu, pick):
    """Every Tensor Core rung reads 16-byte pieces (cp.async, ldmatrix, TMA): a contiguous tensor at an address that
    is not a multiple of 16 reaches the kernel as an aligned copy, in the general and the prepared paths, forward
    and backward (regression: the H200 raised 'misaligned address' in bwd_tc for such a q)."""
    log, built = fake_gpu
    q = torch.empty(2 * 3 * 50 * 64 + 1, dtype=torch.float16)[1:].view(2, 3, 50, 64).normal_()
    k = v = torch.randn(2, 3, 40, 64).half()
    assert q.is_contiguous() and q.data_ptr() % 16
    o, lse = ck.forward(q, k, v, causal=False, scale=None, dtype="float16", rung=pick)
    ck.launch.prepare_forward(q, k, v, causal=False, scale=None, dtype="float16", rung=pick)(q, k, v)
    ck.backward(q, k, v, o, lse, q, causal=False, scale=None, dtype="float16")
    ck.launch.prepare_backward(q, k, v, causal=False, scale=None, dtype="float16")(q, k, v, o, lse, q)
    for call in log:
        addrs = [a[1] if isinstance(a, tuple) else a for a, c in zip(call["args"], call["sig"]) if c in "PM"]
        assert all(a % 16 == 0 for a in addrs), call["kernel"]


def test_tensor_maps_are_encoded_in_the_pointers_context_where_the_thread_has_none(monkeypatch):
    """tma.encode_tiled, the one call of cuTensorMapEncodeTiled (rung 7, bwd_wgmma, fa3_fp8): the driver's
    arguments, a retry in the context that owns the pointer when the thread has none (CUresult 201), and an error
    naming the sizes when the encode still fails. The driver is a recording fake here."""
    from flashlib.cupy_kernels import fp8, tma
    calls, answers, switched = [], [201, 0], []
    monkeypatch.setattr(tma, "_encode_fn", lambda: lambda *a: calls.append(a) or answers.pop(0))
    monkeypatch.setattr(tma, "_in_context_of", lambda ptr, call: switched.append(ptr) or call())
    tma.map_bytes.cache_clear()
    tma.map_bytes(0x1000, "float32", 64, 50, 2, 64)
    assert switched == [0x1000] and len(calls) == 2              # 201: encoded again, in ptr's context
    _, dtype, rank, ptr, dims, strides, box, _, inter, swizzle, l2, oob = calls[-1]
    assert (dtype, rank, ptr.value, inter, swizzle, l2, oob) == (7, 3, 0x1000, 0, 3, 2, 0)   # FLOAT32, 128B swizzle
    assert list(dims) == [64, 50, 2] and list(strides) == [256, 256 * 50] and list(box) == [32, 64, 1]
    answers[:] = [1]
    fp8.map8.cache_clear()
    with pytest.raises(RuntimeError, match=r"CUresult 1 \(dims \(224, 97, 3\), box \(32, 224, 1\)\)"):
        fp8.map8(0x2000, 224, 97, 3, 32, 224)
    _, dtype, *_, swizzle, _, _ = calls[-1]
    assert (dtype, swizzle) == (0, 1) and switched == [0x1000]   # UINT8, 32B swizzle; no retry for other errors
    tma.map_bytes.cache_clear()


def test_the_backwards_delta_and_lb_map_is_one_unswizzled_float32_tensor(monkeypatch):
    """tma.rows_map_bytes, the map of bwd_wgmma's (delta; Lb): a (rows, n) float32 tensor, dims (n, rows, 1), boxes
    of (box, 1, 1) with no swizzle (the consumers read it as plain floats); rows of n floats must be 16-byte aligned,
    as the TMA needs, else a ValueError before the driver is asked. The driver is a recording fake here."""
    from flashlib.cupy_kernels import tma
    calls = []
    monkeypatch.setattr(tma, "_encode_fn", lambda: lambda *a: calls.append(a) or 0)
    tma.rows_map_bytes.cache_clear()
    tma.rows_map_bytes(0x4000, 128, 2 * 6, 64)
    _, dtype, rank, ptr, dims, strides, box, _, inter, swizzle, l2, oob = calls[-1]
    assert (dtype, rank, ptr.value, inter, swizzle, oob) == (7, 3, 0x4000, 0, 0, 0)      # FLOAT32, no swizzle
    assert list(dims) == [128, 12, 1] and list(strides) == [512, 512 * 12] and list(box) == [64, 1, 1]
    for ptr, n in ((0x4008, 128), (0x4000, 50)):
        with pytest.raises(ValueError, match="16-byte-aligned rows"):
            tma.rows_map_bytes(ptr, n, 12, 64)
    assert len(calls) == 1
    tma.rows_map_bytes.cache_clear()


def test_lse_rows_are_padded_to_whole_q_tiles_for_bwd_wgmma_only(fake_gpu):
    """bwd_wgmma's producer copies a Q tile's delta and Lb in one TMA box: the scratch rows per pair are Nq rounded
    up to Br there, Nq for the other backward rungs; launch_backward refuses an Lb that does not follow delta."""
    wg = ck.backward_plan("float16", 64, False, 0, "bwd_wgmma")
    assert [ck.launch.lse_rows(wg, n) for n in (1, 64, 65, 700)] == [64, 64, 128, 704]
    tc = ck.backward_plan("float16", 64, False, 0, "bwd_tc")
    assert [ck.launch.lse_rows(tc, n) for n in (1, 65, 700)] == [1, 65, 700]
    log, _ = fake_gpu
    with pytest.raises(ValueError, match="lb must follow delta"):
        ck.launch_backward(wg, *range(16, 176, 16), 0x10000, 0x10000 + 4 * 64, 1, 2, 50, 40, 0.5)
    assert log == []                                                          # before any launch
