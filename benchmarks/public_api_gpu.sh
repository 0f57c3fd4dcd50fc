#!/bin/bash
# One device run for issue 16's operator work: the GPU tests of flashlib.torch (CUDA graphs, side streams,
# torch.compile, the backends against float64), a probe of the installed PyTorch's SDPA API, and the public-API
# benchmark with its host-time table. Writes under $OUT (or ./gpu_out): gpu_tests.log, torch_api_probe.json,
# public_api_<gpu>.json, bench.log.
set -o pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
python3 - > "$OUT/torch_api_probe.json" <<'PY'
import inspect, json, warnings, torch
from torch.nn import attention as A
info = {"torch": torch.__version__, "sdpa_kernel": str(inspect.signature(A.sdpa_kernel)),
        "has": {n: hasattr(A, n) for n in ("activate_flash_attention_impl", "list_flash_attention_impls",
                                           "current_flash_attention_impl", "register_flash_attention_impl")}}
if hasattr(A, "list_flash_attention_impls"):
    info["flash_impls"] = A.list_flash_attention_impls()
q = torch.randn(1, 2, 8, 64, device="cuda", dtype=torch.float16)
k = torch.randn(1, 2, 16, 64, device="cuda", dtype=torch.float16)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    ok = torch.backends.cuda.can_use_flash_attention(torch.backends.cuda.SDPAParams(q, k, k, None, 0.0, True, False), True)
info["flash_causal_nq_ne_nk"] = {"ok": ok, "why": [str(x.message)[:300] for x in w]}
print(json.dumps(info, indent=1))
PY
timeout 70 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_torch.py \
  -k "graph or side_stream or on_cuda or model_step or (gpu_backends and cupy) or (gpu_backends and numba and False)" \
  2>&1 | tee "$OUT/gpu_tests.log"
timeout 130 python3 -m flashlib.bench.public_api --quick --out "$OUT" 2>&1 | tee "$OUT/bench.log"
