// fa3_backward.cu: rung 'bwd_wgmma' of the CuPy ladder, a FlashAttention-3-style backward on Hopper (sm_90a only).
// Launched between bwd_dot_do_o (delta = rowsum(dO * O), Lb, dQacc = 0) and bwd_convert_dq of fa2_bwd.cu, like
// bwd_tc (fa2_bwd_tc.cu), whose algorithm it keeps; the products run on wgmma (Shah et al. 2024, section 3 and
// appendix B: the backward's warp specialisation and its five products per tile).
//
//   fa3_backward<T, D, CAUSAL, DQ_TMA>   T = __half or __nv_bfloat16, D = 64 or 128, DQ_TMA: how dQ is added (below)
//   fa3_backward_d256<T, CAUSAL, DQ_TMA> d = 256, where the two consumer warpgroups split d (after fa3_backward)
//
// Grid (ceil(Nk/Bc), B*H pairs over y and z: pair_index), Bc = 128 keys a block; block 384 threads = 3 warpgroups:
//  * warpgroup 0, the producer (setmaxnreg.dec): its first warp loads the block's K and V once and then, per Q tile
//    of Br = 64 query rows, Q, dO, Lb * log2(e) and delta by TMA (rung 7's tensor maps and helpers, tma.cuh) into
//    shared memory, into one of two stages; the stage's full barrier completes when the copy engine's bytes are in.
//    Causal: only the Q tiles with a query >= the block's first key.
//  * warpgroups 1 and 2, the consumers (setmaxnreg.inc), cw = 0, 1 owning keys kv0 + 64 cw ... + 63, and their
//    dK, dV rows in fp32 registers for the whole kernel. Per Q tile (stage s = tile % 2):
//      S^T = K_w Q^T, dP^T = V_w dO^T     m64n64k16 ss: A = K_w / V_w, B = Q / dO, all K-major in shared memory
//      P^T = exp2(S^T scale log2(e) - Lb log2(e)), 0 where masked (ragged edges, causal diagonal: tiles that need it)
//      dS^T = P^T * (dP^T - delta)
//      dV_w += P^T dO, dK_w += dS^T Q     m64nDk16 rs: A = P^T / dS^T repacked from the accumulators (wg_pack), B =
//                                         dO / Q MN-major (transposed), as the forward's O += P V reads V
//      dS^T (rounded to T) -> shared memory (buffer tile % 2), then
//      dQ_tile += scale dS K              m64n64k16 ss, A = dS^T and B = K both transposed: at d = 128 warpgroup cw
//                                         takes dQ's columns 64 cw ... 64 cw + 63 over all Bc keys (after a named
//                                         barrier of the 256 consumer threads: both halves of dS^T are written); at
//                                         d = 64 all 64 columns over its own 64 keys (its own barrier of 128), the
//                                         two partial products both added
//      added into the fp32 dQ buffer (other key blocks add there too); the stage is released (one arrival per
//      consumer warp on its empty barrier) once this tile's products are complete. DQ_TMA (the default, as
//      FlashAttention-3 does it): the warpgroup writes its 64 x 64 dQ tile into a staging tile in shared memory
//      (stage_dq), fences it for the async proxy, meets at a named barrier, and one thread issues two TMA
//      reductions (cp.reduce.async.bulk.tensor ... add, tma.cuh) through a tensor map of the fp32 dQ buffer; the
//      additions happen at the L2 and rows past Nq are skipped by the TMA. That thread waits for the reduction to
//      have read the staging tile (bulk_wait_read) before the next tile's barrier, so one staging tile a warpgroup
//      suffices. !DQ_TMA (the first version, kept for the comparison): every thread adds its 32 values with
//      red.global.add.v2.f32. Measured (H200, ncu at f5c32ac, d = 64, N = 4096,
//      benchmarks/results/logs/ncu_bwd_wgmma_h200_f5c32ac.txt): with the atomics the consumers' issue stalled on
//      the load/store queue (lg_throttle, 1.2 warps per issue; 0.06 with the TMA) and the L1's LSU data pipe was
//      57% busy, for a tensor pipe at 30% of its peak (40% with the TMA); in one timed run (bwd_wgmma_bench.py at 505b10e, record
//      bwd_wgmma_h200) the TMA reductions took the backward from 266-293 to 308-392 TFLOP/s at d = 64 and from
//      323-415 to 414-512 at d = 128 (fp16 and bf16, N = 4096 and 16384, causal and not).
//    The two dS^T buffers let one warpgroup write tile i + 1's while the other still reads tile i's: a warpgroup
//    passes tile i + 1's barrier only after the other has waited for its tile-i products. Issuing dQ of tile i a
//    tile later, under tile i + 1's dK, dV (so that the barrier before it waits for a half written long ago, with
//    four dS^T buffers) timed the same without the mask and 0.95x with it at d = 128 (benchmarks/bwd_ab.py,
//    logs/bwd_lag_ab_h200_9f6624a.txt), so dQ stays with its tile. The loop as it is now (dQ's issue and addition
//    as lambdas, from that attempt) compiles to other code than before at d = 64 and ran 1.01-1.04x faster there
//    with the mask, 1.00x elsewhere (logs/bwd_restructure_ab_h200_ad5b86e.txt).
// Shared memory (dynamic, aligned here to 1024 bytes; sw128 layout, 64-column blocks): Ks, Vs (Bc x D), 2 stages
//   of Qs, dOs (Br x D), 2 buffers of dS^T (Bc x Br), DQ_TMA: a dQ staging tile (Br x 64 fp32, two 128-byte-swizzled
//   boxes of 32 columns) per consumer warpgroup, 2 stages of Lb*log2(e) and delta (Br floats), 5 mbarriers
//   (kv_full, full[2], empty[2]). Named barriers: 1 + cw or 1 (before dQ = dS K), 3 + cw (the staging tile written).
// Grouped-query attention: K, V from kv pair bh / G; dK, dV per query head (bwd_sum_groups adds them). Rows past
//   Nq read as zeros (TMA) with Lb = +inf (the pre-pass pads each pair's delta and Lb to whole Q tiles), so P = 0;
//   keys past Nk are masked and never written.
#include "flash_common.cuh"

