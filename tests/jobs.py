"""Subprocess jobs (nvcc, ptxas, the Numba PTX scripts) run by a pool beside the tests.

A test module names its jobs in BACKGROUND = {test function name: function returning job specs}; a spec is
(key, fn, cost), fn() the job, cost a rough number of seconds. When collection ends (tests/conftest.py) the specs of
the selected tests are started, costliest first, on os.cpu_count() threads, while pytest runs the tests in order on
its own; a test takes its results with `results(specs)`, which starts what has not been started and waits.
"""
import concurrent.futures
import os
import subprocess
import threading
import time

_pool = concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2, thread_name_prefix="job")
_futures = {}
_procs = set()
_lock = threading.Lock()
_times = {}   # key: (start, end) in time.monotonic() seconds


def _timed(key, fn):
    t0 = time.monotonic()
    try:
        return fn()
    finally:
        _times[key] = (t0, time.monotonic())


def submit(specs):
    """Start the specs not yet started, costliest first."""
    with _lock:
        for key, fn, _ in sorted(specs, key=lambda s: -s[2]):
            if key not in _futures:
                _futures[key] = _pool.submit(_timed, key, fn)


def results(specs):
    """fn()'s result of each spec, in order (a job's exception is raised here)."""
    submit(specs)
    return [_futures[key].result() for key, _, _ in specs]


def start(items):
    """Submit the specs of the test items that have BACKGROUND jobs (each function called once)."""
    seen, specs = set(), []
    for item in items:
        fn = getattr(getattr(item, "module", None), "BACKGROUND", {}).get(getattr(item, "originalname", None))
        if fn is not None and fn not in seen:
            seen.add(fn)
            specs += fn()
    submit(specs)


def run(cmd, **kw):
    """subprocess.run(cmd, capture_output=True, text=True, **kw), killed by `stop` if the session ends first."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw) as p:
        with _lock:
            _procs.add(p)
        try:
            out, err = p.communicate()
        finally:
            with _lock:
                _procs.discard(p)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def stop():
    """Cancel the jobs not started and kill the running ones' subprocesses (a session ended early, e.g. by -x)."""
    _pool.shutdown(wait=False, cancel_futures=True)
    with _lock:
        for p in list(_procs):
            p.kill()


def summary():
    """A line on the jobs run (none: None): how many, their seconds in all, and from the first start to the last end;
    with the longest few."""
    if not _times:
        return None
    spans = sorted(_times.items(), key=lambda kv: kv[1][0] - kv[1][1])
    busy = sum(t1 - t0 for t0, t1 in _times.values())
    wall = max(t1 for _, t1 in _times.values()) - min(t0 for t0, _ in _times.values())
    top = ", ".join(f"{' '.join(map(str, k))[:50]!r} {t1 - t0:.0f} s" for k, (t0, t1) in spans[:3])
    return f"{len(_times)} compile jobs on {_pool._max_workers} threads: {busy:.0f} s of work in {wall:.0f} s; longest: {top}"
