"""flashlib: FlashAttention from the silicon up.

Layers (each imports only those above it): reference -> tiled -> iomodel, hardware -> numba_kernels,
cupy_kernels -> api -> viz -> bench. `import flashlib` never imports numba.cuda or CuPy, so a notebook
can call `flashlib.setup()` first to pick Numba's CUDA simulator when no GPU is present.
"""
from . import online_softmax, reference, tiled
from .api import BACKENDS, attention, attention_backward, available_backends
from .env import gpu_count, setup

__version__ = "0.1.0"
__all__ = ["attention", "attention_backward", "available_backends", "BACKENDS", "setup", "gpu_count",
           "reference", "tiled", "online_softmax"]
