"""FlashAttention-2 forward on Tensor Cores, in Numba: fp16 / bf16 in, fp32 accumulation (the rung after fa2_fast).

The same algorithm and register bookkeeping as the CuPy kernel flashlib/cupy_kernels/fa2_tc.cu, written in Python:
Tensor Core instructions come from mma.py (inline PTX through Numba intrinsics), lane layouts from lanes.py.

Algorithm: FlashAttention-2 forward (Dao 2023, Algorithm 1), split-Q: each warp owns MT m-tiles of 16 query rows
(MT = m_tiles_per_warp, CuPy's MT).
Grid (Tr = ceil(Nq / Br), B*H); block NW warps (32*NW threads); Br = 16*NW*MT query rows, Bc keys per K/V tile.
Arrays: q, k, v, o are (B*H*N, d/2) uint32 views of the 16-bit data (two elements per word; row b*H*N + h*N + n),
  lse (B*H, Nq) float32.
Shared memory, one static uint32 array sm (2*NSTAGE*Bc rows of d/2 + 4 words: the 16-byte pad moves consecutive
  rows by 4 banks, so the 8 row addresses of an ldmatrix phase hit 8 different bank groups):
  rows [st*Bc, (st+1)*Bc) hold K_j, rows [(NSTAGE+st)*Bc, ...) hold V_j, for stage st (NSTAGE = 2: cp.async double
  buffering, tile j+1 is copied while tile j is computed; NSTAGE = 1: plain 16-byte loads, then compute).
  The Q tile passes through rows [0, Br) once, before the loop, on its way to registers.
Registers of one thread (lane = 4g + t), for its query rows 16*(MT*warp + mt) + g and + 8 (mt < MT):
  qf[MT, d/16, 4]  A fragments of the warp's Q rows (lanes.a_index), loaded once with ldmatrix (lanes.q_ldm);
  s[MT, Bc/8, 4]   S = Q K_j^T for keys 8n + 2t, 8n + 2t + 1 (lanes.c_index), overwritten by
                   P = exp2(S*scale_log2 - m), scale_log2 = scale*log2(e);
  pa[MT, Bc/16, 4] P rounded to 16 bits: the A fragments of O += P V_j;
  acc[MT, d/8, 4]  the unnormalised O rows (C layout); m, l [2*MT] the running max (base 2) and this thread's part
                   of the row sum l (the 4 lanes of a row combine theirs by shfl_xor_sync 1 and 2).
P never goes through shared memory: the C fragments of two adjacent 8-key n-tiles are the A fragment of a 16-key
  k-step (lanes.a_from_c). K's B fragments come from ldmatrix, V's from ldmatrix.trans (keys are V's rows); one
  fragment feeds the warp's MT m-tiles (MT = 2 halves the ldmatrix per mma, for twice the registers).
Addresses: each lane computes its .shared address of K's and V's fragment (0, 0) once (lanes.k_ldm, v_ldm, compiled
  into the kernel below); every other fragment, and every cp.async copy, is a compile-time byte offset from a base
  that ptxas folds into the instruction (Numba's array indexing would recompute a 64-bit address for each).
Causal (top-left): K/V tiles right of the Q tile's last row are not loaded, a warp whose rows all lie left of a
  tile skips its math; masking runs, in a branch of its own, only on diagonal tiles and the ragged last tile.
Variants: m16n8k16 (sm_80+, fp16 or bf16) or, with K8, two m16n8k8 per 16-key step (sm_75, the T4; fp16 only).
FlashAttention-2 Algorithm 1's lines (Dao 2023) are marked "# line N"; lse is the paper's L. PTX and ptxas checks:
  flashlib.numba_kernels.ptx (tc_report). No 16-bit backward here (cupy_kernels has one; numba's is fa2_bwd_tf32).
bf16 from torch: not exported through __cuda_array_interface__, so it reaches this kernel as int16/uint16 bits
  (t.view(torch.int16)); o comes back as the same bits.
"""
import functools
import math

import numpy as np
from numba import cuda, float32, int32, uint32

