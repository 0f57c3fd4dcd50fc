"""FlashAttention-2 forward on Hopper's warpgroup MMA, in Numba: the CuPy rung 6 (flashlib/cupy_kernels/fa2_wgmma.cu)
written in Python. fp16 / bf16 in, fp32 accumulation; sm_90 only (the PTX target sm_90a: wgmma.py).

Algorithm: FlashAttention-2's forward (Dao 2023, Algorithm 1), split-Q, online softmax in registers, K/V tiles
double-buffered by cp.async; both products are wgmma.mma_async (wgmma.py): one instruction multiplies a 64 x 16 A by
a 16 x N B for a warpgroup (4 warps), with B read by the Tensor Cores straight from shared memory.
Grid (Tr = ceil(Nq / Br), B*H pairs over y and z: host.pair_grid); block NWG warpgroups (128 NWG threads), each owns
64 query rows: Br = 64 NWG. Grouped-query attention: K and V of kv pair bh // G.
Arrays: q, k, v, o (B*H*N, d/2) uint32 views of the 16-bit data (row b*H*N + h*N + n), lse (B*H, Nq) float32 (as
fa2_tc: the host side is fa2_tc.run).
Shared memory (dynamic, the base aligned here to 1024 bytes, the period of the swizzle): Q (Br x D), then 2 stages of
K (Bc x D) and 2 of V, each in the 128-byte-swizzled layout wgmma reads (sw128 below: rows of 128 bytes, 64 columns;
D = 128 is two blocks of 64 columns; the 16-byte chunks of each row permuted by XOR with row % 8: wgmma.sw128).
Operands (PTX ISA 9.7.15, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"):
  S = Q K^T   A = Q in registers (loaded once by ldmatrix into mma.m16n8k16's A layout, warp w: rows 16w..16w+15),
              B = K by descriptor, K-major (d contiguous), one m64n{Bc}k16 per 16 columns of d;
  O += P V    A = P in registers: wgmma's accumulator layout is mma's C layout over N/8 chunks, so P is packed from
              S's registers as in fa2_tc (lanes.a_from_c); B = V by descriptor, MN-major (trans-b = 1).
Registers of one thread (warp w, g = lane // 4, t = lane % 4; rows 16w + g and + 8 of its warpgroup's 64):
  qf[4 D/16] Q's A fragments; s[Bc/2] S, then P (s[4n + i]: C register i of keys 8n..8n+7); pa[4 Bc/16] P in 16
  bits; o[D/2] the unnormalised O rows; m, l [2] running max (base 2, units of S * scale * log2 e) and row sums.
Pipeline (as rung 6, FlashAttention-3's intra-warpgroup overlap): step j issues S_j = Q K_j^T and behind it
O += P_{j-1} V_{j-1}; the softmax of S_j runs on the CUDA cores while the Tensor Cores still work on P_{j-1} V_{j-1}.
Loads run a step ahead: step j brings K_{j+1} and V_j. The first step (no P V) and the last (no S) are peeled off.
"""
import functools
import inspect
import math

from numba import cuda, float32, int32, uint32

from ..env import simulated
from ..cupy_kernels.config_hopper import WGMMA_TILES, smem_wgmma
from . import fa2_tc, host, mma, wgmma
from .host import LN2, NEG_INF, kv_groups, pair_grid, scale_of
from .warp import FULL, online_softmax_step
from .wgmma import sw128

CC = (9, 0, "a")                     # the target: wgmma exists in sm_90a code only
HEAD_DIMS = (64, 128)
DTYPES = ("float16", "bfloat16")
# per head dim, (non-causal, causal) tiles (NWG warpgroups, Bc keys per tile): one warpgroup of 64 rows, 64 keys a
# tile, two blocks an SM. The H200 timed it fastest of the four it ran at every shape (fp16, d = 64 and 128, N = 4096
# and 16384, causal or not): 1.16-1.27x rung 6 (record numba_wgmma_h200_first_run, commit 5a14865; there the default
# was rung 6's own winners, config_hopper.WGMMA_TILES: (2, 64) at d = 64 and (2, 128) at d = 128, 0.90-1.18x).
# tests/test_tuning_records.py checks this table against the record.
TILES = {64: ((1, 64), (1, 64)), 128: ((1, 64), (1, 64))}
RUNG6_TILES = WGMMA_TILES
SIG = fa2_tc.SIG                     # the same arguments as fa2_tc's kernel


