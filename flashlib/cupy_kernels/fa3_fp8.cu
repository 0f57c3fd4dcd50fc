// fa3_fp8.cu: rung 'fa3_fp8', rung 7's forward (fa3_forward.cu) with e4m3 inputs on Hopper (sm_90a only):
// FlashAttention-3's FP8 path (Shah et al. 2024, section 3.3).
//
//   fa3_fp8<OUT, D, Bc, STAGES, CAUSAL, EMU, PERSIST = false, TRIM = false, NARROW = 0, NCW = 2>
//       OUT = __nv_bfloat16 or __half (O's type), D = 64, 128 or 256, Bc keys per K/V tile (a multiple of 32 from 64
//       to 256: S is m64nBc, Bc / 2 fp32 registers a thread), STAGES slots in the K/V ring, EMU of each 16
//       exponentials computed by exp2_fma on the FMA pipe instead of MUFU (flash_common.cuh); NCW consumer
//       warpgroups (2: 240 registers each; 3, as rung 7 at d = 64: 160 each) taking turns at the Tensor Cores
//       (ping-pong), one CTA per (query tile of Br = 64 NCW rows, pair), or with PERSIST a grid of one CTA per SM
//       looping over those items; TRIM (not with PERSIST) walks the key tiles from the last down and narrows the
//       partial one; NARROW > 0 (without the mask, not with PERSIST or TRIM) runs the last tile's softmax and P V
//       over its first NARROW keys (below)
//
// What changes from rung 7 (whose header describes the producer, the ring, its barriers and the ping-pong):
//  * Operands are e4m3 (1 byte), products wgmma m64nNk32 e4m3 x e4m3 -> fp32 (WgmmaE4m3 in wgmma.cuh). PTX takes
//    8-bit operands only K-major, so V arrives transposed: the host (fp8.py) writes V^T, (d, Nk32) per kv pair with
//    Nk32 = Nk rounded up to 32 and zero keys beyond Nk, and the kernel reads it like K. (FlashAttention-3 transposes
//    V in shared memory inside the kernel instead; here that is an extra pass on the host, timed separately.)
//  * Shared-memory tiles: a tile of K extent X bytes is cut into blocks of SW = block_bytes(X) bytes a row (128
//    where X is a multiple of 128, else 64, else 32), each swizzled by the TMA's and wgmma's mode of that width
//    (128B, 64B, 32B), one TMA box a block: Q (Br x D), K (Bc x D), V^T (D x Bc: Bc = 192 in 64-byte blocks, 160
//    and 224 in 32-byte ones). Every k32 step reads 32 bytes inside one block (desc_step).
//  * P: the fp32 accumulator of S holds, in thread (warp w, g = lane / 4, t = lane % 4), rows g and g + 8, keys
//    8n + 2t and 8n + 2t + 1. The k32 A fragment wants rows g and g + 8, K positions 4t ... 4t + 3 and 16 + 4t ...
//    16 + 4t + 3 of each 32-key chunk (PTX ISA's register fragment figure for m64nNk32 8-bit A; CUTLASS's
//    ALayout_64x32), register i holding row g + 8 (i & 1), positions 16 (i >> 1) + 4t + (0 ... 3). Both hold 8 keys
//    of each row: rather than move bytes between threads, K position 4t + i of a chunk is made key 2t + (i & 1) +
//    8 (i >> 1) (+ 16 in the chunk's second half), the keys this thread already has, and the host stores V^T's
//    columns in that order (fp8.py's key_permutation). P V sums over keys in any order, so O is unchanged; S and
//    the mask keep the natural order. Each register is two cvt.rn.satfinite.e4m3x2.f32 of the thread's own values.
//  * P is rounded as P * 2^8 (wg_softmax's SHIFT: the largest is 256 < 448, e4m3's largest finite), so that
//    probabilities down to 2^-17 rather than 2^-9 survive the rounding; l carries the same factor, O / l cancels it,
//    and the lse takes 8 ln 2 off.
//  * Descale factors (float32, FlashAttention-3's q_descale, k_descale, v_descale): qd per query pair (B*H), kd, vd
//    per kv pair. The softmax scale becomes scale * qd * kd; O is multiplied by vd / l in the epilogue.
//  * Epilogue: O (16-bit) is stored from registers (4 bytes a thread, rows g and g + 8): Qs is half O's size here.
//  * PERSIST: rung 7's persistent grid and static order (tma.cuh's WorkItems), the ring's phases continued across
//    items. As O needs no staging, each consumer warp releases Qs (q_empty) once the item's last S is done, so the
//    producer's K_0 and Q of the next item overlap the last P V and the epilogue.
//  * TRIM: where Nk is not a multiple of Bc, or on the causal diagonal, the last key tile a warpgroup's rows see is
//    partly masked (at N = 4096 and Bc = 224, 64 of the 19th tile's 224 keys are real). The item's tiles are then
//    walked from the last down (FlashAttention-3's order), so that the partial tile comes first, and its S, softmax
//    and P V run over only W keys: the keys the warpgroup's rows see there rounded up to 32 (m64nWk32, W / 2
//    registers, W / 32 k32 steps of P V). at_width turns the run-time count into one of Bc / 32 compiled widths.
//    Two dispatches (the first S and softmax; then the P V under the next S), because ptxas serialises the wgmma
//    when one spans both.
//  * NARROW: without the mask every item's last tile has the same Nk - (n_tiles - 1) Bc keys; the host passes them
//    rounded up to 32 (fp8_tiles.narrow_width), and the tiles stay in order. The last S is still Bc wide (an S of
//    another width under the P V before it, or alone after it, made ptxas serialise the wgmma: C7511), but its
//    softmax, P and P V take only NARROW keys. The keys left out are masked otherwise, so O is the same bits.
// FlashAttention-3 (hopper/ at 0251105) does it otherwise: V row-major is transposed in shared memory by LDSM.T and
//   STSM, and with V column-major P's bytes are moved between the threads of a quad (byte_perm and shuffles,
//   permute_Aregs_fp8 in hopper/utils.h); its softmax's Max_offset = 8 for FP8 is the 2^8 above.
//  * Exponentials: a tile's exp2 on MUFU (16 a clock per SM) costs about what its two products do at FP8 rate, and
//    the softmax of one warpgroup must hide under the other's products. EMU of each 16 go to the FMA pipe
//    (FlashAttention-4's software exp2, for Blackwell; here on Hopper): with 2 of 16 at d = 128 Nsight Compute saw
//    the tensor pipe's share rise from 43 % to 49 % (record fp8_emu_h200; more than 2 was slower again).
// Measured: records fp8_forward_h200, fp8_emu_h200, fp8_narrow_h200 and fp8_sweep_d256_h200 (benchmarks/fp8_bench.py;
//   the tile choices in fp8_tiles.py's comments, the numbers in chapter 8's FP8 section): on the H200 about 900-980
//   TFLOP/s at d = 128 and 1150-1175 at d = 256 without the mask. FlashAttention-3 reports 1008 at d = 128 and up
//   to 1171 at d = 256 on the H100.
// Arguments: tensor maps of Q (D, Nq, B*H), K (D, Nk, B*H/G) and V^T (Nk32, D, B*H/G), O and lse pointers, the
//   descale pointers, Nq, Nk, scale, BH, G.
// Shared memory: Qs, STAGES slots of Ks, STAGES of Vs (V^T tiles), then 2 + 4 STAGES mbarriers (rung 7's: q_full,
//   q_empty (PERSIST), k_full[s], v_full[s], k_empty[s], v_empty[s]).
#include "flash_common.cuh"

