"""FlashAttention-2 backward (Dao 2023, Algorithm 2) in Numba-CUDA, float32.

kernel 1 `rowsum_do_o`: the pre-pass delta_i = rowsum(dO_i * O_i) (the paper's D_i; D is the padded head dim
    here). Grid (ceil(Nq/128), B*H), block (128,): one thread per query row.
kernel 2 `fa2_backward_kernel`: one block per K/V tile. Grid (Tc, B*H), block (Bc*G,): thread t = (c, g) =
    (t % Bc, t // Bc) owns key row j*Bc + c and the head-dim columns g, g+G, g+2G, ... of dK_j and dV_j for that
    row, kept in registers (D/G floats each) for the whole loop over Q tiles i (G = 2 for large D keeps them from
    spilling). P is recomputed from the stored lse (P = exp(S - lse)), never read from memory.
    Shared memory: Ks, Vs (Bc x D+1) for the block's tile; Qs, dOs (Br x D), lse_s, delta_s (Br) for the current Q
    tile; Sp, dPp (G x Br x Bc+1): each thread's partial dot products of S and dP over its columns, added up
    after a barrier; dSs (Br x Bc+1), the dS tile.
    dQ: float32 atomic adds. Every K/V block contributes scale * dS_ij K_j to dQ_i, and blocks of different j
    run concurrently; we add each block's Br x d partial product with one `cuda.atomic.add` per element (Tc adds
    per dQ element in all), as FlashAttention-2 does (Section 3.1: "atomic adds to communicate between
    different thread blocks to update dQ"). The alternative, a second kernel with one block per Q tile that
    recomputes S and P, would avoid atomics but redo the two score matmuls; atomics keep one kernel, and dQ must
    be zeroed first. (The sum order then varies from run to run in the last bits.)
Causal: for K/V tile j the Q tiles start at the first visible one, i0 = j*Bc // Br; the others are skipped.
The kernels' comments "line N" name the lines of FlashAttention-2's Algorithm 2 (Dao 2023, arXiv:2307.08691) they
implement; lse is the paper's L (logsumexp of each query row's scores, from the forward pass).
"""
import functools
import math

import numpy as np
from numba import cuda, float32

from .host import (NEG_INF, check_arrays, check_causal, device, grouped, head_bucket, kv_groups, n_blocks, pair_grid,
                  scale_of)



def tiles(D):
    """(Br, Bc, G) so the static shared memory stays under 48 KB and dK, dV fit in registers without spilling."""
    if D > 128:
        return (4, 16, 4)
    if D > 64:
        return (8, 32, 2)
    if D > 32:
        return (16, 32, 2)
    return (32, 32, 1)


@cuda.jit
def rowsum_do_o(do, o, delta):
    """Algorithm 2, line 4: delta (B, H, Nq) = rowsum(do * o). Grid (ceil(Nq/128), B*H), block (128,)."""
    row, bh = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x, cuda.blockIdx.y + cuda.gridDim.y * cuda.blockIdx.z
    b, h = bh // o.shape[1], bh % o.shape[1]
    if b < o.shape[0] and row < o.shape[2]:
        s = float32(0.0)
        for x in range(o.shape[3]):
            s += do[b, h, row, x] * o[b, h, row, x]
        delta[b, h, row] = s


