"""The visualizations render headless (Agg) from flashlib.tiled's trace, one frame per step."""
import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from flashlib import iomodel
from flashlib.viz import matmul_tiles, players, softmax_anim, sparsity, stepthrough, trace


def qkv2(rng, Nq=48, Nk=48, d=8):
    return rng.standard_normal((Nq, d)), rng.standard_normal((Nk, d)), rng.standard_normal((Nk, d))


def suptitle(fig):
    return fig._suptitle.get_text()


CASES = [("fa1", False, 48, 48), ("fa2", False, 48, 40), ("fa1", True, 48, 48), ("fa2", True, 40, 48),
         ("bwd", False, 48, 48), ("bwd", True, 40, 33)]


@pytest.mark.parametrize("algo,causal,Nq,Nk", CASES)
def test_record_and_draw_every_step(rng, algo, causal, Nq, Nk):
    q, k, v = qkv2(rng, Nq, Nk)
    rec = stepthrough.record(algo, q, k, v, causal=causal, Br=16, Bc=16)
    Tr, Tc = -(-Nq // 16), -(-Nk // 16)
    # one step per (i, j) tile; backward omits K/V blocks that no query sees
    assert len(rec["steps"]) == (Tr * Tc if algo != "bwd" or not causal else
                                 Tr * sum(any(j * 16 <= min((i + 1) * 16, Nq) - 1 for i in range(Tr))
                                          for j in range(Tc)))
    assert any(s["skipped"] for s in rec["steps"]) == (causal and Tc > 1)
    fig = None
    for n in range(len(rec["steps"])):
        fig = stepthrough.draw_step(fig, rec, n)
        assert f"step {n + 1}/{len(rec['steps'])}:" in suptitle(fig)
        assert f"i = {rec['steps'][n]['i']}, j = {rec['steps'][n]['j']}" in suptitle(fig)
    fig.canvas.draw()


def test_counter_ends_at_iomodel_totals(rng):
    q, k, v = qkv2(rng, 64, 64, 16)
    for algo, fn in (("fa1", iomodel.fa1_hbm_bytes), ("fa2", iomodel.fa2_hbm_bytes)):
        rec = stepthrough.record(algo, q, k, v, causal=True)
        last = rec["steps"][-1]
        assert (last["hbm_read"], last["hbm_written"]) == fn(64, 64, 16, 16, 16, True) == rec["total"]
        assert rec["standard"] == iomodel.standard_hbm_bytes(64, 64, 16)


def test_player_frames_and_embed_limit(rng):
    q, k, v = qkv2(rng, 64, 64, 16)
    rec = stepthrough.record("fa2", q, k, v, causal=True)
    html = stepthrough.player(rec)
    assert html.count("data:image/png;base64") == len(rec["steps"]) == 16
    assert len(html.encode()) < min(players.embed_limit_bytes(), 2 * 2 ** 20)   # 2x frames, palette PNGs
    assert 'style="width: 100%' in html                                             # as wide as the column


def test_slider_redraws_the_chosen_step(rng):
    q, k, v = qkv2(rng)
    rec = stepthrough.record("fa1", q, k, v)
    box = stepthrough.slider(rec)
    first = box.image.value
    assert "step 1/9:" in suptitle(box.figure)
    box.slider.value = 4                       # fires the observer as a user's drag would
    assert "step 5/9:" in suptitle(box.figure) and "i = 1, j = 1" in suptitle(box.figure)
    assert box.image.value != first and box.image.value[:4] == b"\x89PNG"


def test_block_sparse_record(rng):
    q, k, v = qkv2(rng, 64, 64)
    mask = sparsity.local_global_mask(4, local=1)
    rec = stepthrough.record("fa2", q, k, v, block_mask=mask)
    assert [not s["skipped"] for s in rec["steps"]] == list(mask.ravel())
    assert "block-sparse" in suptitle(stepthrough.draw_step(None, rec, 3))
    with pytest.raises(ValueError):
        stepthrough.record("fa1", q, k, v, block_mask=mask)


def test_softmax_animation(rng):
    x = np.array([0.5, 2.0, 1.0, 3.0, -1.0])
    fig = softmax_anim.new_figure()
    softmax_anim.draw_softmax_step(fig, x, 3)
    assert "key 4/5: m = 3.00" in suptitle(fig) and "max grew" in suptitle(fig)
    softmax_anim.draw_softmax_step(fig, x, 2)
    assert "did not change" in suptitle(fig)
    assert softmax_anim.softmax_player(x, dpi=40).count("data:image/png;base64") == len(x)


def test_matmul_tiles():
    assert matmul_tiles.global_loads(64, 16) == {"naive": 2 * 64 ** 3, "tiled": 2 * 64 ** 3 // 16}
    n_frames = len(matmul_tiles.frames(64, 16))
    assert n_frames == 8
    assert matmul_tiles.matmul_player(64, 16, dpi=40).count("data:image/png;base64") == n_frames


def test_sparsity_mask_drawing():
    import matplotlib.pyplot as plt
    mask = np.ones((4, 4), bool)
    fig, ax = plt.subplots()
    assert sparsity.draw_mask(ax, mask, causal=True) == pytest.approx(10 / 16)
    assert sparsity.tile_status(mask, causal=True)[0, 1] == -1
    plt.close(fig)


def test_mma_fragment_figure_covers_every_element_once():
    from flashlib.viz import fragments
    from flashlib.numba_kernels.lanes import a_index
    lane, elem = fragments._grid(a_index, 16, 16, 8)
    assert (lane >= 0).all() and sorted(zip(lane.ravel(), elem.ravel())) == [(l, e) for l in range(32) for e in range(8)]
    fig = fragments.mma_layout()
    assert len(fig.axes) == 3 and "lane" in fig._suptitle.get_text()


# ----- legibility, per-tensor counters, the side-by-side and backward players, waves, explorers ----------------

def test_frames_are_legible_at_the_column_width(rng):
    """Text >= 10 px on screen when a frame is shown 750 px wide, drawn at >= 2x (>= 1500 px wide)."""
    q, k, v = stepthrough.structured_inputs(48, 8)
    figs = [stepthrough.draw_step(None, stepthrough.record(a, q, k, v, causal=True), 2) for a in ("fa1", "fa2", "bwd")]
    figs.append(stepthrough.compare_step(None, stepthrough.record("fa1", q, k, v), stepthrough.record("fa2", q, k, v), 3))
    figs.append(softmax_anim.draw_softmax_step(softmax_anim.new_figure(), np.array([0.5, 2.0, 1.0]), 1))
    for fig in figs:
        fig.canvas.draw()
        assert players.min_font_px(fig) >= 10
        assert fig.get_figwidth() * players.DPI >= 2 * players.COLUMN_PX


def test_structured_inputs_show_a_diagonal_and_large_keys():
    from flashlib import reference
    q, k, v = stepthrough.structured_inputs(64, 16, sinks=(6, 41))
    S = reference.scores(q, k)
    top2 = np.argsort(S, axis=1)[:, -2:]
    own = np.mean([i in top2[i] or S[i, i] > np.median(S[i]) + 2 for i in range(64)])
    assert own > 0.9                                            # the diagonal stands out
    assert (np.isin(S.argmax(1), (6, 41)) | (S.argmax(1) == np.arange(64))).mean() > 0.9
    rec = stepthrough.record("fa2", q, k, v)
    rescaled = [st for st in rec["steps"] if st["j"] == 2 and np.any(st["m"] > 0)]   # key 41 arrives in tile 2
    assert rescaled


@pytest.mark.parametrize("algo,causal,Nq,Nk", CASES + [("fa2", False, 40, 33)])
def test_per_tensor_counters_add_up_to_the_trace(rng, algo, causal, Nq, Nk):
    q, k, v = qkv2(rng, Nq, Nk)
    rec = stepthrough.record(algo, q, k, v, causal=causal, Br=16, Bc=16)
    for n, st in enumerate(rec["steps"]):
        per = trace.tensor_bytes(rec, n)
        assert sum(r for r, _ in per.values()) == st["hbm_read"]
        assert sum(w for _, w in per.values()) == st["hbm_written"]
    final = trace.tensor_bytes(rec, len(rec["steps"]) - 1)
    if algo == "fa1" and not causal:                            # ch07 exercise 1: Q read T_c times, K and V once
        Tc = -(-Nk // 16)
        assert final["Q"][0] == Tc * Nq * 8 * 4 and final["K"][0] == Nk * 8 * 4 == final["V"][0]


def test_backward_gradients_replayed_from_the_trace(rng):
    from flashlib import reference
    q, k, v = qkv2(rng, 40, 33)
    rec = stepthrough.record("bwd", q, k, v, causal=True)
    o, lse = reference.attention_forward(q, k, v, True)
    expected = reference.attention_backward(q, k, v, o, lse, rec["do"], True)
    for got, want in zip(trace.gradients(rec, len(rec["steps"]) - 1), expected):
        np.testing.assert_allclose(got, want, atol=1e-12)
    dq, dk, dv = trace.gradients(rec, 0)                  # after one tile: only block 0's rows and keys
    assert np.abs(dv[16:]).max() == 0 and np.abs(dv[:16]).max() > 0


def test_compare_player(rng):
    q, k, v = stepthrough.structured_inputs(32, 8)
    r1, r2 = (stepthrough.record(a, q, k, v) for a in ("fa1", "fa2"))
    html = stepthrough.compare_player(r1, r2, dpi=40)
    assert html.count("data:image/png;base64") == 4 and 'style="width: 100%' in html
    with pytest.raises(ValueError, match="same tiles"):
        stepthrough.compare_player(r1, stepthrough.record("fa2", q, k, v, Br=8))


def test_waves():
    from flashlib.viz import waves
    assert waves.wave_of(1024, 132, 2) == (4, 1024 - 3 * 264, (1024 - 3 * 264) / 264)
    assert waves.wave_of(16, 132, 1)[0] == 1
    with pytest.raises(ValueError):
        waves.wave_of(0, 132, 1)
    assert waves.waves_player(300, 132, 1).count("data:image/png;base64") == 3


def test_explorers_redraw_and_fall_back_to_a_figure():
    from flashlib.viz import explorers
    box = explorers.stepthrough_explorer("fa1", N=32)
    first = box.holder.children[0]
    box.controls["algo"].value = "bwd"
    assert box.holder.children[0] is not first and "backward" in suptitle(box.holder.children[0].figure)
    roof = explorers.roofline_explorer()
    before = roof.image.value
    roof.controls["gpu"].value = "T4"
    assert roof.image.value != before and "Tesla T4" in roof.figure.axes[0].get_title()
    sram = explorers.sram_explorer()
    sram.controls["Br"].value = 64
    assert "B_r = 64" in sram.figure._suptitle.get_text()
    bundle = explorers.live(sram, sram.figure)._repr_mimebundle_()
    assert {"image/png", "application/vnd.jupyter.widget-view+json"} <= set(bundle)


def test_sram_budget():
    from flashlib.viz import explorers
    b = explorers.sram_budget("A100", 128, 64, 64, "float16", 4)
    assert b["smem_total"] == (128 + 2 * 64) * 64 * 2 and b["fits"] and b["blocks"] >= 1
    assert b["limiter"] in ("registers", "shared memory", "threads", "blocks")
    assert not explorers.sram_budget("T4", 256, 256, 256, "float32", 4)["fits"]

# ---- the hardware diagrams (flashlib.viz.diagrams) ------------------------------------------------------------
COLUMN_PX = 700        # a conservative width of the book's text column: figures are shown scaled to it


def _texts(fig):
    fig.canvas.draw()
    return [t for t in fig.findobj(lambda a: hasattr(a, "get_text") and hasattr(a, "get_fontsize"))
            if t.get_visible() and t.get_text().strip()]


def _check_legible_and_apart(fig):
    """Every text is >= 10 px tall at the column width, inside the figure, and overlaps no other text."""
    renderer = fig.canvas.get_renderer()
    px_per_pt = COLUMN_PX / fig.get_figwidth() / 72
    texts = _texts(fig)
    boxes = []
    for t in texts:
        assert t.get_fontsize() * px_per_pt >= 10, (t.get_text(), t.get_fontsize())
        bb = t.get_window_extent(renderer)
        assert fig.bbox.contains(bb.x0, bb.y0) and fig.bbox.contains(bb.x1, bb.y1), t.get_text()
        boxes.append((bb.shrunk(0.98, 0.9), t.get_text()))
    for i, (a, ta) in enumerate(boxes):
        for b, tb in boxes[i + 1:]:
            assert not a.overlaps(b), (ta, tb)
    return [t.get_text() for t in texts]


def test_host_device_diagram_names_the_three_steps():
    from flashlib import hardware
    from flashlib.viz import diagrams
    text = " | ".join(_check_legible_and_apart(diagrams.host_device(hardware.pcie_bandwidth(5, 16), 3350, "H100")))
    for part in ("(1) copy the data in", "(2) launch kernels", "(3) copy the results back", "bottleneck",
                 "63 GB/s each way", "3,350 GB/s", "CPU", "main memory", "GPU memory", "Tensor Cores", "CUDA"):
        assert part in text, part


@pytest.mark.parametrize("hbm,gddr", [("H100", "T4"), ("H200", "L4"), ("A100", "RTX 4000 SFF Ada")])
def test_hbm_vs_gddr_diagram_takes_its_numbers_from_the_table(hbm, gddr):
    from flashlib import hardware
    from flashlib.viz import diagrams
    texts = _check_legible_and_apart(diagrams.hbm_vs_gddr(hbm, gddr))
    text = " | ".join(texts)
    h, g = hardware.gpu(hbm), hardware.gpu(gddr)
    assert f"{h['bus_bits'] // 1024} stacks x 1024 bit = {h['bus_bits']:,}-bit bus" in text
    assert f"{g['bus_bits'] // 32} chips x 32 bit" in text and f"= {g['bus_bits']}-bit bus" in text
    for r in (h, g):
        assert f"= {r['bandwidth_GBps']:,} GB/s" in text and r["memory_type"] in text
    assert texts.count("HBM") == h["bus_bits"] // 1024 and texts.count(g["memory_type"]) == g["bus_bits"] // 32


def test_hopper_sm_diagram_has_four_quarters_and_their_units():
    from flashlib.viz import diagrams
    text = " | ".join(_check_legible_and_apart(diagrams.hopper_sm()))
    for q in range(1, 5):
        assert f"quarter {q}" in text
    for part in ("INT32\nx 16", "FP32 x 32", "FP64\nx 16", "Tensor Core", "register file: 16,384 x 32-bit",
                 "warp scheduler", "256 KiB L1 data cache / shared memory", "228 KiB"):
        assert text.count(part) == (1 if "L1" in part or "228" in part else 4), part


def test_bank_diagram_counts_the_conflict_and_the_padding_fix():
    import matplotlib.pyplot as plt
    from flashlib.viz import diagrams
    text = " | ".join(_check_legible_and_apart(diagrams.shared_memory_banks()))
    assert "32 passes: a 32-way conflict" in text and "1 pass: no conflict" in text
    fig, ax = plt.subplots()
    assert [diagrams._bank_panel(ax, 0, w, "") for w in (32, 33, 34, 16)] == [32, 1, 2, 16]
    plt.close(fig)
