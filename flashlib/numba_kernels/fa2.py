"""FlashAttention-2 forward (Dao 2023, Algorithm 1) in Numba-CUDA, float32: the readable version.

Algorithm: outer loop over Q tiles, handed out one per thread block; the inner loop walks the K/V tiles j with an
online softmax. O, l, m stay on chip for the whole loop; O is divided by l once at the end (deferred
normalisation) and lse = m + log(l) is written for the backward pass.

Grid (Tr, B*H): block (i, bh) owns Q tile i of head bh.
Block (Br,): thread t owns query row i*Br + t: its O accumulator (a local array of D floats), m and l in registers.
Shared memory: Qs (Br x D+1), Ks (Bc x D+1), Vs (Bc x D) and the score/probability rows Ps (Br x Bc+1).
No warp shuffles: this kernel runs in Numba's CUDA simulator too.
Causal: the j loop stops at the last tile the mask leaves visible; the rest is never computed.
The kernel's comments "line N" name the lines of FlashAttention-2's Algorithm 1 (Dao 2023, arXiv:2307.08691) it
implements; lse is the paper's L.
Block-sparse: an optional (Tr, Tc) block mask turns tiles off; an off tile is neither loaded nor computed (the
block-sparse FlashAttention of Dao et al. 2022, Section 3.3), and a row that sees no key gets O = 0, lse = -inf.
"""
import functools
import math

import numpy as np

from numba import cuda, float32

from .host import (NEG_INF, check_arrays, check_causal, device, head_bucket, kv_groups, n_blocks, out_arrays,
                  pair_grid, scale_of, trace_arrays)



def tiles(D):
    """(Br, Bc) so the static shared memory stays under 48 KB."""
    return (16, 8) if D > 128 else (32, 16) if D > 64 else (32, 32)


