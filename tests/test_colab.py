"""A Colab runtime, emulated on the CPU, and what a Colab T4 gets.

The `colab` tests use .venv-colab: a venv of requirements-colab.txt alone (Colab's versions), made by `make test`
(which sets FLASHLIB_COLAB_VENV; without a venv these tests skip, with the variable set and no venv they fail).
Into it goes the flashlib wheel built from this tree, with --no-deps, as the notebooks' set-up cell installs it.
Then the notebooks, copied alone into an empty folder (Colab's /content), run there in Numba's CUDA simulator as
on a CPU runtime: any failing cell fails. The venv also compiles every kernel the T4 dispatch can choose with its
own numba-cuda (compile_ptx) and CUDA 12 ptxas for sm_75.
"""
import ast
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from flashlib import cupy_kernels as ck
from flashlib import hardware
from flashlib.numba_kernels import HEAD_DIMS, TF32_HEAD_DIMS, default_variant, fa2_bwd_tf32, fa2_tc

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
VENV = os.environ.get("FLASHLIB_COLAB_VENV")
T4 = (7, 5)


def colab_pins():
    """{canonical name: version} of requirements-colab.txt (every line NAME[extras]==VERSION)."""
    pins = {}
    for line in (ROOT / "requirements-colab.txt").read_text().splitlines():
        if line.split("#")[0].strip():
            req = Requirement(line.split("#")[0])
            (spec,) = req.specifier
            assert spec.operator == "==", f"pin every Colab version exactly: {line}"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def test_core_dependencies_are_on_colab():
    """The --no-deps assumption (pyproject.toml): Colab's versions satisfy every core dependency of flashlib."""
    pins = colab_pins()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, deps):
        name = canonicalize_name(dep.name)
        assert name in pins, f"{dep.name} is a core dependency, so Colab must have it (requirements-colab.txt)"
        assert dep.specifier.contains(pins[name]), f"Colab's {dep.name} {pins[name]} does not satisfy {dep}"


# ---------------------------------------------------------------- the records are package data
def test_records_live_in_the_package_and_a_gpu_reads_none(capsys):
    import flashlib
    from flashlib import bench
    assert bench.RESULTS == pathlib.Path(flashlib.__file__).parent / "data" / "results"
    assert len(list(bench.RESULTS.glob("*.json"))) >= 20
    with pytest.raises(FileNotFoundError, match="no recorded result named 'nope'.*hardware_h100"):
        bench.load("nope")
    measure = bench.micro.live_or_recorded(True, name="nope")          # a GPU measures: no record needed
    assert measure("copy", lambda: {"live": 1}) == {"live": 1} and capsys.readouterr().out == ""
    measure = bench.micro.live_or_recorded(False)                       # no GPU: the recorded numbers, described
    assert measure("fma", lambda: pytest.fail("measured without a GPU")) == bench.load("hardware_h100")["rows"]["fma"]
    assert "Recorded on NVIDIA H100" in capsys.readouterr().out


def test_grid_imports_without_tqdm(monkeypatch):
    """tqdm is optional (not a core dependency): the benchmark modules import and run their loop without it."""
    import importlib
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    from flashlib.bench import grid
    importlib.reload(grid)
    assert grid.progress_bar([1, 2], "x") == [1, 2]


