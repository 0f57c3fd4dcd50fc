#!/bin/bash
# One device run for the Numba Hopper forward: the gpu tests of tests/test_numba_wgmma.py, then the benchmark beside
# CuPy's rungs 6 and 7 (benchmarks/numba_wgmma_bench.py); the log and the record go to $OUT.
# Usage (from the repository root, PYTHONPATH and FLASHLIB_COMMIT set): bash benchmarks/numba_wgmma_session.sh [bench args]
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader
python3 -c "import numba_cuda, cupy, torch; print('numba-cuda', numba_cuda.__version__, 'cupy', cupy.__version__, 'torch', torch.__version__)"
python3 -m pytest -q -n 8 -m gpu tests/test_numba_wgmma.py 2>&1 | tail -25
python3 benchmarks/numba_wgmma_bench.py --out "$OUT" "$@"
