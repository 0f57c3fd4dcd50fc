// fa2_bwd.cu: rung 5 (part 1) of the CuPy ladder: the FlashAttention-2 backward pass (Dao 2023, Algorithm 2).
//
// Three kernels, launched in this order by flashlib/cupy_kernels/__init__.py:
//   bwd_dot_do_o<T, D>         pre-pass: Dlt_i = rowsum(dO_i * O_i) in fp32, the row of the fp32 dQ buffer set
//                              to zero (saves a memset), and the lse the kernels read, Lb_i = lse_i * lscale, or
//                              +inf where lse_i = -inf (a row that sees no key: then P = exp(S - Lb) = 0 and the row
//                              adds nothing to dQ, dK, dV). Dlt and Lb have Nqp >= Nq rows a pair: rows past Nq get
//                              0 and +inf (fa3_backward.cu copies whole tiles of them; lscale = log2(e) there, else
//                              Nqp = Nq, lscale = 1). Grid ceil(rows/8), block 256, a warp per row of Dlt. (D in
//                              the paper; renamed so as not to clash with the head dim.)
//   fa2_bwd_fp32<T, D, BT, CAUSAL> the backward on CUDA cores, fp32 arithmetic for any storage type T (float, __half,
//                              __nv_bfloat16): used for float32 and on sm_75; fa2_bwd_tc.cu is the Tensor Core one.
//   bwd_convert_dq<T>          post-pass: dQ (accumulated in fp32 with atomics) -> T.
//   bwd_sum_groups<T>          grouped-query attention: the dK (dV) of the G query heads that share a kv head,
//                              written per query head, summed in fp32 into that kv head's dK (dV).
//
// fa2_bwd_fp32: grid (Tc = ceil(Nk/Bc), B*H pairs over y and z: pair_index); block 256 threads; Br = Bc = BT (host
//   side, fp32_tiles: 32 for d <= 64, 16 to d = 128, 8 to d = 256: the static shared memory stays under 48 KB).
//   Grouped-query attention: K, V are read from kv head bh / G; dK, dV written per query head (bwd_sum_groups).
//   The block keeps its K_j, V_j tile in shared memory and dK_j, dV_j in registers (thread: key row tid / TPR,
//   columns tid % TPR + TPR*c) while it walks over the Q tiles i (causal: only those with a query >= its first key):
//   P = exp(scale Q_i K_j^T - lse_i), dV_j += P^T dO_i, dP = dO_i V_j^T, dS = P * (dP - Dlt_i),
//   dK_j += scale dS^T Q_i, and dQ_i += scale dS K_j with atomicAdd into an fp32 buffer (other blocks add to it too).
//   Shared memory: Ks, Vs, Qs, dOs (BT x d+1, padded rows), P and dS (BT x BT+1), lse_i, Dlt_i.
#include "flash_common.cuh"

template <typename T, int D>
__global__ void __launch_bounds__(256) bwd_dot_do_o(const T* __restrict__ dO, const T* __restrict__ O,
                                                    const float* __restrict__ L, float* __restrict__ Dlt,
                                                    float* __restrict__ Lb, float* __restrict__ dQacc, size_t rows,
                                                    int Nq, int Nqp, float lscale) {
    const size_t row = (size_t)blockIdx.x * 8 + (threadIdx.x >> 5);  // of Dlt and Lb: (pairs, Nqp)
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const size_t bh = row / (unsigned)Nqp, q = row - bh * Nqp;
    if (q >= (size_t)Nq) {  // padding: a row past Nq adds nothing
        if (lane == 0) {
            Dlt[row] = 0.f;
            Lb[row] = -NEG_INF;
        }
        return;
    }
    const size_t src = bh * Nq + q;  // of dO, O, L, dQacc
    float acc = 0.f;
    for (int c = lane; c < D; c += 32) {
        acc += to_f32(dO[src * D + c]) * to_f32(O[src * D + c]);
        dQacc[src * D + c] = 0.f;
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) {
        Dlt[row] = acc;
        Lb[row] = L[src] == NEG_INF ? -NEG_INF : L[src] * lscale;
    }
}

template <typename T>
__global__ void bwd_sum_groups(const T* __restrict__ in, T* __restrict__ out, int G, size_t per_head, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const T* src = in + (i / per_head) * G * per_head + i % per_head;  // query head g of kv head i / per_head
        float acc = 0.f;
        for (int g = 0; g < G; g++) acc += to_f32(src[g * per_head]);
        out[i] = from_f32<T>(acc);
    }
}

template <typename T>
__global__ void bwd_convert_dq(const float* __restrict__ dQacc, T* __restrict__ dQ, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dQ[i] = from_f32<T>(dQacc[i]);
}

