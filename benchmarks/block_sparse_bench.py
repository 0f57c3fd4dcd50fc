"""Block-sparse speed-up on a GPU: the readable Numba FA2 kernel with block masks of decreasing density.

    python benchmarks/block_sparse_bench.py [--out DIR]      # writes block_sparse_h100.json

float32, B * H = 16, d = 64, 32 x 32 tiles. Each mask keeps a random fraction of the tiles plus the diagonal
(flashlib.block_sparse.random_mask, seeded); the speed-up is dense time over sparse time, to compare with
1 / (fraction kept), the bound the paper's Proposition 4 gives for the IO.
"""
import argparse
import os

if __name__ == "__main__":
    from flashlib import bench
    from flashlib.bench.ladders import block_sparse_speedup
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT"))
    rows = block_sparse_speedup()
    print("\n".join(str(r) for r in rows))
    print(bench.save("block_sparse_h100", rows, directory=ap.parse_args().out, kernel="numba fa2_forward (readable)"))