#include "tma.cuh"
#include "wgmma.cuh"

// The m64n64 dQ accumulator (thread: rows 16w + g + 8h, columns 8n + 2t, +1), times scale, into a staging tile of
// two TMA boxes of 32 fp32 columns x 64 rows, 128-byte rows in the TMA's 128-byte swizzle (16-byte chunk c of row r
// at chunk c ^ (r % 8)): the layout the reduction reads; a warp's stores hit each bank twice (256 bytes: no conflict)
__device__ __forceinline__ void stage_dq(unsigned char* tile, const float* dq, float scale, int w, int g, int t) {
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = 16 * w + g + 8 * h, chunk = 2 * (n & 3) + (t >> 1);  // r % 8 = g
            *reinterpret_cast<float2*>(tile + (n >> 2) * 8192 + r * 128 + ((chunk ^ g) << 4) + (t & 1) * 8) =
                make_float2(dq[4 * n + 2 * h] * scale, dq[4 * n + 2 * h + 1] * scale);
        }
}

// The producer warp of both kernels below (lane 0 issues, the whole warp waits): the block's K and V (Bc rows each,
// at ks0 and ks0 + KT) once on the mbarrier at bar0 (kv_full), then per Q tile i (stage s = i % 2) Q and dO, and
// the tile's Br values of delta and of Lb * log2(e) (ldmap: rows bh and BH + bh of a (2 BH, Nq rounded up to Br)
// float32 tensor that the pre-pass fills, 0 and +inf past Nq), all by TMA into the stage, once its empty barrier
// (bar0 + 8 (3 + s)) has seen the consumers done with tile i - 2; the full barrier (bar0 + 8 (1 + s)) completes
// when all those bytes are in. (Thread 0 alone in place of the warp timed 0.92-0.93x at d = 64 without the mask and
// 0.97-1.00x with it, H200: logs/bwd_ldtma_h200.txt.) Lb and delta came first by the warp's plain loads and stores,
// then by a plain bulk copy (cp.async.bulk): compute-sanitizer's racecheck took both writes for races with the
// consumers' loads (it does not see them ordered by the full barrier's phase); a tensor TMA's writes it attributes
// to no thread, and it reports none.
// DO1 (fa3_backward_d256 with DQ_TMA): dO has one buffer of its own, filled for tile i once its empty barrier
// (bar0 + 48) has seen the consumers done with tile i - 1's dO, completing its full barrier (bar0 + 40)
template <int D, int Bc, int Br, bool DO1 = false>
__device__ __forceinline__ void bwd_produce(const TmaMap* qmap, const TmaMap* kmap, const TmaMap* vmap,
                                            const TmaMap* domap, const TmaMap* ldmap, u32 ls, u32 dl, u32 ks0,
                                            u32 qs0, u32 dos0, u32 bar0, int kv0, int q_begin, int n_q, int bh,
                                            int bkv, int BH) {
    constexpr int KT = Bc * D * 2, QT = Br * D * 2, LT = Br * 4;
    const bool one = (threadIdx.x & 31) == 0;  // the lane that issues
    if (one) {
        tma_prefetch_map(qmap);
        tma_prefetch_map(domap);
        tma_prefetch_map(ldmap);
        mbar_arrive_expect_tx(bar0, 2 * KT);
        tma_tile<D, Bc>(ks0, kmap, bar0, kv0, bkv);
        tma_tile<D, Bc>(ks0 + KT, vmap, bar0, kv0, bkv);
    }
    for (int i = 0; i < n_q; i++) {
        const int s = i & 1, q0 = q_begin + i * Br;
        const u32 full = bar0 + 8 * (1 + s), empty = bar0 + 8 * (3 + s);
        mbar_wait(empty, ((i >> 1) & 1) ^ 1);
        if (one) {
            mbar_arrive_expect_tx(full, (DO1 ? QT : 2 * QT) + 2 * LT);
            tma_tile<D, Br>(qs0 + s * QT, qmap, full, q0, bh);
            if (!DO1) tma_tile<D, Br>(dos0 + s * QT, domap, full, q0, bh);
            tma_load_3d(dl + s * LT, ldmap, full, q0, bh, 0);
            tma_load_3d(ls + s * LT, ldmap, full, q0, BH + bh, 0);
        }
        if constexpr (DO1) {
            mbar_wait(bar0 + 48, (i & 1) ^ 1);
            if (one) {
                mbar_arrive_expect_tx(bar0 + 40, QT);
                tma_tile<D, Br>(dos0, domap, bar0 + 40, q0, bh);
            }
        }
    }
}

