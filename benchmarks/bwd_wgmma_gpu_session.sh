#!/bin/bash
# The Hopper backward 'bwd_wgmma' (fa3_backward.cu) on the H200 in one device run: quick checks with diagnostics,
# the timing table (bwd_wgmma vs bwd_tc vs SDPA flash; flashlib.bench.save into $OUT), the GPU tests, and
# compute-sanitizer memcheck on small ragged calls. Each step has its own time limit, so that a hang in one still
# leaves the others' logs under $OUT. STEPS (default "check time pytest sanitize") picks steps.
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bwd_wgmma_out}; mkdir -p "$OUT"
STEPS=${STEPS:-check time pytest sanitize}
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader | tee "$OUT/env.txt"
echo "commit ${FLASHLIB_COMMIT:-?}" | tee -a "$OUT/env.txt"
for s in $STEPS; do case $s in
check) timeout -k 5 60 python3 benchmarks/bwd_wgmma_bench.py --check > "$OUT/check.log" 2>&1
       echo "check rc=$?" | tee -a "$OUT/env.txt"; grep -v "^ok" "$OUT/check.log" | tail -30 ;;
time)  timeout -k 5 170 python3 benchmarks/bwd_wgmma_bench.py --time --out "$OUT" > "$OUT/bench.log" 2>&1
       echo "bench rc=$?" | tee -a "$OUT/env.txt"; grep -v Warning "$OUT/bench.log" | tail -20 ;;
pytest) timeout -k 5 100 python3 -m pytest -x -q -p no:cacheprovider tests/test_bwd_wgmma_gpu.py > "$OUT/pytest.log" 2>&1
       echo "pytest rc=$?" | tee -a "$OUT/env.txt"; tail -15 "$OUT/pytest.log" ;;
sanitize) timeout -k 5 45 compute-sanitizer --tool memcheck --print-limit 20 python3 benchmarks/bwd_wgmma_bench.py --sanitize > "$OUT/sanitizer.log" 2>&1
       echo "sanitizer rc=$?" | tee -a "$OUT/env.txt"; tail -8 "$OUT/sanitizer.log" ;;
esac; done
