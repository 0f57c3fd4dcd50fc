"""Rung 7's timeline on the GPU: one launch of the debug build (fa3_timeline.cu) per case, the events of CTAs 0
and 1 (warpgroup, phase, start and end in ns and in SM cycles) saved through flashlib.bench.save as
fa3_timeline_<gpu> (flashlib.viz.warp_timeline.draw_timeline draws them).

    python benchmarks/fa3_timeline.py [--out DIR] [--png FILE]

Cases: d = 128, fp16, N = 1024 (6 K/V tiles of 176 keys a query tile), plain and ping-pong (one work item a CTA,
B*H = 16), and persistent, causal, B*H = 48 (288 work items on the SMs: CTA 0 runs several, longest first). Each debug
output is compared with the plain build's on the same inputs.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flashlib import bench  # noqa: E402
from flashlib.cupy_kernels import timeline, tma  # noqa: E402

CASES = timeline.BOOK_CASES
D, DTYPE = 128, "float16"


def run_case(variant, causal, H, N, seed=0):
    """(records with the case's fields, max |o_debug - o|, the ns clock's step)."""
    import cupy as cp
    recs, o, lse = timeline.record(1, H, N, D, DTYPE, causal, variant, seed=seed)
    rng = cp.random.default_rng(seed)    # record's inputs again, for the plain build
    q, k, v = (rng.standard_normal((1, H, N, D), dtype=cp.float32).astype(cp.float16) for _ in range(3))
    o2, _ = tma.forward_fa3(q, k, v, causal, None, variant=variant)
    err = float(cp.abs(o.astype(cp.float32) - o2.astype(cp.float32)).max())
    rows = [dict(r, variant=variant, causal=causal, B=1, H=H, N=N, d=D) for r in recs]
    return rows, err, timeline.resolution_ns(recs)


def summary(rows):
    """Per (variant, lane) of CTA 0: the span in us and the share of time in each phase, one line each."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant and r["cta"] == 0]
        span = max(r["end_ns"] for r in mine) - min(r["start_ns"] for r in mine)
        for lane in dict.fromkeys(r["lane"] for r in mine):
            ev = [r for r in mine if r["lane"] == lane]
            tot = {}
            for r in ev:
                tot[r["phase"]] = tot.get(r["phase"], 0) + r["end_ns"] - r["start_ns"]
            top = sorted(tot.items(), key=lambda kv: -kv[1])[:6]
            out.append(f"{variant:10s} {lane:10s} span {span / 1e3:7.1f} us, {len(ev):4d} events: "
                       + ", ".join(f"{p} {100 * t / span:4.1f}%" for p, t in top))
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("FLASHLIB_RESULTS"))
    p.add_argument("--png", default=None, help="also draw CTA 0 of each case into this PNG")
    a = p.parse_args()
    import torch
    rows, checks = [], []
    for case in CASES:
        r, err, res = run_case(**case)
        rows += r
        checks.append(dict(case, max_abs_diff_vs_plain_build=err, globaltimer_step_ns=res, events=len(r)))
        print(f"{case}: {len(r)} events, debug vs plain build max |diff| {err:.1e}, %globaltimer step {res} ns",
              flush=True)
    print(summary(rows))
    tag = bench.gpu_tag(torch.cuda.get_device_name())
    path = bench.save(f"fa3_timeline_{tag}", rows, directory=a.out, cases=checks, d=D, dtype=DTYPE,
                      kernel="fa3_timeline.cu (fa3_forward.cu with FA3_TIMELINE)",
                      clocks="start/end_ns: %globaltimer from the earliest stamp; start/end_clk: %clock64 per CTA")
    print(path)
    if a.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from flashlib.viz.warp_timeline import draw_timeline
        fig, axes = plt.subplots(len(CASES), 1, figsize=(12, 2.2 * len(CASES)))
        for ax, case in zip(axes, CASES):
            draw_timeline([r for r in rows if r["variant"] == case["variant"]], ax=ax, clock="clk",
                          title=f"{case['variant']}, causal={case['causal']}")
        fig.tight_layout()
        fig.savefig(a.png, dpi=90)
    sys.exit(0 if all(c["max_abs_diff_vs_plain_build"] == 0 for c in checks) else 1)


if __name__ == "__main__":
    main()
