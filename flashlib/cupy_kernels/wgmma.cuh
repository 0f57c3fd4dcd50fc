// wgmma.cuh: Hopper's warpgroup MMA (sm_90a) as inline PTX, shared by rung 6 (fa2_wgmma.cu), rung 7
// (fa3_forward.cu), the Hopper backward (fa3_backward.cu) and the FP8 forward (fa3_fp8.cu): fences, register pins,
// the shared-memory matrix descriptor of the 128-byte swizzle, the m64nNk16 instructions with A from registers (rs)
// or shared memory (ss), the e4m3 m64nNk32 ones, the swizzled layout sw128 and the online softmax.
#pragma once
#include "flash_common.cuh"

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Registers wgmma reads or writes, pinned in program order: before wgmma_fence, so that the compiler computes them
// before it (else ptxas must insert its own fence and serialises the wgmma), and after wgmma_wait, so that nothing
// reads an accumulator before the wait
template <int N> __device__ __forceinline__ void fence_regs(float* r) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N> __device__ __forceinline__ void fence_regs(u32* r) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+r"(r[i])::"memory");
}

// shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"): start address, leading- and stride-dimension
// byte offsets (LBO, SBO), all in units of 16 bytes; layout type 1 in bits 62-63 = 128-byte swizzle
__device__ __forceinline__ unsigned long long smem_desc_sw128(u32 addr, u32 lbo, u32 sbo) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)(lbo >> 4) << 16) |
           ((unsigned long long)(sbo >> 4) << 32) | (1ull << 62);
}

// the accumulator operand lists of m64n32 (16 registers a thread: fa3_fp8's trimmed last tile), m64n64k16 (32), m64n80k16 (40: rung 7's Bc = 80 at d = 256)
// and m64n128k16 (64)
#define WG_ACC16 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define WG_ACC32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, " \
    "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define WG_ACC40 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, " \
    "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39}"
#define WG_ACC64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, " \
    "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, " \
    "%40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, " \
    "%59, %60, %61, %62, %63}"
#define WG_OUT16(d) "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
#define WG_OUT32(d) "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), \
    "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), \
    "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), \
    "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define WG_OUT40(d) WG_OUT32(d), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), \
    "+f"(d[38]), "+f"(d[39])
#define WG_OUT64(d) "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), \
    "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), \
    "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), \
    "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), \
    "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), \
    "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), \
    "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), \
    "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
// Longer lists (the FP8 S accumulator of m64nNk32, N = 96 ... 256: N / 2 registers), built from decades: WG_DEC(t)
// is operands t0 ... t9 (t = 1 ... 12), WG_O8(d, i) the eight outputs d[i] ... d[i + 7]
#define WG_DEC(t) "%" #t "0, %" #t "1, %" #t "2, %" #t "3, %" #t "4, %" #t "5, %" #t "6, %" #t "7, %" #t "8, %" #t "9"
#define WG_R0_39 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, " WG_DEC(1) ", " WG_DEC(2) ", " WG_DEC(3)
#define WG_R0_79 WG_R0_39 ", " WG_DEC(4) ", " WG_DEC(5) ", " WG_DEC(6) ", " WG_DEC(7)
#define WG_ACC48 "{" WG_R0_39 ", %40, %41, %42, %43, %44, %45, %46, %47}"
#define WG_ACC80 "{" WG_R0_79 "}"
#define WG_ACC88 "{" WG_R0_79 ", %80, %81, %82, %83, %84, %85, %86, %87}"
#define WG_ACC96 "{" WG_R0_79 ", " WG_DEC(8) ", %90, %91, %92, %93, %94, %95}"
#define WG_ACC112 "{" WG_R0_79 ", " WG_DEC(8) ", " WG_DEC(9) ", " WG_DEC(10) ", %110, %111}"
#define WG_ACC128 "{" WG_R0_79 ", " WG_DEC(8) ", " WG_DEC(9) ", " WG_DEC(10) ", " WG_DEC(11) \
    ", %120, %121, %122, %123, %124, %125, %126, %127}"
