#!/usr/bin/env bash
# One device run for the dynamic scheduler's return (branch dyn2): the new thread test on the old build.py (it
# must fail there), then every gpu-marked test (twice for the files that failed at fd902b1), then the public-API
# benchmark. Logs under $OUT. Usage: bash benchmarks/dyn_fix_session.sh <old build.py>
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
XN=(-n 8)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/dyn_fix.txt"
echo "flashlib $FLASHLIB_COMMIT" | tee -a "$OUT/dyn_fix.txt"
rm -rf /tmp/old && cp -r . /tmp/old && cp "$1" /tmp/old/flashlib/cupy_kernels/build.py
(cd /tmp/old && PYTHONPATH=/tmp/site:/tmp/old timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu \
   tests/test_cupy_kernels.py -k "thread" 2>&1 | tail -15) | sed 's/^/[old build.py] /' | tee -a "$OUT/dyn_fix.txt"
timeout 260 python3 -m pytest -q -m gpu -p no:cacheprovider "${XN[@]}" tests/ 2>&1 | tail -40 | tee -a "$OUT/dyn_fix.txt"
for i in 1 2; do
  timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider "${XN[@]}" tests/test_fa3_dynamic_gpu.py \
    tests/test_bwd_wgmma_gpu.py tests/test_cupy_kernels.py 2>&1 | tail -4 | sed "s/^/[again $i] /" | tee -a "$OUT/dyn_fix.txt"
done
timeout 150 python3 -m flashlib.bench.public_api --quick --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -30
