"""Compile every kernel to PTX without a GPU and read its resource use from `ptxas -v`.

`cuda.compile_ptx` needs the real Numba-CUDA target (not the simulator): run this module in a process without
NUMBA_ENABLE_CUDASIM, e.g. `python -m flashlib.numba_kernels.ptx` (prints a table; --json for JSON).
"""
import json
import re
import shutil
import subprocess
import sys
import tempfile

CCS = ((7, 5), (8, 0), (9, 0))
A4 = "float32[:, :, :, ::1]"
A3 = "float32[:, :, ::1]"
TR = "int32[:, :, ::1]"


def kernels():
    """(name, python function, signature, threads per block) for every kernel at every head bucket on a GPU."""
    import importlib
    fa1, fa2, fa2_fast, fa2_bwd, matmul = (importlib.import_module(f"{__package__}.{m}")
                                           for m in ("fa1", "fa2", "fa2_fast", "fa2_bwd", "matmul"))
    from ._common import HEAD_DIMS
    out = [("matmul_naive", matmul.matmul_naive.py_func, "void(float32[:, ::1], float32[:, ::1], float32[:, ::1])", 256),
           ("matmul_tiled", matmul.make_matmul_tiled().py_func,
            "void(float32[:, ::1], float32[:, ::1], float32[:, ::1])", matmul.TILE ** 2),
           ("rowsum_do_o", fa2_bwd.rowsum_do_o.py_func, f"void({A4}, {A4}, {A3})", 128),
           ("zero4", fa2_bwd.zero4.py_func, f"void({A4})", 128)]
    for D in HEAD_DIMS:
        Br, Bc = fa1.tiles(D)
        out.append((f"fa1_forward D={D}", fa1.make_fa1(Br, Bc, D).py_func,
                    f"void({A4}, {A4}, {A4}, {A4}, {A3}, {A3}, {A3}, boolean, float32, {TR}, boolean)", Br))
        Br, Bc = fa2.tiles(D)
        out.append((f"fa2_forward D={D}", fa2.make_fa2(Br, Bc, D).py_func,
                    f"void({A4}, {A4}, {A4}, {A4}, {A3}, boolean, float32, {TR}, boolean, uint8[:, ::1], boolean)", Br))
        cfg = fa2_fast.config(D, sim=False)
        kern, nt = fa2_fast.make_fa2_fast(D=D, SHFL=True, **dict(zip(("Br", "Bc", "TM", "TN", "NKV"), cfg)))
        out.append((f"fa2_forward_fast D={D}", kern.py_func,
                    f"void({A4}, {A4}, {A4}, {A4}, {A3}, boolean, float32, {TR}, boolean)", nt))
        Br, Bc, G = fa2_bwd.tiles(D)
        kern, nt = fa2_bwd.make_backward(Br, Bc, D, G)
        out.append((f"fa2_backward D={D}", kern.py_func,
                    f"void({A4}, {A4}, {A4}, {A3}, {A4}, {A3}, {A4}, {A4}, {A4}, boolean, float32)", nt))
    return out


def ptxas(ptx, cc):
    """{'registers', 'smem', 'stack', 'spill_stores', 'spill_loads'} from `ptxas -arch=sm_XY -v`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/k.ptx"
        open(path, "w").write(ptx)
        r = subprocess.run(["ptxas", f"-arch=sm_{cc[0]}{cc[1]}", "-v", path, "-o", f"{tmp}/k.cubin"],
                           capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed for sm_{cc[0]}{cc[1]}: {r.stderr[-2000:]}")
    text = r.stderr + r.stdout
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, text)) else 0
    return {"registers": num(r"Used (\d+) registers"), "smem": num(r"(\d+) bytes smem"),
            "stack": num(r"(\d+) bytes stack frame"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads")}


def report(ccs=CCS, only=None):
    from numba import cuda
    if shutil.which("ptxas") is None:
        raise RuntimeError("ptxas is not on PATH")
    rows = []
    for name, fn, sig, threads in kernels():
        if only and only not in name:
            continue
        for cc in ccs:
            ptx, _ = cuda.compile_ptx(fn, sig, cc=cc)
            rows.append({"kernel": name, "cc": f"{cc[0]}.{cc[1]}", "threads": threads, **ptxas(ptx, cc)})
    return rows


if __name__ == "__main__":
    rows = report(only=next((a for a in sys.argv[1:] if not a.startswith('--')), None))
    if "--json" in sys.argv:
        print(json.dumps(rows))
    else:
        print(f"{'kernel':28s} {'cc':4s} {'thr':>4s} {'regs':>4s} {'smem':>6s} {'stack':>5s} {'spill':>5s}")
        for r in rows:
            print(f"{r['kernel']:28s} {r['cc']:4s} {r['threads']:4d} {r['registers']:4d} {r['smem']:6d} "
                  f"{r['stack']:5d} {r['spill_stores']:5d}")