#define WG_O8(d, i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
    "+f"(d[i + 6]), "+f"(d[i + 7])
#define WG_OUT48(d) WG_OUT40(d), WG_O8(d, 40)
#define WG_OUT80(d) WG_OUT64(d), WG_O8(d, 64), WG_O8(d, 72)
#define WG_OUT88(d) WG_OUT80(d), WG_O8(d, 80)
#define WG_OUT96(d) WG_OUT80(d), WG_O8(d, 80), WG_O8(d, 88)
#define WG_OUT112(d) WG_OUT96(d), WG_O8(d, 96), WG_O8(d, 104)
#define WG_OUT128(d) WG_OUT112(d), WG_O8(d, 112), WG_O8(d, 120)
// A in registers (RS): O += P V, V transposed (TB = 1); operands after the accumulators: a[4], desc, TB, ACC
#define WG_RS(N, ACC_LIST, OUTS, A0, A1, A2, A3, DS, TBI, ACCI, TYPES) \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" ACCI ", 0;\n" \
                 "wgmma.mma_async.sync.aligned.m64n" N "k16.f32." TYPES " " ACC_LIST ", {%" A0 ", %" A1 ", %" A2 \
                 ", %" A3 "}, %" DS ", p, 1, 1, %" TBI ";\n}\n" \
                 : OUTS(d) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(TB), "n"(ACC))
// A and B in shared memory (SS): K-major (TA = TB = 0: S = Q K^T) or MN-major (transposed, TA / TB = 1: the
// backward's dQ = dS K reads dS^T and K); operands after the accumulators: da, db, ACC, TA, TB
#define WG_SS(N, ACC_LIST, OUTS, DA, DB, ACCI, TAI, TBI, TYPES) \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" ACCI ", 0;\n" \
                 "wgmma.mma_async.sync.aligned.m64n" N "k16.f32." TYPES " " ACC_LIST ", %" DA ", %" DB \
                 ", p, 1, 1, %" TAI ", %" TBI ";\n}\n" \
                 : OUTS(d) : "l"(da), "l"(db), "n"(ACC), "n"(TA), "n"(TB))

// d (64 x N fp32) = A (64 x 16) * B (16 x N) + (ACC ? d : 0), N = 64 or 128 (ss also 80 and 176: rung 7's key tiles
// at d = 256 and d = 128 (FlashAttention-3's non-causal one), and 32: the d = 256 backward's S^T and dP^T slices)
template <typename T> struct Wgmma;
#define WGMMA_FOR(TY, TYPES) \
    template <> struct Wgmma<TY> { \
        template <int N, int TB, int ACC> static __device__ __forceinline__ void rs(float* d, const u32* a, unsigned long long desc) { \
            if constexpr (N == 128) WG_RS("128", WG_ACC64, WG_OUT64, "64", "65", "66", "67", "68", "69", "70", TYPES); \
            else WG_RS("64", WG_ACC32, WG_OUT32, "32", "33", "34", "35", "36", "37", "38", TYPES); \
        } \
        template <int N, int ACC, int TA = 0, int TB = 0> \
        static __device__ __forceinline__ void ss(float* d, unsigned long long da, unsigned long long db) { \
            if constexpr (N == 176) WG_SS("176", WG_ACC88, WG_OUT88, "88", "89", "90", "91", "92", TYPES); \
            else if constexpr (N == 128) WG_SS("128", WG_ACC64, WG_OUT64, "64", "65", "66", "67", "68", TYPES); \
            else if constexpr (N == 80) WG_SS("80", WG_ACC40, WG_OUT40, "40", "41", "42", "43", "44", TYPES); \
            else if constexpr (N == 64) WG_SS("64", WG_ACC32, WG_OUT32, "32", "33", "34", "35", "36", TYPES); \
            else WG_SS("32", WG_ACC16, WG_OUT16, "16", "17", "18", "19", "20", TYPES); \
        } \
    };
WGMMA_FOR(__half, "f16.f16")
WGMMA_FOR(__nv_bfloat16, "bf16.bf16")

