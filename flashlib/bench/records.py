"""Writing a recorded result with its provenance, and checking later which code it measured.

- `save(name, rows, **info)`: writes {'info': provenance() + info, 'rows': rows} to RESULTS/<name>.json
  (`results.RESULTS`; `results.load` reads it back).
- `provenance()`: GPU, driver/CUDA, library versions, date, and the code measured (`code_state()`).
- `code_state()`: the flashlib commit, whether the tree was dirty, and a hash of every kernel source file; stored
  by `flashlib.bench.save` in each record's info.
- `kernel_sources()`: sha256 per kernel source file (`KERNEL_SOURCES`) and one digest over all of them.
- `check_record(result)`: the reasons a record's provenance does not hold (an empty list when it does).
- `record_status(name)`: for the status page, whether the kernel sources a record measured have changed since;
  `statuses()`: the same for every recorded result.

In a git checkout the commit and the dirty flag come from git. Elsewhere (a wheel on Colab, the copy on the GPU
machine) the commit is $FLASHLIB_COMMIT and dirty is None: unknown. The source hashes are what settles it then:
`check_record` compares them with the files at the named commit.
"""
import datetime
import functools
import hashlib
import json
import os
import pathlib
import platform
import subprocess
import warnings

from ..env import cc_text, compute_capability
from . import results

PACKAGE = pathlib.Path(__file__).resolve().parents[1]       # .../flashlib
ROOT = PACKAGE.parent                                        # the checkout (or site-packages for a wheel)
KERNEL_SOURCES = ("cupy_kernels/*.cu", "cupy_kernels/*.cuh", "cupy_kernels/*.py", "numba_kernels/*.py",
                  "reference.py", "tiled.py", "block_sparse.py", "online_softmax.py")
IGNORED_WHEN_DIRTY = ("benchmarks/results/", "logs/", ".log")   # untracked outputs of a run (and bench.RESULTS)
COMMIT_LABEL = ".commit"   # the untracked file a device run reads FLASHLIB_COMMIT from: it names the code, it is not code


def _sha256(data):
    return hashlib.sha256(data.replace(b"\r\n", b"\n")).hexdigest()


def _digest(files):
    """One sha256 over the sorted (path, file hash) pairs."""
    return _sha256("".join(f"{p}\0{h}\n" for p, h in sorted(files.items())).encode())


def kernel_sources():
    """{'files': {'flashlib/<path>': sha256 of the file, ...}, 'digest': sha256 over them}, from the installed
    package (so a wheel hashes what it runs). Line endings are normalised to \\n."""
    paths = sorted({p for pattern in KERNEL_SOURCES for p in PACKAGE.glob(pattern)})
    files = {f"flashlib/{p.relative_to(PACKAGE).as_posix()}": _sha256(p.read_bytes()) for p in paths}
    return {"files": files, "digest": _digest(files)}


@functools.lru_cache(maxsize=4)
def _is_checkout(root):
    """True when root is the top of a git checkout (not, say, site-packages inside some other repository)."""
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return False
    return pathlib.Path(top).resolve() == pathlib.Path(root).resolve()


def _git(*args):
    """stdout of git in ROOT, or None when ROOT is not a git checkout or the command fails."""
    if not _is_checkout(ROOT):
        return None
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def _dirty_files(porcelain):
    """Paths `git status --porcelain` lists, less untracked results and logs."""
    ignored = IGNORED_WHEN_DIRTY
    if pathlib.Path(results.RESULTS).resolve().is_relative_to(ROOT.resolve()):
        ignored += (_relative(results.RESULTS) + "/",)
    out = []
    for line in porcelain.splitlines():
        status, path = line[:2], line[3:]
        if status == "??" and (path == COMMIT_LABEL or any(s in path for s in ignored)):
            continue
        out.append(path)
    return out


def code_state():
    """{'flashlib_commit', 'flashlib_commit_source' ('git' | 'FLASHLIB_COMMIT' | 'unknown'), 'flashlib_dirty'
    (True/False; None when unknown), 'flashlib_dirty_files' (up to 20), 'kernel_sources'}."""
    state = {"kernel_sources": kernel_sources()}
    head = _git("rev-parse", "--short", "HEAD")
    commit = os.environ.get("FLASHLIB_COMMIT")
    if head is not None and commit and not (head.strip().startswith(commit) or commit.startswith(head.strip())):
        head = None      # a .git that is not the code running here (a stale copy, as on the GPU machine): the
        #                  caller's word for the commit, dirty unknown, and the source hashes to settle it
    if head is not None:
        dirty = _dirty_files(_git("status", "--porcelain") or "")
        state.update(flashlib_commit=head.strip(), flashlib_commit_source="git", flashlib_dirty=bool(dirty),
                     flashlib_dirty_files=dirty[:20])
    else:
        state.update(flashlib_commit=commit or "unknown", flashlib_commit_source="FLASHLIB_COMMIT" if commit else
                     "unknown", flashlib_dirty=None)
    return state


def _committed_sources(commit, paths):
    """{path: sha256 of the file at commit (None if absent)}, read with git show; None without git."""
    if _git("rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}") is None:
        return None
    out = {}
    for p in paths:
        try:
            blob = subprocess.run(["git", "show", f"{commit}:{p}"], cwd=ROOT, capture_output=True, check=True).stdout
            out[p] = _sha256(blob)
        except subprocess.CalledProcessError:
            out[p] = None
    return out


