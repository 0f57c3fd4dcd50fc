"""Block-sparse speed-up on a GPU: the readable Numba FA2 kernel with block masks of decreasing density.

    python benchmarks/block_sparse_bench.py [--out DIR]      # writes block_sparse_<gpu>.json

float32, B * H = 16, d = 64, Br = 32, Bc = 32. Each mask keeps the diagonal tile band and a random fraction of
the rest (seeded); the speed-up is dense time over sparse time, beside the fraction of tiles kept, the bound
the paper's Proposition 4 gives for the IO.
"""
import argparse
import os

import numpy as np


def masks(Tr, Tc, densities=(1.0, 0.5, 0.25, 0.125), seed=0):
    rng = np.random.default_rng(seed)
    for rho in densities:
        m = rng.random((Tr, Tc)) < rho
        m[np.arange(Tr), np.minimum(np.arange(Tr), Tc - 1)] = True       # every row keeps a tile
        yield rho, m


def main(out=None, Ns=(2048, 4096, 8192)):
    import torch
    from numba import cuda
    from flashlib import bench
    from flashlib.numba_kernels import fa2_forward
    rows, Br = [], 32
    for N in Ns:
        q, k, v = (cuda.as_cuda_array(torch.randn(1, 16, N, 64, device="cuda")) for _ in range(3))
        T = -(-N // Br)
        dense = None
        for rho, m in masks(T, T):
            ms = bench.time_cuda(lambda: fa2_forward(q, k, v, Br=Br, Bc=Br, block_mask=m), repeat=5)
            dense = dense or ms
            rows.append(dict(N=N, d=64, BH=16, density=rho, kept=float(m.mean()), ms=ms, speedup=dense / ms))
            print(rows[-1], flush=True)
    return bench.save("block_sparse_h100", rows, directory=out, kernel="numba fa2_forward (readable)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT"))
    print(main(ap.parse_args().out))
