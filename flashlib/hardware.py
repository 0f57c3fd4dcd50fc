"""What a GPU is made of, in numbers: a table of GPUs from NVIDIA's datasheets, the present device
queried live, and the arithmetic that links them (bandwidth = bus width x data rate, the roofline, occupancy).

Each row of `GPUS` names NVIDIA's document for the board in `source` (a datasheet) and the architecture
whitepaper in `arch_source`; `checked` lists the stored copies of public pages each figure was checked against
(NVIDIA's own pages were not among them), and `unconfirmed` the fields no stored copy confirmed: those are kept
from NVIDIA's documents or derived, as NOTES says. None means no figure we trust; the book prints "–".
Tensor Core TFLOPS are *dense* unless the key says `sparse` (2:4 structured sparsity doubles the datasheet
figure on Ampere and later; NVIDIA's datasheets for A100, L4, H100 and H200 print the sparse figure with an
asterisk). Nothing here imports CuPy, torch or numba.cuda at import time.
"""
import json
import math
import os
import pathlib

from .env import cc_text, cc_tuple, compute_capability, gpu_count, simulated

WHITEPAPERS = {
    "Volta": "https://images.nvidia.com/content/volta-architecture/pdf/volta-architecture-whitepaper.pdf",
    "Turing": "https://images.nvidia.com/aem-dam/en-zz/Solutions/design-visualization/technologies/"
              "turing-architecture/NVIDIA-Turing-Architecture-Whitepaper.pdf",
    "Ampere": "https://images.nvidia.com/aem-dam/en-zz/Solutions/data-center/nvidia-ampere-architecture-whitepaper.pdf",
    "Ada": "https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf",
    "Hopper": "https://resources.nvidia.com/en-us-tensor-core/gtc22-whitepaper-hopper",
}

# GPUS, from flashlib/data/gpus.json: one row per board (the SKU matters: an H100 PCIe is not an H100 SXM5). Units: GB (10^9 bytes), GB/s,
# TFLOPS, W. `bus_bits` x `gbps_per_pin` / 8 must give `bandwidth_GBps` within a few percent (a test checks);
# `gbps_per_pin` is the memory's effective data rate per pin (GDDR6: 10-20 Gbit/s; HBM: 1.75-6.25 Gbit/s),
# which datasheets rarely print: where no page states it, it is bandwidth x 8 / bus width (NOTES says where).
# `host_link` bandwidths are the datasheets' figures, both directions added (half of it each way).
GPUS = json.loads((pathlib.Path(__file__).parent / "data" / "gpus.json").read_text())   # package data
for _g in GPUS:
    _g["unconfirmed"] = tuple(_g["unconfirmed"])
for _g in GPUS:
    _g["arch_source"] = WHITEPAPERS[_g["arch"]]
