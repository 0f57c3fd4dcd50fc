// fa2_bwd_tc.cu: rung 5 (part 2) of the CuPy ladder: FlashAttention-2 backward on Tensor Cores (fp16 / bf16,
// sm_80+). Launched between bwd_dot_do_o (Dlt = rowsum(dO * O), dQacc = 0) and bwd_convert_dq of fa2_bwd.cu.
//
// fa2_bwd_tc<T, D, NW, KW, Br, BRC, KVREG, CAUSAL[, DO]>
// DO (default d): the columns of dK, dV, dQ one launch computes, c_out ... c_out + DO - 1. d = 256 runs as two
// launches with DO = 128 (c_out = 0, 128): a warp's dK and dV rows over all 256 columns would need 256 fp32
// registers; each launch recomputes S^T and dP^T over all d (their products need every column), so the backward
// does 7/5 of the one-pass arithmetic (S, dP twice; dV, dK, dQ once, split) while keeping the Tensor Cores.
// Grid (Tc = ceil(Nk/Bc), B*H pairs over y and z: pair_index); block NW warps. Grouped-query attention: K, V
// come from kv head bh / G, dK, dV are written per query head and summed by bwd_sum_groups (fa2_bwd.cu).
// L is the pre-pass's Lb (+inf for a row that sees no key, so that its P is 0). Bc = 16*KW*NW keys per block: warp w owns the 16*KW keys
// kw = kv0 + 16*KW*w ... and keeps their dK, dV rows in registers for the whole kernel. The block walks over the
// Q tiles of Br query rows (causal: only those with a query >= the block's first key); per tile, in chunks of BRC
// queries (BRC divides Br; smaller chunks need fewer registers):
//   S^T = K_w Q_c^T, dP^T = V_w dO_c^T       the transposed tiles (16*KW x BRC), so that P^T and dS^T come out of
//                                            the mma as C fragments and go straight back in as A fragments below
//   P^T = exp2(S^T scale log2(e) - lse log2(e))  (0 where masked: ragged edges, causal diagonal; interior tiles
//                                            skip the mask arithmetic)
//   dS^T = P^T * (dP^T - Dlt)
//   dV_w += P^T dO_c;  dK_w += dS^T Q_c      B fragments of dO / Q with ldmatrix.trans (no transposed copies)
//   dS^T -> shared memory (conflict-free 32-bit stores: row stride Br + 8)
// then, after one __syncthreads, dQ_tile += scale * dS K for the whole block: the (Br x d) product is cut into
// (MR x 32) chunks, one per warp (MR = 32 where there are enough chunks for all warps, else 16); A = dS from dS^T
// and B = K from Ks, both with ldmatrix.trans; the chunk is added into the fp32 dQ buffer with atomics (other
// K/V blocks add there too): red.global.add.v2.f32 on sm_90 (one 8-byte reduction per column pair), atomicAdd below.
//
// Pipeline: the next Q tile (Q, dO, lse, Dlt) is copied with cp.async into the second stage while this one is
// computed, so the loads hide behind the math; two __syncthreads per Q tile.
// Shared memory: Ks, Vs (Bc x LD); 2 stages of Qs, dOs (Br x LD); dSs (Bc x Br+8) of T; 2 stages of lse, Dlt (Br)
//   of float. LD = d + 8: consecutive rows 16 bytes apart modulo 128, so ldmatrix (plain and .trans) and the 16-byte
//   cp.async stores are free of bank conflicts.
// Registers (g = lane/4, t = lane%4): dk, dv [KW][d/8][4] (C layout: key rows g, g+8 of m-tile m, columns
//   8n + 2t, +1); st, dpt [KW][BRC/8][4] (S^T then P^T, dP^T then dS^T); with KVREG the warp's K and V A fragments
//   [KW][d/16][4] are loaded once instead of once per Q chunk (fits at d <= 64 with KW = 1; spills at d = 128).
// Tiles (host side, BWD_TILES): d = 64 runs 4 warps with KW = 2 (Bc = 128, two blocks per SM, each Q/dO fragment
//   feeds two m-tiles); d = 128 runs 8 warps with KW = 1, Br = BRC = 64.
#include "flash_common.cuh"