def check_record(result, path=None):
    """Reasons the provenance of a loaded record (from file `path`) does not hold, [] when it does. Needs git.

    Holds when: the commit is in the history of HEAD and was made before the run; the tree was not dirty; and
    the code it measured is the commit's: with stored source hashes, every hash equals the file's at the commit;
    for older records without them, no kernel source changed between the commit and the first commit after it
    that wrote the record (which would mean the run measured code not yet committed, or newer than the label)."""
    info, why = result["info"], []
    commit = str(info.get("flashlib_commit", "")).strip()
    if _git("merge-base", "--is-ancestor", commit, "HEAD") is None:
        return [f"flashlib_commit {commit!r} is not a commit in the history of HEAD"]
    dirty = [f for f in info.get("flashlib_dirty_files", ["?"]) if f != COMMIT_LABEL]
    if info.get("flashlib_dirty") and dirty:
        why.append(f"measured on a dirty tree ({', '.join(info.get('flashlib_dirty_files', [])[:5])})")
    committed = _git("log", "-1", "--format=%cI", commit).strip()
    if info.get("date") and _time(committed) > _time(info["date"]):
        why.append(f"commit {commit} ({committed}) was made after the run ({info['date']})")
    stored = (info.get("kernel_sources") or {}).get("files")
    if stored:
        at_commit = _committed_sources(commit, stored)
        differ = [p for p, h in stored.items() if at_commit.get(p) != h]
        if differ:
            why.append(f"{len(differ)} kernel source(s) measured differ from commit {commit}: {', '.join(differ[:5])}")
    elif path is not None:                       # the first commit after `commit` that wrote the file
        writers = (_git("log", "--follow", "--format=%H", f"{commit}..HEAD", "--", _relative(path)) or "").split()
        writer = writers[-1] if writers else ""        # the oldest, across the move into flashlib/data/results
        changed = _changed_sources(commit, writer) if writer else []
        if changed:
            why.append(f"kernel sources changed between {commit} and the commit that wrote the record "
                       f"({writer[:7]}): {', '.join(changed[:5])}")
    return why


def _time(iso):
    return datetime.datetime.fromisoformat(iso)


def _relative(path):
    return pathlib.Path(path).resolve().relative_to(ROOT.resolve()).as_posix()


def _changed_sources(commit, other=None):
    """Kernel source paths that differ between commit and `other` (a commit; None: the working tree)."""
    specs = [f"flashlib/{p}" for p in KERNEL_SOURCES]
    out = _git("diff", "--name-only", commit, *([other] if other else []), "--", *specs)
    return None if out is None else out.split()


def record_status(name):
    """For the status page: has the code a recorded result measured changed since it was recorded?

    Returns {'name', 'commit', 'date', 'superseded' (the reason, or None), 'provenance_problems' (check_record's
    list; None when git is not available), 'how' ('hashes' | 'git history' | 'unknown'), 'changed_sources' (the
    kernel source files that differ now; None when unknown), 'changed' (bool, or None when unknown) and
    'changed_by_area' ({'cupy_kernels': [...], 'numba_kernels': [...], 'numpy': [...]}, or None)}.
    Records with stored hashes compare them with the current files; older ones ask git which kernel sources
    changed after the record's commit (working tree included).
    """
    result = results.load(name)
    info = result["info"]
    commit = str(info.get("flashlib_commit", ""))
    status = {"name": name, "commit": commit, "date": info.get("date"), "superseded": result.get("superseded")}
    stored = (info.get("kernel_sources") or {}).get("files")
    if stored:
        now = kernel_sources()["files"]
        changed = sorted(p for p in set(stored) | set(now) if stored.get(p) != now.get(p))
        status.update(how="hashes", changed_sources=changed)
    else:
        changed = _changed_sources(commit) if _git("rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}") else None
        status.update(how="git history" if changed is not None else "unknown", changed_sources=changed)
    status["changed"] = None if status["changed_sources"] is None else bool(status["changed_sources"])
    status["changed_by_area"] = None if changed is None else {
        area: [p for p in changed if p.startswith(f"flashlib/{area}/")] for area in ("cupy_kernels", "numba_kernels")}
    if changed is not None:
        status["changed_by_area"]["numpy"] = [p for p in changed if p.count("/") == 1]
    status["provenance_problems"] = check_record(result, results.RESULTS / f"{name}.json") if _git("rev-parse", "HEAD") else None
    return status


def statuses():
    """record_status of every recorded result, in name order."""
    return [record_status(p.stem) for p in sorted(results.RESULTS.glob("*.json"))]


def _version(mod):
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def provenance():
    """Where and when a result was measured: GPU, driver, CUDA, versions, date, and the code (code_state())."""
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
    except Exception:
        pass
    if compute_capability():
        info["compute_capability"] = cc_text(compute_capability())
    return info


def save(name, rows, directory=None, **info):
    """Write {'info': provenance + info, 'rows': rows} to <directory or RESULTS>/<name>.json.
    Warns when the tree had uncommitted changes: such a record fails test_bench until it is re-recorded."""
    path = pathlib.Path(directory or results.RESULTS) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**provenance(), **info}
    if meta.get("flashlib_dirty"):
        warnings.warn(f"{name}: measured with uncommitted changes ({', '.join(meta['flashlib_dirty_files'][:5])}); "
                      "commit, then record again", stacklevel=2)
    path.write_text(json.dumps({"info": meta, "rows": rows}, indent=1, default=str) + "\n")
    return path
