"""Tensor Cores from Numba: `mma.sync` and `ldmatrix` as inline PTX, and their register-fragment layouts.

Numba has no Tensor Core API, but a Numba `@intrinsic` can emit any PTX instruction through llvmlite's
`ir.InlineAsm`, exactly as CUDA C's `asm volatile(...)` does (see flashlib/cupy_kernels/flash_common.cuh, the same
instructions for the CuPy kernels). The intrinsics here, each one instruction (PTX ISA 8.x, section 9.7.14,
"Warp Level Matrix Multiply-Accumulate Instructions"):

  mma_m16n8k16_f16(a0..a3, b0, b1, c0..c3)    D (16x8 fp32) = A (16x16 fp16) B (16x8 fp16) + C       sm_80+
  mma_m16n8k16_bf16(...)                       the same with bfloat16 A and B                          sm_80+
  mma_m16n8k8_f16(a0, a1, b0, c0..c3)          D (16x8 fp32) = A (16x8 fp16) B (8x8 fp16) + C          sm_75+ (T4)
  ldmatrix_x4(smem, row, col) / ldmatrix_x4_trans(...)   four 8x8 16-bit matrices from shared memory  sm_75+
  cp_async16(smem, row, col, gmem, grow, gcol, nbytes)   16 bytes global -> shared, bypassing registers sm_80+
  cp_async_commit(), cp_async_wait(N)                    close a group of copies / wait for all but N
  load16(gmem, row, col), store16(smem, row, col, x4)    16-byte vector load and store (sm_75 path)
  pack_f16x2(x, y), pack_bf16x2(x, y)          two float32 -> one 32-bit register of two 16-bit values
  exp2_approx(x)                               2**x in one ex2.approx.ftz.f32
  shared_u32_at(smem, row, col)                the 32-bit shared-state-space address of smem[row, col]
  ldmatrix_x4_at(addr), ldmatrix_x4_trans_at(addr), cp_async16_at(saddr, gaddr, nbytes), global_i64_at(...)
                                               the same on byte addresses the kernel computed (no per-call indexing)

Every mma is a *warp-wide* instruction: the 32 lanes together hold A, B and C, each lane a few registers. Which lane
holds which element is fixed by the ISA ("Matrix fragments for mma.m16n8k16 / m16n8k8"); the pure-Python functions
`a_index`, `b_index`, `c_index` and `ldmatrix_index` below write those layouts down once, element by element, so
that a figure can be drawn from them; `fragments`, `mma_model` and `ldmatrix_model` are a NumPy model of a warp
built on them, with which tests/test_numba_tc.py checks the kernel's bookkeeping on a machine without a GPU. A, B and C/D fragments hold 16-bit elements packed two to a 32-bit
register: element i of a lane sits in register i // 2, the lower half when i is even.

Arrays given to the intrinsics are 2-D uint32 arrays (two 16-bit values per word), `col` counts 32-bit words.
Rows of 16-byte accesses (ldmatrix rows, cp.async, load16/store16) must start 16-byte aligned.
"""
try:
    from numba.cuda.extending import intrinsic
except ImportError:  # older numba-cuda (Colab's 0.22 has it; this keeps numba's own CUDA target working)
    from numba.core.extending import intrinsic
try:
    from numba.cuda import cgutils
except ImportError:
    from numba.core import cgutils
import numpy as np
from llvmlite import ir
from numba import types

SHAPES = ("m16n8k16", "m16n8k8")


# ---------------------------------------------------------------- fragment layouts (pure Python)
def _gt(lane):
    if not 0 <= lane < 32:
        raise ValueError(f"lane must be 0..31, got {lane}")
    return lane >> 2, lane & 3          # groupID, threadID_in_group


def a_index(lane, i, shape="m16n8k16"):
    """(row, col) of A that element i of `lane`'s A fragment holds. A is 16 x K, row-major ("row").

    m16n8k16: i in 0..7 (4 registers): rows g (i = 0, 1, 4, 5) or g + 8 (i = 2, 3, 6, 7), cols 2t + i%2, + 8 for i >= 4.
    m16n8k8:  i in 0..3 (2 registers): rows g (i = 0, 1) or g + 8 (i = 2, 3), cols 2t + i%2.
    """
    g, t = _gt(lane)
    n = 8 if shape == "m16n8k16" else 4 if shape == "m16n8k8" else None
    if n is None or not 0 <= i < n:
        raise ValueError(f"bad shape {shape!r} or element {i}")
    return g + 8 * ((i >> 1) & 1), 2 * t + (i & 1) + 8 * (i >> 2)


