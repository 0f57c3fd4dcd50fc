// fp8_quant.cu: the FP8 forward's host-side preparation (fp8.py's `quantize`) fused into two passes over 16-bit
// Q, K, V (fp16 or bf16; cvt to e4m3 needs sm_89+).
//
//   fp8_amax<T, D>    pass 1: amax per (batch, head) of |x|, or of |x M| for Q and K with the rotation (had != 0)
//   fp8_quant<T, D>   pass 2: the same rotation again, x / scale rounded to e4m3; Q, K row-major, V as V^T
//
// blockIdx.y picks the tensor (0 Q, 1 K, 2 V); blockIdx.x = pair * chunks + chunk over that tensor's (batch, head)
// pairs (blocks past the last one return). 256 threads a block.
//  * Rows (Q, K; and V in pass 1): D / 8 lanes a row, 8 elements (one 16-byte load) a lane, element 8 lr + j in
//    lane lr of the row's group; a chunk is 4 steps of 2048 / D rows (16 KB of input a block).
//  * The rotation M = diag(s) H / sqrt(d) (fp8.random_hadamard; s = the signs, a float array of +-1): x M is
//    (x * s) H / sqrt(d), H the Sylvester Hadamard matrix, computed as the fast Walsh-Hadamard transform, d log d
//    adds a row: butterflies (a, b) -> (a + b, a - b) over the three element bits in registers, then over the lane
//    bits by __shfl_xor_sync; then times 1/sqrt(d) (the float32 of it, as M's entries). It differs from fp8.py's
//    float32 matmul only in rounding (summation order), so pass 1 and pass 2 compute the same values by the same
//    code and the amax is of exactly what pass 2 quantises.
//  * amax: the float bits of |x| (non-negative floats order as unsigned ints, and a NaN stays the largest), a warp's
//    max by __reduce_max_sync, the block's through shared memory, one atomicMax a block into `amax` (u32, zeroed by
//    the host: Q's B*H, then K's and V's B*H_kv).
//  * scale = amax * float32(1 / 448) (1 where amax is 0: fp8.e4m3_scale's rule, E4M3_MAX = 448), written by each
//    pair's first block to `descale` (same layout as amax); values are x / scale (IEEE division, as torch's), so
//    that without the rotation every byte equals torch's (a scale one ulp off flips the e4m3 rounding of the values
//    that land on a tie: with 16-bit inputs and amax / 448 they do, 0.4 % of them in one head seen), converted by
//    cvt.rn.satfinite.e4m3x2.f32 (round to nearest even, saturating to +-448 = torch's clamp, then cast).
//  * V^T (pass 2, y = 2): a block takes 128 keys x D of one pair and writes V^T's (D, Nk32) rows (fp8.transpose_v's
//    layout: Nk32 = Nk rounded up to 32, zero keys past Nk, column 32 c + p holds key 32 c + perm[p] with
//    fp8.key_permutation's perm). A work item is one column quad (4 columns = one u32 of the output row) times 8
//    dims: column 4 qi + b of the tile holds key base + (0, 1, 8, 9)[b], base = 32 (qi / 8) + 16 ((qi / 4) & 1) +
//    2 (qi & 3) (perm's formula read backwards), so a thread loads those 4 keys' 16 bytes each (a warp's loads
//    cover whole rows), packs each dim's 4 bytes into one word and stores it to a shared tile [D][32 quads + 1];
//    the block then writes each V^T row segment as 128 contiguous bytes (a warp, 4 bytes a lane).
// Measured on the H200 (record fp8_quant_h200, benchmarks/fp8_bench.py --quant at d4cf313, float16, H = 16,
//   B = 16384 / N; both passes, V^T included): d = 128 0.19 ms with the rotation, 0.14 ms without (about 2.6 and
//   3.6 TB/s of Q, K, V read twice and e4m3 written once), against torch's 2.52 and 1.98 ms; d = 64 0.096 and
//   0.076 ms against 1.80 and 1.11 ms. The rotation's cost is the warp shuffles (4 a value at d = 128, pass 1 and 2);
//   a transpose through shared memory, or one pass that keeps a head's rows on chip, is not tried.
// Arguments: q, k, v (16-bit, contiguous), signs (D floats +-1), amax (u32), [descale (float32), q8, k8, vt8 (e4m3
//   bytes)], Nq, Nk, BH, BHkv, had.
#include "flash_common.cuh"

typedef unsigned char u8;

constexpr int QT = 256;                  // threads a block
constexpr float E4M3_MAX = 448.0f;       // fp8.E4M3_MAX

