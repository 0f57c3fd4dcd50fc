"""Layer 8: timing, provenance and recorded results, shared by every benchmark in flashlib.

- `time_cuda(fn)`: median GPU ms of `fn()`, from `timing` (the one timing helper: warm-up, interleaved rounds,
  spread, batches behind a hold kernel, optional L2 flush, host time per call).
- `provenance()`: GPU, driver/CUDA, library versions, date and flashlib commit, stored with every result.
- `save(name, rows, **info)` / `load(name)`: JSON files under benchmarks/results/, which the book reads when it
  is built on a machine without a GPU.
"""
import datetime
import json
import os
import pathlib
import platform
import subprocess

RESULTS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def time_cuda(fn, warmup=3, repeat=10):
    """Median GPU milliseconds per call of fn() on the current CUDA stream: `timing.time_one` (events around a batch
    of back-to-back calls queued behind a hold kernel, so host time is not counted; at least `repeat` rounds)."""
    from .timing import time_one
    return time_one(fn, warmup=warmup, repeat=repeat)


def _version(mod):
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def _commit():
    if os.environ.get("FLASHLIB_COMMIT"):
        return os.environ["FLASHLIB_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=RESULTS.parents[1], check=True).stdout.strip()
    except Exception:
        return "unknown"


def provenance():
    """Where and when a result was measured: GPU, driver, CUDA, versions, date, flashlib commit."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "flashlib_commit": _commit(), "python": platform.python_version(),
            **{m: _version(m) for m in ("numpy", "numba", "cupy", "torch")}}
    try:
        from importlib.metadata import version
        info["numba_cuda"] = version("numba-cuda")
    except Exception:
        info["numba_cuda"] = None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, check=True).stdout
        name, driver, mem = [s.strip() for s in out.splitlines()[0].split(",")]
        info.update(gpu=name, driver=driver, gpu_memory=mem)
    except Exception:
        info.update(gpu=None, driver=None)
    try:
        import cupy as cp
        info["cuda_runtime"] = cp.cuda.runtime.runtimeGetVersion()
        info["compute_capability"] = cp.cuda.Device().compute_capability
    except Exception:
        pass
    return info


GPU_TAGS = ("h100", "h200", "a100", "l4", "t4", "a10")


def gpu_tag(name):
    """The short tag a result file is named after ('h100' for 'NVIDIA H100 80GB HBM3'), or 'gpu'."""
    return next((t for t in GPU_TAGS if t in name.lower()), "gpu")


def save(name, rows, directory=None, **info):
    """Write {'info': provenance + info, 'rows': rows} to <directory or benchmarks/results>/<name>.json."""
    path = pathlib.Path(directory or RESULTS) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"info": {**provenance(), **info}, "rows": rows}, indent=1, default=str) + "\n")
    return path


def load(name):
    """The recorded result `name` from benchmarks/results/: a dict with 'info' and 'rows'."""
    return json.loads((RESULTS / f"{name}.json").read_text())


def describe(result):
    """One line saying where a recorded result came from, for the book to print under a figure."""
    i = result["info"]
    return (f"Recorded on {i.get('gpu')} (driver {i.get('driver')}), {i.get('date', '')[:10]}, "
            f"torch {i.get('torch')}, CuPy {i.get('cupy')}, numba-cuda {i.get('numba_cuda')}, "
            f"flashlib {i.get('flashlib_commit')}.")


from . import micro  # noqa: E402,F401  (bench.micro.* in the chapters; imported last: it uses save, load above)
