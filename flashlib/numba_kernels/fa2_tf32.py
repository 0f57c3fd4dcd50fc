"""FlashAttention-2 forward on Tensor Cores in float32 accuracy: 3xTF32 (the float32 rung after fa2_fast), sm_80+.

Why 3xTF32. A Tensor Core multiplies TF32 (8-bit exponent, 10-bit mantissa): one TF32 product is only accurate to
~1e-3, far from float32. Split each float32 x into two TF32 numbers, big = tf32(x) and small = tf32(x - big);
then a*b = big_a*big_b + big_a*small_b + small_a*big_b (+ small_a*small_b, ~2^-20 relative, dropped): three
mma per product, float32-level error (~1e-6), still on Tensor Cores. PyTorch's memory-efficient SDPA backend does
the same in float32 on sm_80+: pytorch/pytorch aten/src/ATen/native/transformers/cuda/mem_eff_attention/
gemm_kernel_utils.h, `DefaultGemmType<ArchTag, float>` for kMinComputeCapability >= 80 picks OpClassTensorOp,
InstructionShape 16x8x8 and `cutlass::arch::OpMultiplyAddFastF32` (CUTLASS's MmaTensorOpFastF32: big rounded
toward zero, small by "half-ulp truncate", k3xTF32 = the three products above). That is why SDPA's efficient
backend reaches 34-46 TFLOP/s in float32 on an H100 while CUDA-core kernels (fa2_fast) stay near 13.

The split here (split_tf32, one inline-PTX block, 4 instructions): big = bits(x) & 0xFFFFE000 (truncation: keeps
the 10 mantissa bits TF32 holds; exact, 1 instruction, where cvt.rna.tf32.f32 costs ~3), small = x - big (exact
in float32), small rounded to nearest TF32 by (bits + 0x1000) & 0xFFFFE000 (ties away from zero, = cvt.rna for
finite x). Every operand handed to mma therefore has its low 13 bits zero: the kernel does not depend on what the
hardware does with them. The intrinsics (split_tf32, mma_3xtf32) are in mma.py, lanes.split_model is the same
split in NumPy; tests/test_numba_tf32.py measures its error.

Algorithm: FlashAttention-2 forward (Dao 2023, Algorithm 1), split-Q, as fa2_tc.py: each warp owns 16 query rows.
Grid (Tr = ceil(Nq / Br), B*H); block NW warps (32*NW threads); Br = 16*NW query rows, Bc keys per K/V tile.
Arrays: q, k, v are (B*H*N, d) uint32 views of the float32 data (row b*H*N + h*N + n), o (B*H*Nq, d) float32,
  lse (B*H, Nq) float32.
mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, fragments (PTX ISA, "Matrix fragments for mma.m16n8k8",
  .tf32; lane = 4g + t): A 16x8 a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4); B 8x8 b0 (k=t, n=g),
  b1 (k=t+4, n=g); C/D 16x8 c0, c1 (g, 2t and 2t+1), c2, c3 (g+8, 2t and 2t+1). (lanes.tf32_a_index etc.)
Permutations (the trick that removes every shuffle and makes every shared-memory read a 16-byte vector): the sum
  over k of an mma does not care which k each of its 8 slots stands for, as long as A and B agree; nor does an
  output column care where it is computed, as long as it is written back to the right place.
  * S = Q K^T, k = head dim: head dims 16c .. 16c+15 form two k-steps h = 0, 1; slot t is dim 16c + 4t + 2h,
    slot t+4 is dim 16c + 4t + 2h + 1. A lane's b0, b1 for both steps are then K[key][16c+4t .. 16c+4t+3]: one
    16-byte load (lanes.k_frag). Q's A fragments follow the same rule (lanes.q_frag), loaded once from global memory.
  * O += P V, k = key: slot t is key 8jj + 2t, slot t+4 is key 8jj + 2t + 1. P's C fragment (c0 c1 = row g, keys
    8jj+2t, +1; c2 c3 = row g+8) then IS the A fragment, reordered (c0, c2, c1, c3) (lanes.P_AS_A): same lane, no move.
  * O += P V, n = head dim: n-tiles 4m .. 4m+3, column g of n-tile 4m+u is dim 32m + 4g + u, so a lane's b0 for
    four n-tiles is V[key][32m+4g .. +3], one 16-byte load (v_frag); C column col of n-tile 4m+u is dim
    32m + 4col + u (o_dim), so a lane writes dims 32m+8t .. 32m+8t+7 of its two rows.
Shared memory (static, < 48 KB), uint32 words of float32 bits: Ks (Bc x D+16) and Vs (Bc x D+4). Padding for
  banks: a 16-byte load is served 8 lanes at a time; rows D+16 (= 16 mod 32 words) put K's 8 lanes (2 keys x 4
  column groups) on 32 different banks, rows D+4 put V's (4 keys 2t x 2 column groups) on 32 banks.
  Pipeline (cp.async, one buffer each, as FlashAttention-2's CUTLASS kernel): V_j is copied while S = Q K_j^T
  and the softmax run, K_{j+1} while P V_j runs. Commit order K0 V0 K1 V1 ...; wait_group 1 before each use.
Registers of one thread, for the warp's rows r = 16*warp + g and r + 8:
  qb[D/8, 4], qs[D/8, 4] Q's A fragments, big and small (QREG = q_in_registers, CuPy's QREG: split once), or
                qr[D/8, 4] the raw bits (split again per tile: saves D/2 registers at d = 128);
  s[Bc/8, 4]  S = Q K_j^T (C layout), overwritten by P = exp2(S*scale_log2 - m), scale_log2 = scale*log2(e);
  acc[D/8, 4] unnormalised O (C layout, columns per o_dim); m[2], l[2] running max (base 2) and this thread's
              part of the row sum (the 4 lanes of a row add theirs with shuffles at the end).
Unrolling: every register-array index must be a compile-time constant, so every fragment loop must be unrolled in
  full; NVVM does that only for loop nests up to ~32 mma bodies. The two products are therefore written as device
  functions (qk_part, pv_part, inlined) called NPS / NPV times with constant offsets (parts()).
Causal (top-left, as PyTorch): K/V tiles right of the Q tile's last row are not loaded; a warp whose 16 rows all
  lie left of a tile skips its math; masking (-inf) only on the diagonal and on the ragged last tile.
FlashAttention-2 Algorithm 1's lines (Dao 2023) are marked "# line N" where the kernel does them. Not here: the
backward (fa2_bwd_tf32.py), head dims other than TF32_HEAD_DIMS (fa2_fast runs those). PTX and ptxas checks of every
instance: flashlib.numba_kernels.ptx (tf32_report).
"""
import functools
import math

