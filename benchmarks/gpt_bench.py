"""The GPU measurements of chapters 11-13, in one run (a real CUDA GPU needed):

    python benchmarks/gpt_bench.py [--out DIR] [--tag h100] [--gpt-seconds 150]

writes three files with provenance (flashlib.bench.save):
  sdpa_<tag>.json         which SDPA backends accept which inputs (and PyTorch's reasons), the kernels the
                          profiler saw, and forward / forward+backward times of every backend, naive attention and
                          flashlib's kernels at a few shapes                                  (chapter 11)
  gpt_<tag>.json          the small GPT trained with naive attention, SDPA and flashlib.torch: the loss of every
                          step, ms/step, tokens/s, peak memory                                (chapter 12)
  cuda_graphs_<tag>.json  kernels launched one by one vs replayed from a CUDA graph (PyTorch and CuPy) (chapter 13)
"""
import argparse
import importlib
import time
import traceback

import torch

import flashlib
from flashlib import bench, gpt
from flashlib import torch as ft
from flashlib.bench import graphs, sdpa as sdpa_info
from flashlib.bench.shapes import HEADS, workload


def importable(backend):
    try:
        importlib.import_module(f"flashlib.{backend}_kernels")
        return backend in flashlib.available_backends()
    except Exception as e:
        print(f"flashlib.{backend}_kernels: {type(e).__name__}: {e}")
        return False


def sdpa_part(out, tag, backends):
    dev, f16 = "cuda", torch.float16
    rnd = lambda *shape, dtype=f16: torch.randn(*shape, device=dev, dtype=dtype)
    q = rnd(2, 8, 1024, 64)
    cases = {   # name: (q, k, v, kwargs)
        "fp16, d=64, causal": (q, q, q, dict(is_causal=True)),
        "bf16, d=128": (*(rnd(2, 8, 1024, 128, dtype=torch.bfloat16),) * 3, {}),
        "fp32, d=64": (*(rnd(2, 8, 1024, 64, dtype=torch.float32),) * 3, {}),
        "fp16, boolean attn_mask": (q, q, q, dict(attn_mask=torch.ones(1024, 1024, device=dev, dtype=torch.bool).tril())),
        "fp16, additive float mask": (q, q, q, dict(attn_mask=rnd(1024, 1024))),
        "fp16, dropout_p=0.1": (q, q, q, dict(dropout_p=0.1)),
        "fp16, d=72 (not a multiple of 16)": (*(rnd(2, 8, 1024, 72),) * 3, {}),
        "fp16, d=256": (*(rnd(2, 8, 1024, 256),) * 3, {}),
        "fp16, d=512": (*(rnd(2, 8, 256, 512),) * 3, {}),
        "fp16, Nq=1 (decoding)": (rnd(2, 8, 1, 64), q, q, {}),
        "fp16, GQA 8 query heads / 2 kv heads": (q, rnd(2, 2, 1024, 64), rnd(2, 2, 1024, 64), dict(enable_gqa=True)),
    }
    support = []
    for name, (a, b, c, kw) in cases.items():
        res = sdpa_info.sdpa_support(a, b, c, **kw)
        chosen = sdpa_info.kernels_that_ran(lambda: torch.nn.functional.scaled_dot_product_attention(a, b, c, **kw))
        support.append({"case": name, "accepted_by": {k: v is None for k, v in res.items()}, "reasons": res,
                        "default_dispatch_ops": chosen})
        print("support", name, {k: v is None for k, v in res.items()})
    kernels = {}
    for name in ("flash", "cudnn", "efficient", "math"):
        kernels[name] = sdpa_info.kernels_that_ran(lambda: sdpa_info.sdpa_pinned(name, q, q, q, is_causal=True))
    kernels["default"] = sdpa_info.kernels_that_ran(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True))
    for b in backends:
        kernels[f"flashlib:{b}"] = sdpa_info.kernels_that_ran(
            lambda: ft.scaled_dot_product_attention(q if b == "cupy" else q.float(), q if b == "cupy" else q.float(),
                                                    q if b == "cupy" else q.float(), is_causal=True, backend=b))
    timing = []
    impls16 = ["flash", "cudnn", "efficient", "math", "naive"] + [f"flashlib:{b}" for b in backends if b == "cupy"]
    impls32 = ["efficient", "math", "naive"] + [f"flashlib:{b}" for b in backends]
    for d in (64, 128):
        for N in (1024, 4096):
            B = 2 * workload(N)[0]                          # twice the benchmarks' batch
            for causal in (False, True):
                for impl in impls16:
                    timing.append(sdpa_info.time_attention(impl, B, HEADS, N, d, torch.float16, causal))
                    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in timing[-1].items()})
    for impl in impls32:
        timing.append(sdpa_info.time_attention(impl, 8, 16, 1024, 64, torch.float32, True))
        print(timing[-1])
    bench.save(f"sdpa_{tag}", timing, directory=out, support=support, kernels=kernels,
               shapes="B = 32768/N, H = 16; fp16 unless noted; TFLOP/s = 4BHN^2d/t (half if causal), x3.5 fwd+bwd")


