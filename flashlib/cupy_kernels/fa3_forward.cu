// fa3_forward.cu: rung 7 of the CuPy ladder, a FlashAttention-3-style forward on Hopper (sm_90a only).
//
//   fa3_forward<T, D, Bc, STAGES, NCW, PP, CAUSAL, PERSIST = false, DYNAMIC = false, NARROW = 0>
//       T = __half or __nv_bfloat16, D = 64, 128 or 256, Bc = 64, 80, 128 or 176 keys per K/V tile, STAGES slots in
//       the K/V ring, NCW = 2 or 3 consumer warpgroups, PP: ping-pong between the consumers, PERSIST: a persistent
//       grid with a static tile scheduler, or with DYNAMIC a dynamic one; NARROW > 0 (without the mask): the last
//       key tile's softmax and P V over its first NARROW keys (below)
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
//   d = 256 (FlashAttention-3's tile: Br = 128, Bc = 80, 2 stages, 225 KB): S = Q K^T is m64n80 (40 registers),
//   O = P V two m64n128 products per 16-key step (O is 128 registers a consumer thread).
// PERSIST (FlashAttention-3 section 3 and its hopper/tile_scheduler.hpp, here a static schedule): a grid of one CTA
//   per SM; CTA c takes work items c, c + gridDim.x, ... of ceil(Nq/Br) * BH (query tile, pair) items (tma.cuh's
//   WorkItems, shared with fa3_fp8.cu), causal in order of decreasing tile index (the longest rows first, over all pairs), else pair by pair. On the H200
//   this causal order ran 0.87-1.02x the ping-pong grid's speed (record fa3_ablation_h200, at b753eb0); pair by
//   pair with a pair's longest tiles first ran 0.62-0.97x (fa3_ablation_pair_major_h200, at 41a1755): when
//   gridDim.x is a multiple of ceil(Nq/Br) (132 SMs, 22 tiles), a CTA gets the same tile index every time, so
//   some CTAs get only the longest tiles. The ring's
//   phases continue from item to item; Q of the next item is loaded once every consumer warp has released Qs
//   (barrier q_empty), K_0 of the next item before that. With EARLY_Q (d = 64, and d = 128 without the mask) a warp
//   releases Qs as soon as its last S of the item is done (as FlashAttention-3 does) and stores O straight from its
//   registers, so that the next Q is copied under the item's last P V and its epilogue. Two A/B runs on the H200
//   (benchmarks/fa3_ab.py; logs/fa3_early_q_h200_94ee166.txt, record fa3_ab_h200) timed that 1.02-1.04x at d = 64
//   with the mask (N = 4096) and 1.01-1.02x at d = 128 without it, but 0.98-0.99x at d = 128 with the mask (N =
//   16384) and 0.97-0.98x at d = 256; there O is staged in Qs for 16-byte stores and Qs released after the epilogue.
// DYNAMIC (FlashAttention-3's DynamicPersistentTileScheduler, hopper/tile_scheduler.hpp): the same items in the same
//   order, but CTA c's first item is c and each later one comes from a global counter (next_item, zero at the
//   launch): atomicAdd(next_item, 1) + gridDim.x, so that a CTA that finishes early takes more. The launch sets it
//   back to 0 itself (set_ahead below), so one counter serves every launch on a stream (tma.counter).
//   The producer fetches one item ahead and writes the successor of the item it loads Q for into shared memory
//   (handed[0]) before the q_full arrival, whose release the consumers' wait acquires; they read it right after
//   that wait (it is rewritten only after q_empty), to know whether to hand the last turn on.
// NARROW (the host's fa3_narrowed, where Nk is not a multiple of Bc): without the mask every item's last key tile
//   has the same Nk - (n_tiles - 1) Bc real keys, e.g. 48 of Bc = 176 at Nk = 4096. The host passes them rounded up
//   to 16; that tile's softmax, P and P V then take NARROW keys rather than Bc (its S stays Bc wide, as in
//   fa3_fp8.cu: S is issued under the previous P V), and the keys left out were masked to P = 0, so O is the same
//   bits. Its S registers past NARROW are zeroed after the softmax: left holding a wgmma's output that nothing reads,
//   they made ptxas serialise the persistent grid's wgmma (C7511).
// Arguments: the tensor maps of Q (D, Nq, B*H), K and V (D, Nk, B*H/G) (dims innermost first; rows past Nq or Nk
//   read as zeros), O and lse pointers, Nq, Nk, scale, BH, G: query head pair bh reads kv pair bh / G; next_item
//   (DYNAMIC: an int32 that is 0 at the launch and 0 again after it, else unused).
// Shared memory (dynamic, aligned here to 1024 bytes): Qs (Br x D), STAGES slots of Ks (Bc x D), STAGES of Vs,
//   then the mbarriers (8 bytes each), DYNAMIC: handed[2] (int32). Every tile is cut into blocks of 64 columns (128 bytes a row, one TMA box
//   each), Bc (or Br) rows a block, 16-byte chunks swizzled by XOR with row % 8: rung 6's sw128 layout.
// Barriers (PTX ISA, "mbarrier"): q_full (producer's expect_tx), q_empty (one arrival per consumer warp, PERSIST),
//   k_full[s], v_full[s] (producer's expect_tx, one arrival), k_empty[s], v_empty[s] (one arrival per consumer
//   warp, 4 NCW, once its wgmma reading the slot is done). Phases alternate: the consumer waits for parity
//   (kv / STAGES) & 1 of slot kv % STAGES (kv counts the CTA's K/V tiles over all its items), the producer for the
//   opposite parity of the empty barrier (a fresh barrier counts its parity-1 phase as complete).
// Consumer loop per warpgroup (rung 6's intra-warpgroup overlap, unchanged): step j issues S_j = Q K_j^T (A and B
//   from shared memory) and O += P_{j-1} V_{j-1} (A = P in registers), runs the softmax of S_j while the second
//   product still runs, then rescales O.
// Ping-pong (PP, FlashAttention-3 section 3.2): the consumers take turns at the Tensor Cores, round robin. Before
//   issuing a step's products consumer cw waits at its named barrier (bar.sync 1 + cw, 256 threads: its own 128 and
//   the 128 of the previous consumer's bar.arrive), after issuing them it arrives at the next one's, so that one
//   warpgroup's softmax runs while another's products do. Consumer 0 goes first (the last consumer arrives once at
//   the start) and the last skips its arrival after its last turn of its last item, which no one would wait for.
//   All run the same number of steps (n_tiles + 1 turns each an item).
#include "flash_common.cuh"

