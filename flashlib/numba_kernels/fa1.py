"""FlashAttention-1 forward (Dao et al. 2022, Algorithm 1) in Numba-CUDA, float32: the teaching rung.

Algorithm: outer loop over K/V tiles j (Tc of them), inner loop over Q tiles i (Tr); O, l and m live in global
memory (HBM) and make a round trip at every (i, j) step, exactly as in the paper (lines 8-13). Slow by design: it
is the loop order FlashAttention-2 improves on.

Grid (B*H,): one thread block per (batch, head), walking all Tc x Tr tiles of that head.
Block (Br,): thread t owns query row i*Br + t of the current Q tile: it computes that row of S and P, and updates
    that row of O, l, m in global memory.
Shared memory: Qs (Br x D+1), Ks (Bc x D+1), Vs (Bc x D), Ps (Br x Bc+1) (the +1 columns keep threads that read
    different rows on different banks). Registers: the running scalars of the thread's row.
Causal: tiles whose first key comes after their last query are skipped, not computed (same test as flashlib.tiled).
"""
import functools
import math

from numba import cuda, float32

from .host import (NEG_INF, check_arrays, check_causal, device, head_bucket, kv_groups, out_arrays, scale_of,
                  trace_arrays)



def tiles(D):
    """(Br, Bc) so the static shared memory stays under 48 KB."""
    return (8, 16) if D > 128 else (16, 16) if D > 64 else (32, 32)


@functools.lru_cache(maxsize=None)
def make_fa1(Br, Bc, D):
    D1, Bc1 = D + 1, Bc + 1                          # padded row lengths (compile-time constants)
    @cuda.jit
    def fa1_forward(q, k, v, O, l, m, lse, causal, scale, trace, tracing):
        Qs = cuda.shared.array((Br, D1), float32)
        Ks = cuda.shared.array((Bc, D1), float32)
        Vs = cuda.shared.array((Bc, D), float32)
        Ps = cuda.shared.array((Br, Bc1), float32)
        bh = cuda.blockIdx.x
        b, h = bh // q.shape[1], bh % q.shape[1]
        hk = h // (q.shape[1] // k.shape[1])             # grouped-query attention: the kv head of query head h
        Nq, Nk, d = q.shape[2], k.shape[2], q.shape[3]
        Tr, Tc = (Nq + Br - 1) // Br, (Nk + Bc - 1) // Bc
        t = cuda.threadIdx.x
        sc = float32(scale)
        step = 0
        for i in range(Tr):                              # line 2: O = 0, l = 0, m = -inf in HBM
            row = i * Br + t
            if row < Nq:
                for x in range(d):
                    O[b, h, row, x] = 0.0
                l[b, h, row] = 0.0
                m[b, h, row] = NEG_INF
        for j in range(Tc):                              # line 5: outer loop over K/V tiles
            i0 = (j * Bc) // Br if causal else 0         # first Q tile the causal mask leaves visible
            if i0 >= Tr:
                continue
            for idx in range(t, Bc * D, Br):             # line 6: load K_j, V_j (coalesced over the head dim)
                c, x = idx // D, idx % D
                col = j * Bc + c
                ok = col < Nk and x < d
                Ks[c, x] = k[b, hk, col, x] if ok else float32(0.0)
                Vs[c, x] = v[b, hk, col, x] if ok else float32(0.0)
            for i in range(i0, Tr):                      # line 7: inner loop over Q tiles
                if tracing and t == 0:
                    trace[bh, step, 0] = i
                    trace[bh, step, 1] = j
                step += 1
                for idx in range(t, Br * D, Br):         # line 8: load Q_i (O_i, l_i, m_i: per thread below)
                    r, x = idx // D, idx % D
                    ok = i * Br + r < Nq and x < d
                    Qs[r, x] = q[b, h, i * Br + r, x] if ok else float32(0.0)
                cuda.syncthreads()
                row = i * Br + t
                if row < Nq:
                    m_t = NEG_INF                        # line 9: S_ij = scale * Q_i K_j^T, this thread's row
                    for c in range(Bc):
                        col = j * Bc + c
                        s = NEG_INF
                        if col < Nk and (not causal or col <= row):
                            s = float32(0.0)
                            for x in range(D):
                                s += Qs[t, x] * Ks[c, x]
                            s *= sc
                        Ps[t, c] = s
                        m_t = max(m_t, s)
                    l_t = float32(0.0)                   # line 10: m~ = rowmax(S), P~ = exp(S - m~), l~ = rowsum(P~)
                    for c in range(Bc):
                        p = math.exp(Ps[t, c] - m_t) if m_t != NEG_INF else float32(0.0)
                        Ps[t, c] = p
                        l_t += p
                    m_i, l_i = m[b, h, row], l[b, h, row]
                    m_new = max(m_i, m_t)                # line 11
                    if m_new != NEG_INF:                 # a row with no visible key so far keeps O = 0, l = 0
                        alpha = math.exp(m_i - m_new)    # exp(-inf) = 0 on the first visit
                        beta = math.exp(m_t - m_new)
                        l_new = alpha * l_i + beta * l_t
                        for x in range(d):               # line 12: O_i <- diag(l_new)^-1 (...), back to HBM
                            pv = float32(0.0)
                            for c in range(Bc):
                                pv += Ps[t, c] * Vs[c, x]
                            O[b, h, row, x] = (l_i * alpha * O[b, h, row, x] + beta * pv) / l_new
                        l[b, h, row] = l_new             # line 13
                        m[b, h, row] = m_new
                cuda.syncthreads()                       # Qs, Ps are rewritten by the next step
            cuda.syncthreads()                           # Ks, Vs too
        for i in range(Tr):
            row = i * Br + t
            if row < Nq:
                li = l[b, h, row]
                lse[b, h, row] = m[b, h, row] + math.log(li) if li > 0 else NEG_INF
    return fa1_forward


def fa1_forward(q, k, v, *, causal=False, scale=None, Br=None, Bc=None, o=None, lse=None, trace=None):
    """FA1 loop order. q (B, H, Nq, d), k, v (B, H, Nk, d) float32 device (or NumPy) arrays -> O, lse device arrays.

    trace: optional int32 device array (B*H, steps, 2); block bh writes the (i, j) tiles it visits, in order.
    """
    q, k, v = (device(a) for a in (q, k, v))
    check_arrays(q, k, v)
    B, H, Nq, d = q.shape
    D = head_bucket(d)
    kv_groups(q, k)
    Br0, Bc0 = tiles(D)
    Br, Bc = Br or Br0, Bc or Bc0
    o, lse = out_arrays(q, o, lse)
    l = cuda.device_array((B, H, Nq), "float32")
    m = cuda.device_array((B, H, Nq), "float32")
    tr, tracing = trace_arrays(trace)
    make_fa1(Br, Bc, D)[(B * H,), (Br,)](q, k, v, o, l, m, lse, check_causal(causal), scale_of(scale, d), tr, tracing)
    return o, lse
