// fa3_forward.cu: rung 7 of the CuPy ladder, a FlashAttention-3-style forward on Hopper (sm_90a only).
//
//   fa3_forward<T, D, Bc, STAGES, NCW, PP, CAUSAL>   T = __half or __nv_bfloat16, D = 64 or 128, Bc keys per K/V
//       tile, STAGES slots in the K/V ring, NCW = 2 or 3 consumer warpgroups, PP: ping-pong between the consumers
//
// Rung 6 (fa2_wgmma.cu) with FlashAttention-3's two Hopper-specific changes (Shah et al. 2024, sections 3.1-3.2):
//  * TMA: Q, K and V tiles are copied by the Tensor Memory Accelerator (cp.async.bulk.tensor) from tensor maps that
//    the host encodes (tma.py, cuTensorMapEncodeTiled), straight into the 128-byte-swizzled layout wgmma reads. One
//    thread issues a whole tile; the copy engine signals its arrival on an mbarrier (expect_tx / complete_tx).
//  * Warp specialisation: warpgroup 0 is the producer (one elected thread issues every copy; setmaxnreg.dec gives
//    its registers back), warpgroups 1 ... NCW are consumers (setmaxnreg.inc), each owning 64 query rows and
//    running wgmma and the online softmax. K and V travel through a ring of STAGES slots with full and empty barriers.
// Block: 128 (NCW + 1) threads; Br = 64 NCW query rows. Grid (ceil(Nq/Br), pairs over y and z). NCW = 3 (d = 64
//   only: 160 registers a consumer thread) shares each K/V tile among more rows, as FlashAttention-3 does at d = 64.
// Arguments: the tensor maps of Q (D, Nq, B*H), K and V (D, Nk, B*H/G) (dims innermost first; rows past Nq or Nk
//   read as zeros), O and lse pointers, Nq, Nk, scale, BH, G: query head pair bh reads kv pair bh / G.
// Shared memory (dynamic, aligned here to 1024 bytes): Qs (Br x D), STAGES slots of Ks (Bc x D), STAGES of Vs,
//   then the mbarriers (8 bytes each). Every tile is cut into blocks of 64 columns (128 bytes a row, one TMA box
//   each), Bc (or Br) rows a block, 16-byte chunks swizzled by XOR with row % 8: rung 6's sw128 layout.
// Barriers (PTX ISA, "mbarrier"): q_full (producer's expect_tx), k_full[s], v_full[s] (producer's expect_tx, one
//   arrival), k_empty[s], v_empty[s] (one arrival per consumer warp, 4 NCW, once its wgmma reading the slot is done).
//   Phases alternate: the consumer waits for parity (j / STAGES) & 1 of slot j % STAGES, the producer for the
//   opposite parity of the empty barrier (a fresh barrier counts its parity-1 phase as complete).
// Consumer loop per warpgroup (rung 6's intra-warpgroup overlap, unchanged): step j issues S_j = Q K_j^T (A and B
//   from shared memory) and O += P_{j-1} V_{j-1} (A = P in registers), runs the softmax of S_j while the second
//   product still runs, then rescales O.
// Ping-pong (PP, FlashAttention-3 section 3.2): the consumers take turns at the Tensor Cores, round robin. Before
//   issuing a step's products consumer cw waits at its named barrier (bar.sync 1 + cw, 256 threads: its own 128 and
//   the 128 of the previous consumer's bar.arrive), after issuing them it arrives at the next one's, so that one
//   warpgroup's softmax runs while another's products do. Consumer 0 goes first (the last consumer arrives once at
//   the start) and the last skips its arrival after its last turn, which no one would wait for. All run the same
//   number of steps (n_tiles + 1 turns each).
#include "flash_common.cuh"

#include "tma.cuh"
#include "wgmma.cuh"