from ..constants import LOG2E, STATIC_SMEM_BYTES
from ..env import simulated
from . import host, lanes, mma
from .host import LN2, NEG_INF, check_causal, copy, device, empty, kv_groups, pair_grid, scale_of
from .warp import FULL, online_softmax_step


HEAD_DIMS = (32, 64, 96, 128, 256)  # compiled head dims; a head dim 1 ... 256 is zero-padded up to the next
DTYPES = ("float16", "bfloat16")
# (NW warps, Bc keys, NSTAGE, MT m-tiles of 16 rows per warp, MINB blocks per SM for ptxas or 0) per head dim,
# Br = 16*NW*MT, under 48 KB of static shared memory (Numba has no opt-in); swept by benchmarks/numba_tc_bench.py.
# d = 256 (not swept): Bc = 16, so S and P fit beside O's 128 fp32 registers. The m16n8k8 (sm_75) path: two warps
# (Br = 32 = 2 Bc, one stage); O's registers and the register-staged K/V copies (no cp.async) spill 28 bytes there.
TILES = {32: (4, 64, 2, 1, 0), 64: (4, 64, 2, 1, 0), 96: (4, 32, 2, 1, 0), 128: (4, 32, 2, 1, 0), 256: (4, 16, 2, 1, 0)}
TILES_SM75 = {32: (4, 64, 1, 1, 0), 64: (4, 64, 1, 1, 0), 96: (4, 64, 1, 1, 0), 128: (4, 64, 1, 1, 0),
              256: (2, 16, 1, 1, 0)}
SM75_SPILL_BYTES = {256: 28}    # what ptxas reports for the sm_75 instance of a head dim that spills (no other does)