template <typename T, int D, bool CAUSAL, bool DQ_TMA>
__global__ void __launch_bounds__(384, 1)
fa3_backward(const __grid_constant__ TmaMap qmap, const __grid_constant__ TmaMap kmap,
             const __grid_constant__ TmaMap vmap, const __grid_constant__ TmaMap domap,
             const __grid_constant__ TmaMap dqmap, const __grid_constant__ TmaMap ldmap, float* __restrict__ dQacc,
             T* __restrict__ dK, T* __restrict__ dV, int Nq, int Nk, float scale, int BH, int G) {
    static_assert(D == 64 || D == 128, "m64n64 / m64n128 wgmma");
    constexpr int Bc = 128, Br = 64, KT = Bc * D * 2, QT = Br * D * 2, DST = Bc * Br * 2, DQT = DQ_TMA ? Br * 64 * 4 : 0;
    constexpr bool KSPLIT = D == 64;  // dQ split over keys (d = 64) or over columns (d = 128)
    extern __shared__ __align__(128) unsigned char smem_raw[];
    unsigned char* base = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
    const u32 ks0 = smem_addr(base), vs0 = ks0 + KT, qs0 = vs0 + KT, dos0 = qs0 + 2 * QT, dss0 = dos0 + 2 * QT;
    const u32 dqs0 = dss0 + 2 * DST;                                          // DQ_TMA: a dQ tile per warpgroup
    float* ls = reinterpret_cast<float*>(base + 2 * KT + 4 * QT + 2 * DST + 2 * DQT);  // 2 stages of Br: Lb log2(e)
    float* dl = ls + 2 * Br;                                                 // 2 stages of Br: delta
    unsigned char* dss_p = base + 2 * KT + 4 * QT;
    unsigned char* dqs_p = dss_p + 2 * DST;
    const u32 bar0 = smem_addr(dl + 2 * Br), kv_full = bar0;
    auto full = [&](int s) { return bar0 + 8 * (1 + s); };
    auto empty = [&](int s) { return bar0 + 8 * (3 + s); };

    const int tid = threadIdx.x, wg = tid >> 7, lane = tid & 31;
    const u32 pair = pair_index();
    if (pair >= (u32)BH) return;
    const int bh = (int)pair, bkv = (int)(pair / (u32)G);
    const int kv0 = blockIdx.x * Bc;
    const int q_begin = CAUSAL ? (kv0 / Br) * Br : 0;
    const int n_q = q_begin < Nq ? (Nq - q_begin + Br - 1) / Br : 0;  // Q tiles this block visits

    if (tid == 0) {
        mbar_init(kv_full, 1);
        for (int s = 0; s < 2; s++) {
            mbar_init(full(s), 1);   // the producer's expect_tx arrival (the rest is bytes)
            mbar_init(empty(s), 8);  // every consumer warp
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {  // ---- producer: warp 0 ----
        regs_dec<24>();
        if (tid < 32 && n_q > 0)
            bwd_produce<D, Bc, Br>(&qmap, &kmap, &vmap, &domap, &ldmap, smem_addr(ls), smem_addr(dl), ks0, qs0, dos0,
                                   bar0, kv0, q_begin, n_q, bh, bkv, BH);
        return;
    }

    // ---- consumers ----
    regs_inc<240>();
    const int cw = wg - 1, w = (tid >> 5) & 3, g = lane >> 2, t = lane & 3;
    const bool leader = (tid & 127) == 0;  // issues the warpgroup's dQ reductions (DQ_TMA)
    const int kw0 = kv0 + 64 * cw;  // the warpgroup's first key
    const float sl = scale * LOG2E;
    float dk[D / 2], dv[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; i++) dk[i] = dv[i] = 0.f;

    // S^T (dP^T) = K_w Q^T (V_w dO^T) per 16-column step kk of d: rung 7's S = Q K^T with the operands' roles swapped
    auto issue_sdp = [&](float* st, float* dpt, u32 qs, u32 dos) {
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            const u32 ka = (kk >> 2) * (Bc * 128) + 64 * cw * 128 + (kk & 3) * 32, qb = (kk >> 2) * (Br * 128) + (kk & 3) * 32;
            const unsigned long long da = smem_desc_sw128(ks0 + ka, 16, 1024), db = smem_desc_sw128(qs + qb, 16, 1024);
            if (kk == 0) Wgmma<T>::template ss<Br, 0>(st, da, db);
            else Wgmma<T>::template ss<Br, 1>(st, da, db);
        }
        wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            const u32 ka = (kk >> 2) * (Bc * 128) + 64 * cw * 128 + (kk & 3) * 32, qb = (kk >> 2) * (Br * 128) + (kk & 3) * 32;
            const unsigned long long da = smem_desc_sw128(vs0 + ka, 16, 1024), db = smem_desc_sw128(dos + qb, 16, 1024);
            if (kk == 0) Wgmma<T>::template ss<Br, 0>(dpt, da, db);
            else Wgmma<T>::template ss<Br, 1>(dpt, da, db);
        }
        wgmma_commit();
    };
    // dV += P^T dO, dK += dS^T Q per 16-query step: dO, Q MN-major (LBO = Br * 128: the next 64 columns of d)
    auto issue_dkdv = [&](const u32 (*pa)[4], const u32 (*pds)[4], u32 qs, u32 dos) {
#pragma unroll
        for (int kk = 0; kk < Br / 16; kk++)
            Wgmma<T>::template rs<D, 1, 1>(dv, pa[kk], smem_desc_sw128(dos + kk * 2048, Br * 128, 1024));
#pragma unroll
        for (int kk = 0; kk < Br / 16; kk++)
            Wgmma<T>::template rs<D, 1, 1>(dk, pds[kk], smem_desc_sw128(qs + kk * 2048, Br * 128, 1024));
        wgmma_commit();
    };
    // dQ (64 queries x 64 columns) = dS K per 16-key step: A = dS^T (keys x queries) and B = K (keys x d), both
    // MN-major; d = 64: this warpgroup's keys, all columns; d = 128: all keys, columns 64 cw ...
    constexpr int KQ = KSPLIT ? 4 : Bc / 16;
    auto issue_dq = [&](float* dq, u32 dss) {
        const u32 kr = KSPLIT ? 64 * cw * 128 : 0, kc = KSPLIT ? 0 : cw * (Bc * 128);
#pragma unroll
        for (int kk = 0; kk < KQ; kk++) {
            const unsigned long long da = smem_desc_sw128(dss + kr + kk * 2048, Bc * 128, 1024);
            const unsigned long long db = smem_desc_sw128(ks0 + kr + kc + kk * 2048, Bc * 128, 1024);
            if (kk == 0) Wgmma<T>::template ss<64, 0, 1, 1>(dq, da, db);
            else Wgmma<T>::template ss<64, 1, 1, 1>(dq, da, db);
        }
        wgmma_commit();
    };

    // dQ of tile j = dS K (dS^T from buffer j % 2), once its rows are all written: d = 64, this warpgroup's (named
    // barrier 1 + cw of its 128 threads), d = 128 both warpgroups' (barrier 1 of 256). First the last reduction has
    // read the staging tile (DQ_TMA: its issuer waits before the barrier)
    auto issue_dq_of = [&](float* dq, int j) {
        if (DQ_TMA && leader) bulk_wait_read<0>();
        if constexpr (KSPLIT) bar_sync(1 + cw, 128);
        else bar_sync(1, 256);
        wgmma_fence();
        issue_dq(dq, dss0 + (j & 1) * DST);
    };
    // the finished dQ of tile j (rows q0 + 16w + g + 8h, columns c0 + 8n + 2t, +1) into the fp32 buffer
    auto add_dq = [&](const float* dq, int j) {
        const int q0 = q_begin + j * Br, c0 = KSPLIT ? 0 : 64 * cw;
        if constexpr (DQ_TMA) {  // to the staging tile, then one TMA reduction (fp32 add at the L2) per 32 columns
            stage_dq(dqs_p + cw * DQT, dq, scale, w, g, t);
            fence_proxy_async();
            bar_sync(3 + cw, 128);
            if (leader) {
                tma_reduce_add_3d(&dqmap, dqs0 + cw * DQT, c0, q0, bh);
                tma_reduce_add_3d(&dqmap, dqs0 + cw * DQT + DQT / 2, c0 + 32, q0, bh);
                bulk_commit();
            }
        } else {  // red.global.add.v2.f32 from every thread
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int row = q0 + 16 * w + g + 8 * h;
                if (row < Nq) {
                    float* dst = dQacc + ((size_t)bh * Nq + row) * D + c0 + 2 * t;
#pragma unroll
                    for (int n = 0; n < 8; n++)
                        atomic_add_f32x2(dst + 8 * n, dq[4 * n + 2 * h] * scale, dq[4 * n + 2 * h + 1] * scale);
                }
            }
        }
    };

    if (n_q > 0) mbar_wait(kv_full, 0);
    for (int i = 0; i < n_q; i++) {
        const int s = i & 1, q0 = q_begin + i * Br;  // stage s, dS^T buffer s
        const u32 qs = qs0 + s * QT, dos = dos0 + s * QT;
        u32 pa[Br / 16][4], pds[Br / 16][4];
        mbar_wait(full(s), (i >> 1) & 1);
        float st[Br / 2], dpt[Br / 2];
        wgmma_fence();
        issue_sdp(st, dpt, qs, dos);
        // this thread's queries: 8n + 2t + e of the tile, keys kw0 + 16w + g + 8h
        const float* lst = ls + s * Br;
        const float* dlt = dl + s * Br;
        const bool need_mask = q0 + Br > Nq || kw0 + 64 > Nk || (CAUSAL && kw0 + 63 > q0);
        wgmma_wait<1>();
        fence_regs<Br / 2>(st);
#pragma unroll
        for (int n = 0; n < Br / 8; n++) {
            const float2 l2 = *reinterpret_cast<const float2*>(lst + 8 * n + 2 * t);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float p = fast_exp2(fmaf(st[4 * n + e], sl, -((e & 1) ? l2.y : l2.x)));
                if (need_mask) {
                    const int qc = q0 + 8 * n + 2 * t + (e & 1), kr = kw0 + 16 * w + g + 8 * (e >> 1);
                    if (qc >= Nq || kr >= Nk || (CAUSAL && kr > qc)) p = 0.f;
                }
                st[4 * n + e] = p;
            }
        }
        wg_pack<T, Br>(pa, st);
        wgmma_wait<0>();
        fence_regs<Br / 2>(dpt);
