"""flashlib.viz's table helper and figure style: numbers without exponents, numeric columns right-aligned,
Markdown that renders as a table, plain text that lines up, and the book's colour cycle."""
import ast
import json
import pathlib

import matplotlib

matplotlib.use("Agg")

import pytest

from flashlib.bench import describe, source
from flashlib.viz import OKABE_ITO
from flashlib.viz.tables import number, table


@pytest.mark.parametrize("x,text", [(2119.3, "2,119"), (33200.0, "33,200"), (0.94123, "0.9412"), (62.06, "62.06"),
                                    (7, "7"), (1234567, "1,234,567"), (0.0, "0"), (float("nan"), "–"),
                                    (8.1, "8.1"), (1.0, "1"), (2.5e-7, "2.500e-07"), ("fp16", "fp16"), (None, "None"), (True, "True")])
def test_numbers_read_without_exponents(x, text):
    assert number(x) == text
    assert "e+" not in number(2119.3, 3) and number(2119.3, 3) == "2,119"


def test_markdown_aligns_numeric_columns_right_and_escapes_pipes():
    t = table(["what", "GB/s", "speed-up", "note"],
              [["copy", 2985.4, "1.5×", "a|b"], ["read", None, "12 / 3.4", "x"], ["write", 12, "–", "7"]])
    lines = t.markdown().splitlines()
    assert lines[0] == "| what | GB/s | speed-up | note |"
    assert lines[1] == "|---|---:|---:|---|"                       # "note" holds "a|b": not a number column
    assert lines[2] == "| copy | 2,985 | 1.5× | a\\|b |"
    assert lines[3] == "| read | – | 12 / 3.4 | x |"
    assert t._repr_markdown_() == t.markdown()


def test_plain_text_lines_up_and_holds_no_markdown():
    t = table(["GPU", "GB/s"], [["[T4](https://example.org/t4)", 320], ["H100 SXM5", 3350]])
    lines = str(t).splitlines()
    assert lines == ["GPU" + " " * 9 + "GB/s", "-" * 9 + "  " + "-" * 5, "T4" + " " * 11 + "320", "H100 SXM5  3,350"]
    assert "|" not in str(t) and repr(t) == str(t)


def test_a_row_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="every row needs 2 cells"):
        table(["a", "b"], [[1, 2], [3]])


def test_the_colour_cycle_is_okabe_ito():
    assert [c["color"] for c in matplotlib.rcParams["axes.prop_cycle"]] == OKABE_ITO


def test_provenance_is_short_with_the_versions_folded():
    r = {"info": {"gpu": "NVIDIA H100 80GB HBM3", "date": "2026-11-25T10:00:00+00:00", "flashlib_commit": "abc1234",
                  "driver": "580.95", "torch": "2.11.0", "cupy": "13.6.0", "numba_cuda": "0.22.0"}}
    line = describe(r)
    assert line == "Recorded on NVIDIA H100 80GB HBM3, 2026-11-25, flashlib abc1234." and len(line) < 90
    html = source(r)._repr_html_()
    assert html.startswith('<details class="provenance"><summary>Recorded on NVIDIA H100')
    assert "torch 2.11.0" in html and "torch 2.11.0" not in line and "torch 2.11.0" in repr(source(r))


def test_log_axes_get_plain_labels_at_1_2_5():
    import matplotlib.pyplot as plt
    from flashlib.viz import plain_log_ticks
    fig, ax = plt.subplots()
    ax.loglog([20, 1000], [1.5, 30])
    plain_log_ticks(ax)
    fig.canvas.draw()
    lo, hi = ax.get_ylim()
    shown = [t.get_text() for t, v in zip(ax.get_yticklabels(), ax.get_yticks()) if lo <= v <= hi]
    assert shown == ["2", "5", "10", "20"]
    assert [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()] == []
    plt.close(fig)


def _undisplayed_tables(src):
    """Line numbers of `table(...)` statements in a cell's code that IPython would not display: every one but a
    last top-level statement."""
    try:
        module = ast.parse(src)
    except SyntaxError:                      # IPython magics: not this test's business
        return []
    lines = []
    for node in ast.walk(module):
        stmts = getattr(node, "body", None)
        for k, stmt in enumerate(stmts if isinstance(stmts, list) else []):
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call) and \
                    getattr(stmt.value.func, "id", None) == "table" and not (node is module and k == len(stmts) - 1):
                lines.append(stmt.lineno)
    return lines


def test_every_notebook_table_is_displayed():
    """flashlib.viz.tables.table returns a table to display: called as a statement anywhere but at the end of a
    cell, it shows nothing (chapter 11's main table was lost that way). Such calls must go through display()."""
    lost = []
    for p in sorted(pathlib.Path(__file__).resolve().parents[1].glob("notebooks/*.ipynb")):
        for i, cell in enumerate(json.loads(p.read_text())["cells"]):
            if cell["cell_type"] == "code":
                lost += [f"{p.name} cell {i} line {n}" for n in _undisplayed_tables("".join(cell["source"]))]
    assert not lost, lost
    assert _undisplayed_tables("table(a, b)\nx = 1") == [1] and _undisplayed_tables("x = 1\ntable(a, b)") == []