template <typename T, int D, int BT, bool CAUSAL>
__global__ void __launch_bounds__(256, 1) fa2_bwd_fp32(const T* __restrict__ Q, const T* __restrict__ K,
        const T* __restrict__ V, const T* __restrict__ dO, const float* __restrict__ L, const float* __restrict__ Dlt,
        float* __restrict__ dQacc, T* __restrict__ dK, T* __restrict__ dV, int Nq, int Nk, float scale, int BH, int G) {
    constexpr int NT = 256, TPR = NT / BT, CPT = D / TPR;
    static_assert(D % TPR == 0 && BT <= 32, "TPR = 256 / BT threads share a row of d columns");
    __shared__ float Ks[BT][D + 1], Vs[BT][D + 1], Qs[BT][D + 1], dOs[BT][D + 1];
    __shared__ float P[BT][BT + 1], dS[BT][BT + 1], lse_s[BT], Dlt_s[BT];
    const int tid = threadIdx.x, kv0 = blockIdx.x * BT;
    const u32 pair = pair_index();
    if (pair >= (u32)BH) return;
    const size_t bh = pair, bkv = pair / (u32)G;  // this block's (batch, head) pair, its kv pair
    Q += bh * Nq * D; dO += bh * Nq * D; dQacc += bh * Nq * D; L += bh * Nq; Dlt += bh * Nq;
    K += bkv * Nk * D; V += bkv * Nk * D; dK += bh * Nk * D; dV += bh * Nk * D;

    for (int idx = tid; idx < BT * D; idx += NT) {
        int r = idx / D, c = idx % D;
        bool ok = kv0 + r < Nk;
        Ks[r][c] = ok ? to_f32(K[(size_t)(kv0 + r) * D + c]) : 0.f;
        Vs[r][c] = ok ? to_f32(V[(size_t)(kv0 + r) * D + c]) : 0.f;
    }
    const int row = tid / TPR, col = tid % TPR;  // this thread's row of dK/dV (and of the dQ update) and columns
    float dk[CPT], dv[CPT];
    #pragma unroll
    for (int c = 0; c < CPT; c++) dk[c] = dv[c] = 0.f;

    for (int q0 = CAUSAL ? (kv0 / BT) * BT : 0; q0 < Nq; q0 += BT) {
        __syncthreads();
        for (int idx = tid; idx < BT * D; idx += NT) {
            int r = idx / D, c = idx % D;
            bool ok = q0 + r < Nq;
            Qs[r][c] = ok ? to_f32(Q[(size_t)(q0 + r) * D + c]) : 0.f;
            dOs[r][c] = ok ? to_f32(dO[(size_t)(q0 + r) * D + c]) : 0.f;
        }
        if (tid < BT) {
            lse_s[tid] = q0 + tid < Nq ? L[q0 + tid] : 0.f;
            Dlt_s[tid] = q0 + tid < Nq ? Dlt[q0 + tid] : 0.f;
        }
        __syncthreads();
        for (int e = tid; e < BT * BT; e += NT) {  // P and dS for query r, key c
            int r = e / BT, c = e % BT;
            float s = 0.f, dp = 0.f;
#pragma unroll 8
            for (int d = 0; d < D; d++) s += Qs[r][d] * Ks[c][d], dp += dOs[r][d] * Vs[c][d];
            bool ok = q0 + r < Nq && kv0 + c < Nk && (!CAUSAL || kv0 + c <= q0 + r);
            float p = ok ? expf(s * scale - lse_s[r]) : 0.f;
            P[r][c] = p;
            dS[r][c] = p * (dp - Dlt_s[r]);
        }
        __syncthreads();
        #pragma unroll
        for (int c = 0; c < CPT; c++) {
            const int cc = col + TPR * c;
            float a = 0.f, b = 0.f, q = 0.f;
            for (int r = 0; r < BT; r++) {
                a += P[r][row] * dOs[r][cc];   // dV_j = P^T dO
                b += dS[r][row] * Qs[r][cc];   // dK_j = dS^T Q (scale applied at the end)
                q += dS[row][r] * Ks[r][cc];   // dQ_i = dS K, row `row` of the Q tile
            }
            dv[c] += a;
            dk[c] += b;
            if (q0 + row < Nq) atomicAdd(&dQacc[(size_t)(q0 + row) * D + cc], q * scale);
        }
    }
    if (kv0 + row < Nk) {
        #pragma unroll
        for (int c = 0; c < CPT; c++) {
            dK[(size_t)(kv0 + row) * D + col + TPR * c] = from_f32<T>(dk[c] * scale);
            dV[(size_t)(kv0 + row) * D + col + TPR * c] = from_f32<T>(dv[c]);
        }
    }
}
