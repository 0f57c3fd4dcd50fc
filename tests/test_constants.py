"""flashlib.constants is the one home of the shared numbers; the CUDA side's copies (flash_common.cuh) must agree."""
import math
import re

from flashlib import constants as C
from flashlib.cupy_kernels import HERE


def test_values():
    assert C.LOG2E == 1 / math.log(2) and C.LN2 == math.log(2) and C.NEG_INF == -math.inf
    assert C.default_scale(64) == 0.125 and C.smem_optin_bytes(90) == 227 * 1024
    assert C.smem_optin_bytes(91) == 99 * 1024 and C.smem_optin_bytes(70) == C.STATIC_SMEM_BYTES
    assert C.attention_flops(2, 3, 100, 64) == 4 * 2 * 3 * 100 * 100 * 64
    assert C.attention_flops(2, 3, 100, 64, causal=True, backward=True) == 3.5 * 4 * 2 * 3 * 100 * 100 * 64 / 2
    assert C.attention_flops(1, 1, 10, 8, Nk=30) == 4 * 10 * 30 * 8


def test_cuda_header_agrees():
    src = (HERE / "flash_common.cuh").read_text()
    for name in ("LOG2E", "LN2"):
        m = re.search(rf"constexpr float {name} = ([0-9.]+)f;", src)
        assert m and float(m.group(1)) == getattr(C, name), name
    assert "#define NEG_INF __int_as_float(0xff800000)" in src            # the bits of -inf in float32
    import struct
    assert struct.unpack("<f", struct.pack("<I", 0xff800000))[0] == C.NEG_INF


def test_no_kernel_writes_the_constants_again():
    for f in HERE.glob("*.cu"):
        text = f.read_text()
        assert "1.4426950408889634" not in text and "0.6931471805599453" not in text, f.name
