#!/usr/bin/env bash
# One device call that checks the book and the library where a GPU user meets them: every chapter executed on the
# GPU (tools/run_notebooks.py: live measurements, the exercise graders' kernels on the real GPU, the flashlib op in
# PyTorch and CUDA graphs), then the gpu-marked tests of every file. Logs under $OUT. Usage on the device machine:
#   bash benchmarks/final_gpu_check.sh <flashlib commit>
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 FLASHLIB_COMMIT=${1:-unknown} OUT=${OUT:-/tmp/out} NCCL_NVLS_ENABLE=0
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/notebooks_gpu.txt"
echo "flashlib $FLASHLIB_COMMIT" | tee -a "$OUT/notebooks_gpu.txt"
timeout 230 python3 tools/run_notebooks.py --jobs 4 --timeout 200 notebooks/*.ipynb 2>&1 | tee -a "$OUT/notebooks_gpu.txt"
XN=(); python3 -c "import xdist" 2>/dev/null && XN=(-n 8)
timeout 250 python3 -m pytest -q -m gpu -p no:cacheprovider "${XN[@]}" tests/ 2>&1 | tail -40 > "$OUT/gpu_tests.txt"
tail -3 "$OUT/gpu_tests.txt"
