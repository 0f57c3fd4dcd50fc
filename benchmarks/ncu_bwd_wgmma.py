"""Nsight Compute on the Hopper backward 'bwd_wgmma' (fa3_backward.cu), dQ added by TMA reductions ('tma', the
default) or by atomics from every thread ('atomic', its first version), at d = 64 and 128.

    python benchmarks/ncu_bwd_wgmma.py OUT_DIR       # runs ncu once per case, writes raw_<case>.csv and summary.txt
    python benchmarks/ncu_bwd_wgmma.py --case NAME   # (inside ncu) one launch of the case between profiler marks

fp16, B = 4, H = 16, N = 4096, not causal. The summary lists the tensor pipe's and the load/store pipes' use, the
issue-active share and the warp stall reasons (warps stalled per issued instruction) of each kernel side by side;
benchmarks/results/logs/ncu_bwd_wgmma_h200_f5c32ac.txt is one.
"""
import csv
import io
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = {"d64_atomic": (64, "atomic"), "d64_tma": (64, "tma"), "d128_atomic": (128, "atomic"), "d128_tma": (128, "tma")}
SECTIONS = ("ComputeWorkloadAnalysis", "SchedulerStats", "WarpStateStats", "InstructionStats", "SpeedOfLight",
            "MemoryWorkloadAnalysis", "LaunchStats")
KEEP = (r"sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active|sm__inst_executed_pipe_lsu.avg.pct_of_peak"
        r"_sustained_active|l1tex__data_pipe_lsu_wavefronts.avg.pct_of_peak_sustained_elapsed|smsp__issue_active.avg."
        r"pct_of_peak_sustained_active|issue_stalled_\w+_per_issue_active.ratio|gpu__time_duration.sum|"
        r"sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active")


def case(name):
    import torch
    from flashlib import cupy_kernels as ck
    d, dq = CASES[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(4, 16, 4096, d, device="cuda", generator=g).half() for _ in range(4))
    o, lse = ck.forward(q, k, v, causal=False, scale=d ** -0.5, dtype="float16")
    fn = lambda: ck.backward(q, k, v, o, lse, do, causal=False, scale=d ** -0.5, dtype="float16", rung="bwd_wgmma",
                             tiles=(dq,))
    fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def profile(out):
    tabs = {}
    for name in CASES:
        cmd = ["ncu", "--profile-from-start", "off", "--clock-control", "none", "-k", "regex:fa3_backward", "--csv",
               "--page", "raw"] + [a for s in SECTIONS for a in ("--section", s)]
        res = subprocess.run(cmd + [sys.executable, os.path.abspath(__file__), "--case", name], capture_output=True,
                             text=True, timeout=200)
        with open(os.path.join(out, f"raw_{name}.csv"), "w") as fh:
            fh.write(res.stdout)
        if '"ID"' not in res.stdout:
            raise RuntimeError(f"ncu gave no table for {name} (rc {res.returncode}): {res.stderr[-1500:]}")
        rows = list(csv.reader(io.StringIO(res.stdout[res.stdout.index('"ID"'):])))
        tabs[name] = dict(zip(rows[0], rows[2]))        # row 1: units
    keys = sorted({k for t in tabs.values() for k in t if re.search(KEEP, k)})
    lines = [f"{'metric':80s}" + "".join(f"{n:>13s}" for n in CASES)]
    lines += [f"{k[:80]:80s}" + "".join(f"{tabs[n].get(k, '')[:11]:>13s}" for n in CASES) for k in keys]
    with open(os.path.join(out, "summary.txt"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1] == "--case":
        case(sys.argv[2])
    else:
        profile(sys.argv[1])