def b_index(lane, i, shape="m16n8k16"):
    """(row k, col n) of B that element i of `lane`'s B fragment holds. B is K x 8, column-major ("col").

    m16n8k16: i in 0..3 (2 registers): k = 2t + i%2, + 8 for i >= 2; n = g.   m16n8k8: i in 0..1: k = 2t + i, n = g.
    """
    g, t = _gt(lane)
    n = 4 if shape == "m16n8k16" else 2 if shape == "m16n8k8" else None
    if n is None or not 0 <= i < n:
        raise ValueError(f"bad shape {shape!r} or element {i}")
    return 2 * t + (i & 1) + 8 * (i >> 1), g


def c_index(lane, i):
    """(row, col) of the 16 x 8 fp32 C/D that register i (0..3) of `lane` holds (both shapes):
    rows g (i = 0, 1) or g + 8 (i = 2, 3), cols 2t + i%2."""
    g, t = _gt(lane)
    if not 0 <= i < 4:
        raise ValueError(f"C has 4 registers per lane, got {i}")
    return g + 8 * (i >> 1), 2 * t + (i & 1)


def ldmatrix_index(lane, i, trans=False):
    """ldmatrix.x4: (matrix j, row, col) of the 8x8 16-bit matrix element that element i (0..7) of `lane` receives;
    register j = i // 2 holds matrix j. Matrix j's row r is read from the address that lane 8j + r supplies.
    Without .trans lane gets row lane//4, cols 2(lane%4) + i%2; with .trans the transpose (row <-> col)."""
    g, t = _gt(lane)
    if not 0 <= i < 8:
        raise ValueError(f"ldmatrix.x4 gives 8 elements per lane, got {i}")
    r, c = g, 2 * t + (i & 1)
    return (i >> 1, c, r) if trans else (i >> 1, r, c)


def a_from_c(i):
    """P as an A operand: element i (0..7) of the m16n8k16 A fragment of keys 16kk..16kk+15 is element c of the
    C fragment of key n-tile 2kk + u; returns (u, c). (a0a1 = c0c1 of tile 2kk, a2a3 = c2c3, a4a5 = c0c1 of
    tile 2kk+1, a6a7 = c2c3 of 2kk+1.) The same lane holds both: no data moves between lanes."""
    return i >> 2, i & 3


# ---------------------------------------------------------------- a NumPy model of one warp (no GPU needed)
def to_bits(x, dtype="float16"):
    """float array -> uint16 bits of float16 or bfloat16 (round to nearest even, as cvt.rn)."""
    x = np.asarray(x, np.float32)
    if dtype == "float16":
        return x.astype(np.float16).view(np.uint16)
    b = x.view(np.uint32).astype(np.uint64)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)   # (finite inputs)


def from_bits(b, dtype="float16"):
    b = np.asarray(b, np.uint16)
    if dtype == "float16":
        return b.view(np.float16).astype(np.float32)
    return (b.astype(np.uint32) << 16).view(np.float32)


def _elements(regs):
    """(32, R) uint32 registers -> (32, 2R) uint16 elements, element 2r in the lower half of register r."""
    regs = np.asarray(regs, np.uint32)
    return np.stack([regs & 0xFFFF, regs >> 16], axis=-1).reshape(32, -1).astype(np.uint16)


def _words(elements):
    e = np.asarray(elements, np.uint32).reshape(32, -1, 2)
    return (e[..., 0] | (e[..., 1] << 16)).astype(np.uint32)


def fragments(M, operand, shape="m16n8k16", dtype="float16"):
    """Distribute matrix M (A: 16 x K, B: K x 8) over the 32 lanes: (32, registers) uint32, by a_index / b_index."""
    index = a_index if operand == "a" else b_index
    n = {"a": 8, "b": 4}[operand] // (1 if shape == "m16n8k16" else 2)
    bits = to_bits(M, dtype)
    return _words([[bits[index(lane, i, shape)] for i in range(n)] for lane in range(32)])


def c_fragments(C):
    """16 x 8 float32 -> (32, 4) per c_index."""
    return np.array([[C[c_index(lane, i)] for i in range(4)] for lane in range(32)], np.float32)


def gather_c(regs):
    """(32, 4) C/D registers -> the 16 x 8 matrix, per c_index."""
    C = np.full((16, 8), np.nan, np.float32)
    for lane in range(32):
        for i in range(4):
            C[c_index(lane, i)] = regs[lane][i]
    return C


