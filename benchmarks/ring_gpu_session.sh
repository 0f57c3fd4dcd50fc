#!/usr/bin/env bash
# flashlib.distributed on the GPUs of one machine through NCCL, results under $OUT (a few minutes on one H200).
#   (a) the gpu tests of tests/test_distributed.py: ring (contiguous, zigzag) and Ulysses, forward and gradients
#       against float64, fp16/bf16 under the FlashAttention rule, fp32 on the numba and cupy backends, at every
#       world size of (1, 2, 4) that the GPUs allow (one GPU: world size 1, the ring's single local block);
#   (b) benchmarks/ring_bench.py under torchrun, one process per GPU, N/P = 4k, 8k, 16k, recorded as
#       ring_<gpu>_p<P>.json through flashlib.bench.save (NCCL version and `nvidia-smi topo -m` inside).
# On the device image, from the tree's root with flashlib on PYTHONPATH and FLASHLIB_COMMIT set (as
# benchmarks/gpu_session.sh is run):   bash benchmarks/ring_gpu_session.sh
# NVLink multicast stays off (NCCL_NVLS_ENABLE=0): on shared hosts it can take the GPUs out of service.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
log() { tee -a "$OUT/ring_gpu_session.txt"; }
GPUS=$(nvidia-smi -L | wc -l)
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nvidia-smi topo -m
  python3 -c "import torch; print('torch', torch.__version__, 'NCCL', torch.cuda.nccl.version(), 'GPUs', torch.cuda.device_count())"
} 2>&1 | log
# CuPy's instances that (a) and (b) launch (d = 96 and 128), compiled first on all cores into CuPy's disk cache
timeout 60 python3 benchmarks/ring_bench.py --precompile 96 128 2>&1 | tail -5 | log
echo "== (a) pytest -m gpu tests/test_distributed.py" | log
timeout ${TESTS_S:-110} python3 -m pytest -q -m gpu -p no:cacheprovider -rA --durations=5 tests/test_distributed.py \
  2>&1 | tail -30 | log
echo "== (b) ring_bench.py, $GPUS process(es) on NCCL" | log
timeout ${BENCH_S:-90} python3 -m torch.distributed.run --standalone --nproc-per-node "$GPUS" benchmarks/ring_bench.py \
  --lengths 4096 8192 16384 --out "$OUT" 2>&1 | tail -20 | log
