"""Tensor Cores from Numba: `mma.sync`, `ldmatrix`, `cp.async` and friends as inline PTX (one instruction or one
short block each), for the kernels fa2_tc, fa2_tf32 and fa2_bwd_tf32.

Numba has no Tensor Core API, but a Numba `@intrinsic` can emit any PTX through llvmlite's `ir.InlineAsm`, as CUDA
C's `asm volatile(...)` does (flashlib/cupy_kernels/flash_common.cuh has the same instructions for the CuPy
kernels); `_asm` below is the one place that does. PTX ISA 8.x, section 9.7.14 ("Warp Level Matrix
Multiply-Accumulate Instructions"); which lane holds which element is in flashlib.numba_kernels.lanes.

  mma_m16n8k16_f16(a0..a3, b0, b1, c0..c3)    D (16x8 fp32) = A (16x16 fp16) B (16x8 fp16) + C       sm_80+
  mma_m16n8k16_bf16(...)                       the same with bfloat16 A and B                          sm_80+
  mma_m16n8k8_f16(a0, a1, b0, c0..c3)          D (16x8 fp32) = A (16x8 fp16) B (8x8 fp16) + C          sm_75+ (T4)
  mma_m16n8k8_tf32(a0..a3, b0, b1, c0..c3)     one TF32 product (~1e-3 relative)                        sm_80+
  mma_3xtf32(ab0..ab3, as0..as3, b0, b1, c..)  A B + C in float32 accuracy: three TF32 mma (fa2_tf32.py)  sm_80+
  split_tf32(x), split_tf32_again(x)           (big, small) TF32 bits of a float32; cvt_rna_tf32(x)
  ldmatrix_x4(smem, row, col) / ldmatrix_x4_trans(...)   four 8x8 16-bit matrices from shared memory  sm_75+
  cp_async16(smem, row, col, gmem, grow, gcol, nbytes)   16 bytes global -> shared, bypassing registers sm_80+
  cp_async16_f32(smem, sidx, gmem, grow, gcol, nbytes)   the same into a 1-D float32 shared array
  cp_async_commit(), cp_async_wait(N)                    close a group of copies / wait for all but N
  load16(gmem, row, col), store16(smem, row, col, x4)    16-byte vector load and store (sm_75 path)
  pack_f16x2(x, y), pack_bf16x2(x, y)          two float32 -> one 32-bit register of two 16-bit values
  exp2_approx(x)                               2**x in one ex2.approx.ftz.f32
  shared_u32_at(smem, row, col)                the 32-bit shared-state-space address of smem[row, col]
  ldmatrix_x4_at(addr), ldmatrix_x4_trans_at(addr), cp_async16_at(saddr, gaddr, nbytes), global_i64_at(...)
                                               the same on byte addresses the kernel computed (no per-call indexing)

Arrays given to the intrinsics are 2-D uint32 arrays (two 16-bit values or one float32 per word) unless said
otherwise; `col` counts 32-bit words. Rows of 16-byte accesses (ldmatrix rows, cp.async, load16/store16) must start
16-byte aligned. Every mma is warp-wide: the 32 lanes together hold A, B and C, each lane a few registers.
"""
try:
    from numba.cuda.extending import intrinsic
except ImportError:  # older numba-cuda (Colab's 0.22 has it; this keeps numba's own CUDA target working)
    from numba.core.extending import intrinsic
try:
    from numba.cuda import cgutils
except ImportError:
    from numba.core import cgutils
from llvmlite import ir
from numba import types

from .lanes import TF32_MASK


# ---------------------------------------------------------------- intrinsics (inline PTX)
_f32, _i32, _i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
F4 = types.UniTuple(types.float32, 4)
U4 = types.UniTuple(types.uint32, 4)


def _asm(builder, ret, args, text, constraints, side_effect=True):
    """Emit one inline-PTX block: `text` with $0.. for the outputs then the inputs `args`, LLVM `constraints`.
    side_effect=False lets the compiler move or drop the block like arithmetic (pure register math)."""
    fnty = ir.FunctionType(ret, [a.type for a in args])
    return builder.call(ir.InlineAsm(fnty, text, constraints, side_effect=side_effect), args)


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
def cp_async16_f32(typingctx, smem, sidx, gmem, grow, gcol, nbytes):
    """cp.async.cg.shared.global of 16 bytes: 4 float32 from gmem[grow, gcol..] (2-D) to smem[sidx..] (1-D shared
    array); nbytes < 16 zero-fills the rest (0: reads nothing). Both addresses 16-byte aligned. (cp_async16 is
    the same for 2-D uint32 arrays.)"""
    if not (isinstance(smem, types.Array) and smem.ndim == 1 and smem.dtype == types.float32 and
            isinstance(gmem, types.Array) and gmem.ndim == 2 and gmem.dtype == types.float32):
        return None

    def codegen(context, builder, sig, args):
        dst = _shared_addr(builder, _item_ptr(context, builder, sig.args[0], args[0], args[1:2], sig.args[1:2]))
        src = builder.ptrtoint(_item_ptr(context, builder, sig.args[2], args[2], args[3:5], sig.args[3:5]),
                               _i64)
        n = context.cast(builder, args[5], sig.args[5], types.uint32)
        _asm(builder, ir.VoidType(), [dst, src, n], "cp.async.cg.shared.global [$0], [$1], 16, $2;", "r,l,r,~{memory}")
        return context.get_dummy_value()
    return types.void(smem, sidx, gmem, grow, gcol, nbytes), codegen


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


