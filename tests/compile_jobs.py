"""nvcc / ptxas compile checks without a GPU: batches of kernel instances, one nvcc run a batch, started beside the
other tests by tests/conftest.py's job pool (`jobs.results`), and `ptxas -v` read per kernel."""
import os
import re
import shutil
import subprocess
import tempfile

import pytest

from flashlib import cupy_kernels as ck
from tests import jobs

NVCC = shutil.which("nvcc")
CXXFILT = shutil.which("c++filt")   # binutils, beside the host compiler nvcc needs: kernel symbols to instance names
BATCH = 4                           # instances a nvcc run: the header is parsed once for them


def parse_ptxas(log):
    """{mangled kernel name: (registers, spill bytes)} from `ptxas -v` output; a stack frame counts as spill too
    (a register array indexed at run time lives there: local memory all the same)."""
    res, cur = {}, None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            cur = m.group(1)
            res[cur] = [None, 0]
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            res[cur][1] = int(m.group(1)) + int(m.group(2)) + int(m.group(3))
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            cur = m.group(1)
            res.setdefault(cur, [None, 0])
        m = re.search(r"Used (\d+) registers", line)
        if m and cur:
            res[cur][0] = int(m.group(1))
    return res


def nvcc(arch, file, names, flags=()):
    """(return code, nvcc + ptxas -v log) of compiling the instances `names` of `file` for `arch` to a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "instances.cu")
        with open(src, "w") as fh:  # taking each instance's address instantiates it, as NVRTC's name expressions do
            fh.write(f'#include "{file}"\nvoid* flashlib_instances[] = {{\n' +
                     ",\n".join(f"  (void*)&{n}" for n in names) + "\n};\n")
        cmd = [NVCC, "-std=c++17", f"-arch={arch}", *flags, "-cubin", f"-I{ck.HERE}", "-Xptxas", "-v",
               "-o", src + ".cubin", src]
        out = jobs.run(cmd)
    return out.returncode, out.stdout + out.stderr


def _args(name):
    """('fa3_forward', ('__half', '64', ...)) of an instance 'fa3_forward<__half, 64, ...>'."""
    base, _, args = name.partition("<")
    return base.strip(), tuple(a.strip() for a in args.rstrip(">").split(","))


def _covers(name, kernel):
    """True where the demangled `kernel` is the instance `name`: the same template, name's arguments first (the
    demangled name spells the defaulted ones too)."""
    (b, a), (kb, ka) = _args(name), _args(kernel)
    return b == kb and ka[:len(a)] == a


def batches(names, size=BATCH):
    """`names` in groups of at most `size`, no instance a prefix of another in its group (each kernel then names one
    instance), in order."""
    out = []
    for n in names:
        group = next((g for g in out if len(g) < size and not any(_covers(n, m) or _covers(m, n) for m in g)), None)
        if group is None:
            out.append(group := [])
        group.append(n)
    return out


def demangle(symbols):
    """{mangled symbol: demangled name without 'void ' and the parameter list}."""
    out = subprocess.run([CXXFILT], input="\n".join(symbols), capture_output=True, text=True, check=True).stdout
    return {s: re.sub(r"^void ", "", d.strip()).split("(")[0] for s, d in zip(symbols, out.splitlines())}


def sm90a_jobs(file, names):
    """Job specs for the pool: the instances `names` of `file` in batches, compiled for sm_90a (none without nvcc)."""
    if NVCC is None or CXXFILT is None:
        return []
    return [(("sm_90a", file, *g), lambda g=g: nvcc("sm_90a", file, g, ("-ftz=true",)), 1.5 * len(g))
            for g in batches(names)]


def check_sm90a(specs):
    """Fail on any nvcc error, ptxas warning (e.g. a serialised wgmma) or wgmma note (C75xx), spill or stack frame of
    the instances of the `sm90a_jobs` specs, or a register count over 168: the launch bound (1 block of 384 or 512
    threads) caps what ptxas reports at 168 or 128; the consumers take 240 or 160 with setmaxnreg.inc, which ptxas
    allocates for. Prints a line of registers and spill bytes per instance. Rungs 7, 'bwd_wgmma' and 'fa3_fp8' are checked by it."""
    if not specs:
        pytest.skip("nvcc or c++filt is not on PATH")
    failures, lines = [], []
    for (key, _, _), (rc, log) in zip(specs, jobs.results(specs)):
        _, file, *names = key
        if rc != 0:
            failures.append(f"{file}: nvcc failed for {names}\n{log[-3000:]}")
            continue
        info = parse_ptxas(log)
        kernels = demangle(list(info))
        for line in log.splitlines():
            # (C75xx: ptxas' notes on wgmma, e.g. C7519, a warpgroup.arrive it had to inject: a wgmma_fence missing)
            if "warning" in line.lower() or "performance loss" in line.lower() or "(C75" in line:
                named = [kernels[s] for s in kernels if s in line] or names
                failures.append(f"{file}: ptxas warned for {named}\n{line}")
        for name in names:
            hits = [s for s, k in kernels.items() if _covers(name, k)]
            if len(hits) != 1:
                failures.append(f"{file}: {name}: {len(hits)} kernels in ptxas' report {sorted(kernels.values())}")
                continue
            regs, spill = info[hits[0]]
            if spill:
                failures.append(f"{file}: {name}: {spill} bytes of stack frame / spills ({regs} registers)")
            if regs is None or regs > 168:
                failures.append(f"{file}: {name}: {regs} registers, over the launch bound's 168")
            lines.append(f"{regs or 0:4d} regs {spill:4d} B  {file}: {name}")
    print("\n".join(lines))
    assert not failures, "\n".join(failures)