# ---------------------------------------------------------------- the T4 dispatch (pure Python)
def test_t4_dispatch_is_fp16_m16n8k8_without_cp_async():
    """On compute capability 7.5 the library picks fp16 Tensor Core kernels of m16n8k8 with no cp.async, and no
    bf16 or tf32 Tensor Core kernel (Turing has neither): float32 runs on CUDA cores; bf16 is refused."""
    for d in fa2_tc.TILES_SM75:                                  # the T4 path's head dims (32 ... 256)
        assert default_variant("float16", d, T4) == "tc"
        *_, nstage, _, _, k8 = fa2_tc.config(d, T4, "float16")
        assert k8 and nstage == 1, "sm_75: two m16n8k8 per k16 step, single-stage loads (no cp.async)"
        assert not fa2_tc.config(d, (8, 0), "float16")[-1]
        with pytest.raises(ValueError, match="8.0"):
            fa2_tc.check(d, "bfloat16", T4)
    for d in HEAD_DIMS:
        assert default_variant("float32", d, T4) == "fa2_fast"
    assert {default_variant("float32", d, (8, 0)) for d in TF32_HEAD_DIMS} == {"tf32x3"}
    for d in ck.HEAD_DIMS:
        cfg = ck.choose_config("float16", d, T4)
        assert cfg.rung == "sm75" and cfg.kernel.split(", ")[5:7] == ["false", "true"]   # fa2_tc<.., TUNED, K8, ..>
        assert ck.choose_config("float32", d, T4).rung == "fp32"
        assert {ck.default_rung(dt, T4, "backward") for dt in ck.DTYPES} == {"bwd_fp32"}
        with pytest.raises(ValueError, match="bfloat16 needs compute capability 8.0"):
            ck.choose_config("bfloat16", d, T4)


def test_t4_backward_is_not_the_tf32_kernel(monkeypatch):
    """fa2_bwd_tf32 (TF32 mma) is chosen on sm_80+ only; on a T4 the backward is fa2_backward on CUDA cores."""
    monkeypatch.setattr(fa2_bwd_tf32, "simulated", lambda: False)
    dev = lambda cc, smem: type("Dev", (), {"compute_capability": cc, "MAX_SHARED_MEMORY_PER_BLOCK_OPTIN": smem})()
    for d in fa2_bwd_tf32.TF32_HEAD_DIMS:
        assert not fa2_bwd_tf32.fits(d, dev(T4, 64 * 1024))
        assert fa2_bwd_tf32.fits(d, dev((9, 0), 227 * 1024))


def test_hardware_chapter_labels_on_a_t4():
    """ch04 labels each matmul's units by compute capability: on a T4 only fp16 has Tensor Cores."""
    t4 = hardware.gpu("T4")["cc"]
    assert [hardware.matmul_units(dt, t4) for dt in ("fp16", "bf16", "tf32", "fp32")] == \
        ["Tensor Cores", "CUDA cores", "CUDA cores", "CUDA cores"]
    for name in ("A100", "L4", "H100"):
        cc = hardware.gpu(name)["cc"]
        assert [hardware.matmul_units(dt, cc) for dt in ("fp16", "bf16", "tf32", "fp32")] == \
            ["Tensor Cores"] * 3 + ["CUDA cores"], name
    ch04 = (ROOT / "notebooks" / "04_inside_an_sm.ipynb").read_text()
    assert "hardware.matmul_units(" in ch04 and 'else \\"Tensor Cores\\"' not in ch04


# ---------------------------------------------------------------- the emulated Colab runtime
colab = pytest.mark.colab


def _env(venv, simulator=True):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NUMBA_ENABLE_CUDASIM", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["MPLBACKEND"] = "Agg"
    if simulator:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    return env


@pytest.fixture(scope="module")
def colab_python(tmp_path_factory):
    """.venv-colab's python, with the wheel of this tree installed non-editable, --no-deps."""
    venv = ROOT / (VENV or ".venv-colab")                 # relative to the repository, as the Makefile sets it
    if not (venv / "bin" / "python").exists():
        if VENV:
            pytest.fail(f"FLASHLIB_COLAB_VENV={VENV} has no python: run `make .venv-colab/.installed`")
        pytest.skip("no .venv-colab (make test prepares it from requirements-colab.txt)")
    dist, src = tmp_path_factory.mktemp("dist"), tmp_path_factory.mktemp("src")
    shutil.copytree(ROOT / "flashlib", src / "flashlib", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):        # a clean copy: no stale build/ of setuptools in the wheel
        shutil.copy(ROOT / name, src)
    pip = lambda py, *a: subprocess.run([str(py), "-m", "pip", *a], capture_output=True, text=True, check=False)
    r = pip(sys.executable, "wheel", "-q", "--no-deps", "-w", str(dist), str(src))
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = dist.glob("flashlib-*.whl")
    py = venv / "bin" / "python"
    r = pip(py, "install", "-q", "--no-deps", "--no-index", "--force-reinstall", str(wheel))
    assert r.returncode == 0, r.stderr[-3000:]
    return py


