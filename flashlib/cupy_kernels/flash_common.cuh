// flash_common.cuh: small device helpers shared by the flashlib CUDA C kernels.
//
// CuPy compiles with NVRTC, which has no <mma.h>, so the Tensor Core instructions are written as inline PTX:
//   mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32   (sm_80+)
//   mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32                  (sm_75+, the T4 path: two per k16)
//   ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16                  (sm_75+)
//   cp.async.cg.shared.global (16 bytes, zero-filled when out of range)  (sm_80+)
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), with g = lane / 4 and t = lane % 4:
//   A 16x16 (4 regs of 2 x 16 bit): a0 = (row g, k 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B 16x8  (2 regs):               b0 = (k 2t..2t+1, col g), b1 = (k 2t+8.., col g)
//   C 16x8  (4 fp32):               c0,c1 = (row g, cols 2t, 2t+1), c2,c3 = (row g+8, cols 2t, 2t+1)
// bf16 tensors travel from Python as 16-bit integers; kernels take them as __nv_bfloat16 (same bits).
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef unsigned int u32;
// The constants flashlib.constants holds for the Python side (tests/test_constants.py checks they agree):
#define NEG_INF __int_as_float(0xff800000)      // a masked score; the lse of a row that sees no key
static constexpr float LOG2E = 1.4426950408889634f;   // exp(x) = exp2(x * LOG2E): the folded softmax scale
static constexpr float LN2 = 0.6931471805599453f;     // lse = m * LN2 + log(l) for m kept in log2 units

// The (batch, query head) pair of this block. Pairs are spread over grid.y and grid.z (grid.y alone stops at
// 65535; the host's pair_grid), so a block past the last pair (BH) has nothing to do. Grouped-query attention:
// query head h of batch b uses kv head h / G of the H/G kv heads, which is kv pair bh / G (bh = b*H + h, H = G*H_kv).
// 32-bit arithmetic here (a 64-bit division costs registers the Tensor Core kernels do not have), 64-bit offsets.
// (Read with asm volatile: with plain blockIdx/gridDim reads here and in fa2_tc's epilogue, ptxas kept the value
// through the main loop and spilled a few bytes in rung 3 at d = 128; tests/test_cupy_kernels.py checks no spills.)
__device__ __forceinline__ u32 pair_index() {  // < 2**32
    u32 y, z, ny;
    asm volatile("mov.u32 %0, %%ctaid.y;\n\tmov.u32 %1, %%ctaid.z;\n\tmov.u32 %2, %%nctaid.y;" : "=r"(y), "=r"(z), "=r"(ny));
    return y + ny * z;
}

// ---- element conversions (float32 kernels are templated on the storage type too) ----
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// two floats -> one 32-bit register of two 16-bit values (lower half = a), the A/B fragment element pair
template <typename T> __device__ __forceinline__ u32 pack2(float a, float b);
template <> __device__ __forceinline__ u32 pack2<__half>(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<u32*>(&h);
}
template <> __device__ __forceinline__ u32 pack2<__nv_bfloat16>(float a, float b) {
    // written with scalar conversions so that it also compiles for sm_75 (never launched there)
    u32 lo = __bfloat16_as_ushort(__float2bfloat16_rn(a)), hi = __bfloat16_as_ushort(__float2bfloat16_rn(b));
    return lo | (hi << 16);
}

// ---- Tensor Core mma: D (16x8 fp32) += A (16x16) * B (16x8) ----
template <typename T, bool K8> struct Mma;
template <> struct Mma<__half, false> {
    static __device__ __forceinline__ void run(float* c, const u32* a, const u32* b) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};
template <> struct Mma<__nv_bfloat16, false> {
    static __device__ __forceinline__ void run(float* c, const u32* a, const u32* b) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};
// sm_75 (Turing): m16n8k8 only; a k16 step is two k8 steps: (a0, a1) x b0 then (a2, a3) x b1
template <> struct Mma<__half, true> {
    static __device__ __forceinline__ void run(float* c, const u32* a, const u32* b) {
        asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a[0]), "r"(a[1]), "r"(b[0]));
        asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a[2]), "r"(a[3]), "r"(b[1]));
    }
};