# Notes a reader needs beside the numbers (which figure is derived, and how; which no stored copy confirmed).
NOTES = {
    "T4": "No sparsity on Turing: 65 TFLOPS is the dense FP16 Tensor figure (FP32 accumulate). 10 Gbit/s per "
          "pin, RT cores and L2 are from third-party databases, not the datasheet.",
    "V100": "HBM2 at 877 MHz DDR (1.75 Gbit/s per pin) on a 4096-bit bus (Volta whitepaper). 32 GB, FP32 "
            "15.7 TFLOPS and the PCIe figure are from the datasheet but were not confirmed against a stored copy.",
    "A100": "Datasheet Tensor figures with an asterisk are with sparsity (FP16 624); dense is half. 3.19 Gbit/s "
            "per pin is the HBM2e clock the driver reports (1593 MHz) times two.",
    "L4": "The L4 datasheet prints Tensor TFLOPS with sparsity only (FP16 242, FP8 485); the dense FP16 figure "
          "here is half of it, the 2:4-sparsity factor. The datasheet gives no core counts: 30.3 FP32 TFLOPS at "
          "the 2.04 GHz boost clock means 7,424 CUDA cores = 58 SMs, hence 232 Tensor and 58 RT cores (Ada: "
          "4 and 1 per SM; 121 dense FP16 TFLOPS agrees). Databases that list 240 and 60 copy the full AD104 "
          "chip. The 48 MB L2 is from third-party databases, not the datasheet.",
    "RTX 4000 SFF Ada": "Its datasheet gives one 'Tensor performance' figure, 306.8 TFLOPS, which is FP8 with "
                        "sparsity (48 SMs x 1.56 GHz x 4,096 sparse FP8 FLOPs per SM per clock); no dense FP16 "
                        "figure is printed, so none is shown. 280 GB/s, 14 Gbit/s per pin, 19.2 FP32 TFLOPS and "
                        "306.8 were not confirmed against a stored copy; the L2 size is not known to us.",
    "H100": "Datasheet Tensor figures are with sparsity (FP16 1,979); dense is half. SMs, cores and L2 are from "
            "the Hopper whitepaper (H100 SXM5); 5.23 Gbit/s per pin is 3,350 GB/s over 5,120 bits (the driver "
            "reports 2 x 2,619 MHz = 5.24).",
    "H200": "Same GH100 chip as the H100 SXM5 (Hopper whitepaper) with 141 GB of HBM3e at 4.8 TB/s (datasheet) on "
            "six 1024-bit stacks; 6.25 Gbit/s per pin is 4,800 GB/s over 6,144 bits. The 50 MB L2 is the H100's "
            "(same chip), not confirmed for the H200 against a stored copy.",
}

# Tensor Core input precisions by generation (whitepapers above). "Accumulate" is FP32 unless noted.
TENSOR_PRECISIONS = [
    dict(arch="Volta", example="V100", cc="7.0", precisions="FP16 (FP16 or FP32 accumulate)", new="FP16 matrix multiply-accumulate"),
    dict(arch="Turing", example="T4", cc="7.5", precisions="FP16, INT8, INT4 (and experimental INT1)", new="INT8, INT4"),
    dict(arch="Ampere", example="A100", cc="8.0", precisions="FP16, BF16, TF32, FP64, INT8, INT4 (and INT1); 2:4 sparsity", new="TF32, BF16, FP64, sparsity"),
    dict(arch="Ada", example="L4, RTX 4000 SFF Ada", cc="8.9", precisions="FP8 (E4M3, E5M2), FP16, BF16, TF32, INT8, INT4; 2:4 sparsity", new="FP8 (on a graphics chip)"),
    dict(arch="Hopper", example="H100, H200", cc="9.0", precisions="FP8 (E4M3, E5M2), FP16, BF16, TF32, FP64, INT8; 2:4 sparsity", new="FP8, the Transformer Engine"),
]
for _p in TENSOR_PRECISIONS:
    _p["source"] = WHITEPAPERS[_p["arch"]]


def matmul_units(dtype, cc):
    """'Tensor Cores' if a dtype matmul ('fp16', 'bf16', 'tf32', 'fp32') has Tensor Cores on compute capability cc
    ('7.5' or (7, 5)) by TENSOR_PRECISIONS, else 'CUDA cores'. A T4 (7.5) has FP16 Tensor Cores only: its bf16
    matmul and its tf32 one (allow_tf32 does nothing there: plain FP32) run on the CUDA cores."""
    cc = cc_tuple(cc)
    if cc < (7, 0):
        raise ValueError(f"compute capability {cc} has no Tensor Cores; the table starts at Volta (7.0)")
    gen = max((g for g in TENSOR_PRECISIONS if cc_tuple(g["cc"]) <= cc), key=lambda g: cc_tuple(g["cc"]))
    units = dtype.upper() != "FP32" and dtype.upper() in gen["precisions"].replace(",", " ").split()
    return "Tensor Cores" if units else "CUDA cores"

def gpu(name):
    """The row of `GPUS` called `name` (e.g. 'H100')."""
    for g in GPUS:
        if g["name"] == name:
            return g
    raise KeyError(f"{name!r} is not in flashlib.hardware.GPUS; known: {[g['name'] for g in GPUS]}")


