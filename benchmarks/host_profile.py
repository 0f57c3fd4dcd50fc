"""Where the host time of a flashlib call goes, on a GPU: the host table of flashlib.bench.public_api, a cProfile of
the public calls, and each step of the cupy backend's forward timed alone.

    python benchmarks/host_profile.py [--out DIR] [--profile]

Writes host_profile.txt (and host_us.json) under --out. Diagnostics for issue 16; the recorded host table is the
public benchmark's (python -m flashlib.bench.public_api).
"""
import argparse
import cProfile
import io
import json
import os
import pstats
import time


def per_call_us(fn, calls=2000, repeat=5):
    import torch
    fn()
    torch.cuda.synchronize()
    best = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    best.sort()
    return best[len(best) // 2]


def steps(out):
    """The cupy forward's steps, each alone, on torch tensors (B = H = 1, N = 128, d = 64, fp16)."""
    import torch
    import flashlib
    from flashlib import api, cupy_kernels as ck
    from flashlib.cupy_kernels import launch
    from flashlib.torch import scaled_dot_product_attention as fsdpa
    q, k, v = (torch.randn(1, 1, 128, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    o, lse = ck.forward(q, k, v, causal=False, scale=0.125, dtype="float16")
    plan = ck.forward_plan("float16", 64, False, 0)
    io_ = ck.callers.TorchIO
    p = [t.data_ptr() for t in (q, k, v, o, lse)]
    if plan.cfg.rung == "fa3":          # rung 7 takes tensor maps of q, k, v
        p[:3] = [launch._tensor_map(x, plan.cfg.dtype, 64, 128, 1, b) for x, b in zip(p[:3], (plan.cfg.Br,) + (plan.cfg.Bc,) * 2)]
    plan_args = (*p, 128, 128, 0.125, 1, 1)
    s = io_.stream(0)
    dev = q.device
    import cupy as cp
    qc = cp.asarray(q)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

    class _Identity(torch.autograd.Function):
        """What any Python autograd.Function costs: forward and backward that do nothing."""
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return g
    fns = {
        "api.validate": lambda: api.validate(q, k, v, False, None),
        "launch._checked": lambda: launch._checked(q, k, v, "float16"),
        "forward_plan (cached)": lambda: ck.forward_plan("float16", 64, False, 0, None, None),
        "torch new_empty x2 (o, lse)": lambda: (q.new_empty(q.shape), q.new_empty((1, 1, 128), dtype=torch.float32)),
        "torch.empty_like": lambda: torch.empty_like(q),
        "torch.empty(shape, dtype, device obj)": lambda: torch.empty((1, 1, 128), dtype=torch.float32, device=dev),
        "torch.empty(shape, dtype, device int)": lambda: torch.empty((1, 1, 128), dtype=torch.float32, device=0),
        "q.new_empty(shape, dtype)": lambda: q.new_empty((1, 1, 128), dtype=torch.float32),
        "lse.contiguous().float()": lambda: lse.contiguous().float(),
        "Launcher argument packing": lambda: plan.fn._fmt.pack_into(plan.fn._buf, plan.fn._at, *plan_args),
        "os.environ.get": lambda: os.environ.get("FLASHLIB_CUPY_RUNG"),
        "cupy_kernels.backward": lambda: ck.backward(q, k, v, o, lse, q, causal=False, scale=0.125, dtype="float16"),
        "is_contiguous x3": lambda: (q.is_contiguous(), k.is_contiguous(), v.is_contiguous()),
        "data_ptr x5": lambda: [t.data_ptr() for t in (q, k, v, o, lse)],
        "current raw stream": lambda: io_.stream(0),
        "device x3": lambda: io_.device(q, k, v),
        "Launcher call (cuLaunchKernel)": lambda: plan.fn((1, 1, 1), (32 * plan.cfg.warps,), plan_args, plan.cfg.smem, s),
        "cupy_kernels.forward": lambda: ck.forward(q, k, v, causal=False, scale=0.125, dtype="float16"),
        "cupy_kernels.forward (CuPy arrays)": lambda: ck.forward(qc, qc, qc, causal=False, scale=0.125,
                                                                 dtype="float16"),
        "cupy.empty_like": lambda: cp.empty_like(qc),
        "cupy.empty(shape, float32)": lambda: cp.empty((1, 1, 128), dtype="float32"),
        "cupy.cuda.get_current_stream().ptr": lambda: cp.cuda.get_current_stream().ptr,
        "a.data.device_id x3": lambda: (qc.data.device_id, qc.data.device_id, qc.data.device_id),
        "python autograd.Function identity fwd+bwd": lambda: torch.autograd.grad(_Identity.apply(qg), (qg,), q),
        "torch x * 1 fwd+bwd": lambda: torch.autograd.grad(qg * 1, (qg,), q),
        "F.sdpa fwd+bwd": lambda: torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(qg, kg, vg),
                                                      (qg, kg, vg), q),
        "flashlib.torch sdpa fwd+bwd": lambda: torch.autograd.grad(fsdpa(qg, kg, vg), (qg, kg, vg), q),
        "flashlib.attention (torch)": lambda: flashlib.attention(q, k, v, backend="cupy"),
        "flashlib.torch sdpa (no grad)": lambda: fsdpa(q, k, v),
        "F.sdpa (default backends)": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
    }
    grad_needed = ("fwd+bwd",)
    for name, fn in fns.items():
        with torch.enable_grad() if any(g in name for g in grad_needed) else torch.no_grad():
            out.write(f"{name:45s} {per_call_us(fn):8.2f} us\n")


def autograd_steps(out):
    """Where a forward + backward's host time goes: autograd.Functions that do less and less of flashlib's work,
    the backward's parts alone, and the thread the backward runs on (B = H = 1, N = 128, d = 64, fp16)."""
    import threading
    import torch
    from flashlib import api, cupy_kernels as ck
    from flashlib.torch import _EagerAttention, scaled_dot_product_attention as fsdpa
    q, k, v, do = (torch.randn(1, 1, 128, 64, device="cuda", dtype=torch.float16) for _ in range(4))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    o, lse = ck.forward(q, k, v, causal=False, scale=0.125, dtype="float16")
    seen = {}

    class Empty3(torch.autograd.Function):
        """Three inputs, an allocated output, three allocated gradients: no kernel."""
        @staticmethod
        def forward(ctx, a, b, c):
            return torch.empty_like(a)

        @staticmethod
        def backward(ctx, g):
            seen["thread"] = threading.get_ident()
            return torch.empty_like(g), torch.empty_like(g), torch.empty_like(g)

    class Saved3(Empty3):
        """Empty3 that saves five tensors as flashlib does."""
        @staticmethod
        def forward(ctx, a, b, c):
            out = torch.empty_like(a)
            ctx.save_for_backward(a, b, c, out, lse)
            ctx.args = False, 0.125, "cupy", "float16"
            return out

        @staticmethod
        def backward(ctx, g):
            x = ctx.saved_tensors
            return torch.empty_like(g), torch.empty_like(g), torch.empty_like(g)

    class FwdOnly(torch.autograd.Function):
        """flashlib's forward, a backward that launches nothing."""
        @staticmethod
        def forward(ctx, a, b, c):
            o_, lse_ = api.forward("cupy", a, b, c, False, 0.125, "float16")
            ctx.save_for_backward(a, b, c, o_, lse_)
            return o_

        @staticmethod
        def backward(ctx, g):
            x = ctx.saved_tensors
            return torch.empty_like(g), torch.empty_like(g), torch.empty_like(g)

    class AttrEager(torch.autograd.Function):
        """_EagerAttention with q, k, v, lse kept as ctx attributes and only O saved (a candidate)."""
        @staticmethod
        def forward(ctx, a, b, c, r):
            o_, lse_ = r.forward(a, b, c)
            ctx.save_for_backward(o_)
            ctx.t, ctx.route = (a, b, c, lse_), r
            return o_

        @staticmethod
        def backward(ctx, g):
            o_, = ctx.saved_tensors
            a, b, c, lse_ = ctx.t
            return (*ctx.route.backward(a, b, c, o_, lse_, g), None)

    r = api.route(qg, kg, vg, False, 0.125, "cupy")
    c_apply = torch._C._FunctionBase.__dict__["apply"].__get__(None, _EagerAttention)
    grad = lambda y: torch.autograd.grad(y, (qg, kg, vg), do)
    fns = {
        "_EagerAttention through the C apply": lambda: grad(c_apply(qg, kg, vg, r)),
        "AttrEager (attributes, O saved)": lambda: grad(AttrEager.apply(qg, kg, vg, r)),
        "route.backward (direct)": lambda: r.backward(q, k, v, o, lse, do),
        "route.forward (direct)": lambda: r.forward(q, k, v),
        "Empty3 fwd+bwd": lambda: grad(Empty3.apply(qg, kg, vg)),
        "Saved3 fwd+bwd": lambda: grad(Saved3.apply(qg, kg, vg)),
        "FwdOnly fwd+bwd (flashlib forward, no bwd kernel)": lambda: grad(FwdOnly.apply(qg, kg, vg)),
        "_EagerAttention fwd+bwd": lambda: grad(_EagerAttention.apply(qg, kg, vg, r)),
        "flashlib.torch sdpa fwd+bwd": lambda: grad(fsdpa(qg, kg, vg)),
        "F.sdpa fwd+bwd": lambda: grad(torch.nn.functional.scaled_dot_product_attention(qg, kg, vg)),
        "y.sum().backward() of F.sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(qg, kg, vg).sum().backward(),
        "y.sum().backward() of flashlib": lambda: fsdpa(qg, kg, vg).sum().backward(),
        "api.backward (cupy, direct)": lambda: api.backward("cupy", q, k, v, o, lse, do, False, 0.125, "float16"),
        "cupy_kernels.backward (direct)": lambda: ck.backward(q, k, v, o, lse, do, causal=False, scale=0.125,
                                                              dtype="float16"),
        "3 x torch.empty_like": lambda: (torch.empty_like(q), torch.empty_like(q), torch.empty_like(q)),
    }
    from flashlib.bench.timing import compare
    with torch.enable_grad():
        stats = compare(fns, host=True, min_rounds=10, max_rounds=10, host_calls=100, max_seconds=10)
    out.write("host us per call, 10 interleaved rounds of 100 calls (median, spread)\n")
    for name, st in stats.items():
        out.write(f"{name:52s} {st['host_us']:8.2f} us  ({100 * st['host_spread']:.0f}%)\n")
    grad(Empty3.apply(qg, kg, vg))
    out.write(f"backward thread is the caller's: {seen['thread'] == threading.get_ident()}\n")


def profile(out, label, fn, calls=3000):
    import torch
    fn()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
    out.write(f"\n==== cProfile: {label}, {calls} calls (tottime order)\n{s.getvalue()}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--autograd", action="store_true", help="only the forward + backward breakdown")
    a = ap.parse_args()
    import torch
    from flashlib.bench import public_api
    from flashlib.torch import scaled_dot_product_attention as fsdpa
    path = os.path.join(a.out, "host_profile.txt")
    with open(path, "a") as out:
        if a.autograd:
            out.write(f"# {torch.cuda.get_device_name()} torch {torch.__version__} commit {os.environ.get('FLASHLIB_COMMIT')}\n")
            autograd_steps(out)
            out.close()
            print(open(path).read())
            return
        out.write(f"# {torch.cuda.get_device_name()} torch {torch.__version__} commit {os.environ.get('FLASHLIB_COMMIT')}\n")
        host = public_api.host_table()
        for n, s in host.items():
            out.write(f"{n:55s} {s['host_us']:8.1f} us  (spread {100 * s['host_spread']:.0f}%)\n")
        json.dump(host, open(os.path.join(a.out, f"host_us_{os.environ.get('FLASHLIB_COMMIT')}.json"), "w"), indent=1)
        if a.profile:
            steps(out)
            q, k, v, do = (torch.randn(1, 1, 128, 64, device="cuda", dtype=torch.float16) for _ in range(4))
            qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
            with torch.no_grad():
                profile(out, "flashlib.torch sdpa forward, no grad", lambda: fsdpa(q, k, v))
            profile(out, "flashlib.torch forward, inputs require grad", lambda: fsdpa(qg, kg, vg))
            profile(out, "flashlib.torch forward + backward",
                    lambda: torch.autograd.grad(fsdpa(qg, kg, vg), (qg, kg, vg), do), calls=1000)
    print(open(path).read())


if __name__ == "__main__":
    main()
