// fa2_tc.cu: rungs 2, 3 and 4 of the CuPy ladder, FlashAttention-2 forward on Tensor Cores (fp16 / bf16).
//
//   fa2_tc<T, D, NW, Bc, CAUSAL, TUNED, K8, MT, QREG>
//   rung 2  TUNED=false, K8=false, MT=1, QREG=true: mma.sync m16n8k16 with fp32 accumulation; Q fragments, S, P and
//           O live in registers; K/V tiles loaded with 128-bit loads, then __syncthreads.
//   rung 3  TUNED=true: cp.async double buffering (tile j+1 is copied while tile j is computed, one __syncthreads
//           per tile), exponentials as ex2.approx with scale*log2(e) folded into one multiply, P rounded to T as
//           soon as it is computed, tile sizes per head dim (host side: TUNED_TILES), and the two knobs that set
//           the balance of shared-memory reads to mma:
//             MT    m-tiles (16 query rows each) per warp. With MT=2 a warp owns 32 rows and every K/V fragment
//                   it ldmatrix'es feeds two mma instead of one (FlashAttention-2 itself: 4 warps, Br = 128).
//             QREG  Q fragments kept in registers (true) or re-read from shared memory for every K tile (false:
//                   frees D/2*MT registers, which is what lets MT=2 with Bc = 64 (d = 128) or 128 (d = 64) fit in
//                   255 registers; at d = 128 the row sums l also move to shared memory, L_SMEM below).
//           4 warps ask for 2 blocks per SM (__launch_bounds__(128, 2)): 8 warps to hide latency.
//           (Separate cp.async groups for K and V, to start S = Q K^T before V lands, were tried: the second
//           __syncthreads inside the tile made ptxas spill in the causal kernels, so K and V travel together.)
//   rung 4  K8=true (T4, sm_75, fp16 only): each m16n8k16 becomes two m16n8k8, no cp.async.
//
// Algorithm: FlashAttention-2 forward (Dao 2023, Algorithm 1), split-Q: each warp owns RW = 16*MT query rows.
// Grid (Tr = ceil(Nq/Br), B*H pairs over y and z: pair_index); block NW warps (NW*32 threads); Br = RW*NW query rows, Bc keys per K/V tile.
// Grouped-query attention: K and V are those of kv head bh / G (G query heads share one; the host passes G).
// Shared memory (dynamic): Qs (Br x LD), then NSTAGE stages of Ks (Bc x LD) and Vs (Bc x LD), then (L_SMEM only)
//   the row sums, 2*MT floats per thread. LD = d + 8: the 8-element (16-byte) pad shifts consecutive rows by 4
//   banks, so the 8 row addresses of an ldmatrix phase fall in 8 different 16-byte bank groups (no bank conflicts). A warp reads only its own RW rows of Qs, so at the end it
//   reuses them to stage its O rows for 16-byte coalesced stores.
// Registers of one thread (g = lane/4, t = lane%4), for the warp's rows r = qw + 16*mt + g and r + 8, mt < MT:
//   qf[MT][d/16][4]  A fragments of the warp's Q rows, loaded once (QREG; else a[MT][4] per 16-column step);
//   s[MT][Bc/8][4]   S = Q K^T for keys 8n + 2t, 8n + 2t + 1 (C layout), overwritten by P;
//   o[MT][d/8][4]    the unnormalised O rows (C layout); m, l the running max and (per-thread partial) sum
//                    (l in shared memory when L_SMEM).
// P never goes through shared memory: the C fragments of two adjacent 8-key n-tiles are exactly the A fragment of
//   a 16-key k-step (a0 = c0c1 of tile 2k, a1 = c2c3 of tile 2k, a2 = c0c1 of tile 2k+1, a3 = c2c3 of 2k+1).
// ldmatrix (no .trans) gives B fragments of K (keys are B's columns, stored row-major = "col" B); ldmatrix.trans gives
//   B fragments of V (keys are B's rows).
// Causal (top-left): K/V tiles right of the Q tile's last row are not visited; a warp whose RW rows all lie left
//   of the tile skips its math; masking happens only on the diagonal and ragged tiles. The last Q tiles (the
//   longest rows) are launched first, so that short blocks fill the tail of the launch.
#include "flash_common.cuh"

