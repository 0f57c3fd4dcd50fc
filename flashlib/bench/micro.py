"""Micro-benchmarks for the hardware chapters: copies between host and device, launch cost, device-memory
bandwidth, coalescing, shared-memory banks, the L2 cliff, FP32 FMA vs Tensor Core throughput, a
timeline of which thread block ran on which SM; and the parts of attention placed on the roofline.
(The tiling and block-sparse chapters' Numba ladders are in `flashlib.bench.ladders`.)

    python -m flashlib.bench.micro [--out DIR] [--name hardware_h100]

Kernels are CUDA C in micro.cu (package data; `SOURCE` is its text), loaded with `cupy.RawModule`; every
function returns plain dicts and lists.
Nothing here imports CuPy, torch or numba.cuda at import time: without a GPU, `compile_ptx()` still compiles
the kernels with NVRTC (to show their PTX), and the book loads the recorded results instead.
"""
import argparse
import pathlib
import time

import numpy as np

from ..constants import default_scale
from .progress import progress_bar
from .records import save
from .results import describe, gpu_tag, load, source  # noqa: F401 (load, describe: for the chapters)
from .timing import idle_events_ms, time_cuda

# The kernels' CUDA C, package data beside this file (loaded with cupy.RawModule or compiled by NVRTC).
SOURCE = (pathlib.Path(__file__).with_name("micro.cu")).read_text()
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
    end = next(i for i in range(start, len(lines)) if lines[i] == "}" or lines[i].endswith(") {}"))
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
    if not bool((dst == 1).all()):
        raise RuntimeError("copy_f4 did not copy every element: the bandwidth below would be of a broken kernel")
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
    bad = [mb for mb in sizes_MB if mb < 1 or mb & (mb - 1)]
    if bad:
        raise ValueError(f"l2_sweep sizes_MB must be powers of two (the kernel wraps with a mask), got {bad}")
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
    scale = default_scale(d)
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


def default_name(info):
    """The record's default name: hardware_<gpu tag> ('hardware_h100'), from the queried device's name."""
    return "hardware_" + gpu_tag(info.get("name") or "")


def run_all(name=None, directory=None):
    """Every micro-benchmark with a progress bar; saves <name>.json and <name>_smid.json (timeline)."""
    info = device_info()
    name = name or default_name(info)
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