// The FP8 forms (fa3_fp8.cu): m64nNk32 with e4m3 A and B and an fp32 accumulator. PTX allows 8-bit operands only
// K-major (no transpose flags: PTX ISA, "wgmma.mma_async", the imm-trans operands exist for .f16/.bf16 alone), so
// V reaches O += P V transposed, K-major along the keys. A in registers is 4 .b32 of 4 e4m3 each (rs), or both
// from shared memory (ss); operands after the accumulators as in WG_RS / WG_SS, without the transpose flags.
#define WG_RS8(N, ACC_LIST, OUTS, A0, A1, A2, A3, DS, ACCI) \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" ACCI ", 0;\n" \
                 "wgmma.mma_async.sync.aligned.m64n" N "k32.f32.e4m3.e4m3 " ACC_LIST ", {%" A0 ", %" A1 ", %" A2 \
                 ", %" A3 "}, %" DS ", p, 1, 1;\n}\n" \
                 : OUTS(d) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(ACC))
#define WG_SS8(N, ACC_LIST, OUTS, DA, DB, ACCI) \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" ACCI ", 0;\n" \
                 "wgmma.mma_async.sync.aligned.m64n" N "k32.f32.e4m3.e4m3 " ACC_LIST ", %" DA ", %" DB ", p, 1, 1;\n}\n" \
                 : OUTS(d) : "l"(da), "l"(db), "n"(ACC))
// d (64 x N fp32) = A (64 x 32 e4m3) * B (32 x N e4m3) + (ACC ? d : 0): rs N = 64 or 128 (O's columns), ss N a
// multiple of 32 from 32 to 256 (S's keys: fa3_fp8's Bc, or fewer on a trimmed last tile)
struct WgmmaE4m3 {
    template <int N, int ACC> static __device__ __forceinline__ void rs(float* d, const u32* a, unsigned long long desc) {
        static_assert(N == 64 || N == 128, "rs: m64n64 or m64n128");
        if constexpr (N == 128) WG_RS8("128", WG_ACC64, WG_OUT64, "64", "65", "66", "67", "68", "69");
        else WG_RS8("64", WG_ACC32, WG_OUT32, "32", "33", "34", "35", "36", "37");
    }
    template <int N, int ACC> static __device__ __forceinline__ void ss(float* d, unsigned long long da, unsigned long long db) {
        static_assert(N % 32 == 0 && N >= 32 && N <= 256, "ss: N a multiple of 32 from 32 to 256");
        if constexpr (N == 256) WG_SS8("256", WG_ACC128, WG_OUT128, "128", "129", "130");
        else if constexpr (N == 224) WG_SS8("224", WG_ACC112, WG_OUT112, "112", "113", "114");
        else if constexpr (N == 192) WG_SS8("192", WG_ACC96, WG_OUT96, "96", "97", "98");
        else if constexpr (N == 160) WG_SS8("160", WG_ACC80, WG_OUT80, "80", "81", "82");
        else if constexpr (N == 128) WG_SS8("128", WG_ACC64, WG_OUT64, "64", "65", "66");
        else if constexpr (N == 96) WG_SS8("96", WG_ACC48, WG_OUT48, "48", "49", "50");
        else if constexpr (N == 64) WG_SS8("64", WG_ACC32, WG_OUT32, "32", "33", "34");
        else WG_SS8("32", WG_ACC16, WG_OUT16, "16", "17", "18");
    }
};

// Byte offset of element (r, c) (c a multiple of 8: the start of a 16-byte chunk) in a tile of R rows stored in the
// 128-byte-swizzled layout: the tile is cut into blocks of 64 columns (128 bytes a row), each block R rows of 128
// bytes, and within every 8-row, 1024-byte atom, chunk c/8 of row r is stored at chunk position (c/8) ^ (r%8)
template <int R> __device__ __forceinline__ int sw128(int r, int c) {
    return (c >> 6) * (R * 128) + r * 128 + ((((c >> 3) & 7) ^ (r & 7)) << 4);
}


// a tile width as a type: a lambda's `auto width` argument makes its loops over the tile's keys compile-time
// (rung 7's and fa3_fp8's narrow last tiles)
template <int N> struct Width { static constexpr int value = N; };

