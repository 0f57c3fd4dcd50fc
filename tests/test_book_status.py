"""The status page's table of recorded runs (tools/book_status.py), built from the notebooks and the records."""
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("book_status", ROOT / "tools" / "book_status.py")
book_status = importlib.util.module_from_spec(spec)
spec.loader.exec_module(book_status)


def test_every_chapter_has_a_row_and_every_record_its_provenance():
    from flashlib import bench
    text = book_status.table()
    for nb in (ROOT / "notebooks").glob("*.ipynb"):
        assert f"{{doc}}`/notebooks/{nb.stem}`" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and ".json`" in line]
    assert rows
    for line in rows:
        name = next(c.strip(" `").removesuffix(".json") for c in line.split("|") if ".json`" in c)
        info = bench.load(name)["info"]
        assert info["gpu"] in line and info["date"][:10] in line and f"`{info['flashlib_commit']}`" in line


def test_records_are_found_in_the_code_cells():
    from flashlib import bench
    names = {p.stem for p in pathlib.Path(bench.RESULTS).glob("*.json")}
    assert book_status.chapter_records(ROOT / "notebooks" / "07_flashattention.ipynb", names) == ["ncu_io_h100"]
    assert book_status.chapter_records(ROOT / "notebooks" / "06_online_softmax.ipynb", names) == []


def test_changed_since_says_when_it_cannot_tell():
    assert book_status.changed_since("wip", ["flashlib"]).startswith("unknown")
    assert book_status.changed_since("0000000", ["flashlib"]).startswith("unknown")
    head = book_status._git("rev-parse", "--short", "HEAD")
    if head:                                                      # a checkout with history
        assert book_status.changed_since(head, ["flashlib"]) == "no"
        assert "uncommitted" in book_status.changed_since(head + "+wip", ["flashlib"])
    assert book_status.measured_sources("numba_tc_h200")[0] == "benchmarks/numba_tc_bench.py"
    assert book_status.measured_sources("numba_h100")[0] == "benchmarks/numba_bench.py"