def smem_bytes(D, NWG, Bc):
    """Dynamic shared memory: Q (64 NWG rows), 2 stages of K and of V (Bc rows), rows of D 16-bit values, and 1 KB
    of slack to align the base to 1024 bytes: rung 6's layout, so rung 6's formula."""
    return smem_wgmma(D, NWG, Bc)


@functools.lru_cache(maxsize=1)
def numba_targets_sm90a():
    """True when this numba-cuda compiles for architecture-specific targets such as sm_90a (its get_arch_option takes
    the suffix: NVIDIA/numba-cuda PR #549; 0.30.4 does). Without them no wgmma can be compiled."""
    try:
        from numba.cuda.cudadrv import nvrtc
        return "arch" in inspect.signature(nvrtc.get_arch_option).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return False


def launch_bounds(NWG):
    """(threads, blocks per SM) for ptxas, as rung 6: two blocks an SM with one warpgroup, else one."""
    return 128 * NWG, 2 if NWG == 1 else 1


def check(d, dtype, cc=None):
    """Raise ValueError for what this kernel cannot do (d: the compiled head dim)."""
    if dtype not in DTYPES:
        raise ValueError(f"the numba wgmma kernel takes dtype float16 or bfloat16, got {dtype!r}")
    if d not in HEAD_DIMS:
        raise ValueError(f"the numba wgmma kernel takes head dims in {HEAD_DIMS} (after padding), got {d}")
    if cc is not None and tuple(cc[:2]) != (9, 0):
        raise ValueError(f"the numba wgmma kernel needs a Hopper GPU (compute capability 9.0: wgmma exists in sm_90a "
                         f"code only), got {tuple(cc[:2])}; variant 'tc' runs on sm_75 and newer")


def make_loader(D, R, NT):
    """load(sbase, gbase, n_valid, tid): an R x D tile, row-major at global byte address gbase, by cp.async into the
    swizzled tile at .shared address sbase; rows >= n_valid zero-filled (16 bytes a copy, 8 threads a 128-byte
    line: whole cache lines from L2)."""
    C = D // 8                                       # 16-byte chunks per row
    IT = R * C // NT

    @cuda.jit(device=True, inline="always")
    def load(sbase, gbase, n_valid, tid):
        for it in range(IT):
            i = tid + NT * it
            r, c = i // C, (i % C) * 8
            ok = r < n_valid
            mma.cp_async16_at(sbase + sw128(r, c, R), gbase + (2 * (r * D + c) if ok else 0), 16 if ok else 0)
    return load


