// tma.cuh: the Tensor Memory Accelerator, mbarriers, named barriers and register re-allocation (sm_90a) as inline
// PTX, shared by rung 7's forward (fa3_forward.cu), the FP8 forward (fa3_fp8.cu) and the Hopper backward
// (fa3_backward.cu); and the forwards' work items (query tile, pair), one a CTA or a persistent grid's (WorkItems).
#pragma once
#include "flash_common.cuh"

// ---- mbarrier, TMA and register re-allocation (PTX ISA: "mbarrier", "cp.async.bulk.tensor",
// "cp.reduce.async.bulk.tensor", "setmaxnreg") ----
// a CUtensorMap: 128 opaque bytes, 64-byte aligned, passed by value as a __grid_constant__ kernel parameter
struct __align__(64) TmaMap { unsigned long long bits[16]; };

__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// one arrival that also tells the barrier to expect `bytes` more from the copy engine in this phase
__device__ __forceinline__ void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// spin until the phase of parity `parity` has completed
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    asm volatile("{\n.reg .pred done;\nWAIT:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra WAIT;\n}\n" ::"r"(bar), "r"(parity) : "memory");
}
// box (64 columns, rows, 1) of a 3-D tensor map at (column c, row r, pair z) into shared memory; completion counted
// in bytes on mbarrier `bar`
__device__ __forceinline__ void tma_load_3d(u32 dst, const TmaMap* map, u32 bar, int c, int r, int z) {
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];\n"
                 ::"r"(dst), "l"(reinterpret_cast<unsigned long long>(map)), "r"(bar), "r"(c), "r"(r), "r"(z) : "memory");
}
// the other direction, a reduction: the box at (c, r, z) added element-wise (fp32 add, done at the L2) from shared
// memory src into global memory; out-of-range elements are skipped. Tracked by this thread's bulk groups:
// bulk_commit closes a group, bulk_wait_read<N> waits until at most N groups still read shared memory (src may
// then be overwritten), bulk_wait<N> until at most N are incomplete. The writes to src must be fenced for the
// async proxy (fence_proxy_async) and synchronised with the issuing thread before the call.
__device__ __forceinline__ void tma_reduce_add_3d(const TmaMap* map, u32 src, int c, int r, int z) {
    asm volatile("cp.reduce.async.bulk.tensor.3d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3, %4}], [%1];\n"
                 ::"l"(reinterpret_cast<unsigned long long>(map)), "r"(src), "r"(c), "r"(r), "r"(z) : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void bulk_wait_read() {
    asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
template <int N> __device__ __forceinline__ void bulk_wait() { asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory"); }
__device__ __forceinline__ void tma_prefetch_map(const TmaMap* map) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<unsigned long long>(map)) : "memory");
}
// named barriers 1 and 2 (0 is __syncthreads): sync waits until `count` threads arrived, arrive does not wait
__device__ __forceinline__ void bar_sync(int id, int count) { asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory"); }
__device__ __forceinline__ void bar_arrive(int id, int count) { asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory"); }
template <int N> __device__ __forceinline__ void regs_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N)); }
template <int N> __device__ __forceinline__ void regs_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N)); }

// a rows x D tile (D/64 boxes of 64 columns) at row r0 of pair z into the swizzled tile at dst, arriving on bar
template <int D, int R>
__device__ __forceinline__ void tma_tile(u32 dst, const TmaMap* map, u32 bar, int r0, int z) {
#pragma unroll
    for (int b = 0; b < D / 64; b++) tma_load_3d(dst + b * R * 128, map, bar, 64 * b, r0, z);
}

// registers a thread of the producer / of a consumer, FlashAttention-3's split: 128 * 24 + 256 * 240 <= 65536 for
// two consumer warpgroups, 128 * 32 + 384 * 160 = 65536 for three. The timeline's debug build (FA3_TIMELINE) moves
// 16 to the producer for its stamps at two consumers: 128 * 40 + 256 * 232 = 64512
#ifdef FA3_TIMELINE
template <int NCW> struct Regs { static constexpr int producer = NCW == 2 ? 40 : 32, consumer = NCW == 2 ? 232 : 160; };
#else
template <int NCW> struct Regs { static constexpr int producer = NCW == 2 ? 24 : 32, consumer = NCW == 2 ? 240 : 160; };
#endif

// The forwards' work items (query tile of Br rows, pair) (fa3_forward.cu's header, PERSIST). Without PERSIST one a
// CTA: tile blockIdx.x of `pair`, causal in reverse (the longest rows first). With PERSIST CTA blockIdx.x takes
// items first, first + step, ... < total of n_qt * BH in a static order: causal by decreasing tile index over all
// pairs (the longest tiles first), else pair by pair. The host's fa3_grid sizes the grid (n_qt * BH < 2^31).
template <bool PERSIST, bool CAUSAL> struct WorkItems {
    int n_qt, BH, total, first, step;
    u32 pair;
    __device__ __forceinline__ WorkItems(int n_qt_, int BH_, u32 pair_)
        : n_qt(n_qt_), BH(BH_), total(PERSIST ? n_qt_ * BH_ : 1), first(PERSIST ? blockIdx.x : 0),
          step(PERSIST ? gridDim.x : 1), pair(pair_) {}
    // item i's query tile index, its pair in bh
    __device__ __forceinline__ int tile(int i, int& bh) const {
        if constexpr (PERSIST) {
            bh = CAUSAL ? i % BH : i / n_qt;
            return CAUSAL ? n_qt - 1 - i / BH : i % n_qt;
        } else {
            bh = (int)pair;
            return CAUSAL ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
        }
    }
};
