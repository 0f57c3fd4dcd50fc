"""The hardware layer: the GPU table's arithmetic, the device query, the figures, the recorded results, and
(on a GPU) each micro-benchmark within sane bounds of the datasheet."""
import json

import matplotlib

matplotlib.use("Agg")
import pytest  # noqa: E402

from flashlib import hardware  # noqa: E402
from flashlib.bench import RESULTS, describe, load  # noqa: E402

FIELDS = ("name", "sku", "arch", "memory_GB", "memory_type", "bus_bits", "gbps_per_pin", "bandwidth_GBps", "sms",
          "fp32_tflops", "power_W", "source", "arch_source")


@pytest.mark.parametrize("g", hardware.GPUS, ids=[g["name"] for g in hardware.GPUS])
def test_table_rows_have_fields_and_consistent_bandwidth(g):
    for f in FIELDS:
        assert g.get(f) is not None, f"{g['name']}: {f} missing"
    assert g["source"].startswith("https://") and "nvidia" in g["source"]
    # bandwidth = bus width x data rate: the quoted figure must follow from the two within 3 %
    assert hardware.peak_bandwidth(g["bus_bits"], g["gbps_per_pin"]) == pytest.approx(g["bandwidth_GBps"], rel=0.03)
    assert ("HBM" in g["memory_type"]) == (g["bus_bits"] >= 4096), "HBM is wide and slow per pin, GDDR narrow and fast"
    # a CUDA core does one FMA (2 FLOPs) per clock: the FP32 figure implies a boost clock of 1-2.6 GHz
    clock_GHz = g["fp32_tflops"] * 1e3 / (2 * g["cuda_cores"])
    assert 1.0 < clock_GHz < 2.6
    if g["fp16_tensor_sparse_tflops"] and g["fp16_tensor_tflops"]:
        assert g["fp16_tensor_sparse_tflops"] == pytest.approx(2 * g["fp16_tensor_tflops"], rel=0.01)
    assert g["cuda_cores"] == hardware.cores_per_sm(g["cc"]) * g["sms"]
    # Tensor Cores per SM: 8 on Volta and Turing, 4 from Ampere on; one RT core per SM where there are any
    tc_per_sm = {"Volta": 8, "Turing": 8}.get(g["arch"], 4)
    assert g["tensor_cores"] == tc_per_sm * g["sms"]
    assert g["rt_cores"] in (0, g["sms"])
    # where the board's figures were checked, and which were not: named fields of the row, explained in NOTES
    assert g["checked"] and set(g["unconfirmed"]) <= set(g)
    if g["unconfirmed"]:
        assert g["name"] in hardware.NOTES


def test_the_table_has_the_gpus_the_book_names():
    assert [g["name"] for g in hardware.GPUS] == ["T4", "V100", "A100", "L4", "RTX 4000 SFF Ada", "H100", "H200"]
    assert hardware.gpu("H100")["sku"] == "H100 SXM5 80GB"
    with pytest.raises(KeyError):
        hardware.gpu("GTX 480")
    assert [p["arch"] for p in hardware.TENSOR_PRECISIONS] == ["Volta", "Turing", "Ampere", "Ada", "Hopper"]
    assert "FP8" in hardware.TENSOR_PRECISIONS[-1]["precisions"] and "TF32" in hardware.TENSOR_PRECISIONS[2]["precisions"]


def test_arithmetic_helpers():
    assert hardware.peak_bandwidth(5120, 5.23) == pytest.approx(3347.2)
    assert hardware.bandwidth_from_clock(5120, 2_619_000) == pytest.approx(3352.3, rel=1e-4)   # H100 as the driver reports it
    assert hardware.pcie_bandwidth(4) == pytest.approx(31.5, rel=0.01)
    assert hardware.pcie_bandwidth(5) == pytest.approx(63.0, rel=0.01)
    assert hardware.ridge_point(989.5, 3350) == pytest.approx(295.4, rel=1e-3)
    assert hardware.roofline(1.0, 989.5, 3350) == pytest.approx(3.35)
    assert hardware.roofline(1e4, 989.5, 3350) == 989.5


def test_attention_parts_intensities():
    parts = hardware.attention_parts(4096, 64, itemsize=2, Br=128, Bc=128)
    ai = {k: f / b for k, (f, b) in parts.items()}
    assert ai["softmax"] == pytest.approx(1.25)                          # 5 FLOPs per 4 bytes moved
    assert ai["QK^T"] == pytest.approx(64 / (1 + 2 * 64 / 4096), rel=1e-9)
    assert ai["standard attention"] < ai["QK^T"]                         # the N x N round trips dilute it
    assert ai["fused, K/V re-read from HBM"] > 2 * ai["standard attention"]
    assert ai["fused, compulsory traffic"] > ai["fused, K/V re-read from HBM"]
    # the scale as a kernel of its own adds one N x N read and write: six crossings, 21.5 FLOP/B at N=4096, d=64
    N, (f4, b4), (f6, b6) = 4096, parts["standard attention"], parts["standard attention, scale as its own kernel"]
    assert f6 == f4 and b6 - b4 == 2 * 2 * N * N and b6 - 6 * 2 * N * N == 4 * 2 * N * 64
    assert round(ai["standard attention"], 1) == 32.1 and round(ai["standard attention, scale as its own kernel"], 1) == 21.5


