"""The tile tables are the winners of the sweeps whose logs the repository keeps (benchmarks/results/logs/)."""
import ast
import collections
import pathlib

import pytest

from flashlib import cupy_kernels as ck

LOGS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "logs"
pytestmark = pytest.mark.skipif(not LOGS.is_dir(), reason="needs the checkout's benchmark logs")


def _mean(xs):
    return sum(xs) / len(xs)


def test_wgmma_tiles_are_the_sweep_winners_among_the_accepted():
    rows = [ast.literal_eval(line) for line in (LOGS / "wgmma_explore_3_swizzled_h200.txt").read_text().splitlines()
            if line.startswith("{")]
    seen = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in rows:
        for key, value in r.items():
            if key.startswith("wgmma(") and not key.endswith("_diff"):
                seen[(r["d"], r["causal"])][ast.literal_eval(key[len("wgmma"):])].append(value)
    assert set(seen) == {(d, c) for d in ck.WGMMA_HEAD_DIMS for c in (False, True)}
    for (d, causal), timed in seen.items():
        accepted = {t: v for t, v in timed.items() if t[0] in (1, 2)}          # choose_config refuses 3 warpgroups
        best = max(accepted, key=lambda t: _mean(accepted[t]))
        assert ck.WGMMA_TILES[d][causal] == best, (d, causal, best)


def test_tuned_d128_causal_tile_is_the_best_that_does_not_spill():
    lines = [line.split("|") for line in (LOGS / "tuned_d128_causal_sweep_h200.txt").read_text().splitlines()
             if "tuned_" in line]
    timed = collections.defaultdict(list)
    for cells in lines:
        nw, bc, rw, qreg = (int(x) for x in cells[5].strip().split("_")[1:])
        timed[(nw, bc, rw, bool(qreg))].append(float(cells[6]))
    spilling = {(4, 64, 32, False)}                 # 12-24 bytes of spill on sm_90 (the log's note; ptxas)
    best = max((t for t in timed if t not in spilling), key=lambda t: _mean(timed[t]))
    assert ck.TUNED_TILES[128][True] == best
    assert max(timed, key=lambda t: _mean(timed[t])) in spilling       # the fastest of all is the one refused


def test_rung7_is_the_default_where_the_record_times_it_faster():
    """d = 256 became rung 7's (FA3_DEFAULT_HEAD_DIMS) on the H200 ablation: rung 7 (ping-pong, the default
    variant) beat rung 3 ('tuned', the default before) at every d = 256 shape, its output near SDPA flash's."""
    from flashlib import bench
    rows = bench.load("fa3_ablation_h200")["rows"]
    shapes = {(r["n"], r["causal"]) for r in rows if r["d"] == 256}
    assert len(shapes) == 4 and 256 in ck.FA3_DEFAULT_HEAD_DIMS
    for n, causal in shapes:
        got = {r["impl"]: r for r in rows if (r["d"], r["n"], r["causal"]) == (256, n, causal)}
        assert got["rung7_pingpong"]["tflops"] > got["rung3_tuned"]["tflops"], (n, causal)
        assert got["rung7_pingpong"]["err_vs_flash"] < 2e-3, (n, causal)
    assert ck.choose_config("float16", 256, 90).rung == "fa3" and ck.choose_config("float16", 200, 90).rung == "fa3"


def test_rung7_d256_tile_beat_the_other_it_compiles():
    from flashlib import bench
    rows = [r for r in bench.load("fa3_ablation_pair_major_h200")["rows"] if r["impl"].startswith("rung7_tiles_")]
    assert {r["causal"] for r in rows} == {False, True}
    for causal in (False, True):
        got = {tuple(int(x) for x in r["impl"].split("_")[-1].split("x")): r["tflops"] for r in rows
               if r["causal"] == causal}
        assert set(got) == set(ck.config_hopper.fa3_candidates(256, causal))
        assert max(got, key=got.get) == ck.config_hopper.fa3_tiles(256, causal), (causal, got)


