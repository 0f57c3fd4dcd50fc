"""The tiling and block-sparse chapters' ladders, timed on a GPU with the Numba kernels: the naive and tiled
matmul beside cuBLAS, and block-sparse FlashAttention-2 at falling mask densities."""
import numpy as np

from .timing import time_cuda


def matmul_ladder(sizes=(512, 1024, 2048, 4096)):
    """float32 n x n matmul: the Numba naive and shared-memory tiled kernels of the tiling chapter beside cuBLAS
    (torch, TF32 off), with the tiled kernel's max error against float64. Rows {n, kernel, ms, tflops}."""
    import torch
    from numba import cuda
    from ..numba_kernels import matmul
    torch.backends.cuda.matmul.allow_tf32 = False
    rng, rows = np.random.default_rng(0), []
    for n in sizes:
        a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
        da, db = cuda.to_device(a), cuda.to_device(b)
        ta, tb = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()
        err = float(np.abs(matmul(da, db, kernel="tiled").copy_to_host() - a.astype(np.float64) @ b).max())
        for name, fn in (("naive", lambda: matmul(da, db, kernel="naive")),
                         ("tiled", lambda: matmul(da, db, kernel="tiled")), ("cublas", lambda: ta @ tb)):
            ms = time_cuda(fn, repeat=5)
            rows.append(dict(n=n, kernel=name, ms=ms, tflops=2 * n ** 3 / ms / 1e9, tiled_max_err=err))
    return rows


def block_sparse_speedup(Ns=(2048, 4096, 8192), densities=(1.0, 0.5, 0.25, 0.125), d=64, BH=16, B=32):
    """Time of the readable Numba FA2 forward (float32, B x B tiles) with random block masks of each density
    (flashlib.block_sparse.random_mask) against the dense mask. Rows {N, density, kept, ms, speedup}."""
    import torch
    from numba import cuda
    from ..block_sparse import random_mask
    from ..numba_kernels import fa2_forward
    rows = []
    for N in Ns:
        q, k, v = (cuda.as_cuda_array(torch.randn(1, BH, N, d, device="cuda")) for _ in range(3))
        T, dense = -(-N // B), None
        for rho in densities:
            m = random_mask(T, T, rho, seed=0)
            ms = time_cuda(lambda: fa2_forward(q, k, v, Br=B, Bc=B, block_mask=m), repeat=5)
            dense = dense or ms
            rows.append(dict(N=N, d=d, BH=BH, density=rho, kept=float(m.mean()), ms=ms, speedup=dense / ms))
    return rows