def test_recorded_attention_points_are_read_as_what_they_timed():
    from flashlib.bench import load, micro
    old = load("hardware_h100")["rows"]["attention"]             # recorded before the scale was folded into q
    rows = {r["part"]: r for r in micro.attention_as_measured(old)}
    assert "standard attention" not in rows
    r = rows["standard attention, scale as its own kernel"]
    assert r["intensity"] == pytest.approx(21.53, abs=0.01) and r["form"] == "softmax((q @ k^T) * scale) @ v"
    assert r["ms"] == next(o["ms"] for o in old if o["part"] == "standard attention")
    new = [{**o, "form": "given"} for o in old]                    # rows that name their form are left alone
    assert micro.attention_as_measured(new) == new


def test_occupancy():
    o = hardware.occupancy(256, 16, 0)                                    # small kernel: threads limit
    assert (o["blocks"], o["occupancy"], o["limiter"]) == (8, 1.0, "threads")
    o = hardware.occupancy(128, 255, 0)                                   # register hungry
    assert o["limiter"] == "registers" and o["blocks"] == 2
    o = hardware.occupancy(128, 32, 100 * 1024)                           # 100 KB of shared memory per block
    assert o["limiter"] == "shared memory" and o["blocks"] == 2 and o["occupancy"] == pytest.approx(8 / 64)


def test_query_without_gpu_returns_none(monkeypatch):
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")
    assert hardware.query_device() is None
    assert hardware.closest_row(None) is None
    assert hardware.closest_row({"name": "NVIDIA H100 80GB HBM3"})["name"] == "H100"
    assert hardware.host_memory_bytes() is None or hardware.host_memory_bytes() > 2**28


def test_kernel_source_is_one_kernel_with_its_comment():
    from flashlib.bench import micro
    assert micro.kernel_source("empty").splitlines() == [
        "// empty: does nothing; launching it measures the cost of a launch alone.", "__global__ void empty() {}"]
    src = micro.kernel_source("copy_f4")
    assert src.startswith("// copy_f4:") and src.endswith("}") and "strided_read" not in src


def test_micro_run_all_keeps_the_name_it_is_given(monkeypatch, tmp_path):
    """--name wins even when the device reports no name (it used to be dropped then), and the default name is
    hardware_<gpu tag>."""
    from flashlib.bench import micro
    assert micro.default_name({}) == "hardware_gpu"
    assert micro.default_name({"name": "NVIDIA H100 80GB HBM3"}) == "hardware_h100"
    if hardware.query_device():
        pytest.skip("a GPU is present: run_all would run every benchmark")
    monkeypatch.setattr(micro, "device_info", lambda: {})
    monkeypatch.setattr(micro, "print", lambda *a: None, raising=False)
    _, _, paths = micro.run_all("hardware_probe", tmp_path)
    assert [p.name for p in paths] == ["hardware_probe.json", "hardware_probe_smid.json"]


def test_l2_sweep_refuses_sizes_that_are_not_powers_of_two():
    from flashlib.bench import micro
    with pytest.raises(ValueError, match="powers of two.*\\[3, 48\\]"):
        micro.l2_sweep((1, 3, 48))


def test_kernels_compile_with_nvrtc():
    micro = pytest.importorskip("flashlib.bench.micro")
    try:
        ptx = micro.compile_ptx("compute_75")
    except ImportError:
        pytest.skip("NVRTC not installed")
    for k in micro.KERNELS:
        assert f".entry {k}(" in ptx
    body = ptx.split(".entry fma_loop(")[1].split(".entry")[0]
    assert body.count("fma.rn.f32") == 8 * 16                             # none folded away
    assert "%smid" in ptx and "%globaltimer" in ptx and "ld.global.cg" in ptx