template <typename T, int D, int NW, int KW, int Br, int BRC, bool KVREG, bool CAUSAL, int DO = D>
__global__ void __launch_bounds__(NW * 32, 1) fa2_bwd_tc(const T* __restrict__ Q, const T* __restrict__ K,
        const T* __restrict__ V, const T* __restrict__ dO, const float* __restrict__ L, const float* __restrict__ Dlt,
        float* __restrict__ dQacc, T* __restrict__ dK, T* __restrict__ dV, int Nq, int Nk, float scale, int BH, int G,
        int c_out) {
    static_assert(D % 32 == 0 && DO % 32 == 0 && D % DO == 0 && Br % BRC == 0 && BRC % 16 == 0 && (BRC & (BRC - 1)) == 0,
                  "d, DO: multiples of 32, DO dividing d; BRC: a power of two >= 16 dividing Br");
    constexpr int KWR = 16 * KW, Bc = KWR * NW, LD = D + 8, LDS = Br + 8, NT = NW * 32;
    constexpr int MR = (Br / 32) * (DO / 32) >= NW && BRC >= 32 ? 32 : 16;  // rows of a dQ chunk (MR <= BRC)
    constexpr int NCHUNK = (Br / MR) * (DO / 32);
    typedef Mma<T, false> MMA;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* Ks = reinterpret_cast<T*>(smem_raw);
    T* Vs = Ks + Bc * LD;
    T* Qs = Vs + Bc * LD;        // 2 stages of Br x LD
    T* dOs = Qs + 2 * Br * LD;   // 2 stages
    T* dSs = dOs + 2 * Br * LD;  // Bc x LDS
    float* lse_s = reinterpret_cast<float*>(dSs + Bc * LDS);  // 2 stages of Br
    float* Dlt_s = lse_s + 2 * Br;                            // 2 stages of Br

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int kv0 = blockIdx.x * Bc, kw = kv0 + KWR * warp;  // first key of the block, of this warp
    const u32 pair = pair_index();
    if (pair >= (u32)BH) return;
    const size_t bh = pair, bkv = pair / (u32)G;  // this block's (batch, head) pair, its kv pair
    Q += bh * Nq * D; dO += bh * Nq * D; dQacc += bh * Nq * D; L += bh * Nq; Dlt += bh * Nq;
    K += bkv * Nk * D; V += bkv * Nk * D; dK += bh * Nk * D; dV += bh * Nk * D;
    const float sl = scale * LOG2E;
    if (DO == D) c_out = 0;  // one launch for all columns: a constant, no register for it (it spilled at d = 64)
    // 32-bit shared addresses of this lane's ldmatrix rows; the loops add compile-time byte offsets, which ptxas
    // folds into the instructions (one base register per operand instead of one per unrolled load)
    constexpr u32 V_OFF = 2 * Bc * LD, DO_OFF = 2 * 2 * Br * LD, STAGE = 2 * Br * LD;
    const u32 a_kv = smem_addr(Ks + (KWR * warp + (lane & 15)) * LD + (lane >> 4) * 8);    // A: K_w / V_w rows
    const u32 b_q = smem_addr(Qs + ((lane & 7) + (lane >> 4) * 8) * LD + ((lane >> 3) & 1) * 8);  // B: Q / dO rows
    const u32 bt_q = smem_addr(Qs + ((lane & 7) + ((lane >> 3) & 1) * 8) * LD + (lane >> 4) * 8);  // B.trans: Q / dO
    const u32 bt_k = smem_addr(Ks + ((lane & 7) + ((lane >> 3) & 1) * 8) * LD + (lane >> 4) * 8);  // B.trans: K
    const u32 at_ds = smem_addr(dSs + ((lane & 7) + (lane >> 4) * 8) * LDS + ((lane >> 3) & 1) * 8);  // A.trans: dS

    // Q, dO, lse, Dlt of the tile starting at query q0 -> stage s (one cp.async group)
    auto load_q_tile = [&](int q0, int s) {
        load_tile<D, LD, true>(Qs + s * Br * LD, Q + (size_t)q0 * D, Br, Nq - q0, tid, NT);
        load_tile<D, LD, true>(dOs + s * Br * LD, dO + (size_t)q0 * D, Br, Nq - q0, tid, NT);
        for (int r = tid; r < Br; r += NT) {
            const bool ok = q0 + r < Nq;
            cp_async4(lse_s + s * Br + r, L + (ok ? q0 + r : 0), ok ? 4 : 0);
            cp_async4(Dlt_s + s * Br + r, Dlt + (ok ? q0 + r : 0), ok ? 4 : 0);
        }
        cp_async_commit();
    };

    const int q_begin = CAUSAL ? (kv0 / Br) * Br : 0;
    load_tile<D, LD, true>(Ks, K + (size_t)kv0 * D, Bc, Nk - kv0, tid, NT);
    load_tile<D, LD, true>(Vs, V + (size_t)kv0 * D, Bc, Nk - kv0, tid, NT);
    cp_async_commit();
    if (q_begin < Nq) load_q_tile(q_begin, 0);

    float dk[KW][DO / 8][4], dv[KW][DO / 8][4];  // columns c_out ... c_out + DO - 1
#pragma unroll
    for (int m = 0; m < KW; m++)
#pragma unroll
        for (int n = 0; n < DO / 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) dk[m][n][e] = dv[m][n][e] = 0.f;
    u32 kf[KVREG ? KW : 1][KVREG ? D / 16 : 1][4], vf[KVREG ? KW : 1][KVREG ? D / 16 : 1][4];

    for (int q0 = q_begin, it = 0; q0 < Nq; q0 += Br, it++) {
        const int s = it & 1;
        cp_async_wait<0>();
        __syncthreads();  // (A) tile `it` has landed; every warp is past the previous tile's dQ (dSs, stage s^1 free)
        if (KVREG && it == 0) {
#pragma unroll
            for (int m = 0; m < KW; m++)
#pragma unroll
                for (int kk = 0; kk < D / 16; kk++) {
                    ldmatrix_x4_a(kf[m][kk], a_kv + 2 * (16 * m * LD + kk * 16));
                    ldmatrix_x4_a(vf[m][kk], a_kv + V_OFF + 2 * (16 * m * LD + kk * 16));
                }
        }
        if (q0 + Br < Nq) load_q_tile(q0 + Br, s ^ 1);  // in flight during this tile's math
        const float* lse_t = lse_s + s * Br;
        const float* Dlt_t = Dlt_s + s * Br;

#pragma unroll 1
        for (int c0 = 0; c0 < Br; c0 += BRC) {
            const int qa = q0 + c0;  // first query of the chunk
            // causal: every key of the warp is right of every query of the chunk. Its dS^T stays unwritten: the dQ
            // step below skips exactly these (key, query) blocks.
            if (CAUSAL && kw > qa + BRC - 1) continue;
            const u32 bq = opaque(b_q + s * STAGE + 2 * c0 * LD), btq = opaque(bt_q + s * STAGE + 2 * (c0 * LD + c_out));
            float st[KW][BRC / 8][4], dpt[KW][BRC / 8][4];
#pragma unroll
            for (int m = 0; m < KW; m++)
#pragma unroll
                for (int n = 0; n < BRC / 8; n++)
#pragma unroll
                    for (int e = 0; e < 4; e++) st[m][n][e] = dpt[m][n][e] = 0.f;
            // S^T = K_w Q^T and dP^T = V_w dO^T: A from the warp's K / V rows, B from Q / dO rows (no .trans)
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                u32 ak[KW][4], av[KW][4];
#pragma unroll
                for (int m = 0; m < KW; m++) {
                    if (KVREG) {
#pragma unroll
                        for (int i = 0; i < 4; i++) ak[m][i] = kf[m][kk][i], av[m][i] = vf[m][kk][i];
                    } else {
                        ldmatrix_x4_a(ak[m], a_kv + 2 * (16 * m * LD + kk * 16));
                        ldmatrix_x4_a(av[m], a_kv + V_OFF + 2 * (16 * m * LD + kk * 16));
                    }
                }
#pragma unroll
                for (int nn = 0; nn < BRC / 16; nn++) {
                    u32 b[4];
                    ldmatrix_x4_a(b, bq + 2 * (nn * 16 * LD + kk * 16));
#pragma unroll
                    for (int m = 0; m < KW; m++) MMA::run(st[m][2 * nn], ak[m], b), MMA::run(st[m][2 * nn + 1], ak[m], b + 2);
                    ldmatrix_x4_a(b, bq + DO_OFF + 2 * (nn * 16 * LD + kk * 16));
#pragma unroll
                    for (int m = 0; m < KW; m++) MMA::run(dpt[m][2 * nn], av[m], b), MMA::run(dpt[m][2 * nn + 1], av[m], b + 2);
                }
            }
            // P^T and dS^T (rows: keys kw + 16m + g + 8h; columns: queries qa + 8n + 2t + (e&1))
            const bool need_mask = qa + BRC > Nq || kw + KWR > Nk || (CAUSAL && kw + KWR - 1 > qa);
#pragma unroll
            for (int n = 0; n < BRC / 8; n++) {
                const float2 l2 = *reinterpret_cast<const float2*>(lse_t + c0 + n * 8 + 2 * t);
                const float2 d2 = *reinterpret_cast<const float2*>(Dlt_t + c0 + n * 8 + 2 * t);
                const float nl[2] = {-l2.x * LOG2E, -l2.y * LOG2E}, dl[2] = {d2.x, d2.y};
#pragma unroll
                for (int m = 0; m < KW; m++) {
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        float p = fast_exp2(fmaf(st[m][n][e], sl, nl[e & 1]));
                        if (need_mask) {
                            const int qc = qa + n * 8 + 2 * t + (e & 1), kr = kw + 16 * m + g + (e >> 1) * 8;
                            if (qc >= Nq || kr >= Nk || (CAUSAL && kr > qc)) p = 0.f;
                        }
                        st[m][n][e] = p;
                        dpt[m][n][e] = p * (dpt[m][n][e] - dl[e & 1]);
                    }
                }
            }
            // dV += P^T dO and dK += dS^T Q: A = the C fragments above (rounded to T), B = dO / Q with ldmatrix.trans
#pragma unroll
            for (int kk = 0; kk < BRC / 16; kk++) {
                u32 ap[KW][4], as[KW][4];
#pragma unroll
                for (int m = 0; m < KW; m++) {
                    ap[m][0] = pack2<T>(st[m][2 * kk][0], st[m][2 * kk][1]);
                    ap[m][1] = pack2<T>(st[m][2 * kk][2], st[m][2 * kk][3]);
                    ap[m][2] = pack2<T>(st[m][2 * kk + 1][0], st[m][2 * kk + 1][1]);
                    ap[m][3] = pack2<T>(st[m][2 * kk + 1][2], st[m][2 * kk + 1][3]);
                    as[m][0] = pack2<T>(dpt[m][2 * kk][0], dpt[m][2 * kk][1]);
                    as[m][1] = pack2<T>(dpt[m][2 * kk][2], dpt[m][2 * kk][3]);
                    as[m][2] = pack2<T>(dpt[m][2 * kk + 1][0], dpt[m][2 * kk + 1][1]);
                    as[m][3] = pack2<T>(dpt[m][2 * kk + 1][2], dpt[m][2 * kk + 1][3]);
                    // dS^T to shared memory for the dQ product (the same rounded values as used for dK)
                    T* row = dSs + (KWR * warp + 16 * m + g) * LDS + c0 + kk * 16 + 2 * t;
                    *reinterpret_cast<u32*>(row) = as[m][0];
                    *reinterpret_cast<u32*>(row + 8 * LDS) = as[m][1];
                    *reinterpret_cast<u32*>(row + 8) = as[m][2];
                    *reinterpret_cast<u32*>(row + 8 * LDS + 8) = as[m][3];
                }
#pragma unroll
                for (int nn = 0; nn < DO / 16; nn++) {
                    u32 b[4];
                    ldmatrix_x4_trans_a(b, btq + DO_OFF + 2 * (kk * 16 * LD + nn * 16));
#pragma unroll
                    for (int m = 0; m < KW; m++) MMA::run(dv[m][2 * nn], ap[m], b), MMA::run(dv[m][2 * nn + 1], ap[m], b + 2);
                    ldmatrix_x4_trans_a(b, btq + 2 * (kk * 16 * LD + nn * 16));
#pragma unroll
                    for (int m = 0; m < KW; m++) MMA::run(dk[m][2 * nn], as[m], b), MMA::run(dk[m][2 * nn + 1], as[m], b + 2);
                }
            }
        }
        __syncthreads();  // (B) dS^T of all warps is in dSs
        // dQ_tile += scale * dS K in (MR x 32) chunks; A = dS (queries x keys) from dS^T, B = K, both ldmatrix.trans
        for (int c = warp; c < NCHUNK; c += NW) {
            const int mr = (c / (DO / 32)) * MR, dc = c_out + (c % (DO / 32)) * 32, qr = q0 + mr;
            if (qr >= Nq || (CAUSAL && qr + MR - 1 < kv0)) continue;
            // causal: key blocks of 16 right of the chunk's last query are zero (and were not written)
            const int kk_end = CAUSAL ? min(Bc / 16, (qr + MR - 1 - kv0) / 16 + 1) : Bc / 16;
            float acc[MR / 16][4][4];
#pragma unroll
            for (int i = 0; i < MR / 16; i++)
#pragma unroll
                for (int n = 0; n < 4; n++) acc[i][n][0] = acc[i][n][1] = acc[i][n][2] = acc[i][n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < Bc / 16; kk++) {
                if (CAUSAL && kk >= kk_end) break;
                u32 a[MR / 16][4];
#pragma unroll
                for (int i = 0; i < MR / 16; i++)
                    ldmatrix_x4_trans_a(a[i], at_ds + 2 * (kk * 16 * LDS + mr + 16 * i));
#pragma unroll
                for (int nn = 0; nn < 2; nn++) {
                    u32 b[4];
                    ldmatrix_x4_trans_a(b, bt_k + 2 * (kk * 16 * LD + dc + nn * 16));
#pragma unroll
                    for (int i = 0; i < MR / 16; i++) MMA::run(acc[i][2 * nn], a[i], b), MMA::run(acc[i][2 * nn + 1], a[i], b + 2);
                }
            }
#pragma unroll
            for (int i = 0; i < MR / 16; i++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const int row = qr + 16 * i + g + 8 * h;
                    if (row < Nq) {
#pragma unroll
                        for (int n = 0; n < 4; n++)
                            atomic_add_f32x2(dQacc + (size_t)row * D + dc + n * 8 + 2 * t, acc[i][n][2 * h] * scale,
                                             acc[i][n][2 * h + 1] * scale);
                    }
                }
        }
    }
    cp_async_wait<0>();  // a causal block with no Q tile still has its K/V copies in flight
    // dK = scale dS^T Q, dV = P^T dO for the warp's keys
#pragma unroll
    for (int m = 0; m < KW; m++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int row = kw + 16 * m + g + 8 * h;
            if (row < Nk) {
#pragma unroll
                for (int n = 0; n < DO / 8; n++) {
                    *reinterpret_cast<u32*>(dK + (size_t)row * D + c_out + n * 8 + 2 * t) =
                        pack2<T>(dk[m][n][2 * h] * scale, dk[m][n][2 * h + 1] * scale);
                    *reinterpret_cast<u32*>(dV + (size_t)row * D + c_out + n * 8 + 2 * t) =
                        pack2<T>(dv[m][n][2 * h], dv[m][n][2 * h + 1]);
                }
            }
        }
}
