"""FlashAttention-2 forward in Numba-CUDA, float32, register-tiled: the fast rung.

Algorithm: as fa2.py (one block per Q tile, online softmax over K/V tiles, deferred normalisation, lse), but
each thread computes a TM x TN patch of the score tile S and a TM x D/NTX patch of O, SGEMM-style register tiling:
every value read from shared memory feeds several multiply-adds.

Grid (Tr, B*H). Block (NT,) = (NTY * NTX,) threads; thread t = (ty, tx) = (t // NTX, t % NTX) owns
    rows     ty + NTY*a   (a < TM) of the Q tile (Br = NTY*TM rows),
    S cols   tx + NTX*b   (b < TN) of the K tile (Bc = NTX*TN keys),
    O cols   tx + NTX*e   (e < D/NTX) of the head dim,
and keeps in registers: S (TM x TN), O (TM x D/NTX), m and l of its TM rows (l summed over its own columns
only; the NTX partial sums of a row are added once at the end).
Shared memory: Qs (Br x D+1) loaded once; KV (1 or 2 x Bc x D+1): K_j and V_j (one buffer reused for both
when D is large, to stay under 48 KB of static shared memory); Ps (Br x Bc+1), the P tile; red (Br x NTX),
the partial row maxima. The NTX threads sharing a row are neighbouring lanes of one warp: with SHFL the row
max is reduced with warp shuffles (GPU), without it through `red` (runs in Numba's simulator, which has no
shuffles).
Causal: the j loop stops at the last visible tile; masked scores are -inf and rows with no visible key so far
add nothing (no NaN).
"""
import functools
import math

from numba import cuda, float32

from ..env import simulated
from .host import (NEG_INF, check_arrays, check_causal, device, head_bucket, kv_groups, n_blocks, out_arrays,
                  pair_grid, scale_of, trace_arrays)



def config(D, sim=None):
    """(Br, Bc, TM, TN, NKV) for head bucket D: 128 threads (64 for D=128), static shared memory < 48 KB."""
    sim = simulated() if sim is None else sim
    if sim:                                          # small blocks: the simulator runs a Python thread per thread
        return (8, 8, 2, 2, 2)
    if D <= 64:
        return (64, 32, 4, 4, 2)                     # 16 x 8 threads, 43.6 KB shared at D = 64
    if D <= 128:
        return (32, 32, 4, 4, 1)                     # 8 x 8 threads, 38.3 KB shared, K and V share a buffer
    return (16, 16, 2, 2, 1)                         # 8 x 8 threads, 34.5 KB shared at D = 256