def test_bwd_wgmma_is_the_default_where_the_record_times_it_faster():
    """BWD_WGMMA_DEFAULT_DIMS holds the head dims where the H200 records time 'bwd_wgmma' (dQ by TMA reductions)
    faster than 'bwd_tc' at every shape and dtype (bwd_wgmma_h200 at d = 64, 128; bwd_wgmma_d256_h200 at d = 256);
    dQ by atomics ('bwd_wgmma_atomic', timed in the same runs) stays slower than it everywhere; the gradients agree
    with SDPA flash's."""
    from flashlib import bench
    rows = bench.load("bwd_wgmma_h200")["rows"] + bench.load("bwd_wgmma_d256_h200")["rows"]
    by = collections.defaultdict(dict)
    for r in rows:
        by[(r["dtype"], r["d"], r["n"], r["causal"])][r["impl"]] = r
    faster = {d for d in ck.BWD_WGMMA_HEAD_DIMS
              if all(v["bwd_wgmma"]["tflops"] > v["bwd_tc"]["tflops"] for k, v in by.items() if k[1] == d)}
    assert faster == set(ck.config_hopper.BWD_WGMMA_DEFAULT_DIMS) == {64, 128, 256}
    for key, v in by.items():
        assert v["bwd_wgmma"]["tflops"] > v["bwd_wgmma_atomic"]["tflops"], key
        assert v["bwd_wgmma"]["max_err_vs_flash"] <= max(2e-2, 1.01 * v["bwd_tc"]["max_err_vs_flash"]), key
    assert len(by) == 24       # fp16, bf16 x d = 64, 128, 256 x N = 4096, 16384 x causal


def test_the_dynamic_scheduler_is_the_default_where_the_record_times_it_faster():
    """fa3_schedulers_h200 times rung 7's grid ('pingpong'), its static and dynamic persistent grids in one run at
    every head dim, N = 4096 and 16384, causal and not. config_hopper.FA3_DYNAMIC, where "dynamic" is the default
    variant, holds each (d, causal) where it was not slower than the grid by more than 1 % at any N, and none where
    it was more than 1 % faster at every N."""
    from flashlib import bench
    from flashlib.cupy_kernels import tma
    rec = bench.load("fa3_schedulers_h200")
    speedup = collections.defaultdict(list)     # (d, causal) -> the grid's time / the dynamic one's, per N
    ms = {(r["d"], r["n"], r["causal"], r["impl"]): r["ms"] for r in rec["rows"]}
    for d, n, causal, impl in ms:
        if impl == "rung7_dynamic":
            speedup[(d, causal)].append(ms[(d, n, causal, "rung7_pingpong")] / ms[(d, n, causal, impl)])
    assert set(speedup) == {(d, c) for d in ck.FA3_HEAD_DIMS for c in (False, True)}
    assert all(len(v) == 2 for v in speedup.values())
    for key, s in speedup.items():
        if key in ck.config_hopper.FA3_DYNAMIC:
            assert min(s) >= 0.99, (key, s)
        else:
            assert min(s) < 1.01, (key, s)
    assert min(speedup[(64, True)]) > 1.05                 # what chapter 8 says: causal d = 64, 1.1x
    assert tma.fa3_config("float16", 64, True).dynamic and ck.choose_config("float16", 64, 90, True).fa3.dynamic


@pytest.mark.parametrize("name", ["numba_wgmma_h200_first_run", "numba_wgmma_h200"])
def test_numba_wgmma_tiles_are_the_fastest_recorded(name):
    """fa2_wgmma.TILES[d][causal] is, of the tiles the H200 timed (numba_wgmma: the record's default tiles, in its
    info; numba_wgmma_<NWG>x<Bc>: the others), the fastest by mean TFLOP/s over the recorded N: in the run that
    chose them (rung 6's tiles the default then) and in the run after."""
    from flashlib.bench import results
    from flashlib.numba_kernels import fa2_wgmma
    rec = results.load(name)
    timed = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in rec["rows"]:
        if r["impl"] == "numba_wgmma":
            tiles = tuple(rec["info"]["tiles"][str(r["d"])][r["causal"]])
        elif r["impl"].startswith("numba_wgmma_") and r["impl"] != "numba_wgmma_kernel":
            tiles = tuple(int(x) for x in r["impl"].rsplit("_", 1)[1].split("x"))
        else:
            continue
        timed[(r["d"], r["causal"])][tiles].append(r["tflops"])
    assert set(timed) == {(d, c) for d in fa2_wgmma.HEAD_DIMS for c in (False, True)}
    for (d, causal), got in timed.items():
        assert len(got) >= 3, (d, causal, got)
        assert max(got, key=lambda t: _mean(got[t])) == fa2_wgmma.TILES[d][causal], (d, causal, dict(got))