def mma_model(a_regs, b_regs, c_regs, shape="m16n8k16", dtype="float16"):
    """What one mma.sync does, lane by lane: the warp's A and B are assembled from every lane's registers (each
    element must be held exactly once), and each lane's D register i is the dot product of the A row and B column
    that c_index(lane, i) names, plus C (accumulated exactly here; the hardware accumulates in fp32)."""
    K = 16 if shape == "m16n8k16" else 8
    A, B = np.full((16, K), np.nan), np.full((K, 8), np.nan)
    for M, regs, index in ((A, a_regs, a_index), (B, b_regs, b_index)):
        vals = from_bits(_elements(regs), dtype)
        for lane in range(32):
            for i, x in enumerate(vals[lane]):
                rc = index(lane, i, shape)
                assert np.isnan(M[rc]), f"element {rc} is held twice"
                M[rc] = x
    assert not np.isnan(A).any() and not np.isnan(B).any(), "an element of A or B is held by no lane"
    D = np.empty((32, 4), np.float32)
    for lane in range(32):
        for i in range(4):
            r, c = c_index(lane, i)
            D[lane, i] = A[r] @ B[:, c] + c_regs[lane][i]
    return D


def ldmatrix_model(smem, addrs, trans=False):
    """ldmatrix.x4 on a 2-D uint16 array smem: addrs[lane] = (row, col) where lane 8j + r's 8 contiguous elements
    are row r of matrix j. Returns (32, 4) uint32 registers, per ldmatrix_index."""
    smem = np.asarray(smem, np.uint16)
    out = np.zeros((32, 8), np.uint16)
    for lane in range(32):
        for i in range(8):
            j, r, c = ldmatrix_index(lane, i, trans)
            row, col = addrs[8 * j + r]
            out[lane, i] = smem[row, col + c]
    return _words(out)


# ---------------------------------------------------------------- intrinsics (inline PTX)
_f32, _i32, _i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
F4 = types.UniTuple(types.float32, 4)
U4 = types.UniTuple(types.uint32, 4)


def _asm(builder, ret, args, text, constraints):
    fnty = ir.FunctionType(ret, [a.type for a in args])
    return builder.call(ir.InlineAsm(fnty, text, constraints, side_effect=True), args)


def _tuple(context, builder, ty, r, n):
    return context.make_tuple(builder, ty, [builder.extract_value(r, i) for i in range(n)])


def _mma_codegen(ptx, na, nb):
    """Lowering of one mma.sync: na A registers, nb B registers (uint32) and 4 C floats in, 4 D floats out."""
    regs = lambda k, m: ",".join(f"${k + i}" for i in range(m))
    text = f"{ptx} {{{regs(0, 4)}}}, {{{regs(4, na)}}}, {{{regs(4 + na, nb)}}}, {{{regs(4 + na + nb, 4)}}};"
    cons = "=f,=f,=f,=f," + ",".join(["r"] * (na + nb) + ["f"] * 4)

    def codegen(context, builder, sig, args):
        args = [context.cast(builder, v, t, w) for v, t, w in
                zip(args, sig.args, [types.uint32] * (na + nb) + [types.float32] * 4)]
        r = _asm(builder, ir.LiteralStructType([_f32] * 4), args, text, cons)
        return _tuple(context, builder, sig.return_type, r, 4)
    return codegen


_K16_F16 = _mma_codegen("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32", 4, 2)
_K16_BF16 = _mma_codegen("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32", 4, 2)
_K8_F16 = _mma_codegen("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32", 2, 1)


