"""The cupy backend's launch layer: plans built once, outputs in the caller's library, launches on its stream.

One plan per (direction, dtype, head dim, causal, device, rung, tiles): the Config, the loaded kernels (Launchers)
and their launch rule. A call costs a look-up of its input signature (shapes and dtypes already checked once),
output allocation in the caller's library and one cuLaunchKernel per kernel on the caller's current stream. The
grid rule and each kernel's argument list live in `launch_forward` / `launch_backward` alone (device pointers and
sizes), whoever the caller is. Head dims that are not a bucket are zero-padded (a copy only then); grouped-query
attention is the kernels' argument G.
"""
import functools
import math
from collections import namedtuple

import numpy as np

from .._arrays import check_causal, check_scale
from .build import _device_cc, _kernel_on
from .callers import io_of as _io
from .config import BACKWARD_RUNGS, FORWARD_RUNGS, bwd_columns, choose_config, default_rung
from .config_hopper import SIG_BWD_WGMMA, SIG_FA3, fa3_grid
from .shapes import CTYPE, check_inputs, pair_grid
from .tma import counter as _counter, map_bytes as _tensor_map, rows_map_bytes as _rows_map, sm_count as _sm_count

Plan = namedtuple("Plan", "cfg d fn pre post sum device", defaults=(None,))   # backward: pre-pass, dQ conversion, sum
# the kernels' parameters, one letter each (build.Launcher): P pointer, Q uint64, i int32, f float32
SIG_FORWARD = "PPPPPiifii"                   # q, k, v, o, lse, Nq, Nk, scale, BH, G
SIG_BACKWARD = "PPPPPPPPPiifii"              # q, k, v, do, lb, delta, dq_acc, dk, dv, Nq, Nk, scale, BH, G
SIG_PRE, SIG_CONVERT, SIG_SUM = "PPPPPPQiif", "PPQ", "PPiQQ"
LOG2E = math.log2(math.e)


@functools.lru_cache(maxsize=None)
def forward_plan(dtype, d, causal, device, rung=None, tiles=None):
    """The forward's Plan on GPU `device` (an ordinal); compiles its kernel at the first call. rung None: the
    environment's FLASHLIB_CUPY_RUNG if it names a forward rung (read here, when the plan is built), else the
    default."""
    cfg = choose_config(dtype, d, _device_cc(device), causal, rung or _rung_override("forward"), tiles)
    sig = SIG_FA3 if cfg.rung == "fa3" else SIG_FORWARD
    return Plan(cfg, d, _kernel_on(device, cfg.file, cfg.kernel, cfg.smem, cfg.arch, sig), None, None, None, device)


@functools.lru_cache(maxsize=None)
def backward_plan(dtype, d, causal, device, rung=None, tiles=None):
    """The backward's Plan: the kernel, its pre-pass (delta = rowsum(dO * O), the lse it reads, the float32 dQ
    zeroed), for 16-bit dtypes the kernel that converts dQ to the input dtype, and the sum of dK, dV over
    query-head groups (grouped-query attention; compiled at its first use)."""
    cc = _device_cc(device)
    rung = rung or _rung_override("backward") or default_rung(dtype, cc, "backward", d)
    cfg = choose_config(dtype, d, cc, causal, rung, tiles)
    T = CTYPE[dtype]
    sig = {"bwd_tc": SIG_BACKWARD + "i", "bwd_wgmma": SIG_BWD_WGMMA}.get(cfg.rung, SIG_BACKWARD)  # bwd_tc: + c_out
    pre = _kernel_on(device, "fa2_bwd.cu", f"bwd_dot_do_o<{T}, {cfg.D}>", 0, None, SIG_PRE)
    post = None if dtype == "float32" else _kernel_on(device, "fa2_bwd.cu", f"bwd_convert_dq<{T}>", 0, None,
                                                       SIG_CONVERT)
    sum_ = functools.partial(_kernel_on, device, "fa2_bwd.cu", f"bwd_sum_groups<{T}>", 0, None, SIG_SUM)
    return Plan(cfg, d, _kernel_on(device, cfg.file, cfg.kernel, cfg.smem, cfg.arch, sig), pre, post, sum_)


