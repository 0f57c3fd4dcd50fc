// The micro-benchmarks' kernels (flashlib.bench.micro loads this file with cupy.RawModule).
// Every kernel: 1-D grid and block. Nothing lives in registers beyond a few scalars per thread unless said.
extern "C" {

// vector_add: thread i owns element i (grid covers n): c[i] = a[i] + b[i].
__global__ void vector_add(const float* a, const float* b, float* c, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) c[i] = a[i] + b[i];
}

// empty: does nothing; launching it measures the cost of a launch alone.
__global__ void empty() {}

// copy_f4: grid-stride loop; each thread moves 16 bytes (a float4) per step, neighbours move neighbours
// (coalesced: a warp touches 512 contiguous bytes).
__global__ void copy_f4(const float4* __restrict__ src, float4* __restrict__ dst, long long n4) {
    long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n4; i += step)
        dst[i] = src[i];
}

// strided_read: thread i reads src[i * stride] and writes dst[i]. stride 1: a warp reads 128 contiguous
// bytes; stride >= 8 floats: every 4-byte read pulls its own 32-byte sector from memory.
__global__ void strided_read(const float* __restrict__ src, float* __restrict__ dst, long long n, int stride) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i < n) dst[i] = src[i * stride];
}

// smem_read: shared memory has 32 banks of 4-byte words. Lane l of a warp reads s[l * stride + j]:
// stride 1 -> 32 different banks (one pass); stride 2 -> 2 lanes per bank; stride 32 -> all 32 lanes in one
// bank (32 passes). Shared: 2048 floats (8 KB). Registers: two accumulators. `volatile` keeps every load.
__global__ void smem_read(float* out, int stride, int reps) {
    __shared__ float s[2048];
    for (int i = threadIdx.x; i < 2048; i += blockDim.x) s[i] = (float)i;
    __syncthreads();
    const volatile float* p = s + (threadIdx.x % 32) * stride;   // at most 31 * 32 = 992
    float acc0 = 0.f, acc1 = 0.f;
    for (int r = 0; r < reps; ++r) {
        #pragma unroll
        for (int j = 0; j < 64; j += 2) { acc0 += p[j]; acc1 += p[j + 1]; }
    }
    out[blockIdx.x * blockDim.x + threadIdx.x] = acc0 + acc1;
}

// read_l2: every thread makes `loads` float4 loads at (start + k * step) & mask, i.e. it sweeps a buffer of
// mask + 1 float4s (a power of two) again and again. __ldcg caches in L2 only (not L1), so a buffer that fits
// in L2 is served from L2 and a larger one from device memory: the "L2 cliff".
__global__ void read_l2(const float4* __restrict__ src, float* out, long long mask, int loads) {
    long long start = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    long long step = (long long)gridDim.x * blockDim.x;
    float acc = 0.f;
    #pragma unroll 8
    for (int k = 0; k < loads; ++k) {
        float4 v = __ldcg(src + ((start + k * step) & mask));
        acc += v.x + v.y + v.z + v.w;
    }
    out[start] = acc;
}

// fma_loop: each thread runs 8 independent chains a_k = a_k * b + c (one FFMA = 2 FLOPs), `iters` times;
// 8 chains hide the FMA latency, so the SM's FP32 units, not dependencies, set the pace.
__global__ void fma_loop(float* out, float b, float c, int iters) {
    float a0 = threadIdx.x, a1 = a0 + 1.f, a2 = a0 + 2.f, a3 = a0 + 3.f,
          a4 = a0 + 4.f, a5 = a0 + 5.f, a6 = a0 + 6.f, a7 = a0 + 7.f;
    for (int i = 0; i < iters; ++i) {
        #pragma unroll
        for (int u = 0; u < 16; ++u) {
            a0 = fmaf(a0, b, c); a1 = fmaf(a1, b, c); a2 = fmaf(a2, b, c); a3 = fmaf(a3, b, c);
            a4 = fmaf(a4, b, c); a5 = fmaf(a5, b, c); a6 = fmaf(a6, b, c); a7 = fmaf(a7, b, c);
        }
    }
    out[blockIdx.x * blockDim.x + threadIdx.x] = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7;
}

// smid_timeline: one record per block: the SM it ran on (%smid) and when it started and ended
// (%globaltimer, nanoseconds). All threads spin until spin_ns has passed, so a block is long enough to see.
__global__ void smid_timeline(unsigned long long* rec, unsigned long long spin_ns) {
    __shared__ unsigned long long t0;
    unsigned int smid;
    unsigned long long t;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    if (threadIdx.x == 0) asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    __syncthreads();
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < spin_ns);
    __syncthreads();
    if (threadIdx.x == 0) {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        rec[3 * blockIdx.x] = smid; rec[3 * blockIdx.x + 1] = t0; rec[3 * blockIdx.x + 2] = t;
    }
}
}
