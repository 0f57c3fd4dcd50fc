"""Micro-benchmarks for the hardware chapters: copies between host and device, launch cost, device-memory
bandwidth, coalescing, shared-memory banks, the L2 cliff, FP32 FMA vs Tensor Core throughput, a
timeline of which thread block ran on which SM; and the tiling chapter's matmul ladder and the block-sparse
chapter's speed-up (Numba kernels).

    python -m flashlib.bench.micro [--out DIR] [--name hardware_h100]

Kernels are CUDA C in `SOURCE`, loaded with `cupy.RawModule`; every function returns plain dicts and lists.
Nothing here imports CuPy, torch or numba.cuda at import time: without a GPU, `compile_ptx()` still compiles
the kernels with NVRTC (to show their PTX), and the book loads the recorded results instead.
"""
import argparse
import time

import numpy as np

from . import describe, load, save, source, time_cuda  # noqa: F401 (load, describe: for the chapters)
from .timing import idle_events_ms

SOURCE = r"""
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
"""
KERNELS = ("vector_add", "empty", "copy_f4", "strided_read", "smem_read", "read_l2", "fma_loop", "smid_timeline")
MB = 2**20
_module = None


def compile_ptx(arch="compute_75", source=SOURCE):
    """PTX of the kernels, compiled with NVRTC (works without a GPU); the text CuPy would load."""
    from cupy_backends.cuda.libs import nvrtc
    prog = nvrtc.createProgram(source, "micro.cu", [], [])
    try:
        nvrtc.compileProgram(prog, [f"-arch={arch}"])
    except Exception as e:
        raise RuntimeError(nvrtc.getProgramLog(prog)) from e
    ptx = nvrtc.getPTX(prog)
    return ptx.decode() if isinstance(ptx, bytes) else ptx


def kernel_source(name):
    """The CUDA C text of one kernel of SOURCE, with its header comment (to print in the book)."""
    lines = SOURCE.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("__global__") and f" {name}(" in l)
    while start > 0 and lines[start - 1].startswith("//"):
        start -= 1
    end = next(i for i in range(start, len(lines)) if lines[i] == "}")
    return "\n".join(lines[start:end + 1])


cuda = None          # numba.cuda, imported by numba_vector_add() (after flashlib.setup() has chosen GPU or simulator)


def vector_add_numba(a, b, c):
    """A first Numba kernel: thread i owns element i of c = a + b (a 1-D grid covering c.size)."""
    i = cuda.grid(1)                      # = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if i < c.size:
        c[i] = a[i] + b[i]


def numba_vector_add():
    """vector_add_numba compiled with @cuda.jit (numba.cuda is imported here, lazily)."""
    global cuda
    from numba import cuda
    return cuda.jit(vector_add_numba)


def live_or_recorded(gpu, name="hardware_h100"):
    """For a chapter: returns measure(key, fn), which runs fn() on a GPU (no record is read) and otherwise
    returns the recorded result `key` of load(name), after saying once where the recorded numbers come from."""
    if gpu:
        return lambda key, fn: fn()
    rec = load(name)
    note = source(rec, lead="No GPU here: the measurements on this page are recorded ones. ")
    try:
        from IPython.display import display
        display(note)
    except ImportError:
        print(repr(note))
    return lambda key, fn: rec["rows"][key]


def kernel(name):
    """The CuPy RawKernel `name` from SOURCE (the module is compiled once, on first use)."""
    global _module
    import cupy as cp
    if _module is None:
        _module = cp.RawModule(code=SOURCE)
    return _module.get_function(name)


def _sync():
    import cupy as cp
    cp.cuda.Device().synchronize()


def device_info():
    """The present GPU (flashlib.hardware.query_device) plus the PCIe link nvidia-smi reports."""
    import subprocess
    from ..hardware import host_memory_bytes, query_device
    info = query_device() or {}
    info["host_memory_bytes"] = host_memory_bytes()
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=pcie.link.gen.max,pcie.link.width.max,"
                              "pcie.link.gen.current,pcie.link.width.current,clocks.max.sm",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, check=True).stdout
        gmax, wmax, gcur, wcur, sm_mhz = [s.strip() for s in out.splitlines()[0].split(",")]
        info.update(pcie_gen_max=int(gmax), pcie_width_max=int(wmax), pcie_gen=int(gcur), pcie_width=int(wcur),
                    max_sm_clock_MHz=int(sm_mhz))
    except Exception:
        pass
    return info


