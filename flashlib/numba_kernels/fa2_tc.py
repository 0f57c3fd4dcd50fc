"""FlashAttention-2 forward on Tensor Cores, in Numba: fp16 / bf16 in, fp32 accumulation (the rung after fa2_fast).

The same algorithm and register bookkeeping as the CuPy kernel flashlib/cupy_kernels/fa2_tc.cu, written in Python:
Tensor Core instructions come from flashlib/numba_kernels/mma.py (inline PTX through Numba intrinsics).

Algorithm: FlashAttention-2 forward (Dao 2023, Algorithm 1), split-Q: each warp owns 16 query rows.
Grid (Tr = ceil(Nq / Br), B*H); block NW warps (32*NW threads); Br = 16*NW query rows, Bc keys per K/V tile.
Arrays: q, k, v, o are (B*H*N, d/2) uint32 views of the 16-bit data (two elements per word; row b*H*N + h*N + n),
  lse (B*H, Nq) float32.
Shared memory, one static uint32 array sm (2*NSTAGE*Bc rows of d/2 + 4 words: the 16-byte pad moves consecutive
  rows by 4 banks, so the 8 row addresses of an ldmatrix phase hit 8 different bank groups):
  rows [st*Bc, (st+1)*Bc) hold K_j, rows [(NSTAGE+st)*Bc, ...) hold V_j, for stage st (NSTAGE = 2: cp.async double
  buffering, tile j+1 is copied while tile j is computed; NSTAGE = 1: plain 16-byte loads, then compute).
  The Q tile passes through rows [0, Br) once, before the loop, on its way to registers.
Registers of one thread (lane = 4g + t), for the warp's query rows r = 16*warp + g and r + 8:
  qf[d/16, 4]   A fragments of the warp's Q rows (mma.a_index), loaded once with ldmatrix;
  s[Bc/8, 4]    S = Q K_j^T for keys 8n + 2t, 8n + 2t + 1 (mma.c_index), overwritten by P = exp2(S*scale*log2e - m);
  acc[d/8, 4]   the unnormalised O rows (C layout); m[2], l[2] the running max (base 2) and this thread's part of
                the row sum l (the 4 threads of a row add theirs with shuffles at the end).
P never goes through shared memory: the C fragments of two adjacent 8-key n-tiles are the A fragment of a 16-key
  k-step (mma.a_from_c). K's B fragments come from ldmatrix, V's from ldmatrix.trans (keys are V's rows).
Row max and row sum: the 4 lanes t = 0..3 sharing a row exchange values with cuda.shfl_xor_sync(mask, x, 1 and 2).
Causal (top-left): K/V tiles right of the Q tile's last row are not loaded; a warp whose 16 rows all lie left of a
  tile skips its math; masking (-inf) only on the diagonal and on the ragged last tile (any Nq, Nk).
Variants: m16n8k16 (sm_80+, fp16 or bf16) or, with K8, two m16n8k8 per 16-key step (sm_75, the T4; fp16 only).
Backward: not written for Numba Tensor Cores (flashlib.cupy_kernels has one); `backward` stays float32.
bf16 from torch: torch does not export bfloat16 through __cuda_array_interface__, so bf16 data must reach this
  kernel as int16/uint16 bit views (torch: t.view(torch.int16)); the output o comes back as the same bits.
"""
import functools
import math

import numpy as np
from numba import cuda, float32, uint32

from . import mma
from ._common import device, scale_of, simulated


HEAD_DIMS = (32, 64, 96, 128)
DTYPES = ("float16", "bfloat16")
LOG2E = 1.4426950408889634
LN2 = np.float32(math.log(2.0))
SMEM_STATIC = 48 * 1024
# (NW warps, Bc keys, NSTAGE) per head dim, Br = 16*NW; static shared memory must stay under 48 KB (Numba has
# no opt-in to more). Not yet tuned on a GPU: benchmarks/numba_tc_bench.py sweeps the alternatives.
TILES = {32: (4, 64, 2), 64: (4, 64, 2), 96: (4, 32, 2), 128: (4, 32, 2)}
TILES_SM75 = {32: (4, 64, 1), 64: (4, 64, 1), 96: (4, 64, 1), 128: (4, 64, 1)}


