"""Where are we running: is there a CUDA GPU, and should Numba use its simulator?

Asked through the CUDA driver library directly (ctypes), so nothing here imports numba.cuda: the simulator
can only be chosen before that import.
"""
import ctypes
import functools
import os
import sys

# CUdevice_attribute values of the CUDA driver API (cuda.h)
_CC_MAJOR, _CC_MINOR = 75, 76


@functools.lru_cache(maxsize=1)
def _driver():
    """The CUDA driver library, initialised; None when there is none (or cuInit fails: no GPU)."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        return lib if lib.cuInit(0) == 0 else None
    return None


def _device(index):
    lib, dev = _driver(), ctypes.c_int(0)
    if lib is None or index >= gpu_count() or lib.cuDeviceGet(ctypes.byref(dev), index) != 0:
        return None, None
    return lib, dev


def gpu_count():
    """Number of CUDA devices the driver reports; 0 when there is no driver or no GPU."""
    lib, n = _driver(), ctypes.c_int(0)
    return n.value if lib is not None and lib.cuDeviceGetCount(ctypes.byref(n)) == 0 else 0


@functools.lru_cache(maxsize=8)
def compute_capability(index=0):
    """(major, minor) of CUDA device `index`, e.g. (9, 0) for an H100, asked once from the driver; None without
    a GPU. The one query of it in flashlib: other forms ('9.0', 90) are made from this tuple where needed."""
    lib, dev = _device(index)
    if lib is None:
        return None
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    lib.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, dev)
    lib.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, dev)
    return major.value, minor.value


def cc_tuple(cc):
    """A compute capability as a tuple, from (9, 0), '9.0' or 90."""
    if isinstance(cc, str):
        return tuple(int(x) for x in cc.split("."))
    if isinstance(cc, int):
        return divmod(cc, 10)
    return tuple(int(x) for x in cc)


def cc_text(cc):
    """A compute capability as the datasheets write it: '9.0'."""
    return "{}.{}".format(*cc_tuple(cc))


@functools.lru_cache(maxsize=8)
def gpu_name(index=0):
    """The name of CUDA device `index` ('NVIDIA H100 80GB HBM3'), from the driver; None without a GPU."""
    lib, dev = _device(index)
    if lib is None:
        return None
    buf = ctypes.create_string_buffer(256)
    return buf.value.decode() if lib.cuDeviceGetName(buf, len(buf), dev) == 0 else None


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
        return f"GPU: {gpu_name()}, compute capability {cc_text(compute_capability())}"
    return ("No CUDA GPU here: Numba kernels run in its CUDA simulator at small sizes,\n"
            "CuPy kernels are compiled but not launched, and GPU figures come from runs\n"
            "recorded in flashlib/data/results/.")