# ---- host <-> device ---------------------------------------------------------------------------------------
def transfers(nbytes=256 * MB):
    """Host-to-device and device-to-host GB/s for pageable (np.empty) and pinned (page-locked) host buffers."""
    import cupy as cp
    import cupyx
    d = cp.empty(nbytes, dtype=np.uint8)
    pageable = np.ones(nbytes, dtype=np.uint8)
    pinned = cupyx.empty_pinned(nbytes, dtype=np.uint8)
    pinned[:] = 1
    res = {"bytes": nbytes}
    for kind, h in (("pageable", pageable), ("pinned", pinned)):
        res[f"h2d_{kind}_GBps"] = nbytes / time_cuda(lambda: d.set(h), warmup=2, repeat=5) / 1e6
        res[f"d2h_{kind}_GBps"] = nbytes / time_cuda(lambda: d.get(out=h), warmup=2, repeat=5) / 1e6
    return res


def launch_overhead(n=2000):
    """Cost of launching an empty kernel, in microseconds: back-to-back launches from CuPy and from Numba
    (the host's issue rate), one launch plus synchronize (a round trip), and CUDA events recorded around one
    launch (`gpu_event_us`: from the start event to the end event on the GPU, which includes the time the GPU
    waits for the host to submit the kernel)."""
    import warnings
    k = kernel("empty")
    k((1,), (1,), ())
    _sync()
    t0 = time.perf_counter()
    for _ in range(n):
        k((1,), (1,), ())
    _sync()
    res = {"cupy_launch_us": (time.perf_counter() - t0) / n * 1e6}
    rt = []
    for _ in range(200):
        t0 = time.perf_counter()
        k((1,), (1,), ())
        _sync()
        rt.append(time.perf_counter() - t0)
    res["cupy_launch_sync_us"] = float(np.median(rt) * 1e6)
    res["gpu_event_us"] = idle_events_ms(lambda: k((1,), (1,), ()), warmup=10, repeat=50) * 1e3
    try:
        from numba import cuda

        @cuda.jit
        def nb_empty():
            pass
        with warnings.catch_warnings():           # Numba warns that a grid of one block under-uses the GPU
            warnings.simplefilter("ignore")
            nb_empty[1, 1]()
            cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n // 4):
                nb_empty[1, 1]()
            cuda.synchronize()
        res["numba_launch_us"] = (time.perf_counter() - t0) / (n // 4) * 1e6
    except Exception as e:                       # numba-cuda missing or broken: report, do not fail
        res["numba_launch_us"] = None
        res["numba_error"] = repr(e)[:200]
    return res


# ---- device memory -----------------------------------------------------------------------------------------
def copy_bandwidth(nbytes=1024 * MB):
    """Device-memory bandwidth of a copy kernel (bytes read + bytes written per second), and of cudaMemcpy
    device-to-device for comparison."""
    import cupy as cp
    src = cp.ones(nbytes // 4, dtype=cp.float32)
    dst = cp.empty_like(src)
    n4 = nbytes // 16
    threads, blocks = 256, min(65535 * 4, (n4 + 255) // 256)
    k = kernel("copy_f4")
    ms = time_cuda(lambda: k((blocks,), (threads,), (src, dst, np.int64(n4))))
    assert bool((dst == 1).all())
    ms_memcpy = time_cuda(lambda: dst.data.copy_from_device(src.data, nbytes))
    return {"bytes": nbytes, "kernel_GBps": 2 * nbytes / ms / 1e6, "memcpy_GBps": 2 * nbytes / ms_memcpy / 1e6}


def strided_access(n=2**25, strides=(1, 2, 4, 8, 16, 32)):
    """Useful GB/s (bytes read and written that the kernel asked for) when thread i reads element i * stride
    (n threads, one float each; the source is n * max(strides) floats: 4 GiB by default), per stride."""
    import cupy as cp
    src = cp.ones(n * max(strides), dtype=cp.float32)
    dst = cp.empty(n, dtype=cp.float32)
    k = kernel("strided_read")
    rows = []
    for s in strides:
        ms = time_cuda(lambda: k(((n + 255) // 256,), (256,), (src, dst, np.int64(n), np.int32(s))))
        rows.append({"stride": s, "useful_GBps": 2 * 4 * n / ms / 1e6, "ms": ms})
    return rows


def shared_memory_banks(strides=(1, 2, 4, 8, 16, 32), reps=256):
    """Shared-memory read bandwidth (all SMs together, GB/s) when lane l reads word l * stride: stride 1 is
    conflict-free, stride 32 puts a whole warp on one bank."""
    import cupy as cp
    from ..hardware import query_device
    sms = query_device()["sms"]
    threads, blocks = 1024, 2 * sms * 4
    out = cp.empty(threads * blocks, dtype=cp.float32)
    k = kernel("smem_read")
    rows = []
    for s in strides:
        ms = time_cuda(lambda: k((blocks,), (threads,), (out, np.int32(s), np.int32(reps))))
        nbytes = threads * blocks * reps * 64 * 4
        rows.append({"stride": s, "GBps": nbytes / ms / 1e6, "ms": ms})
    return rows


def l2_sweep(sizes_MB=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512)):
    """Read bandwidth (GB/s) of repeated passes over a buffer of each size (powers of two: the kernel wraps
    with a mask): served from L2 while the buffer fits, from device memory beyond."""
    import cupy as cp
    from ..hardware import query_device
    sms = query_device()["sms"]
    threads, blocks = 256, sms * 8
    out = cp.empty(threads * blocks, dtype=cp.float32)
    buf = cp.ones(max(sizes_MB) * MB // 4, dtype=cp.float32)
    k = kernel("read_l2")
    rows = []
    for mb in sizes_MB:
        size = mb * MB
        assert size & (size - 1) == 0, "sizes must be powers of two"
        loads = max(1, max(4 * size, 512 * MB) // (16 * threads * blocks))     # >= 4 passes, >= 512 MB read
        ms = time_cuda(lambda: k((blocks,), (threads,), (buf, out, np.int64(size // 16 - 1), np.int32(loads))))
        rows.append({"MB": mb, "GBps": 16 * loads * threads * blocks / ms / 1e6, "ms": ms})
    return rows


# ---- compute -----------------------------------------------------------------------------------------------
def fma_throughput(iters=2048):
    """FP32 TFLOP/s of independent FMAs on every CUDA core (2 FLOPs per FMA)."""
    import cupy as cp
    from ..hardware import query_device
    sms = query_device()["sms"]
    threads, blocks = 256, sms * 8 * 4
    out = cp.empty(threads * blocks, dtype=cp.float32)
    k = kernel("fma_loop")
    ms = time_cuda(lambda: k((blocks,), (threads,), (out, np.float32(0.999), np.float32(0.001), np.int32(iters))))
    flops = 2 * 8 * 16 * iters * threads * blocks
    return {"TFLOPs": flops / ms / 1e9, "ms": ms}


def matmul_throughput(n=None):
    """TFLOP/s of an n x n x n matmul in each precision the library offers: fp16 and bf16 (Tensor Cores),
    tf32 (Tensor Cores, Ampere and later) and fp32 with TF32 off (CUDA cores). torch if present, else CuPy."""
    rows = []
    try:
        import torch
        n = n or (8192 if torch.cuda.get_device_properties(0).total_memory > 30e9 else 4096)
        for name, dt, tf32 in (("fp16", torch.float16, False), ("bf16", torch.bfloat16, False),
                               ("tf32", torch.float32, True), ("fp32", torch.float32, False)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            a = torch.randn(n, n, device="cuda", dtype=dt)
            b = torch.randn(n, n, device="cuda", dtype=dt)
            ms = time_cuda(lambda: a @ b, warmup=3, repeat=10)
            rows.append({"dtype": name, "n": n, "TFLOPs": 2 * n**3 / ms / 1e9, "ms": ms, "via": "torch"})
        torch.backends.cuda.matmul.allow_tf32 = False
    except ImportError:
        import cupy as cp
        n = n or 4096
        for name, dt in (("fp16", cp.float16), ("fp32", cp.float32)):
            a = cp.random.standard_normal((n, n)).astype(dt)
            b = cp.random.standard_normal((n, n)).astype(dt)
            ms = time_cuda(lambda: a @ b)
            rows.append({"dtype": name, "n": n, "TFLOPs": 2 * n**3 / ms / 1e9, "ms": ms, "via": "cupy"})
    return rows


STANDARD_FORM = "softmax((q * scale) @ k^T) @ v"     # the scale folded into q, as SDPA does: no N x N pass


def attention_points(N=4096, d=64, BH=64):
    """Achieved TFLOP/s of attention's parts (fp16, torch), to place on the roofline: QK^T, softmax, PV, the
    three in a row (standard attention, STANDARD_FORM), the same with the scale as an N x N kernel of its own,
    and PyTorch SDPA (a fused FlashAttention-style kernel). Each row names the expression it timed in `form`."""
    import torch
    import torch.nn.functional as F
    from ..hardware import attention_parts
    q, k, v = (torch.randn(BH, N, d, device="cuda", dtype=torch.float16) for _ in range(3))
    s = q @ k.transpose(-1, -2)
    p = torch.softmax(s, -1)
    scale = d ** -0.5
    fns = {"QK^T": ("q @ k^T", lambda: q @ k.transpose(-1, -2)),
           "softmax": ("softmax(s)", lambda: torch.softmax(s, -1)),
           "PV": ("p @ v", lambda: p @ v),
           "standard attention": (STANDARD_FORM, lambda: torch.softmax((q * scale) @ k.transpose(-1, -2), -1) @ v),
           "standard attention, scale as its own kernel": (
               "softmax((q @ k^T) * scale) @ v", lambda: torch.softmax((q @ k.transpose(-1, -2)) * scale, -1) @ v),
           "fused (SDPA)": ("scaled_dot_product_attention(q, k, v)",
                            lambda: F.scaled_dot_product_attention(q[None], k[None], v[None]))}
    parts = attention_parts(N, d, itemsize=2)
    parts["fused (SDPA)"] = parts["fused, K/V re-read from HBM"]
    rows = []
    for name, (form, fn) in fns.items():
        ms = time_cuda(fn)
        flops, nbytes = parts[name]
        rows.append({"part": name, "form": form, "N": N, "d": d, "BH": BH, "ms": ms,
                     "TFLOPs": BH * flops / ms / 1e9, "intensity": flops / nbytes})
    return rows


def attention_as_measured(rows):
    """Rows of attention_points, each with the intensity of what it timed. Records made before the scale was
    folded into q (rows without `form`) timed "standard attention" as softmax((q @ k^T) * scale) @ v: that row is
    renamed and given the six-crossing byte count; its time and TFLOP/s are kept as recorded."""
    from ..hardware import attention_parts
    out = []
    for r in rows:
        if "form" not in r and r["part"] == "standard attention":
            flops, nbytes = attention_parts(r["N"], r["d"], itemsize=2)["standard attention, scale as its own kernel"]
            r = {**r, "part": "standard attention, scale as its own kernel", "intensity": flops / nbytes,
                 "form": "softmax((q @ k^T) * scale) @ v"}
        out.append(r)
    return out


# ---- the tiling and block-sparse chapters' ladders ----------------------------------------------------------
def matmul_ladder(sizes=(512, 1024, 2048, 4096)):
    """float32 n x n matmul: the Numba naive and shared-memory tiled kernels of the tiling chapter beside cuBLAS
    (torch, TF32 off), with the tiled kernel's max error against float64. Rows {n, kernel, ms, tflops}."""
    import torch
    from numba import cuda
    from ..numba_kernels import matmul
    torch.backends.cuda.matmul.allow_tf32 = False
    rng, rows = np.random.default_rng(0), []
    for n in sizes:
        a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
        da, db = cuda.to_device(a), cuda.to_device(b)
        ta, tb = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()
        err = float(np.abs(matmul(da, db, kernel="tiled").copy_to_host() - a.astype(np.float64) @ b).max())
        for name, fn in (("naive", lambda: matmul(da, db, kernel="naive")),
                         ("tiled", lambda: matmul(da, db, kernel="tiled")), ("cublas", lambda: ta @ tb)):
            ms = time_cuda(fn, repeat=5)
            rows.append(dict(n=n, kernel=name, ms=ms, tflops=2 * n ** 3 / ms / 1e9, tiled_max_err=err))
    return rows


def block_sparse_speedup(Ns=(2048, 4096, 8192), densities=(1.0, 0.5, 0.25, 0.125), d=64, BH=16, B=32):
    """Time of the readable Numba FA2 forward (float32, B x B tiles) with random block masks of each density
    (flashlib.block_sparse.random_mask) against the dense mask. Rows {N, density, kept, ms, speedup}."""
    import torch
    from numba import cuda
    from ..block_sparse import random_mask
    from ..numba_kernels import fa2_forward
    rows = []
    for N in Ns:
        q, k, v = (cuda.as_cuda_array(torch.randn(1, BH, N, d, device="cuda")) for _ in range(3))
        T, dense = -(-N // B), None
        for rho in densities:
            m = random_mask(T, T, rho, seed=0)
            ms = time_cuda(lambda: fa2_forward(q, k, v, Br=B, Bc=B, block_mask=m), repeat=5)
            dense = dense or ms
            rows.append(dict(N=N, d=d, BH=BH, density=rho, kept=float(m.mean()), ms=ms, speedup=dense / ms))
    return rows


# ---- the SMs -----------------------------------------------------------------------------------------------
def smid_timeline(waves=3, threads=1024, spin_us=20):
    """Launch `waves` x (resident blocks) blocks of `threads` threads that each spin `spin_us`; return one
    record per block: {'block', 'sm', 'start_us', 'end_us'} (times from the first block's start) and the
    blocks per SM the occupancy API allows."""
    import cupy as cp
    from ..hardware import query_device
    info = query_device()
    k = kernel("smid_timeline")
    try:
        from cupy_backends.cuda.api import driver
        per_sm = driver.occupancyMaxActiveBlocksPerMultiprocessor(k.kernel.ptr, threads, 0)
    except Exception:
        per_sm = info["max_threads_per_sm"] // threads
    blocks = waves * per_sm * info["sms"]
    rec = cp.zeros(3 * blocks, dtype=cp.uint64)
    k((blocks,), (threads,), (rec, np.uint64(spin_us * 1000)))            # warm-up (clocks, module load)
    _sync()
    k((blocks,), (threads,), (rec, np.uint64(spin_us * 1000)))
    _sync()
    r = cp.asnumpy(rec).reshape(blocks, 3).astype(np.int64)
    t0 = r[:, 1].min()
    rows = [{"block": b, "sm": int(r[b, 0]), "start_us": (r[b, 1] - t0) / 1e3, "end_us": (r[b, 2] - t0) / 1e3}
            for b in range(blocks)]
    return {"sms": info["sms"], "blocks_per_sm": per_sm, "threads": threads, "spin_us": spin_us, "blocks": rows}


def run_all(name=None, directory=None):
    """Every micro-benchmark with a progress bar; saves <name>.json and <name>_smid.json (timeline)."""
    from .grid import progress_bar
    info = device_info()
    name = name or "hardware_" + info.get("name", "gpu").split()[1].lower() if info.get("name") else "hardware_gpu"
    steps = [("transfers", transfers), ("launch", launch_overhead), ("copy", copy_bandwidth),
             ("strided", strided_access), ("smem", shared_memory_banks), ("l2", l2_sweep),
             ("fma", fma_throughput), ("matmul", matmul_throughput), ("attention", attention_points),
             ("timeline", smid_timeline)]
    rows = {}
    for key, fn in progress_bar(steps, "micro-benchmarks"):
        try:
            rows[key] = fn()
        except Exception as e:
            rows[key] = {"error": repr(e)[:300]}
            print(f"{key} failed: {e!r}")
    timeline = rows.pop("timeline")
    paths = (save(name, rows, directory=directory, device=info),
             save(name + "_smid", timeline, directory=directory, device=info))
    return rows, timeline, paths


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="directory for the JSON (default flashlib.bench.RESULTS)")
    ap.add_argument("--name", default=None, help="file name stem (default hardware_<gpu>)")
    a = ap.parse_args()
    rows, _, paths = run_all(a.name, a.out)
    import json
    print(json.dumps(rows, indent=1, default=str)[:6000])
    print("wrote", *paths)


if __name__ == "__main__":
    main()
