"""Layer 8: timing, provenance and recorded results, shared by every benchmark in flashlib.

- `time_cuda(fn)`: the one timing helper: CUDA events around `fn()` after warm-up, median of repeats, in ms.
- `provenance()`: GPU, driver/CUDA, library versions, date and flashlib commit, stored with every result.
- `describe(result)` / `source(result)`: where a recorded result came from, as a line or for display().
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
    """Median milliseconds of fn() on the current CUDA stream, timed with CUDA events (CuPy's, else torch's)."""
    try:
        import cupy as cp
        start, end, sync = cp.cuda.Event(), cp.cuda.Event(), cp.cuda.Device().synchronize
        elapsed = lambda: cp.cuda.get_elapsed_time(start, end)
    except ImportError:
        import torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync, elapsed = torch.cuda.synchronize, lambda: start.elapsed_time(end)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(elapsed())
    times.sort()
    return times[len(times) // 2]


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


def describe(result, full=False):
    """One short line saying where a recorded result came from (GPU, date, flashlib commit), for the book to
    print under a figure; full=True adds a second line with the driver and library versions."""
    i = result["info"]
    short = f"Recorded on {i.get('gpu')}, {i.get('date', '')[:10]}, flashlib {i.get('flashlib_commit')}."
    return short + ("\n" + versions(result) if full else "")


def versions(result):
    """The driver and library versions a recorded result was measured with, as one line."""
    i = result["info"]
    return (f"driver {i.get('driver')}, torch {i.get('torch')}, CuPy {i.get('cupy')}, "
            f"numba-cuda {i.get('numba_cuda')}")


class Source:
    """What display(source(result)) shows: the short describe() line, the versions folded under it (an HTML
    <details> block in Jupyter and the book; a second line in plain text)."""

    def __init__(self, result, lead=""):
        self.result, self.lead = result, lead

    def _repr_html_(self):
        from html import escape
        return (f'<details class="provenance"><summary>{escape(self.lead + describe(self.result))}</summary>'
                f"{escape(versions(self.result))}</details>")

    def __repr__(self):
        return self.lead + describe(self.result, full=True)


def source(result, lead=""):
    """The provenance of a recorded result, for display() under a figure or table; lead goes before it."""
    return Source(result, lead)


from . import micro  # noqa: E402,F401  (bench.micro.* in the chapters; imported last: it uses save, load above)