def smem_bytes(D, Bc, NSTAGE):
    return 2 * NSTAGE * Bc * (D // 2 + 4) * 4


q_ldm, k_ldm, v_ldm = (cuda.jit(device=True, inline="always")(f) for f in (lanes.q_ldm, lanes.k_ldm, lanes.v_ldm))


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


def jit_options(NW, MINB):
    """cuda.jit / compile_ptx options: launch bounds (threads per block, blocks per SM) when MINB is set."""
    return {"launch_bounds": (32 * NW, MINB)} if MINB else {}


@functools.lru_cache(maxsize=None)
def make_fa2_tc(D, NW, Bc, NSTAGE, dtype, K8, MT=1, MINB=0):
    """(kernel, threads per block, Br) for head dim D (a multiple of 16), NW warps of MT 16-row m-tiles, Bc keys
    per tile (a multiple of 16), NSTAGE (1 or 2) K/V buffers; MINB > 0 asks ptxas for MINB resident blocks per SM
    (launch bounds: it caps the registers)."""
    Br, NT = 16 * NW * MT, 32 * NW
    W, LDW = D // 2, D // 2 + 4                      # words per row in global / shared memory
    ROW = 4 * LDW                                    # bytes per shared row
    STAGE = Bc * ROW                                 # bytes of one K (or V) stage
    C4 = W // 4                                      # 16-byte chunks per row
    KD, NB, KB, ND = D // 16, Bc // 8, Bc // 16, D // 8
    ASYNC = NSTAGE == 2
    ROWS = 2 * NSTAGE * Bc
    CP = -(-Bc * C4 // NT)                           # 16-byte copies per thread for one K (or V) tile
    EVEN = NT % C4 == 0 and Bc * C4 % NT == 0        # then a thread copies rows r0 + RSTEP*it, column c0 (not D=96)
    RSTEP = NT // C4
    R2 = 2 * MT                                      # rows per thread: 16*mt + g and 16*mt + g + 8
    if not (D % 16 == 0 and Bc % 16 == 0 and NSTAGE in (1, 2) and MT in (1, 2) and Br <= ROWS and not (K8 and ASYNC)
            and smem_bytes(D, Bc, NSTAGE) <= STATIC_SMEM_BYTES):
        raise ValueError(f"make_fa2_tc(D={D}, NW={NW}, Bc={Bc}, NSTAGE={NSTAGE}, K8={K8}, MT={MT}): D and Bc must be "
                         "multiples of 16, NSTAGE 1 or 2 (1 with K8), MT 1 or 2, Br = 16*NW*MT <= 2*NSTAGE*Bc and the "
                         f"K/V stages fit {STATIC_SMEM_BYTES} bytes of static shared memory")
    MMA = mma.mma_m16n8k16_bf16 if dtype == "bfloat16" else mma.mma_m16n8k16_f16
    pack = mma.pack_bf16x2 if dtype == "bfloat16" else mma.pack_f16x2

    @cuda.jit(device=True, inline="always")
    def mma16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        """D = A B + C over one 16-deep k-step (lanes' m16n8k16 fragments): one m16n8k16, or with K8 (sm_75) two
        m16n8k8, k 0..7 with (a0, a1, b0) then k 8..15 with (a2, a3, b1)."""
        if K8:
            x = mma.mma_m16n8k8_f16(a0, a1, b0, c0, c1, c2, c3)
            return mma.mma_m16n8k8_f16(a2, a3, b1, x[0], x[1], x[2], x[3])
        return MMA(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)

    @cuda.jit(device=True, inline="always")
    def mma_tiles(a, kk, b, nn, c):
        """c[mt, 2nn + u] += a[mt, kk] B_u for the warp's MT m-tiles mt and u = 0, 1: b, one ldmatrix.x4, holds the
        B fragments of two n-tiles (b0, b1 of n-tile 2nn, b2, b3 of 2nn + 1), and feeds all MT m-tiles."""
        for mt in range(MT):
            for u in range(2):
                n = 2 * nn + u
                x = mma16(a[mt, kk, 0], a[mt, kk, 1], a[mt, kk, 2], a[mt, kk, 3], b[2 * u], b[2 * u + 1],
                          c[mt, n, 0], c[mt, n, 1], c[mt, n, 2], c[mt, n, 3])
                for e in range(4):
                    c[mt, n, e] = x[e]

    @cuda.jit(**jit_options(NW, MINB))
    def fa2_tc(q, k, v, o, lse, Nq, Nk, causal, scale_log2, G):
        sm = cuda.shared.array((ROWS, LDW), uint32, alignment=16)   # ldmatrix, cp.async: 16-byte rows
        qf = cuda.local.array((MT, KD, 4), uint32)
        s = cuda.local.array((MT, NB, 4), float32)
        pa = cuda.local.array((MT, KB, 4), uint32)
        acc = cuda.local.array((MT, ND, 4), float32)
        m = cuda.local.array(R2, float32)        # per row of the thread: index 2*mt + h
        l = cuda.local.array(R2, float32)
        mx = cuda.local.array(R2, float32)
        base = cuda.local.array(R2, float32)
        tid = cuda.threadIdx.x
        lane, warp = tid & 31, tid >> 5
        g, t = lane >> 2, lane & 3
        # causal: the longest rows (last Q tiles) start first, so that short blocks fill the tail of the launch
        i = cuda.gridDim.x - 1 - cuda.blockIdx.x if causal else cuda.blockIdx.x
        bh = cuda.blockIdx.y + cuda.gridDim.y * cuda.blockIdx.z   # (batch, head) pairs over y and z (pair_grid)
        if bh >= lse.shape[0]:
            return
        q0 = i * Br
        qw = q0 + 16 * MT * warp                     # first query row of this warp
        qrow, krow = bh * Nq, uint32(bh) // uint32(G) * Nk   # first row of this (batch, head), of its kv head (GQA)
        kv_end = min(Nk, q0 + Br) if causal else Nk
        n_tiles = (kv_end + Bc - 1) // Bc
        z = uint32(0)
        for h in range(2 * MT):                      # line 5: m = -inf, l = 0, O = 0, in registers
            m[h] = NEG_INF
            l[h] = 0.0
        for mt in range(MT):
            for n in range(ND):
                for e in range(4):
                    acc[mt, n, e] = 0.0

        for idx in range(tid, Br * C4, NT):          # line 4: Q_i, through shared memory into registers, once
            r, c = idx // C4, (idx % C4) * 4         # 16 bytes per thread and step; rows >= Nq are zeros
            mma.store16(sm, r, c, mma.load16(q, qrow + q0 + r, c) if q0 + r < Nq else (z, z, z, z))
        cuda.syncthreads()
        for mt in range(MT):
            for kk in range(KD):
                rq, cq = q_ldm(lane, MT * warp + mt, kk)   # (row, col in 16-bit elements) of m-tile MT*warp + mt
                x = mma.ldmatrix_x4(sm, rq, cq >> 1)
                for e in range(4):
                    qf[mt, kk, e] = x[e]
        cuda.syncthreads()                           # the K/V stages overwrite Q's rows

        # Addresses, computed once: this lane's .shared byte address for the ldmatrix of K fragment (0, 0) and V
        # fragment (0, 0) of stage 0; fragment (nn, kk) of K is 16*nn rows and 16*kk elements (32 bytes) further
        # (k_ldm, v_ldm), a constant that ptxas folds into the instruction.
        rk, ck = k_ldm(lane, 0, 0)
        rv, cv = v_ldm(lane, NSTAGE * Bc // 16, 0)    # V's stage 0 starts NSTAGE*Bc rows down (a multiple of 16)
        ka = mma.shared_u32_at(sm, rk, ck >> 1)
        va = mma.shared_u32_at(sm, rv, cv >> 1)
        # cp.async: copy `it` of a K (or V) tile moves row r0 + RSTEP*it, words c0..c0+3 (when EVEN; rows are W words
        # apart in global memory: the host passes contiguous arrays). Addresses: stage 0 in smem, tile 0 in global.
        r0, c0 = tid // C4, (tid % C4) * 4
        cpa = mma.shared_u32_at(sm, r0, c0)
        gk0 = mma.global_i64_at(k, krow, 0) + 4 * (W * r0 + c0)
        gv0 = mma.global_i64_at(v, krow, 0) + 4 * (W * r0 + c0)

        # line 6. j = -1 (ASYNC only) is the prologue: it loads tile 0. Iteration j loads tile jl (line 7) and
        # computes tile j.
        for j in range(-1 if ASYNC else 0, n_tiles):
            jl = j + 1 if ASYNC else j               # with cp.async, tile j+1 is copied while tile j is computed
            if jl < n_tiles:
                sl_ = jl & 1 if ASYNC else 0         # stage it goes to (freed by the last syncthreads)
                if ASYNC and EVEN:                   # K_jl and V_jl: CP copies of 16 bytes each
                    left = int32(Nk - jl * Bc - r0)  # rows r0 + RSTEP*it >= Nk - jl*Bc lie past Nk: zero-filled
                    so, go = cpa + STAGE * sl_, (4 * W * Bc) * jl
                    for it in range(CP):
                        ok = RSTEP * it < left
                        gof = go + (4 * W * RSTEP) * it if ok else go - 4 * (W * r0 + c0)   # (tile start: valid)
                        nb = 16 if ok else 0         # 0: 16 zero bytes, nothing read
                        mma.cp_async16_at(so + (RSTEP * ROW) * it, gk0 + gof, nb)
                        mma.cp_async16_at(so + (RSTEP * ROW) * it + NSTAGE * STAGE, gv0 + gof, nb)
                    mma.cp_async_commit()
                elif ASYNC:                          # the same with any row / column per copy (D = 96)
                    for it in range(CP):
                        idx = tid + NT * it
                        r, c = idx // C4, (idx % C4) * 4
                        if r < Bc:
                            ok = jl * Bc + r < Nk
                            row = krow + jl * Bc + r if ok else krow
                            nb = 16 if ok else 0
                            mma.cp_async16(sm, sl_ * Bc + r, c, k, row, c, nb)
                            mma.cp_async16(sm, (NSTAGE + sl_) * Bc + r, c, v, row, c, nb)
                    mma.cp_async_commit()
                else:                                # sm_75: plain 16-byte loads and stores, rows past Nk zeroed
                    for idx in range(tid, 2 * Bc * C4, NT):
                        w, r, c = idx // (Bc * C4), (idx // C4) % Bc, (idx % C4) * 4
                        src = k if w == 0 else v
                        mma.store16(sm, w * Bc + r, c,
                                    mma.load16(src, krow + jl * Bc + r, c) if jl * Bc + r < Nk else (z, z, z, z))
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
            kst, vst = ka + STAGE * st, va + STAGE * st   # this tile's K and V fragment (0, 0) addresses
            if not (causal and kv0 > qw + 16 * MT - 1):   # else every key of the tile is right of the warp's rows
                for mt in range(MT):                 # S = Q_i K_j^T: 16*MT x Bc per warp, fp32
                    for n in range(NB):
                        for e in range(4):
                            s[mt, n, e] = 0.0
                for kk in range(KD):                 # line 8: S = Q_i K_j^T; K fragments of key n-tiles 2nn, 2nn+1
                    for nn in range(NB // 2):
                        mma_tiles(qf, kk, mma.ldmatrix_x4_at(kst + (16 * ROW) * nn + 32 * kk), nn, s)   # k_ldm
                # mask (-inf) only on the ragged last tile and the causal diagonal: a branch of its own, so that
                # the other tiles run no comparisons at all
                if kv0 + Bc > Nk or (causal and kv0 + Bc - 1 > qw):
                    for mt in range(MT):
                        for n in range(NB):
                            for e in range(4):
                                col, row = kv0 + 8 * n + 2 * t + (e & 1), qw + 16 * mt + g + 8 * (e >> 1)
                                if col >= Nk or (causal and col > row):
                                    s[mt, n, e] = NEG_INF
                for h in range(2 * MT):              # row max of this thread's keys, then over the 4 lanes of a row
                    mx[h] = NEG_INF
                for mt in range(MT):
                    for n in range(NB):
                        for e in range(4):
                            mx[2 * mt + (e >> 1)] = max(mx[2 * mt + (e >> 1)], s[mt, n, e])
                for h in range(2 * MT):              # line 9: online softmax in base 2 (warp.py)
                    alpha = online_softmax_step(m, l, base, mx, h, scale_log2)
                    for n in range(ND):              # line 10: O's row rescaled by alpha
                        acc[h >> 1, n, 2 * (h & 1)] *= alpha
                        acc[h >> 1, n, 2 * (h & 1) + 1] *= alpha
                for mt in range(MT):                 # P = exp2(S * scale_log2 - base): one FFMA and one MUFU.EX2 each
                    for n in range(NB):
                        for e in range(4):
                            p = mma.exp2_approx(s[mt, n, e] * scale_log2 - base[2 * mt + (e >> 1)])
                            l[2 * mt + (e >> 1)] += p    # this thread's part of the row sum
                            s[mt, n, e] = p
                    for kk in range(KB):             # P's C fragments, rounded to 16 bits, are the A fragments
                        pa[mt, kk, 0] = pack(s[mt, 2 * kk, 0], s[mt, 2 * kk, 1])
                        pa[mt, kk, 1] = pack(s[mt, 2 * kk, 2], s[mt, 2 * kk, 3])
                        pa[mt, kk, 2] = pack(s[mt, 2 * kk + 1, 0], s[mt, 2 * kk + 1, 1])
                        pa[mt, kk, 3] = pack(s[mt, 2 * kk + 1, 2], s[mt, 2 * kk + 1, 3])
                for kk in range(KB):                 # line 10: O += P V_j; V fragments of head-dim n-tiles 2nn, 2nn+1
                    for nn in range(ND // 2):
                        mma_tiles(pa, kk, mma.ldmatrix_x4_trans_at(vst + (16 * ROW) * kk + 32 * nn), nn, acc)  # v_ldm
            cuda.syncthreads()                       # every warp is done with this stage before it is refilled
        # lines 12-15: finish the row sums, divide once, write O (16-bit pairs) and lse = m ln 2 + ln l
        for h in range(2 * MT):
            y = l[h]
            y += cuda.shfl_xor_sync(FULL, y, 1)
            y += cuda.shfl_xor_sync(FULL, y, 2)
            row = qw + 8 * h + g                     # h = 2*mt + (0 or 1): rows 16*mt + g and 16*mt + g + 8
            inv = float32(1.0) / y if y > 0 else float32(0.0)
            if row < Nq:
                for n in range(ND):
                    o[qrow + row, 4 * n + t] = pack(acc[h >> 1, n, 2 * (h & 1)] * inv,
                                                    acc[h >> 1, n, 2 * (h & 1) + 1] * inv)
                if t == 0:
                    lse[bh, row] = m[h] * LN2 + math.log(y) if y > 0 else NEG_INF
    return fa2_tc, NT, Br


def tiles_of(t):
    """(NW, Bc, NSTAGE, MT, MINB) from a 3-, 4- or 5-tuple (MT = 1 and MINB = 0 when left out)."""
    t = tuple(t)
    if not 3 <= len(t) <= 5:
        raise ValueError(f"tiles = (NW, Bc, NSTAGE[, MT[, MINB]]), got {t}")
    return t + (1, 0)[len(t) - 3:]


def factory_args(D, tiles, dtype, K8):
    """make_fa2_tc's arguments for head dim D and tiles (NW, Bc, NSTAGE[, MT[, MINB]])."""
    return (D, *tiles_of(tiles)[:3], dtype, K8, *tiles_of(tiles)[3:])


# ---------------------------------------------------------------- host side
# Per call: argument checks, one cached lookup of the kernel and its launch configuration, views in the kernel's
# layout, output allocation (a caching allocator where there is one), the launch. Inputs not C-contiguous and
# 16-byte aligned are copied first; outputs with other strides are written through a contiguous temporary.
SIG = ("void(uint32[:, ::1], uint32[:, ::1], uint32[:, ::1], uint32[:, ::1], float32[:, ::1], int32, int32, boolean, "
       "float32, int32)")


def config(d, cc, dtype, tiles=None, k8=None):
    """(NW, Bc, NSTAGE, MT, MINB, K8) for head dim d on compute capability cc (a tuple)."""
    k8 = cc < (8, 0) if k8 is None else k8
    NW, Bc, NSTAGE, MT, MINB = tiles_of(tiles or (TILES_SM75 if k8 else TILES)[d])
    if k8 and NSTAGE != 1:
        raise ValueError("the m16n8k8 (sm_75) path has no cp.async: NSTAGE must be 1")
    if smem_bytes(d, Bc, NSTAGE) > STATIC_SMEM_BYTES or 16 * NW * MT > 2 * NSTAGE * Bc:
        raise ValueError(f"tiles {(NW, Bc, NSTAGE, MT)} do not fit 48 KB of static shared memory at d={d}")
    return NW, Bc, NSTAGE, MT, MINB, k8


@functools.lru_cache(maxsize=None)
def kernel(d, cc, dtype, tiles=None, k8=None):
    """(kernel, threads per block, Br): config + make_fa2_tc, looked up once per setting."""
    NW, Bc, NSTAGE, MT, MINB, K8 = config(d, cc, dtype, tiles, k8)
    return make_fa2_tc(d, NW, Bc, NSTAGE, dtype, K8, MT, MINB)


def head_bucket(d):
    """The compiled head dim (HEAD_DIMS) a head dim d runs as."""
    return host.head_bucket(d, HEAD_DIMS, "the numba tc kernel")


def fa2_forward_tc(q, k, v, *, causal=False, scale=None, dtype="float16", tiles=None, k8=None, o=None, lse=None):
    """Tensor Core FA2 forward. q (B, H, Nq, d), k, v (B, H, Nk, d): Numba device arrays (or NumPy arrays, copied;
    or objects with __cuda_array_interface__) of float16, or of int16 / uint16 holding bfloat16 bits for
    dtype='bfloat16'; any strides. k, v may have H_kv heads dividing H (grouped-query attention). d in 1 ... 256:
    compiled for HEAD_DIMS, a head dim between them zero-padded up to the next (head_bucket). Returns o (q's shape
    and dtype) and lse (B, H, Nq) float32, the caller's o / lse when given (any strides). tiles = (NW, Bc, NSTAGE[,
    MT[, MINB]]) overrides TILES; k8=True forces the m16n8k8 (sm_75) path."""
    q, k, v = (device(a) for a in (q, k, v))
    B, H, Nq, d = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if dtype not in DTYPES:
        check(d, dtype)
    want = {"float16": ("float16",), "bfloat16": ("int16", "uint16")}[dtype]
    for name, a in (("q", q), ("k", k), ("v", v)):
        if str(a.dtype) not in want:
            raise ValueError(f"{name} has dtype {a.dtype}; dtype={dtype!r} expects {' or '.join(want)} arrays")
    if tuple(k.shape) != (B, Hkv, Nk, d) or tuple(v.shape) != (B, Hkv, Nk, d):
        raise ValueError(f"k and v must be (B, H_kv, Nk, d) = ({B}, H_kv, Nk, {d}); got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    G = kv_groups(q, k)
    D = head_bucket(d)
    check(D, dtype, k8=bool(k8))
    if simulated():
        raise RuntimeError("the Tensor Core kernel runs PTX (mma.sync), which Numba's CUDA simulator cannot execute: "
                           "it needs a GPU; its checks without one are tests/test_numba_tc.py")
    cc = host.device_cc()
    check(D, dtype, cc, bool(k8))
    kern, NT, Br = kernel(D, cc, dtype, None if tiles is None else tuple(tiles), k8)
    launch = host.launcher(kern, pair_grid(-(-Nq // Br), B * H), NT)
    if D == d:
        return run(launch, q, k, v, o, lse, causal, scale_of(scale, d), G)
    o_pad, lse = run(launch, *(host.padded(a, D) for a in (q, k, v)), None, lse, causal, scale_of(scale, d), G)
    o_out = empty(q.shape, q.dtype) if o is None else device(o)
    copy(o_pad[:, :, :, :d], o_out)
    return o_out, lse


def run(launch, q, k, v, o, lse, causal, scale, G=1):
    """Everything around one launch of the kernel: launch(q, k, v, o, lse words and rows, Nq, Nk, causal, scale *
    log2 e, G query heads per kv head). Split out of fa2_forward_tc so that tests can run it without a GPU (a Python
    `launch`)."""
    B, H, Nq, d = q.shape
    q, k, v = (host.contiguous(device(a)) for a in (q, k, v))
    o_out = None if o is None else device(o)
    lse_out = None if lse is None else device(lse)
    if o_out is not None and tuple(o_out.shape) != tuple(q.shape):
        raise ValueError(f"o must have q's shape {tuple(q.shape)}, got {tuple(o_out.shape)}")
    if lse_out is not None and tuple(lse_out.shape) != (B, H, Nq):
        raise ValueError(f"lse must be (B, H, Nq) = {(B, H, Nq)}, got {tuple(lse_out.shape)}")
    o_k = o_out if o_out is not None and host.usable(o_out) else empty(q.shape, q.dtype)
    lse_k = lse_out if lse_out is not None and host.usable(lse_out) else empty((B, H, Nq), np.float32)
    if q.size:
        launch(host.words(q), host.words(k), host.words(v), host.words(o_k), host.view(lse_k, (B * H, Nq), np.float32),
               np.int32(Nq), np.int32(k.shape[2]), check_causal(causal), np.float32(float(scale) * LOG2E), np.int32(G))
    if o_out is not None and o_k is not o_out:      # the caller's strided arrays: copy the results in
        copy(o_k, o_out)
    if lse_out is not None and lse_k is not lse_out:
        copy(lse_k, lse_out)
    return (o_k if o_out is None else o_out), (lse_k if lse_out is None else lse_out)
