"""flashlib.bench on the CPU: FLOP counts, recorded results with provenance, tables and plots from them."""
import json
import subprocess
import sys

import pytest

from flashlib import bench
from flashlib.bench import grid

RECORDED = sorted(bench.RESULTS.glob("*.json"))


def test_flops_follow_the_convention():
    assert grid.flops(2, 3, 100, 64, False) == 4 * 2 * 3 * 100 * 100 * 64
    assert grid.flops(2, 3, 100, 64, True) == grid.flops(2, 3, 100, 64, False) / 2
    assert grid.flops(1, 1, 8, 8, False, backward=True) == 3.5 * grid.flops(1, 1, 8, 8, False)


@pytest.mark.parametrize("path", RECORDED, ids=[p.stem for p in RECORDED])
def test_every_recorded_result_says_where_it_came_from(path):
    r = json.loads(path.read_text())
    for key in ("gpu", "driver", "date", "flashlib_commit", "torch", "cupy", "numba"):
        assert r["info"].get(key), f"{path.name} lacks {key}"
    assert r["rows"]
    assert r["info"]["gpu"] in bench.describe(r)
    tag = bench.gpu_tag(r["info"]["gpu"])                            # the file is named after the GPU it ran on
    assert tag != "gpu" and tag in path.stem.split("_"), (path.name, r["info"]["gpu"])


def test_table_and_plots_from_the_recorded_quick_grid(tmp_path):
    r = bench.load("attention_h100_quick")
    t = grid.table(r["rows"]).markdown()
    assert t.splitlines()[0].startswith("| dtype | d | N | causal |") and "sdpa-flash" in t
    assert len(t.splitlines()) == 2 + len({(x["dtype"], x["d"], x["n"], x["causal"]) for x in r["rows"]})
    mem = [dict(n=1024, impl="naive", peak_extra_MB=100.0), dict(n=65536, impl="naive", error="OutOfMemoryError")]
    pngs = grid.plots(r["rows"], mem, tmp_path / "grid")
    assert len(pngs) == 3 and all(p.stat().st_size > 10_000 for p in pngs)


def test_command_line_says_it_needs_a_gpu():
    import flashlib
    if flashlib.gpu_count():
        pytest.skip("a GPU is present")
    out = subprocess.run([sys.executable, "-m", "flashlib.bench", "--quick"], capture_output=True, text=True)
    assert out.returncode != 0 and "needs a CUDA GPU" in out.stderr
