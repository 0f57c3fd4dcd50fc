"""Layer 8: timing, provenance and recorded results, shared by every benchmark in flashlib.

- `time_cuda(fn)`: median GPU ms of `fn()`, from `timing` (the one timing helper: warm-up, interleaved rounds,
  spread, batches behind a hold kernel, optional L2 flush, host time per call).
- `provenance()`: GPU, driver/CUDA, library versions, date, and the code measured (flashlib commit, dirty flag,
  kernel source hashes: `bench.records`), stored with every result.
- `describe(result)` / `source(result)`: where a recorded result came from, as a line or for display().
- `save(name, rows, **info)` / `load(name)`: JSON files in `RESULTS` (flashlib/data/results/, package data, so the
  installed wheel carries them), which the book and Colab read where there is no GPU. A record whose provenance does not hold carries `"superseded": "<why>"`
  (`load(name).get("superseded")`), and `describe` says so.
"""
import datetime
import importlib.resources
import json
import pathlib
import platform
import subprocess
import warnings

# The recorded results are package data: the same folder from a checkout, an editable install and a wheel.
RESULTS = pathlib.Path(str(importlib.resources.files("flashlib").joinpath("data", "results")))


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


def provenance():
    """Where and when a result was measured: GPU, driver, CUDA, versions, date, and the code (code_state())."""
    from .records import code_state
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **code_state(), "python": platform.python_version(),
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
    """Write {'info': provenance + info, 'rows': rows} to <directory or RESULTS>/<name>.json.
    Warns when the tree had uncommitted changes: such a record fails test_bench until it is re-recorded."""
    path = pathlib.Path(directory or RESULTS) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**provenance(), **info}
    if meta.get("flashlib_dirty"):
        warnings.warn(f"{name}: measured with uncommitted changes ({', '.join(meta['flashlib_dirty_files'][:5])}); "
                      "commit, then record again", stacklevel=2)
    path.write_text(json.dumps({"info": meta, "rows": rows}, indent=1, default=str) + "\n")
    return path


def load(name):
    """The recorded result `name` from RESULTS: a dict with 'info' and 'rows'."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no recorded result named {name!r} in {RESULTS}; recorded: "
                                + ", ".join(sorted(p.stem for p in RESULTS.glob("*.json"))))
    return json.loads(path.read_text())


def describe(result, full=False):
    """One short line saying where a recorded result came from (GPU, date, flashlib commit), for the book to
    print under a figure; full=True adds a second line with the driver and library versions."""
    i = result["info"]
    short = (f"Recorded on {i.get('gpu')}, {i.get('date', '')[:10]}, flashlib {i.get('flashlib_commit')}"
             f"{' (uncommitted changes)' if i.get('flashlib_dirty') else ''}."
             + (f" Superseded: {result['superseded']}" if result.get("superseded") else "")
             + "".join(f" The {col} column is superseded: {why}" for col, why in result.get("superseded_columns", {}).items()))
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