def launch_forward(plan, q, k, v, o, lse, B, H, Nq, Nk, scale, G=1, stream=0):
    """Launch the forward: q, k, v, o, lse are device pointers (ints) of C-contiguous arrays with plan.cfg.D columns
    (q, o: B*H heads; k, v: B*H/G), stream a cudaStream_t handle (an int). Needs Nk >= 1 (`forward` answers
    Nk = 0 on the host); nothing to launch when B*H*Nq = 0."""
    cfg, BH = plan.cfg, B * H
    if BH * Nq == 0:
        return
    if cfg.rung == "fa3":   # rung 7 reads q, k, v through TMA tensor maps (d, N, pairs), boxes of Br or Bc rows
        q = _tensor_map(q, cfg.dtype, cfg.D, Nq, BH, cfg.Br)
        k, v = (_tensor_map(a, cfg.dtype, cfg.D, Nk, BH // G, cfg.Bc) for a in (k, v))
    args = (q, k, v, o, lse, Nq, Nk, scale, BH, G) + _fa3_tail(plan, stream)
    plan.fn(_forward_grid(plan, Nq, BH), (32 * cfg.warps,), args, cfg.smem, stream)


def _forward_grid(plan, Nq, BH):
    """The forward's grid: one CTA per (query tile, pair), or rung 7's persistent grid (fa3_grid)."""
    f = plan.cfg.fa3
    return pair_grid(-(-Nq // plan.cfg.Br), BH) if f is None else fa3_grid(f, Nq, BH, f.persistent and _sm_count(plan.device))


def _fa3_tail(plan, stream):
    """Rung 7's last parameter: the dynamic scheduler's counter for `stream` (tma.counter), else 0; () for others."""
    f = plan.cfg.fa3
    return () if f is None else (_counter(plan.device, stream, plan.fn.ctx) if f.dynamic else 0,)


def lse_rows(plan, Nq):
    """Rows a pair of the backward's scratch delta and Lb: Nq, for bwd_wgmma rounded up to whole Q tiles (its
    producer copies a tile's values as one TMA box; the pre-pass pads them)."""
    return -(-Nq // plan.cfg.Br) * plan.cfg.Br if plan.cfg.rung == "bwd_wgmma" else Nq


def launch_backward(plan, q, k, v, o, lse, do, dq, dk, dv, dq_acc, delta, lb, B, H, Nq, Nk, scale, G=1,
                    dk_h=None, dv_h=None, stream=0):
    """Launch the backward's kernels; pointers as in launch_forward. dq_acc (float32, q's shape), delta and lb
    (float32, (B, H, lse_rows(plan, Nq))) are scratch; for float32 input dq_acc is dq itself. With G > 1, dk_h and
    dv_h (q's head count, k's other sizes, k's dtype) take dK, dV per query head, which are then summed into dk, dv."""
    cfg, BH, D = plan.cfg, B * H, plan.cfg.D
    rows, nqp = BH * Nq, lse_rows(plan, Nq)
    if cfg.rung == "bwd_wgmma" and rows and lb != delta + 4 * BH * nqp:
        raise ValueError("bwd_wgmma reads delta and lb as one (2 B H, lse_rows) tensor: lb must follow delta")
    if rows:   # bwd_wgmma reads Lb * log2(e)
        plan.pre((-(-BH * nqp // 8),), (256,), (do, o, lse, delta, lb, dq_acc, BH * nqp, Nq, nqp,
                                                  LOG2E if cfg.rung == "bwd_wgmma" else 1.0), 0, stream)
    kh, vh = (dk, dv) if G == 1 else (dk_h, dv_h)
    if BH * Nk:
        args = (q, k, v, do, lb, delta, dq_acc, kh, vh, Nq, Nk, scale, BH, G)
        grid, block = pair_grid(-(-Nk // cfg.Bc), BH), (32 * cfg.warps,)
        if cfg.rung == "bwd_wgmma":   # TMA tensor maps of q, do (boxes of Br rows) and k, v (Bc rows)
            # (Nq = 0: no Q tile is read; k's map stands in, as a map needs a non-empty tensor)
            qm, dom = ((_tensor_map(a, cfg.dtype, D, Nq, BH, cfg.Br) for a in (q, do)) if Nq else
                       (_tensor_map(k, cfg.dtype, D, Nk, BH // G, cfg.Br),) * 2)
            km, vm = (_tensor_map(a, cfg.dtype, D, Nk, BH // G, cfg.Bc) for a in (k, v))
            dqm = _tensor_map(dq_acc, "float32", D, Nq, BH, cfg.Br) if Nq else km   # the dQ reductions' target
            ldm = _rows_map(delta, nqp, 2 * BH, cfg.Br) if Nq else km
            plan.fn(grid, block, (qm, km, vm, dom, dqm, ldm) + args[6:], cfg.smem, stream)
        elif cfg.rung == "bwd_tc":   # at d = 256 two launches of 128 output columns (bwd_columns)
            for c_out in range(0, D, bwd_columns(D)):
                plan.fn(grid, block, args + (c_out,), cfg.smem, stream)
        else:
            plan.fn(grid, block, args, cfg.smem, stream)
        if G > 1:
            n = (BH // G) * Nk * D
            fn = plan.sum()
            for a, out in ((kh, dk), (vh, dv)):
                fn((min(-(-n // 256), 65535),), (256,), (a, out, G, Nk * D, n), 0, stream)
    if plan.post is not None and rows:
        n = rows * D
        plan.post((min(-(-n // 256), 65535),), (256,), (dq_acc, dq, n), 0, stream)


# what a call's arrays were found to be, by signature (library, shapes, dtypes, devices, dtype name): the checked
# sizes, the device, and for the forward its prepared call
_CHECKED = {}


def _signature(q, k, v, dtype):
    key = (type(q), q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, dtype)
    return key + _io(q).devices(q, k, v)


def _checked(q, k, v, dtype):
    """(B, H, Nq, Nk, d, device) of arrays that pass check_inputs, all of one kind on one GPU."""
    key = _signature(q, k, v, dtype)
    found = _CHECKED.get(key)
    if found is None:
        dims = check_inputs(q, k, v, dtype)
        if type(q) is not type(k) or type(q) is not type(v):
            raise TypeError(f"q, k and v must be one kind of array, got {type(q).__name__}, {type(k).__name__}, "
                            f"{type(v).__name__}")
        found = dims + (_io(q).device(q, k, v),)
        if len(_CHECKED) > 4096:        # a bound for programs that see endless shapes
            _CHECKED.clear()
        _CHECKED[key] = found
    return found


def _flag(causal):
    return causal if causal is True or causal is False else check_causal(causal)


def forward(q, k, v, *, causal, scale, dtype, rung=None, tiles=None):
    """FlashAttention-2 forward. q: (B, H, Nq, d), k, v: (B, H_kv, Nk, d), H_kv dividing H, d in 1 ... 256: CuPy
    arrays of `dtype` (bfloat16 as int16 bits), or torch CUDA tensors. Returns o (B, H, Nq, d), q's dtype, and lse
    (B, H, Nq) float32, allocated by the caller's library and computed on its current stream (CuPy's, or
    torch.cuda.current_stream()). A row that sees no key (Nk = 0) gets o = 0 and lse = -inf.

    rung: one of FORWARD_RUNGS (default: by dtype and compute capability, or env FLASHLIB_CUPY_RUNG, e.g. 'sm75'
    to run the T4 path on a newer GPU).
    """
    B, H, Nq, Nk, d, dev = _checked(q, k, v, dtype)
    causal, scale = _flag(causal), check_scale(scale, d)
    io = _io(q)
    if Nk == 0:  # no key at all (the kernels would read an empty K): O = 0, lse = -inf, the rule for such rows
        return io.zeros(tuple(q.shape), q), io.full_f32((B, H, Nq), -np.inf, q)
    plan = forward_plan(dtype, d, causal, dev, rung, _hashable(tiles))
    D = plan.cfg.D
    if D != d:
        q, k, v = (io.padded(a, D) for a in (q, k, v))
    else:
        q, k, v = _aligned(io, io.contiguous(q), io.contiguous(k), io.contiguous(v))
    o, lse = io.empty_like(q), io.empty_f32((B, H, Nq), q)
    launch_forward(plan, io.ptr(q), io.ptr(k), io.ptr(v), io.ptr(o), io.ptr(lse), B, H, Nq, Nk, scale,
                   H // k.shape[1], io.stream(dev))
    return (o if D == d else io.unpadded(o, d)), lse


def backward(q, k, v, o, lse, do, *, causal, scale, dtype, rung=None, tiles=None):
    """FlashAttention-2 backward. q, o, do: (B, H, Nq, d), k, v: (B, H_kv, Nk, d), lse (B, H, Nq) float32, all CuPy
    arrays or all torch CUDA tensors. Returns dq, dk, dv in q's dtype, the caller's kind, on its current stream (dk,
    dv summed over the H // H_kv query heads that share a kv head). rung: 'bwd_tc' (fp16/bf16 on sm_80+, the default
    there), 'bwd_wgmma' (Hopper, d = 64, 128 and 256: fa3_backward.cu; the default there) or 'bwd_fp32'; tiles:
    bwd_tc's (warps, KW, Br, BRC, KVREG), default BWD_TILES[d]."""
    B, H, Nq, Nk, d, dev = _checked(q, k, v, dtype)
    if o.shape != q.shape or do.shape != q.shape or tuple(lse.shape) != (B, H, Nq) or type(o) is not type(q) \
            or type(do) is not type(q) or type(lse) is not type(q):
        raise ValueError(f"o and do must be {tuple(q.shape)} and lse {(B, H, Nq)}, all of q's kind "
                         f"({type(q).__name__})")
    causal, scale = _flag(causal), check_scale(scale, d)
    io = _io(q)
    if io.devices(o, do, lse) != io.devices(q) * 3:
        raise ValueError(f"o, do and lse must be on q's GPU ({dev})")
    plan = backward_plan(dtype, d, causal, dev, rung, _hashable(tiles))
    D, Hkv = plan.cfg.D, k.shape[1]
    G = H // Hkv
    q, k, v, o, do = _aligned(io, *(io.contiguous(a) if D == d else io.padded(a, D) for a in (q, k, v, o, do)))
    lse = io.contiguous_f32(lse)
    rows = B * H * Nq
    # one float32 scratch buffer: dQ's accumulator (16-bit input; for float32 dQ accumulates in place, zeroed by the
    # pre-pass), then delta and Lb
    acc, lr = (0 if dtype == "float32" else rows * D), B * H * lse_rows(plan, Nq)
    scratch = io.empty_f32((acc + 2 * lr,), q)
    base = io.ptr(scratch)
    dq, dk, dv = io.empty_like(q), io.empty_like(k), io.empty_like(v)
    dq_acc = base if acc else io.ptr(dq)
    dk_h = dv_h = None
    if G > 1:   # dK, dV per query head (one buffer), then summed over each kv head's G query heads
        per = io.empty((2, B, H, Nk, D), k)
        dk_h = io.ptr(per)
        dv_h = dk_h + per.nbytes // 2
    launch_backward(plan, io.ptr(q), io.ptr(k), io.ptr(v), io.ptr(o), io.ptr(lse), io.ptr(do), io.ptr(dq),
                    io.ptr(dk), io.ptr(dv), dq_acc, base + 4 * acc, base + 4 * (acc + lr), B, H, Nq, Nk, scale, G,
                    dk_h, dv_h, io.stream(dev))
    if D != d:
        dq, dk, dv = (io.unpadded(a, d) for a in (dq, dk, dv))
    return dq, dk, dv


def prepare_forward(q, k, v, *, causal, scale, dtype, rung=None, tiles=None):
    """`forward` made once for arrays of this signature (kind, shapes, dtypes, GPU, as q, k, v have; causal and
    scale as given): run(q, k, v) -> (o, lse) does only what must be done per call (contiguity, alignment, outputs,
    the launch on the caller's current stream). None where `forward`'s general path is needed (a padded head dim,
    no key, no query)."""
    B, H, Nq, Nk, d, dev = _checked(q, k, v, dtype)
    causal, scale = _flag(causal), check_scale(scale, d)
    plan = forward_plan(dtype, d, causal, dev, rung, _hashable(tiles))
    cfg, io, G = plan.cfg, _io(q), H // k.shape[1]
    if cfg.D != d or Nk == 0 or B * H * Nq == 0:
        return None
    BH = B * H
    gx, gy, gz = _forward_grid(plan, Nq, BH)
    launch, block, smem = plan.fn.launch, 32 * cfg.warps, cfg.smem
    contiguous, ptr, stream, empty_like = io.contiguous, io.ptr, io.stream, io.empty_like
    lse_like = io.f32_maker((B, H, Nq), q)
    if cfg.rung == "fa3":   # rung 7: tensor maps of q, k, v (remembered per address), 16-byte-aligned tensors
        qmap, kvmap = (lambda p: _tensor_map(p, dtype, d, Nq, BH, cfg.Br)), (lambda p: _tensor_map(p, dtype, d, Nk, BH // G, cfg.Bc))

    def run(q, k, v):
        q, k, v = contiguous(q), contiguous(k), contiguous(v)
        pq, pk, pv = ptr(q), ptr(k), ptr(v)
        if (pq | pk | pv) % 16:
            q, k, v = _aligned(io, q, k, v)
            pq, pk, pv = ptr(q), ptr(k), ptr(v)
        if cfg.rung == "fa3":
            pq, pk, pv = qmap(pq), kvmap(pk), kvmap(pv)
        o, lse = empty_like(q), lse_like()
        s = stream(dev)
        launch(gx, gy, gz, block, 1, 1, smem, s, (pq, pk, pv, ptr(o), ptr(lse), Nq, Nk, scale, BH, G) + _fa3_tail(plan, s))
        return o, lse
    return run


def prepare_backward(q, k, v, *, causal, scale, dtype, rung=None, tiles=None):
    """`backward` made once for q, k, v of this signature, as prepare_forward: run(q, k, v, o, lse, do) -> (dq, dk,
    dv) for o, lse as this backend's forward returned them for such inputs and do of o's shape and dtype (as autograd
    hands it over); None where `backward`'s general path is needed (a padded head dim)."""
    B, H, Nq, Nk, d, dev = _checked(q, k, v, dtype)
    causal, scale = _flag(causal), check_scale(scale, d)
    plan = backward_plan(dtype, d, causal, dev, rung, _hashable(tiles))
    io, G, rows = _io(q), H // k.shape[1], B * H * Nq
    if plan.cfg.D != d or G > 1:
        return None
    acc, lr = (0 if dtype == "float32" else rows * d), B * H * lse_rows(plan, Nq)
    scratch_like = io.f32_maker((acc + 2 * lr,), q)
    contiguous, ptr, stream, empty_like = io.contiguous, io.ptr, io.stream, io.empty_like

    def run(q, k, v, o, lse, do):
        q, k, v, o, lse, do = (contiguous(a) for a in (q, k, v, o, lse, do))
        if (ptr(q) | ptr(k) | ptr(v) | ptr(o) | ptr(do)) % 16:
            q, k, v, o, do = _aligned(io, q, k, v, o, do)
        scratch = scratch_like()
        base = ptr(scratch)
        dq, dk, dv = empty_like(q), empty_like(k), empty_like(v)
        launch_backward(plan, ptr(q), ptr(k), ptr(v), ptr(o), ptr(lse), ptr(do), ptr(dq), ptr(dk), ptr(dv),
                        base if acc else ptr(dq), base + 4 * acc, base + 4 * (acc + lr), B, H, Nq, Nk, scale, 1,
                        None, None, stream(dev))
        return dq, dk, dv
    return run


def _aligned(io, *arrays):
    """The arrays, each 16-byte-aligned one as it is and the others copied (a caching allocator's blocks are): the
    kernels read rows in 16-byte pieces (cp.async, ldmatrix, TMA), which a misaligned address would fault."""
    return tuple(a if io.ptr(a) % 16 == 0 else io.copy(a) for a in arrays)


def _hashable(tiles):
    return None if tiles is None else tuple(tiles)


def _rung_override(direction):
    import os
    r = os.environ.get("FLASHLIB_CUPY_RUNG")
    if r and (r in FORWARD_RUNGS if direction == "forward" else r in BACKWARD_RUNGS):
        return r
    return None
