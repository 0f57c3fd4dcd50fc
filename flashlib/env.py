"""Where are we running: is there a CUDA GPU, and should Numba use its simulator?

Asked through the CUDA driver library directly (ctypes), so nothing here imports numba.cuda: the simulator
can only be chosen before that import.
"""
import ctypes
import os
import sys


def gpu_count():
    """Number of CUDA devices the driver reports; 0 when there is no driver or no GPU."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        n = ctypes.c_int(0)
        if lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(n)) == 0:
            return n.value
        return 0
    return 0


def simulated():
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def setup(verbose=True):
    """Pick the execution mode once, at the top of a notebook; returns True when a real GPU is used.

    Without a GPU, Numba's CUDA simulator is selected (kernels run in Python, at small sizes) and the GPU
    figures come from recorded runs. Must run before anything imports numba.cuda.
    """
    has_gpu = gpu_count() > 0 and not simulated()
    if not has_gpu:
        if "numba.cuda" in sys.modules and not simulated():
            raise RuntimeError("numba.cuda was imported before flashlib.setup(); restart and call setup() first")
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    if verbose:
        print(_describe(has_gpu))
    return has_gpu


def _describe(has_gpu):
    if has_gpu:
        from numba import cuda
        dev = cuda.get_current_device()
        return f"GPU: {dev.name.decode() if isinstance(dev.name, bytes) else dev.name}, compute capability {dev.compute_capability}"
    return ("No CUDA GPU here: Numba kernels run in its CUDA simulator at small sizes,\n"
            "CuPy kernels are compiled but not launched, and GPU figures come from runs\n"
            "recorded in flashlib/data/results/.")