// two 16-bit values of a 32-bit word as floats (lower half first)
template <typename T> __device__ __forceinline__ float2 unpack2(u32 w);
template <> __device__ __forceinline__ float2 unpack2<__half>(u32 w) {
    return __half22float2(*reinterpret_cast<__half2*>(&w));
}
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(u32 w) {
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}
// 8 consecutive 16-bit values at p (16-byte aligned) as floats; zeros when !ok
template <typename T> __device__ __forceinline__ void load8(float* x, const T* p, bool ok) {
    uint4 u = ok ? __ldg(reinterpret_cast<const uint4*>(p)) : make_uint4(0, 0, 0, 0);
    const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const float2 f = unpack2<T>(w[i]);
        x[2 * i] = f.x;
        x[2 * i + 1] = f.y;
    }
}

// two floats -> two e4m3 bytes (lo in the lower byte), as fa3_fp8.cu's pack4_e4m3
__device__ __forceinline__ u32 e4m3x2(float lo, float hi) {
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
}

// x (8 elements of a row held by lane lr of its D / 8 lanes) := (x * s) H / sqrt(D)
template <int D> __device__ __forceinline__ void fwht(float* x, const float* s) {
    constexpr float RS = D == 64 ? 0.125f : D == 128 ? 0.08838834764831845f : 0.0625f;  // float32(1 / sqrt(D))
    static_assert(D == 64 || D == 128 || D == 256, "D = 64, 128 or 256");
#pragma unroll
    for (int j = 0; j < 8; j++) x[j] *= s[j];
#pragma unroll
    for (int h = 1; h < 8; h <<= 1)
#pragma unroll
        for (int j = 0; j < 8; j++)
            if (!(j & h)) {
                const float a = x[j], b = x[j + h];
                x[j] = a + b;
                x[j + h] = a - b;
            }
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int m = 1; m < D / 8; m <<= 1) {
        const bool hi = lane & m;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const float o = __shfl_xor_sync(0xffffffffu, x[j], m);
            x[j] = hi ? o - x[j] : x[j] + o;
        }
    }
#pragma unroll
    for (int j = 0; j < 8; j++) x[j] *= RS;
}

// the tensor of this block: its input, rows, pairs, and offset in amax / descale
template <typename T> struct Part {
    const T* x;
    int N, pairs, off;
};
template <typename T>
__device__ __forceinline__ Part<T> part(int t, const T* q, const T* k, const T* v, int Nq, int Nk, int BH, int BHkv) {
    if (t == 0) return {q, Nq, BH, 0};
    return {t == 1 ? k : v, Nk, BHkv, t == 1 ? BH : BH + BHkv};
}

// rows of a chunk: U steps of RS rows, L lanes a row
template <int D> struct Rows {
    static constexpr int L = D / 8, RS = QT / L, U = 4, R = RS * U;
};

// this thread's U x 8 values of the chunk (rotated when rot), rows past N zero
template <typename T, int D>
__device__ __forceinline__ void load_rows(float (*x)[8], const T* base, int N, int r0, bool rot, const float* sgn) {
    using G = Rows<D>;
    const int lr = threadIdx.x % G::L, rr = threadIdx.x / G::L;
#pragma unroll
    for (int u = 0; u < G::U; u++) {
        const int r = r0 + u * G::RS + rr;
        load8<T>(x[u], base + (size_t)r * D + 8 * lr, r < N);
    }
    if (rot) {
        float s[8];
        const float4 s0 = __ldg(reinterpret_cast<const float4*>(sgn + 8 * lr));
        const float4 s1 = __ldg(reinterpret_cast<const float4*>(sgn + 8 * lr + 4));
        s[0] = s0.x, s[1] = s0.y, s[2] = s0.z, s[3] = s0.w, s[4] = s1.x, s[5] = s1.y, s[6] = s1.z, s[7] = s1.w;
#pragma unroll
        for (int u = 0; u < G::U; u++) fwht<D>(x[u], s);
    }
}

template <typename T, int D>
__global__ void __launch_bounds__(QT) fp8_amax(const T* __restrict__ q, const T* __restrict__ k,
                                               const T* __restrict__ v, const float* __restrict__ sgn,
                                               u32* __restrict__ amax, int Nq, int Nk, int BH, int BHkv, int had) {
    using G = Rows<D>;
    const Part<T> p = part<T>(blockIdx.y, q, k, v, Nq, Nk, BH, BHkv);
    const int chunks = (p.N + G::R - 1) / G::R;
    if ((int)blockIdx.x >= p.pairs * chunks) return;
    const int pair = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
    float x[G::U][8];
    load_rows<T, D>(x, p.x + (size_t)pair * p.N * D, p.N, chunk * G::R, had && blockIdx.y < 2, sgn);
    u32 m = 0;
#pragma unroll
    for (int u = 0; u < G::U; u++)
#pragma unroll
        for (int j = 0; j < 8; j++) m = max(m, __float_as_uint(fabsf(x[u][j])));
    m = __reduce_max_sync(0xffffffffu, m);
    __shared__ u32 warp_max[QT / 32];
    if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x / 32] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
#pragma unroll
        for (int w = 1; w < QT / 32; w++) m = max(m, warp_max[w]);
        atomicMax(amax + p.off + pair, m);
    }
}

