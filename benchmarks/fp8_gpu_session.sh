#!/bin/bash
# fa3_fp8 (fa3_fp8.cu) and the fused quantisation (fp8_quant.cu) on the H200 in one device run: the GPU tests
# (pytest -x), the benchmark and error table (record fp8_forward through flashlib.bench.save into $OUT), the host
# passes and end to end (--quant: record fp8_quant), the exp2 shares with ncu (--emu: record fp8_emu), the persistent
# grid against the other (--persist: record fp8_persist), the trimmed kernel against the plain one (--trim: record
# fp8_trim), the narrow last tile (--narrow: record fp8_narrow), other key tiles at d = 128 (--sweep: record
# fp8_sweep; sweep256: fp8_sweep_d256; sweep64: fp8_sweep_d64); STEPS picks them (default "test bench quant emu"). With
# SANITIZE=1 compute-sanitizer memcheck on small ragged calls (the persistent grid's too), with SYNC=1 synccheck and
# racecheck on them. Each step has its own time limit, so that a hang in one still leaves the others' logs under $OUT.
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fp8_out}; mkdir -p "$OUT"
STEPS=${STEPS:-test bench quant emu}
has() { [[ " $STEPS " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, cupy; print('torch', torch.__version__, 'cupy', cupy.__version__)" | tee -a "$OUT/env.txt"
echo "commit ${FLASHLIB_COMMIT:-?}" | tee -a "$OUT/env.txt"
if has test; then
  timeout -k 5 ${T_TEST:-85} python3 -m pytest -x -q -p no:cacheprovider tests/test_fp8_gpu.py tests/test_fp8_quant_gpu.py > "$OUT/pytest.log" 2>&1
  echo "pytest rc=$?" | tee -a "$OUT/env.txt"; tail -30 "$OUT/pytest.log" | cut -c1-400
fi
if has persist; then
  timeout -k 5 ${T_PERSIST:-90} python3 benchmarks/fp8_bench.py --persist --max-seconds 3 --out "$OUT" > "$OUT/persist.log" 2>&1
  echo "persist rc=$?" | tee -a "$OUT/env.txt"; grep -v Warning "$OUT/persist.log" | tail -10 | cut -c1-600
fi
if has trim; then
  timeout -k 5 ${T_TRIM:-150} python3 benchmarks/fp8_bench.py --trim --max-seconds 3 --out "$OUT" > "$OUT/trim.log" 2>&1
  echo "trim rc=$?" | tee -a "$OUT/env.txt"; grep -v Warning "$OUT/trim.log" | tail -14 | cut -c1-600
fi
if has narrow; then
  timeout -k 5 ${T_NARROW:-120} python3 benchmarks/fp8_bench.py --narrow --max-seconds 3 --out "$OUT" > "$OUT/narrow.log" 2>&1
  echo "narrow rc=$?" | tee -a "$OUT/env.txt"; grep -v Warning "$OUT/narrow.log" | tail -10 | cut -c1-600
fi
if has sweep; then
  timeout -k 5 ${T_SWEEP:-240} python3 benchmarks/fp8_bench.py --sweep --max-seconds 4 --out "$OUT" > "$OUT/sweep.log" 2>&1
  echo "sweep rc=$?" | tee -a "$OUT/env.txt"; grep -v Warning "$OUT/sweep.log" | tail -8 | cut -c1-900
fi
if has sweep256; then
  timeout -k 5 ${T_SWEEP:-240} python3 benchmarks/fp8_bench.py --sweep 256 --max-seconds 4 --out "$OUT" > "$OUT/sweep256.log" 2>&1
  echo "sweep256 rc=$?" | tee -a "$OUT/env.txt"; grep -v Warning "$OUT/sweep256.log" | tail -8 | cut -c1-900
fi
if has sweep64; then
  timeout -k 5 ${T_SWEEP:-240} python3 benchmarks/fp8_bench.py --sweep 64 --max-seconds 4 --out "$OUT" > "$OUT/sweep64.log" 2>&1
  echo "sweep64 rc=$?" | tee -a "$OUT/env.txt"; grep -v Warning "$OUT/sweep64.log" | tail -8 | cut -c1-900
fi
if has bench; then
  timeout -k 5 ${T_BENCH:-95} python3 benchmarks/fp8_bench.py --out "$OUT" > "$OUT/bench.log" 2>&1
  echo "bench rc=$?" | tee -a "$OUT/env.txt"; grep -v Warning "$OUT/bench.log" | tail -20 | cut -c1-600
fi
if has quant; then
  timeout -k 5 ${T_QUANT:-60} python3 benchmarks/fp8_bench.py --quant --max-seconds 0.8 --out "$OUT" > "$OUT/quant.log" 2>&1
  echo "quant rc=$?" | tee -a "$OUT/env.txt"; grep -v Warning "$OUT/quant.log" | tail -12 | cut -c1-600
fi
if has emu; then
  timeout -k 5 ${T_EMU:-150} python3 benchmarks/fp8_bench.py --emu --max-seconds 1.5 --out "$OUT" > "$OUT/emu.log" 2>&1
  echo "emu rc=$?" | tee -a "$OUT/env.txt"; grep -v Warning "$OUT/emu.log" | tail -16 | cut -c1-600
fi
sanitize() {  # tool, log name
  timeout -k 5 ${T_SAN:-40} compute-sanitizer --tool "$1" --print-limit 10 python3 benchmarks/fp8_bench.py --sanitize > "$OUT/$2.log" 2>&1
  echo "$2 rc=$?" | tee -a "$OUT/env.txt"; tail -6 "$OUT/$2.log" | cut -c1-300
}
[ -n "$SANITIZE" ] && sanitize memcheck sanitizer
[ -n "$SYNC" ] && { sanitize synccheck synccheck; sanitize racecheck racecheck; }
true