import numpy as np
from numba import cuda, float32, uint32

from ..constants import LOG2E, STATIC_SMEM_BYTES
from ..env import simulated
from . import host, mma
from .host import LN2, NEG_INF, TF32_HEAD_DIMS, check_causal, device, kv_groups, pair_grid, scale_of
from .mma import mma_3xtf32, split_tf32, split_tf32_again
from .warp import FULL, online_softmax_step

# (NW warps, Bc keys, QREG, MAXREG) per head dim: QREG keeps Q split in registers (else split again each tile:
# fewer registers), MAXREG caps registers per thread (0: ptxas decides). Static shared memory < 48 KB limits Bc at
# d = 96, 128 to 32. Measured on an H100 (flashlib/data/results/numba_tf32_h100.json, non-causal, N = 4096 / 16384,
# TFLOP/s): d=64 (4, 64, False, 168) 40.1 / 42.4 [168 registers: 3 blocks per SM, 12 bytes of spills] beside
# (4, 64, False, 0) 32.8 / 37.4 [177 registers], (4, 64, True, 0) 36.6 / 40.3, (4, 32, True, 0) 37.4 / 40.2;
# d=128 (8, 32, False, 0) 39.8 / 43.2 beside (4, 32, False, 0) 38.6 / 42.3, (4, 16, False, 0) 34.6 / 36.7.
# d = 32 and 96: not timed.
TILES = {32: (4, 64, True, 0), 64: (4, 64, False, 168), 96: (4, 32, False, 0), 128: (8, 32, False, 0)}


