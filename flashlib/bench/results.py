"""Recorded results: where they live and how the book reads them.

- `RESULTS`: flashlib/data/results/, package data, so the installed wheel carries the JSON files the book and
  Colab read where there is no GPU.
- `load(name)`: one record, {'info': provenance, 'rows': ...}; `save` (in `records`) writes them.
- `describe(result)` / `source(result)`: where a recorded result came from, as a line or for display(). A record
  whose provenance does not hold carries `"superseded": "<why>"` (`load(name).get("superseded")`), and `describe`
  says so.
- `gpu_tag(name)`: the short GPU tag ('h100') that a record's file name ends with.
"""
import importlib.resources
import json
import pathlib

from ..env import gpu_name

# The recorded results are package data: the same folder from a checkout, an editable install and a wheel.
RESULTS = pathlib.Path(str(importlib.resources.files("flashlib").joinpath("data", "results")))
GPU_TAGS = ("h100", "h200", "a100", "l4", "t4", "a10")


def gpu_tag(name=None):
    """The short tag a result file is named after ('h100' for 'NVIDIA H100 80GB HBM3'), or 'gpu'; name defaults
    to the present GPU's (flashlib.env.gpu_name)."""
    name = gpu_name() if name is None else name
    return next((t for t in GPU_TAGS if t in (name or "").lower()), "gpu")


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
