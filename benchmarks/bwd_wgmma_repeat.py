"""Repeat the Hopper backward (or rung 7's forward) many times on small ragged shapes, synchronising after every
launch, to find an intermittent fault and the kernel it is in (a sticky CUDA error ends the process: run one
direction a process).

    python benchmarks/bwd_wgmma_repeat.py {forward,backward} D DTYPE CAUSAL [REPEATS]
    python benchmarks/bwd_wgmma_repeat.py case D DTYPE CAUSAL B,H,H_kv,Nq,Nk

case: bwd_wgmma_bench.py --check's inputs of one shape (its seed), rung 7's forward, then the backward, a sync after
each, saying which one faulted (for compute-sanitizer).

backward: o and lse from torch in float32 (no flashlib forward), then ck.backward(rung='bwd_wgmma') REPEATS times a
shape; forward: ck.forward (rung 7) REPEATS times a shape. Prints the first failing call, else one line a shape."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # flashlib; this folder: sys.path[0]

SHAPES = [(1, 2, 2, 97, 113), (2, 3, 3, 128, 128), (1, 2, 2, 1023, 257), (1, 4, 4, 300, 700), (1, 4, 2, 97, 113),
          (1, 2, 2, 1, 1), (4, 8, 8, 512, 512)]   # (B, H, H_kv, Nq, Nk)


def case(d, dtype, causal, shape):
    import zlib
    import torch
    from bwd_wgmma_bench import _inputs
    from flashlib import cupy_kernels as ck
    B, H, Hkv, Nq, Nk = shape
    q, k, v, do = _inputs(B, H, Hkv, Nq, Nk, d, dtype, zlib.crc32(repr((B, H, Nq, Nk, d)).encode()))
    scale = d ** -0.5
    for name, call in (("forward", lambda: ck.forward(q, k, v, causal=causal, scale=scale, dtype=dtype)),):
        o, lse = call()
        torch.cuda.synchronize()
        print(f"{name} done: o finite {bool(torch.isfinite(o).all())}, lse {lse.min().item():.3g} .. {lse.max().item():.3g}",
              flush=True)
    ck.backward(q, k, v, o, lse, do, causal=causal, scale=scale, dtype=dtype, rung="bwd_wgmma")
    torch.cuda.synchronize()
    print("backward done", flush=True)


def sequence(d, backward, precompile, naive=False):
    """bwd_wgmma_bench.py --check's calls at head dim d in its order (forward only unless `backward`), with or without
    its precompile in threads first, with or without its float64 and naive torch references (`naive`); a sync after
    each call. Before each forward, q's cached tensor map (tma.map_bytes) is compared with a fresh encoding."""
    import ctypes
    import zlib
    import torch
    import bwd_wgmma_bench as bb
    from flashlib import cupy_kernels as ck
    from flashlib.cupy_kernels import tma
    from tests.test_cupy_kernels import _gqa_naive, _gqa_reference
    if precompile:
        bb.precompile((d,))
    for (dtype, _), causal, (B, H, Hkv, Nq, Nk) in [(k, c, s) for k in bb.KINDS if k[1] == d for c in (False, True)
                                                    for s in bb.CHECKS]:
        q, k, v, do = bb._inputs(B, H, Hkv, Nq, Nk, d, dtype, zlib.crc32(repr((B, H, Nq, Nk, d)).encode()))
        where = f"{dtype} causal={causal} {(B, H, Hkv, Nq, Nk)} ptrs q {q.data_ptr():#x} k {k.data_ptr():#x} v {v.data_ptr():#x}"
        if naive:
            _gqa_reference(q, k, v, do, causal, d ** -0.5)
            _gqa_naive(q, k, v, do, causal, d ** -0.5)
        cfg = ck.choose_config(dtype, d, 90, causal)
        key = (q.data_ptr(), dtype, d, Nq, B * H, cfg.Br)
        fresh = ctypes.string_at(ctypes.addressof(tma.tensor_map_3d(*key).arg), 128)
        if tma.map_bytes(*key) != fresh:
            print(f"STALE MAP {where}", flush=True)
        try:
            o, lse = ck.forward(q, k, v, causal=causal, scale=d ** -0.5, dtype=dtype)
            torch.cuda.synchronize()
            if backward:
                ck.backward(q, k, v, o, lse, do, causal=causal, scale=d ** -0.5, dtype=dtype, rung="bwd_wgmma")
                torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001
            print(f"FAULT {where}: {e!r}"[:300], flush=True)
            sys.exit(1)
        print(f"ok {where}", flush=True)


def main():
    import torch
    from flashlib import cupy_kernels as ck
    way, d, dtype, causal = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
    if way == "sequence":   # sequence D BACKWARD(0/1) PRECOMPILE(0/1) [NAIVE(0/1)]
        return sequence(d, dtype == "1", causal, len(sys.argv) > 5 and sys.argv[5] == "1")
    if way == "case":
        return case(d, dtype, causal, tuple(int(x) for x in sys.argv[5].split(",")))
    reps = int(sys.argv[5]) if len(sys.argv) > 5 else 50
    for B, H, Hkv, Nq, Nk in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(Nq * 7 + Nk)
        mk = lambda h, n: torch.randn(B, h, n, d, device="cuda", generator=g).to(getattr(torch, dtype))
        q, k, v, do = mk(H, Nq), mk(Hkv, Nk), mk(Hkv, Nk), mk(H, Nq)
        scale = d ** -0.5
        kk, vv = (x.float().repeat_interleave(H // Hkv, 1) for x in (k, v))
        s = q.float() @ kk.transpose(-1, -2) * scale
        if causal:
            s = s.masked_fill(torch.ones(Nq, Nk, device="cuda", dtype=torch.bool).triu(1), float("-inf"))  # top-left
        lse = torch.logsumexp(s, -1)
        lse = torch.nan_to_num(lse, neginf=float("inf"))
        o = torch.nan_to_num(torch.softmax(s, -1)) @ vv
        o = o.to(q.dtype)
        torch.cuda.synchronize()
        for i in range(reps):
            try:
                if way == "backward":
                    ck.backward(q, k, v, o, lse.contiguous(), do, causal=causal, scale=scale, dtype=dtype, rung="bwd_wgmma")
                else:
                    ck.forward(q, k, v, causal=causal, scale=scale, dtype=dtype)
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001
                print(f"FAULT {way} d={d} {dtype} causal={causal} shape={(B, H, Hkv, Nq, Nk)} call {i}: {e!r}"[:400],
                      flush=True)
                sys.exit(1)
        print(f"ok {way} d={d} {dtype} causal={causal} shape={(B, H, Hkv, Nq, Nk)} x{reps}", flush=True)


if __name__ == "__main__":
    main()