def ld_k(D):
    return D + 16


def ld_v(D):
    return D + 4


def smem_bytes(D, Bc):
    return Bc * (ld_k(D) + ld_v(D)) * 4


UNROLL = 32                                          # largest loop nest (mma bodies) NVVM unrolled in full


def parts(n, per):
    """Fewest pieces p (dividing n, at most 4) so that one piece, n / p outer iterations of `per` mma bodies,
    stays within UNROLL."""
    for p in (1, 2, 3, 4):
        if n % p == 0 and n // p * per <= UNROLL:
            return p
    raise ValueError(f"a loop nest of {n} x {per} mma bodies does not split into <= 4 pieces of <= {UNROLL}")


def in_pieces(part, n, step):
    """An inline device function pieces(a, b, c, d, e, g, t) that calls part(a, b, c, d, e, offset, g, t) for
    offset = 0, step, ..., (n - 1) * step (n <= 4 from parts): n calls, not a loop, so that the compiler unrolls
    each piece in full."""
    @cuda.jit(device=True, inline="always")
    def pieces(a, b, c, d, e, g, t):
        part(a, b, c, d, e, 0, g, t)
        if n > 1:
            part(a, b, c, d, e, step, g, t)
        if n > 2:
            part(a, b, c, d, e, 2 * step, g, t)
        if n > 3:
            part(a, b, c, d, e, 3 * step, g, t)
    return pieces