@functools.lru_cache(maxsize=None)
def make_fa2_fast(Br, Bc, D, TM, TN, NKV, SHFL):
    D1, Bc1 = D + 1, Bc + 1                          # padded row lengths (compile-time constants)
    NTY, NTX = Br // TM, Bc // TN
    NT = NTY * NTX
    DN = D // NTX                                    # O columns per thread
    VB = NKV - 1                                     # which KV buffer holds V
    if not (NTY * TM == Br and NTX * TN == Bc and DN * NTX == D and NTX <= 32 and 32 % NTX == 0):
        raise ValueError(f"cfg (Br, Bc, TM, TN) = {(Br, Bc, TM, TN)} at D={D}: TM must divide Br, TN divide Bc, and "
                         "the Bc // TN threads of a row must divide both D and 32 (they are lanes of one warp)")

    @cuda.jit
    def fa2_forward_fast(q, k, v, O, lse, causal, scale, trace, tracing):
        Qs = cuda.shared.array((Br, D1), float32)
        KV = cuda.shared.array((NKV, Bc, D1), float32)
        Ps = cuda.shared.array((Br, Bc1), float32)
        red = cuda.shared.array((Br, NTX), float32)
        S = cuda.local.array((TM, TN), float32)
        acc = cuda.local.array((TM, DN), float32)
        m = cuda.local.array(TM, float32)
        l = cuda.local.array(TM, float32)
        qa = cuda.local.array(TM, float32)
        kb = cuda.local.array(TN, float32)
        ve = cuda.local.array(DN, float32)
        i, bh = cuda.blockIdx.x, cuda.blockIdx.y + cuda.gridDim.y * cuda.blockIdx.z
        b, h = bh // q.shape[1], bh % q.shape[1]
        if b >= q.shape[0]:                          # past the last (batch, head) pair (pair_grid)
            return
        hk = h // (q.shape[1] // k.shape[1])         # grouped-query attention: the kv head of query head h
        Nq, Nk, d = q.shape[2], k.shape[2], q.shape[3]
        t = cuda.threadIdx.x
        ty, tx = t // NTX, t % NTX
        sc = float32(scale)
        for idx in range(t, Br * D, NT):             # Q_i: loaded once, coalesced over the head dim
            r, x = idx // D, idx % D
            ok = i * Br + r < Nq and x < d
            Qs[r, x] = q[b, h, i * Br + r, x] if ok else float32(0.0)
        for a in range(TM):
            m[a] = NEG_INF
            l[a] = 0.0
            for e in range(DN):
                acc[a, e] = 0.0
        Tc = (Nk + Bc - 1) // Bc
        if causal:
            Tc = min(Tc, (i * Br + Br - 1) // Bc + 1)
        for j in range(Tc):
            if tracing and t == 0:
                trace[i + cuda.gridDim.x * bh, j, 0] = i
                trace[i + cuda.gridDim.x * bh, j, 1] = j
            for idx in range(t, Bc * D, NT):         # K_j (and V_j when there is room for both)
                c, x = idx // D, idx % D
                ok = j * Bc + c < Nk and x < d
                KV[0, c, x] = k[b, hk, j * Bc + c, x] if ok else float32(0.0)
                if NKV == 2:
                    KV[1, c, x] = v[b, hk, j * Bc + c, x] if ok else float32(0.0)
            cuda.syncthreads()
            for a in range(TM):                      # S = Q_i K_j^T, TM x TN per thread
                for bb in range(TN):
                    S[a, bb] = 0.0
            for x in range(D):
                for a in range(TM):
                    qa[a] = Qs[ty + NTY * a, x]
                for bb in range(TN):
                    kb[bb] = KV[0, tx + NTX * bb, x]
                for a in range(TM):
                    for bb in range(TN):
                        S[a, bb] += qa[a] * kb[bb]
            for a in range(TM):                      # scale, mask, row max over this thread's columns
                row = i * Br + ty + NTY * a
                mx = NEG_INF
                for bb in range(TN):
                    col = j * Bc + tx + NTX * bb
                    s = S[a, bb] * sc if col < Nk and (not causal or col <= row) else NEG_INF
                    S[a, bb] = s
                    mx = max(mx, s)
                if SHFL:                             # reduce over the NTX neighbouring lanes of the row
                    off = NTX // 2
                    while off > 0:
                        mx = max(mx, cuda.shfl_xor_sync(0xFFFFFFFF, mx, off))
                        off //= 2
                    qa[a] = mx
                else:
                    red[ty + NTY * a, tx] = mx
            if not SHFL:
                cuda.syncthreads()
                for a in range(TM):
                    mx = NEG_INF
                    for u in range(NTX):
                        mx = max(mx, red[ty + NTY * a, u])
                    qa[a] = mx
            for a in range(TM):                      # online softmax: new max, rescale O and l, P into Ps
                m_new = max(m[a], qa[a])
                m_use = m_new if m_new != NEG_INF else float32(0.0)
                alpha = math.exp(m[a] - m_use)       # 0 on the first visible tile, 1 if the max did not move
                m[a] = m_new
                l[a] *= alpha
                for e in range(DN):
                    acc[a, e] *= alpha
                for bb in range(TN):
                    p = math.exp(S[a, bb] - m_use)   # exp(-inf) = 0 for masked scores
                    l[a] += p
                    Ps[ty + NTY * a, tx + NTX * bb] = p
            if NKV == 1:                             # V_j goes where K_j was, once everyone is done with K_j
                cuda.syncthreads()
                for idx in range(t, Bc * D, NT):
                    c, x = idx // D, idx % D
                    ok = j * Bc + c < Nk and x < d
                    KV[0, c, x] = v[b, hk, j * Bc + c, x] if ok else float32(0.0)
            cuda.syncthreads()
            for c in range(Bc):                      # O += P V_j, TM x DN per thread
                for a in range(TM):
                    qa[a] = Ps[ty + NTY * a, c]
                for e in range(DN):
                    ve[e] = KV[VB, c, tx + NTX * e]
                for a in range(TM):
                    for e in range(DN):
                        acc[a, e] += qa[a] * ve[e]
            cuda.syncthreads()                       # Ps, KV are rewritten by the next tile
        for a in range(TM):                          # add the NTX partial sums of l, normalise, write O and lse
            red[ty + NTY * a, tx] = l[a]
        cuda.syncthreads()
        for a in range(TM):
            r = ty + NTY * a
            row = i * Br + r
            lsum = float32(0.0)
            for u in range(NTX):
                lsum += red[r, u]
            if row < Nq:
                inv = float32(1.0) / lsum if lsum > 0 else float32(0.0)
                for e in range(DN):
                    x = tx + NTX * e
                    if x < d:
                        O[b, h, row, x] = acc[a, e] * inv
                if tx == 0:
                    lse[b, h, row] = m[a] + math.log(lsum) if lsum > 0 else NEG_INF
    return fa2_forward_fast, NT


def fa2_forward_fast(q, k, v, *, causal=False, scale=None, cfg=None, shuffle=None, o=None, lse=None, trace=None):
    """Register-tiled FA2. Shapes as fa2.fa2_forward. cfg = (Br, Bc, TM, TN, NKV) overrides `config(D)`;
    shuffle (default: on a real GPU) reduces row maxima with warp shuffles."""
    q, k, v = (device(a) for a in (q, k, v))
    check_arrays(q, k, v)
    B, H, Nq, d = q.shape
    D = head_bucket(d)
    kv_groups(q, k)
    Br, Bc, TM, TN, NKV = cfg or config(D)
    shfl = (not simulated()) if shuffle is None else shuffle
    if Bc // TN > D:
        raise ValueError(f"cfg {cfg} needs D >= {Bc // TN}")
    kern, NT = make_fa2_fast(Br, Bc, D, TM, TN, NKV, shfl)
    o, lse = out_arrays(q, o, lse)
    tr, tracing = trace_arrays(trace)
    kern[pair_grid(n_blocks(Nq, Br), B * H), (NT,)](q, k, v, o, lse, check_causal(causal), scale_of(scale, d), tr, tracing)
    return o, lse
