"""Matrix multiply C = A @ B in float32: the tiling chapter's two rungs.

kernel 1 `matmul_naive`: one thread per element of C, reading a row of A and a column of B from global memory
    (2K loads for 2K flops: bound by memory).
kernel 2 `matmul_tiled`: shared-memory tiling. Each TILE x TILE block of threads loads a TILE x TILE tile of A and of
    B into shared memory, synchronises, and every thread does TILE multiply-adds from shared memory: each global
    element is read N/TILE times instead of N times.

A (M, K), B (K, N) -> C (M, N); any M, N, K (ragged edges are padded with zeros in shared memory).
"""
import functools
import math

import numpy as np
from numba import cuda, float32

TILE = 16


@cuda.jit
def matmul_naive(A, B, C):
    """Grid (ceil(N/16), ceil(M/16)), block (16, 16): thread (x, y) owns C[row = y, col = x]."""
    col, row = cuda.grid(2)
    if row < C.shape[0] and col < C.shape[1]:
        acc = float32(0.0)
        for k in range(A.shape[1]):
            acc += A[row, k] * B[k, col]
        C[row, col] = acc


@functools.lru_cache(maxsize=None)
def make_matmul_tiled(T=TILE):
    @cuda.jit
    def matmul_tiled(A, B, C):
        """Grid (ceil(N/T), ceil(M/T)), block (T, T): thread (tx, ty) owns C[row, col] in a register `acc`.
        Shared memory: As, Bs (T x T each), the current K-slice of A's row tile and B's column tile."""
        As = cuda.shared.array((T, T), float32)
        Bs = cuda.shared.array((T, T), float32)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        row = cuda.blockIdx.y * T + ty
        col = cuda.blockIdx.x * T + tx
        M, K, N = A.shape[0], A.shape[1], B.shape[1]
        acc = float32(0.0)
        for t in range((K + T - 1) // T):
            k = t * T
            As[ty, tx] = A[row, k + tx] if row < M and k + tx < K else float32(0.0)   # coalesced over tx
            Bs[ty, tx] = B[k + ty, col] if k + ty < K and col < N else float32(0.0)
            cuda.syncthreads()                       # the tiles are complete before anyone reads them
            for kk in range(T):
                acc += As[ty, kk] * Bs[kk, tx]
            cuda.syncthreads()                       # everyone is done before the next tiles overwrite them
        if row < M and col < N:
            C[row, col] = acc
    return matmul_tiled


def matmul(a, b, kernel="tiled", tile=TILE):
    """C = a @ b on the GPU (or the simulator). a (M, K), b (K, N): float32 NumPy or device arrays.
    Returns a device array (M, N) float32 (call .copy_to_host() for NumPy)."""
    if kernel not in ("naive", "tiled"):
        raise ValueError(f"kernel must be 'naive' or 'tiled', got {kernel!r}")
    a = cuda.to_device(np.ascontiguousarray(a, np.float32)) if isinstance(a, np.ndarray) else a
    b = cuda.to_device(np.ascontiguousarray(b, np.float32)) if isinstance(b, np.ndarray) else b
    if a.dtype != np.float32 or b.dtype != np.float32:
        raise ValueError("matmul accepts float32 only")
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"need a (M, K) and b (K, N), got {tuple(a.shape)} and {tuple(b.shape)}")
    M, N = a.shape[0], b.shape[1]
    c = cuda.device_array((M, N), np.float32)
    T = TILE if kernel == "naive" else tile
    grid = (math.ceil(N / T), math.ceil(M / T))
    fn = matmul_naive if kernel == "naive" else make_matmul_tiled(T)
    fn[grid, (T, T)](a, b, c)
    return c
