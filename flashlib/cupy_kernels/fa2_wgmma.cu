// fa2_wgmma.cu: rung 6 of the CuPy ladder, the FlashAttention-2 forward on Hopper's warpgroup MMA (sm_90a only).
//
//   fa2_wgmma<T, D, Bc, NWG, CAUSAL>     T = __half or __nv_bfloat16, D = 64 or 128, Bc = 64 or 128 keys per tile
//
// Same algorithm as rung 3 (FlashAttention-2 forward, split-Q, online softmax in registers, cp.async double
// buffering of K/V tiles), but the two products run as wgmma.mma_async: one instruction multiplies a 64 x 16 A by a
// 16 x N B (N = 64 or 128) for a whole warpgroup (4 warps, 128 threads) and reads B straight from shared memory
// through a matrix descriptor, with no ldmatrix in between. This is what FlashAttention-3 builds on (Shah et al. 2024); FA3's other
// tricks (TMA, warp specialisation, ping-pong scheduling between warpgroups, FP8) are left out.
// Grid (Tr = ceil(Nq/Br), B*H pairs over y and z: pair_index); block NWG warpgroups (NWG*128 threads); each warpgroup owns 64 query rows, Br = 64*NWG.
// Grouped-query attention: K and V are those of kv head bh / G (G query heads share one; the host passes G).
// Shared memory (dynamic, aligned here to 1024 bytes): Qs (Br x D), then 2 stages of Ks (Bc x D) and Vs (Bc x D), all
//   in the 128-byte-swizzled layout that wgmma reads (and TMA would write; see sw128 below): rows of 128 bytes (64
//   columns; d = 128 is two such blocks), the 16-byte chunks of each row permuted by XOR with row % 8. Loading whole
//   128-byte rows keeps L2 requests to full cache lines, and the permutation keeps every 8 consecutive chunks a
//   thread group writes, and every 8 rows ldmatrix reads, in distinct shared-memory banks.
// Operands (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"):
//   S = Q K^T   A = Q in registers (loaded once by ldmatrix: warp w of the warpgroup holds rows 16w..16w+15 in the
//               layout of mma.m16n8k16's A); B = K from shared memory, "K-major" (d contiguous), no transpose.
//   O += P V    A = P in registers: wgmma's accumulator layout per warp is mma.m16n8k16's C layout repeated over the
//               N/8 column chunks, so P is packed from S's registers exactly as in rung 2; B = V from shared memory,
//               keys x d with d contiguous ("MN-major"), read transposed (imm-trans-b = 1).
// Registers of one thread (warp w, g = lane/4, t = lane%4; rows r = 16w + g and r + 8 of the warpgroup's 64):
//   qf[D/16][4] Q's A fragments; s[Bc/2] S then P (4 per 8-key chunk n: keys 8n + 2t, 8n + 2t + 1 of rows r, r+8);
//   o[D/2] the unnormalised O rows; m, l running max (in units of S * scale * log2 e) and this thread's row sums.
// wgmma is asynchronous: after issuing, the warpgroup commits the group and waits for it before touching the
//   accumulators; shared memory written by cp.async (the generic proxy) is made visible to wgmma (the async proxy)
//   with fence.proxy.async before the barrier.
#include "flash_common.cuh"

#include "wgmma.cuh"

// rows x D tile (rows = R), row-major in global memory, into the swizzled layout: 16 bytes a thread and step, 8
// threads per 128-byte line of a row (whole cache lines from L2, and 8 distinct 16-byte bank groups in shared
// memory); rows >= n_valid are zero-filled
template <int D, int R, typename T>
__device__ __forceinline__ void load_sw128(unsigned char* sm, const T* gm, int n_valid, int tid, int nthreads) {
    constexpr int C = D / 8;
    for (int i = tid; i < R * C; i += nthreads) {
        const int r = i / C, c = (i % C) * 8;
        const bool ok = r < n_valid;
        cp_async16(sm + sw128<R>(r, c), gm + (size_t)(ok ? r : 0) * D + c, ok ? 16 : 0);
    }
}