#include "tma.cuh"
#include "wgmma.cuh"

// the block width of a tile row of X bytes (X a multiple of 32): 128 bytes where X is a multiple of 128, else 64
// where it is a multiple of 64, else 32; each block is a swizzle span of that width (fp8_tiles.py's block_bytes)
__host__ __device__ constexpr int block_bytes(int X) { return X % 128 == 0 ? 128 : X % 64 == 0 ? 64 : 32; }
// wgmma descriptor of a K-major tile whose rows are SW = 32, 64 or 128 bytes, swizzled by the same mode (PTX ISA,
// "Matrix Descriptor Format": layout type 1 = 128B, 2 = 64B, 3 = 32B; SBO = 8 rows; LBO unused for swizzled K-major
// when one k32 step stays inside a row)
template <int SW> __device__ __forceinline__ unsigned long long desc_k_major(u32 addr) {
    static_assert(SW == 32 || SW == 64 || SW == 128, "32B, 64B or 128B swizzle");
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | (1ull << 16) | ((unsigned long long)(8 * SW >> 4) << 32) |
           ((SW == 128 ? 1ull : SW == 64 ? 2ull : 3ull) << 62);
}
// a tile of R rows and X bytes of K extent (blocks of SW = block_bytes(X) bytes a row, R rows each, one TMA box a
// block) at (K coordinate k0, row r0, pair z) into dst, arriving on bar
template <int X, int R>
__device__ __forceinline__ void tma_tile8(u32 dst, const TmaMap* map, u32 bar, int k0, int r0, int z) {
    constexpr int SW = block_bytes(X);
#pragma unroll
    for (int b = 0; b < X / SW; b++) tma_load_3d(dst + b * R * SW, map, bar, k0 + SW * b, r0, z);
}
// the descriptor of 32-byte k32 step kk of a K-major tile of R rows and X bytes a row (blocks as in tma_tile8):
// 32 bytes further along the row (kk % (SW / 32)) of block kk / (SW / 32)
template <int X, int R> __device__ __forceinline__ unsigned long long desc_step(u32 tile, int kk) {
    constexpr int SW = block_bytes(X), PER = SW / 32;
    return desc_k_major<SW>(tile + (kk / PER) * (R * SW) + (kk % PER) * 32);
}
// four fp32 -> one register of four e4m3, a in the lowest byte (cvt puts its first source in the upper half)
__device__ __forceinline__ u32 pack4_e4m3(float a, float b, float c, float d) {
    unsigned short lo, hi;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(lo) : "f"(b), "f"(a));
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(hi) : "f"(d), "f"(c));
    return (u32)lo | ((u32)hi << 16);
}
// P (the m64nBc accumulator, fp32) as the A fragments of Bc / 32 k32 steps, K positions permuted as above
template <int Bc> __device__ __forceinline__ void pack_p_e4m3(u32 (*pa)[4], const float* s) {
#pragma unroll
    for (int c = 0; c < Bc / 32; c++) {
        const float* x = s + 16 * c;  // 8-key groups n = 4c ... 4c + 3: x[4 (n - 4c) + 0 ... 3]
        pa[c][0] = pack4_e4m3(x[0], x[1], x[4], x[5]);      // row g,     keys 2t, 2t+1, 8+2t, 9+2t
        pa[c][1] = pack4_e4m3(x[2], x[3], x[6], x[7]);      // row g + 8, the same keys
        pa[c][2] = pack4_e4m3(x[8], x[9], x[12], x[13]);    // row g,     keys 16 + those
        pa[c][3] = pack4_e4m3(x[10], x[11], x[14], x[15]);  // row g + 8
    }
}

