#!/bin/bash
# Rung 7's d = 256, persistent variant and timeline on the H200 in one device run: the GPU tests of rung 7 (every
# variant), the timeline record, the ablation (rung 6 -> plain -> ping-pong -> persistent, d = 256 beside rung 3
# and SDPA) with Nsight Compute. Records through flashlib.bench.save into $OUT; each step has its own time limit.
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fa3_out}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader; echo "commit ${FLASHLIB_COMMIT:-?}"; } > "$OUT/env.txt"
s=$SECONDS
timeout -k 5 ${T_TEST:-95} python3 -m pytest -q --maxfail=10 -p no:cacheprovider tests/test_fa3_gpu.py > "$OUT/pytest.log" 2>&1
echo "pytest rc=$? $((SECONDS - s)) s" >> "$OUT/env.txt"; s=$SECONDS
timeout -k 5 ${T_DEFAULT:-40} python3 -m pytest -q -p no:cacheprovider tests/test_cupy_kernels.py \
    -k "test_any_head_dim_forward_and_gradients and 256" >> "$OUT/pytest.log" 2>&1   # d = 256 by default: rung 7
echo "pytest d=256 default rc=$? $((SECONDS - s)) s" >> "$OUT/env.txt"; s=$SECONDS
timeout -k 5 ${T_TIMELINE:-30} python3 benchmarks/fa3_timeline.py --out "$OUT" --png "$OUT/fa3_timeline.png" > "$OUT/timeline.log" 2>&1
echo "timeline rc=$? $((SECONDS - s)) s" >> "$OUT/env.txt"; s=$SECONDS
timeout -k 5 ${T_ABLATION:-100} python3 benchmarks/fa3_ablation.py --max-seconds ${MAX_S:-1.5} --out "$OUT" --ncu \
    --ncu-out "$OUT/ncu_raw.csv" > "$OUT/ablation.log" 2>&1
echo "ablation rc=$? $((SECONDS - s)) s" >> "$OUT/env.txt"
cat "$OUT/env.txt"; tail -5 "$OUT/pytest.log"; grep -v "^{" "$OUT/timeline.log" | tail -14; grep -v Warning "$OUT/ablation.log" | tail -30