template <typename T, int D, int Bc, int NWG, bool CAUSAL>
__global__ void __launch_bounds__(NWG * 128, NWG == 1 ? 2 : 1) fa2_wgmma(const T* __restrict__ Q, const T* __restrict__ K,
                                                          const T* __restrict__ V, T* __restrict__ O, float* __restrict__ L,
                                                          int Nq, int Nk, float scale, int BH, int G) {
    static_assert((D == 64 || D == 128) && (Bc == 64 || Bc == 128), "one m64n64 or m64n128 wgmma per k-step");
    constexpr int Br = 64 * NWG, NT = NWG * 128, TILE = Bc * D * 2;  // TILE: bytes of one K or V stage
    extern __shared__ __align__(128) unsigned char smem_raw[];
    // the swizzle pattern repeats every 1024 bytes and wgmma expects its atoms 1024-byte aligned
    unsigned char* Qs = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
    unsigned char* Ks = Qs + Br * D * 2;  // 2 stages of Bc x D
    unsigned char* Vs = Ks + 2 * TILE;    // 2 stages of Bc x D

    const int tid = threadIdx.x, lane = tid & 31, w = (tid >> 5) & 3, wg = tid >> 7, g = lane >> 2, t = lane & 3;
    const int q0 = (CAUSAL ? gridDim.x - 1 - blockIdx.x : blockIdx.x) * Br, qg = q0 + 64 * wg;
    // (batch, head) pair read plainly, not through pair_index's asm volatile: that read cost this kernel 4 registers
    // at d = 64 causal (124 -> 128) and 1.41x its time on an H200 (benchmarks/kernel_regression.py, 2026-12-01)
    const u32 pair = blockIdx.y + gridDim.y * blockIdx.z;
    if (pair >= (u32)BH) return;
    const size_t bh = pair, bkv = pair / (u32)G;  // this block's (batch, head) pair, its kv pair
    Q += (bh * Nq + q0) * D; K += bkv * Nk * D; V += bkv * Nk * D;
    const int kv_end = CAUSAL ? min(Nk, q0 + Br) : Nk;
    const int n_tiles = (kv_end + Bc - 1) / Bc;
    const int n_full = min(Nk / Bc, CAUSAL ? (q0 + 1) / Bc : n_tiles);  // tiles that need no mask
    const float sl = scale * LOG2E;

    load_sw128<D, Br>(Qs, Q, Nq - q0, tid, NT);
    load_sw128<D, Bc>(Ks, K, Nk, tid, NT);
    cp_async_commit();

    u32 qf[D / 16][4], pa[Bc / 16][4];
    float s[Bc / 2], o[D / 2], m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f}, alpha[2];
