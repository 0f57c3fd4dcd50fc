// fa2_fp32.cu: rung 1 of the CuPy ladder, FlashAttention-2 forward on CUDA cores in float32.
//
// The ladder (flashlib/cupy_kernels/__init__.py launches each rung; benchmarks/cupy_bench.py times them):
//   rung 1  fa2_fp32.cu   float32 on CUDA cores: one block per (Q tile, batch*head), online softmax in shared
//                         memory, deferred normalisation, lse written                          <- this file
//   rung 2  fa2_tc.cu     Tensor Cores: mma.sync m16n8k16 fp16/bf16, S/P/O in registers, ldmatrix   (TUNED=false)
//   rung 3  fa2_tc.cu     tuned: cp.async double buffering of K/V, exp2 with scale*log2(e) folded in,
//                         tile sizes per head dim                                                 (TUNED=true)
//   rung 4  fa2_tc.cu     the T4 (sm_75) path: two m16n8k8 per k16, plain loads                  (K8=true)
//   rung 5  fa2_bwd.cu    backward: D pre-pass, float32 CUDA-core backward (any input dtype), dQ post-pass
//           fa2_bwd_tc.cu backward on Tensor Cores (fp16/bf16), dK/dV per K/V tile, dQ by fp32 atomics
//
// Grouped-query attention: K and V are those of kv head bh / G.
// Grid (Tr = ceil(Nq/Br), B*H pairs over y and z: pair_index); block 256 threads; Br query rows, Bc <= 32 keys
// (host side, fp32_tiles: (32, 32) for d <= 64, (16, 32) to d = 128, (8, 16) to d = 256, so that the static shared
// memory stays under 48 KB).
// Shared memory: Qs (Br x d), Ks (Bc x d+1, padded so that a warp reading 32 key rows hits 32 banks), Vs (Bc x d),
//   S / P (Br x Bc+1), alpha (Br).
// Thread ownership: S entries e = tid, tid+256, ... (row e / Bc, key e % Bc); the softmax statistics m, l of row r
//   live in the registers of warp r / (Br/8) (every lane holds them; lane c < Bc holds key c); O row tid / TPR, columns tid % TPR + TPR*c
//   live in registers (TPR = 256/Br threads share a row).
// Causal (top-left, query i sees keys 0..i): tiles right of the diagonal are never loaded.
// A row that sees no key (Nk = 0) gets O = 0 and lse = -inf.
#include "flash_common.cuh"

__device__ __forceinline__ float warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}
__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

template <typename T, int D, int Br, int Bc, bool CAUSAL>
__global__ void __launch_bounds__(256, 1) fa2_fp32(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V,
                                                T* __restrict__ O, float* __restrict__ L, int Nq, int Nk, float scale,
                                                int BH, int G) {
    constexpr int NT = 256, RPW = Br / 8, TPR = NT / Br, OPT = D / TPR;
    static_assert(Br % 8 == 0 && Bc <= 32 && D % TPR == 0, "8 warps share the rows, a lane a key, TPR threads a row");
    __shared__ float Qs[Br][D], Ks[Bc][D + 1], Vs[Bc][D], S[Br][Bc + 1], alpha_s[Br], l_s[Br];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, q0 = blockIdx.x * Br;
    const u32 pair = pair_index();
    if (pair >= (u32)BH) return;
    const size_t bh = pair, bkv = pair / (u32)G;  // this block's (batch, head) pair, its kv pair
    Q += (bh * Nq + q0) * D; O += (bh * Nq + q0) * D; L += bh * Nq + q0;
    K += bkv * Nk * D; V += bkv * Nk * D;

    for (int idx = tid; idx < Br * D; idx += NT) {
        int r = idx / D, c = idx % D;
        Qs[r][c] = q0 + r < Nq ? to_f32(Q[r * D + c]) : 0.f;
    }
    float m[RPW], l[RPW], o[OPT];
    #pragma unroll
    for (int rr = 0; rr < RPW; rr++) m[rr] = NEG_INF, l[rr] = 0.f;
    #pragma unroll
    for (int c = 0; c < OPT; c++) o[c] = 0.f;
    const int orow = tid / TPR, ocol = tid % TPR;

    const int kv_end = CAUSAL ? min(Nk, q0 + Br) : Nk;  // keys this Q tile can see
    for (int kv0 = 0; kv0 < kv_end; kv0 += Bc) {
        __syncthreads();  // everyone is done with the previous K, V, P
        for (int idx = tid; idx < Bc * D; idx += NT) {
            int r = idx / D, c = idx % D;
            bool ok = kv0 + r < Nk;
            Ks[r][c] = ok ? to_f32(K[(size_t)(kv0 + r) * D + c]) : 0.f;
            Vs[r][c] = ok ? to_f32(V[(size_t)(kv0 + r) * D + c]) : 0.f;
        }
        __syncthreads();
        for (int e = tid; e < Br * Bc; e += NT) {  // S = scale * Q K^T, masked entries -inf
            int r = e / Bc, c = e % Bc;
            float s = 0.f;
#pragma unroll 16
            for (int d = 0; d < D; d++) s += Qs[r][d] * Ks[c][d];
            bool masked = kv0 + c >= Nk || (CAUSAL && kv0 + c > q0 + r);
            S[r][c] = masked ? NEG_INF : s * scale;
        }
        __syncthreads();
        #pragma unroll
        for (int rr = 0; rr < RPW; rr++) {  // online softmax: one warp per row, one key per lane
            int r = warp * RPW + rr;
            float s = lane < Bc ? S[r][lane] : NEG_INF;
            float m_new = fmaxf(m[rr], warp_max(s));
            float base = m_new == NEG_INF ? 0.f : m_new;  // a row with no visible key yet: keep P = 0
            float p = expf(s - base), alpha = expf(m[rr] - base);
            l[rr] = alpha * l[rr] + warp_sum(p);
            m[rr] = m_new;
            if (lane < Bc) S[r][lane] = p;
            if (lane == 0) alpha_s[r] = alpha;
        }
        __syncthreads();
        const float alpha = alpha_s[orow];  // O <- diag(alpha) O + P V (not yet divided by l)
        #pragma unroll
        for (int c = 0; c < OPT; c++) {
            float acc = 0.f;
#pragma unroll 8
            for (int j = 0; j < Bc; j++) acc += S[orow][j] * Vs[j][ocol + TPR * c];
            o[c] = alpha * o[c] + acc;
        }
    }
    #pragma unroll
    for (int rr = 0; rr < RPW; rr++) {
        int r = warp * RPW + rr;
        if (lane == 0) {
            l_s[r] = l[rr];
            if (q0 + r < Nq) L[r] = l[rr] > 0.f ? m[rr] + logf(l[rr]) : NEG_INF;  // lse = m + log(l), natural log
        }
    }
    __syncthreads();
    if (q0 + orow < Nq) {
        const float inv_l = l_s[orow] > 0.f ? 1.f / l_s[orow] : 0.f;  // deferred normalisation: divide once at the end
        #pragma unroll
        for (int c = 0; c < OPT; c++) O[orow * D + ocol + TPR * c] = from_f32<T>(o[c] * inv_l);
    }
}