// The online softmax of one warpgroup's S_j (the m64nBc accumulator: this thread holds rows g and g + 8 of its warp
// w's 16, keys 8n + 2t and 8n + 2t + 1) in base 2, with the mask of the ragged last tile and of the causal diagonal
// on the tiles that need one (j >= n_full): P_j (fp32) in place of S_j, m and l updated, alpha the factor for the
// old O. qg: the warpgroup's first query row; sl: the scale times log2(e). Rungs 6 and 7 share it.
// SHIFT (FP8 only): P is computed as P * 2^SHIFT (the row sum l too), which moves small probabilities out of e4m3's
// underflow range; the caller takes SHIFT * ln 2 off the lse. EMU (FP8 only): of each 16 exponentials a thread
// computes, EMU go to exp2_fma rather than MUFU. W (a narrowed or trimmed last tile): only the tile's first W keys,
// the others never reach P V (W a multiple of 16, at most Bc; FP8's a multiple of 32).
template <int Bc, bool CAUSAL, int SHIFT = 0, int EMU = 0, int W = Bc>
__device__ __forceinline__ void wg_softmax(float* s, float* m, float* l, float* alpha, int j, int n_full, int Nk,
                                           int qg, int w, int g, int t, float sl) {
    static_assert(W <= Bc && (W == Bc || W % 16 == 0), "W: the tile's first keys, a multiple of 16");
    fence_regs<W / 2>(s);
    const int kv0 = j * Bc;
    if (j >= n_full) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int lim = (CAUSAL ? min(Nk, qg + 16 * w + g + 8 * h + 1) : Nk) - kv0 - 2 * t;
#pragma unroll
            for (int n = 0; n < W / 8; n++) {
                if (n * 8 >= lim) s[4 * n + 2 * h] = NEG_INF;
                if (n * 8 + 1 >= lim) s[4 * n + 2 * h + 1] = NEG_INF;
            }
        }
    }
    float base[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        float mx = NEG_INF;
#pragma unroll
        for (int n = 0; n < W / 8; n++) mx = fmaxf(mx, fmaxf(s[4 * n + 2 * h], s[4 * n + 2 * h + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[h], mx * sl);
        base[h] = m_new == NEG_INF ? 0.f : m_new;  // no visible key yet: P = 0, alpha = 0, no NaN
        alpha[h] = fast_exp2(m[h] - base[h]);
        m[h] = m_new;
        l[h] *= alpha[h];
        if constexpr (SHIFT != 0) base[h] -= (float)SHIFT;
    }
#pragma unroll
    for (int i = 0; i < W / 2; i++) {
        const float x = fmaf(s[i], sl, -base[(i >> 1) & 1]);
        s[i] = i % 16 < EMU ? exp2_fma(x) : fast_exp2(x);
        l[(i >> 1) & 1] += s[i];
    }
}

// Once no wgmma is in flight: O rescaled by alpha, P rounded to T into the A fragments of the next P V (the C
// fragments of 8-key chunks 2kk and 2kk + 1 are the A fragment of 16-key step kk, as in rung 2).
// wg_pack: an m64nN accumulator (fp32) rounded to T as the A fragments of N/16 k16 steps (the backward packs P^T
// and dS^T so for dV += P^T dO, dK += dS^T Q).
template <typename T, int N>
__device__ __forceinline__ void wg_pack(u32 (*pa)[4], const float* s) {
#pragma unroll
    for (int n = 0; n < N / 8; n++) {
        pa[n / 2][2 * (n & 1)] = pack2<T>(s[4 * n], s[4 * n + 1]);
        pa[n / 2][2 * (n & 1) + 1] = pack2<T>(s[4 * n + 2], s[4 * n + 3]);
    }
}
template <typename T, int D, int Bc>
__device__ __forceinline__ void wg_rescale_and_pack(float* o, u32 (*pa)[4], const float* s, const float* alpha) {
#pragma unroll
    for (int i = 0; i < D / 2; i++) o[i] *= alpha[(i >> 1) & 1];
    wg_pack<T, Bc>(pa, s);
}
