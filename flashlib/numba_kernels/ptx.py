"""Compile the Numba kernels to PTX without a GPU and read their resource use from `ptxas -v`: the one CLI.

`cuda.compile_ptx` needs the real Numba-CUDA target (not the simulator): run this module in a process without
NUMBA_ENABLE_CUDASIM:
  python -m flashlib.numba_kernels.ptx [core|tc|tf32|bwd_tf32|wgmma] [filter] [--json]
core (the default): the CUDA-core rungs (a table; --json for JSON); tc, tf32, bwd_tf32, wgmma: every instance of the
Tensor Core kernels (fa2_tc, fa2_tf32, fa2_bwd_tf32; fa2_wgmma for sm_90a) with instruction counts (JSON).
filter: a substring of the names.
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
    """(name, python function, signature, threads per block) for every CUDA-core kernel at every head bucket."""
    import importlib
    fa1, fa2, fa2_fast, fa2_bwd, matmul = (importlib.import_module(f"{__package__}.{m}")
                                           for m in ("fa1", "fa2", "fa2_fast", "fa2_bwd", "matmul"))
    from .host import HEAD_DIMS
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
    """{'registers', 'smem', 'stack', 'spill_stores', 'spill_loads', 'advisories'} from `ptxas -arch=sm_XY -v` (cc
    (9, 0, "a"): sm_90a); advisories: ptxas's numbered performance notes, e.g. "(C7510) Potential Performance Loss:
    wgmma.mma_async instructions are serialized" or "(C7519) warpgroup.arrive is injected"."""
    arch = "sm_" + "".join(map(str, cc))
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/k.ptx"
        open(path, "w").write(ptx)
        r = subprocess.run(["ptxas", f"-arch={arch}", "-v", path, "-o", f"{tmp}/k.cubin"],
                           capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed for {arch}: {r.stderr[-2000:]}")
    text = r.stderr + r.stdout
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, text)) else 0
    return {"registers": num(r"Used (\d+) registers"), "smem": num(r"(\d+) bytes smem"),
            "stack": num(r"(\d+) bytes stack frame"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"),
            "advisories": re.findall(r"\((C7\d\d\d)\)", text)}


def with_maxnreg(text, n):
    """PTX text with a `.maxnreg n` directive before the kernel's body, as cuda.jit(max_registers=n) asks of ptxas
    (cuda.compile_ptx has no such option); text itself when n is 0 or None."""
    if not n:
        return text
    at = text.index("{", text.index(".entry"))
    return f"{text[:at]}.maxnreg {n}\n{text[at:]}"


def core_report(ccs=CCS, only=None):
    """Rows {kernel, cc, threads, registers, smem, stack, spill_stores, spill_loads} of the CUDA-core kernels."""
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


# ---------------------------------------------------------------- fa2_tc (fp16 / bf16 Tensor Cores)
def tc_instances():
    """(name, cc, make_fa2_tc arguments) of every kernel fa2_tc can launch: m16n8k16 fp16 and bf16 on sm_80 / sm_90
    with the default tiles, the m16n8k8 fp16 path on sm_75 (and sm_80, where a T4 path can be tested on a newer GPU)."""
    from . import fa2_tc
    out = []
    for D in fa2_tc.HEAD_DIMS:
        for dtype in fa2_tc.DTYPES:
            for cc in ((8, 0), (9, 0)):
                out.append((f"fa2_tc {dtype} D={D}", cc, fa2_tc.factory_args(D, fa2_tc.TILES[D], dtype, False)))
        for cc in ((7, 5), (8, 0)) if D in fa2_tc.TILES_SM75 else ():
            out.append((f"fa2_tc_k8 float16 D={D}", cc, fa2_tc.factory_args(D, fa2_tc.TILES_SM75[D], "float16", True)))
    return out


def tc_ptx(args, cc):
    """PTX text of make_fa2_tc(*args) for compute capability cc."""
    from numba import cuda
    from . import fa2_tc
    kern = fa2_tc.make_fa2_tc(*args)[0]
    return cuda.compile_ptx(kern.py_func, fa2_tc.SIG, cc=cc, **fa2_tc.jit_options(args[1], args[7]))[0]


def tc_report(only=None):
    """Rows {kernel, cc, threads, tiles, mt, minb, mma, mma_shape, mma_k8, mma_k16, bf16, ldmatrix, ldmatrix_trans,
    cp_async, shfl, smem_align16, registers, smem, stack, spill_stores, spill_loads}."""
    rows = []
    for name, cc, args in tc_instances():
        if only and only not in name:
            continue
        text = tc_ptx(args, cc)
        rows.append({"kernel": name, "cc": f"{cc[0]}.{cc[1]}", "threads": 32 * args[1], "tiles": list(args[1:4]),
                     "mt": args[6], "minb": args[7],
                     "mma": text.count("mma.sync.aligned.m16n8k16") + text.count("mma.sync.aligned.m16n8k8"),
                     "mma_shape": "m16n8k8" if args[5] else "m16n8k16",
                     "mma_k8": text.count("mma.sync.aligned.m16n8k8."),
                     "mma_k16": text.count("mma.sync.aligned.m16n8k16."),
                     "bf16": text.count(".bf16.bf16.f32"), "ldmatrix": text.count("ldmatrix.sync.aligned.m8n8.x4"),
                     "ldmatrix_trans": text.count("ldmatrix.sync.aligned.m8n8.x4.trans"),
                     "cp_async": text.count("cp.async.cg.shared.global"), "shfl": text.count("shfl.sync.bfly"),
                     "smem_align16": ".shared .align 16 " in text, **ptxas(text, cc)})
    return rows


# ---------------------------------------------------------------- fa2_tf32 (3xTF32 forward)
def tf32_instances():
    """(name, cc, make_fa2_tf32 arguments) of every kernel to check in PTX: default tiles, sm_80 and sm_90."""
    from . import fa2_tf32
    return [(f"fa2_tf32 D={D}", cc, (D, *fa2_tf32.TILES[D])) for D in fa2_tf32.TF32_HEAD_DIMS
            for cc in ((8, 0), (9, 0))]


def tf32_report(only=None, extra=()):
    """Rows {kernel, cc, threads, tiles, mma_tf32, mma_other, ld_shared_v4, cp_async, shfl, smem_align16, registers,
    smem, stack, spills}; extra: more (name, cc, make_fa2_tf32 arguments)."""
    from numba import cuda
    from . import fa2_tf32
    rows = []
    for name, cc, args in list(tf32_instances()) + list(extra):
        if only and only not in name:
            continue
        kern, NT, _ = fa2_tf32.make_fa2_tf32(*args)
        text = with_maxnreg(cuda.compile_ptx(kern.py_func, fa2_tf32.SIG, cc=cc)[0], args[4] if len(args) > 4 else 0)
        rows.append({"kernel": name, "cc": f"{cc[0]}.{cc[1]}", "threads": NT, "tiles": list(args[1:]),
                     "mma_tf32": text.count("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32"),
                     "mma_other": text.count("mma.sync") - text.count("mma.sync.aligned.m16n8k8.row.col.f32.tf32"),
                     "ld_shared_v4": text.count("ld.shared.v4"), "cp_async": text.count("cp.async.cg.shared.global"),
                     "shfl": text.count("shfl.sync.bfly"), "smem_align16": ".shared .align 16 " in text,
                     **ptxas(text, cc)})
    return rows


# ---------------------------------------------------------------- fa2_bwd_tf32 (3xTF32 backward)
def bwd_tf32_instances():
    """(name, cc, (D, Br)) of every kernel `backward` can launch."""
    from . import fa2_bwd_tf32 as bt
    return [(f"fa2_bwd_tf32 D={D}", cc, (D, bt.TILES[D])) for D in bt.TF32_HEAD_DIMS for cc in ((8, 0), (9, 0))]


def bwd_tf32_report(only=None):
    """Rows {kernel, cc, threads, D, Br, mma, atom, dyn_smem, maxreg, registers, smem, stack, spill_stores,
    spill_loads}."""
    from numba import cuda
    from . import fa2_bwd_tf32 as bt
    rows = []
    for name, cc, (D, Br) in bwd_tf32_instances():
        if only and only not in name:
            continue
        kern, NT = bt.make_bwd_tf32(D, Br)
        text = with_maxnreg(cuda.compile_ptx(kern.py_func, bt.SIG, cc=cc)[0], bt.maxreg(D, cc))
        rows.append({"kernel": name, "cc": f"{cc[0]}.{cc[1]}", "threads": NT, "D": D, "Br": Br,
                     "mma": text.count("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32"),
                     "atom": text.count("atom.global.add.f32") + text.count("red.global.add.f32"),
                     "dyn_smem": bt.smem_bytes(D, Br), "maxreg": bt.maxreg(D, cc), **ptxas(text, cc)})
    return rows


# ---------------------------------------------------------------- fa2_wgmma (Hopper's wgmma, sm_90a)
def wgmma_instances():
    """(name, make_fa2_wgmma arguments) of every kernel fa2_wgmma launches by default (TILES), fp16 and bf16."""
    from . import fa2_wgmma
    tiles = lambda D: sorted(set(fa2_wgmma.TILES[D]))          # noqa: E731  (causal or not)
    return [(f"fa2_wgmma {dtype} D={D} tiles={t[0]}x{t[1]}", (D, *t, dtype))
            for D in fa2_wgmma.HEAD_DIMS for t in tiles(D) for dtype in fa2_wgmma.DTYPES]


def wgmma_ptx(args, cc=None):
    """PTX text of make_fa2_wgmma(*args) for cc (default fa2_wgmma.CC, sm_90a)."""
    from numba import cuda
    from . import fa2_wgmma
    kern = fa2_wgmma.make_fa2_wgmma(*args)[0]
    return cuda.compile_ptx(kern.py_func, fa2_wgmma.SIG, cc=cc or fa2_wgmma.CC,
                            launch_bounds=fa2_wgmma.launch_bounds(args[1]))[0]


def wgmma_report(only=None):
    """Rows {kernel, cc, threads, tiles, target, wgmma, wgmma_bf16, fence, commit, wait, fence_proxy, cp_async,
    ldmatrix, shfl, dyn_smem, registers, smem, stack, spill_stores, spill_loads, advisories}."""
    from . import fa2_wgmma
    rows = []
    for name, args in wgmma_instances():
        if only and only not in name:
            continue
        text = wgmma_ptx(args)
        count = text.count
        rows.append({"kernel": name, "cc": "9.0a", "threads": 128 * args[1], "tiles": list(args[1:3]),
                     "target": re.search(r"\.target (\S+)", text).group(1),
                     "wgmma": count("wgmma.mma_async.sync.aligned"), "wgmma_bf16": count(".f32.bf16.bf16"),
                     "fence": count("wgmma.fence.sync.aligned"), "commit": count("wgmma.commit_group.sync.aligned"),
                     "wait": count("wgmma.wait_group.sync.aligned"), "fence_proxy": count("fence.proxy.async"),
                     "cp_async": count("cp.async.cg.shared.global"), "ldmatrix": count("ldmatrix.sync.aligned"),
                     "shfl": count("shfl.sync.bfly"), "dyn_smem": fa2_wgmma.smem_bytes(*args[:3]),
                     **ptxas(text, fa2_wgmma.CC)})
    return rows


REPORTS = {"core": core_report, "tc": tc_report, "tf32": tf32_report, "bwd_tf32": bwd_tf32_report,
           "wgmma": wgmma_report}


def main(argv):
    words = [a for a in argv if not a.startswith("--")]
    which = words.pop(0) if words and words[0] in REPORTS else "core"
    only = words[0] if words else None
    rows = REPORTS[which](only=only)
    if "--json" in argv or which != "core":
        print(json.dumps(rows))
        return
    print(f"{'kernel':28s} {'cc':4s} {'thr':>4s} {'regs':>4s} {'smem':>6s} {'stack':>5s} {'spill':>5s}")
    for r in rows:
        print(f"{r['kernel']:28s} {r['cc']:4s} {r['threads']:4d} {r['registers']:4d} {r['smem']:6d} "
              f"{r['stack']:5d} {r['spill_stores']:5d}")


if __name__ == "__main__":
    main(sys.argv[1:])