def test_figures_render_headless():
    from flashlib.viz import hardware_plots as hv
    h100 = hardware.gpu("H100")
    figs = [hv.memory_pyramid([dict(name="registers", capacity=33e6, bandwidth=None),
                               dict(name="HBM", capacity=80e9, bandwidth=3350, note="datasheet")]),
            hv.roofline({"FP16 Tensor": 989.5}, {"HBM": 3350},
                        [dict(label="softmax", intensity=1.25, TFLOPs=3.0), dict(label="PV", intensity=60)]),
            hv.sm_timeline({"sms": 2, "threads": 32, "blocks_per_sm": 2,
                            "blocks": [dict(block=i, sm=i % 2, start_us=10.0 * (i // 4), end_us=10.0 * (i // 4) + 9)
                                       for i in range(8)]}),
            hv.bars(["a", "b"], [1.0, 2.0], reference=3.0),
            hv.l2_cliff([dict(MB=1, GBps=9000.0), dict(MB=512, GBps=3000.0)], l2_MB=50, hbm_GBps=3350)]
    for f in figs:
        f.canvas.draw()
    t = hv.table(hv.GPU_TABLE_HEADERS, hv.gpu_table_rows([h100])).markdown()
    assert "| H100 SXM5 80GB |" in t


RECORDED = sorted(p.stem for p in RESULTS.glob("hardware_*.json") if not p.stem.endswith("_smid"))


@pytest.mark.parametrize("name", RECORDED)
def test_recorded_results_have_provenance(name):
    r = load(name)
    assert r["info"]["gpu"] and r["info"]["date"] and r["info"]["device"]["sms"] > 0
    assert "Recorded on" in describe(r)
    rows = r["rows"]
    for key in ("transfers", "launch", "copy", "strided", "smem", "l2", "fma", "matmul"):
        assert key in rows and "error" not in rows[key], key
    t = load(name + "_smid")["rows"]
    assert len(t["blocks"]) > t["sms"] and {b["sm"] for b in t["blocks"]} <= set(range(t["sms"]))


def test_recorded_results_are_json():
    for p in RESULTS.glob("hardware_*.json"):
        json.loads(p.read_text())


# ---- on a GPU ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dev():
    info = hardware.query_device()
    assert info is not None and info["sms"] > 0
    return dict(info=info, row=hardware.closest_row(info))


def _datasheet_bw(dev):
    return dev["row"]["bandwidth_GBps"] if dev["row"] else dev["info"]["bandwidth_GBps"]


@pytest.mark.gpu
def test_query_device(dev):
    i = dev["info"]
    assert i["memory_bytes"] > 2**32 and i["warp"] == 32 and i["l2_bytes"] > 2**20
    assert i["bandwidth_GBps"] == pytest.approx(_datasheet_bw(dev), rel=0.1)


@pytest.mark.gpu
def test_vector_add_cupy():
    import cupy as cp
    from flashlib.bench import micro
    n = 1000
    a, b = cp.arange(n, dtype=cp.float32), cp.full(n, 0.5, dtype=cp.float32)
    c = cp.full(n, cp.nan, dtype=cp.float32)
    micro.kernel("vector_add")(((n + 255) // 256,), (256,), (a, b, c, cp.int32(n)))
    assert cp.allclose(c, a + 0.5)


@pytest.mark.gpu
def test_transfers_and_launch():
    from flashlib.bench import micro
    t = micro.transfers(64 * 2**20)
    assert 1 < t["h2d_pinned_GBps"] < 80 and 1 < t["d2h_pinned_GBps"] < 80
    assert t["h2d_pinned_GBps"] > 0.5 * t["h2d_pageable_GBps"]
    lo = micro.launch_overhead(500)
    assert 0.5 < lo["cupy_launch_us"] < 100 and lo["cupy_launch_sync_us"] >= lo["gpu_event_us"] * 0.5


@pytest.mark.gpu
def test_copy_bandwidth_near_datasheet(dev):
    from flashlib.bench import micro
    r = micro.copy_bandwidth(256 * 2**20)
    assert 0.3 * _datasheet_bw(dev) < r["kernel_GBps"] < 1.0 * _datasheet_bw(dev)


@pytest.mark.gpu
def test_strided_and_banks():
    from flashlib.bench import micro
    s = {r["stride"]: r["useful_GBps"] for r in micro.strided_access(4 * 2**20, (1, 8, 32))}
    assert s[1] > 3 * s[32]                                  # uncoalesced reads waste most of each sector
    b = {r["stride"]: r["GBps"] for r in micro.shared_memory_banks((1, 2, 32), reps=64)}
    assert b[1] > 1.6 * b[2] and b[1] > 10 * b[32]            # 2-way and 32-way bank conflicts


@pytest.mark.gpu
def test_l2_cliff(dev):
    from flashlib.bench import micro
    rows = {r["MB"]: r["GBps"] for r in micro.l2_sweep((2, 512))}
    assert rows[2] > 1.3 * rows[512]
    assert rows[512] < 1.05 * _datasheet_bw(dev)


@pytest.mark.gpu
def test_fma_and_tensor_cores(dev):
    from flashlib.bench import micro
    fma = micro.fma_throughput(256)["TFLOPs"]
    peak = dev["info"].get("fp32_tflops") or dev["row"]["fp32_tflops"]
    assert 0.4 * peak < fma < 1.05 * peak
    mm = {r["dtype"]: r["TFLOPs"] for r in micro.matmul_throughput(4096)}
    assert mm["fp16"] > 2 * fma                              # Tensor Cores beat CUDA cores


@pytest.mark.gpu
def test_smid_timeline(dev):
    from flashlib.bench import micro
    t = micro.smid_timeline(waves=2, spin_us=10)
    blocks = t["blocks"]
    assert len(blocks) == 2 * t["blocks_per_sm"] * t["sms"]
    assert len({b["sm"] for b in blocks}) == t["sms"]         # every SM got work
    assert all(b["end_us"] - b["start_us"] >= 10 for b in blocks)
    # never more blocks at once on one SM than the occupancy limit
    for sm in range(t["sms"]):
        mine = [b for b in blocks if b["sm"] == sm]
        for b in mine:
            overlap = sum(1 for o in mine if o["start_us"] < b["start_us"] + 1e-3 < o["end_us"])
            assert overlap <= t["blocks_per_sm"]
