"""flashlib: FlashAttention from the silicon up.

`LAYERS` lists every module from the bottom up; a module imports only modules of lower layers (and its own
package's), never one of its own layer or above (tests/test_layout.py reads the imports and checks it):

    constants                 shared numbers (LOG2E, NEG_INF, shared-memory limits, the default scale, FLOPs)
    env, _arrays              is there a GPU (and which); the array conversions and argument rules
    reference                 standard attention in float64: the truth every other implementation is tested against
    online_softmax, tiled     the online softmax; FlashAttention 1 and 2 tile by tile in NumPy
    block_sparse, iomodel     FA2 with a block mask; the HBM traffic of each algorithm
    hardware                  what a GPU is made of, in numbers (datasheets, the device, roofline, occupancy)
    cupy_kernels              FlashAttention-2 in CUDA C through CuPy
    numba_kernels             FlashAttention in Numba-CUDA
    api                       flashlib.attention / attention_backward over every backend
    torch                     the PyTorch operator
    distributed               ring attention and Ulysses on torch.distributed
    viz                       figures and animations
    bench                     timing, recorded results, the benchmarks
    exercises, gpt            the chapters' exercise checkers and small GPT (nothing in flashlib imports them)

Names, as FlashAttention-2's paper (Dao 2023) writes them: Q, K, V, O and their gradients dQ, dK, dV, dO; S = scale
Q K^T, P = softmax(S); blocks of Br query rows and Bc keys, Tr and Tc of them; m and l, a row's running maximum and
sum of exp(S - m); `lse`, the logsumexp of a row, m + log(l): the paper's L, which the forward returns and the
backward takes; `delta`, rowsum(dO * O): the paper's D (written D where the code follows the paper line by line, as
flashlib.tiled does). A `rung` is one kernel version of a backend's ladder (cupy_kernels' rung="tuned"); `backend`
is only flashlib.attention's argument that picks the implementation ("auto", "cupy", "numba", "tiled", "reference").

`import flashlib` never imports numba.cuda or CuPy, so a notebook can call `flashlib.setup()` first to pick Numba's
CUDA simulator when no GPU is present.
"""
LAYERS = (("constants",), ("env", "_arrays"), ("reference",), ("online_softmax", "tiled"), ("block_sparse", "iomodel"),
          ("hardware",), ("cupy_kernels",), ("numba_kernels",), ("api",), ("torch",), ("distributed",), ("viz",),
          ("bench",), ("exercises", "gpt"))

from . import online_softmax, reference, tiled
from .api import BACKENDS, attention, attention_backward, available_backends
from .env import gpu_count, setup

__version__ = "0.1.0"
__all__ = ["LAYERS", "attention", "attention_backward", "available_backends", "BACKENDS", "setup", "gpu_count",
           "reference", "tiled", "online_softmax"]
