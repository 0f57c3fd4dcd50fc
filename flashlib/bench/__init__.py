"""Timing, provenance and recorded results, shared by every benchmark in flashlib (the top layer: it may use
everything below it; nothing in flashlib imports it).

- `time_cuda(fn)`: median GPU ms of `fn()`, from `timing` (the one timing helper: warm-up, interleaved rounds,
  spread, batches behind a hold kernel, optional L2 flush, host time per call).
- `save(name, rows, **info)` / `provenance()` (`records`): a JSON record with GPU, driver/CUDA, library versions,
  date, and the code measured (flashlib commit, dirty flag, kernel source hashes); `records.check_record` checks
  it later.
- `load(name)`, `RESULTS`, `describe(result)`, `source(result)`, `gpu_tag()` (`results`): the recorded results
  (flashlib/data/results/, package data) the book and Colab read where there is no GPU.
- The benchmarks themselves: `micro` (the hardware chapters), `grid` (attention against N), `public_api`,
  `sdpa` (what PyTorch's SDPA dispatches to), `graphs` (CUDA graphs), `memory` (peak memory of a call).
  The scripts in the repository's benchmarks/ folder run them (and the kernel sweeps) on a GPU and save records.
"""
from . import ladders, micro  # noqa: F401  (bench.micro.*, bench.ladders.* in the chapters)
from .records import provenance, save
from .results import GPU_TAGS, RESULTS, Source, describe, gpu_tag, load, source, versions
from .timing import time_cuda

__all__ = ["time_cuda", "save", "provenance", "load", "RESULTS", "describe", "source", "versions", "Source",
           "gpu_tag", "GPU_TAGS", "micro", "ladders"]