def graphs_part(out, tag):
    rows = []
    for numel in (1_000, 100_000, 10_000_000):
        for n_ops in (10, 100, 500):
            fn, n = graphs.elementwise_chain(numel, n_ops)
            rows.append({"library": "torch", "workload": "elementwise chain", "numel": numel, **graphs.eager_vs_graph(fn, n)})
            print(rows[-1])
    for numel in (1_000, 10_000_000):
        rows.append({"library": "cupy", "workload": "elementwise chain", "numel": numel,
                     **graphs.cupy_eager_vs_graph(numel, 100)})
        print(rows[-1])
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    rows.append({"library": "torch", "workload": "8192^3 bf16 matmul x 10", "numel": a.numel(),
                 **graphs.eager_vs_graph(lambda: [a @ a for _ in range(10)], 10)})
    print(rows[-1])
    data = gpt.CharData()
    for block, batch in ((64, 1), (256, 16)):
        cfg = gpt.GPTConfig(vocab_size=data.vocab_size, block_size=block)
        torch.manual_seed(0)
        model = gpt.GPT(cfg, gpt.attention_fn("sdpa")).cuda().eval()
        x = torch.randint(0, data.vocab_size, (batch, block), device="cuda")
        with torch.no_grad():
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                model(x)
                torch.cuda.synchronize()
            n = sum(1 for e in prof.events() if "CUDA" in str(e.device_type)) or None
            rows.append({"library": "torch", "workload": f"GPT forward, batch {batch} x {block} tokens",
                         "numel": batch * block, **graphs.eager_vs_graph(lambda: model(x), n)})
        print(rows[-1])
    bench.save(f"cuda_graphs_{tag}", rows, directory=out,
               note="ms from CUDA events around one call (eager) or one graph.replay()/launch(), median of 20")