def peak_bandwidth(bus_bits, gbps_per_pin):
    """Peak memory bandwidth in GB/s: every pin of the bus moves `gbps_per_pin` Gbit each second, 8 bits a byte."""
    return bus_bits * gbps_per_pin / 8


def bandwidth_from_clock(bus_bits, memory_clock_kHz):
    """GB/s from what the CUDA driver reports: the memory clock (kHz) moves data twice a cycle (DDR)."""
    return peak_bandwidth(bus_bits, 2 * memory_clock_kHz / 1e6)


def peak_fp32_tflops(cuda_cores, clock_GHz):
    """FP32 peak: each CUDA core retires one fused multiply-add (2 FLOPs) per clock."""
    return 2 * cuda_cores * clock_GHz / 1e3


def pcie_bandwidth(gen, lanes=16):
    """One direction of a PCIe link in GB/s: transfer rate per lane x lanes x line-code efficiency / 8."""
    gts, code = {1: (2.5, 8 / 10), 2: (5.0, 8 / 10), 3: (8.0, 128 / 130), 4: (16.0, 128 / 130),
                 5: (32.0, 128 / 130), 6: (64.0, 242 / 256)}[gen]
    return gts * lanes * code / 8


def ridge_point(tflops, bandwidth_GBps):
    """Arithmetic intensity (FLOP per byte) where the roofline bends: peak compute / peak bandwidth."""
    return tflops * 1e12 / (bandwidth_GBps * 1e9)


def roofline(intensity, tflops, bandwidth_GBps):
    """Attainable TFLOP/s at `intensity` FLOP/byte: min(peak compute, bandwidth x intensity)."""
    return min(tflops, bandwidth_GBps * 1e9 * intensity / 1e12)


def attention_parts(N, d, itemsize=2, Br=128, Bc=128):
    """FLOPs and HBM bytes of one (batch, head) of attention, split the way standard attention runs it.

    Returns {part: (flops, bytes)} for QK^T, softmax, PV, standard attention as a whole (S and P written and
    read back: four N x N crossings), the same with the scale applied to S by a kernel of its own (six), and the
    fused kernel twice: counting every re-read of a K/V tile from HBM (FlashAttention-2's
    IO model, flashlib.iomodel), and with compulsory traffic only (Q, K, V read and O written once, the ideal
    when re-reads hit L2). Softmax counts 5 FLOPs per score (max, subtract, exp, sum, divide).
    """
    from .iomodel import fa2_hbm_bytes
    mm = 2 * N * N * d
    parts = {
        "QK^T": (mm, itemsize * (2 * N * d + N * N)),
        "softmax": (5 * N * N, itemsize * 2 * N * N),
        "PV": (mm, itemsize * (N * N + 2 * N * d)),
    }
    parts["standard attention"] = (sum(f for f, _ in parts.values()), sum(b for _, b in parts.values()))
    # `softmax((q @ k^T) * scale) @ v`: the scale is an elementwise kernel of its own, one more N x N round trip
    # (six N x N crossings instead of four); its N^2 multiplies are not counted, as in the fused kernel.
    flops, nbytes = parts["standard attention"]
    parts["standard attention, scale as its own kernel"] = (flops, nbytes + itemsize * 2 * N * N)
    r, w = fa2_hbm_bytes(N, N, d, Br, Bc, itemsize=itemsize)
    parts["fused, K/V re-read from HBM"] = (2 * mm + 5 * N * N, r + w)
    parts["fused, compulsory traffic"] = (2 * mm + 5 * N * N, itemsize * 4 * N * d)
    return parts