constexpr int P_SHIFT = 8;  // P rounded as P * 2^8

// f(Width<W>{}) for the least multiple of 32, W >= W0, with W >= keys (at least W0, at most Bc): a run-time key count
// as a compile-time width (W0 = 32: W / 2 registers of S, W / 32 k32 steps of P V)
template <int W, int Bc, typename F> __device__ __forceinline__ void at_width(int keys, F&& f) {
    if constexpr (W >= Bc) f(Width<Bc>{});
    else if (keys <= W) f(Width<W>{});
    else at_width<W + 32, Bc>(keys, f);
}

template <typename OUT, int D, int Bc, int STAGES, bool CAUSAL, int EMU, bool PERSIST = false, bool TRIM = false,
          int NARROW = 0, int NCW = 2>
__global__ void __launch_bounds__(128 * (NCW + 1), 1)
fa3_fp8(const __grid_constant__ TmaMap qmap, const __grid_constant__ TmaMap kmap, const __grid_constant__ TmaMap vmap,
        OUT* __restrict__ O, float* __restrict__ L, const float* __restrict__ qd, const float* __restrict__ kd,
        const float* __restrict__ vd, int Nq, int Nk, float scale, int BH, int G) {
    static_assert((D == 64 || D == 128 || D == 256) && Bc % 32 == 0 && Bc >= 64 && Bc <= 256 && STAGES >= 2,
                  "S: m64nBc, Bc a multiple of 32 from 64 to 256; O: m64n64 or m64n128 per 128 columns");
    static_assert(NARROW == 0 || (!CAUSAL && !PERSIST && !TRIM && NARROW % 32 == 0 && NARROW < Bc),
                  "NARROW: the last key tile's width without the mask, a multiple of 32 below Bc");
    static_assert(NCW == 2 || NCW == 3, "two or three consumer warpgroups");
    constexpr int Br = 64 * NCW, TILE = Bc * D, QTILE = Br * D, DN = D < 128 ? D : 128;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    unsigned char* Qs = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
    const u32 qs0 = smem_addr(Qs), ks0 = qs0 + QTILE, vs0 = ks0 + STAGES * TILE, bar0 = vs0 + STAGES * TILE;
    const u32 q_full = bar0, q_empty = bar0 + 8;
    auto k_full = [&](int s) { return bar0 + 8 * (2 + s); };
    auto v_full = [&](int s) { return bar0 + 8 * (2 + STAGES + s); };
    auto k_empty = [&](int s) { return bar0 + 8 * (2 + 2 * STAGES + s); };
    auto v_empty = [&](int s) { return bar0 + 8 * (2 + 3 * STAGES + s); };

    const int tid = threadIdx.x, wg = tid >> 7;
    const u32 pair = blockIdx.y + gridDim.y * blockIdx.z;
    if (!PERSIST && pair >= (u32)BH) return;
    const WorkItems<PERSIST, CAUSAL> items((Nq + Br - 1) / Br, BH, pair);  // tma.cuh: one a CTA, or the static order
    auto tiles_of = [&](int q0) { return ((CAUSAL ? min(Nk, q0 + Br) : Nk) + Bc - 1) / Bc; };  // >= 1
    // the key tile of an item's step j: in order, or with TRIM from the last (partial, or causal diagonal) tile
    // down, as FlashAttention-3 walks them
    auto tile_at = [](int j, int n_tiles) { return TRIM ? n_tiles - 1 - j : j; };

    if (tid == 0) {
        mbar_init(q_full, 1);
        mbar_init(q_empty, 4 * NCW);  // PERSIST: every consumer warp, once its last S of the item is done
        for (int s = 0; s < STAGES; s++) {
            mbar_init(k_full(s), 1);
            mbar_init(v_full(s), 1);
            mbar_init(k_empty(s), 4 * NCW);
            mbar_init(v_empty(s), 4 * NCW);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {  // ---- producer: rung 7's, the ring position kv continued across items ----
        regs_dec<Regs<NCW>::producer>();
        if (tid == 0) {
            tma_prefetch_map(&kmap);
            tma_prefetch_map(&vmap);
            u32 kv = 0;
            int n = 0;
            for (int i = items.first; i < items.total; i += items.step, n++) {
                int bh;
                const int q0 = items.tile(i, bh) * Br, bkv = bh / G, n_tiles = tiles_of(q0);
                auto load_q = [&]() {  // once every consumer warp's last S of the previous item is done
                    mbar_wait(q_empty, (n & 1) ^ 1);
                    mbar_arrive_expect_tx(q_full, QTILE);
                    tma_tile8<D, Br>(qs0, &qmap, q_full, 0, q0, bh);
                };
                if (!PERSIST) load_q();
                for (int j = 0; j < n_tiles; j++, kv++) {
                    const int s = kv % STAGES;
                    const u32 ph = ((kv / STAGES) & 1) ^ 1;
                    mbar_wait(k_empty(s), ph);
                    mbar_arrive_expect_tx(k_full(s), TILE);
                    tma_tile8<D, Bc>(ks0 + s * TILE, &kmap, k_full(s), 0, tile_at(j, n_tiles) * Bc, bkv);
                    if (PERSIST && j == 0) load_q();  // K_0 goes ahead while the consumers finish the last item
                    mbar_wait(v_empty(s), ph);
                    mbar_arrive_expect_tx(v_full(s), TILE);
                    tma_tile8<Bc, D>(vs0 + s * TILE, &vmap, v_full(s), tile_at(j, n_tiles) * Bc, 0, bkv);
                }
            }
        }
        return;
    }

    // ---- consumers: warpgroup cw owns query rows 64 cw ... 64 cw + 63 of the item's tile ----
    regs_inc<Regs<NCW>::consumer>();
    const int cw = wg - 1, lane = tid & 31, w = (tid >> 5) & 3, g = lane >> 2, t = lane & 3;
    int qg = 0, n_full = 0;  // per item: the warpgroup's first query row, the tiles that need no mask in its rows
    float sl = 0.f;          // per item: the softmax scale with the descales, in log2 units

    u32 pa[Bc / 32][4];
    float s[Bc / 2], o[D / 2], m[2], l[2], alpha[2];

    // S = Q K^T of ring tile kv: k32 steps along d of Q (Br rows) and K (Bc rows), D bytes a row; the tile's first
    // W keys (width = Width<W>: W = Bc, or fewer on a trimmed last tile)
    auto issue_s = [&](u32 kv, auto width) {
        constexpr int W = decltype(width)::value;
        const u32 kst = ks0 + (kv % STAGES) * TILE, qst = qs0 + 64 * cw * block_bytes(D);
#pragma unroll
        for (int kk = 0; kk < D / 32; kk++) {
            const unsigned long long da = desc_step<D, Br>(qst, kk), db = desc_step<D, Bc>(kst, kk);
            if (kk == 0) WgmmaE4m3::ss<W, 0>(s, da, db);
            else WgmmaE4m3::ss<W, 1>(s, da, db);
        }
        wgmma_commit();
    };
    // O += P V: B = V^T (D rows of Bc bytes), k32 steps along the tile's first W keys; at d = 256 two m64n128
    // products per step, rows 0-127 and 128-255 of V^T (h * DN rows further into the step's block)
    auto issue_pv = [&](u32 kv, auto width) {
        constexpr int W = decltype(width)::value;
        const u32 vst = vs0 + (kv % STAGES) * TILE;
#pragma unroll
        for (int kk = 0; kk < W / 32; kk++)
#pragma unroll
            for (int h = 0; h < D / DN; h++)
                WgmmaE4m3::rs<DN, 1>(o + h * (DN / 2), pa[kk], desc_step<Bc, D>(vst + h * DN * block_bytes(Bc), kk));
        wgmma_commit();
    };
    auto arrive = [&]() {
        fence_regs<D / 2>(o);
        fence_regs<Bc / 8>(&pa[0][0]);
        wgmma_fence();
    };
    auto release = [&](u32 bar) {
        __syncwarp();
        if (lane == 0) mbar_arrive(bar);
    };
    auto release_q = [&]() {  // the item's last S is done: Qs is free for the next item's Q (O needs no staging)
        if constexpr (PERSIST) release(q_empty);
    };
    auto softmax = [&](int j, auto width) {
        wg_softmax<Bc, CAUSAL, P_SHIFT, EMU, decltype(width)::value>(s, m, l, alpha, j, n_full, Nk, qg, w, g, t, sl);
    };
    auto my_turn = [&]() { bar_sync(1 + cw, 256); };
    auto your_turn = [&]() { bar_arrive(1 + (cw + 1) % NCW, 256); };
    auto rescale_and_pack = [&](auto width) {
#pragma unroll
        for (int i = 0; i < D / 2; i++) o[i] *= alpha[(i >> 1) & 1];
        pack_p_e4m3<decltype(width)::value>(pa, s);
    };
    auto ring = [](u32 kv) { return (kv / STAGES) & 1; };
    constexpr Width<Bc> full{};

    if (cw == NCW - 1) bar_arrive(1, 256);  // consumer 0 takes the first turn
    u32 kv0 = 0;  // K/V ring tiles consumed before this item
    int n = 0;
    for (int i = items.first; i < items.total; i += items.step, n++) {
        int bh;
        const int q0 = items.tile(i, bh) * Br, bkv = bh / G, n_tiles = tiles_of(q0);
        sl = scale * qd[bh] * kd[bkv] * LOG2E;
        qg = q0 + 64 * cw;
        n_full = min(Nk / Bc, CAUSAL ? (qg + 1) / Bc : n_tiles);
#pragma unroll
        for (int h = 0; h < 2; h++) m[h] = NEG_INF, l[h] = 0.f;
#pragma unroll
        for (int x = 0; x < D / 2; x++) o[x] = 0.f;
        mbar_wait(q_full, n & 1);
        // S of step 0's tile (its first W keys) and its softmax, with no P V under it
        auto first = [&](auto width) {
            const u32 kv = kv0;
            mbar_wait(k_full(kv % STAGES), ring(kv));
            my_turn();
            arrive();
            issue_s(kv, width);
            your_turn();
            wgmma_wait<0>();
            release(k_empty(kv % STAGES));
            if (n_tiles == 1) release_q();
            softmax(tile_at(0, n_tiles), width);
            rescale_and_pack(width);
        };
        // step j >= 1: S_j under P_{j-1} V_{j-1} (the first W keys of tile j - 1), then S_j's softmax and P_j
        // (over its first WP keys: pwidth, Bc or NARROW)
        auto step = [&](int j, auto width, auto pwidth) {
            const u32 kv = kv0 + j;
            mbar_wait(v_full((kv - 1) % STAGES), ring(kv - 1));
            mbar_wait(k_full(kv % STAGES), ring(kv));
            my_turn();
            arrive();
            issue_s(kv, full);
            issue_pv(kv - 1, width);
            your_turn();
            wgmma_wait<1>();
            release(k_empty(kv % STAGES));
            if (j == n_tiles - 1) release_q();
            softmax(tile_at(j, n_tiles), pwidth);
            wgmma_wait<0>();
            release(v_empty((kv - 1) % STAGES));
            fence_regs<D / 2>(o);
            rescale_and_pack(pwidth);
        };
        // P V of the item's last tile (its first W keys) with no S over it; the last turn of the last item: no one
        // waits
        auto last_pv = [&](auto width) {
            const u32 kv = kv0 + n_tiles - 1;
            mbar_wait(v_full(kv % STAGES), ring(kv));
            my_turn();
            arrive();
            issue_pv(kv, width);
            if (cw != NCW - 1 || i + items.step < items.total) your_turn();
            wgmma_wait<0>();
            release(v_empty(kv % STAGES));
            fence_regs<D / 2>(o);
        };
        if constexpr (TRIM) {
            // the first tile is the partial one: S, softmax and P V over only the keys this warpgroup's rows see
            // there, rounded up to 32 (two dispatches: one over both steps makes ptxas serialise the wgmma)
            const int seen = (CAUSAL ? min(Nk, qg + 64) : Nk) - (n_tiles - 1) * Bc;
            at_width<32, Bc>(seen, [&](auto width) { first(width); });
            at_width<32, Bc>(seen, [&](auto width) {
                if (n_tiles > 1) step(1, width, full);
                else last_pv(width);
            });
            for (int j = 2; j < n_tiles; j++) step(j, full, full);
            if (n_tiles > 1) last_pv(full);
        } else if constexpr (NARROW > 0) {
            // in order, the last tile (its Nk - (n_tiles - 1) Bc <= NARROW keys, the same for every item without
            // the mask): its softmax and P V over NARROW keys rather than Bc (its S stays Bc wide after other tiles:
            // an S of another width there makes ptxas serialise the wgmma)
            constexpr Width<NARROW> narrow{};
            if (n_tiles == 1) {
                first(narrow);
            } else {
                first(full);
                for (int j = 1; j < n_tiles - 1; j++) step(j, full, full);
                step(n_tiles - 1, full, narrow);
            }
            last_pv(narrow);
        } else {
            first(full);
            for (int j = 1; j < n_tiles; j++) step(j, full, full);
            last_pv(full);
        }
        kv0 += n_tiles;

        // epilogue: O * v_scale / l straight from registers, lse = m ln 2 + log l - 8 ln 2 (PERSIST: the producer
        // is already loading the next item's K_0 and Q)
        const float v_scale = vd[bkv];
#pragma unroll
        for (int h = 0; h < 2; h++) {
            l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
            l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
        }
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = qg + 16 * w + g + 8 * h;
            if (r >= Nq) continue;
            const float f = l[h] > 0.f ? v_scale / l[h] : 0.f;
            OUT* Or = O + ((size_t)bh * Nq + r) * D + 2 * t;
#pragma unroll
            for (int x = 0; x < D / 8; x++)
                *reinterpret_cast<u32*>(Or + 8 * x) = pack2<OUT>(o[4 * x + 2 * h] * f, o[4 * x + 2 * h + 1] * f);
            if (t == 0) L[(size_t)bh * Nq + r] = m[h] * LN2 + logf(l[h]) - P_SHIFT * LN2;
        }
    }
}
