// fa2_bwd_tc.cu: rung 5 (part 2) of the CuPy ladder: FlashAttention-2 backward on Tensor Cores (fp16 / bf16,
// sm_80+). Launched between bwd_dot_do_o (Dlt = rowsum(dO * O)) and bwd_convert_dq of fa2_bwd.cu.
//
// Grid (Tc = ceil(Nk/Bc), B*H); block NW warps; Bc = 16*NW keys, Br query rows per step. Warp w owns the 16 keys kv0 + 16w .. + 15: it
// computes the transposed tiles S^T = K_w Q_i^T (16 x Br), so that P^T and dS^T come out of the mma as C fragments
// and go straight back in as A fragments of dV += P^T dO and dK += dS^T Q (the forward's register reuse of P).
// Per Q tile i (causal: only those with a query >= the block's first key):
//   S^T = K_w Q_i^T;  P^T = exp2(S^T scale log2(e) - lse_i log2(e)) (0 where masked);  dV_w += P^T dO_i;
//   dP^T = V_w dO_i^T;  dS^T = P^T * (dP^T - Dlt_i);  dK_w += dS^T Q_i;
//   dS^T -> shared memory, then the warps share the (16-row, 32-column) chunks of dQ_i = dS K_j (ldmatrix.trans of
//   dS^T and of K) and add them, times scale, into the fp32 dQ buffer with atomicAdd (all K/V blocks add there).
// Shared memory: Ks, Vs (Bc x LD), Qs, dOs (Br x LD), dSs (Bc x Br+8) of T; lse_s, Dlt_s (Br) of float.
// Registers: dk[d/8][4], dv[d/8][4] (C layout: key rows g, g+8; columns 8n + 2t, +1); st, dpt [Br/8][4].
#include "flash_common.cuh"