@intrinsic
def mma_m16n8k16_f16(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
    """(d0, d1, d2, d3) = A B + C for one 16x8x16 tile: A in a0..a3 (a_index), B in b0, b1 (b_index), C and D
    in c_index layout. fp16 A and B, fp32 C and D. sm_80+."""
    return F4(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3), _K16_F16


@intrinsic
def mma_m16n8k16_bf16(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
    """As mma_m16n8k16_f16 with bfloat16 A and B. sm_80+."""
    return F4(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3), _K16_BF16


@intrinsic
def mma_m16n8k8_f16(typingctx, a0, a1, b0, c0, c1, c2, c3):
    """(d0, d1, d2, d3) = A B + C for one 16x8x8 tile (the Turing / T4 shape): A in a0, a1, B in b0. sm_75+."""
    return F4(a0, a1, b0, c0, c1, c2, c3), _K8_F16


def _item_ptr(context, builder, aryty, ary, idx, idxty):
    arr = context.make_array(aryty)(context, builder, value=ary)
    inds = [context.cast(builder, v, t, types.intp) for v, t in zip(idx, idxty)]
    return cgutils.get_item_pointer(context, builder, aryty, arr, inds, wraparound=False)


def _shared_addr(builder, ptr):
    """The 32-bit .shared address of a generic pointer into shared memory (what ldmatrix and cp.async take)."""
    sp = builder.addrspacecast(builder.bitcast(ptr, ir.IntType(8).as_pointer()), ir.IntType(8).as_pointer(3))
    return builder.ptrtoint(sp, _i32)


def _is_u32_2d(a):
    return isinstance(a, types.Array) and a.ndim == 2 and a.dtype == types.uint32


@intrinsic
def shared_u32_at(typingctx, smem, row, col):
    """The .shared-space address (uint32) of smem[row, col]."""
    if not _is_u32_2d(smem):
        return None

    def codegen(context, builder, sig, args):
        return _shared_addr(builder, _item_ptr(context, builder, sig.args[0], args[0], args[1:], sig.args[1:]))
    return types.uint32(smem, row, col), codegen


def _make_ldmatrix(trans):
    text = f"ldmatrix.sync.aligned.m8n8.x4{'.trans' if trans else ''}.shared.b16 {{$0,$1,$2,$3}}, [$4];"

    def ldm(typingctx, smem, row, col):
        if not _is_u32_2d(smem):
            return None

        def codegen(context, builder, sig, args):
            addr = _shared_addr(builder, _item_ptr(context, builder, sig.args[0], args[0], args[1:], sig.args[1:]))
            r = _asm(builder, ir.LiteralStructType([_i32] * 4), [addr], text, "=r,=r,=r,=r,r")
            return _tuple(context, builder, sig.return_type, r, 4)
        return U4(smem, row, col), codegen
    return intrinsic(ldm)


ldmatrix_x4 = _make_ldmatrix(False)          # this lane supplies the address of row (lane % 8) of matrix lane // 8
ldmatrix_x4_trans = _make_ldmatrix(True)


# The same instructions on addresses computed by the kernel. A kernel that indexes smem[row, col] for every
# fragment pays a 64-bit address computation per ldmatrix (Numba's array indexing); computing each lane's 32-bit
# .shared address once (shared_u32_at) and adding compile-time byte offsets costs nothing per fragment: ptxas folds
# the constant into the instruction (LDSM [R + imm]).
def _make_ldmatrix_at(trans):
    text = f"ldmatrix.sync.aligned.m8n8.x4{'.trans' if trans else ''}.shared.b16 {{$0,$1,$2,$3}}, [$4];"

    def ldm(typingctx, addr):
        if not isinstance(addr, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            a = context.cast(builder, args[0], sig.args[0], types.uint32)
            r = _asm(builder, ir.LiteralStructType([_i32] * 4), [a], text, "=r,=r,=r,=r,r")
            return _tuple(context, builder, sig.return_type, r, 4)
        return U4(addr), codegen
    return intrinsic(ldm)


ldmatrix_x4_at = _make_ldmatrix_at(False)    # addr: the .shared byte address this lane supplies (an integer)
ldmatrix_x4_trans_at = _make_ldmatrix_at(True)


@intrinsic
def global_i64_at(typingctx, gmem, row, col):
    """The (generic = global) byte address of gmem[row, col], as an int64 (int64 so that adding Python ints stays
    integer in Numba: uint64 + int64 would be float64)."""
    if not _is_u32_2d(gmem):
        return None

    def codegen(context, builder, sig, args):
        return builder.ptrtoint(_item_ptr(context, builder, sig.args[0], args[0], args[1:], sig.args[1:]), _i64)
    return types.int64(gmem, row, col), codegen


@intrinsic
def cp_async16_at(typingctx, saddr, gaddr, nbytes):
    """cp.async.cg.shared.global of 16 bytes from global byte address gaddr to .shared byte address saddr (both
    integers, 16-byte aligned); nbytes < 16 zero-fills the rest (0: reads nothing)."""
    if not all(isinstance(a, types.Integer) for a in (saddr, gaddr, nbytes)):
        return None

    def codegen(context, builder, sig, args):
        s, g, n = (context.cast(builder, v, t, w) for v, t, w in
                   zip(args, sig.args, (types.uint32, types.int64, types.uint32)))
        _asm(builder, ir.VoidType(), [s, g, n], "cp.async.cg.shared.global [$0], [$1], 16, $2;", "r,l,r,~{memory}")
        return context.get_dummy_value()
    return types.void(saddr, gaddr, nbytes), codegen


@intrinsic
def cp_async16(typingctx, smem, row, col, gmem, grow, gcol, nbytes):
    """cp.async.cg.shared.global: 16 bytes from gmem[grow, gcol..] to smem[row, col..]; nbytes < 16 zero-fills
    the rest (nbytes = 0: writes 16 zero bytes, reads nothing)."""
    if not (_is_u32_2d(smem) and _is_u32_2d(gmem)):
        return None

    def codegen(context, builder, sig, args):
        dst = _shared_addr(builder, _item_ptr(context, builder, sig.args[0], args[0], args[1:3], sig.args[1:3]))
        src = builder.ptrtoint(_item_ptr(context, builder, sig.args[3], args[3], args[4:6], sig.args[4:6]), _i64)
        n = context.cast(builder, args[6], sig.args[6], types.uint32)
        _asm(builder, ir.VoidType(), [dst, src, n], "cp.async.cg.shared.global [$0], [$1], 16, $2;", "r,l,r,~{memory}")
        return context.get_dummy_value()
    return types.void(smem, row, col, gmem, grow, gcol, nbytes), codegen


@intrinsic
def cp_async_commit(typingctx):
    def codegen(context, builder, sig, args):
        _asm(builder, ir.VoidType(), [], "cp.async.commit_group;", "~{memory}")
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def cp_async_wait(typingctx, n):
    """cp.async.wait_group n: wait until at most n committed groups are still in flight (n: a literal int)."""
    if not isinstance(n, types.IntegerLiteral):
        return None
    N = n.literal_value

    def codegen(context, builder, sig, args):
        _asm(builder, ir.VoidType(), [], f"cp.async.wait_group {N};", "~{memory}")
        return context.get_dummy_value()
    return types.void(n), codegen


@intrinsic
def load16(typingctx, gmem, row, col):
    """Four uint32 (16 bytes) from gmem[row, col..col+3] in one vector load."""
    if not _is_u32_2d(gmem):
        return None

    def codegen(context, builder, sig, args):
        p = _item_ptr(context, builder, sig.args[0], args[0], args[1:], sig.args[1:])
        v = builder.load(builder.bitcast(p, ir.VectorType(_i32, 4).as_pointer()), align=16)
        return context.make_tuple(builder, sig.return_type, [builder.extract_element(v, _i32(i)) for i in range(4)])
    return U4(gmem, row, col), codegen


@intrinsic
def store16(typingctx, smem, row, col, x):
    """Store four uint32 (a UniTuple) to smem[row, col..col+3] in one vector store."""
    if not (_is_u32_2d(smem) and x == U4):
        return None

    def codegen(context, builder, sig, args):
        p = _item_ptr(context, builder, sig.args[0], args[0], args[1:3], sig.args[1:3])
        v = ir.Constant(ir.VectorType(_i32, 4), None)
        for i in range(4):
            v = builder.insert_element(v, builder.extract_value(args[3], i), _i32(i))
        builder.store(v, builder.bitcast(p, ir.VectorType(_i32, 4).as_pointer()), align=16)
        return context.get_dummy_value()
    return types.void(smem, row, col, x), codegen


def _make_pack(kind):
    text = (f"{{ .reg .b16 lo, hi; cvt.rn.{kind}.f32 lo, $1; cvt.rn.{kind}.f32 hi, $2; mov.b32 $0, {{lo, hi}}; }}")

    def pack(typingctx, x, y):
        def codegen(context, builder, sig, args):
            a, b = (context.cast(builder, v, t, types.float32) for v, t in zip(args, sig.args))
            return _asm(builder, _i32, [a, b], text, "=r,f,f")
        return types.uint32(x, y), codegen
    return intrinsic(pack)


pack_f16x2 = _make_pack("f16")     # x -> lower 16 bits, y -> upper (round to nearest even); sm_75+
pack_bf16x2 = _make_pack("bf16")   # cvt.rn.bf16.f32 needs sm_80+


@intrinsic
def exp2_approx(typingctx, x):
    """2**x with one `ex2.approx.ftz.f32` (the MUFU unit); exp2(-inf) = 0. Used with scale * log2(e) folded in."""
    def codegen(context, builder, sig, args):
        return _asm(builder, _f32, [context.cast(builder, args[0], sig.args[0], types.float32)],
                    "ex2.approx.ftz.f32 $0, $1;", "=f,f")
    return types.float32(x), codegen