#include "tma.cuh"
#include "wgmma.cuh"

// ---- the timeline of a debug instance (fa3_timeline.cu defines FA3_TIMELINE and includes this file) ----
// The elected thread of each warpgroup (thread 0 of its 128) of CTAs 0 and 1 writes one event per phase into the
// global buffer TL (int64): (phase, start and end of %globaltimer in ns, start and end of %clock64), TL_CAP events a
// warpgroup at ((cta * (NCW + 1) + warpgroup) * TL_CAP + event) * 5. Other instances compile it away.
enum Fa3Phase { TL_Q_WAIT = 1, TL_Q_ISSUE, TL_K_WAIT, TL_K_ISSUE, TL_V_WAIT, TL_V_ISSUE,  // producer
                TL_WAIT_Q, TL_WAIT_K, TL_WAIT_V, TL_TURN, TL_ISSUE, TL_WAIT_S, TL_SOFTMAX, TL_WAIT_PV, TL_RESCALE,
                TL_EPILOGUE };  // consumers
#ifdef FA3_TIMELINE
#define FA3_TL_PARAM , long long* __restrict__ TL
constexpr int TL_CAP = 4096;
struct Stamp { long long ns, clk; };
struct Timeline {
    long long* p = nullptr;
    int n = 0;
    static __device__ __forceinline__ Stamp now() {
        Stamp t;
        asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t.ns)::"memory");
        asm volatile("mov.u64 %0, %%clock64;\n" : "=l"(t.clk)::"memory");
        return t;
    }
    __device__ __forceinline__ Stamp start() const { return now(); }
    __device__ __forceinline__ void rec(int phase, Stamp t0) {
        const Stamp t1 = now();
        if (p != nullptr && n < TL_CAP) {
            long long* e = p + 5 * n++;
            e[0] = phase, e[1] = t0.ns, e[2] = t1.ns, e[3] = t0.clk, e[4] = t1.clk;
        }
    }
};
#else
#define FA3_TL_PARAM
struct Stamp {};
struct Timeline {
    __device__ __forceinline__ Stamp start() const { return {}; }
    __device__ __forceinline__ void rec(int, Stamp) {}
};
#endif