template <typename T, int D, int NW, int Br, bool CAUSAL>
__global__ void __launch_bounds__(NW * 32, 1) fa2_bwd_tc(const T* __restrict__ Q, const T* __restrict__ K,
        const T* __restrict__ V, const T* __restrict__ dO, const float* __restrict__ L, const float* __restrict__ Dlt,
        float* __restrict__ dQacc, T* __restrict__ dK, T* __restrict__ dV, int Nq, int Nk, float scale) {
    constexpr int Bc = 16 * NW, LD = D + 8, LDS = Br + 8, NT = NW * 32;
    constexpr float LOG2E = 1.4426950408889634f;
    typedef Mma<T, false> MMA;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* Ks = reinterpret_cast<T*>(smem_raw);
    T* Vs = Ks + Bc * LD;
    T* Qs = Vs + Bc * LD;
    T* dOs = Qs + Br * LD;
    T* dSs = dOs + Br * LD;
    float* lse_s = reinterpret_cast<float*>(dSs + Bc * LDS);
    float* Dlt_s = lse_s + Br;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int kv0 = blockIdx.x * Bc, kw = kv0 + 16 * warp;  // first key of the block, of this warp
    const size_t bh = blockIdx.y;
    Q += bh * Nq * D; dO += bh * Nq * D; dQacc += bh * Nq * D; L += bh * Nq; Dlt += bh * Nq;
    K += bh * Nk * D; V += bh * Nk * D; dK += bh * Nk * D; dV += bh * Nk * D;
    const float sl = scale * LOG2E;

    load_tile<D, LD, true>(Ks, K + (size_t)kv0 * D, Bc, Nk - kv0, tid, NT);
    load_tile<D, LD, true>(Vs, V + (size_t)kv0 * D, Bc, Nk - kv0, tid, NT);
    cp_async_commit();
    float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[n][e] = dv[n][e] = 0.f;

    for (int q0 = CAUSAL ? (kv0 / Br) * Br : 0; q0 < Nq; q0 += Br) {
        __syncthreads();  // the previous tile's Qs, dOs, dSs are no longer read
        load_tile<D, LD, true>(Qs, Q + (size_t)q0 * D, Br, Nq - q0, tid, NT);
        load_tile<D, LD, true>(dOs, dO + (size_t)q0 * D, Br, Nq - q0, tid, NT);
        cp_async_commit();
        for (int r = tid; r < Br; r += NT) {
            lse_s[r] = q0 + r < Nq ? L[q0 + r] * LOG2E : 0.f;
            Dlt_s[r] = q0 + r < Nq ? Dlt[q0 + r] : 0.f;
        }
        cp_async_wait<0>();
        __syncthreads();

        if (!(CAUSAL && kw > q0 + Br - 1)) {  // else all 16 keys of the warp are right of every query of the tile
            float st[Br / 8][4], dpt[Br / 8][4];
#pragma unroll
            for (int n = 0; n < Br / 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) st[n][e] = dpt[n][e] = 0.f;
            // S^T = K_w Q^T and dP^T = V_w dO^T: A from the warp's K / V rows, B from Q / dO rows (no .trans)
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                u32 ak[4], av[4];
                ldmatrix_x4(ak, Ks + (16 * warp + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
                ldmatrix_x4(av, Vs + (16 * warp + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
                for (int nn = 0; nn < Br / 16; nn++) {
                    const int off = (nn * 16 + (lane & 7) + (lane >> 4) * 8) * LD + kk * 16 + ((lane >> 3) & 1) * 8;
                    u32 b[4];
                    ldmatrix_x4(b, Qs + off);
                    MMA::run(st[2 * nn], ak, b);
                    MMA::run(st[2 * nn + 1], ak, b + 2);
                    ldmatrix_x4(b, dOs + off);
                    MMA::run(dpt[2 * nn], av, b);
                    MMA::run(dpt[2 * nn + 1], av, b + 2);
                }
            }
            // P^T and dS^T (rows: keys kw + g + 8h; columns: queries q0 + 8n + 2t + (e&1))
#pragma unroll
            for (int n = 0; n < Br / 8; n++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int qc = n * 8 + 2 * t + (e & 1), kr = kw + g + (e >> 1) * 8;
                    const bool ok = q0 + qc < Nq && kr < Nk && (!CAUSAL || kr <= q0 + qc);
                    const float p = ok ? fast_exp2(st[n][e] * sl - lse_s[qc]) : 0.f;
                    st[n][e] = p;
                    dpt[n][e] = p * (dpt[n][e] - Dlt_s[qc]);
                }
            }
            // dV += P^T dO and dK += dS^T Q: A = the C fragments above, B = dO / Q rows with ldmatrix.trans
#pragma unroll
            for (int kk = 0; kk < Br / 16; kk++) {
                u32 ap[4] = {pack2<T>(st[2 * kk][0], st[2 * kk][1]), pack2<T>(st[2 * kk][2], st[2 * kk][3]),
                             pack2<T>(st[2 * kk + 1][0], st[2 * kk + 1][1]), pack2<T>(st[2 * kk + 1][2], st[2 * kk + 1][3])};
                u32 as[4] = {pack2<T>(dpt[2 * kk][0], dpt[2 * kk][1]), pack2<T>(dpt[2 * kk][2], dpt[2 * kk][3]),
                             pack2<T>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]), pack2<T>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
                // dS^T to shared memory for the dQ product (the same rounded values as used for dK)
                *reinterpret_cast<u32*>(dSs + (16 * warp + g) * LDS + kk * 16 + 2 * t) = as[0];
                *reinterpret_cast<u32*>(dSs + (16 * warp + g + 8) * LDS + kk * 16 + 2 * t) = as[1];
                *reinterpret_cast<u32*>(dSs + (16 * warp + g) * LDS + kk * 16 + 8 + 2 * t) = as[2];
                *reinterpret_cast<u32*>(dSs + (16 * warp + g + 8) * LDS + kk * 16 + 8 + 2 * t) = as[3];
#pragma unroll
                for (int nn = 0; nn < D / 16; nn++) {
                    const int off = (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + nn * 16 + (lane >> 4) * 8;
                    u32 b[4];
                    ldmatrix_x4_trans(b, dOs + off);
                    MMA::run(dv[2 * nn], ap, b);
                    MMA::run(dv[2 * nn + 1], ap, b + 2);
                    ldmatrix_x4_trans(b, Qs + off);
                    MMA::run(dk[2 * nn], as, b);
                    MMA::run(dk[2 * nn + 1], as, b + 2);
                }
            }
        } else {
            for (int idx = lane; idx < 16 * Br / 2; idx += 32)  // this warp's dS^T rows are zero
                *reinterpret_cast<u32*>(dSs + (16 * warp + idx / (Br / 2)) * LDS + 2 * (idx % (Br / 2))) = 0u;
        }
        __syncthreads();
        // dQ_i += scale * dS K_j, in (16-row, 32-column) chunks shared out over the warps; A = dS (queries x keys)
        // from dS^T with ldmatrix.trans, B = K_j (keys x d) with ldmatrix.trans
        for (int c = warp; c < (Br / 16) * (D / 32); c += NW) {
            const int mr = (c / (D / 32)) * 16, dc = c % (D / 32), qr = q0 + mr;
            if (qr >= Nq || (CAUSAL && kv0 > qr + 15)) continue;
            float acc[4][4];
#pragma unroll
            for (int n = 0; n < 4; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < Bc / 16; kk++) {
                u32 a[4];
                ldmatrix_x4_trans(a, dSs + (kk * 16 + (lane & 7) + (lane >> 4) * 8) * LDS + mr + ((lane >> 3) & 1) * 8);
#pragma unroll
                for (int nn = 0; nn < 2; nn++) {
                    u32 b[4];
                    ldmatrix_x4_trans(b, Ks + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + dc * 32 + nn * 16 + (lane >> 4) * 8);
                    MMA::run(acc[2 * nn], a, b);
                    MMA::run(acc[2 * nn + 1], a, b + 2);
                }
            }
#pragma unroll
            for (int n = 0; n < 4; n++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int row = qr + g + (e >> 1) * 8;
                    if (row < Nq) atomicAdd(dQacc + (size_t)row * D + dc * 32 + n * 8 + 2 * t + (e & 1), acc[n][e] * scale);
                }
            }
        }
    }
    // dK = scale dS^T Q, dV = P^T dO for the warp's 16 keys
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int row = kw + g + 8 * h;
        if (row < Nk) {
#pragma unroll
            for (int n = 0; n < D / 8; n++) {
                *reinterpret_cast<u32*>(dK + (size_t)row * D + n * 8 + 2 * t) = pack2<T>(dk[n][2 * h] * scale, dk[n][2 * h + 1] * scale);
                *reinterpret_cast<u32*>(dV + (size_t)row * D + n * 8 + 2 * t) = pack2<T>(dv[n][2 * h], dv[n][2 * h + 1]);
            }
        }
    }
}
