"""Compiling and loading the cupy backend's kernels, and launching them with a prepared parameter block.

CuPy is imported here only inside functions: importing flashlib.cupy_kernels needs neither CuPy nor a GPU.

A kernel is compiled once per (GPU, file, template instance, architecture) by NVRTC: through CuPy's RawModule
(cached on disk by CuPy) for the GPU's own architecture, or directly for an architecture-specific target such as
sm_90a (wgmma exists only there; CuPy would add its own -arch). `Launcher` then launches it by the CUDA driver's
cuLaunchKernel (CuPy's `driver.launchKernel`) from a parameter block allocated once: a call writes the arguments'
values into it and launches, with no per-call conversion of Python objects into kernel arguments.
"""
import ctypes
import functools
import os
import pathlib
import struct
import threading

from ..constants import STATIC_SMEM_BYTES

HERE = pathlib.Path(__file__).resolve().parent


# the kernel parameter kinds of a Launcher signature, as struct formats: P a device pointer, Q a uint64, i an int32,
# f a float32, M a CUtensorMap (128 bytes, passed by value: rung 7's TMA descriptors)
_FORMAT = {"P": "Q", "Q": "Q", "i": "i", "f": "f", "M": "128s"}


class Launcher:
    """One loaded kernel and its parameter block. `sig` spells the parameters, one letter of _FORMAT each.
    launcher(grid, block, args, shared_mem, stream) launches on the stream handle `stream` (an int: cudaStream_t;
    0 is the legacy default stream). The arguments are packed into one 64-byte-aligned buffer laid out as the C
    struct of those fields (struct's native alignment), and cuLaunchKernel reads each parameter through a pointer
    into it; a lock keeps two threads from interleaving their arguments in the one buffer (cuLaunchKernel copies
    them before it returns). The launch runs in `ctx`, the CUDA context the kernel was loaded in: a thread where
    another context, or none, is current (PyTorch runs backward passes on threads of its own, which may have none)
    gets it for the launch and its own back after."""
    __slots__ = ("fn", "sig", "ctx", "_fmt", "_buf", "_at", "_params", "_lock")

    def __init__(self, fn, sig, ctx):
        if not ctx:
            raise ValueError("a Launcher needs the CUDA context its kernel was loaded in, got none (NULL)")
        self.fn, self.sig, self.ctx = fn, sig, ctx   # fn: cupy.cuda.function.Function (keeps its module loaded)
        fields = [_FORMAT[c] for c in sig]
        self._fmt = struct.Struct("@" + "".join(fields))
        self._buf = ctypes.create_string_buffer(self._fmt.size + 64)
        addr = ctypes.addressof(self._buf)
        self._at = (-addr) % 64                     # the struct's offset in the buffer: 64-byte aligned
        offsets = [struct.calcsize("@" + "".join(fields[:i + 1])) - struct.calcsize("@" + f) for i, f in enumerate(fields)]
        self._params = (ctypes.c_void_p * max(len(sig), 1))(*[addr + self._at + o for o in offsets])
        self._lock = threading.Lock()

    def __call__(self, grid, block, args, shared_mem=0, stream=0):
        gx, gy, gz = (tuple(grid) + (1, 1))[:3]
        bx, by, bz = (tuple(block) + (1, 1))[:3]
        self.launch(gx, gy, gz, bx, by, bz, shared_mem, stream, args)

    def launch(self, gx, gy, gz, bx, by, bz, shared_mem, stream, args):
        """The launch itself, grid and block given as their three sizes (what a prepared call keeps)."""
        with self._lock:
            try:
                self._fmt.pack_into(self._buf, self._at, *args)
            except struct.error as e:
                raise TypeError(f"kernel arguments {args!r} do not fit its parameters {self.sig!r}: {e}") from None
            drv = _driver()
            here = drv.ctxGetCurrent()
            if here != self.ctx:
                drv.ctxSetCurrent(self.ctx)
            try:
                drv.launchKernel(self.fn.ptr, gx, gy, gz, bx, by, bz, shared_mem, stream,
                                 ctypes.addressof(self._params), 0)
            finally:
                if here != self.ctx:
                    drv.ctxSetCurrent(here)


@functools.lru_cache(maxsize=None)
def _driver():
    from cupy_backends.cuda.api import driver
    return driver


def compile_kernel(file, name, smem=0, arch=None):
    """Compile `file` with the one template instance `name` for CuPy's current GPU (arch None: its own; or e.g.
    "sm_90a") and return the loaded cupy.cuda.function.Function (cached per GPU: a loaded CUDA module belongs to
    one device's context)."""
    import cupy as cp
    return _compiled(cp.cuda.Device().id, file, name, smem, arch)