template <typename T, int D, int Bc, int STAGES, int NCW, bool PP, bool CAUSAL, bool PERSIST = false,
          bool DYNAMIC = false, int NARROW = 0>
__global__ void __launch_bounds__(128 * (NCW + 1), 1)
fa3_forward(const __grid_constant__ TmaMap qmap, const __grid_constant__ TmaMap kmap, const __grid_constant__ TmaMap vmap,
            T* __restrict__ O, float* __restrict__ L, int Nq, int Nk, float scale, int BH, int G,
            int* __restrict__ next_item FA3_TL_PARAM) {
    static_assert((D == 64 || D == 128 || D == 256) && (Bc == 64 || Bc == 80 || Bc == 128 || Bc == 176) && STAGES >= 2,
                  "S: m64n64, m64n80, m64n128 or m64n176; O: m64n64 or m64n128 wgmma per 128 columns");
    static_assert(NCW == 2 || (NCW == 3 && D == 64), "2 consumer warpgroups, or 3 at d = 64");
    static_assert(PERSIST || !DYNAMIC, "the dynamic scheduler is the persistent grid's");
    static_assert(NARROW == 0 || (!CAUSAL && NARROW % 16 == 0 && NARROW < Bc),
                  "NARROW: the last key tile's width without the mask, a multiple of 16 below Bc");
    constexpr int Br = 64 * NCW, TILE = Bc * D * 2, QTILE = Br * D * 2, DN = D < 128 ? D : 128;
    constexpr bool EARLY_Q = PERSIST && (D == 64 || (D == 128 && !CAUSAL));  // Qs freed early, O from registers
    extern __shared__ __align__(128) unsigned char smem_raw[];
    unsigned char* Qs = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);  // 1024-aligned: swizzle atoms
    const u32 qs0 = smem_addr(Qs), ks0 = qs0 + QTILE, vs0 = ks0 + STAGES * TILE, bar0 = vs0 + STAGES * TILE;
    // barrier addresses: q_full, q_empty, then k_full[s], v_full[s], k_empty[s], v_empty[s]
    const u32 q_full = bar0, q_empty = bar0 + 8;
    auto k_full = [&](int s) { return bar0 + 8 * (2 + s); };
    auto v_full = [&](int s) { return bar0 + 8 * (2 + STAGES + s); };
    auto k_empty = [&](int s) { return bar0 + 8 * (2 + 2 * STAGES + s); };
    auto v_empty = [&](int s) { return bar0 + 8 * (2 + 3 * STAGES + s); };
    // DYNAMIC: handed[0], the item after the current one, handed by the producer to the consumers with Q;
    // handed[1], the producer's own copy of it
    int* handed = reinterpret_cast<int*>(Qs + QTILE + 2 * STAGES * TILE + 8 * (2 + 4 * STAGES));

    const int tid = threadIdx.x, wg = tid >> 7;
    const u32 pair = blockIdx.y + gridDim.y * blockIdx.z;
    if (!PERSIST && pair >= (u32)BH) return;
    const WorkItems<PERSIST, CAUSAL> items((Nq + Br - 1) / Br, BH, pair);  // tma.cuh (PERSIST: the static order)
    const int total = items.total, step = items.step, first = items.first;
    auto item = [&](int i, int& q0, int& bh) { q0 = items.tile(i, bh) * Br; };
    auto tiles_of = [&](int q0) { return ((CAUSAL ? min(Nk, q0 + Br) : Nk) + Bc - 1) / Bc; };  // >= 1

    Timeline tl;
