"""FlashAttention-2 backward on Tensor Cores in float32 accuracy (3xTF32), sm_80+: the Tensor Core rung of fa2_bwd.

Same algorithm as fa2_bwd.py (Dao 2023, Algorithm 2; its lines marked "# line N"): the pre-pass
delta = rowsum(dO * O) (the paper's D; fa2_bwd.rowsum_do_o), then
one block per K/V tile that loops over the Q tiles, recomputes P from the stored logsumexp and accumulates dK_j,
dV_j in registers; dQ by float32 atomic adds. Every matrix product runs as 3xTF32 on Tensor Cores: each float32
operand x is split into big + small TF32 numbers and a*b ~= big*big + big*small + small*big, three
mma.sync.m16n8k8.tf32 per product (fa2_tf32.py explains the split; the intrinsics split_tf32 and mma_3xtf32 are
in mma.py, the fragment loads below in lanes.py: st_a, st_b, dv_b, dq_a, dq_b). Error: float32-level (~1e-6
relative per product), as PyTorch's efficient SDPA backend in float32.

Grid (Tc = ceil(Nk / Bc), B*H); block NW = 4 warps (128 threads); Bc = 16*NW = 64 keys per block, Br query rows
per Q tile (TILES). Warp w owns keys kv0 + 16w .. kv0 + 16w + 15 of the block's tile. Per Q tile i:
  S^T  = K_w Q_i^T   (16 x Br, C fragments; the transpose is computed directly: keys are the mma rows)
  dP^T = V_w dO_i^T  (16 x Br)
  P^T  = exp2(S^T * scale_log2 - lse_i*log2e), 0 where masked; dS^T = P^T * (dP^T - delta_i)
  dV_w += P^T dO_i,  dK_w += dS^T Q_i          (A operand = the C fragments of P^T / dS^T, no data movement)
  dQ_i += scale * dS K_j                       (block-wide: dS goes through shared memory; atomics to global)
mma.m16n8k8 .tf32 fragments (lane = 4g + t): A 16x8 a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4); B 8x8
  b0 (k=t, n=g), b1 (k=t+4, n=g); C 16x8 c0, c1 (g, 2t, 2t+1), c2, c3 (g+8, 2t, 2t+1).
k permutation (as in fa2_tf32): the sum over k does not care which k each of the 8 slots stands for, as long as A
  and B agree. For dV += P^T dO (k = query) slot t is query 8kk + 2t and slot t+4 is query 8kk + 2t + 1; P^T's
  C fragment (c0, c1, c2, c3) is then the A fragment (c0, c2, c1, c3) of the same lane, and dO's B fragment is
  rows 8kk + 2t, 8kk + 2t + 1 (conflict-free banks). dQ += dS K uses the same permutation over keys.
Registers of one thread: dk[D/8, 4], dv[D/8, 4] (C fragments of the warp's 16 x D dK_w, dV_w, kept for the whole
  loop), s[Br/8, 4], dp[Br/8, 4] (S^T -> P^T, dP^T -> dS^T), dq[Br/16, D/32, 4] (its part of dQ_i).
Shared memory (dynamic, float32, rows padded by 4 words so fragment loads hit 32 different banks):
  Ks, Vs (Bc x D+4) loaded once; Qs, dOs (Br x D+4), lse, delta (Br) per Q tile; dSs (Br x Bc+4) per Q tile.
  (D is the head dim here; lse is the paper's L.)
  Above 48 KB (d = 128: 89 KB): the launch opts in to more with CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
  (sm_80: up to 163 KB, sm_90: 227 KB); `fits` checks the device's limit (sm_86/89 GPUs have 99 KB).
dQ: float32 atomic adds (red.global.add.f32), as fa2_bwd and FlashAttention-2: every K/V block adds its
  Br x D part scale * dS_ij K_j to dQ_i, blocks of different j run at the same time, so they must add atomically;
  a second kernel per Q tile would avoid atomics but recompute S and dP (two more of the five products). dq must
  be zero before the launch; the order of the adds varies, so dq varies from run to run in the last bits.
  Each warp computes the D/4 columns 8*(D/32)*w .. of dQ_i for all Br rows from the whole dS (Br x Bc) and K_j.
Causal (top-left, as PyTorch): Q tiles entirely above the block's first key are skipped (i0 = kv0 // Br);
  masking only where a tile touches the diagonal or the ragged last K/V tile; rows past Nq have lse = +inf (P = 0).
A GPU only (inline PTX): the simulator cannot run it; `backward` keeps fa2_bwd there and on sm_75. PTX and ptxas
checks of every instance: flashlib.numba_kernels.ptx (bwd_tf32_report).
"""
import functools