template <typename T, int D, int Bc, int STAGES, int NCW, bool PP, bool CAUSAL>
__global__ void __launch_bounds__(128 * (NCW + 1), 1)
fa3_forward(const __grid_constant__ TmaMap qmap, const __grid_constant__ TmaMap kmap, const __grid_constant__ TmaMap vmap,
            T* __restrict__ O, float* __restrict__ L, int Nq, int Nk, float scale, int BH, int G) {
    static_assert((D == 64 || D == 128) && (Bc == 64 || Bc == 128) && STAGES >= 2, "m64n64 or m64n128 wgmma");
    static_assert(NCW == 2 || (NCW == 3 && D == 64), "2 consumer warpgroups, or 3 at d = 64");
    constexpr int Br = 64 * NCW, TILE = Bc * D * 2, QTILE = Br * D * 2;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    unsigned char* Qs = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);  // 1024-aligned: swizzle atoms
    const u32 qs0 = smem_addr(Qs), ks0 = qs0 + QTILE, vs0 = ks0 + STAGES * TILE, bar0 = vs0 + STAGES * TILE;
    // barrier addresses: q_full, then k_full[s], v_full[s], k_empty[s], v_empty[s]
    const u32 q_full = bar0;
    auto k_full = [&](int s) { return bar0 + 8 * (1 + s); };
    auto v_full = [&](int s) { return bar0 + 8 * (1 + STAGES + s); };
    auto k_empty = [&](int s) { return bar0 + 8 * (1 + 2 * STAGES + s); };
    auto v_empty = [&](int s) { return bar0 + 8 * (1 + 3 * STAGES + s); };

    const int tid = threadIdx.x, wg = tid >> 7;
    const u32 pair = blockIdx.y + gridDim.y * blockIdx.z;
    if (pair >= (u32)BH) return;
    const int bh = (int)pair, bkv = (int)(pair / (u32)G);
    const int q0 = (CAUSAL ? gridDim.x - 1 - blockIdx.x : blockIdx.x) * Br;  // causal: the longest rows first
    const int kv_end = CAUSAL ? min(Nk, q0 + Br) : Nk;
    const int n_tiles = (kv_end + Bc - 1) / Bc;  // >= 1 (Nk >= 1; causal: q0 >= 0 sees key 0)

    if (tid == 0) {
        mbar_init(q_full, 1);
        for (int s = 0; s < STAGES; s++) {
            mbar_init(k_full(s), 1);
            mbar_init(v_full(s), 1);
            mbar_init(k_empty(s), 4 * NCW);  // every consumer warp
            mbar_init(v_empty(s), 4 * NCW);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");  // visible to the copy engine
    }
    __syncthreads();

    if (wg == 0) {  // ---- producer: one thread issues every copy ----
        regs_dec<Regs<NCW>::producer>();
        if (tid == 0) {
            tma_prefetch_map(&kmap);
            tma_prefetch_map(&vmap);
            mbar_arrive_expect_tx(q_full, QTILE);
            tma_tile<D, Br>(qs0, &qmap, q_full, q0, bh);
            for (int j = 0; j < n_tiles; j++) {
                const int s = j % STAGES;
                const u32 ph = ((j / STAGES) & 1) ^ 1;  // the empty phase the consumers completed last round
                mbar_wait(k_empty(s), ph);
                mbar_arrive_expect_tx(k_full(s), TILE);
                tma_tile<D, Bc>(ks0 + s * TILE, &kmap, k_full(s), j * Bc, bkv);
                mbar_wait(v_empty(s), ph);
                mbar_arrive_expect_tx(v_full(s), TILE);
                tma_tile<D, Bc>(vs0 + s * TILE, &vmap, v_full(s), j * Bc, bkv);
            }
        }
        return;
    }

    // ---- consumers: warpgroup cw = 0, 1 owns query rows 64 cw ... 64 cw + 63 of the block ----
    regs_inc<Regs<NCW>::consumer>();
    const int cw = wg - 1, lane = tid & 31, w = (tid >> 5) & 3, g = lane >> 2, t = lane & 3;
    const int qg = q0 + 64 * cw;
    const int n_full = min(Nk / Bc, CAUSAL ? (qg + 1) / Bc : n_tiles);  // tiles that need no mask in these rows
    const float sl = scale * LOG2E;

    u32 pa[Bc / 16][4];
    float s[Bc / 2], o[D / 2], m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f}, alpha[2];
