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

_pool = concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2, thread_name_prefix="job")
_futures = {}
_procs = set()
_lock = threading.Lock()


def submit(specs):
    """Start the specs not yet started, costliest first."""
    with _lock:
        for key, fn, _ in sorted(specs, key=lambda s: -s[2]):
            if key not in _futures:
                _futures[key] = _pool.submit(fn)


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
