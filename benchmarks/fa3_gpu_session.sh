#!/bin/bash
# Rung 7 (fa3_forward.cu) on the H200 in one device run: quick checks with diagnostics, the GPU tests, the
# benchmark (results through flashlib.bench.save into $OUT), compute-sanitizer memcheck on small ragged calls.
# Each step has its own time limit, so that a hang in one still leaves the others' logs under $OUT.
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fa3_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader | tee "$OUT/env.txt"
echo "commit ${FLASHLIB_COMMIT:-?}" | tee -a "$OUT/env.txt"
timeout -k 5 45 python3 benchmarks/fa3_bench.py --check > "$OUT/check.log" 2>&1; echo "check rc=$?" | tee -a "$OUT/env.txt"
grep -v "^ok" "$OUT/check.log" | tail -40
timeout -k 5 110 python3 -m pytest -q --maxfail=10 -p no:cacheprovider tests/test_fa3_gpu.py > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?" | tee -a "$OUT/env.txt"; tail -25 "$OUT/pytest.log"
timeout -k 5 95 python3 benchmarks/fa3_bench.py --time --out "$OUT" > "$OUT/bench.log" 2>&1
echo "bench rc=$?" | tee -a "$OUT/env.txt"; cat "$OUT/bench.log" | grep -v Warning | tail -30
timeout -k 5 30 compute-sanitizer --tool memcheck --print-limit 20 python3 benchmarks/fa3_bench.py --sanitize > "$OUT/sanitizer.log" 2>&1
echo "sanitizer rc=$?" | tee -a "$OUT/env.txt"; tail -15 "$OUT/sanitizer.log"
