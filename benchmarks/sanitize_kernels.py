"""Every CUDA kernel of flashlib once, at ragged shapes, for compute-sanitizer (memcheck, racecheck, synccheck).

    compute-sanitizer --tool memcheck python benchmarks/sanitize_kernels.py cupy    # the CuPy kernels
    compute-sanitizer --tool racecheck python benchmarks/sanitize_kernels.py numba  # the Numba kernels

Shapes: Nq = 70, Nk = 53 (multiples of no tile), causal and not, grouped-query attention (H = 2 query heads on one
kv head), head dims 59 and 200 (padded to the buckets 64 and 256) beside the compiled 32, 96, 128. Every result is
also compared with the float64 reference, so that a kernel that ran but computed garbage is caught here too.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flashlib import reference  # noqa: E402

B, H, HKV, NQ, NK = 1, 2, 1, 70, 53


def inputs(d, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, NQ, d)).astype(np.float32)
    k, v = (rng.standard_normal((B, HKV, NK, d)).astype(np.float32) for _ in range(2))
    return q, k, v, rng.standard_normal(q.shape).astype(np.float32)


def ref(q, k, v, do, causal, scale):
    kr, vr = (np.repeat(a, H // HKV, 1) for a in (k, v))
    o, lse = reference.attention_forward(q, kr, vr, causal, scale)
    dq, dk, dv = reference.attention_backward(q, kr, vr, o, lse, do, causal, scale)
    return o, lse, dq, dk.reshape(B, HKV, -1, NK, q.shape[3]).sum(2), dv.reshape(B, HKV, -1, NK, q.shape[3]).sum(2)


def report(name, got, want, tol):
    err = max(float(np.abs(np.asarray(g, np.float64) - w).max() / max(1.0, np.abs(w).max())) for g, w in zip(got, want))
    print(f"{name:58s} rel err {err:.1e}", "" if err <= tol else "  <-- TOO LARGE", flush=True)
    return err <= tol


def run_cupy():
    import cupy as cp
    from flashlib import cupy_kernels as ck
    ok, cc = True, ck.device_cc()
    for dtype, dims in (("float16", (32, 59, 96, 128, 200)), ("bfloat16", (59, 128)), ("float32", (59, 200))):
        for d in dims:
            for causal in (False, True):
                q, k, v, do = inputs(d)
                want = ref(q, k, v, do, causal, 0.125)
                cast = {"float32": lambda a: cp.asarray(a), "float16": lambda a: cp.asarray(a.astype(np.float16)),
                        "bfloat16": lambda a: cp.asarray((a.view(np.uint32) >> 16).astype(np.uint16).view(np.int16))}[dtype]
                back = (lambda a: (cp.asnumpy(a).astype(np.int32).view(np.uint32) << 16).view(np.float32)
                        if dtype == "bfloat16" else cp.asnumpy(a).astype(np.float32))
                qc, kc, vc, doc = (cast(a) for a in (q, k, v, do))
                want = ref(*(back(a) for a in (qc, kc, vc, doc)), causal, 0.125)  # the inputs as rounded
                tol = 1e-4 if dtype == "float32" else 3e-2
                fwd = ["fp32"] if dtype == "float32" else ["tc", "tuned"] + (["sm75"] if dtype == "float16" else [])
                if dtype != "float32" and cc == 90 and ck.head_bucket(d) in ck.WGMMA_HEAD_DIMS:
                    fwd.append("wgmma")
                if dtype != "float32" and cc == 90 and ck.head_bucket(d) in ck.FA3_HEAD_DIMS:
                    fwd.append("fa3")
                for r in fwd:
                    o, lse = ck.forward(qc, kc, vc, causal=causal, scale=0.125, dtype=dtype, rung=r)
                    ok &= report(f"cupy {r:6s} {dtype:8s} d={d:3d} causal={causal}", (back(o), cp.asnumpy(lse)),
                                 want[:2], tol)
                bwd = ["bwd_fp32"] + (["bwd_tc"] if dtype != "float32" else [])
                if dtype != "float32" and cc == 90 and ck.head_bucket(d) in ck.BWD_WGMMA_HEAD_DIMS:
                    bwd.append("bwd_wgmma")
                for r in bwd:
                    grads = ck.backward(qc, kc, vc, o, lse, doc, causal=causal, scale=0.125, dtype=dtype, rung=r)
                    ok &= report(f"cupy {r:8s} {dtype:8s} d={d:3d} causal={causal}", [back(g) for g in grads],
                                 want[2:], 1e-4 if dtype == "float32" else 5e-2)
    cp.cuda.Device().synchronize()
    return ok


def run_numba():
    from numba import cuda
    import torch
    from flashlib import numba_kernels as nk
    from flashlib.numba_kernels import fa2_bwd_tf32, fa2_tc
    ok = True
    for d in (59, 200):
        for causal in (False, True):
            q, k, v, do = inputs(d, 1)
            want = ref(q, k, v, do, causal, None)
            for name, fn in (("fa1", nk.fa1_forward), ("fa2", nk.fa2_forward), ("fa2_fast", nk.fa2_forward_fast)):
                o, lse = fn(q, k, v, causal=causal)
                ok &= report(f"numba {name} d={d} causal={causal}", (o.copy_to_host(), lse.copy_to_host()), want[:2], 1e-4)
            grads = nk.fa2_backward(q, k, v, want[0].astype(np.float32), want[1].astype(np.float32), do, causal=causal)
            ok &= report(f"numba fa2_backward d={d} causal={causal}", [g.copy_to_host() for g in grads], want[2:], 1e-4)
            for dtype in ("float16", "bfloat16"):
                t = lambda a: torch.from_numpy(a).cuda().to(getattr(torch, dtype))
                qt, kt, vt = t(q), t(k), t(v)
                bits = (lambda x: x.view(torch.int16)) if dtype == "bfloat16" else (lambda x: x)
                o, lse = fa2_tc.fa2_forward_tc(*(cuda.as_cuda_array(bits(x)) for x in (qt, kt, vt)), causal=causal,
                                               dtype=dtype)
                o = torch.as_tensor(o, device="cuda")
                o = o.view(torch.bfloat16) if dtype == "bfloat16" else o
                w = ref(*(x.float().cpu().numpy() for x in (qt, kt, vt)), do, causal, None)
                ok &= report(f"numba fa2_tc {dtype} d={d} causal={causal}", (o.float().cpu().numpy(),
                                                                             lse.copy_to_host()), w[:2], 3e-2)
        for causal in (False, True):
            q, k, v, do = inputs(64, 2)
            want = ref(q, k, v, do, causal, None)
            o, lse = nk.fa2_forward_tf32(cuda.to_device(q), cuda.to_device(k), cuda.to_device(v), causal=causal)
            ok &= report(f"numba fa2_tf32 d=64 causal={causal}", (o.copy_to_host(), lse.copy_to_host()), want[:2], 1e-4)
            grads = fa2_bwd_tf32.fa2_backward_tf32(q, k, v, want[0].astype(np.float32), want[1].astype(np.float32), do,
                                                   causal=causal)
            ok &= report(f"numba fa2_bwd_tf32 d=64 causal={causal}", [g.copy_to_host() for g in grads], want[2:], 1e-4)
    cuda.synchronize()
    return ok


if __name__ == "__main__":
    which = sys.argv[1:] or ["cupy", "numba"]
    ok = all([run_cupy() if w == "cupy" else run_numba() for w in which])
    print("sanitize_kernels:", "every kernel ran and matched the reference" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)
