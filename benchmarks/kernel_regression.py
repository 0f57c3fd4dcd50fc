"""Did a kernel change make anything slower? The CuPy kernels of an older commit against the current ones, compiled
the same way and timed interleaved in one run (fp16, B = 4, H = 16, N = 4096, d = 64 and 128, causal and not).

    git show 7b578f9:flashlib/cupy_kernels/fa2_tc.cu > old/fa2_tc.cu  (and the other .cu/.cuh files)
    python benchmarks/kernel_regression.py old 7b578f9 --out DIR     # -> DIR/kernel_regression_<gpu>.json

The old kernels take (..., Nq, Nk, scale) and run on grid (tiles, B*H); the current ones add (B*H, G) and run on
pair_grid. The backward compares the main Tensor Core kernel (fa2_bwd_tc) alone. Each round times `reps` launches
of each candidate with CUDA events, the order of the two alternating from round to round; medians over the rounds.
"""
import argparse
import concurrent.futures
import multiprocessing
import os
import pathlib
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flashlib import bench  # noqa: E402
from flashlib import cupy_kernels as ck  # noqa: E402
from flashlib.constants import STATIC_SMEM_BYTES, attention_flops, backward_flops, default_scale  # noqa: E402

B, H, N = 4, 16, 4096
CASES = [(rung, d, causal) for rung in ("wgmma", "tuned", "bwd_tc") for d in (64, 128) for causal in (False, True)]


def build(job):
    """(folder, file, name) -> (cubin bytes, lowered name), compiled by NVRTC as flashlib does (sm_90a for wgmma)."""
    from cupy_backends.cuda.libs import nvrtc
    folder, file, name = job
    prog = nvrtc.createProgram(pathlib.Path(folder, file).read_text(), file, (), ())
    # as flashlib compiles them: wgmma for sm_90a with -ftz=true (ck._kernel_sm90a), the others as CuPy's RawModule
    arch = ("-arch=sm_90a", "-ftz=true") if file == "fa2_wgmma.cu" else ("-arch=sm_90",)
    opts = ("-std=c++17", f"-I{folder}", *(f"-I{d}" for d in ck.cuda_include_dirs()), *arch)
    try:
        nvrtc.addNameExpression(prog, name)
        nvrtc.compileProgram(prog, opts)
        return nvrtc.getCUBIN(prog), nvrtc.getLoweredName(prog, name)
    finally:
        nvrtc.destroyProgram(prog)


def load(cubin, lowered, smem):
    import cupy as cp
    mod = cp.cuda.function.Module()
    mod.load(cubin)
    fn = mod.get_function(lowered)
    if smem > STATIC_SMEM_BYTES:
        cp.cuda.driver.funcSetAttribute(fn.ptr, cp.cuda.driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
    return fn, mod


def main():
    import cupy as cp
    ap = argparse.ArgumentParser()
    ap.add_argument("old_dir")
    ap.add_argument("old_commit")
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rungs", default="wgmma,tuned,bwd_tc", help="comma-separated subset of the rungs timed")
    a = ap.parse_args()
    cases = [c for c in CASES if c[0] in a.rungs.split(",")]
    cfgs = [ck.choose_config("float16", d, 90, causal, rung) for rung, d, causal in cases]
    jobs = [(folder, c.file, c.kernel) for c in cfgs for folder in (a.old_dir, str(ck.HERE))]
    with concurrent.futures.ProcessPoolExecutor(min(16, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as ex:
        built = list(ex.map(build, jobs))
    rng = cp.random.default_rng(0)
    mk = lambda *s: rng.standard_normal(s, dtype=cp.float32).astype(cp.float16)
    q, k, v, do = mk(B, H, N, 128), mk(B, H, N, 128), mk(B, H, N, 128), mk(B, H, N, 128)
    rows, keep = [], []
    for i, ((rung, d, causal), cfg) in enumerate(zip(cases, cfgs)):
        qd, kd, vd, dod = (cp.ascontiguousarray(x[..., :d]) for x in (q, k, v, do))
        scale = default_scale(d)
        o, lse = ck.forward(qd, kd, vd, causal=causal, scale=scale, dtype="float16", rung="tuned")
        fns = []
        for j, label in enumerate(("old", "new")):
            fn, mod = load(*built[2 * i + j], cfg.smem)
            keep.append(mod)
            extra = () if label == "old" else (cp.int32(B * H), cp.int32(1)) + ((cp.int32(0),) if rung == "bwd_tc" else ())
            if rung == "bwd_tc":
                delta = (dod.astype(cp.float32) * o.astype(cp.float32)).sum(-1)     # the paper's D = rowsum(dO * O)
                dq_acc, dk, dv = cp.zeros(qd.shape, cp.float32), cp.empty_like(kd), cp.empty_like(vd)
                tiles = -(-N // cfg.Bc)
                args = (qd, kd, vd, dod, lse, delta, dq_acc, dk, dv, cp.int32(N), cp.int32(N), cp.float32(scale))
            else:
                out, lse_o = cp.empty_like(qd), cp.empty_like(lse)
                tiles = -(-N // cfg.Br)
                args = (qd, kd, vd, out, lse_o, cp.int32(N), cp.int32(N), cp.float32(scale))
            grid = (tiles, B * H) if label == "old" else ck.pair_grid(tiles, B * H)
            fns.append(lambda fn=fn, grid=grid, args=args + extra: fn(grid, (32 * cfg.warps,), args, shared_mem=cfg.smem))
        times = {0: [], 1: []}
        for f in fns:  # warm-up
            f()
        for r in range(a.rounds):
            for j in ((0, 1) if r % 2 == 0 else (1, 0)):
                e0, e1 = cp.cuda.Event(), cp.cuda.Event()
                e0.record()
                for _ in range(a.reps):
                    fns[j]()
                e1.record()
                e1.synchronize()
                times[j].append(cp.cuda.get_elapsed_time(e0, e1) / a.reps)
        flops = (backward_flops if rung == "bwd_tc" else attention_flops)(B, H, N, d, causal)
        t_old, t_new = (statistics.median(times[j]) for j in (0, 1))
        row = dict(rung=rung, d=d, causal=causal, N=N, B=B, H=H, kernel=cfg.kernel, old_ms=t_old, new_ms=t_new,
                   old_tflops=flops / t_old / 1e9, new_tflops=flops / t_new / 1e9, new_over_old=t_new / t_old,
                   old_spread=[min(times[0]), max(times[0])], new_spread=[min(times[1]), max(times[1])])
        rows.append(row)
        print(f"{rung:7s} d={d:3d} causal={causal!s:5s}  old {row['old_tflops']:6.1f}  new {row['new_tflops']:6.1f} "
              f"TFLOP/s  new/old time {row['new_over_old']:.3f}", flush=True)
    name = f"kernel_regression_{bench.gpu_tag()}"
    print(bench.save(name, rows, directory=a.out, old_commit=a.old_commit, rounds=a.rounds, reps=a.reps,
                     method="CUDA events over reps back-to-back launches, old/new order alternating per round"))


if __name__ == "__main__":
    main()