def _run(py, script, cwd, simulator=True, timeout=900):
    r = subprocess.run([str(py), "-c", script], capture_output=True, text=True, cwd=cwd,
                       env=_env(py.parent.parent, simulator), timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@colab
def test_wheel_carries_every_record(colab_python, tmp_path):
    out = _run(colab_python, """
import json, flashlib
from flashlib import bench
names = sorted(p.stem for p in bench.RESULTS.glob("*.json"))
info = {n: bench.load(n)["info"] for n in names}
print(json.dumps({"file": flashlib.__file__, "results": str(bench.RESULTS), "names": names,
                  "described": [bench.describe({"info": i}) for i in info.values()]}))
""", tmp_path)
    site = str(colab_python.parent.parent)
    assert out["file"].startswith(site) and out["results"].startswith(site), out["file"]
    assert out["names"] == sorted(p.stem for p in (ROOT / "flashlib" / "data" / "results").glob("*.json"))
    assert all(re.match(r"Recorded on NVIDIA .*, 20\d\d-\d\d-\d\d, .*flashlib \w", d) for d in out["described"])


def notebook_imports():
    """Top-level module names the notebooks' code cells import (magics and shell lines left out)."""
    names = set()
    for path in NOTEBOOKS:
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] != "code":
                continue
            src = "\n".join(l[:len(l) - len(l.lstrip())] + "pass" if l.lstrip().startswith(("%", "!")) else l
                            for l in "".join(cell["source"]).splitlines())
            for node in ast.walk(ast.parse(src)):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names.add(node.module.split(".")[0])
    return sorted(names)


@colab
def test_everything_the_notebooks_import_is_there(colab_python, tmp_path):
    """Every import of every notebook, GPU-only branches too, resolves in the Colab venv plus the wheel."""
    names = notebook_imports()
    assert {"flashlib", "numpy", "torch", "matplotlib"} <= set(names)
    missing = _run(colab_python, f"""
import importlib.util, json
print(json.dumps([n for n in {names!r} if importlib.util.find_spec(n) is None]))
""", tmp_path)
    assert missing == [], f"imported by a notebook but neither on Colab nor installed by the set-up cell: {missing}"


@pytest.fixture(scope="module")
def executed(colab_python, tmp_path_factory):
    """Every notebook run from an empty folder with the wheel's flashlib: {stem: (status line, executed notebook)}."""
    content, out = tmp_path_factory.mktemp("content"), tmp_path_factory.mktemp("executed")
    for p in NOTEBOOKS:
        shutil.copy(p, content)
    spec = _run(colab_python, "from jupyter_client.kernelspec import KernelSpecManager as K; import json; "
                "print(json.dumps(K().get_kernel_spec('python3').argv))", content)
    assert spec[0] in ("python", str(colab_python)) or spec[0].startswith(str(colab_python.parent)), spec
    r = subprocess.run([str(colab_python), str(ROOT / "tools" / "run_notebooks.py"), "--jobs", "2", "--timeout", "900",
                        "--out", str(out), *sorted(str(p) for p in content.glob("*.ipynb"))],
                       capture_output=True, text=True, cwd=content, env=_env(colab_python.parent.parent), timeout=3600)
    status = {pathlib.Path(m.group(2)).stem: m.group(0)
              for m in re.finditer(r"^(ok|FAILED)\s.*?(\S+\.ipynb)(\n\s{7}.*)?$", r.stdout, re.M)}
    print(r.stdout)
    return {stem: (status.get(stem, r.stdout[-3000:] + r.stderr[-3000:]),
                   json.loads((out / f"{stem}.ipynb").read_text()) if (out / f"{stem}.ipynb").exists() else None)
            for stem in (p.stem for p in NOTEBOOKS)}


