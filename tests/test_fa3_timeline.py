"""Rung 7's timeline without a GPU: the phase names match the kernel's enum, `parse` reads a synthetic buffer, the
viz draws a synthetic record (one lane per warpgroup, one bar per event)."""
import re

import matplotlib
import numpy as np
import pytest

from flashlib.cupy_kernels import HERE, timeline

matplotlib.use("Agg")


def test_phases_match_the_kernel_enum():
    src = (HERE / "fa3_forward.cu").read_text()
    body = re.search(r"enum Fa3Phase \{(.*?)\};", src, re.S).group(1)
    names = re.findall(r"TL_(\w+)", body)
    assert [n.lower() for n in names] == list(timeline.PHASES)
    assert "TL_Q_WAIT = 1" in body                                   # codes 1, 2, ...: 0 marks an unused slot
    assert int(re.search(r"constexpr int TL_CAP = (\d+);", src).group(1)) == timeline.TL_CAP
    assert "#define FA3_TIMELINE" in (HERE / "fa3_timeline.cu").read_text()


def _buffer(ncw=2):
    """CTA 0: the producer issues K (10-20 ns), consumer 1 waits for K (5-25) then runs a softmax (30-40); CTA 1:
    one epilogue of consumer 2. Stamps offset by 1000 ns and by per-SM clocks."""
    b = np.zeros(timeline.buffer_shape(ncw), np.int64)
    code = {p: i + 1 for i, p in enumerate(timeline.PHASES)}
    b[0, 0, 0] = (code["k_issue"], 1010, 1020, 500 + 10, 500 + 20)
    b[0, 1, 0] = (code["wait_k"], 1005, 1025, 500 + 5, 500 + 25)
    b[0, 1, 1] = (code["softmax"], 1030, 1040, 500 + 30, 500 + 40)
    b[1, 2, 0] = (code["epilogue"], 1100, 1150, 9000, 9050)
    return b


def test_parse_reads_a_synthetic_buffer():
    recs = timeline.parse(_buffer().ravel(), 2)
    assert [(r["cta"], r["lane"], r["phase"]) for r in recs] == [
        (0, "producer", "k_issue"), (0, "consumer 1", "wait_k"), (0, "consumer 1", "softmax"),
        (1, "consumer 2", "epilogue")]
    assert [(r["start_ns"], r["end_ns"]) for r in recs] == [(5, 15), (0, 20), (25, 35), (95, 145)]
    assert [(r["start_clk"], r["end_clk"]) for r in recs] == [(5, 15), (0, 20), (25, 35), (0, 50)]  # per CTA
    assert timeline.resolution_ns(recs) == 5
    assert timeline.parse(np.zeros(timeline.buffer_shape(3), np.int64), 3) == []
    bad = _buffer()
    bad[0, 0, 1, 0] = len(timeline.PHASES) + 1
    with pytest.raises(ValueError, match="phase code"):
        timeline.parse(bad, 2)


def test_draw_timeline_one_lane_per_warpgroup_one_bar_per_event():
    from flashlib.viz.warp_timeline import COLOUR, KIND, draw_timeline, lanes
    recs = timeline.parse(_buffer(), 2)
    recs.append(dict(recs[2], phase="softmax", start_ns=50, end_ns=50, start_clk=50, end_clk=50))  # a 0-length one
    ax = draw_timeline(recs, cta=0, title="synthetic")
    assert lanes(recs, 0) == ["producer", "consumer 1"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["producer", "consumer 1"]
    bars = [(c.get_label(), len(c.get_paths())) for c in ax.collections]
    assert sorted(bars) == [("TMA copy", 1), ("softmax", 2), ("wait", 1)]
    assert {p.get_label() for p in ax.get_legend().get_patches()} == {"TMA copy", "softmax", "wait"}
    assert all(KIND[p] in COLOUR for p in timeline.PHASES)
    ax = draw_timeline(recs, cta=1, clock="clk", window=(0, 100))
    assert ax.get_xlim() == (0, 100) and "cycles" in ax.get_xlabel()
    with pytest.raises(ValueError, match="CTA 5"):
        draw_timeline(recs, cta=5)
    with pytest.raises(ValueError, match="clock"):
        draw_timeline(recs, clock="us")


def test_draw_the_recorded_timeline():
    """The H200 record (benchmarks/fa3_timeline.py): every book case is there, each warpgroup of CTA 0 recorded,
    and the chart draws one bar per event of its case."""
    from flashlib import bench
    from flashlib.viz.warp_timeline import draw_timeline
    rec = bench.load("fa3_timeline_h200")
    rows = rec["rows"]
    assert [dict(variant=c["variant"], causal=c["causal"], H=c["H"], N=c["N"]) for c in rec["info"]["cases"]] == \
        [dict(c) for c in timeline.BOOK_CASES]
    for case in timeline.BOOK_CASES:
        mine = [r for r in rows if r["variant"] == case["variant"]]
        assert {r["warpgroup"] for r in mine if r["cta"] == 0} == {0, 1, 2}
        ax = draw_timeline(mine, cta=0)
        assert sum(len(c.get_paths()) for c in ax.collections) == sum(r["cta"] == 0 for r in mine)