def test_the_public_call_record_covers_hopper_and_costs_no_gpu_time():
    """public_api_h200 (chapter 11's table) times the public call beside the direct launches and SDPA at every head
    dim of the Hopper rungs, N = 1024, 4096 and 16384, fp16 and bf16, causal and not, and records the commit it ran.
    The public call runs the direct launches' kernels: its GPU time is theirs within the rows' noise (6%), forward
    and forward + backward."""
    from flashlib import bench
    rec = bench.load("public_api_h200")
    assert rec["info"]["complete"] and rec["info"]["flashlib_commit"] and rec["info"]["kernel_sources"]
    by = {(r["dtype"], r["d"], r["N"], r["causal"], r["backend"]): r for r in rec["rows"]}
    cases = {k[:4] for k in by}
    assert cases == {(t, d, n, c) for t in ("float16", "bfloat16") for d in ck.FA3_HEAD_DIMS
                     for n in (1024, 4096, 16384) for c in (False, True)}
    for case in cases:
        for key in ("fwd_tflops", "fwdbwd_tflops"):
            ratio = by[case + ("flashlib-cupy",)][key] / by[case + ("flashlib-cupy-direct",)][key]
            assert abs(ratio - 1) < 0.06, (case, key, ratio)


def test_rung7_d128_tiles_replace_the_first_sweeps_where_faster_at_every_shape():
    """fa3_tiles_d128_h200 (fa3_bench.py --tiles) times every candidate tile at d = 128 in the default variant, fp16 and
    bf16, N = 4096, 8192, 16384. A tile replaces the first sweep's (128, 2, 2) with the mask or without where it is
    faster at every one of those shapes; of several, the one whose slowest shape is nearest the fastest tile there."""
    from flashlib import bench
    from flashlib.cupy_kernels.config_hopper import fa3_tiles
    timed = collections.defaultdict(lambda: collections.defaultdict(dict))   # causal -> tiles -> (dtype, N) -> TFLOP/s
    for r in bench.load("fa3_tiles_d128_h200")["rows"]:
        if r["impl"].startswith("rung7_"):
            tiles = tuple(int(x) for x in r["impl"].split("_")[1].split("x"))
            timed[r["causal"]][tiles][(r["dtype"], r["n"])] = r["tflops"]
    first = (128, 2, 2)
    for causal, by_tile in timed.items():
        shapes = set(by_tile[first])
        assert len(shapes) == 6 and all(set(v) == shapes for v in by_tile.values())
        best = {s: max(v[s] for v in by_tile.values()) for s in shapes}
        better = [t for t, v in by_tile.items() if t != first and all(v[s] > by_tile[first][s] for s in shapes)]
        want = max(better, key=lambda t: min(by_tile[t][s] / best[s] for s in shapes)) if better else first
        assert fa3_tiles(128, causal) == want, (causal, want)
    assert set(timed) == {False, True}


def test_rung7_narrow_last_tile_is_on_only_where_faster_at_every_length():
    """fa3_narrow_h200 (fa3_bench.py --narrow) times rung 7 with a narrow last key tile against the full one, fp16 and
    bf16, N = 1024 ... 16384, at d = 128 and 256. The outputs agree bit for bit in every row; rung 7 narrows by
    default at a head dim only where the narrow tile was faster at every (dtype, N): nowhere."""
    from flashlib import bench
    from flashlib.cupy_kernels.config_hopper import fa3_config
    timed = collections.defaultdict(dict)   # (d, dtype, N) -> {"narrow" | "full": TFLOP/s}
    for r in bench.load("fa3_narrow_h200")["rows"]:
        assert r["elements_differing"] == 0, r
        if r["impl"].startswith("rung7_"):
            timed[(r["d"], r["dtype"], r["n"])]["full" if r["impl"] == "rung7_full" else "narrow"] = r["tflops"]
    dims = {k[0] for k in timed}
    assert dims == {128, 256} and all(len(v) == 2 for v in timed.values()) and len(timed) == 16
    for d in dims:
        faster = all(v["narrow"] > v["full"] for k, v in timed.items() if k[0] == d)
        assert bool(fa3_config("float16", d, False, Nk=4096 + 1).narrow) == faster, d   # a partial last tile
