"""Test set-up: without a GPU, Numba runs in its CUDA simulator and `gpu`-marked tests are skipped.

The simulator is chosen here, before any test imports numba.cuda, by the same call notebooks make.
"""
import json
import os
import shutil
import sys

import numpy as np
import pytest

import flashlib
from tests import jobs

HAS_GPU = flashlib.setup(verbose=False)


def pytest_collection_modifyitems(config, items):
    items[:] = jobs.last(items)   # the tests that wait for compile jobs run after the others: those run meanwhile
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here); runs on the device machine with -m gpu")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_collection_finish(session):
    # the compile jobs of the selected tests, beside the tests; an xdist worker collects every test but runs a
    # share: there a test starts its own jobs when it runs
    if not hasattr(session.config, "workerinput"):
        jobs.start(session.items)


def pytest_sessionfinish(session):
    jobs.stop()


def pytest_terminal_summary(terminalreporter):
    if (line := jobs.summary()) is not None:
        terminalreporter.write_line(line)


@pytest.fixture
def rng():
    return np.random.default_rng(20221130)


def qkv(rng, B, H, Nq, Nk, d, dtype=np.float32, scale=1.0):
    """Random q (B, H, Nq, d) and k, v (B, H, Nk, d) of the given dtype."""
    return tuple((scale * rng.standard_normal((B, H, n, d))).astype(dtype) for n in (Nq, Nk, Nk))


def ptx_script(script, cost, name):
    """Job specs (tests/jobs.py) running `script` (it prints JSON on its last line) in a subprocess without the
    simulator, where cuda.compile_ptx works with no GPU; none where ptxas (the CUDA toolkit) is not on PATH.
    name: the job's label in the pool's summary."""
    if shutil.which("ptxas") is None:
        return []
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}  # compile_ptx needs the real target
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return [(("ptx", name, script), lambda: jobs.run([sys.executable, "-c", script], env=env, cwd=root), cost)]


def ptx_script_rows(specs):
    """The JSON the `ptx_script` job printed; skip when there is none."""
    if not specs:
        pytest.skip("ptxas is not on PATH (install the CUDA toolkit to check the PTX)")
    (r,) = jobs.results(specs)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])