# ---------------------------------------------------------------- the kernel
@functools.lru_cache(maxsize=None)
def make_fa2_tf32(D, NW, Bc, QREG, MAXREG=0):
    """(kernel, threads per block, Br) for head dim D (a multiple of 32), NW warps, Bc keys per tile (a multiple of
    8); QREG: Q's big/small fragments kept in registers (else its raw bits, split again each tile); MAXREG: register
    cap."""
    Br, NT = 16 * NW, 32 * NW
    LDK, LDV = ld_k(D), ld_v(D)
    C4 = D // 4                                      # 16-byte chunks per row
    KS, NB, ND, DC, DM = D // 8, Bc // 8, D // 8, D // 16, D // 32
    if D % 32 or Bc % 8 or smem_bytes(D, Bc) > STATIC_SMEM_BYTES:
        raise ValueError(f"make_fa2_tf32(D={D}, Bc={Bc}): D must be a multiple of 32, Bc of 8, and the K, V tiles "
                         f"({smem_bytes(D, Bc)} bytes) must fit {STATIC_SMEM_BYTES} bytes of static shared memory")
    QW = 1 if QREG else KS                           # shapes of the unused register arrays: (1, 4)
    NPS, NPV = parts(DC, NB * 2), parts(NB, DM * 4)  # each product in NPS / NPV pieces (see qk_part)
    DCP, NBP = DC // NPS, NB // NPV

    @cuda.jit(device=True, inline="always")
    def qk_part(s, qb, qs, qr, Ks, c0, g, t):
        """S += Q K_j^T over head dims 16*c0 .. 16*(c0 + DCP) (k_frag, q_frag)."""
        for cl in range(DCP):
            c = c0 + cl
            if not QREG:                             # Q's fragments of k-steps 2c, 2c+1, split again
                for h in range(2):
                    for e in range(4):
                        y = split_tf32_again(qr[2 * c + h, e])
                        qb[2 * c + h, e] = y[0]
                        qs[2 * c + h, e] = y[1]
            for n in range(NB):
                x = mma.load16(Ks, 8 * n + g, 16 * c + 4 * t)                            # k_frag
                for h in range(2):                   # words 2h, 2h+1 are b0, b1 of k-step 2c + h
                    kk = 2 * c + h
                    d4 = mma_3xtf32(qb[kk, 0], qb[kk, 1], qb[kk, 2], qb[kk, 3],
                                    qs[kk, 0], qs[kk, 1], qs[kk, 2], qs[kk, 3],
                                    x[2 * h], x[2 * h + 1], s[n, 0], s[n, 1], s[n, 2], s[n, 3])
                    for e in range(4):
                        s[n, e] = d4[e]

    @cuda.jit(device=True, inline="always")
    def pv_part(s, ab, as_, acc, Vs, jj0, g, t):
        """O += P V_j over keys 8*jj0 .. 8*(jj0 + NBP) of the tile (P_AS_A, v_frag, o_dim)."""
        for jl in range(NBP):
            jj = jj0 + jl
            for e in range(4):                       # P's C registers are the A fragment: (c0, c2, c1, c3)
                y = split_tf32(s[jj, 2 * (e & 1) + (e >> 1)])
                ab[e] = y[0]
                as_[e] = y[1]
            for mm in range(DM):                     # n-tiles 4mm .. 4mm+3
                x0 = mma.load16(Vs, 8 * jj + 2 * t, 32 * mm + 4 * g)                      # b0 (slot t)
                x1 = mma.load16(Vs, 8 * jj + 2 * t + 1, 32 * mm + 4 * g)                  # b1 (slot t+4)
                for u in range(4):
                    n = 4 * mm + u
                    d4 = mma_3xtf32(ab[0], ab[1], ab[2], ab[3], as_[0], as_[1], as_[2], as_[3],
                                    x0[u], x1[u], acc[n, 0], acc[n, 1], acc[n, 2], acc[n, 3])
                    for e in range(4):
                        acc[n, e] = d4[e]

    qk, pv = in_pieces(qk_part, NPS, DCP), in_pieces(pv_part, NPV, NBP)

    @cuda.jit(**({"max_registers": MAXREG} if MAXREG else {}))
    def fa2_tf32(q, k, v, o, lse, Nq, Nk, causal, scale_log2, G):
        Ks = cuda.shared.array((Bc, LDK), uint32, alignment=16)
        Vs = cuda.shared.array((Bc, LDV), uint32, alignment=16)
        qb = cuda.local.array((KS, 4), uint32)
        qs = cuda.local.array((KS, 4), uint32)
        qr = cuda.local.array((QW, 4), uint32)
        ab = cuda.local.array(4, uint32)
        as_ = cuda.local.array(4, uint32)
        s = cuda.local.array((NB, 4), float32)
        acc = cuda.local.array((ND, 4), float32)
        m = cuda.local.array(2, float32)
        l = cuda.local.array(2, float32)
        mx = cuda.local.array(2, float32)
        base = cuda.local.array(2, float32)
        tid = cuda.threadIdx.x
        lane, warp = tid & 31, tid >> 5
        g, t = lane >> 2, lane & 3
        i = cuda.gridDim.x - 1 - cuda.blockIdx.x if causal else cuda.blockIdx.x   # longest rows first
        bh = cuda.blockIdx.y + cuda.gridDim.y * cuda.blockIdx.z   # (batch, head) pairs over y and z (pair_grid)
        if bh >= lse.shape[0]:
            return
        q0 = i * Br
        qw = q0 + 16 * warp                          # first query row of this warp
        qrow, krow = bh * Nq, uint32(bh) // uint32(G) * Nk   # this (batch, head)'s first row, its kv head's (GQA)
        kv_end = min(Nk, q0 + Br) if causal else Nk
        n_tiles = (kv_end + Bc - 1) // Bc
        z = uint32(0)
        for h in range(2):                           # line 5: m = -inf, l = 0, O = 0, in registers
            m[h] = NEG_INF
            l[h] = 0.0
        for n in range(ND):
            for e in range(4):
                acc[n, e] = 0.0

        # prologue: start K_0, V_0 (rows past Nk are zero-filled), then Q's fragments straight from global memory
        # (line 4)
        for w in range(2):
            for idx in range(tid, Bc * C4, NT):
                r, c = idx // C4, (idx % C4) * 4
                ok = r < Nk
                if w == 0:
                    mma.cp_async16(Ks, r, c, k, krow + (r if ok else 0), c, 16 if ok else 0)
                else:
                    mma.cp_async16(Vs, r, c, v, krow + (r if ok else 0), c, 16 if ok else 0)
            mma.cp_async_commit()
        for c in range(DC):                          # q_frag: a0..a3 of k-steps 2c, 2c+1 from two 16-byte loads
            for hr in range(2):                      # row g (hr = 0) or g + 8
                r = qw + g + 8 * hr
                x = mma.load16(q, qrow + r, 16 * c + 4 * t) if r < Nq else (z, z, z, z)
                for h in range(2):
                    for u in range(2):               # slot t (u = 0) -> a[hr], slot t+4 -> a[2 + hr]
                        if QREG:
                            y = split_tf32(x[2 * h + u])
                            qb[2 * c + h, 2 * u + hr] = y[0]
                            qs[2 * c + h, 2 * u + hr] = y[1]
                        else:
                            qr[2 * c + h, 2 * u + hr] = x[2 * h + u]

        for j in range(n_tiles):                     # line 6 (line 7: K_j, V_j are copied a step ahead)
            kv0 = j * Bc
            active = not (causal and kv0 > qw + 15)  # else every key of the tile is right of the warp's rows
            mma.cp_async_wait(1)                     # K_j has landed (V_j may still be in flight)
            cuda.syncthreads()
            if active:
                for n in range(NB):
                    for e in range(4):
                        s[n, e] = 0.0
                # line 8: S = Q K_j^T, 16 x Bc per warp. Written as NPS calls, not a loop (in_pieces): the compiler
                # unrolls a loop nest in full only up to ~32 bodies, and every register-array index must be a constant.
                qk(s, qb, qs, qr, Ks, g, t)
            cuda.syncthreads()                       # every warp is done with K_j: refill the buffer
            if j + 1 < n_tiles:
                for idx in range(tid, Bc * C4, NT):
                    r, c = idx // C4, (idx % C4) * 4
                    ok = kv0 + Bc + r < Nk
                    mma.cp_async16(Ks, r, c, k, krow + (kv0 + Bc + r if ok else 0), c, 16 if ok else 0)
            mma.cp_async_commit()                    # (an empty group after the last tile keeps the count)
            if active:
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
                for h in range(2):                   # line 9: online softmax in base 2 (warp.py)
                    alpha = online_softmax_step(m, l, base, mx, h, scale_log2)
                    for n in range(ND):              # line 10: O's row rescaled by alpha
                        acc[n, 2 * h] *= alpha
                        acc[n, 2 * h + 1] *= alpha
                for n in range(NB):
                    for e in range(4):
                        p = mma.exp2_approx(s[n, e] * scale_log2 - base[e >> 1])
                        l[e >> 1] += p
                        s[n, e] = p
            mma.cp_async_wait(1)                     # V_j has landed (K_{j+1} may still be in flight)
            cuda.syncthreads()
            if active:
                pv(s, ab, as_, acc, Vs, g, t)        # line 10: O += P V_j, in NPV pieces as S
            cuda.syncthreads()                       # every warp is done with V_j
            if j + 1 < n_tiles:
                for idx in range(tid, Bc * C4, NT):
                    r, c = idx // C4, (idx % C4) * 4
                    ok = kv0 + Bc + r < Nk
                    mma.cp_async16(Vs, r, c, v, krow + (kv0 + Bc + r if ok else 0), c, 16 if ok else 0)
            mma.cp_async_commit()
        mma.cp_async_wait(0)
        # lines 12-15: finish the row sums, divide once, write O (o_dim: dims 32mm + 8t + 4w + u) and lse
        for h in range(2):
            y = l[h]
            y += cuda.shfl_xor_sync(FULL, y, 1)
            y += cuda.shfl_xor_sync(FULL, y, 2)
            row = qw + g + 8 * h
            inv = float32(1.0) / y if y > 0 else float32(0.0)
            if row < Nq:
                for mm in range(DM):
                    for w in range(2):
                        for u in range(4):
                            o[qrow + row, 32 * mm + 8 * t + 4 * w + u] = acc[4 * mm + u, 2 * h + w] * inv
                if t == 0:
                    lse[bh, row] = m[h] * LN2 + math.log(y) if y > 0 else NEG_INF
    return fa2_tf32, NT, Br