#pragma unroll
    for (int i = 0; i < D / 2; i++) o[i] = 0.f;
    const u32 ks0 = smem_addr(Ks), vs0 = smem_addr(Vs);

    // Software pipeline (FlashAttention-3's intra-warpgroup overlap): step j issues S_j = Q K_j^T and, behind it,
    // O += P_{j-1} V_{j-1}; the softmax of S_j runs on the CUDA cores while the Tensor Cores still work on
    // P_{j-1} V_{j-1}; only then is O rescaled by alpha_j. Loads run one step ahead: step j brings K_{j+1} and V_j,
    // so K_j and V_{j-1} are in shared memory at step j. The first step (no P V yet) and the last (no S) are peeled
    // off, so that no wgmma sits under a branch: ptxas then keeps them in flight instead of serialising them.
    auto begin_step = [&](int j) {
        cp_async_wait<0>();
        fence_proxy_async();  // the cp.async writes, visible to wgmma's reads
        __syncthreads();      // every thread's part landed; every warpgroup is done with S_{j-1} and P_{j-2} V_{j-2}
        if (j < n_tiles) {
            if (j + 1 < n_tiles)
                load_sw128<D, Bc>(Ks + ((j + 1) & 1) * TILE, K + (size_t)(j + 1) * Bc * D, Nk - (j + 1) * Bc, tid, NT);
            load_sw128<D, Bc>(Vs + (j & 1) * TILE, V + (size_t)j * Bc * D, Nk - j * Bc, tid, NT);
            cp_async_commit();
        }
    };
    // S_j = Q K_j^T: one m64n{Bc}k16 wgmma per 16-column step kk of d. K is K-major, 128-byte swizzle: the step
    // starts 32 bytes further in the row (kk%4) of its 64-column block (kk/4); SBO = 1024 (next 8 keys), LBO unused
    auto issue_s = [&](int j) {
        const u32 kst = ks0 + (j & 1) * TILE;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            const unsigned long long desc = smem_desc_sw128(kst + (kk >> 2) * (Bc * 128) + (kk & 3) * 32, 16, 1024);
            if (kk == 0) Wgmma<T>::template rs<Bc, 0, 0>(s, qf[kk], desc);  // S = Q K^T, not += (no zeroing)
            else Wgmma<T>::template rs<Bc, 0, 1>(s, qf[kk], desc);
        }
        wgmma_commit();
    };
    // O += P_j V_j: one m64n{D}k16 wgmma per 16-key step kk (16 rows of V, 2048 bytes). V is MN-major, 128-byte
    // swizzle: LBO = the stride between its 64-column blocks of d (Bc * 128 bytes), SBO = 1024 (next 8 keys)
    auto issue_pv = [&](int j) {
        const u32 vst = vs0 + (j & 1) * TILE;
#pragma unroll
        for (int kk = 0; kk < Bc / 16; kk++)
            Wgmma<T>::template rs<D, 1, 1>(o, pa[kk], smem_desc_sw128(vst + kk * 2048, Bc * 128, 1024));
        wgmma_commit();
    };
    // before a step's wgmma: Q, P and O pinned ahead of the fence (nothing may define a register a wgmma reads while
    // one of the step is in flight, else ptxas serialises every wgmma: hence P is converted only after the wait)
    auto arrive = [&]() {
        fence_regs<D / 4>(&qf[0][0]);
        fence_regs<D / 2>(o);
        fence_regs<Bc / 4>(&pa[0][0]);
        wgmma_fence();
    };
    auto softmax = [&](int j) { wg_softmax<Bc, CAUSAL>(s, m, l, alpha, j, n_full, Nk, qg, w, g, t, sl); };
    auto rescale_and_pack = [&]() { wg_rescale_and_pack<T, D, Bc>(o, pa, s, alpha); };

    begin_step(0);
    {  // Q's A fragments: matrix i = lane/8 of ldmatrix.x4 is (rows +8*(i&1), columns +8*(i>>1))
        const int r = 64 * wg + 16 * w + (lane & 7) + 8 * ((lane >> 3) & 1);
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            ldmatrix_x4_a(qf[kk], smem_addr(Qs) + sw128<Br>(r, 16 * kk + 8 * (lane >> 4)));
        }
    }
    arrive();
    issue_s(0);
    wgmma_wait<0>();
    softmax(0);
    rescale_and_pack();  // (O is still zero)
    for (int j = 1; j < n_tiles; j++) {
        begin_step(j);
        arrive();
        issue_s(j);
        issue_pv(j - 1);
        wgmma_wait<1>();  // S_j is done; P_{j-1} V_{j-1} may still run while the softmax of S_j does
        softmax(j);
        wgmma_wait<0>();
        fence_regs<D / 2>(o);
        rescale_and_pack();
    }
    begin_step(n_tiles);  // V of the last tile has landed
    arrive();
    issue_pv(n_tiles - 1);
    wgmma_wait<0>();
    fence_regs<D / 2>(o);

    // epilogue: row sums over the quad, O / l staged in the warp's own 16 rows of Qs (swizzled), 16-byte stores
#pragma unroll
    for (int h = 0; h < 2; h++) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    }
    const int rw = 64 * wg + 16 * w;  // the warp's first row in the block
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int r = g + 8 * h;  // row within the warp's 16
        const float inv_l = l[h] > 0.f ? 1.f / l[h] : 0.f;
#pragma unroll
        for (int n = 0; n < D / 8; n++)
            *reinterpret_cast<u32*>(Qs + sw128<Br>(rw + r, 8 * n) + t * 4) =
                pack2<T>(o[4 * n + 2 * h] * inv_l, o[4 * n + 2 * h + 1] * inv_l);
        if (t == 0 && q0 + rw + r < Nq)
            L[bh * Nq + q0 + rw + r] = m[h] * LN2 + logf(l[h]);
    }
    __syncwarp();
    O += (bh * Nq + q0 + rw) * D;
    constexpr int C = D / 8;
#pragma unroll
    for (int i = lane; i < 16 * C; i += 32) {
        const int r = i / C, c = (i % C) * 8;
        if (q0 + rw + r < Nq) *reinterpret_cast<uint4*>(O + r * D + c) = *reinterpret_cast<const uint4*>(Qs + sw128<Br>(rw + r, c));
    }
}