__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// four 8x8 16-bit matrices; lanes 8i..8i+7 give the row addresses of matrix i, register r[i] receives it
__device__ __forceinline__ void ldmatrix_x4(u32* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

// 16-byte global -> shared copy that bypasses registers (sm_80+); src_bytes = 0 writes zeros
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
#else
    *reinterpret_cast<uint4*>(dst) = src_bytes ? *reinterpret_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

__device__ __forceinline__ float fast_exp2(float x) {  // ex2.approx: one MUFU op; exp2(-inf) = 0
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
// 2^x on the FMA pipe instead of MUFU, for a share of a tile's exponentials (the method of FlashAttention-4's
// ex2_emulation, flash-attention's flash_attn/cute/utils.py, written for Blackwell): x = j + f with j = floor(x),
// found by adding 1.5 * 2^23 rounded down (j then sits in the low mantissa bits); 2^f on [0, 1) by a degree-3
// polynomial (relative error below 7.6e-5, fitted here); j added to the exponent field. x is clamped at -126: p(0)
// < 1 has exponent 126, so j = -127 would wrap into the sign bit (NaN); 2^-126 is as good as exp2(-inf) = 0 here.
__device__ __forceinline__ float exp2_fma(float x) {
    constexpr float MAGIC = 12582912.f;  // 1.5 * 2^23
    x = fmaxf(x, -126.f);
    const float j = __fadd_rd(x, MAGIC), f = x - (j - MAGIC);
    const float p = fmaf(fmaf(fmaf(0.07802355f, f, 0.22606662f), f, 0.69583482f), f, 0.99992496f);
    return __int_as_float(__float_as_int(p) + (__float_as_int(j) << 23));
}

// Copy a (rows x D) tile of 16-bit elements, row-major in global memory, into shared memory with row stride
// LD elements, 16 bytes per thread and step; rows >= n_valid are filled with zeros. ASYNC uses cp.async.
template <int D, int LD, bool ASYNC, typename T>
__device__ __forceinline__ void load_tile(T* sm, const T* gm, int rows, int n_valid, int tid, int nthreads) {
    constexpr int C = D / 8;  // 16-byte chunks per row
    for (int idx = tid; idx < rows * C; idx += nthreads) {
        int r = idx / C, c = (idx % C) * 8;
        bool ok = r < n_valid;
        const T* src = gm + (size_t)(ok ? r : 0) * D + c;
        if (ASYNC) {
            cp_async16(sm + r * LD + c, src, ok ? 16 : 0);
        } else {
            *reinterpret_cast<uint4*>(sm + r * LD + c) = ok ? *reinterpret_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0);
        }
    }
}

// ---- ldmatrix from a 32-bit shared-memory address (base + byte offset): unrolled loops then need one base register
// per operand and ptxas folds the constant offsets into the instructions' immediate field ----
__device__ __forceinline__ void ldmatrix_x4_a(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans_a(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
// x, unchanged, but opaque to the compiler: values computed from it inside a loop are not hoisted out of the loop
// (hoisting 16 loop-invariant ldmatrix addresses would cost 16 registers each thread)
__device__ __forceinline__ u32 opaque(u32 x) {
    asm volatile("" : "+r"(x));
    return x;
}

// 4-byte global -> shared copy (cp.async.ca: only .ca takes 4 and 8 bytes); src_bytes = 0 writes a zero
__device__ __forceinline__ void cp_async4(void* dst, const void* src, int src_bytes) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
#else
    *reinterpret_cast<float*>(dst) = src_bytes ? *reinterpret_cast<const float*>(src) : 0.f;
#endif
}

// p[0] += a, p[1] += b in global memory (p 8-byte aligned): one vector reduction on sm_90 (red.global.add.v2.f32),
// two atomicAdd before
__device__ __forceinline__ void atomic_add_f32x2(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}
