"""The tiling chapter's ladder on a GPU: Numba naive and shared-memory tiled matmul beside cuBLAS, float32.

    python benchmarks/matmul_bench.py [--out DIR]     # writes matmul_<gpu>.json
"""
import argparse
import os


def main(out=None, sizes=(512, 1024, 2048, 4096)):
    import numpy as np
    import torch
    from numba import cuda
    from flashlib import bench
    from flashlib.numba_kernels import matmul
    torch.backends.cuda.matmul.allow_tf32 = False          # cuBLAS in true float32, like the Numba kernels
    rng, rows = np.random.default_rng(0), []
    for n in sizes:
        a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
        da, db = cuda.to_device(a), cuda.to_device(b)
        ta, tb = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()
        err = float(np.abs(matmul(da, db, kernel="tiled").copy_to_host() - a.astype(np.float64) @ b).max())
        for name, fn in (("naive", lambda: matmul(da, db, kernel="naive")),
                         ("tiled", lambda: matmul(da, db, kernel="tiled")), ("cublas", lambda: ta @ tb)):
            ms = bench.time_cuda(fn, repeat=5)
            rows.append(dict(n=n, kernel=name, ms=ms, tflops=2 * n ** 3 / ms / 1e9, tiled_max_err=err))
            print(rows[-1], flush=True)
    return bench.save("matmul_h100", rows, directory=out, dtype="float32", tile=16)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT"))
    print(main(ap.parse_args().out))
