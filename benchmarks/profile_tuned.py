"""One launch of the tuned CuPy forward (rung 3) per shape, for Nsight Compute:

    ncu --clock-control none --section SpeedOfLight --section Occupancy --section WarpStateStats \
        -k regex:fa2_tc python benchmarks/profile_tuned.py

Shapes (fp16, 16 heads, B*N = 16384 tokens): d = 64 causal and d = 128 non-causal at N = 4096, the rung's weakest
and strongest cases against SDPA flash in flashlib/data/results/cupy_h200.json.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cupy as cp  # noqa: E402

from flashlib import cupy_kernels as ck  # noqa: E402
from flashlib.bench.shapes import workload  # noqa: E402
from flashlib.constants import default_scale  # noqa: E402

for d, causal in ((64, True), (128, False)):
    N = 4096
    B, H = workload(N)
    q, k, v = (cp.random.standard_normal((B, H, N, d), dtype=cp.float32).astype(cp.float16) for _ in range(3))
    print(d, causal, ck.choose_config("float16", d, ck.device_cc(), causal, "tuned"), flush=True)
    ck.forward(q, k, v, causal=causal, scale=default_scale(d), dtype="float16", rung="tuned")
    cp.cuda.Device().synchronize()
