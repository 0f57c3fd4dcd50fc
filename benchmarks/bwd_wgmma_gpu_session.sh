#!/bin/bash
# The Hopper backward 'bwd_wgmma' (fa3_backward.cu) on the H200 in one device run: quick checks with diagnostics,
# the timing table (bwd_wgmma vs bwd_tc vs SDPA flash; flashlib.bench.save into $OUT), the GPU tests, and
# compute-sanitizer memcheck on small ragged calls (with SYNC=1 also synccheck and racecheck). Each step has its own
# time limit (T_CHECK, T_TIME, T_PYTEST, T_SANITIZE seconds), so that a hang in one still leaves the others' logs
# under $OUT. STEPS (default "check time pytest sanitize") picks steps; BWD_WGMMA_DIMS the head dims of check, time
# and sanitize (bwd_wgmma_bench.py).
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bwd_wgmma_out}; mkdir -p "$OUT"
STEPS=${STEPS:-check time pytest sanitize}
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader | tee "$OUT/env.txt"
echo "commit ${FLASHLIB_COMMIT:-?}" | tee -a "$OUT/env.txt"
for s in $STEPS; do case $s in
check) timeout -k 5 ${T_CHECK:-60} python3 benchmarks/bwd_wgmma_bench.py --check > "$OUT/check.log" 2>&1
       echo "check rc=$?" | tee -a "$OUT/env.txt"; grep -v "^ok" "$OUT/check.log" | tail -30 ;;
time)  timeout -k 5 ${T_TIME:-170} python3 benchmarks/bwd_wgmma_bench.py --time --out "$OUT" > "$OUT/bench.log" 2>&1
       echo "bench rc=$?" | tee -a "$OUT/env.txt"; grep -v Warning "$OUT/bench.log" | tail -20 ;;
pytest) timeout -k 5 ${T_PYTEST:-100} python3 -m pytest -x -q -p no:cacheprovider tests/test_bwd_wgmma_gpu.py > "$OUT/pytest.log" 2>&1
       echo "pytest rc=$?" | tee -a "$OUT/env.txt"; tail -15 "$OUT/pytest.log" ;;
sanitize) for tool in memcheck $([ "${SYNC:-0}" = 1 ] && echo synccheck racecheck); do
       timeout -k 5 ${T_SANITIZE:-45} compute-sanitizer --tool $tool --print-limit 20 python3 benchmarks/bwd_wgmma_bench.py --sanitize > "$OUT/sanitizer_$tool.log" 2>&1
       echo "sanitizer $tool rc=$?" | tee -a "$OUT/env.txt"; tail -4 "$OUT/sanitizer_$tool.log"; done ;;
esac; done