// One K/V tile of Algorithm 1's inner loop for one warp (S = Q K^T, online softmax, O += P V), from the K/V stage at
// k_addr / v_addr. MASK: set S to -inf for keys >= Nk and, causal, keys right of the row (the kernel calls the MASK
// instance only for the ragged last tile and the tiles the causal diagonal crosses).
template <typename T, int D, int NW, int Bc, bool CAUSAL, bool TUNED, bool K8, int MT, bool QREG>
__device__ __forceinline__ void attend_tile(float (&o)[MT][D / 8][4], float (&m)[MT][2], float (&l)[MT][2],
                                            const u32 (&qf)[QREG ? MT : 1][QREG ? D / 16 : 1][4], float* lsm,
                                            u32 q_addr, u32 k_addr, u32 v_addr, int kv0, int qw, int Nk, float sl,
                                            bool mask) {
    constexpr int RW = 16 * MT, LD = D + 8;
    constexpr bool L_SMEM = TUNED && MT == 2 && !QREG && D >= 128;
    typedef Mma<T, K8> MMA;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const bool active = !(CAUSAL && kv0 > qw + RW - 1);  // else every key of the tile is right of all RW rows
    if (active) {
        float s[MT][Bc / 8][4];
        // S = Q K^T (RW x Bc per warp), fp32 accumulators; each K fragment feeds MT x 2 mma
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int n = 0; n < Bc / 8; n++) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            u32 a[MT][4];
            if (!QREG) {
#pragma unroll
                for (int mt = 0; mt < MT; mt++)
                    ldmatrix_x4_a(a[mt], q_addr + 2 * (16 * mt * LD + kk * 16));
            }
#pragma unroll
            for (int nn = 0; nn < Bc / 16; nn++) {
                u32 b[4];  // B fragments of key n-tiles 2nn (b[0], b[1]) and 2nn+1 (b[2], b[3])
                ldmatrix_x4_a(b, k_addr + 2 * (nn * 16 * LD + kk * 16));
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    const u32* af = QREG ? qf[QREG ? mt : 0][QREG ? kk : 0] : a[mt];
                    MMA::run(s[mt][2 * nn], af, b);
                    MMA::run(s[mt][2 * nn + 1], af, b + 2);
                }
            }
        }
        // mask (ragged last tile, causal diagonal): one branch for the whole tile, taken by every warp alike
        if (mask) {
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    // element (n, e) holds key kv0 + 2t + 8n + (e&1): visible iff 8n + (e&1) < lim
                    const int lim = (CAUSAL ? min(Nk, qw + 16 * mt + g + 8 * h + 1) : Nk) - kv0 - 2 * t;
#pragma unroll
                    for (int n = 0; n < Bc / 8; n++) {
                        if (n * 8 >= lim) s[mt][n][2 * h] = NEG_INF;
                        if (n * 8 + 1 >= lim) s[mt][n][2 * h + 1] = NEG_INF;
                    }
                }
            }
        }
        // scale, row max over the quad of threads sharing a row, online softmax
        u32 pa[MT][Bc / 16][4];  // P, the A fragments of O += P V
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
            for (int n = 0; n < Bc / 8; n++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    if (!TUNED) s[mt][n][e] *= sl;  // rung 3 scales inside the exp2's FFMA
                    mx[e >> 1] = fmaxf(mx[e >> 1], s[mt][n][e]);
                }
            }
            float base[2], alpha[2], rowsum[2] = {0.f, 0.f};
#pragma unroll
            for (int h = 0; h < 2; h++) {
                mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
                mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
                float m_new = fmaxf(m[mt][h], TUNED ? mx[h] * sl : mx[h]);
                base[h] = m_new == NEG_INF ? 0.f : m_new;  // no visible key yet: P = 0, alpha = 0, no NaN
                alpha[h] = TUNED ? fast_exp2(m[mt][h] - base[h]) : expf(m[mt][h] - base[h]);
                m[mt][h] = m_new;
                l[mt][h] *= alpha[h];
#pragma unroll
                for (int n = 0; n < D / 8; n++) o[mt][n][2 * h] *= alpha[h], o[mt][n][2 * h + 1] *= alpha[h];
            }
#pragma unroll
            for (int n = 0; n < Bc / 8; n++) {
                float p[4];
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    p[e] = TUNED ? fast_exp2(fmaf(s[mt][n][e], sl, -base[e >> 1])) : expf(s[mt][n][e] - base[e >> 1]);
                    // this thread's part of the row sum; the quad's parts are summed once at the end
                    if (L_SMEM) rowsum[e >> 1] += p[e];
                    else l[mt][e >> 1] += p[e];
                }
                // P rounded to T at once (half the registers of fp32 S): C tile n is half of A fragment n/2
                pa[mt][n / 2][2 * (n & 1)] = pack2<T>(p[0], p[1]);
                pa[mt][n / 2][2 * (n & 1) + 1] = pack2<T>(p[2], p[3]);
            }
            if (L_SMEM) {
#pragma unroll
                for (int h = 0; h < 2; h++) lsm[(2 * mt + h) * NW * 32] = lsm[(2 * mt + h) * NW * 32] * alpha[h] + rowsum[h];
            }
        }
        // O += P V: P's C fragments, rounded to T, are the A fragments; each V fragment feeds MT x 2 mma