def occupancy(threads_per_block, regs_per_thread, smem_per_block, max_threads_per_sm=2048, max_blocks_per_sm=32,
              regs_per_sm=65536, smem_per_sm=228 * 1024, warp=32):
    """How many blocks fit on one SM at once, and which resource runs out first (a simplified occupancy
    calculator: it ignores register allocation granularity and the 1 KB of shared memory reserved per block).

    Returns dict(blocks, warps, occupancy (resident warps / max warps), limiter)."""
    limits = {
        "threads": max_threads_per_sm // threads_per_block,
        "blocks": max_blocks_per_sm,
        "registers": regs_per_sm // (regs_per_thread * threads_per_block) if regs_per_thread else max_blocks_per_sm,
        "shared memory": smem_per_sm // smem_per_block if smem_per_block else max_blocks_per_sm,
    }
    limiter = min(limits, key=limits.get)
    blocks = limits[limiter]
    warps = blocks * math.ceil(threads_per_block / warp)
    return dict(blocks=blocks, warps=warps, occupancy=warps / (max_threads_per_sm // warp), limiter=limiter,
                limits=limits)


def host_memory_bytes():
    """Physical memory of this machine (the host), or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# CUDA runtime device attributes (cudaDeviceAttr) asked one by one: CUDA 13 removed clock fields from
# cudaDeviceProp, but the attributes remain.
_ATTRS = dict(sms=16, clock_kHz=13, memory_clock_kHz=36, bus_bits=37, l2_bytes=38, max_threads_per_sm=39,
              warp=10, regs_per_sm=82, smem_per_sm=81, smem_per_block_optin=97)


def query_device(index=0):
    """The GPU this code runs on, as a dict (name, cc ('9.0', from flashlib.env.compute_capability), sms, memory_bytes, clock_kHz, memory_clock_kHz, bus_bits,
    l2_bytes, smem_per_sm, regs_per_sm, max_threads_per_sm, warp, bandwidth_GBps, fp32_tflops, via), asked
    through CuPy, else torch; None when there is no GPU (or only Numba's simulator)."""
    if simulated() or gpu_count() == 0:
        return None
    info = None
    try:
        import cupy as cp
        rt = cp.cuda.runtime
        props = rt.getDeviceProperties(index)
        info = dict(name=props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
                    memory_bytes=props["totalGlobalMem"], via=f"CuPy {cp.__version__}")
        for key, attr in _ATTRS.items():
            try:
                info[key] = rt.deviceGetAttribute(attr, index)
            except Exception:
                info[key] = None
    except Exception:
        try:
            import torch
            p = torch.cuda.get_device_properties(index)
            info = dict(name=p.name, sms=p.multi_processor_count,
                        memory_bytes=p.total_memory, l2_bytes=getattr(p, "L2_cache_size", None),
                        max_threads_per_sm=getattr(p, "max_threads_per_multi_processor", None),
                        regs_per_sm=getattr(p, "regs_per_multiprocessor", None), warp=getattr(p, "warp_size", 32),
                        smem_per_sm=getattr(p, "shared_memory_per_multiprocessor", None),
                        clock_kHz=None, memory_clock_kHz=None, bus_bits=None, via=f"torch {torch.__version__}")
        except Exception:
            return None
    info["cc"] = cc_text(compute_capability(index))
    if info.get("bus_bits") and info.get("memory_clock_kHz"):
        info["bandwidth_GBps"] = bandwidth_from_clock(info["bus_bits"], info["memory_clock_kHz"])
    cores = cores_per_sm(info["cc"])
    if cores and info.get("clock_kHz"):
        info["fp32_tflops"] = peak_fp32_tflops(cores * info["sms"], info["clock_kHz"] / 1e6)
    return info


def cores_per_sm(cc):
    """FP32 CUDA cores per SM by compute capability ('9.0' or (9, 0); CUDA C++ Programming Guide, 'Compute
    Capabilities'); None for one not in the table."""
    return {"7.0": 64, "7.5": 64, "8.0": 64, "8.6": 128, "8.7": 128, "8.9": 128, "9.0": 128,
            "10.0": 128, "12.0": 128}.get(cc_text(cc))


def closest_row(info):
    """The GPUS row for a queried device (matched on its name), or None."""
    if not info:
        return None
    name = info["name"].upper()
    for g in sorted(GPUS, key=lambda g: -len(g["name"])):
        if g["name"].upper() in name:
            return g
    return None