# ---------------------------------------------------------------- TF32, 3xTF32 (fa2_tf32.py explains the split), sm_80+
U2 = types.UniTuple(types.uint32, 2)
MASK = f"0x{TF32_MASK:X}"                        # 0xFFFFE000: what lanes.split_model keeps
_MMA = ("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, {$10,$11,$12,$13};")
_SPLIT = (f"{{ .reg .b32 lo; and.b32 $0, $2, {MASK}; sub.f32 lo, $2, $0; add.u32 lo, lo, 0x1000; "
          f"and.b32 $1, lo, {MASK}; }}")


def _bits(context, builder, val, ty):
    """An i32 of a uint32 / int32 or of a float32's bits."""
    if ty == types.float32:
        return builder.bitcast(val, _i32)
    return context.cast(builder, val, ty, types.uint32)


def _mma(context, builder, a, b, c):
    r = _asm(builder, ir.LiteralStructType([_f32] * 4), list(a) + list(b) + list(c), _MMA,
             "=f,=f,=f,=f," + ",".join(["r"] * 6 + ["f"] * 4), side_effect=False)
    return [builder.extract_value(r, i) for i in range(4)]


@intrinsic
def mma_m16n8k8_tf32(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
    """(d0..d3) = A B + C for one 16x8x8 tile: A in a0..a3 (a_index), B in b0, b1 (b_index), TF32 bits in
    uint32; C, D float32 (c_index). One TF32 product: ~1e-3 relative. sm_80+."""
    def codegen(context, builder, sig, args):
        u = [context.cast(builder, v, t, types.uint32) for v, t in zip(args[:6], sig.args[:6])]
        f = [context.cast(builder, v, t, types.float32) for v, t in zip(args[6:], sig.args[6:])]
        return context.make_tuple(builder, sig.return_type, _mma(context, builder, u[:4], u[4:], f))
    return F4(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3), codegen


_SPLIT_B = "".join(f"and.b32 bb{i}, ${12 + i}, {MASK}; sub.f32 bs{i}, ${12 + i}, bb{i}; add.u32 bs{i}, bs{i}, 0x1000; "
                   f"and.b32 bs{i}, bs{i}, {MASK}; " for i in range(2))
_MMA3 = ("{ .reg .b32 bb0, bb1, bs0, bs1; " + _SPLIT_B +
         _MMA.replace("{$4,$5,$6,$7}, {$8,$9}, {$10,$11,$12,$13}", "{$8,$9,$10,$11}, {bb0,bb1}, {$14,$15,$16,$17}") +
         _MMA.replace("{$8,$9}, {$10,$11,$12,$13}", "{bs0,bs1}, {$0,$1,$2,$3}") +
         _MMA.replace("{$8,$9}, {$10,$11,$12,$13}", "{bb0,bb1}, {$0,$1,$2,$3}") + " }")


@intrinsic
def mma_3xtf32(typingctx, ab0, ab1, ab2, ab3, as0, as1, as2, as3, b0, b1, c0, c1, c2, c3):
    """(d0..d3) = A B + C in float32 accuracy: A given split (big ab0..ab3, small as0..as3: split_tf32), B as the
    raw float32 bits b0, b1 (split here, as split_tf32). Three mma, the small products first (small*big,
    big*small, then big*big, as CUTLASS orders them). One inline-PTX block: B's split and the three mma are a
    single call for the compiler, which keeps the kernel's loops small enough to be unrolled in full. sm_80+."""
    def codegen(context, builder, sig, args):
        u = [_bits(context, builder, v, t) for v, t in zip(args[:10], sig.args[:10])]
        c = [context.cast(builder, v, t, types.float32) for v, t in zip(args[10:], sig.args[10:])]
        r = _asm(builder, ir.LiteralStructType([_f32] * 4), u + c, _MMA3,
                 "=f,=f,=f,=f," + ",".join(["r"] * 10 + ["f"] * 4), side_effect=False)
        return context.make_tuple(builder, sig.return_type, [builder.extract_value(r, i) for i in range(4)])
    return F4(ab0, ab1, ab2, ab3, as0, as1, as2, as3, b0, b1, c0, c1, c2, c3), codegen


def _make_split(volatile):
    def split(typingctx, x):
        if x not in (types.float32, types.uint32):
            return None

        def codegen(context, builder, sig, args):
            r = _asm(builder, ir.LiteralStructType([_i32] * 2), [_bits(context, builder, args[0], sig.args[0])],
                     _SPLIT, "=r,=r,r", side_effect=volatile)
            return context.make_tuple(builder, sig.return_type, [builder.extract_value(r, i) for i in range(2)])
        return U2(x), codegen
    split.__doc__ = ("(big, small) TF32 bits (uint32) of a float32 x, or of float32 bits given as uint32 (see the "
                     "header)." + (" Volatile: the compiler may not hoist it out of a loop (Q's split is redone "
                                   "every tile on purpose, to keep D/2 registers free)." if volatile else ""))
    return intrinsic(split)


split_tf32 = _make_split(False)
split_tf32_again = _make_split(True)


@intrinsic
def cvt_rna_tf32(typingctx, x):
    """cvt.rna.tf32.f32: float32 -> nearest TF32 (ties away), as uint32 bits (~3 SASS instructions on sm_90)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return _asm(builder, _i32, [args[0]], "cvt.rna.tf32.f32 $0, $1;", "=r,f", side_effect=False)
    return types.uint32(x), codegen