#pragma unroll
        for (int n = 0; n < Br / 8; n++) {
            const float2 d2 = *reinterpret_cast<const float2*>(dlt + 8 * n + 2 * t);
#pragma unroll
            for (int e = 0; e < 4; e++) dpt[4 * n + e] = st[4 * n + e] * (dpt[4 * n + e] - ((e & 1) ? d2.y : d2.x));
        }
        wg_pack<T, Br>(pds, dpt);
        // dS^T rows kw0 - kv0 + 16w + g + 8h of the Bc-row buffer, query columns 8n + 2t, +1
        fence_proxy_async();  // the async proxy's reads of this buffer two tiles ago before these writes
        const int rk = 64 * cw + 16 * w + g;
#pragma unroll
        for (int n = 0; n < Br / 8; n++) {
            *reinterpret_cast<u32*>(dss_p + s * DST + sw128<Bc>(rk, 8 * n) + 4 * t) = pds[n / 2][2 * (n & 1)];
            *reinterpret_cast<u32*>(dss_p + s * DST + sw128<Bc>(rk + 8, 8 * n) + 4 * t) = pds[n / 2][2 * (n & 1) + 1];
        }
        fence_proxy_async();  // visible to wgmma (the async proxy)
        fence_regs<D / 2>(dv);
        fence_regs<D / 2>(dk);
        fence_regs<Br / 4>(&pa[0][0]);
        fence_regs<Br / 4>(&pds[0][0]);
        wgmma_fence();
        issue_dkdv(pa, pds, qs, dos);
        float dq[32];
        issue_dq_of(dq, i);
        wgmma_wait<0>();  // this tile's products are complete: Q, dO, Lb, delta of stage s are read
        fence_regs<D / 2>(dv);
        fence_regs<D / 2>(dk);
        fence_regs<Br / 4>(&pa[0][0]);
        fence_regs<Br / 4>(&pds[0][0]);
        __syncwarp();
        if (lane == 0) mbar_arrive(empty(s));
        fence_regs<32>(dq);
        add_dq(dq, i);
    }

    if (DQ_TMA && leader) bulk_wait<0>();  // the staging tile is read before the block's shared memory goes
    // dK = scale dS^T Q, dV = P^T dO for the warpgroup's keys (rows kw0 + 16w + g + 8h; zero where no Q tile was seen)
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int row = kw0 + 16 * w + g + 8 * h;
        if (row < Nk) {
            T* k_out = dK + ((size_t)bh * Nk + row) * D + 2 * t;
            T* v_out = dV + ((size_t)bh * Nk + row) * D + 2 * t;
#pragma unroll
            for (int n = 0; n < D / 8; n++) {
                *reinterpret_cast<u32*>(k_out + 8 * n) = pack2<T>(dk[4 * n + 2 * h] * scale, dk[4 * n + 2 * h + 1] * scale);
                *reinterpret_cast<u32*>(v_out + 8 * n) = pack2<T>(dv[4 * n + 2 * h], dv[4 * n + 2 * h + 1]);
            }
        }
    }
}