@functools.lru_cache(maxsize=None)
def make_fa2(Br, Bc, D):
    D1, Bc1 = D + 1, Bc + 1                          # padded row lengths (compile-time constants)
    @cuda.jit
    def fa2_forward(q, k, v, O, lse, causal, scale, trace, tracing, block_mask, sparse):
        Qs = cuda.shared.array((Br, D1), float32)
        Ks = cuda.shared.array((Bc, D1), float32)
        Vs = cuda.shared.array((Bc, D), float32)
        Ps = cuda.shared.array((Br, Bc1), float32)
        acc = cuda.local.array(D, float32)               # this thread's row of O (unnormalised)
        i, bh = cuda.blockIdx.x, cuda.blockIdx.y + cuda.gridDim.y * cuda.blockIdx.z
        b, h = bh // q.shape[1], bh % q.shape[1]
        if b >= q.shape[0]:                              # past the last (batch, head) pair (pair_grid)
            return
        hk = h // (q.shape[1] // k.shape[1])             # grouped-query attention: the kv head of query head h
        Nq, Nk, d = q.shape[2], k.shape[2], q.shape[3]
        t = cuda.threadIdx.x
        row = i * Br + t
        sc = float32(scale)
        for idx in range(t, Br * D, Br):                 # line 4: load Q_i once (coalesced over the head dim)
            r, x = idx // D, idx % D
            ok = i * Br + r < Nq and x < d
            Qs[r, x] = q[b, h, i * Br + r, x] if ok else float32(0.0)
        for x in range(D):
            acc[x] = 0.0
        m_i, l_i = NEG_INF, float32(0.0)                 # line 5: O_i = 0, l_i = 0, m_i = -inf, on chip
        Tc = (Nk + Bc - 1) // Bc
        if causal:
            Tc = min(Tc, (i * Br + Br - 1) // Bc + 1)    # tiles after this one are fully masked: skipped
        for j in range(Tc):                              # line 6
            if sparse and block_mask[i, j] == 0:         # the same for every thread of the block: no divergence
                continue
            if tracing and t == 0:
                trace[i + cuda.gridDim.x * bh, j, 0] = i
                trace[i + cuda.gridDim.x * bh, j, 1] = j
            cuda.syncthreads()                           # everyone is done with the previous K_j, V_j
            for idx in range(t, Bc * D, Br):             # line 7: load K_j, V_j
                c, x = idx // D, idx % D
                col = j * Bc + c
                ok = col < Nk and x < d
                Ks[c, x] = k[b, hk, col, x] if ok else float32(0.0)
                Vs[c, x] = v[b, hk, col, x] if ok else float32(0.0)
            cuda.syncthreads()
            m_new = m_i                                  # lines 8-9: S = scale * Q_i K_j^T (this row), m_new
            for c in range(Bc):
                col = j * Bc + c
                s = NEG_INF
                if col < Nk and (not causal or col <= row):
                    s = float32(0.0)
                    for x in range(D):
                        s += Qs[t, x] * Ks[c, x]
                    s *= sc
                Ps[t, c] = s
                m_new = max(m_new, s)
            if m_new != NEG_INF:                         # else: no visible key yet, nothing to add
                alpha = math.exp(m_i - m_new)            # lines 9-10: rescales what the old max accumulated
                l_i *= alpha
                for x in range(D):
                    acc[x] *= alpha
                for c in range(Bc):                      # P = exp(S - m_new), unnormalised
                    p = math.exp(Ps[t, c] - m_new)
                    l_i += p
                    for x in range(D):
                        acc[x] += p * Vs[c, x]
                m_i = m_new
        if row < Nq:                                     # lines 12-15: O_i / l_i, L_i = m_i + log l_i, written
            inv = float32(1.0) / l_i if l_i > 0 else float32(0.0)
            for x in range(d):
                O[b, h, row, x] = acc[x] * inv
            lse[b, h, row] = m_i + math.log(l_i) if l_i > 0 else NEG_INF
    return fa2_forward


def fa2_forward(q, k, v, *, causal=False, scale=None, Br=None, Bc=None, o=None, lse=None, trace=None,
                block_mask=None):
    """FA2 loop order, one thread per query row. Shapes as fa1_forward.

    trace: optional int32 device array (Tr*B*H, Tc, 2); block (i, bh) writes row i + Tr*bh with the (i, j) it visits.
    block_mask: optional (Tr, Tc) bool array (NumPy or device) of the tiles to compute, as flashlib.block_sparse.
    """
    q, k, v = (device(a) for a in (q, k, v))
    check_arrays(q, k, v)
    B, H, Nq, d = q.shape
    D = head_bucket(d)
    kv_groups(q, k)
    Br0, Bc0 = tiles(D)
    Br, Bc = Br or Br0, Bc or Bc0
    o, lse = out_arrays(q, o, lse)
    tr, tracing = trace_arrays(trace)
    mask, sparse = _block_mask(block_mask, n_blocks(Nq, Br), n_blocks(k.shape[2], Bc))
    make_fa2(Br, Bc, D)[pair_grid(n_blocks(Nq, Br), B * H), (Br,)](q, k, v, o, lse, check_causal(causal), scale_of(scale, d), tr, tracing,
                                                          mask, sparse)
    return o, lse


def _block_mask(block_mask, Tr, Tc):
    """(device uint8 mask, True) for a (Tr, Tc) block mask; a 1 x 1 placeholder and False for None."""
    if block_mask is None:
        return cuda.to_device(np.ones((1, 1), np.uint8)), False
    shape = tuple(block_mask.shape)
    if shape != (Tr, Tc):
        raise ValueError(f"block_mask must have shape (Tr, Tc) = ({Tr}, {Tc}) for these tiles, got {shape}")
    host = block_mask.copy_to_host() if hasattr(block_mask, "copy_to_host") else np.asarray(block_mask)
    return cuda.to_device(np.ascontiguousarray(host, dtype=np.uint8)), True
