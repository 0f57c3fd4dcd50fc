"""Which recorded GPU run feeds each chapter, and whether the code it measured has changed since.

A Sphinx extension (`sphinx: local_extensions` in _config.yml): when the book is built it writes
book/_records.md, which book/status.md includes. Run it by hand to print the table:

    python tools/book_status.py

A chapter's records are the names of files in flashlib.bench.RESULTS that its code cells quote (plus the default
record of `micro.live_or_recorded`). For each record, the sources it measured are looked up in MEASURED by the
record's name; "changed since" asks git for commits after the record's commit that touch them.
"""
import json
import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "book" / "_records.md"

# record-name prefix -> the sources whose code that record timed (the benchmark script and the kernels it ran)
MEASURED = {
    "hardware": ["flashlib/bench/micro.py", "flashlib/bench/micro.cu"],
    "matmul": ["benchmarks/matmul_bench.py", "flashlib/numba_kernels/matmul.py"],
    "block_sparse": ["benchmarks/block_sparse_bench.py", "flashlib/numba_kernels/fa2.py", "flashlib/bench/micro.py",
                     "flashlib/bench/ladders.py"],
    "ncu_io": ["benchmarks/ncu_io.py", "flashlib/numba_kernels/fa1.py", "flashlib/numba_kernels/fa2.py"],
    "numba_bwd_tf32": ["benchmarks/numba_bwd_tf32_bench.py", "flashlib/numba_kernels"],
    "numba_tc": ["benchmarks/numba_tc_bench.py", "flashlib/numba_kernels"],
    "numba_tf32": ["benchmarks/numba_tf32_bench.py", "flashlib/numba_kernels"],
    "numba": ["benchmarks/numba_bench.py", "flashlib/numba_kernels"],
    "cupy": ["benchmarks/cupy_bench.py", "flashlib/cupy_kernels"],
    "sdpa": ["benchmarks/gpt_bench.py", "flashlib/torch.py", "flashlib/cupy_kernels", "flashlib/numba_kernels"],
    "cuda_graphs": ["benchmarks/gpt_bench.py", "flashlib/gpt.py"],
    "gpt": ["benchmarks/gpt_bench.py", "flashlib/gpt.py", "flashlib/torch.py", "flashlib/cupy_kernels",
            "flashlib/numba_kernels"],
    "attention": ["flashlib/bench/grid.py", "flashlib/torch.py", "flashlib/cupy_kernels", "flashlib/numba_kernels"],
    "api_overhead": ["benchmarks/api_overhead.py", "flashlib/api.py", "flashlib/_arrays.py", "flashlib/torch.py"],
}


def measured_sources(name):
    prefix = max((p for p in MEASURED if name.startswith(p)), key=len, default=None)
    return MEASURED[prefix] if prefix else ["flashlib"]


def _git(*args):
    try:
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def changed_since(commit, paths):
    """'no', 'yes: N commits', or why it cannot be told (a work-in-progress tag, history not in this checkout)."""
    base = (commit or "").split("+")[0]
    note = " (recorded from uncommitted changes)" if "+" in (commit or "") else ""
    if not re.fullmatch(r"[0-9a-f]{7,40}", base):
        return f"unknown: {commit!r} is not a commit"
    if _git("cat-file", "-e", base + "^{commit}") is None:
        return "unknown: commit not in this checkout's history" + note
    log = _git("log", "--format=%h", f"{base}..HEAD", "--", *paths)
    if log is None:
        return "unknown" + note
    n = len(log.split()) if log else 0
    return (f"yes: {n} commit{'s' if n > 1 else ''} since" if n else "no") + note


def sources_changed(name, info):
    """The status column: a record that stored its kernel-source hashes is compared with the files now
    (flashlib.bench.records); an older one asks git for commits touching what it measured. Superseded records say so."""
    from flashlib.bench import records
    st = records.record_status(name)
    if st["how"] == "hashes":
        n = len(st["changed_sources"])
        text = f"yes: {n} kernel source file{'s' if n > 1 else ''} differ" if n else "no (source hashes match)"
    else:
        text = changed_since(info.get("flashlib_commit"), measured_sources(name))
    return text + (" · **superseded** (the record says why)" if st["superseded"] else "")


def chapter_records(nb_path, names):
    """Record names quoted in a notebook's code cells, in order of first use."""
    from flashlib.bench import micro
    import inspect
    default = inspect.signature(micro.live_or_recorded).parameters["name"].default
    code = "\n".join("".join(c["source"]) for c in json.loads(nb_path.read_text())["cells"] if c["cell_type"] == "code")
    found = [m.group(1) for m in re.finditer(r"[\"'](\w+)[\"']", code) if m.group(1) in names]
    if "live_or_recorded(" in code:
        found.insert(0, default)
    return list(dict.fromkeys(found))


def table():
    from flashlib import bench
    names = {p.stem for p in pathlib.Path(bench.RESULTS).glob("*.json")}
    head = _git("rev-parse", "--short", "HEAD") or "unknown"
    lines = [f"Built from commit `{head}`. \"Sources changed since\": for a record that stored its kernel-source "
             "hashes, whether those files differ now; for an older one, the commits after its commit that touch the "
             "benchmark script or the kernels it measured. A superseded record's file says why it no longer stands.", ""]
    rows = []
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        recs = chapter_records(nb, names)
        title = f"{{doc}}`/notebooks/{nb.stem}`"
        if not recs:
            rows.append([title, "none: everything on the page runs at build time", "", "", "", ""])
        for r in recs:
            i = bench.load(r)["info"]
            rows.append([title, f"`{r}.json`", i.get("gpu"), str(i.get("date", ""))[:10],
                         f"`{i.get('flashlib_commit')}`", sources_changed(r, i)])
            title = ""
    from flashlib.viz.tables import table as make_table
    headers = ["chapter", "recorded run", "GPU", "date", "commit", "sources changed since"]
    lines.append(make_table(headers, rows).markdown())
    return "\n".join(lines) + "\n"


def write(app=None):
    text = table()
    if not OUT.exists() or OUT.read_text() != text:
        OUT.write_text(text)


def setup(app):
    app.connect("builder-inited", write)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


if __name__ == "__main__":
    import sys
    sys.path.insert(0, str(ROOT))
    print(table())