#ifdef FA3_TIMELINE
    const u32 cta = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    if (cta < 2 && (tid & 127) == 0) tl.p = TL + (size_t)(cta * (NCW + 1) + wg) * TL_CAP * 5;
#endif

    if (tid == 0) {
        mbar_init(q_full, 1);
        mbar_init(q_empty, 4 * NCW);  // every consumer warp, once its rows of Qs are free (PERSIST)
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
            u32 kv = 0;  // K/V tiles issued so far: the ring position, continued across work items
            int n = 0;
            // the item after this one: DYNAMIC, from the global counter, fetched one item ahead (FlashAttention-3's
            // DynamicPersistentTileScheduler: atomicAdd + gridDim.x), else the static order. Kept in shared
            // memory (handed[1], volatile): in a register it made ptxas spill the 24-register producer
            // The counter's invariant: a CTA with a first item (blockIdx.x < total) fetches until a fetch returns
            // r >= total - gridDim.x (its terminal one, item total: none), a CTA without one fetches nothing. The
            // non-terminal returns are 0 ... total - gridDim.x - 1 and each of the min(gridDim.x, total) CTAs ends
            // with one terminal return, so a launch's fetches return exactly 0 ... total - 1, whatever the grid.
            // The fetch that returns total - 1 is the launch's last: it stores 0 back, and the next launch on the
            // stream (ordered after this one) finds the counter zero.
            int ahead_reg = 0;
            auto set_ahead = [&](int i) {  // the successor of item i (total: none)
                int x = i >= total ? total : i + step;
                if constexpr (DYNAMIC) {
                    if (i < total) {
                        const int r = atomicAdd(next_item, 1);
                        if (r == total - 1) atomicExch(next_item, 0);
                        x = r < total - (int)gridDim.x ? r + (int)gridDim.x : total;  // (no int overflow near 2^31)
                    }
                    *reinterpret_cast<volatile int*>(handed + 1) = x;
                } else {
                    ahead_reg = x;
                }
            };
            auto ahead = [&]() {
                if constexpr (DYNAMIC) return *reinterpret_cast<volatile int*>(handed + 1);
                else return ahead_reg;
            };
            set_ahead(first);
            for (int i = first; i < total; i = ahead(), set_ahead(i), n++) {
                const int next = ahead();
                int q0, bh;
                item(i, q0, bh);
                const int bkv = bh / G, n_tiles = tiles_of(q0);
                auto load_q = [&]() {  // once every consumer warp is done with the last item's Q (and its O staging)
                    Stamp t = tl.start();
                    mbar_wait(q_empty, (n & 1) ^ 1);
                    tl.rec(TL_Q_WAIT, t);
                    t = tl.start();
                    if (DYNAMIC) *handed = next;  // released by the arrive below, read after q_full's phase
                    mbar_arrive_expect_tx(q_full, QTILE);
                    tma_tile<D, Br>(qs0, &qmap, q_full, q0, bh);
                    tl.rec(TL_Q_ISSUE, t);
                };
                if (!PERSIST) load_q();
                for (int j = 0; j < n_tiles; j++, kv++) {
                    const int s = kv % STAGES;
                    const u32 ph = ((kv / STAGES) & 1) ^ 1;  // the empty phase the consumers completed last round
                    Stamp t = tl.start();
                    mbar_wait(k_empty(s), ph);
                    tl.rec(TL_K_WAIT, t);
                    t = tl.start();
                    mbar_arrive_expect_tx(k_full(s), TILE);
                    tma_tile<D, Bc>(ks0 + s * TILE, &kmap, k_full(s), j * Bc, bkv);
                    tl.rec(TL_K_ISSUE, t);
                    if (PERSIST && j == 0) load_q();  // K_0 may go ahead while the consumers finish the last item
                    t = tl.start();
                    mbar_wait(v_empty(s), ph);
                    tl.rec(TL_V_WAIT, t);
                    t = tl.start();
                    mbar_arrive_expect_tx(v_full(s), TILE);
                    tma_tile<D, Bc>(vs0 + s * TILE, &vmap, v_full(s), j * Bc, bkv);
                    tl.rec(TL_V_ISSUE, t);
                }
            }
        }
        return;
    }

    // ---- consumers: warpgroup cw = 0, 1 owns query rows 64 cw ... 64 cw + 63 of the block ----
    regs_inc<Regs<NCW>::consumer>();
    const int cw = wg - 1, lane = tid & 31, w = (tid >> 5) & 3, g = lane >> 2, t = lane & 3;
    const float sl = scale * LOG2E;
    int qg = 0, n_full = 0;  // per work item: the warpgroup's first query row, the tiles that need no mask in its rows

    u32 pa[Bc / 16][4];
    float s[Bc / 2], o[D / 2], m[2], l[2], alpha[2];

    // S = Q K^T of ring tile kv: per 16-column step kk of d, A = this warpgroup's 64 rows of Q, B = K, both K-major
    // with the step 32 bytes further along the row (kk % 4) of 64-column block kk / 4; SBO = 1024 (next 8 rows)
    auto issue_s = [&](u32 kv) {
        const u32 kst = ks0 + (kv % STAGES) * TILE, qst = qs0 + 64 * cw * 128;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            const unsigned long long da = smem_desc_sw128(qst + (kk >> 2) * (Br * 128) + (kk & 3) * 32, 16, 1024);
            const unsigned long long db = smem_desc_sw128(kst + (kk >> 2) * (Bc * 128) + (kk & 3) * 32, 16, 1024);
            if (kk == 0) Wgmma<T>::template ss<Bc, 0>(s, da, db);
            else Wgmma<T>::template ss<Bc, 1>(s, da, db);
        }
        wgmma_commit();
    };
    // O += P V of ring tile kv: per 16-key step, V MN-major (transposed), LBO = Bc * 128 (next 64 columns of d),
    // SBO = 1024 (next 8 rows); at d = 256 two m64n128 products per step, columns 0-127 and 128-255 (o[0 ... 63],
    // o[64 ... 127]: the accumulator layout continues)
    auto issue_pv = [&](u32 kv, auto width) {
        const u32 vst = vs0 + (kv % STAGES) * TILE;
#pragma unroll
        for (int kk = 0; kk < decltype(width)::value / 16; kk++)
#pragma unroll
            for (int h = 0; h < D / DN; h++)
                Wgmma<T>::template rs<DN, 1, 1>(o + h * (DN / 2), pa[kk],
                                                smem_desc_sw128(vst + h * (DN / 64) * (Bc * 128) + kk * 2048, Bc * 128, 1024));
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
    auto softmax = [&](int j, auto width) {  // over the tile's first W keys
        constexpr int W = decltype(width)::value;
        const Stamp t0 = tl.start();
        wg_softmax<Bc, CAUSAL, 0, 0, W>(s, m, l, alpha, j, n_full, Nk, qg, w, g, t, sl);
        // the S registers past W, which a wgmma wrote and nothing reads, zeroed: left so, ptxas serialises the
        // wgmma of the persistent grid (C7511)
#pragma unroll
        for (int x = W / 2; x < Bc / 2; x++) s[x] = 0.f;
        tl.rec(TL_SOFTMAX, t0);
    };
    auto my_turn = [&]() {
        if constexpr (PP) {
            const Stamp t0 = tl.start();
            bar_sync(1 + cw, 256);
            tl.rec(TL_TURN, t0);
        }
    };
    auto your_turn = [&]() {
        if constexpr (PP) bar_arrive(1 + (cw + 1) % NCW, 256);
    };
    auto wait_full = [&](u32 bar, u32 parity, int phase) {
        const Stamp t0 = tl.start();
        mbar_wait(bar, parity);
        tl.rec(phase, t0);
    };
    auto rescale_and_pack = [&](auto width) {
        const Stamp t0 = tl.start();
        wg_rescale_and_pack<T, D, decltype(width)::value>(o, pa, s, alpha);
        tl.rec(TL_RESCALE, t0);
    };
    auto ring = [](u32 kv) { return (kv / STAGES) & 1; };  // the full phase of ring tile kv
    auto release_q = [&]() {  // EARLY_Q: this warp's last S of the item is done, Qs is free for the next item's Q
        if constexpr (EARLY_Q) release(q_empty);
    };
    constexpr Width<Bc> full{};                        // all the tile's keys
    constexpr Width<NARROW ? NARROW : Bc> narrow{};    // the last tile's first NARROW

    if (PP && cw == NCW - 1) bar_arrive(1, 256);  // consumer 0 takes the first turn
    u32 kv0 = 0;  // K/V ring tiles consumed before this item
    int n = 0;
    int next = total;  // the item after this one: static, or (DYNAMIC) handed over with Q
    for (int i = first; i < total; i = next, n++) {
        int q0, bh;
        item(i, q0, bh);
        const int n_tiles = tiles_of(q0);
        qg = q0 + 64 * cw;
        n_full = min(Nk / Bc, CAUSAL ? (qg + 1) / Bc : n_tiles);
#pragma unroll
        for (int h = 0; h < 2; h++) m[h] = NEG_INF, l[h] = 0.f;
#pragma unroll
        for (int x = 0; x < D / 2; x++) o[x] = 0.f;
        wait_full(q_full, n & 1, TL_WAIT_Q);
        // DYNAMIC: *handed, written before q_full's arrival, holds this item's successor until q_empty
        next = DYNAMIC ? *handed : i + step;
        // S of the item's first tile and its softmax and P over its first WP keys (pwidth: Bc, or NARROW where it
        // is also the last), with no P V under it
        auto first_tile = [&](auto pwidth) {
            wait_full(k_full(kv0 % STAGES), ring(kv0), TL_WAIT_K);
            my_turn();
            Stamp t0 = tl.start();
            arrive();
            issue_s(kv0);
            your_turn();
            tl.rec(TL_ISSUE, t0);
            t0 = tl.start();
            wgmma_wait<0>();
            tl.rec(TL_WAIT_S, t0);
            release(k_empty(kv0 % STAGES));
            if (n_tiles == 1) release_q();
            softmax(0, pwidth);
            rescale_and_pack(pwidth);
        };
        // step j >= 1: S_j under P_{j-1} V_{j-1} (tile j - 1 is never the last: all Bc keys), then S_j's softmax
        // and P_j over its first WP keys (pwidth: Bc, or NARROW on the last tile)
        auto next_tile = [&](int j, auto pwidth) {
            const u32 kv = kv0 + j;
            wait_full(v_full((kv - 1) % STAGES), ring(kv - 1), TL_WAIT_V);  // V_{j-1} arrived before K_j
            wait_full(k_full(kv % STAGES), ring(kv), TL_WAIT_K);
            my_turn();
            Stamp t0 = tl.start();
            arrive();
            issue_s(kv);
            issue_pv(kv - 1, full);
            your_turn();
            tl.rec(TL_ISSUE, t0);
            t0 = tl.start();
            wgmma_wait<1>();  // S_j done, P_{j-1} V_{j-1} may still run during the softmax
            tl.rec(TL_WAIT_S, t0);
            release(k_empty(kv % STAGES));
            if (j == n_tiles - 1) release_q();
            softmax(j, pwidth);
            t0 = tl.start();
            wgmma_wait<0>();
            tl.rec(TL_WAIT_PV, t0);
            release(v_empty((kv - 1) % STAGES));
            fence_regs<D / 2>(o);
            rescale_and_pack(pwidth);
        };
        // P V of the last tile (its first W keys) with no S over it
        auto last_pv = [&](auto width) {
            const u32 kv = kv0 + n_tiles - 1;
            wait_full(v_full(kv % STAGES), ring(kv), TL_WAIT_V);
            my_turn();
            Stamp t0 = tl.start();
            arrive();
            issue_pv(kv, width);
            if (cw != NCW - 1 || next < total) your_turn();  // the last turn of the last item: no one waits
            tl.rec(TL_ISSUE, t0);
            t0 = tl.start();
            wgmma_wait<0>();
            tl.rec(TL_WAIT_PV, t0);
            release(v_empty(kv % STAGES));
            fence_regs<D / 2>(o);
        };
        if constexpr (NARROW == 0) {
            first_tile(full);
            for (int j = 1; j < n_tiles; j++) next_tile(j, full);
            last_pv(full);
        } else {  // the last tile's Nk - (n_tiles - 1) Bc <= NARROW keys: its softmax, P and P V over NARROW
            first_tile(full);
            for (int j = 1; j < n_tiles - 1; j++) next_tile(j, full);
            next_tile(n_tiles - 1, narrow);
            last_pv(narrow);
        }
        kv0 += n_tiles;

        // epilogue: O / l and the lse. EARLY_Q: straight from the registers (rows g and g + 8 of the warp's 16, 4 bytes
        // a thread per 8 columns), Qs already holding the next item's Q; otherwise rung 6's: staged in the warp's own
        // 16 rows of Qs (its last reader, S, is done), then 16-byte stores, and (PERSIST) Qs released
        const Stamp t0 = tl.start();
#pragma unroll
        for (int h = 0; h < 2; h++) {
            l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
            l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
        }
        const int rw = 64 * cw + 16 * w;  // the warp's first row in the block
        if constexpr (!EARLY_Q) fence_proxy_async();  // Qs: wgmma's reads (async proxy) before our writes
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = g + 8 * h;
            const float inv_l = l[h] > 0.f ? 1.f / l[h] : 0.f;
            T* Or = O + ((size_t)bh * Nq + q0 + rw + r) * D + 2 * t;
#pragma unroll
            for (int x = 0; x < D / 8; x++) {
                const u32 packed = pack2<T>(o[4 * x + 2 * h] * inv_l, o[4 * x + 2 * h + 1] * inv_l);
                if constexpr (EARLY_Q) {
                    if (q0 + rw + r < Nq) *reinterpret_cast<u32*>(Or + 8 * x) = packed;
                } else {
                    *reinterpret_cast<u32*>(Qs + sw128<Br>(rw + r, 8 * x) + t * 4) = packed;
                }
            }
            if (t == 0 && q0 + rw + r < Nq)
                L[(size_t)bh * Nq + q0 + rw + r] = m[h] * LN2 + logf(l[h]);
        }
        if constexpr (!EARLY_Q) {
            __syncwarp();
            T* Ob = O + ((size_t)bh * Nq + q0 + rw) * D;
            constexpr int C = D / 8;
#pragma unroll
            for (int x = lane; x < 16 * C; x += 32) {
                const int r = x / C, c = (x % C) * 8;
                if (q0 + rw + r < Nq)
                    *reinterpret_cast<uint4*>(Ob + r * D + c) = *reinterpret_cast<const uint4*>(Qs + sw128<Br>(rw + r, c));
            }
            if constexpr (PERSIST) {
                fence_proxy_async();  // our reads and writes of Qs before the copy engine's next Q
                release(q_empty);
            }
        }
        tl.rec(TL_EPILOGUE, t0);
    }
}
