"""Peak device memory one call adds, measured from allocator statistics: never filled in from the outputs' sizes.

`peak_extra_bytes(fn)` runs fn() once and reads two allocators around it; what was allocated before the call (the
inputs) is not counted:
- PyTorch's caching allocator: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, less what
  was allocated before. CuPy is routed through it first (`flashlib.torch.cupy_allocates_from_torch`), so the
  CuPy kernels' O, lse and gradients are seen too (CuPy's own pool keeps no peak, and a drop in free device
  memory misses what the pool already holds: that is how 0.0 MB was once recorded). The Numba Tensor Core
  rungs allocate from torch when it is imported.
- Numba's own allocations (`cuda.device_array`): its memory manager's `memalloc` is wrapped for the call and
  the peak of the bytes it holds beyond those it held before is kept (`NumbaPeak`).
The result is the sum of the two peaks (an upper bound when both allocate: their peaks need not coincide).
"""
import contextlib


class NumbaPeak:
    """Peak bytes a Numba memory manager holds beyond what it held at the start, while installed.

    Numba's default manager keeps every live allocation in `allocations` (pointer -> memory with `.size`) and
    drops it when freed; each memalloc call reads that total after allocating."""

    def __init__(self, manager):
        self.manager, self.peak = manager, 0
        self.base = self._held()

    def _held(self):
        return sum(m.size for m in list(self.manager.allocations.values()))

    def memalloc(self, size):
        mem = self._memalloc(size)
        self.peak = max(self.peak, self._held() - self.base)
        return mem

    def __enter__(self):
        self._memalloc = self.manager.memalloc
        self.manager.memalloc = self.memalloc           # an instance attribute: Context.memalloc finds it first
        return self

    def __exit__(self, *exc):
        del self.manager.memalloc                       # back to the class's method


def _numba_manager():
    """The current Numba context's memory manager; None without a Numba GPU (or in the simulator) or for a plugin
    manager without the `allocations` table."""
    from ..env import simulated
    if simulated():
        return None
    try:
        from numba import cuda
    except ImportError:
        return None
    if not cuda.is_available():
        return None
    manager = cuda.current_context().memory_manager
    return manager if hasattr(manager, "allocations") else None


def peak_extra_bytes(fn):
    """{'bytes': peak extra device bytes of one fn() call, 'torch': torch allocator's share, 'numba': Numba's
    share (None when Numba is not in use)}. fn's result is freed before returning."""
    import torch
    try:
        import cupy  # noqa: F401
    except ImportError:
        pass
    else:
        from ..torch import cupy_allocates_from_torch
        cupy_allocates_from_torch()
    manager = _numba_manager()
    torch.cuda.synchronize()
    if manager is not None:
        manager.deallocations.clear()                  # Numba's deferred frees: done now, not during the call
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with NumbaPeak(manager) if manager is not None else contextlib.nullcontext() as numba_peak:
        out = fn()
        torch.cuda.synchronize()
    torch_peak = torch.cuda.max_memory_allocated() - base
    del out
    numba = numba_peak.peak if numba_peak is not None else None
    return {"bytes": torch_peak + (numba or 0), "torch": torch_peak, "numba": numba}
