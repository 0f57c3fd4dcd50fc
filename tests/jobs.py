"""Subprocess jobs (nvcc, ptxas, the Numba PTX scripts) run by a pool beside the tests.

A test module names its jobs in BACKGROUND = {test function name: function returning job specs}; a spec is
(key, fn, cost), fn() the job, cost a rough number of seconds. When collection ends (tests/conftest.py) the specs of
the selected tests are started, costliest first, on os.cpu_count() threads, while pytest runs the other tests (the
tests with jobs are moved to the end: on 2 cores the compilers take the time the tests leave); a test takes its
results with `results(specs)`, which starts what has not been started and waits.
"""
import concurrent.futures
import os
import signal
import subprocess
import threading
import time

WORKERS = os.cpu_count() or 2
_pool = concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="job")
_futures = {}
_procs = set()
_stopped = False
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


def _background(item):
    """The BACKGROUND function of a test item, or None."""
    return getattr(getattr(item, "module", None), "BACKGROUND", {}).get(getattr(item, "originalname", None))


def last(items):
    """items, those with BACKGROUND jobs moved to the end (each group in its order)."""
    return [i for i in items if _background(i) is None] + [i for i in items if _background(i) is not None]


def start(items):
    """Submit the specs of the test items that have BACKGROUND jobs (each function called once)."""
    seen, specs = set(), []
    for item in items:
        fn = _background(item)
        if fn is not None and fn not in seen:
            seen.add(fn)
            specs += fn()
    submit(specs)


def run(cmd, **kw):
    """subprocess.run(cmd, capture_output=True, text=True, **kw) in a process group of its own, killed by `stop` if
    the session ends first (then, or after `stop`, it raises RuntimeError)."""
    with _lock:
        if _stopped:
            raise RuntimeError("the test session has ended")
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                             **kw)
        _procs.add(p)
    with p:
        try:
            out, err = p.communicate()
        finally:
            with _lock:
                _procs.discard(p)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def stop():
    """Cancel the jobs not started and kill the running ones' process groups (a session ended early, e.g. by -x)."""
    global _stopped
    _pool.shutdown(wait=False, cancel_futures=True)
    with _lock:
        _stopped = True
        for p in list(_procs):
            try:
                os.killpg(p.pid, signal.SIGKILL)   # nvcc's cicc and ptxas, the scripts' ptxas too
            except ProcessLookupError:
                pass


def summary():
    """A line on the jobs run (none: None): how many, their seconds in all, and from the first start to the last end;
    with the longest few."""
    if not _times:
        return None
    spans = sorted(_times.items(), key=lambda kv: kv[1][0] - kv[1][1])
    busy = sum(t1 - t0 for t0, t1 in _times.values())
    wall = max(t1 for _, t1 in _times.values()) - min(t0 for t0, _ in _times.values())
    top = ", ".join(f"{' '.join(str(x).split(chr(10))[0] for x in k)[:60]!r} {t1 - t0:.0f} s" for k, (t0, t1) in spans[:3])
    return f"{len(_times)} compile jobs on {WORKERS} threads: {busy:.0f} s of work in {wall:.0f} s; longest: {top}"
