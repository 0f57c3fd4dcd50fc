"""Measured HBM traffic: DRAM bytes read and written by naive attention and the Numba FA1 / FA2 kernels,
counted by Nsight Compute, beside flashlib.iomodel's prediction (Theorem 2 of FlashAttention).

    python benchmarks/ncu_io.py --sweep [--out DIR]     # runs ncu once per case, writes ncu_io_<gpu>.json
    python benchmarks/ncu_io.py CASE_JSON              # (inside ncu) runs one case once, between profiler marks

float32, B * H = 16 heads, d = 64: K and V of one (batch, head) set exceed the H100's 50 MB L2 from N = 16384 on,
so below that the L2 cache absorbs part of the re-reads that the model counts as HBM traffic.
"""
import argparse
import csv
import io
import json
import os
import subprocess
import sys

BH, D = 16, 64
CASES = ([dict(impl="naive", N=N) for N in (4096, 8192, 16384)]
         + [dict(impl="fa2", N=N, Br=Br, Bc=32) for N in (4096, 16384) for Br in (32, 64)]
         + [dict(impl="fa1", N=2048, Br=32, Bc=32)])


def run_case(case):
    """Build inputs, warm up (JIT), then run the case once between cudaProfilerStart/Stop."""
    import torch
    from numba import cuda
    import flashlib.numba_kernels as nk
    from flashlib.constants import default_scale
    q, k, v = (torch.randn(1, BH, case["N"], D, device="cuda") for _ in range(3))

    def once():
        if case["impl"] == "naive":
            return torch.softmax((q * default_scale(D)) @ k.transpose(-1, -2), -1) @ v   # scale in q: no extra N x N pass
        fwd = nk.fa1_forward if case["impl"] == "fa1" else nk.fa2_forward
        return fwd(cuda.as_cuda_array(q), cuda.as_cuda_array(k), cuda.as_cuda_array(v), Br=case["Br"], Bc=case["Bc"])
    once()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    once()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def measure(case):
    cmd = ["ncu", "--profile-from-start", "off", "--clock-control", "none", "--csv", "--metrics",
           "dram__bytes_read.sum,dram__bytes_write.sum", sys.executable, __file__, json.dumps(case)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    table = [r for r in csv.reader(io.StringIO(out[out.index('"ID"'):]))]
    head, body = table[0], table[1:]
    name, unit, value = head.index("Metric Name"), head.index("Metric Unit"), head.index("Metric Value")
    scale = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9}
    total = {"dram__bytes_read.sum": 0.0, "dram__bytes_write.sum": 0.0}
    for r in body:
        total[r[name]] += float(r[value].replace(",", "")) * scale.get(r[unit], 1)
    return total["dram__bytes_read.sum"], total["dram__bytes_write.sum"], len(body) // 2


def model(case):
    from flashlib import iomodel
    N = case["N"]
    if case["impl"] == "naive":
        r, w = iomodel.standard_hbm_bytes(N, N, D)
    else:
        f = iomodel.fa1_hbm_bytes if case["impl"] == "fa1" else iomodel.fa2_hbm_bytes
        r, w = f(N, N, D, case["Br"], case["Bc"])
    return r * BH, w * BH


def sweep(out_dir):
    from flashlib.bench import save
    from flashlib.bench.progress import progress_bar
    rows = []
    for case in progress_bar(CASES, "ncu"):
        read, written, kernels = measure(case)
        m_read, m_written = model(case)
        rows.append({**case, "d": D, "BH": BH, "dram_read": read, "dram_written": written, "kernels": kernels,
                     "model_read": m_read, "model_written": m_written})
        print(rows[-1], flush=True)
        path = save("ncu_io_h100", rows, directory=out_dir, dtype="float32", tool="ncu --clock-control none")
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("case", nargs="?")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    a = ap.parse_args()
    print(sweep(a.out)) if a.sweep else run_case(json.loads(a.case))
