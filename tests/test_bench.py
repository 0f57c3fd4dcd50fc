"""flashlib.bench on the CPU: FLOP counts, recorded results with provenance, tables and plots from them."""
import json
import pathlib
import subprocess
import sys

import pytest

from flashlib import bench
from flashlib.bench import grid

RECORDED = sorted(bench.RESULTS.glob("*.json"))


def test_flops_follow_the_convention():
    from flashlib.constants import attention_flops as flops
    assert flops(2, 3, 100, 64, False) == 4 * 2 * 3 * 100 * 100 * 64
    assert flops(2, 3, 100, 64, True) == flops(2, 3, 100, 64, False) / 2
    assert flops(1, 1, 8, 8, False, backward=True) == 3.5 * flops(1, 1, 8, 8, False)


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


from flashlib.bench import records  # noqa: E402

IN_GIT = records._git("rev-parse", "HEAD") is not None and \
    (records._git("rev-parse", "--is-shallow-repository") or "").strip() != "true"   # a shallow clone lacks the history


@pytest.mark.skipif(not IN_GIT, reason="needs the git checkout")
@pytest.mark.parametrize("path", RECORDED, ids=[p.stem for p in RECORDED])
def test_every_record_proves_which_code_it_measured_or_is_marked_superseded(path):
    r = json.loads(path.read_text())
    problems = records.check_record(r, path)
    assert not problems or r.get("superseded"), f"{path.name}: {problems}"
    if r.get("superseded"):                                        # and wherever the book shows it, it says so
        assert f"Superseded: {r['superseded']}" in bench.describe(r)
    for col, why in r.get("superseded_columns", {}).items():
        assert col in bench.describe(r) and why in bench.describe(r)


@pytest.mark.skipif(not IN_GIT, reason="needs the git checkout")
def test_the_code_state_of_this_checkout():
    s = records.code_state()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=records.ROOT).stdout.strip()
    assert s["flashlib_commit"] == head and s["flashlib_commit_source"] == "git"
    assert isinstance(s["flashlib_dirty"], bool)
    files = s["kernel_sources"]["files"]
    for p in ("flashlib/cupy_kernels/fa2_tc.cu", "flashlib/cupy_kernels/flash_common.cuh",
              "flashlib/numba_kernels/fa2.py", "flashlib/tiled.py", "flashlib/reference.py"):
        assert len(files[p]) == 64
    assert records.kernel_sources() == s["kernel_sources"]           # stable
    touched = dict(files, **{"flashlib/tiled.py": "0" * 64})
    assert records._digest(touched) != s["kernel_sources"]["digest"]
    assert records._dirty_files("?? benchmarks/results/x.json\n?? benchmarks/results/logs/a.log\n M flashlib/tiled.py\n"
                                "?? scratch.py\n") == ["flashlib/tiled.py", "scratch.py"]


@pytest.mark.skipif(not IN_GIT, reason="needs the git checkout")
def test_check_record_refuses_what_it_cannot_prove():
    if records._changed_sources("HEAD"):
        pytest.skip("kernel sources have uncommitted changes here")
    head = records._git("rev-parse", "--short", "HEAD").strip()
    date = records._git("log", "-1", "--format=%cI", "HEAD").strip()
    good = {"info": {"flashlib_commit": head, "flashlib_dirty": False, "date": date,
                     "kernel_sources": records.kernel_sources()}, "rows": [{}]}
    assert records.check_record(good) == []
    unknown = json.loads(json.dumps(good))
    unknown["info"]["flashlib_dirty"] = None                         # a wheel: the hashes settle it
    assert records.check_record(unknown) == []
    bad = json.loads(json.dumps(good))
    bad["info"]["kernel_sources"]["files"]["flashlib/tiled.py"] = "0" * 64
    assert "differ from commit" in " ".join(records.check_record(bad))
    bad = json.loads(json.dumps(good))
    bad["info"].update(flashlib_dirty=True, flashlib_dirty_files=["flashlib/tiled.py"])
    assert "dirty" in " ".join(records.check_record(bad))
    label = json.loads(json.dumps(good))                              # only the device run's commit label
    label["info"].update(flashlib_dirty=True, flashlib_dirty_files=[records.COMMIT_LABEL])
    assert records.check_record(label) == []
    bad["info"]["flashlib_dirty_files"].append(records.COMMIT_LABEL)
    assert "dirty" in " ".join(records.check_record(bad))
    bad = json.loads(json.dumps(good))
    bad["info"]["flashlib_commit"] = "wip"
    assert "not a commit" in " ".join(records.check_record(bad))
    bad = json.loads(json.dumps(good))
    bad["info"]["date"] = "2000-01-01T00:00:00+00:00"
    assert "after the run" in " ".join(records.check_record(bad))


def test_outside_a_checkout_the_commit_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setattr(records, "ROOT", tmp_path)                   # as for a wheel in site-packages
    monkeypatch.setenv("FLASHLIB_COMMIT", "abc1234")
    s = records.code_state()
    assert (s["flashlib_commit"], s["flashlib_commit_source"], s["flashlib_dirty"]) == ("abc1234", "FLASHLIB_COMMIT", None)
    monkeypatch.delenv("FLASHLIB_COMMIT")
    assert records.code_state()["flashlib_commit"] == "unknown"
    assert records.code_state()["kernel_sources"]["files"]           # hashed from the installed package anyway