// d = 256 (FlashAttention-3's way at this head dim, Shah et al. 2024 and the repository's hopper/ kernels): a block's
// dK and dV at 64 keys would take 2 x 128 fp32 registers a thread, more than a warpgroup has, so the two consumer
// warpgroups share the block's Bc = 64 keys and split d instead: warpgroup cw keeps dK, dV columns 128 cw ... + 127.
// Per Q tile of Br = 64 queries (stage s = tile % 2):
//   S^T, dP^T for the warpgroup's 32 queries 32 cw ... + 31   m64n32k16 ss over all of d (A = K / V, B = Q / dO rows)
//   P^T, dS^T as in fa3_backward, rounded to T into shared memory (buffers s: both warpgroups' halves make the tile)
//   named barrier of the 256 consumer threads (both halves written)
//   dV_w += P^T dO_w, dK_w += dS^T Q_w   m64n128k16 ss: A = P^T / dS^T (keys x queries, K-major), B = the
//                                         warpgroup's 128 columns of dO / Q, MN-major
//   dQ_w = dS K_w                         m64n64k16 ss twice (the warpgroup's two 64-column halves), A = dS^T and B =
//                                         K's columns, both MN-major, added into the fp32 dQ buffer:
//     !DQ_TMA: by red.global.add.v2.f32 from every thread, as FlashAttention-3 does at d = 256
//     DQ_TMA: each half staged (stage_dq) and added by two TMA reductions, as fa3_backward does. The 32 KB of its
//             two staging tiles come from dO, which then has one buffer (not two stages): the producer refills it
//             for the next tile once both warpgroups' dV products are done (a barrier of its own), while dK and dQ
//             run. Measured (H200, record bwd_wgmma_d256_h200 at d498ddc, fp16 and bf16, N = 4096, 16384, causal
//             and not): 324-365 TFLOP/s against 267-291 with atomics; it is the default. S^T needs Q only, so it
//             is issued before the wait for dO's refill (timed 0.99-1.02x of waiting first, within the spread:
//             logs/bwd_d256_sfirst_h200_b17a071.txt)
// The two P^T, dS^T buffers work as fa3_backward's dS^T buffers. Shared memory: K, V (64 x 256), 2 stages of Q (64 x
// 256), of dO 2 stages or (DQ_TMA) one buffer and 2 staging tiles (64 x 64 fp32), 2 buffers each of dS^T and P^T
// (64 x 64): 224 KB, plus Lb, delta and the mbarriers.
template <typename T, bool CAUSAL, bool DQ_TMA>
__global__ void __launch_bounds__(384, 1)
fa3_backward_d256(const __grid_constant__ TmaMap qmap, const __grid_constant__ TmaMap kmap,
                  const __grid_constant__ TmaMap vmap, const __grid_constant__ TmaMap domap,
                  const __grid_constant__ TmaMap dqmap, const __grid_constant__ TmaMap ldmap,
                  float* __restrict__ dQacc, T* __restrict__ dK, T* __restrict__ dV, int Nq, int Nk, float scale, int BH,
                  int G) {
    constexpr int D = 256, Bc = 64, Br = 64, KT = Bc * D * 2, QT = Br * D * 2, PT = Bc * Br * 2;
    constexpr int DOS = DQ_TMA ? 1 : 2, DQT = Br * 64 * 4;  // dO buffers; a staging tile (DQ_TMA, per warpgroup)
    extern __shared__ __align__(128) unsigned char smem_raw[];
    unsigned char* base = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
    const u32 ks0 = smem_addr(base), vs0 = ks0 + KT, qs0 = vs0 + KT, dos0 = qs0 + 2 * QT, dss0 = dos0 + DOS * QT;
    const u32 pts0 = dss0 + 2 * PT, dqs0 = pts0 + 2 * PT;  // P^T buffers after the dS^T buffers, then staging
    unsigned char* dss_p = base + 2 * KT + (2 + DOS) * QT;
    unsigned char* pts_p = dss_p + 2 * PT;
    unsigned char* dqs_p = pts_p + 2 * PT;
    float* ls = reinterpret_cast<float*>(dqs_p + (DQ_TMA ? 2 * DQT : 0));  // 2 stages of Br: Lb log2(e)
    float* dl = ls + 2 * Br;                                                // 2 stages of Br: delta
    const u32 bar0 = smem_addr(dl + 2 * Br), kv_full = bar0;
    auto full = [&](int s) { return bar0 + 8 * (1 + s); };
    auto empty = [&](int s) { return bar0 + 8 * (3 + s); };
    const u32 do_full = bar0 + 40, do_empty = bar0 + 48;  // DQ_TMA: dO's one buffer

    const int tid = threadIdx.x, wg = tid >> 7, lane = tid & 31;
    const u32 pair = pair_index();
    if (pair >= (u32)BH) return;
    const int bh = (int)pair, bkv = (int)(pair / (u32)G);
    const int kv0 = blockIdx.x * Bc;
    const int q_begin = CAUSAL ? kv0 : 0;  // Br = Bc: the first Q tile with a query >= the block's first key
    const int n_q = q_begin < Nq ? (Nq - q_begin + Br - 1) / Br : 0;

    if (tid == 0) {
        mbar_init(kv_full, 1);
        for (int s = 0; s < 2; s++) {
            mbar_init(full(s), 1);
            mbar_init(empty(s), 8);
        }
        if (DQ_TMA) mbar_init(do_full, 1), mbar_init(do_empty, 8);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {  // ---- producer: warp 0 ----
        regs_dec<24>();
        if (tid < 32 && n_q > 0)
            bwd_produce<D, Bc, Br, DQ_TMA>(&qmap, &kmap, &vmap, &domap, &ldmap, smem_addr(ls), smem_addr(dl), ks0, qs0,
                                           dos0, bar0, kv0, q_begin, n_q, bh, bkv, BH);
        return;
    }

    // ---- consumers ----
    regs_inc<240>();
    const int cw = wg - 1, w = (tid >> 5) & 3, g = lane >> 2, t = lane & 3;
    const int c0 = 128 * cw, qw = 32 * cw;  // the warpgroup's columns of d and its queries in the Q tile
    const bool leader = (tid & 127) == 0;  // issues the warpgroup's dQ reductions (DQ_TMA)
    const float sl = scale * LOG2E;
    float dk[64], dv[64];
#pragma unroll
    for (int i = 0; i < 64; i++) dk[i] = dv[i] = 0.f;

    // S^T = K Q_w^T (dP^T = V dO_w^T: kv = vs0, q = dos) per 16-column step kk of d, a commit group; Q_w: rows
    // qw ... qw + 31 of the Q (dO) tile
    auto issue_kq = [&](float* acc, u32 kv, u32 q) {
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            const u32 ka = (kk >> 2) * (Bc * 128) + (kk & 3) * 32, qb = (kk >> 2) * (Br * 128) + qw * 128 + (kk & 3) * 32;
            const unsigned long long da = smem_desc_sw128(kv + ka, 16, 1024), db = smem_desc_sw128(q + qb, 16, 1024);
            if (kk == 0) Wgmma<T>::template ss<32, 0>(acc, da, db);
            else Wgmma<T>::template ss<32, 1>(acc, da, db);
        }
        wgmma_commit();
    };
    // dV_w += P^T dO_w, dK_w += dS^T Q_w (one commit group), then dQ_w = dS K_w in two halves of 64 columns (a
    // group each), per 16-row step kk (of queries, then of keys); dO_w, Q_w: the warpgroup's two 64-column blocks
    // (LBO: the next block), K: block 2 cw + half
    auto issue_products = [&](float* dq0, float* dq1, u32 qs, u32 dos, u32 dss, u32 pts) {
#pragma unroll
        for (int kk = 0; kk < Br / 16; kk++)
            Wgmma<T>::template ss<128, 1, 0, 1>(dv, smem_desc_sw128(pts + kk * 32, 16, 1024),
                                                smem_desc_sw128(dos + 2 * cw * (Br * 128) + kk * 2048, Br * 128, 1024));
#pragma unroll
        for (int kk = 0; kk < Br / 16; kk++)
            Wgmma<T>::template ss<128, 1, 0, 1>(dk, smem_desc_sw128(dss + kk * 32, 16, 1024),
                                                smem_desc_sw128(qs + 2 * cw * (Br * 128) + kk * 2048, Br * 128, 1024));
        wgmma_commit();
#pragma unroll
        for (int half = 0; half < 2; half++) {
            float* dq = half ? dq1 : dq0;
#pragma unroll
            for (int kk = 0; kk < Bc / 16; kk++) {
                const unsigned long long da = smem_desc_sw128(dss + kk * 2048, Bc * 128, 1024);
                const unsigned long long db = smem_desc_sw128(ks0 + (2 * cw + half) * (Bc * 128) + kk * 2048, Bc * 128, 1024);
                if (kk == 0) Wgmma<T>::template ss<64, 0, 1, 1>(dq, da, db);
                else Wgmma<T>::template ss<64, 1, 1, 1>(dq, da, db);
            }
            wgmma_commit();
        }
    };
    // a dQ half (columns c0 + 64 half ...; rows q0 + 16w + g + 8h, columns 8n + 2t, +1 of dq) into the fp32 buffer
    auto add_dq = [&](const float* dq, int half, int q0) {
        if constexpr (DQ_TMA) {  // staged, then two TMA reductions of 32 columns by the leader
            if (leader) bulk_wait_read<0>();  // the staging tile's last reduction has read it
            bar_sync(3 + cw, 128);
            stage_dq(dqs_p + cw * DQT, dq, scale, w, g, t);
            fence_proxy_async();
            bar_sync(3 + cw, 128);
            if (leader) {
                tma_reduce_add_3d(&dqmap, dqs0 + cw * DQT, c0 + 64 * half, q0, bh);
                tma_reduce_add_3d(&dqmap, dqs0 + cw * DQT + DQT / 2, c0 + 64 * half + 32, q0, bh);
                bulk_commit();
            }
        } else {
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int row = q0 + 16 * w + g + 8 * h;
                if (row < Nq) {
                    float* dst = dQacc + ((size_t)bh * Nq + row) * D + c0 + 64 * half + 2 * t;
#pragma unroll
                    for (int n = 0; n < 8; n++)
                        atomic_add_f32x2(dst + 8 * n, dq[4 * n + 2 * h] * scale, dq[4 * n + 2 * h + 1] * scale);
                }
            }
        }
    };

    if (n_q > 0) mbar_wait(kv_full, 0);
    for (int i = 0; i < n_q; i++) {
        const int s = i & 1, q0 = q_begin + i * Br;
        const u32 qs = qs0 + s * QT, dos = dos0 + (DQ_TMA ? 0 : s * QT);
        mbar_wait(full(s), (i >> 1) & 1);
        float st[16], dpt[16];
        wgmma_fence();
        issue_kq(st, ks0, qs);                         // S^T needs Q only: issued before dO's buffer is refilled
        if (DQ_TMA) mbar_wait(do_full, i & 1);
        wgmma_fence();
        issue_kq(dpt, vs0, dos);
        // this thread's queries: qw + 8n + 2t + e of the tile, keys kv0 + 16w + g + 8h
        const float* lst = ls + s * Br + qw;
        const float* dlt = dl + s * Br + qw;
        const bool need_mask = q0 + Br > Nq || kv0 + Bc > Nk || (CAUSAL && kv0 + Bc - 1 > q0 + qw);
        wgmma_wait<1>();
        fence_regs<16>(st);
#pragma unroll
        for (int n = 0; n < 4; n++) {
            const float2 l2 = *reinterpret_cast<const float2*>(lst + 8 * n + 2 * t);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float p = fast_exp2(fmaf(st[4 * n + e], sl, -((e & 1) ? l2.y : l2.x)));
                if (need_mask) {
                    const int qc = q0 + qw + 8 * n + 2 * t + (e & 1), kr = kv0 + 16 * w + g + 8 * (e >> 1);
                    if (qc >= Nq || kr >= Nk || (CAUSAL && kr > qc)) p = 0.f;
                }
                st[4 * n + e] = p;
            }
        }
        wgmma_wait<0>();
        fence_regs<16>(dpt);