def smem_bytes(D, Bc, NSTAGE):
    return 2 * NSTAGE * Bc * (D // 2 + 4) * 4


# ---------------------------------------------------------------- ldmatrix addresses (pure Python)
# Each returns (row, col) in 16-bit elements, relative to the tile, of the row this lane hands to ldmatrix.x4.
# The kernel spells the same expressions inline (marked "# q_ldm" etc.: Numba device functions cannot be compiled
# without a GPU present); tests/test_numba_tc.py checks the text matches and models a warp with these functions.
def q_ldm(lane, warp, kk):
    """Q tile -> A fragment of k-step kk (head dims 16kk..16kk+15) of warp `warp`'s 16 rows: the four 8x8 matrices
    are (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) = registers a0..a3."""
    return 16 * warp + (lane & 15), 16 * kk + (lane >> 4) * 8


def k_ldm(lane, nn, kk):
    """K tile -> B fragments (b0, b1) of key n-tiles 2nn and 2nn+1 for k-step kk (B[k][n] = K[key n][dim k])."""
    return 16 * nn + (lane & 7) + (lane >> 4) * 8, 16 * kk + ((lane >> 3) & 1) * 8


def v_ldm(lane, kk, nn):
    """V tile (with .trans) -> B fragments of head-dim n-tiles 2nn and 2nn+1 for keys 16kk..16kk+15."""
    return 16 * kk + (lane & 7) + ((lane >> 3) & 1) * 8, 16 * nn + (lane >> 4) * 8


def check(d, dtype, cc=None, k8=False):
    """Raise ValueError for what this kernel cannot do."""
    if dtype not in DTYPES:
        raise ValueError(f"the numba tc kernel takes dtype float16 or bfloat16, got {dtype!r} (float32: variant 'fa2_fast')")
    if d not in HEAD_DIMS:
        raise ValueError(f"the numba tc kernel takes head_dim in {HEAD_DIMS}, got {d}")
    if k8 and dtype != "float16":
        raise ValueError("the m16n8k8 (sm_75) path takes float16 only")
    if cc is not None:
        if cc < (7, 5):
            raise ValueError(f"Tensor Core mma needs compute capability 7.5 or newer, got {cc}")
        if dtype == "bfloat16" and cc < (8, 0):
            raise ValueError(f"bfloat16 needs compute capability 8.0 or newer, got {cc}: use float16")


@functools.lru_cache(maxsize=None)
def make_fa2_tc(D, NW, Bc, NSTAGE, dtype, K8):
    """The kernel for head dim D (a multiple of 16), NW warps, Bc keys per tile, NSTAGE (1 or 2) K/V buffers."""
    Br, NT = 16 * NW, 32 * NW
    W, LDW = D // 2, D // 2 + 4                      # words per row in global / shared memory
    C4 = W // 4                                      # 16-byte chunks per row
    KD, NB, KB, ND = D // 16, Bc // 8, Bc // 16, D // 8
    ASYNC = NSTAGE == 2
    ROWS = 2 * NSTAGE * Bc
    assert D % 16 == 0 and Bc % 16 == 0 and NSTAGE in (1, 2) and Br <= ROWS and not (K8 and ASYNC)
    assert smem_bytes(D, Bc, NSTAGE) <= SMEM_STATIC
    MMA = mma.mma_m16n8k16_bf16 if dtype == "bfloat16" else mma.mma_m16n8k16_f16
    pack = mma.pack_bf16x2 if dtype == "bfloat16" else mma.pack_f16x2
    NEG_INF = float32(-math.inf)
    FULL = 0xFFFFFFFF

    @cuda.jit
    def fa2_tc(q, k, v, o, lse, Nq, Nk, causal, sl):
        sm = cuda.shared.array((ROWS, LDW), uint32, alignment=16)   # ldmatrix, cp.async: 16-byte rows
        qf = cuda.local.array((KD, 4), uint32)
        s = cuda.local.array((NB, 4), float32)
        acc = cuda.local.array((ND, 4), float32)
        m = cuda.local.array(2, float32)
        l = cuda.local.array(2, float32)
        mx = cuda.local.array(2, float32)
        base = cuda.local.array(2, float32)
        tid = cuda.threadIdx.x
        lane, warp = tid & 31, tid >> 5
        g, t = lane >> 2, lane & 3
        # causal: the longest rows (last Q tiles) start first, so that short blocks fill the tail of the launch
        i = cuda.gridDim.x - 1 - cuda.blockIdx.x if causal else cuda.blockIdx.x
        bh = cuda.blockIdx.y
        q0 = i * Br
        qw = q0 + 16 * warp                          # first query row of this warp
        qrow, krow = bh * Nq, bh * Nk                # first row of this (batch, head) in the 2-D views
        kv_end = min(Nk, q0 + Br) if causal else Nk
        n_tiles = (kv_end + Bc - 1) // Bc
        z = uint32(0)
        for h in range(2):
            m[h] = NEG_INF
            l[h] = 0.0
        for n in range(ND):
            for e in range(4):
                acc[n, e] = 0.0

        for idx in range(tid, Br * C4, NT):          # Q_i passes through shared memory into registers, once
            r, c = idx // C4, (idx % C4) * 4         # 16 bytes per thread and step; rows >= Nq are zeros
            mma.store16(sm, r, c, mma.load16(q, qrow + q0 + r, c) if q0 + r < Nq else (z, z, z, z))
        cuda.syncthreads()
        for kk in range(KD):
            x = mma.ldmatrix_x4(sm, 16 * warp + (lane & 15), (16 * kk + (lane >> 4) * 8) >> 1)    # q_ldm
            for e in range(4):
                qf[kk, e] = x[e]
        cuda.syncthreads()                           # the K/V stages overwrite Q's rows

        # j = -1 (ASYNC only) is the prologue: it loads tile 0. Iteration j loads tile jl and computes tile j.
        for j in range(-1 if ASYNC else 0, n_tiles):
            jl = j + 1 if ASYNC else j               # with cp.async, tile j+1 is copied while tile j is computed
            if jl < n_tiles:
                sl_ = jl & 1 if ASYNC else 0         # stage it goes to (freed by the last syncthreads)
                for idx in range(tid, 2 * Bc * C4, NT):   # K_jl (w = 0) and V_jl (w = 1), 16 bytes each
                    w, r, c = idx // (Bc * C4), (idx // C4) % Bc, (idx % C4) * 4
                    src = k if w == 0 else v
                    ok = jl * Bc + r < Nk            # rows past Nk are zero-filled
                    dst = (w * NSTAGE + sl_) * Bc + r
                    if ASYNC:
                        mma.cp_async16(sm, dst, c, src, krow + (jl * Bc + r if ok else 0), c, 16 if ok else 0)
                    else:
                        mma.store16(sm, dst, c, mma.load16(src, krow + jl * Bc + r, c) if ok else (z, z, z, z))
                if ASYNC:
                    mma.cp_async_commit()
            if j < 0:
                continue
            if ASYNC:
                if jl < n_tiles:
                    mma.cp_async_wait(1)             # all but the newest group have landed: tile j
                else:
                    mma.cp_async_wait(0)
            cuda.syncthreads()
            kv0 = j * Bc
            st = j & 1 if ASYNC else 0
            kb, vb = st * Bc, (NSTAGE + st) * Bc     # this tile's K and V rows in sm
            if not (causal and kv0 > qw + 15):       # else every key of the tile is right of the warp's 16 rows
                for n in range(NB):                  # S = Q_i K_j^T: 16 x Bc per warp, fp32
                    for e in range(4):
                        s[n, e] = 0.0
                for kk in range(KD):
                    for nn in range(NB // 2):        # B fragments of key n-tiles 2nn (b0, b1) and 2nn+1 (b2, b3)
                        b = mma.ldmatrix_x4(sm, kb + 16 * nn + (lane & 7) + (lane >> 4) * 8,
                                            (16 * kk + ((lane >> 3) & 1) * 8) >> 1)               # k_ldm
                        for u in range(2):
                            n = 2 * nn + u
                            if K8:                   # k 0..7 with (a0, a1, b0), then k 8..15 with (a2, a3, b1)
                                x = mma.mma_m16n8k8_f16(qf[kk, 0], qf[kk, 1], b[2 * u], s[n, 0], s[n, 1], s[n, 2], s[n, 3])
                                x = mma.mma_m16n8k8_f16(qf[kk, 2], qf[kk, 3], b[2 * u + 1], x[0], x[1], x[2], x[3])
                            else:
                                x = MMA(qf[kk, 0], qf[kk, 1], qf[kk, 2], qf[kk, 3], b[2 * u], b[2 * u + 1],
                                        s[n, 0], s[n, 1], s[n, 2], s[n, 3])
                            for e in range(4):
                                s[n, e] = x[e]
                # mask (ragged last tile, causal diagonal); row max over the 4 lanes sharing a row
                need_mask = kv0 + Bc > Nk or (causal and kv0 + Bc - 1 > qw)
                for h in range(2):
                    mx[h] = NEG_INF
                for n in range(NB):
                    for e in range(4):
                        y = s[n, e]
                        if need_mask:
                            col, row = kv0 + 8 * n + 2 * t + (e & 1), qw + g + 8 * (e >> 1)
                            if col >= Nk or (causal and col > row):
                                y = NEG_INF
                        s[n, e] = y
                        mx[e >> 1] = max(mx[e >> 1], y)
                for h in range(2):                   # online softmax in base 2: m is in units of S * scale * log2(e)
                    y = mx[h]
                    y = max(y, cuda.shfl_xor_sync(FULL, y, 1))
                    y = max(y, cuda.shfl_xor_sync(FULL, y, 2))
                    m_new = max(m[h], y * sl)
                    base[h] = m_new if m_new != NEG_INF else float32(0.0)   # no visible key yet: P = 0, no NaN
                    alpha = mma.exp2_approx(m[h] - base[h])
                    m[h] = m_new
                    l[h] *= alpha
                    for n in range(ND):
                        acc[n, 2 * h] *= alpha
                        acc[n, 2 * h + 1] *= alpha
                for n in range(NB):
                    for e in range(4):
                        p = mma.exp2_approx(s[n, e] * sl - base[e >> 1])
                        l[e >> 1] += p               # this thread's part of the row sum
                        s[n, e] = p
                for kk in range(KB):                 # O += P V_j: P's C fragments, rounded to 16 bits, are A
                    a0 = pack(s[2 * kk, 0], s[2 * kk, 1])
                    a1 = pack(s[2 * kk, 2], s[2 * kk, 3])
                    a2 = pack(s[2 * kk + 1, 0], s[2 * kk + 1, 1])
                    a3 = pack(s[2 * kk + 1, 2], s[2 * kk + 1, 3])
                    for nn in range(ND // 2):        # B fragments of head-dim n-tiles 2nn and 2nn+1
                        b = mma.ldmatrix_x4_trans(sm, vb + 16 * kk + (lane & 7) + ((lane >> 3) & 1) * 8,
                                                  (16 * nn + (lane >> 4) * 8) >> 1)              # v_ldm
                        for u in range(2):
                            n = 2 * nn + u
                            if K8:
                                x = mma.mma_m16n8k8_f16(a0, a1, b[2 * u], acc[n, 0], acc[n, 1], acc[n, 2], acc[n, 3])
                                x = mma.mma_m16n8k8_f16(a2, a3, b[2 * u + 1], x[0], x[1], x[2], x[3])
                            else:
                                x = MMA(a0, a1, a2, a3, b[2 * u], b[2 * u + 1], acc[n, 0], acc[n, 1], acc[n, 2], acc[n, 3])
                            for e in range(4):
                                acc[n, e] = x[e]
            cuda.syncthreads()                       # every warp is done with this stage before it is refilled
        # epilogue: finish the row sums, divide once, write O (16-bit pairs) and lse = m ln 2 + ln l
        for h in range(2):
            y = l[h]
            y += cuda.shfl_xor_sync(FULL, y, 1)
            y += cuda.shfl_xor_sync(FULL, y, 2)
            row = qw + g + 8 * h
            inv = float32(1.0) / y if y > 0 else float32(0.0)
            if row < Nq:
                for n in range(ND):
                    o[qrow + row, 4 * n + t] = pack(acc[n, 2 * h] * inv, acc[n, 2 * h + 1] * inv)
                if t == 0:
                    lse[bh, row] = m[h] * LN2 + math.log(y) if y > 0 else NEG_INF
    return fa2_tc, NT, Br


def instances():
    """(name, cc, kernel factory arguments) of every kernel this module can launch, for the PTX checks: m16n8k16
    fp16 and bf16 on sm_80 / sm_90 with the default tiles, the m16n8k8 fp16 path on sm_75 (and sm_80, where a T4
    path can be tested on a newer GPU)."""
    out = []
    for D in HEAD_DIMS:
        for dtype in DTYPES:
            for cc in ((8, 0), (9, 0)):
                out.append((f"fa2_tc {dtype} D={D}", cc, (D, *TILES[D], dtype, False)))
        for cc in ((7, 5), (8, 0)):
            out.append((f"fa2_tc_k8 float16 D={D}", cc, (D, *TILES_SM75[D], "float16", True)))
    return out


def ptx_report(only=None):
    """Rows {kernel, cc, threads, mma, ldmatrix, cp_async, registers, smem, stack, spill_stores, spill_loads}:
    `cuda.compile_ptx` (no GPU needed, but not in the simulator) and `ptxas -v` (flashlib.numba_kernels.ptx)."""
    from .ptx import ptxas
    rows = []
    for name, cc, args in instances():
        if only and only not in name:
            continue
        kern, NT, _ = make_fa2_tc(*args)
        text, _ = cuda.compile_ptx(kern.py_func, SIG, cc=cc)
        rows.append({"kernel": name, "cc": f"{cc[0]}.{cc[1]}", "threads": NT, "tiles": list(args[1:4]),
                     "mma": text.count("mma.sync.aligned.m16n8k16") + text.count("mma.sync.aligned.m16n8k8"),
                     "mma_shape": "m16n8k8" if args[5] else "m16n8k16",
                     "mma_k8": text.count("mma.sync.aligned.m16n8k8."), "mma_k16": text.count("mma.sync.aligned.m16n8k16."),
                     "bf16": text.count(".bf16.bf16.f32"), "ldmatrix": text.count("ldmatrix.sync.aligned.m8n8.x4"),
                     "ldmatrix_trans": text.count("ldmatrix.sync.aligned.m8n8.x4.trans"),
                     "cp_async": text.count("cp.async.cg.shared.global"), "shfl": text.count("shfl.sync.bfly"),
                     "smem_align16": ".shared .align 16 " in text,
                     **ptxas(text, cc)})
    return rows


# ---------------------------------------------------------------- host side
SIG = "void(uint32[:, ::1], uint32[:, ::1], uint32[:, ::1], uint32[:, ::1], float32[:, ::1], int32, int32, boolean, float32)"


def config(d, cc, dtype, tiles=None, k8=None):
    """(NW, Bc, NSTAGE, K8) for head dim d on compute capability cc (a tuple)."""
    k8 = cc < (8, 0) if k8 is None else k8
    NW, Bc, NSTAGE = tiles or (TILES_SM75 if k8 else TILES)[d]
    if k8 and NSTAGE != 1:
        raise ValueError("the m16n8k8 (sm_75) path has no cp.async: NSTAGE must be 1")
    if smem_bytes(d, Bc, NSTAGE) > SMEM_STATIC or 16 * NW > 2 * NSTAGE * Bc:
        raise ValueError(f"tiles {(NW, Bc, NSTAGE)} do not fit 48 KB of static shared memory at d={d}")
    return NW, Bc, NSTAGE, k8


@cuda.jit
def _copy4(src, dst):
    """dst = src for 4-D arrays (makes strided inputs contiguous on the device)."""
    B, H, N, d = src.shape
    idx = cuda.grid(1)
    if idx < B * H * N * d:
        x = idx % d
        n = (idx // d) % N
        bh = idx // (d * N)
        dst[bh // H, bh % H, n, x] = src[bh // H, bh % H, n, x]


def _contiguous(a):
    if a.is_c_contiguous() and a.device_ctypes_pointer.value % 16 == 0:
        return a
    out = cuda.device_array(a.shape, a.dtype)
    _copy4[(a.size + 255) // 256, 256](a, out)
    return out


def _words(a):
    """(B, H, N, d) contiguous 16-bit device array -> (B*H*N, d/2) uint32 view."""
    B, H, N, d = a.shape
    return a.reshape(B * H * N, d).view(np.uint32)


def fa2_forward_tc(q, k, v, *, causal=False, scale=None, dtype="float16", tiles=None, k8=None, o=None, lse=None):
    """Tensor Core FA2 forward. q (B, H, Nq, d), k, v (B, H, Nk, d): Numba device arrays (or NumPy arrays, copied)
    of float16, or of int16 / uint16 holding bfloat16 bits for dtype='bfloat16'. d in HEAD_DIMS. Returns o (q's shape and dtype) and lse
    (B, H, Nq) float32. tiles = (NW, Bc, NSTAGE) overrides TILES; k8=True forces the m16n8k8 (sm_75) path."""
    B, H, Nq, d = q.shape
    Nk = k.shape[2]
    if dtype not in DTYPES:
        check(d, dtype)
    want = {"float16": ("float16",), "bfloat16": ("int16", "uint16")}[dtype]
    for name, a in (("q", q), ("k", k), ("v", v)):
        if str(a.dtype) not in want:
            raise ValueError(f"{name} has dtype {a.dtype}; dtype={dtype!r} expects {' or '.join(want)} arrays")
    if tuple(k.shape) != (B, H, Nk, d) or tuple(v.shape) != (B, H, Nk, d):
        raise ValueError(f"k and v must be (B, H, Nk, d) = ({B}, {H}, Nk, {d}); got {tuple(k.shape)}, {tuple(v.shape)}")
    check(d, dtype, k8=bool(k8))
    if simulated():
        raise RuntimeError("the Tensor Core kernel runs PTX (mma.sync), which Numba's CUDA simulator cannot execute: "
                           "it needs a GPU; its checks without one are tests/test_numba_tc.py")
    cc = cuda.get_current_device().compute_capability
    check(d, dtype, cc, bool(k8))
    q, k, v = (device(a) for a in (q, k, v))
    NW, Bc, NSTAGE, K8 = config(d, cc, dtype, tiles, k8)
    kern, NT, Br = make_fa2_tc(d, NW, Bc, NSTAGE, dtype, K8)
    q, k, v = (_contiguous(a) for a in (q, k, v))
    o = cuda.device_array(q.shape, q.dtype) if o is None else o
    lse = cuda.device_array((B, H, Nq), np.float32) if lse is None else lse
    sl = np.float32(float(scale_of(scale, d)) * LOG2E)
    kern[(-(-Nq // Br), B * H), (NT,)](_words(q), _words(k), _words(v), _words(o), lse.reshape(B * H, Nq),
                                        np.int32(Nq), np.int32(Nk), bool(causal), sl)
    return o, lse


if __name__ == "__main__":                           # python -m flashlib.numba_kernels.fa2_tc [filter] (no simulator)
    import json
    import sys
    print(json.dumps(ptx_report(next((a for a in sys.argv[1:] if not a.startswith("-")), None))))