def test_save_records_the_code_and_record_status_compares_it(monkeypatch, tmp_path):
    path = bench.save("probe_gpu", [{"x": 1}], directory=tmp_path, note="test")
    r = json.loads(path.read_text())
    for key in ("flashlib_commit", "flashlib_commit_source", "flashlib_dirty", "kernel_sources"):
        assert key in r["info"]
    monkeypatch.setattr(bench.results, "RESULTS", tmp_path)
    monkeypatch.setattr(bench.results, "load", lambda name: json.loads((tmp_path / f"{name}.json").read_text()))
    st = records.record_status("probe_gpu")
    assert st["how"] == "hashes" and st["changed"] is False and st["changed_sources"] == []
    r["info"]["kernel_sources"]["files"]["flashlib/tiled.py"] = "0" * 64
    r["superseded"] = "a test"
    path.write_text(json.dumps(r))
    st = records.record_status("probe_gpu")
    assert st["changed"] is True and st["changed_sources"] == ["flashlib/tiled.py"] and st["superseded"] == "a test"
    assert st["changed_by_area"] == {"cupy_kernels": [], "numba_kernels": [], "numpy": ["flashlib/tiled.py"]}
    assert [s["name"] for s in records.statuses()] == ["probe_gpu"]


@pytest.mark.skipif(not IN_GIT, reason="needs the git checkout")
def test_record_status_of_an_old_record_asks_git():
    st = records.record_status("cupy_h200")
    assert st["how"] == "git history" and isinstance(st["changed"], bool) and st["provenance_problems"] == []
    assert records.record_status("numba_tf32_h100")["superseded"]


def test_numba_peak_counts_what_the_call_holds_beyond_its_inputs():
    """The Numba side of flashlib.bench.memory on a stand-in for Numba's memory manager (same `allocations`
    table and memalloc method); the GPU run reads the real one."""
    import types
    from flashlib.bench.memory import NumbaPeak

    class Manager:
        def __init__(self):
            self.allocations, self.n = {}, 0

        def memalloc(self, size):
            self.n += 1
            self.allocations[self.n] = types.SimpleNamespace(size=size)
            return self.n

        def free(self, key):
            del self.allocations[key]

    m = Manager()
    m.memalloc(1000)                                   # an input, allocated before the call
    with NumbaPeak(m) as peak:
        a, b = m.memalloc(10), m.memalloc(20)          # 30 held at once
        m.free(a), m.free(b)
        m.memalloc(5)
    assert peak.peak == 30 and "memalloc" not in vars(m)
    m.memalloc(7)
    assert peak.peak == 30                             # no longer counting


def test_records_live_in_the_package_not_in_benchmarks():
    """Records written to the old folder would be missing from the wheel (and from Colab): they belong in RESULTS."""
    old = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    assert not sorted(p.name for p in old.glob("*.json")), f"move these into {bench.RESULTS}"


def test_backward_flops_are_two_and_a_half_forwards():
    from flashlib.constants import attention_flops, backward_flops
    assert backward_flops(2, 3, 100, 64, True) == 2.5 * attention_flops(2, 3, 100, 64, True)
    assert backward_flops(1, 1, 8, 8, Nk=5) == 2.5 * 4 * 8 * 5 * 8


def test_the_workload_keeps_the_tokens_fixed():
    from flashlib.bench.shapes import HEADS, TOKENS, workload
    assert [workload(N) for N in (512, 4096, 16384, 32768)] == [(32, 16), (4, 16), (1, 16), (1, 16)]
    assert all(workload(N)[0] * N == TOKENS for N in (512, 1024, 16384)) and HEADS == 16


def test_gpu_tag_names_the_gpu_or_says_gpu():
    import flashlib
    assert bench.gpu_tag("NVIDIA H100 80GB HBM3") == "h100" and bench.gpu_tag("Tesla T4") == "t4"
    assert bench.gpu_tag("NVIDIA A100-SXM4-80GB") == "a100" and bench.gpu_tag("some other board") == "gpu"
    if not flashlib.gpu_count():
        assert bench.gpu_tag() == "gpu"                  # the present GPU's name: none here


def test_compute_capability_forms():
    import flashlib
    from flashlib import env
    assert env.cc_tuple("8.9") == env.cc_tuple(89) == env.cc_tuple((8, 9)) == (8, 9)
    assert env.cc_text((9, 0)) == env.cc_text(90) == env.cc_text("9.0") == "9.0"
    cc = env.compute_capability()
    assert cc is None if not flashlib.gpu_count() else (isinstance(cc, tuple) and cc >= (7, 0))


def test_code_state_trusts_the_callers_commit_over_a_stale_git(monkeypatch):
    """On the GPU machine the copied tree held a .git of an older commit: git then named the wrong commit and
    called every changed file dirty. When $FLASHLIB_COMMIT disagrees with git's HEAD, the caller's word is taken
    (dirty unknown; the kernel-source hashes settle what ran)."""
    from flashlib.bench import records as rec
    answers = {("rev-parse", "--short", "HEAD"): "abc1234\n", ("status", "--porcelain"): " M flashlib/api.py\n"}
    monkeypatch.setattr(rec, "_git", lambda *args: answers.get(args))
    monkeypatch.setenv("FLASHLIB_COMMIT", "def5678")
    s = rec.code_state()
    assert (s["flashlib_commit"], s["flashlib_commit_source"], s["flashlib_dirty"]) == ("def5678", "FLASHLIB_COMMIT", None)
    monkeypatch.setenv("FLASHLIB_COMMIT", "abc1234")
    s = rec.code_state()
    assert (s["flashlib_commit"], s["flashlib_commit_source"], s["flashlib_dirty"]) == ("abc1234", "git", True)
