// fa2_tc.cu: rungs 2, 3 and 4 of the CuPy ladder, FlashAttention-2 forward on Tensor Cores (fp16 / bf16).
//
//   rung 2  fa2_tc<T, D, NW, Bc, CAUSAL, TUNED=false, K8=false>: mma.sync m16n8k16 with fp32 accumulation;
//           Q fragments, S, P and O live in registers; K/V tiles loaded with 128-bit loads, then __syncthreads.
//   rung 3  TUNED=true: cp.async double buffering (tile j+1 is copied while tile j is computed), exponentials
//           as ex2.approx with scale*log2(e) folded into one multiply, tile sizes per head dim (host side).
//   rung 4  K8=true (T4, sm_75, fp16 only): each m16n8k16 becomes two m16n8k8, no cp.async.
//
// Algorithm: FlashAttention-2 forward (Dao 2023, Algorithm 1), split-Q: each warp owns 16 query rows.
// Grid (Tr = ceil(Nq/Br), B*H); block NW warps (NW*32 threads); Br = 16*NW query rows, Bc keys per K/V tile.
// Shared memory (dynamic): Qs (Br x LD), then NSTAGE stages of Ks (Bc x LD) and Vs (Bc x LD); LD = d + 8: the
//   8-element (16-byte) pad shifts consecutive rows by 4 banks, so the 8 row addresses of an ldmatrix phase fall in
//   8 different 16-byte bank groups (no bank conflicts).
// Registers of one thread (g = lane/4, t = lane%4), for the warp's rows r = 16*warp + g and r + 8:
//   qf[d/16][4]   A fragments of the warp's Q rows, loaded once;
//   s[Bc/8][4]    S = Q K^T for keys 8n + 2t, 8n + 2t + 1 (C layout), overwritten by P;
//   o[d/8][4]     the unnormalised O rows (C layout); m[2], l[2] the running max and (per-thread partial) sum.
// P never goes through shared memory: the C fragments of two adjacent 8-key n-tiles are exactly the A fragment of
//   a 16-key k-step (a0 = c0c1 of tile 2k, a1 = c2c3 of tile 2k, a2 = c0c1 of tile 2k+1, a3 = c2c3 of 2k+1).
// ldmatrix (no .trans) gives B fragments of K (keys are B's columns, stored row-major = "col" B); ldmatrix.trans gives
//   B fragments of V (keys are B's rows).
// Causal (top-left): K/V tiles right of the Q tile's last row are not visited; a warp whose 16 rows all lie left
//   of the tile skips its math; masking happens only on the diagonal and ragged tiles.
#include "flash_common.cuh"

#define NEG_INF __int_as_float(0xff800000)