#pragma unroll
        for (int n = 0; n < 4; n++) {
            const float2 d2 = *reinterpret_cast<const float2*>(dlt + 8 * n + 2 * t);
#pragma unroll
            for (int e = 0; e < 4; e++) dpt[4 * n + e] = st[4 * n + e] * (dpt[4 * n + e] - ((e & 1) ? d2.y : d2.x));
        }
        // P^T, dS^T rows (keys) 16w + g + 8h of buffer s, query columns qw + 8n + 2t, +1
        fence_proxy_async();  // the async proxy's reads of these buffers two tiles ago before these writes
        const int rk = 16 * w + g;
#pragma unroll
        for (int n = 0; n < 4; n++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int off = s * PT + sw128<Bc>(rk + 8 * h, qw + 8 * n) + 4 * t;
                *reinterpret_cast<u32*>(pts_p + off) = pack2<T>(st[4 * n + 2 * h], st[4 * n + 2 * h + 1]);
                *reinterpret_cast<u32*>(dss_p + off) = pack2<T>(dpt[4 * n + 2 * h], dpt[4 * n + 2 * h + 1]);
            }
        fence_proxy_async();  // visible to wgmma (the async proxy)
        bar_sync(1, 256);     // both warpgroups' halves
        float dq0[32], dq1[32];
        fence_regs<64>(dv);
        fence_regs<64>(dk);
        wgmma_fence();
        issue_products(dq0, dq1, qs, dos, dss0 + s * PT, pts0 + s * PT);
        wgmma_wait<2>();
        fence_regs<64>(dv);
        fence_regs<64>(dk);
        if constexpr (DQ_TMA) {
            __syncwarp();
            if (lane == 0) mbar_arrive(do_empty);  // dO is read (dP^T, dV): the producer may refill it
        }
        wgmma_wait<1>();
        fence_regs<32>(dq0);
        add_dq(dq0, 0, q0);
        wgmma_wait<0>();
        fence_regs<32>(dq1);
        __syncwarp();
        if (lane == 0) mbar_arrive(empty(s));  // Q, dO (2 stages), Lb, delta of stage s are read
        add_dq(dq1, 1, q0);
    }
    if (DQ_TMA && leader) bulk_wait<0>();  // the staging tile is read before the block's shared memory goes

    // dK = scale dS^T Q, dV = P^T dO: rows kv0 + 16w + g + 8h, the warpgroup's columns c0 + 8n + 2t, +1
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int row = kv0 + 16 * w + g + 8 * h;
        if (row < Nk) {
            T* k_out = dK + ((size_t)bh * Nk + row) * D + c0 + 2 * t;
            T* v_out = dV + ((size_t)bh * Nk + row) * D + c0 + 2 * t;
#pragma unroll
            for (int n = 0; n < 16; n++) {
                *reinterpret_cast<u32*>(k_out + 8 * n) = pack2<T>(dk[4 * n + 2 * h] * scale, dk[4 * n + 2 * h + 1] * scale);
                *reinterpret_cast<u32*>(v_out + 8 * n) = pack2<T>(dv[4 * n + 2 * h], dv[4 * n + 2 * h + 1]);
            }
        }
    }
}