def _outputs(nb):
    text = []
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            text.append("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", "")))
            text.append("\n".join(o.get("traceback", [])))
    return "\n".join(text)


@colab
@pytest.mark.parametrize("stem", [p.stem for p in NOTEBOOKS])
def test_notebook_runs_from_the_wheel(executed, stem):
    status, nb = executed[stem]
    assert status.startswith("ok"), status
    text = _outputs(nb)
    assert not re.search(r"not (been )?recorded|no recorded", text, re.I), "a record the wheel should carry is missing"
    code = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    if re.search(r"\bload\(|live_or_recorded\(", code):             # shows recorded numbers: with GPU, date, commit
        assert re.search(r"Recorded on NVIDIA [^,]+, 20\d\d-\d\d-\d\d, flashlib \w+", text), stem


# ---------------------------------------------------------------- T4 kernels under Colab's numba-cuda and CUDA 12
T4_PTX = """
import json
from numba import cuda
import numba, numba_cuda
from flashlib.numba_kernels import fa2_tc, ptx
rows = []
for name, fn, sig, threads in ptx.kernels():               # float32 forward/backward and the chapters' kernels
    text = cuda.compile_ptx(fn, sig, cc=(7, 5))[0]
    rows.append({"kernel": name, "threads": threads, "mma": text.count("mma.sync"), **ptx.ptxas(text, (7, 5))})
for name, cc, args in ptx.tc_instances():                   # the fp16 Tensor Core kernels sm_75 dispatches to
    if cc == (7, 5):
        text = ptx.tc_ptx(args, cc)
        rows.append({"kernel": name, "threads": 32 * args[1], "k8": text.count("mma.sync.aligned.m16n8k8."),
                     "k16": text.count("m16n8k16"), "cp_async": text.count("cp.async"), "bf16": text.count(".bf16"),
                     "tf32": text.count(".tf32"), **ptx.ptxas(text, cc)})
print(json.dumps({"versions": [numba.__version__, numba_cuda.__version__], "rows": rows}))
"""


@colab
def test_t4_kernels_compile_under_colab_versions(colab_python, tmp_path):
    ptxas = next(colab_python.parent.parent.glob("lib/python*/site-packages/nvidia/cuda_nvcc/bin/ptxas"), None)
    assert ptxas, "requirements-colab.txt brings CUDA 12's nvcc (numba-cuda[cu12]), as Colab's toolkit"
    env = _env(colab_python.parent.parent, simulator=False)
    env["PATH"] = f"{ptxas.parent}{os.pathsep}{env['PATH']}"
    r = subprocess.run([str(colab_python), "-c", T4_PTX], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    pins = colab_pins()
    assert out["versions"] == [pins["numba"], pins["numba-cuda"]]
    rows = {row["kernel"]: row for row in out["rows"]}
    assert {f"fa2_tc_k8 float16 D={d}" for d in fa2_tc.TILES_SM75} <= set(rows)
    assert {f"fa2_forward_fast D={d}" for d in HEAD_DIMS} | {f"fa2_backward D={d}" for d in HEAD_DIMS} <= set(rows)
    for name, row in rows.items():
        spill = fa2_tc.SM75_SPILL_BYTES.get(int(name.split("D=")[1]), 0) if name.startswith("fa2_tc_k8") else 0
        assert row["spill_stores"] <= spill and row["spill_loads"] <= spill, (name, row)   # d = 256 on sm_75: small
        assert row["registers"] * row["threads"] <= 65536 and row["smem"] <= 48 * 1024, (name, row)
        if name.startswith("fa2_tc_k8"):
            assert row["stack"] <= 32 * (spill > 0) and row["k8"] > 0 and row["k16"] == row["cp_async"] == row["bf16"] == row["tf32"] == 0, (name, row)
        else:
            assert row["mma"] == 0, (name, row)                          # CUDA cores only