def make_softmax(Bc, NS):
    """softmax(s, m, l, alpha, kv0, masked, causal, Nk, row0, t, sl): P_j in place of S_j (base 2), m and l
    updated, alpha the factor for the old O; the mask of the ragged last tile and of the causal diagonal on the tiles
    that need one (masked). row0: the thread's first row (the second is row0 + 8); sl: the scale times log2(e)."""
    @cuda.jit(device=True, inline="always")
    def softmax(s, m, l, alpha, kv0, masked, causal, Nk, row0, t, sl):
        if masked:
            for h in range(2):
                lim = (min(Nk, row0 + 8 * h + 1) if causal else Nk) - kv0 - 2 * t
                for n in range(Bc // 8):
                    if n * 8 >= lim:
                        s[4 * n + 2 * h] = NEG_INF
                    if n * 8 + 1 >= lim:
                        s[4 * n + 2 * h + 1] = NEG_INF
        base = cuda.local.array(2, float32)
        mx = cuda.local.array(2, float32)
        for h in range(2):
            mx[h] = NEG_INF
            for n in range(Bc // 8):
                mx[h] = max(mx[h], max(s[4 * n + 2 * h], s[4 * n + 2 * h + 1]))
            alpha[h] = online_softmax_step(m, l, base, mx, h, sl)    # over the quad; base 0 while m = -inf
        for i in range(NS):
            p = mma.exp2_approx(s[i] * sl - base[(i >> 1) & 1])
            s[i] = p
            l[(i >> 1) & 1] += p
    return softmax


@functools.lru_cache(maxsize=None)
def make_fa2_wgmma(D, NWG, Bc, dtype):
    """(kernel, threads per block, Br, dynamic shared bytes) for head dim D (64 or 128), NWG (1 or 2) warpgroups of
    64 query rows, Bc (64 or 128) keys per K/V tile."""
    if D not in HEAD_DIMS or Bc not in (64, 128) or NWG not in (1, 2) or dtype not in DTYPES:
        raise ValueError(f"make_fa2_wgmma(D={D}, NWG={NWG}, Bc={Bc}, {dtype!r}): D and Bc 64 or 128, NWG 1 or 2")
    Br, NT = 64 * NWG, 128 * NWG
    QB, TILE = Br * D * 2, Bc * D * 2                # bytes of the Q tile, of one K or V stage
    NS, NO, KD, KB = Bc // 2, D // 2, D // 16, Bc // 16
    NQF, NPA = 4 * KD, 4 * KB                       # registers of Q's and of P's A fragments
    MMA_S, MMA_O = wgmma.mma_rs(Bc, dtype), wgmma.mma_rs(D, dtype)
    pack = mma.pack_bf16x2 if dtype == "bfloat16" else mma.pack_f16x2
    load_q, load_kv = make_loader(D, Br, NT), make_loader(D, Bc, NT)
    softmax = make_softmax(Bc, NS)

    @cuda.jit(device=True, inline="always")
    def begin_step(j, n_tiles, ks, vs, gk, gv, Nk, tid):
        """Tile j's K (loaded at step j-1) and V_{j-1} have landed and are visible to wgmma, every warpgroup is done
        with the stages the next loads overwrite; then K_{j+1} and V_j are started."""
        mma.cp_async_wait(0)
        wgmma.fence_proxy_async()                    # the cp.async writes (generic proxy) before wgmma's reads
        cuda.syncthreads()
        if j < n_tiles:
            if j + 1 < n_tiles:
                load_kv(ks + ((j + 1) & 1) * TILE, gk + (j + 1) * TILE, Nk - (j + 1) * Bc, tid)
            load_kv(vs + (j & 1) * TILE, gv + j * TILE, Nk - j * Bc, tid)
            mma.cp_async_commit()

    @cuda.jit(device=True, inline="always")
    def issue_s(s, qf, kst):
        """S = Q K_j^T: one m64n{Bc}k16 per 16 columns kk of d, starting 32 bytes further in the 128-byte row (kk % 4)
        of 64-column block kk // 4; SBO = 1024 (the next 8 keys), LBO unused for K-major swizzled tiles."""
        for kk in range(KD):
            desc = wgmma.desc_sw128(kst + (kk >> 2) * (Bc * 128) + (kk & 3) * 32, 16, 1024)
            MMA_S(s, qf[4 * kk], qf[4 * kk + 1], qf[4 * kk + 2], qf[4 * kk + 3], desc, 0 if kk == 0 else 1, 0)
        wgmma.commit()

    @cuda.jit(device=True, inline="always")
    def issue_pv(o, pa, vst):
        """O += P V_j: one m64n{D}k16 per 16 keys kk (2048 bytes of V); V MN-major: LBO = Bc*128 (the stride between
        V's 64-column blocks of d), SBO = 1024 (the next 8 keys)."""
        for kk in range(KB):
            desc = wgmma.desc_sw128(vst + kk * 2048, Bc * 128, 1024)
            MMA_O(o, pa[4 * kk], pa[4 * kk + 1], pa[4 * kk + 2], pa[4 * kk + 3], desc, 1, 1)
        wgmma.commit()

    @cuda.jit(device=True, inline="always")
    def arrive(qf, o, pa):
        """What the step's wgmma read and write, materialised ahead of the fence (else ptxas must insert its own
        wait and serialises the wgmma)."""
        wgmma.pin(qf, NQF)
        wgmma.pin(o, NO)
        wgmma.pin(pa, NPA)
        wgmma.fence()

    @cuda.jit(device=True, inline="always")
    def rescale_and_pack(o, pa, s, alpha):
        """Once no wgmma is in flight: O's rows times alpha, P rounded to 16 bits as the A fragments of P V (C
        registers of key chunks 2kk, 2kk + 1 = the A fragment of 16-key step kk)."""
        for i in range(NO):
            o[i] *= alpha[(i >> 1) & 1]
        for n in range(Bc // 8):
            pa[4 * (n >> 1) + 2 * (n & 1)] = pack(s[4 * n], s[4 * n + 1])
            pa[4 * (n >> 1) + 2 * (n & 1) + 1] = pack(s[4 * n + 2], s[4 * n + 3])

    @cuda.jit(launch_bounds=launch_bounds(NWG))
    def fa2_wgmma(q, k, v, o_out, lse, Nq, Nk, causal, sl, G):
        smem = cuda.shared.array(0, uint32)          # dynamic: smem_bytes(D, NWG, Bc)
        qf = cuda.local.array(NQF, uint32)
        pa = cuda.local.array(NPA, uint32)
        s = cuda.local.array(NS, float32)
        o = cuda.local.array(NO, float32)
        m = cuda.local.array(2, float32)
        l = cuda.local.array(2, float32)
        alpha = cuda.local.array(2, float32)
        base = wgmma.shared_base(smem)
        qs = base + ((1024 - (base & 1023)) & 1023)  # the swizzle's atoms: 1024-byte aligned
        ks = qs + QB
        vs = ks + 2 * TILE
        tid = int32(cuda.threadIdx.x)
        lane, w, wg = tid & 31, (tid >> 5) & 3, tid >> 7
        g, t = lane >> 2, lane & 3
        # causal: the longest rows (last Q tiles) start first, so that short blocks fill the tail of the launch
        q0 = (cuda.gridDim.x - 1 - cuda.blockIdx.x if causal else cuda.blockIdx.x) * Br
        bh = cuda.blockIdx.y + cuda.gridDim.y * cuda.blockIdx.z
        if bh >= lse.shape[0]:
            return
        qrow, krow = bh * Nq, uint32(bh) // uint32(G) * Nk
        kv_end = min(Nk, q0 + Br) if causal else Nk
        n_tiles = (kv_end + Bc - 1) // Bc
        n_full = min(Nk // Bc, (q0 + 1) // Bc if causal else n_tiles)   # tiles that need no mask
        row0 = q0 + 64 * wg + 16 * w + g             # this thread's first row (the second: row0 + 8)
        gk, gv = mma.global_i64_at(k, krow, 0), mma.global_i64_at(v, krow, 0)
        for i in range(NO):
            o[i] = 0.0
        for h in range(2):
            m[h] = NEG_INF
            l[h] = 0.0

        load_q(qs, mma.global_i64_at(q, qrow + q0, 0), Nq - q0, tid)
        load_kv(ks, gk, Nk, tid)
        mma.cp_async_commit()
        begin_step(0, n_tiles, ks, vs, gk, gv, Nk, tid)
        r = 64 * wg + 16 * w + (lane & 7) + 8 * ((lane >> 3) & 1)   # ldmatrix.x4: matrix lane // 8 is (rows + 8 *
        for kk in range(KD):                         # (i & 1), columns + 8 * (i >> 1)): mma's A fragment
            x = mma.ldmatrix_x4_at(qs + sw128(r, 16 * kk + 8 * (lane >> 4), Br))
            for e in range(4):
                qf[4 * kk + e] = x[e]
        arrive(qf, o, pa)
        issue_s(s, qf, ks)
        wgmma.wait(0)
        wgmma.pin(s, NS)
        softmax(s, m, l, alpha, 0, 0 >= n_full, causal, Nk, row0, t, sl)
        rescale_and_pack(o, pa, s, alpha)            # (O is still zero)
        for j in range(1, n_tiles):
            begin_step(j, n_tiles, ks, vs, gk, gv, Nk, tid)
            arrive(qf, o, pa)
            issue_s(s, qf, ks + (j & 1) * TILE)
            issue_pv(o, pa, vs + ((j - 1) & 1) * TILE)
            wgmma.wait(1)                            # S_j is done; P_{j-1} V_{j-1} may still run
            wgmma.pin(s, NS)
            softmax(s, m, l, alpha, j * Bc, j >= n_full, causal, Nk, row0, t, sl)
            wgmma.wait(0)
            wgmma.pin(o, NO)
            rescale_and_pack(o, pa, s, alpha)
        begin_step(n_tiles, n_tiles, ks, vs, gk, gv, Nk, tid)    # V of the last tile has landed
        arrive(qf, o, pa)
        issue_pv(o, pa, vs + ((n_tiles - 1) & 1) * TILE)
        wgmma.wait(0)
        wgmma.pin(o, NO)
        # lines 12-15 of Algorithm 1: finish the row sums over the quad, divide once, write O and lse = m ln 2 + ln l
        for h in range(2):
            y = l[h]
            y += cuda.shfl_xor_sync(FULL, y, 1)
            y += cuda.shfl_xor_sync(FULL, y, 2)
            row = row0 + 8 * h
            inv = float32(1.0) / y if y > 0 else float32(0.0)
            if row < Nq:
                for n in range(D // 8):
                    o_out[qrow + row, 4 * n + t] = pack(o[4 * n + 2 * h] * inv, o[4 * n + 2 * h + 1] * inv)
                if t == 0:
                    lse[bh, row] = m[h] * LN2 + math.log(y) if y > 0 else NEG_INF
    return fa2_wgmma, NT, Br, smem_bytes(D, NWG, Bc)


# ---------------------------------------------------------------- host side
def kernel(d, dtype, causal, tiles=None):
    """(kernel, threads, Br, shared bytes) for the compiled head dim d: TILES[d][causal] or tiles = (NWG, Bc)."""
    NWG, Bc = tuple(tiles) if tiles is not None else TILES[d][bool(causal)]
    return make_fa2_wgmma(d, NWG, Bc, dtype)


def launcher(kern, grid, NT, nbytes):
    """A launch(*args) of kern with nbytes of dynamic shared memory (opted in above 48 KB: host.launch_dynamic)."""
    return lambda *args: host.launch_dynamic(kern, grid, (NT,), nbytes, args)


def fa2_forward_wgmma(q, k, v, *, causal=False, scale=None, dtype="float16", tiles=None, o=None, lse=None):
    """The Hopper FA2 forward (wgmma). q (B, H, Nq, d), k, v (B, H_kv, Nk, d), as fa2_tc.fa2_forward_tc takes them
    (float16, or int16 / uint16 bfloat16 bits; H_kv dividing H); d in 1 ... 128, compiled for 64 and 128 (a head dim
    between is zero-padded up). Returns (o, lse). tiles = (NWG, Bc) overrides TILES. Compute capability 9.0 only."""
    q, k, v = (host.device(a) for a in (q, k, v))
    B, H, Nq, d = q.shape
    want = {"float16": ("float16",), "bfloat16": ("int16", "uint16")}.get(dtype)
    check(HEAD_DIMS[0], dtype)
    for name, a in (("q", q), ("k", k), ("v", v)):
        if str(a.dtype) not in want:
            raise ValueError(f"{name} has dtype {a.dtype}; dtype={dtype!r} expects {' or '.join(want)} arrays")
    G = kv_groups(q, k)
    D = host.head_bucket(d, HEAD_DIMS, "the numba wgmma kernel")
    if simulated():
        raise RuntimeError("the wgmma kernel runs PTX, which Numba's CUDA simulator cannot execute: it needs a Hopper "
                           "GPU; its checks without one are tests/test_numba_wgmma.py")
    check(D, dtype, host.device_cc())
    if not numba_targets_sm90a():
        raise RuntimeError("this numba-cuda cannot compile for sm_90a (architecture-specific targets came with "
                           "NVIDIA/numba-cuda PR #549; 0.30.4 has them): upgrade numba-cuda, or use variant 'tc'")
    kern, NT, Br, nbytes = kernel(D, dtype, causal, tiles)
    launch = launcher(kern, pair_grid(-(-Nq // Br), B * H), NT, nbytes)
    sc = scale_of(scale, d)
    if D == d:
        return fa2_tc.run(launch, q, k, v, o, lse, causal, sc, G)
    o_pad, lse = fa2_tc.run(launch, *(host.padded(a, D) for a in (q, k, v)), None, lse, causal, sc, G)
    o_out = host.empty(q.shape, q.dtype) if o is None else host.device(o)
    host.copy(o_pad[:, :, :, :d], o_out)
    return o_out, lse
