"""The SASS instructions of an Nsight Compute source page with the most warp stall samples, and their top reasons.

    ncu -i REPORT.ncu-rep --page source --csv --print-source sass > src.csv
    python benchmarks/ncu_top_stalls.py src.csv

Prints the 60 instructions with the most samples (share of all, the three largest stall reasons) and the share by
opcode; benchmarks/results/logs/ncu_bwd_stalls_h200_540f569.txt is one (the Hopper backward at d = 128).
"""
import csv, sys
rows = list(csv.reader(open(sys.argv[1], errors="replace")))
hdr_i = next(i for i, r in enumerate(rows) if any("Source" == c.strip() for c in r) or any("Address" in c for c in r))
hdr = rows[hdr_i]
print("columns:", hdr)
data = [r for r in rows[hdr_i + 1:] if len(r) == len(hdr)]
def col(name):
    for i, c in enumerate(hdr):
        if c.strip() == name: return i
    return None
samp = next((i for i, c in enumerate(hdr) if "Warp Stall Sampling (All" in c), None)
src = col("Source")
if samp is None or src is None:
    print("no sampling/source column"); sys.exit(0)
def f(x):
    try: return float(x.replace(",", ""))
    except ValueError: return 0.0
total = sum(f(r[samp]) for r in data)
print(f"{len(data)} instructions, {total:.0f} samples")
stall_cols = [i for i, c in enumerate(hdr) if c.startswith("stall_") or "Stall" in c and "Sampling" not in c]
top = sorted(data, key=lambda r: -f(r[samp]))[:60]
for r in top:
    reasons = sorted(((f(r[i]), hdr[i]) for i in stall_cols if f(r[i]) > 0), reverse=True)[:3]
    print(f"{100 * f(r[samp]) / total:5.1f}%  {r[src].strip()[:70]:70s} " + ", ".join(f"{n}={v:.0f}" for v, n in reasons))
# totals by opcode family
fam = {}
for r in data:
    op = r[src].strip().split()[0] if r[src].strip() else "?"
    if op.startswith("@"): op = r[src].strip().split()[1]
    fam[op.split(".")[0]] = fam.get(op.split(".")[0], 0) + f(r[samp])
print("by opcode:", ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in sorted(fam.items(), key=lambda x: -x[1])[:15]))