@functools.lru_cache(maxsize=None)
def _compiled(device, file, name, smem, arch):
    import cupy as cp
    if arch is not None:
        return _kernel_arch(file, name, smem, arch)
    src = (HERE / file).read_text()
    mod = cp.RawModule(code=src, options=("-std=c++17", f"-I{HERE}"), name_expressions=[name])
    fn = mod.get_function(name)
    if smem > STATIC_SMEM_BYTES:
        fn.max_dynamic_shared_size_bytes = smem
    return fn.kernel   # the loaded cupy.cuda.function.Function behind the RawKernel


def _kernel_arch(file, name, smem, arch):
    """Compile for an architecture-specific target (sm_90a: wgmma exists only there) with NVRTC directly: CuPy
    adds its own -arch=sm_90 and NVRTC refuses two. Not cached on disk (a few seconds a kernel, once per process).
    -default-device: NVRTC takes an unannotated function for host code, and the generic lambdas of fa3_fp8's width
    dispatch (at_width) have no annotation to give."""
    import cupy as cp
    from cupy_backends.cuda.libs import nvrtc
    prog = nvrtc.createProgram((HERE / file).read_text(), file, (), ())
    includes = tuple(f"-I{d}" for d in cuda_include_dirs())
    try:
        nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, ("-std=c++17", f"-I{HERE}", *includes, f"-arch={arch}", "-ftz=true",
                                         "-default-device"))
        except nvrtc.NVRTCError as e:
            raise RuntimeError(f"NVRTC failed on {name}:\n{nvrtc.getProgramLog(prog)}") from e
        cubin, lowered = nvrtc.getCUBIN(prog), nvrtc.getLoweredName(prog, name)
    finally:
        nvrtc.destroyProgram(prog)
    mod = cp.cuda.function.Module()
    mod.load(cubin)
    fn = mod.get_function(lowered)
    if smem > STATIC_SMEM_BYTES:
        cp.cuda.driver.funcSetAttribute(fn.ptr, cp.cuda.driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
    return fn


def _kernel_sm90a(file, name, smem=0):
    """`file`'s instance `name` compiled for sm_90a (Hopper's wgmma and TMA)."""
    return _kernel_arch(file, name, smem, "sm_90a")


def cuda_include_dirs():
    """Where cuda_fp16.h lives (CuPy's own NVRTC calls add this for us): the CUDA toolkit CuPy found, else the pip
    wheels' include folders (nvidia/cu13 for CUDA 13, nvidia/cuda_runtime for CUDA 12)."""
    import importlib.util
    import cupy as cp
    roots = [cp.cuda.get_cuda_path()]
    for mod in ("nvidia.cu13", "nvidia.cuda_runtime"):
        try:
            spec = importlib.util.find_spec(mod)
        except ImportError:
            spec = None
        roots += list(spec.submodule_search_locations or []) if spec else []
    dirs = dict.fromkeys(os.path.join(r, "include") for r in roots if r)
    return [d for d in dirs if os.path.exists(os.path.join(d, "cuda_fp16.h"))]


@functools.lru_cache(maxsize=None)
def _kernel_on(device, file, name, smem=0, arch=None, sig=""):
    """A Launcher of `file`'s instance `name`, compiled and loaded for GPU `device` (an ordinal)."""
    import cupy as cp
    cp.cuda.runtime.getDeviceCount()                # cuInit, where this is the process's first CUDA call
    here = _driver().ctxGetCurrent()
    try:
        with cp.cuda.Device(device):
            ctx = _primary_context(device)          # first: loading a module needs a current context
            return Launcher(compile_kernel(file, name, smem, arch), sig, ctx)
    finally:
        if _driver().ctxGetCurrent() != here:       # the thread's own context (or none) given back
            _driver().ctxSetCurrent(here)


def _primary_context(device):
    """The primary context of GPU `device` (where CuPy loads modules), made current on this thread. A thread that
    has made no CUDA call has no current context, and `with cupy.cuda.Device(d)` does not bind one when d is
    already the thread's device; cudaSetDevice does (CUDA 12 and later initialise the primary context there)."""
    from cupy_backends.cuda.api import runtime
    runtime.setDevice(device)
    ctx = _driver().ctxGetCurrent()
    if not ctx:      # a CUDA runtime before 12.0 binds it at the first call that needs a context
        runtime.free(0)
        ctx = _driver().ctxGetCurrent()
    if not ctx:
        raise RuntimeError(f"no CUDA context is current on GPU {device} after cudaSetDevice and cudaFree(0)")
    return ctx


@functools.lru_cache(maxsize=None)
def _device_cc(device):
    """Compute capability of GPU `device` as an int, e.g. 90."""
    import cupy as cp
    return int(cp.cuda.Device(device).compute_capability)


def device_cc():
    """Compute capability of CuPy's current GPU, e.g. 90."""
    import cupy as cp
    return _device_cc(cp.cuda.Device().id)