def gpt_part(out, tag, backends, seconds):
    data = gpt.CharData()
    cfg = gpt.GPTConfig(block_size=1024, n_layer=4, n_head=4, n_embd=256)
    batch = 32
    runs, notes = [], []
    sets = []
    if "cupy" in backends:
        sets.append((torch.bfloat16, "cupy"))
    if "numba" in backends:
        sets.append((None, "numba"))
    elif "cupy" in backends:
        sets.append((None, "cupy"))
    if not sets:
        notes.append("no flashlib GPU backend imported: naive and SDPA only")
        sets.append((torch.bfloat16, None))
    share = seconds / len(sets)
    for amp, backend in sets:
        # probe the slowest-to-guess model (flashlib) for 8 steps, then give every model the same step count
        names = [("naive", "auto"), ("sdpa", "auto")] + ([("flashlib", backend)] if backend else [])
        t0 = time.perf_counter()
        probe_ms = []
        for name, be in names:
            try:
                probe_ms.append(gpt.train(cfg, name, be, steps=8, batch=batch, device="cuda", amp=amp, data=data,
                                          warmup=3)[0]["ms_per_step"])
            except Exception as e:
                notes.append(f"{name}/{be}/{amp}: {type(e).__name__}: {e}")
                traceback.print_exc()
                probe_ms.append(None)
        good = [(n, m) for n, m in zip(names, probe_ms) if m]
        names = [n for n, _ in good]
        left = share - (time.perf_counter() - t0)
        steps = int(max(40, min(400, 1e3 * left / (1.3 * sum(m for _, m in good)))))
        print(f"amp={amp} probe ms/step {probe_ms} -> {steps} steps")
        for name, be in names:
            r = gpt.train(cfg, name, be, steps=steps, batch=batch, device="cuda", amp=amp, data=data)[0]
            runs.append(r)
            print(name, be, r["amp"], r["steps"], round(r["ms_per_step"], 2), round(r["tokens_per_s"]),
                  round(r["peak_memory_MB"]), r["losses"][-1], r["val_loss"])
    profiles = {}
    amp0, backend0 = sets[0]
    for name, be in [("naive", "auto"), ("sdpa", "auto")] + ([("flashlib", backend0)] if backend0 else []):
        try:
            profiles[name] = profile_steps(cfg, name, be, amp0, batch, data)
        except Exception as e:
            profiles[name] = {"error": f"{type(e).__name__}: {e}"}
    q = torch.randn(batch, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head, device="cuda")
    sdpa_ops = {dt: sdpa_info.kernels_that_ran(lambda: torch.nn.functional.scaled_dot_product_attention(
        q.to(dt), q.to(dt), q.to(dt), is_causal=True)) for dt in (torch.bfloat16, torch.float32)}
    bench.save(f"gpt_{tag}", runs, directory=out, notes=notes, text="pydoc_data.topics (Python's help texts)",
               sdpa_ops={str(k): v for k, v in sdpa_ops.items()}, profiles=profiles)


def profile_steps(cfg, name, backend, amp, batch, data, steps=6):
    """Where a training step's time goes: torch.profiler over a few steps, top operators by GPU and CPU time."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        gpt.train(cfg, name, backend, steps=steps, batch=batch, device="cuda", amp=amp, data=data, warmup=2)
    ev = prof.key_averages()
    kernels = [e for e in prof.events() if "CUDA" in str(e.device_type)]        # GPU-side events only, once each
    out = {"gpu_kernel_ms_per_step": sum(getattr(e, "device_time_total", 0) or 0 for e in kernels) / 1e3 / steps,
           "cpu_self_ms_per_step": sum(e.self_cpu_time_total for e in ev) / 1e3 / steps,   # inflated by the profiler
           "by_gpu": ev.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60),
           "by_cpu": ev.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60)}
    print(name, backend, "profiled: GPU kernels ms/step", round(out["gpu_kernel_ms_per_step"], 2))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--tag", default="h100")
    ap.add_argument("--gpt-seconds", type=float, default=150)
    ap.add_argument("--parts", default="sdpa,graphs,gpt")
    args = ap.parse_args()
    flashlib.setup()
    backends = [b for b in ("cupy", "numba") if importable(b)]
    print("flashlib GPU backends:", backends)
    for part in args.parts.split(","):
        t = time.perf_counter()
        try:
            if part == "sdpa":
                sdpa_part(args.out, args.tag, backends)
            elif part == "graphs":
                graphs_part(args.out, args.tag)
            elif part == "gpt":
                gpt_part(args.out, args.tag, backends, args.gpt_seconds)
        except Exception:
            traceback.print_exc()
        print(f"== {part}: {time.perf_counter() - t:.1f} s", flush=True)