#pragma unroll
        for (int kk = 0; kk < Bc / 16; kk++) {
#pragma unroll
            for (int nn = 0; nn < D / 16; nn++) {
                u32 b[4];  // B fragments of d n-tiles 2nn and 2nn+1, keys kk*16 .. kk*16+15
                ldmatrix_x4_trans_a(b, v_addr + 2 * (kk * 16 * LD + nn * 16));
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    MMA::run(o[mt][2 * nn], pa[mt][kk], b);
                    MMA::run(o[mt][2 * nn + 1], pa[mt][kk], b + 2);
                }
            }
        }
    }
}

template <typename T, int D, int NW, int Bc, bool CAUSAL, bool TUNED, bool K8, int MT, bool QREG>
__global__ void __launch_bounds__(NW * 32, NW <= 4 ? 2 : 1) fa2_tc(const T* __restrict__ Q, const T* __restrict__ K,
                                                  const T* __restrict__ V, T* __restrict__ O, float* __restrict__ L,
                                                  int Nq, int Nk, float scale, int BH, int G) {
    static_assert(D % 16 == 0 && Bc % 16 == 0, "d and Bc must be multiples of 16");
    static_assert(MT == 1 || MT == 2, "a warp owns 16 or 32 query rows");
    constexpr int RW = 16 * MT, Br = RW * NW, LD = D + 8, NT = NW * 32, NSTAGE = TUNED ? 2 : 1;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* Qs = reinterpret_cast<T*>(smem_raw);
    T* Ks = Qs + Br * LD;               // NSTAGE x Bc x LD
    T* Vs = Ks + NSTAGE * Bc * LD;      // NSTAGE x Bc x LD

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const int q0 = (CAUSAL ? gridDim.x - 1 - blockIdx.x : blockIdx.x) * Br, qw = q0 + RW * warp;
    T* Qw = Qs + RW * warp * LD;        // this warp's rows of Qs
    const u32 pair = pair_index();  // O and L are offset only in the epilogue: no registers held through the loop
    if (pair >= (u32)BH) return;
    const size_t bh = pair, bkv = pair / (u32)G;  // this block's (batch, head) pair, its kv pair
    Q += (bh * Nq + q0) * D; K += bkv * Nk * D; V += bkv * Nk * D;

    const int kv_end = CAUSAL ? min(Nk, q0 + Br) : Nk;
    const int n_tiles = (kv_end + Bc - 1) / Bc;
    // tiles 0 .. n_full-1 are whole (no key >= Nk) and, causal, have every key <= q0 (visible to all Br rows)
    const int n_full = min(Nk / Bc, CAUSAL ? (q0 + 1) / Bc : n_tiles);
    // rung 3 works in base 2: P = exp2(S * sl - m) with sl = scale * log2(e), one FFMA and one MUFU.EX2 per
    // element (m is kept in units of S * sl); rung 2 with S * scale and expf
    const float sl = TUNED ? scale * LOG2E : scale;

    u32 qf[QREG ? MT : 1][QREG ? D / 16 : 1][4];
    float o[MT][D / 8][4], m[MT][2], l[MT][2];
    // d >= 128 with 32 rows per warp: o alone is 128 registers; the row sums, touched once per tile, then live in
    // this thread's slots of shared memory (after the K/V stages) instead of being spilled by the compiler
    constexpr bool L_SMEM = TUNED && MT == 2 && !QREG && D >= 128;
    float* lsm = reinterpret_cast<float*>(Vs + NSTAGE * Bc * LD) + tid;  // l[mt][h] at lsm[(2 * mt + h) * NT]
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        m[mt][0] = m[mt][1] = NEG_INF;
        l[mt][0] = l[mt][1] = 0.f;
        if (L_SMEM) lsm[(2 * mt) * NT] = lsm[(2 * mt + 1) * NT] = 0.f;
#pragma unroll
        for (int n = 0; n < D / 8; n++) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
    }

    const u32 q_lane = smem_addr(Qw + (lane & 15) * LD + (lane >> 4) * 8);
    const u32 k_lane = smem_addr(Ks + ((lane & 7) + (lane >> 4) * 8) * LD + ((lane >> 3) & 1) * 8);
    const u32 v_lane = smem_addr(Vs + ((lane & 7) + ((lane >> 3) & 1) * 8) * LD + (lane >> 4) * 8);
    if (TUNED) {  // prologue: Q and the first K/V tile in flight together
        load_tile<D, LD, true>(Qs, Q, Br, Nq - q0, tid, NT);
        load_tile<D, LD, true>(Ks, K, Bc, Nk, tid, NT);
        load_tile<D, LD, true>(Vs, V, Bc, Nk, tid, NT);
        cp_async_commit();
    }
    for (int j = 0; j < n_tiles; j++) {
        const int kv0 = j * Bc, st = TUNED ? (j & 1) : 0;
        if (TUNED) {
            cp_async_wait<0>();  // this thread's copies of tile j (and Q) have landed
            __syncthreads();     // ... everyone's; and every warp is done with tile j-1, so its stage is free:
            if (j + 1 < n_tiles) {  // prefetch tile j+1 into it; it lands while tile j is computed
                const int nx = (j + 1) & 1;
                load_tile<D, LD, true>(Ks + nx * Bc * LD, K + (size_t)(kv0 + Bc) * D, Bc, Nk - kv0 - Bc, tid, NT);
                load_tile<D, LD, true>(Vs + nx * Bc * LD, V + (size_t)(kv0 + Bc) * D, Bc, Nk - kv0 - Bc, tid, NT);
                cp_async_commit();
            }
        } else {
            if (j == 0) load_tile<D, LD, false>(Qs, Q, Br, Nq - q0, tid, NT);
            load_tile<D, LD, false>(Ks, K + (size_t)kv0 * D, Bc, Nk - kv0, tid, NT);
            load_tile<D, LD, false>(Vs, V + (size_t)kv0 * D, Bc, Nk - kv0, tid, NT);
            __syncthreads();
        }
        if (QREG && j == 0) {
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int kk = 0; kk < D / 16; kk++)
                    ldmatrix_x4(qf[QREG ? mt : 0][QREG ? kk : 0], Qw + (16 * mt + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
        }
        // this lane's ldmatrix row addresses (bytes, shared space) for the first 16x16 block of K, V and its Q rows;
        // the unrolled loops of attend_tile add constant offsets. Tiles before n_full need no mask.
        const u32 st_off = st * (Bc * LD * 2);
        attend_tile<T, D, NW, Bc, CAUSAL, TUNED, K8, MT, QREG>(o, m, l, qf, lsm, opaque(q_lane), k_lane + st_off,
                                                              v_lane + st_off, kv0, qw, Nk, sl, j >= n_full);
        if (!TUNED) __syncthreads();  // all warps are done with this stage before it is refilled
    }
    // epilogue: finish the row sums, divide once, stage the warp's O rows in its own rows of Qs (no other warp reads
    // them), then 16-byte coalesced stores; lse = m / log2(e) + log(l) (natural log)
    __syncwarp();
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            if (L_SMEM) l[mt][h] = lsm[(2 * mt + h) * NT];
            l[mt][h] += __shfl_xor_sync(0xffffffffu, l[mt][h], 1);
            l[mt][h] += __shfl_xor_sync(0xffffffffu, l[mt][h], 2);
            const int r = 16 * mt + g + 8 * h;
            const float inv_l = l[mt][h] > 0.f ? 1.f / l[mt][h] : 0.f;
#pragma unroll
            for (int n = 0; n < D / 8; n++)
                *reinterpret_cast<u32*>(Qw + r * LD + n * 8 + 2 * t) = pack2<T>(o[mt][n][2 * h] * inv_l, o[mt][n][2 * h + 1] * inv_l);
            if (t == 0 && qw + r < Nq) L[(blockIdx.y + (size_t)gridDim.y * blockIdx.z) * Nq + qw + r] = (TUNED ? m[mt][h] * LN2 : m[mt][h]) + logf(l[mt][h]);
        }
    }
    __syncwarp();
    // the pair again, from the special registers (held through the loop it made ptxas spill at d = 128)
    O += ((blockIdx.y + (size_t)gridDim.y * blockIdx.z) * Nq + qw) * D;
    constexpr int C = D / 8;  // 16-byte chunks per row
#pragma unroll
    for (int idx = lane; idx < RW * C; idx += 32) {
        const int r = idx / C, c = (idx % C) * 8;
        if (qw + r < Nq) *reinterpret_cast<uint4*>(O + r * D + c) = *reinterpret_cast<const uint4*>(Qw + r * LD + c);
    }
}