import numpy as np
from numba import cuda, float32, uint32

from ..constants import LOG2E
from ..env import simulated
from . import host, mma
from .fa2_bwd import rowsum_do_o
from .host import (NEG_INF, TF32_HEAD_DIMS, check_causal, device, flat, grouped, kv_groups, n_blocks, pair_grid,
                   scale_of, zero2)
from .mma import cp_async16_f32, mma_3xtf32, split_tf32

NW = 4                                              # warps per block
BC = 16 * NW                                        # keys per block
TILES = {32: 32, 64: 32, 96: 16, 128: 16}           # Br (query rows per Q tile) per head dim
# Register cap per head dim on sm_90 (ptxas --maxrregcount): 168 x 128 threads lets 3 blocks share an SM, as its
# 228 KB of shared memory does (<= 68 KB each); ptxas reaches it without spilling (tests/test_numba_bwd_tf32.py).
# d = 128: no cap (~240 registers, 2 blocks per SM, as its 89 KB of shared memory allows). sm_80 (164 KB of
# shared memory per SM: 2 blocks at d = 64) gets no cap; there it would spill a little. Larger Br spill.
MAXREG = {32: 168, 64: 168, 96: 168, 128: None}


def maxreg(D, cc):
    return MAXREG.get(D) if tuple(cc) >= (9, 0) else None


def layout(D, Br):
    """Offsets (in float32 words) of the shared arrays in the dynamic shared memory, and its size in bytes."""
    LD, LDS = D + 4, BC + 4
    off = {"K": 0, "V": BC * LD, "Q": 2 * BC * LD, "dO": 2 * BC * LD + Br * LD}
    off["dS"] = off["dO"] + Br * LD
    off["lse"] = off["dS"] + Br * LDS
    off["delta"] = off["lse"] + Br
    return off, 4 * (off["delta"] + Br)


def smem_bytes(D, Br=None):
    return layout(D, Br or TILES[D])[1]