#pragma unroll
    for (int i = 0; i < D / 2; i++) o[i] = 0.f;

    // S_j = Q K_j^T: per 16-column step kk of d, A = this warpgroup's 64 rows of Q, B = K_j, both K-major with the
    // step 32 bytes further along the row (kk % 4) of 64-column block kk / 4; SBO = 1024 (next 8 rows)
    auto issue_s = [&](int j) {
        const u32 kst = ks0 + (j % STAGES) * TILE, qst = qs0 + 64 * cw * 128;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            const unsigned long long da = smem_desc_sw128(qst + (kk >> 2) * (Br * 128) + (kk & 3) * 32, 16, 1024);
            const unsigned long long db = smem_desc_sw128(kst + (kk >> 2) * (Bc * 128) + (kk & 3) * 32, 16, 1024);
            if (kk == 0) Wgmma<T>::template ss<Bc, 0>(s, da, db);
            else Wgmma<T>::template ss<Bc, 1>(s, da, db);
        }
        wgmma_commit();
    };
    // O += P_j V_j: per 16-key step, V MN-major (transposed), LBO = Bc * 128 (next 64 columns of d), SBO = 1024
    auto issue_pv = [&](int j) {
        const u32 vst = vs0 + (j % STAGES) * TILE;
#pragma unroll
        for (int kk = 0; kk < Bc / 16; kk++)
            Wgmma<T>::template rs<D, 1, 1>(o, pa[kk], smem_desc_sw128(vst + kk * 2048, Bc * 128, 1024));
        wgmma_commit();
    };
    auto arrive = [&]() {
        fence_regs<D / 2>(o);
        fence_regs<Bc / 4>(&pa[0][0]);
        wgmma_fence();
    };
    auto release = [&](u32 bar) {  // this warp's wgmma that read the slot are complete
        __syncwarp();
        if (lane == 0) mbar_arrive(bar);
    };
    auto softmax = [&](int j) { wg_softmax<Bc, CAUSAL>(s, m, l, alpha, j, n_full, Nk, qg, w, g, t, sl); };
    auto my_turn = [&]() {
        if constexpr (PP) bar_sync(1 + cw, 256);
    };
    auto your_turn = [&]() {
        if constexpr (PP) bar_arrive(1 + (cw + 1) % NCW, 256);
    };
    auto rescale_and_pack = [&]() { wg_rescale_and_pack<T, D, Bc>(o, pa, s, alpha); };

    if (PP && cw == NCW - 1) bar_arrive(1, 256);  // consumer 0 takes the first turn
    mbar_wait(q_full, 0);
    mbar_wait(k_full(0), 0);
    my_turn();
    arrive();
    issue_s(0);
    your_turn();
    wgmma_wait<0>();
    release(k_empty(0));
    softmax(0);
    rescale_and_pack();
    for (int j = 1; j < n_tiles; j++) {
        const int sp = (j - 1) % STAGES;
        mbar_wait(v_full(sp), ((j - 1) / STAGES) & 1);  // V_{j-1} arrived before K_j (the producer's order)
        mbar_wait(k_full(j % STAGES), (j / STAGES) & 1);
        my_turn();
        arrive();
        issue_s(j);
        issue_pv(j - 1);
        your_turn();
        wgmma_wait<1>();  // S_j done, P_{j-1} V_{j-1} may still run during the softmax
        release(k_empty(j % STAGES));
        softmax(j);
        wgmma_wait<0>();
        release(v_empty(sp));
        fence_regs<D / 2>(o);
        rescale_and_pack();
    }
    {
        const int sp = (n_tiles - 1) % STAGES;
        mbar_wait(v_full(sp), ((n_tiles - 1) / STAGES) & 1);
        my_turn();
        arrive();
        issue_pv(n_tiles - 1);
        if (cw != NCW - 1) your_turn();
        wgmma_wait<0>();
        release(v_empty(sp));
        fence_regs<D / 2>(o);
    }

    // epilogue (rung 6's): O / l staged in the warp's own 16 rows of Qs (its last reader, S, is done), 16-byte stores
#pragma unroll
    for (int h = 0; h < 2; h++) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    }
    const int rw = 64 * cw + 16 * w;  // the warp's first row in the block
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // Qs: wgmma's reads (async proxy) before our writes
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int r = g + 8 * h;
        const float inv_l = l[h] > 0.f ? 1.f / l[h] : 0.f;
#pragma unroll
        for (int n = 0; n < D / 8; n++)
            *reinterpret_cast<u32*>(Qs + sw128<Br>(rw + r, 8 * n) + t * 4) =
                pack2<T>(o[4 * n + 2 * h] * inv_l, o[4 * n + 2 * h + 1] * inv_l);
        if (t == 0 && q0 + rw + r < Nq)
            L[(size_t)bh * Nq + q0 + rw + r] = m[h] * LN2 + logf(l[h]);
    }
    __syncwarp();
    O += ((size_t)bh * Nq + q0 + rw) * D;
    constexpr int C = D / 8;
#pragma unroll
    for (int i = lane; i < 16 * C; i += 32) {
        const int r = i / C, c = (i % C) * 8;
        if (q0 + rw + r < Nq) *reinterpret_cast<uint4*>(O + r * D + c) = *reinterpret_cast<const uint4*>(Qs + sw128<Br>(rw + r, c));
    }
}