template <typename T, int D, int NW, int Bc, bool CAUSAL, bool TUNED, bool K8>
__global__ void __launch_bounds__(NW * 32, 1) fa2_tc(const T* __restrict__ Q, const T* __restrict__ K,
                                                  const T* __restrict__ V, T* __restrict__ O, float* __restrict__ L,
                                                  int Nq, int Nk, float scale) {
    static_assert(D % 16 == 0 && Bc % 16 == 0, "d and Bc must be multiples of 16");
    constexpr int Br = 16 * NW, LD = D + 8, NT = NW * 32, NSTAGE = TUNED ? 2 : 1;
    typedef Mma<T, K8> MMA;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* Qs = reinterpret_cast<T*>(smem_raw);
    T* Ks = Qs + Br * LD;               // NSTAGE x Bc x LD
    T* Vs = Ks + NSTAGE * Bc * LD;      // NSTAGE x Bc x LD

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    // causal: the longest rows (last Q tiles) start first, so that short blocks fill the tail of the launch
    const int q0 = (CAUSAL ? gridDim.x - 1 - blockIdx.x : blockIdx.x) * Br, qw = q0 + 16 * warp;
    const size_t bh = blockIdx.y;
    Q += (bh * Nq + q0) * D; O += bh * Nq * D; L += bh * Nq;
    K += bh * Nk * D; V += bh * Nk * D;

    const int kv_end = CAUSAL ? min(Nk, q0 + Br) : Nk;
    const int n_tiles = (kv_end + Bc - 1) / Bc;
    // rung 3 works in base 2: P = exp2(S * sl - m) with sl = scale * log2(e), one FFMA and one MUFU.EX2 per
    // element (m is kept in units of S * sl); rung 2 with S * scale and expf
    const float sl = TUNED ? scale * 1.4426950408889634f : scale;

    u32 qf[D / 16][4];
    float o[D / 8][4], m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
#pragma unroll
    for (int n = 0; n < D / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;

    if (TUNED) {  // prologue: Q and the first K/V tile in flight together
        load_tile<D, LD, true>(Qs, Q, Br, Nq - q0, tid, NT);
        load_tile<D, LD, true>(Ks, K, Bc, Nk, tid, NT);
        load_tile<D, LD, true>(Vs, V, Bc, Nk, tid, NT);
        cp_async_commit();
    }
    for (int j = 0; j < n_tiles; j++) {
        const int kv0 = j * Bc, st = TUNED ? (j & 1) : 0;
        if (TUNED) {
            if (j + 1 < n_tiles) {  // prefetch tile j+1 into the other stage (freed by the last __syncthreads)
                const int nx = (j + 1) & 1;
                load_tile<D, LD, true>(Ks + nx * Bc * LD, K + (size_t)(kv0 + Bc) * D, Bc, Nk - kv0 - Bc, tid, NT);
                load_tile<D, LD, true>(Vs + nx * Bc * LD, V + (size_t)(kv0 + Bc) * D, Bc, Nk - kv0 - Bc, tid, NT);
                cp_async_commit();
                cp_async_wait<1>();  // everything but the newest group has landed: tile j (and Q)
            } else {
                cp_async_wait<0>();
            }
        } else {
            if (j == 0) load_tile<D, LD, false>(Qs, Q, Br, Nq - q0, tid, NT);
            load_tile<D, LD, false>(Ks, K + (size_t)kv0 * D, Bc, Nk - kv0, tid, NT);
            load_tile<D, LD, false>(Vs, V + (size_t)kv0 * D, Bc, Nk - kv0, tid, NT);
        }
        __syncthreads();
        if (j == 0) {
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++)
                ldmatrix_x4(qf[kk], Qs + (16 * warp + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
        }
        const T* Kt = Ks + st * Bc * LD;
        const T* Vt = Vs + st * Bc * LD;
        if (!(CAUSAL && kv0 > qw + 15)) {  // else every key of this tile is right of all 16 rows of the warp
            // S = Q K^T (16 x Bc per warp), fp32 accumulators
            float s[Bc / 8][4];
#pragma unroll
            for (int n = 0; n < Bc / 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
#pragma unroll
                for (int nn = 0; nn < Bc / 16; nn++) {
                    u32 b[4];  // B fragments of key n-tiles 2nn (b[0], b[1]) and 2nn+1 (b[2], b[3])
                    ldmatrix_x4(b, Kt + (nn * 16 + (lane & 7) + (lane >> 4) * 8) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
                    MMA::run(s[2 * nn], qf[kk], b);
                    MMA::run(s[2 * nn + 1], qf[kk], b + 2);
                }
            }
            // scale, mask (ragged last tile, causal diagonal), row max over the quad of threads sharing a row
            const bool need_mask = kv0 + Bc > Nk || (CAUSAL && kv0 + Bc - 1 > qw);
            float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
            for (int n = 0; n < Bc / 8; n++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    float x = TUNED ? s[n][e] : s[n][e] * sl;  // rung 3 scales inside the exp2's FFMA
                    if (need_mask) {
                        int col = kv0 + n * 8 + 2 * t + (e & 1), row = qw + g + (e >> 1) * 8;
                        if (col >= Nk || (CAUSAL && col > row)) x = NEG_INF;
                    }
                    s[n][e] = x;
                    mx[e >> 1] = fmaxf(mx[e >> 1], x);
                }
            }
            float base[2];
#pragma unroll
            for (int h = 0; h < 2; h++) {
                mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
                mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
                float m_new = fmaxf(m[h], TUNED ? mx[h] * sl : mx[h]);
                base[h] = m_new == NEG_INF ? 0.f : m_new;  // no visible key yet: P = 0, alpha = 0, no NaN
                float alpha = TUNED ? fast_exp2(m[h] - base[h]) : expf(m[h] - base[h]);
                m[h] = m_new;
                l[h] *= alpha;
#pragma unroll
                for (int n = 0; n < D / 8; n++) o[n][2 * h] *= alpha, o[n][2 * h + 1] *= alpha;
            }
#pragma unroll
            for (int n = 0; n < Bc / 8; n++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    float p = TUNED ? fast_exp2(fmaf(s[n][e], sl, -base[e >> 1])) : expf(s[n][e] - base[e >> 1]);
                    l[e >> 1] += p;  // this thread's part of the row sum; the quad is summed once at the end
                    s[n][e] = p;
                }
            }
            // O += P V: P's C fragments, rounded to T, are the A fragments
#pragma unroll
            for (int kk = 0; kk < Bc / 16; kk++) {
                u32 a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                            pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]), pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
                for (int nn = 0; nn < D / 16; nn++) {
                    u32 b[4];  // B fragments of d n-tiles 2nn and 2nn+1, keys kk*16 .. kk*16+15
                    ldmatrix_x4_trans(b, Vt + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + nn * 16 + (lane >> 4) * 8);
                    MMA::run(o[2 * nn], a, b);
                    MMA::run(o[2 * nn + 1], a, b + 2);
                }
            }
        }
        __syncthreads();  // all warps are done with this stage before it is refilled
    }
    // epilogue: finish the row sums, divide once, write O and lse = m / log2(e) + log(l) (natural log)
#pragma unroll
    for (int h = 0; h < 2; h++) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
        const int row = qw + g + 8 * h;
        const float inv_l = l[h] > 0.f ? 1.f / l[h] : 0.f;
        if (row < Nq) {
#pragma unroll
            for (int n = 0; n < D / 8; n++)
                *reinterpret_cast<u32*>(O + (size_t)row * D + n * 8 + 2 * t) = pack2<T>(o[n][2 * h] * inv_l, o[n][2 * h + 1] * inv_l);
            if (t == 0) L[row] = (TUNED ? m[h] * 0.6931471805599453f : m[h]) + logf(l[h]);
        }
    }
}
