#!/usr/bin/env bash
# Device-machine calls that check every kernel and record the benchmarks, results under $OUT. On the device image
# (see ../shared/device/README.md), carry .whl (numpy 2.4 from ../shared/device/fetch-wheels.sh, plus pytest-xdist
# and execnet) and run, within one warm lease:
#   bash benchmarks/gpu_session.sh tests <flashlib commit>   # every gpu test, compute-sanitizer      (~7 min)
#   bash benchmarks/gpu_session.sh bench <flashlib commit>   # the benchmarks still to be recorded    (~8 min)
#   bash benchmarks/gpu_session.sh kernels <flashlib commit> OLD_DIR OLD_COMMIT   # kernel changes  (~6 min):
#       old vs current CuPy kernels timed interleaved (OLD_DIR: that commit's .cu/.cuh files), then the GPU tests of
#       the kernels and compute-sanitizer memcheck, racecheck, synccheck over every kernel (benchmarks/
#       sanitize_kernels.py, CuPy and Numba), all at once; whole sanitizer logs in $OUT/sanitizer.txt; the GPU tests
#       of test_torch, test_api, test_distributed and test_hardware run beside them (tests_other.txt)
#   bash benchmarks/gpu_session.sh public <flashlib commit>   # public-API benchmark, host-time table (~2 min)
#   bash benchmarks/gpu_session.sh check <flashlib commit> OLD_PARENT OLD_COMMIT   # after a re-layout (~8 min):
#       the old package (OLD_PARENT/flashlib_old) against the current one, kernel calls timed interleaved
#       (relayout_regression.py), then every gpu test and the sanitizers over every kernel, side by side
# then copy the JSON that comes back from $OUT into flashlib/data/results/ (flashlib.bench.RESULTS: package data,
# so the wheel and Colab carry it) and commit it; the text logs go to benchmarks/results/logs/.
set -u
phase=${1:?tests, bench, kernels or public}
if [ -d .whl ]; then  # (else the caller installed them into /tmp/site already)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1 FLASHLIB_COMMIT=${2:-unknown} OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
log() { tee -a "$OUT/$phase.txt"; }
# compute-sanitizer memcheck, racecheck and synccheck over every kernel (benchmarks/sanitize_kernels.py, CuPy and
# Numba), six processes in the background, each allowed $1 seconds; sanitizer_report gathers them into one log
sanitizers() {
  for part in cupy numba; do
    for tool in memcheck racecheck synccheck; do
      (timeout "$1" compute-sanitizer --tool $tool python3 benchmarks/sanitize_kernels.py $part \
         > "$OUT/san_${tool}_$part.log" 2>&1; echo "exit status $?" >> "$OUT/san_${tool}_$part.log") &
    done
  done
}
sanitizer_report() {
  for f in "$OUT"/san_*.log; do echo "== $f"; cat "$f"; done > "$OUT/sanitizer.txt"
  rm -f "$OUT"/san_*.log
  grep -E "^== |SUMMARY|exit status|sanitize_kernels:|TOO LARGE" "$OUT/sanitizer.txt" | log
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | log
XN=(); XC=()   # with pytest-xdist carried: the Numba test files in parallel, the CuPy tests in 4 workers
python3 -c "import xdist" 2>/dev/null && XN=(-n 6 --dist loadfile) && XC=(-n 4)
if [ "$phase" = tests ]; then
  # CuPy's instances compile on the CPUs (NVRTC, disk cache) while the Numba tests run
  (timeout 240 python3 benchmarks/cupy_bench.py --precompile > "$OUT/precompile.txt" 2>&1) &
  timeout 250 python3 -m pytest -q -m gpu -p no:cacheprovider "${XN[@]}" \
    tests/test_numba_tf32.py tests/test_numba_bwd_tf32.py tests/test_numba_tc.py tests/test_numba_kernels.py \
    tests/test_hardware.py tests/test_torch.py 2>&1 | tail -25 | log
  wait
  tail -3 "$OUT/precompile.txt" | log
  timeout 180 python3 -m pytest -q -m gpu -p no:cacheprovider "${XC[@]}" tests/test_cupy_kernels.py 2>&1 | tail -25 | log
  for tool in memcheck racecheck; do
    timeout 50 compute-sanitizer --tool $tool python3 -m flashlib.numba_kernels.selfcheck --tc 2>&1 | tail -6 | log
  done
  timeout 50 compute-sanitizer --tool memcheck python3 benchmarks/cupy_bench.py --smoke 2>&1 | tail -4 | log
  for tool in racecheck synccheck; do  # the Hopper rung's barriers and shared-memory reuse
    timeout 60 compute-sanitizer --tool $tool python3 benchmarks/cupy_bench.py --smoke wgmma 2>&1 | tail -4 | log
  done
elif [ "$phase" = kernels ]; then
  timeout 90 python3 benchmarks/kernel_regression.py "${3:?old kernels folder}" "${4:?old commit}" --out "$OUT" 2>&1 | log
  XN=(); XC=(); python3 -c "import xdist" 2>/dev/null && XN=(-n 5 --dist loadfile) && XC=(-n 5)
  (timeout 280 python3 -m pytest -q -m gpu -p no:cacheprovider "${XN[@]}" tests/test_numba_gqa_limits.py \
     tests/test_numba_tc.py tests/test_numba_kernels.py tests/test_numba_tf32.py tests/test_numba_bwd_tf32.py \
     tests/test_torch.py tests/test_api.py tests/test_distributed.py tests/test_hardware.py \
     > "$OUT/tests_other.txt" 2>&1) &
  (timeout 280 python3 -m pytest -q -m gpu -p no:cacheprovider "${XC[@]}" tests/test_cupy_kernels.py \
     > "$OUT/tests_cupy.txt" 2>&1) &
  sanitizers 280   # in the background, beside the tests
  wait
  for f in "$OUT"/tests_*.txt; do echo "== $f"; tail -40 "$f"; done | log
  sanitizer_report
elif [ "$phase" = check ]; then
  timeout 170 python3 benchmarks/relayout_regression.py "${3:?old parent}" "${4:?old commit}" --out "$OUT" 2>&1 | log
  XA=(); python3 -c "import xdist" 2>/dev/null && XA=(-n 6)
  (timeout 330 python3 -m pytest -q -m gpu -p no:cacheprovider "${XA[@]}" tests/ > "$OUT/gpu_tests.txt" 2>&1) &
  sanitizers 330   # in the background, beside the tests
  wait
  tail -40 "$OUT/gpu_tests.txt" | log
  sanitizer_report
elif [ "$phase" = public ]; then   # the public-API benchmark and host-time table (flashlib.bench.public_api)
  timeout 140 python3 -m flashlib.bench.public_api --quick --out "$OUT" 2>&1 | log
else
  timeout 200 python3 benchmarks/cupy_bench.py --out "$OUT" --quick 2>&1 | tail -3 | log
  timeout 120 python3 benchmarks/numba_tf32_bench.py --out "$OUT" 2>&1 | tail -3 | log
  timeout 120 python3 benchmarks/numba_bwd_tf32_bench.py --out "$OUT" 2>&1 | tail -30 | log
  timeout 110 python3 benchmarks/numba_tc_bench.py --out "$OUT" --quick --no-cupy 2>&1 | tail -30 | log
fi