@functools.lru_cache(maxsize=None)
def make_bwd_tf32(D, Br, max_registers=None):
    """(kernel, threads per block) for head dim D (a multiple of 32) and Br query rows per Q tile (a multiple of
    16)."""
    if D % 32 or Br % 16:
        raise ValueError(f"make_bwd_tf32(D={D}, Br={Br}): D must be a multiple of 32 and Br of 16")
    NT, Bc = 32 * NW, BC
    off, _ = layout(D, Br)
    LD, LDS = D + 4, Bc + 4
    OK, OV, OQ, ODO, ODS, OL, ODL = (off[x] for x in ("K", "V", "Q", "dO", "dS", "lse", "delta"))
    KD, NQ, MQ, DQN = D // 8, Br // 8, Br // 16, D // (8 * NW)
    C4 = D // 4                                    # 16-byte chunks per row
    INF = -NEG_INF                                 # +inf: the base-2 lse of a row past Nq (P = 0)

    @cuda.jit(device=True, inline="always")
    def acc_ct_b(c, ak, acc, sm, OB, g, t):
        """acc (the warp's 16 x D, C fragments) += C^T B for c (the C fragments of P^T or dS^T, 16 keys x Br queries:
        the A operand, k permuted, P_AS_A) and B = the Br x D tile at float32 offset OB of sm (dO_i or Q_i; rows
        8kk+2t, 8kk+2t+1, head dim 8n+g: dv_b)."""
        for kk in range(NQ):
            for e in range(4):
                x = split_tf32(c[kk, (e & 1) * 2 + (e >> 1)])       # P_AS_A[e]
                ak[0, e] = x[0]
                ak[1, e] = x[1]
            for n in range(KD):
                x = mma_3xtf32(ak[0, 0], ak[0, 1], ak[0, 2], ak[0, 3], ak[1, 0], ak[1, 1], ak[1, 2], ak[1, 3],
                               sm[OB + (8 * kk + 2 * t) * LD + 8 * n + g],
                               sm[OB + (8 * kk + 2 * t + 1) * LD + 8 * n + g],
                               acc[n, 0], acc[n, 1], acc[n, 2], acc[n, 3])
                for e in range(4):
                    acc[n, e] = x[e]

    @cuda.jit(max_registers=max_registers)
    def fa2_bwd_tf32(q, k, v, lse, do, delta, dq, dk, dv, Nq, Nk, causal, scale, scale_log2, G):
        sm = cuda.shared.array(0, float32, alignment=16)
        s = cuda.local.array((NQ, 4), float32)
        dp = cuda.local.array((NQ, 4), float32)
        ak = cuda.local.array((2, 4), uint32)      # (big, small) TF32 bits of an A fragment (split_tf32)
        av = cuda.local.array((2, 4), uint32)
        acc_k = cuda.local.array((KD, 4), float32)
        acc_v = cuda.local.array((KD, 4), float32)
        acc_q = cuda.local.array((MQ, DQN, 4), float32)
        tid = cuda.threadIdx.x
        lane, warp = tid & 31, tid >> 5
        g, t = lane >> 2, lane & 3
        j, bh = cuda.blockIdx.x, cuda.blockIdx.y + cuda.gridDim.y * cuda.blockIdx.z   # pairs over y, z (pair_grid)
        if bh >= lse.shape[0]:
            return
        kv0 = j * Bc
        kw = 16 * warp                             # the warp's first key in the tile
        # first row of this (batch, head) in the 2-D views: of q, dO, dQ; of its kv head in k, v (GQA); of its dK, dV
        # rows, written per query head (summed over the kv head's query heads afterwards)
        qrow, krow, drow = bh * Nq, uint32(bh) // uint32(G) * Nk, bh * Nk   # (32-bit division: fewer registers)
        Tr = (Nq + Br - 1) // Br
        i0 = kv0 // Br if causal else 0
        for idx in range(tid, Bc * C4, NT):        # line 6: K_j, V_j once, 16 bytes a copy (rows past Nk: 0)
            r, c = idx // C4, (idx % C4) * 4
            ok = kv0 + r < Nk
            cp_async16_f32(sm, OK + r * LD + c, k, krow + (kv0 + r if ok else 0), c, 16 if ok else 0)
            cp_async16_f32(sm, OV + r * LD + c, v, krow + (kv0 + r if ok else 0), c, 16 if ok else 0)
        for idx in range(tid, Br * C4, NT):        # Q_i0, dO_i0 (rows past Nq: zeros)
            r, c = idx // C4, (idx % C4) * 4
            ok = i0 * Br + r < Nq
            cp_async16_f32(sm, OQ + r * LD + c, q, qrow + (i0 * Br + r if ok else 0), c, 16 if ok else 0)
            cp_async16_f32(sm, ODO + r * LD + c, do, qrow + (i0 * Br + r if ok else 0), c, 16 if ok else 0)
        mma.cp_async_commit()
        for n in range(KD):                        # line 7
            for e in range(4):
                acc_k[n, e] = 0.0
                acc_v[n, e] = 0.0
        for i in range(i0, Tr):                    # line 8 (line 9: Q_i, dO_i copied a step ahead; L_i, delta_i)
            q0 = i * Br
            for r in range(tid, Br, NT):           # lse in base 2; +inf (P = 0) past Nq or where no key is visible
                x = lse[bh, q0 + r] if q0 + r < Nq else -INF
                sm[OL + r] = x * float32(LOG2E) if x != -INF else INF
                sm[ODL + r] = delta[bh, q0 + r] if q0 + r < Nq else float32(0.0)
            mma.cp_async_wait(0)                   # Q_i, dO_i (and K_j, V_j) have landed
            cuda.syncthreads()

            # lines 10, 13: S^T = K_w Q_i^T and dP^T = V_w dO_i^T: 16 keys x Br queries per warp
            for n in range(NQ):
                for e in range(4):
                    s[n, e] = 0.0
                    dp[n, e] = 0.0
            for kk in range(KD):
                for e in range(4):                 # A fragments: rows kw+g (+8), head dims 8kk+t (+4)   # st_a
                    x = split_tf32(sm[OK + (kw + g + 8 * (e & 1)) * LD + 8 * kk + t + 4 * (e >> 1)])
                    ak[0, e] = x[0]
                    ak[1, e] = x[1]
                    x = split_tf32(sm[OV + (kw + g + 8 * (e & 1)) * LD + 8 * kk + t + 4 * (e >> 1)])
                    av[0, e] = x[0]
                    av[1, e] = x[1]
                for n in range(NQ):                # B fragments: query 8n+g, head dims 8kk+t (+4)       # st_b
                    x = mma_3xtf32(ak[0, 0], ak[0, 1], ak[0, 2], ak[0, 3], ak[1, 0], ak[1, 1], ak[1, 2], ak[1, 3],
                                   sm[OQ + (8 * n + g) * LD + 8 * kk + t], sm[OQ + (8 * n + g) * LD + 8 * kk + t + 4],
                                   s[n, 0], s[n, 1], s[n, 2], s[n, 3])
                    for e in range(4):
                        s[n, e] = x[e]
                    x = mma_3xtf32(av[0, 0], av[0, 1], av[0, 2], av[0, 3], av[1, 0], av[1, 1], av[1, 2], av[1, 3],
                                   sm[ODO + (8 * n + g) * LD + 8 * kk + t],
                                   sm[ODO + (8 * n + g) * LD + 8 * kk + t + 4],
                                   dp[n, 0], dp[n, 1], dp[n, 2], dp[n, 3])
                    for e in range(4):
                        dp[n, e] = x[e]

            # lines 11, 14: P^T recomputed from the logsumexp, dS^T = P^T (dP^T - delta); dS to shared memory for dQ
            need_mask = kv0 + Bc > Nk or (causal and kv0 + Bc - 1 > q0)
            for n in range(NQ):
                for e in range(4):
                    kr = kw + g + 8 * (e >> 1)     # key (in the tile) and query (in the Q tile) of c_e
                    qr = 8 * n + 2 * t + (e & 1)
                    p = mma.exp2_approx(s[n, e] * scale_log2 - sm[OL + qr])
                    if need_mask:
                        if kv0 + kr >= Nk or (causal and kv0 + kr > q0 + qr):
                            p = float32(0.0)
                    ds = p * (dp[n, e] - sm[ODL + qr])
                    s[n, e] = p
                    dp[n, e] = ds
                    sm[ODS + qr * LDS + kr] = ds

            # dV_w += P^T dO_i (line 12), dK_w += dS^T Q_i (line 16): A = the C fragments of P^T, dS^T.
            # (Two calls, not one loop: a smaller body is unrolled in full, so s[kk] and dp[kk] stay in registers.)
            acc_ct_b(s, ak, acc_v, sm, ODO, g, t)
            acc_ct_b(dp, ak, acc_k, sm, OQ, g, t)
            cuda.syncthreads()                     # dS complete; Qs, dOs are free: copy Q_i+1, dO_i+1 during dQ
            if i + 1 < Tr:
                for idx in range(tid, Br * C4, NT):
                    r, c = idx // C4, (idx % C4) * 4
                    ok = q0 + Br + r < Nq
                    cp_async16_f32(sm, OQ + r * LD + c, q, qrow + (q0 + Br + r if ok else 0), c, 16 if ok else 0)
                    cp_async16_f32(sm, ODO + r * LD + c, do, qrow + (q0 + Br + r if ok else 0), c, 16 if ok else 0)
                mma.cp_async_commit()

            # line 15: dQ_i += scale * dS K_j: this warp's DQN n-tiles of head dims, all Br rows; then atomic adds
            for m in range(MQ):
                for n in range(DQN):
                    for e in range(4):
                        acc_q[m, n, e] = 0.0
            for kk in range(Bc // 8):
                for m in range(MQ):
                    for e in range(4):             # A: rows 16m+g (+8), keys 8kk+2t (+1)                   # dq_a
                        x = split_tf32(sm[ODS + (16 * m + g + 8 * (e & 1)) * LDS + 8 * kk + 2 * t + (e >> 1)])
                        ak[0, e] = x[0]
                        ak[1, e] = x[1]
                    for n in range(DQN):           # B: keys 8kk+2t (+1), head dim 8(DQN w + n) + g         # dq_b
                        col = 8 * (DQN * warp + n) + g
                        x = mma_3xtf32(ak[0, 0], ak[0, 1], ak[0, 2], ak[0, 3], ak[1, 0], ak[1, 1], ak[1, 2], ak[1, 3],
                                       sm[OK + (8 * kk + 2 * t) * LD + col], sm[OK + (8 * kk + 2 * t + 1) * LD + col],
                                       acc_q[m, n, 0], acc_q[m, n, 1], acc_q[m, n, 2], acc_q[m, n, 3])
                        for e in range(4):
                            acc_q[m, n, e] = x[e]
            for m in range(MQ):
                for e in range(4):
                    row = q0 + 16 * m + g + 8 * (e >> 1)
                    if row < Nq:
                        for n in range(DQN):
                            cuda.atomic.add(dq, (qrow + row, 8 * (DQN * warp + n) + 2 * t + (e & 1)),
                                            acc_q[m, n, e] * scale)
            # no barrier here: the next tile's lse_s, D_s writes and the copies into Qs, dOs touch nothing this
            # phase reads, and dSs is rewritten only after the next tile's first barrier

        mma.cp_async_wait(0)                       # (no copy is left in flight when the block exits)
        for h in range(2):                         # line 18: dK_w, dV_w, rows kv0 + kw + g (+8), dims 8n + 2t (+1)
            key = kv0 + kw + g + 8 * h
            if key < Nk:
                for n in range(KD):
                    for u in range(2):
                        dk[drow + key, 8 * n + 2 * t + u] = acc_k[n, 2 * h + u] * scale
                        dv[drow + key, 8 * n + 2 * t + u] = acc_v[n, 2 * h + u]
    return fa2_bwd_tf32, NT


# ---------------------------------------------------------------- host side
A2 = "float32[:, ::1]"
SIG = f"void({A2}, {A2}, {A2}, {A2}, {A2}, {A2}, {A2}, {A2}, {A2}, int32, int32, boolean, float32, float32, int32)"


def check(d, cc=None):
    """Raise ValueError for what this kernel cannot do."""
    if d not in TF32_HEAD_DIMS:
        raise ValueError(f"the numba 3xTF32 backward takes head_dim in {TF32_HEAD_DIMS}, got {d}")
    if cc is not None and tuple(cc) < (8, 0):
        raise ValueError(f"TF32 mma needs compute capability 8.0 or newer, got {cc}")


def fits(d, dev=None):
    """Whether this kernel can run on the current device (sm_80+, enough opt-in shared memory)."""
    if simulated() or d not in TF32_HEAD_DIMS:
        return False
    dev = dev or cuda.get_current_device()
    if dev.compute_capability < (8, 0):
        return False
    return smem_bytes(d) <= dev.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN


def fa2_backward_tf32(q, k, v, o, lse, do, *, causal=False, scale=None, Br=None, dq=None, dk=None, dv=None):
    """Gradients (dq, dk, dv) as float32 device arrays, on Tensor Cores (3xTF32). q, o, do (B, H, Nq, d), k, v
    (B, H, Nk, d), lse (B, H, Nq) float32, d in TF32_HEAD_DIMS; sm_80+. dq, if given, must be zero (it is accumulated
    into); dk, dv are overwritten. Strided inputs are copied to contiguous ones first."""
    q, k, v, o, lse, do = (device(a) for a in (q, k, v, o, lse, do))
    for a in (q, k, v, o, lse, do):
        if a.dtype != np.float32:
            raise ValueError(f"the 3xTF32 backward takes float32 arrays, got {a.dtype}")
    B, H, Nq, d = q.shape
    Nk = k.shape[2]
    if simulated():
        raise RuntimeError("the 3xTF32 backward runs PTX (mma.sync), which Numba's CUDA simulator cannot execute")
    dev = cuda.get_current_device()
    cc = host.device_cc()
    check(d, cc)
    Br = Br or TILES[d]
    nbytes = layout(d, Br)[1]
    if nbytes > dev.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN:
        raise ValueError(f"needs {nbytes} bytes of shared memory per block, the device allows "
                         f"{dev.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN}")
    q, k, v, o, do = (host.contiguous(a) for a in (q, k, v, o, do))
    if not lse.is_c_contiguous():
        lse = cuda.to_device(np.ascontiguousarray(lse.copy_to_host()))
    delta = cuda.device_array((B, H, Nq), np.float32)
    rowsum_do_o[pair_grid(n_blocks(Nq, 128), B * H), (128,)](do, o, delta)
    if dq is None:
        dq = cuda.device_array((B, H, Nq, d), np.float32)
        if dq.size:
            zero2[n_blocks(dq.size, 256), 256](flat(dq))
    groups = kv_groups(q, k)  # grouped-query attention: dK, dV per query head, then summed per kv head
    dk_h = cuda.device_array((B, H, Nk, d), np.float32) if dk is None or groups > 1 else dk
    dv_h = cuda.device_array((B, H, Nk, d), np.float32) if dv is None or groups > 1 else dv
    sc = scale_of(scale, d)
    kern, NT = make_bwd_tf32(d, Br, maxreg(d, cc))
    if B * H * Nk > 0 and Nq > 0:
        host.launch_dynamic(kern, pair_grid(n_blocks(Nk, BC), B * H), (NT,), nbytes,
                            (flat(q), flat(k), flat(v), lse.reshape(B * H, Nq), flat(do), delta.reshape(B * H, Nq),
                             flat(dq), flat(dk_h), flat(dv_h), np.int32(Nq), np.int32(Nk), check_causal(causal), sc,
                             np.float32(float(sc) * LOG2E), np.int32(groups)))
    elif dk_h.size:  # no query at all: zero dK, dV
        zero2[n_blocks(dk_h.size, 256), 256](flat(dk_h))
        zero2[n_blocks(dv_h.size, 256), 256](flat(dv_h))
    return (dq, *grouped(dk_h, dv_h, k, dk, dv))
