#!/usr/bin/env bash
# One device-machine call that checks every kernel and records what the book still lacks, results under $OUT.
# On the H100 device image (see ../shared/device/README.md), carry .whl and run:
#   bash benchmarks/gpu_session.sh <flashlib commit>
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 FLASHLIB_COMMIT=${1:-unknown} OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -40 | tee "$OUT/gpu_tests.txt"
timeout 120 python3 benchmarks/numba_tc_bench.py --out "$OUT" --quick 2>&1 | tail -15
timeout 60 python3 benchmarks/block_sparse_bench.py --out "$OUT" 2>&1 | tail -5
timeout 60 python3 benchmarks/matmul_bench.py --out "$OUT" 2>&1 | tail -5
timeout 60 python3 benchmarks/api_overhead.py --out "$OUT" 2>&1 | tail -12