@cuda.jit
def zero4(a):
    """a (B, H, N, d) = 0. Grid (ceil(N/128), B*H), block (128,): one thread per row."""
    row, bh = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x, cuda.blockIdx.y + cuda.gridDim.y * cuda.blockIdx.z
    if bh < a.shape[0] * a.shape[1] and row < a.shape[2]:
        for x in range(a.shape[3]):
            a[bh // a.shape[1], bh % a.shape[1], row, x] = 0.0


@functools.lru_cache(maxsize=None)
def make_backward(Br, Bc, D, G):
    D1, Bc1 = D + 1, Bc + 1                          # padded row lengths (compile-time constants)
    DG = D // G                                      # head-dim columns of dK, dV per thread
    NT = Bc * G

    @cuda.jit
    def fa2_backward_kernel(q, k, v, lse, do, delta, dq, dk, dv, causal, scale):
        Ks = cuda.shared.array((Bc, D1), float32)
        Vs = cuda.shared.array((Bc, D1), float32)
        Qs = cuda.shared.array((Br, D), float32)
        dOs = cuda.shared.array((Br, D), float32)
        lse_s = cuda.shared.array(Br, float32)
        delta_s = cuda.shared.array(Br, float32)
        Sp = cuda.shared.array((G, Br, Bc1), float32)    # partial dot products over each thread's columns
        dPp = cuda.shared.array((G, Br, Bc1), float32)
        dSs = cuda.shared.array((Br, Bc1), float32)
        dK = cuda.local.array(DG, float32)
        dV = cuda.local.array(DG, float32)
        j, bh = cuda.blockIdx.x, cuda.blockIdx.y + cuda.gridDim.y * cuda.blockIdx.z
        b, h = bh // q.shape[1], bh % q.shape[1]
        if b >= q.shape[0]:                               # past the last (batch, head) pair (pair_grid)
            return
        hk = h // (q.shape[1] // k.shape[1])              # grouped-query attention: the kv head of query head h
        Nq, Nk, d = q.shape[2], k.shape[2], q.shape[3]
        t = cuda.threadIdx.x
        c, g = t % Bc, t // Bc                            # this thread's key (in the tile) and column group
        col = j * Bc + c
        sc = float32(scale)
        for idx in range(t, Bc * D, NT):                  # line 6: K_j, V_j, loaded once
            cc, x = idx // D, idx % D
            ok = j * Bc + cc < Nk and x < d
            Ks[cc, x] = k[b, hk, j * Bc + cc, x] if ok else float32(0.0)
            Vs[cc, x] = v[b, hk, j * Bc + cc, x] if ok else float32(0.0)
        for e in range(DG):                               # line 7
            dK[e] = 0.0
            dV[e] = 0.0
        Tr = (Nq + Br - 1) // Br
        i0 = (j * Bc) // Br if causal else 0
        for i in range(i0, Tr):                           # line 8
            cuda.syncthreads()                            # the previous tile's shared arrays are no longer read
            for idx in range(t, Br * D, NT):              # line 9: Q_i, dO_i, L_i, delta_i
                r, x = idx // D, idx % D
                ok = i * Br + r < Nq and x < d
                Qs[r, x] = q[b, h, i * Br + r, x] if ok else float32(0.0)
                dOs[r, x] = do[b, h, i * Br + r, x] if ok else float32(0.0)
            for r in range(t, Br, NT):
                ok = i * Br + r < Nq
                lse_s[r] = lse[b, h, i * Br + r] if ok else NEG_INF
                delta_s[r] = delta[b, h, i * Br + r] if ok else float32(0.0)
            cuda.syncthreads()
            for r in range(Br):                           # lines 10, 13: S = Q_i K_j^T, dP = dO_i V_j^T (this part)
                s = float32(0.0)
                dp = float32(0.0)
                for e in range(DG):
                    x = g + G * e
                    s += Qs[r, x] * Ks[c, x]
                    dp += dOs[r, x] * Vs[c, x]
                Sp[g, r, c] = s
                dPp[g, r, c] = dp
            cuda.syncthreads()
            for r in range(Br):                           # lines 11, 14: P = exp(S - L_i), dS = P * (dP - delta)
                row = i * Br + r
                s = float32(0.0)
                dp = float32(0.0)
                for u in range(G):
                    s += Sp[u, r, c]
                    dp += dPp[u, r, c]
                p = float32(0.0)
                if col < Nk and row < Nq and (not causal or col <= row) and lse_s[r] != NEG_INF:
                    p = math.exp(s * sc - lse_s[r])
                ds = p * (dp - delta_s[r])
                for e in range(DG):
                    x = g + G * e
                    dV[e] += p * dOs[r, x]                # line 12: dV_j += P^T dO_i
                    dK[e] += ds * Qs[r, x]                # line 16: dK_j += dS^T Q_i (scaled at the end)
                if g == 0:
                    dSs[r, c] = ds
            cuda.syncthreads()
            for idx in range(t, Br * D, NT):              # line 15: dQ_i += scale * dS K_j, atomic adds
                r, x = idx // D, idx % D
                if i * Br + r < Nq and x < d:
                    s = float32(0.0)
                    for cc in range(Bc):
                        s += dSs[r, cc] * Ks[cc, x]
                    cuda.atomic.add(dq, (b, h, i * Br + r, x), s * sc)
        if col < Nk:                                      # line 18: dK_j, dV_j to HBM
            for e in range(DG):
                x = g + G * e
                if x < d:
                    dk[b, h, col, x] = dK[e] * sc
                    dv[b, h, col, x] = dV[e]
    return fa2_backward_kernel, NT


def fa2_backward(q, k, v, o, lse, do, *, causal=False, scale=None, Br=None, Bc=None, G=None,
                 dq=None, dk=None, dv=None):
    """Gradients (dq, dk, dv) as device arrays. q, o, do (B, H, Nq, d), k, v (B, H, Nk, d), lse (B, H, Nq) float32.
    dq, if given, must be zero (it is accumulated into); dk and dv are overwritten."""
    q, k, v, o, lse, do = (device(a) for a in (q, k, v, o, lse, do))
    check_arrays(q, k, v, o, lse, do)
    B, H, Nq, d = q.shape
    Nk = k.shape[2]
    D = head_bucket(d)
    Br0, Bc0, G0 = tiles(D)
    Br, Bc, G = Br or Br0, Bc or Bc0, G or G0
    groups = kv_groups(q, k)
    delta = cuda.device_array((B, H, Nq), np.float32)
    rowsum_do_o[pair_grid(n_blocks(Nq, 128), B * H), (128,)](do, o, delta)
    if dq is None:
        dq = cuda.device_array((B, H, Nq, d), np.float32)
        zero4[pair_grid(n_blocks(Nq, 128), B * H), (128,)](dq)       # line 3: dQ = 0
    # grouped-query attention: dK, dV per query head, then summed over the query heads that share a kv head
    dk_h = cuda.device_array((B, H, Nk, d), np.float32) if dk is None or groups > 1 else dk
    dv_h = cuda.device_array((B, H, Nk, d), np.float32) if dv is None or groups > 1 else dv
    kern, NT = make_backward(Br, Bc, D, G)
    if Nk > 0:
        kern[pair_grid(n_blocks(Nk, Bc), B * H), (NT,)](q, k, v, lse, do, delta, dq, dk_h, dv_h, check_causal(causal),
                                                        scale_of(scale, d))
    dk_g, dv_g = grouped(dk_h, dv_h, k, dk, dv)
    return dq, dk_g, dv_g
