"""The tiling chapter's ladder on a GPU: Numba naive and shared-memory tiled matmul beside cuBLAS, float32.

    python benchmarks/matmul_bench.py [--out DIR]     # writes matmul_h100.json (flashlib.bench.ladders.matmul_ladder)
"""
import argparse
import os

if __name__ == "__main__":
    from flashlib import bench
    from flashlib.bench.ladders import matmul_ladder
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT"))
    rows = matmul_ladder()
    print("\n".join(str(r) for r in rows))
    print(bench.save("matmul_h100", rows, directory=ap.parse_args().out, dtype="float32", tile=16))
