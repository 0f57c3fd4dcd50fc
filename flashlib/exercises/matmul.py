"""Chapter 05: the tiled matrix multiply, in NumPy and as a Numba kernel."""
import math

import numpy as np

from .grading import _compare, _grade, where_run


def _matmul_cases(rng):
    return [(f"M, K, N = {M}, {K}, {N}, T = {T}", rng.standard_normal((M, K)), rng.standard_normal((K, N)), T)
            for M, K, N, T in ((16, 16, 16, 8), (19, 23, 13, 8), (5, 3, 7, 4))]


def check_tiled_matmul(fn, strict=False, seed=0):
    """fn(A, B, T) -> C: A (M, K) @ B (K, N) computed tile by tile, T x T tiles, ragged edges included."""
    rng = np.random.default_rng(seed)
    cases = [(label, (lambda A=A, B=B, T=T: _compare("C", fn(A.copy(), B.copy(), T), A @ B)))
             for label, A, B, T in _matmul_cases(rng)]
    return _grade("check_tiled_matmul", cases, strict)


def check_matmul_kernel(kernel, T, strict=False, seed=0):
    """kernel[(ceil(N/T), ceil(M/T)), (T, T)](A, B, C): float32 device arrays, C (M, N) = A (M, K) @ B (K, N).
    C starts filled with NaN: an element the kernel never writes fails."""
    from numba import cuda
    rng = np.random.default_rng(seed)

    def case(A, B):
        def run():
            A32, B32 = A.astype(np.float32), B.astype(np.float32)
            C = cuda.to_device(np.full((A.shape[0], B.shape[1]), np.nan, np.float32))
            kernel[(math.ceil(B.shape[1] / T), math.ceil(A.shape[0] / T)), (T, T)](
                cuda.to_device(A32), cuda.to_device(B32), C)
            return _compare("C", C.copy_to_host(), A32.astype(np.float64) @ B32, rtol=1e-4, atol=1e-4)
        return run

    cases = [(label, case(A, B)) for label, A, B, _ in _matmul_cases(rng)[:2]]
    return _grade("check_matmul_kernel", cases, strict, where_run())