SIG = ("void(uint32[:, ::1], uint32[:, ::1], uint32[:, ::1], float32[:, ::1], float32[:, ::1], int32, int32, boolean, "
       "float32, int32)")


# ---------------------------------------------------------------- host side
def check(d, cc=None):
    """Raise ValueError for what this kernel cannot do."""
    if d not in TF32_HEAD_DIMS:
        raise ValueError(f"the numba tf32x3 kernel takes head_dim in {TF32_HEAD_DIMS}, got {d} (other head dims: "
                         "variant 'fa2_fast')")
    if cc is not None and tuple(cc) < (8, 0):
        raise ValueError(f"TF32 Tensor Cores need compute capability 8.0 or newer, got {cc}: use variant 'fa2_fast'")


def config(d, tiles=None):
    """(NW, Bc, QREG, MAXREG) for head dim d; tiles may leave MAXREG out."""
    NW, Bc, QREG, MAXREG = (tuple(tiles) + (0,))[:4] if tiles else TILES[d]
    if Bc % 8 or smem_bytes(d, Bc) > STATIC_SMEM_BYTES or not 1 <= NW <= 16:
        raise ValueError(f"tiles {tiles}: Bc must be a multiple of 8, NW 1..16 and the K, V tiles fit 48 KB of "
                         f"static shared memory at d={d} ({smem_bytes(d, Bc)} bytes)")
    parts(d // 16, Bc // 8 * 2), parts(Bc // 8, d // 32 * 4)      # raises if a product cannot be unrolled
    return NW, Bc, bool(QREG), int(MAXREG)


def fa2_forward_tf32(q, k, v, *, causal=False, scale=None, tiles=None, o=None, lse=None):
    """3xTF32 Tensor Core FA2 forward. q (B, H, Nq, d), k, v (B, H, Nk, d): float32 Numba device arrays (or NumPy,
    copied; any strides); d in TF32_HEAD_DIMS. Returns o (B, H, Nq, d) and lse (B, H, Nq) float32 device arrays.
    tiles = (NW, Bc, QREG[, MAXREG]) overrides TILES. Needs a GPU of compute capability 8.0+."""
    B, H, Nq, d = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    for name, a in (("q", q), ("k", k), ("v", v)):
        if str(a.dtype) != "float32":
            raise ValueError(f"{name} has dtype {a.dtype}; the tf32x3 kernel takes float32")
    if tuple(k.shape) != (B, Hkv, Nk, d) or tuple(v.shape) != (B, Hkv, Nk, d):
        raise ValueError(f"k and v must be (B, H_kv, Nk, d) = ({B}, H_kv, Nk, {d}); got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    G = kv_groups(q, k)
    check(d)
    NW, Bc, QREG, MAXREG = config(d, tiles)
    if simulated():
        raise RuntimeError("the tf32x3 kernel runs PTX (mma.sync), which Numba's CUDA simulator cannot execute: "
                           "it needs a GPU; its checks without one are tests/test_numba_tf32.py")
    check(d, host.device_cc())
    kern, NT, Br = make_fa2_tf32(d, NW, Bc, QREG, MAXREG)
    q, k, v = (host.contiguous(device(a)) for a in (q, k, v))
    o, lse = host.out_arrays(q, o, lse)
    words = lambda a: a.reshape(a.shape[0] * a.shape[1] * a.shape[2], d).view(np.uint32)
    scale_log2 = np.float32(float(scale_of(scale, d)) * LOG2E)
    if q.size:
        kern[pair_grid(-(-Nq // Br), B * H), (NT,)](words(q), words(k), words(v), o.reshape(B * H * Nq, d),
                                                    lse.reshape(B * H, Nq), np.int32(Nq), np.int32(Nk), check_causal(causal),
                                                    scale_log2, np.int32(G))
    return o, lse