// scale of a pair (quantize_e4m3's rule), written once to descale
__device__ __forceinline__ float pair_scale(const u32* amax, float* descale, int i, bool first) {
    const float a = __uint_as_float(amax[i]);
    const float s = a > 0.f ? a * (1.f / E4M3_MAX) : 1.f;
    if (first && threadIdx.x == 0) descale[i] = s;
    return s;
}

// Q or K: a chunk of rows, rotated, quantised, stored row-major (8 bytes a lane)
template <typename T, int D>
__device__ __forceinline__ void quant_rows(const Part<T>& p, const float* sgn, float sc, u8* out, int pair, int chunk,
                                           bool rot) {
    using G = Rows<D>;
    float x[G::U][8];
    load_rows<T, D>(x, p.x + (size_t)pair * p.N * D, p.N, chunk * G::R, rot, sgn);
    const int lr = threadIdx.x % G::L, rr = threadIdx.x / G::L;
#pragma unroll
    for (int u = 0; u < G::U; u++) {
        const int r = chunk * G::R + u * G::RS + rr;
        float y[8];
#pragma unroll
        for (int j = 0; j < 8; j++) y[j] = __fdiv_rn(x[u][j], sc);
        const uint2 w = make_uint2(e4m3x2(y[0], y[1]) | e4m3x2(y[2], y[3]) << 16,
                                   e4m3x2(y[4], y[5]) | e4m3x2(y[6], y[7]) << 16);
        if (r < p.N) *reinterpret_cast<uint2*>(out + ((size_t)pair * p.N + r) * D + 8 * lr) = w;
    }
}

constexpr int VT_KEYS = 128;   // keys of a V^T tile: 32 column quads
// V: 128 keys of a pair, quantised, transposed through shared memory, keys permuted in 32s (header)
template <typename T, int D>
__device__ __forceinline__ void quant_vt(const T* v, int Nk, float sc, u8* vt8, int pair, int tile) {
    constexpr int DG = D / 8, W = VT_KEYS / 4 + 1;          // dim groups; words a shared row (+1: banks)
    __shared__ u32 tl[D * W];
    const int n32 = (Nk + 31) / 32 * 32;
    const T* src = v + (size_t)pair * Nk * D;
#pragma unroll
    for (int it = 0; it < VT_KEYS / 4 * DG / QT; it++) {
        const int item = it * QT + threadIdx.x, dg = item % DG, qi = item / DG;
        const int base = tile * VT_KEYS + 32 * (qi / 8) + 16 * ((qi / 4) & 1) + 2 * (qi & 3);
        float x[4][8];
#pragma unroll
        for (int b = 0; b < 4; b++) {
            const int key = base + (b & 1) + 8 * (b >> 1);
            load8<T>(x[b], src + (size_t)key * D + 8 * dg, key < Nk);
        }
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const float y0 = __fdiv_rn(x[0][j], sc), y1 = __fdiv_rn(x[1][j], sc);
            const float y2 = __fdiv_rn(x[2][j], sc), y3 = __fdiv_rn(x[3][j], sc);
            tl[(8 * dg + j) * W + qi] = e4m3x2(y0, y1) | e4m3x2(y2, y3) << 16;
        }
    }
    __syncthreads();
    const int lane = threadIdx.x & 31, col = tile * VT_KEYS + 4 * lane;
    if (col >= n32) return;
    for (int dim = threadIdx.x / 32; dim < D; dim += QT / 32)
        *reinterpret_cast<u32*>(vt8 + ((size_t)pair * D + dim) * n32 + col) = tl[dim * W + lane];
}

template <typename T, int D>
__global__ void __launch_bounds__(QT) fp8_quant(const T* __restrict__ q, const T* __restrict__ k,
                                                const T* __restrict__ v, const float* __restrict__ sgn,
                                                const u32* __restrict__ amax, float* __restrict__ descale,
                                                u8* __restrict__ q8, u8* __restrict__ k8, u8* __restrict__ vt8,
                                                int Nq, int Nk, int BH, int BHkv, int had) {
    static_assert(VT_KEYS / 4 * (D / 8) % QT == 0, "whole work items a thread");
    const int t = blockIdx.y;
    const Part<T> p = part<T>(t, q, k, v, Nq, Nk, BH, BHkv);
    const int chunks = t < 2 ? (p.N + Rows<D>::R - 1) / Rows<D>::R : (p.N + VT_KEYS - 1) / VT_KEYS;
    if ((int)blockIdx.x >= p.pairs * chunks) return;
    const int pair = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
    const float sc = pair_scale(amax, descale, p.off + pair, chunk == 0);
    if (t < 2)
        quant_rows<T, D>(p, sgn, sc, t == 0 ? q8 : k8, pair, chunk, had != 0);
    else
        quant_vt<T, D>(v, Nk, sc, vt8, pair, chunk);
}
