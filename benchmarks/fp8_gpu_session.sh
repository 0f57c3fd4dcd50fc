#!/bin/bash
# fa3_fp8 (fa3_fp8.cu) and the fused quantisation (fp8_quant.cu) on the H200 in one device run: the GPU tests
# (pytest -x), the benchmark and error table (record fp8_forward through flashlib.bench.save into $OUT), the host
# passes and end to end (--quant: record fp8_quant), the exp2 shares with ncu (--emu: record fp8_emu); with SANITIZE=1 compute-sanitizer memcheck on small ragged
# calls. Each step has its own time limit, so that a hang in one still leaves the others' logs under $OUT.
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fp8_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, cupy; print('torch', torch.__version__, 'cupy', cupy.__version__)" | tee -a "$OUT/env.txt"
echo "commit ${FLASHLIB_COMMIT:-?}" | tee -a "$OUT/env.txt"
timeout -k 5 ${T_TEST:-85} python3 -m pytest -x -q -p no:cacheprovider tests/test_fp8_gpu.py tests/test_fp8_quant_gpu.py > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?" | tee -a "$OUT/env.txt"; tail -30 "$OUT/pytest.log" | cut -c1-400
timeout -k 5 ${T_BENCH:-95} python3 benchmarks/fp8_bench.py --out "$OUT" > "$OUT/bench.log" 2>&1
echo "bench rc=$?" | tee -a "$OUT/env.txt"; grep -v Warning "$OUT/bench.log" | tail -20 | cut -c1-600
timeout -k 5 ${T_QUANT:-60} python3 benchmarks/fp8_bench.py --quant --max-seconds 0.8 --out "$OUT" > "$OUT/quant.log" 2>&1
echo "quant rc=$?" | tee -a "$OUT/env.txt"; grep -v Warning "$OUT/quant.log" | tail -12 | cut -c1-600
timeout -k 5 ${T_EMU:-150} python3 benchmarks/fp8_bench.py --emu --max-seconds 1.5 --out "$OUT" > "$OUT/emu.log" 2>&1
echo "emu rc=$?" | tee -a "$OUT/env.txt"; grep -v Warning "$OUT/emu.log" | tail -16 | cut -c1-600
[ -n "$SANITIZE" ] && timeout -k 5 ${T_SAN:-25} compute-sanitizer --tool memcheck --print-limit 10 python3 benchmarks/fp8_bench.py --sanitize > "$OUT/sanitizer.log" 2>&1
[ -n "$SANITIZE" ] && { echo "sanitizer rc=$?" | tee -a "$OUT/env.txt"; tail -6 "$OUT/sanitizer.log" | cut -c1-300; }
