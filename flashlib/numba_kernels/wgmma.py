"""Hopper's warpgroup MMA from Numba: `wgmma.mma_async` and its fences as inline PTX, for fa2_wgmma.py (sm_90a only).

The same instructions as the CuPy kernels' flashlib/cupy_kernels/wgmma.cuh, emitted through mma.py's `_asm` (one
inline-PTX block each). PTX ISA 8.x, section 9.7.15 ("Asynchronous Warpgroup Level Matrix Multiply-Accumulate
Instructions"): one wgmma multiplies a 64 x 16 A by a 16 x N B for a warpgroup (4 consecutive warps, 128 threads),
A from registers ("rs") or shared memory ("ss"), B always from shared memory through a 64-bit matrix descriptor; it
runs asynchronously: fence before, commit the group, wait for it before reading the accumulators.

  fence()                       wgmma.fence.sync.aligned: order earlier register / shared writes before the wgmma
  commit()                      wgmma.commit_group.sync.aligned: close the group of wgmma issued so far
  wait(N)                       wgmma.wait_group.sync.aligned N: wait until at most N groups are in flight (literal N)
  fence_proxy_async()           fence.proxy.async.shared::cta: shared memory written by threads (or cp.async), the
                                generic proxy, made visible to wgmma's reads (the async proxy); then a barrier
  pin(a, n)                     an empty volatile asm on a[0..n) (local float32 / uint32 array): fixes where the
                                compiler materialises registers a wgmma reads or writes (wgmma.cuh's fence_regs)
  desc_sw128(addr, lbo, sbo)    the shared-memory matrix descriptor (int64) of a tile in the 128-byte swizzle
  shared_base(a)                the .shared address (uint32) of a shared array's first element
  sw128(r, c, R)                the byte offset of element (r, c) of an R-row tile in that swizzle (a device function)
  mma_rs(N, dtype)              the intrinsic acc <- A B (+ acc): m64nNk16, A = 4 uint32 registers (a 16-bit pair
                                each), B by descriptor; (acc, a0, a1, a2, a3, desc, scale_d, trans_b)
  mma_ss(N, dtype)              the same with A by descriptor too; (acc, desc_a, desc_b, scale_d, trans_b)
  make_probe(N, dtype, form, trans_b)   a one-warpgroup kernel out = A B (tests: the intrinsics alone)
                                N = 64 or 128, dtype 'float16' or 'bfloat16', fp32 accumulators

The accumulator `acc` is a local float32 array of N/2 elements (m64nN: N/2 registers a thread), read and written in
place: the kernels index it with compile-time constants, so LLVM keeps it in registers (no local memory). Its
layout (PTX ISA, "Register Fragments and Shared Memory Matrix Layouts", wgmma D): warp w of the warpgroup holds rows
16w..16w+15; within a warp it is mma.m16n8k16's C layout (flashlib.numba_kernels.lanes.c_index) repeated over the
N/8 column chunks: acc[4n + i] is C register i of columns 8n..8n+7. scale_d (0 or 1, a literal or an integer):
0 computes D = A B, ignoring acc's old value. trans_b (a literal 0 or 1): 0 reads B "K-major" (the k index
contiguous: K for S = Q K^T), 1 "MN-major" (V for O += P V); 16-bit types only.

Every function here needs the target sm_90a (the "a": architecture-specific features, PTX ISA section 5 / "Target
ISA notes"). A numba-cuda with architecture-specific targets (NVIDIA/numba-cuda PR #549; 0.30.4 here) compiles
cuda.jit kernels for it on an sm_90 device by itself, and compile_ptx takes cc=(9, 0, "a") (fa2_wgmma.CC).
"""
try:
    from numba.cuda.extending import intrinsic
except ImportError:  # older numba-cuda
    from numba.core.extending import intrinsic
import functools

from llvmlite import ir
from numba import cuda, float32, types, uint32

from ..cupy_kernels.config_hopper import sw128 as _sw128
from .mma import _asm, _f32, _i32, _i64, _item_ptr, _shared_addr, ldmatrix_x4_at

_WG = ".sync.aligned"


def _void_asm(text):
    """An intrinsic without arguments that emits `text` (a memory clobber: the compiler moves no memory access
    across it)."""
    def stmt(typingctx):
        def codegen(context, builder, sig, args):
            _asm(builder, ir.VoidType(), [], text, "~{memory}")
            return context.get_dummy_value()
        return types.void(), codegen
    return intrinsic(stmt)


fence = _void_asm(f"wgmma.fence{_WG};")
commit = _void_asm(f"wgmma.commit_group{_WG};")
fence_proxy_async = _void_asm("fence.proxy.async.shared::cta;")


@intrinsic
def wait(typingctx, n):
    """wgmma.wait_group n (n: a literal int): at most n committed groups still in flight."""
    if not isinstance(n, types.IntegerLiteral):
        return None
    N = n.literal_value

    def codegen(context, builder, sig, args):
        _asm(builder, ir.VoidType(), [], f"wgmma.wait_group{_WG} {N};", "~{memory}")
        return context.get_dummy_value()
    return types.void(n), codegen


def _local_ptrs(context, builder, aryty, ary, n):
    """Pointers to elements 0 .. n-1 of a 1-D array."""
    return [_item_ptr(context, builder, aryty, ary, [context.get_constant(types.intp, i)], [types.intp])
            for i in range(n)]


def _reg_kind(dtype):
    return {types.float32: (_f32, "f"), types.uint32: (_i32, "r")}.get(dtype)


@intrinsic
def pin(typingctx, a, n):
    """Empty volatile asm on each of a[0], ..., a[n-1] (n a literal; a a 1-D float32 or uint32 array): a value is
    computed before the asm and read back from it, in program order with the other volatile asm (the wgmma, the
    fence, the wait). Before wgmma.fence: what the wgmma reads is ready (else ptxas inserts a wait and serialises
    the wgmma); after wgmma.wait: nothing reads an accumulator before the wait."""
    if not (isinstance(a, types.Array) and a.ndim == 1 and _reg_kind(a.dtype) and isinstance(n, types.IntegerLiteral)):
        return None
    N = n.literal_value
    llty, c = _reg_kind(a.dtype)

    def codegen(context, builder, sig, args):
        for p in _local_ptrs(context, builder, sig.args[0], args[0], N):
            builder.store(_asm(builder, llty, [builder.load(p)], "", f"={c},0,~{{memory}}"), p)
        return context.get_dummy_value()
    return types.void(a, n), codegen


@intrinsic
def desc_sw128(typingctx, addr, lbo, sbo):
    """The wgmma matrix descriptor (PTX ISA, "Matrix Descriptor Format") of a shared-memory tile in the 128-byte
    swizzle: bits 0-13 the start address / 16, 16-29 the leading-dimension byte offset / 16, 32-45 the stride-
    dimension byte offset / 16, bits 62-63 = 1 (128-byte swizzle); base offset 0 (atoms 1024-byte aligned). All
    three arguments in bytes (integers); returns an int64."""
    if not all(isinstance(x, types.Integer) for x in (addr, lbo, sbo)):
        return None

    def codegen(context, builder, sig, args):
        a, l, s = (builder.zext(context.cast(builder, v, t, types.uint32), _i64) for v, t in zip(args, sig.args))
        start = builder.lshr(builder.and_(a, _i64(0x3FFFF)), _i64(4))
        lead = builder.shl(builder.lshr(l, _i64(4)), _i64(16))
        stride = builder.shl(builder.lshr(s, _i64(4)), _i64(32))
        return builder.or_(builder.or_(start, lead), builder.or_(stride, _i64(1 << 62)))
    return types.int64(addr, lbo, sbo), codegen


@intrinsic
def shared_base(typingctx, a):
    """The .shared-space address (uint32) of a[0] of a 1-D shared array."""
    if not (isinstance(a, types.Array) and a.ndim == 1):
        return None

    def codegen(context, builder, sig, args):
        return _shared_addr(builder, _local_ptrs(context, builder, sig.args[0], args[0], 1)[0])
    return types.uint32(a), codegen


_TYPES = {"float16": "f16.f16", "bfloat16": "bf16.bf16"}


def _flag(context, builder, val, ty):
    """(operand, constraint) of scale_d: an immediate for a literal, else a register."""
    if isinstance(ty, types.IntegerLiteral):
        return None, str(int(ty.literal_value != 0))
    return context.cast(builder, val, ty, types.uint32), None


def _mma_text(N, dtype, a_ops, b_op, p_op, tail):
    """wgmma text: accumulators $0..$(N/2-1), the A operand(s), B, the predicate scale-d from p_op, imm-scale-a and
    imm-scale-b = 1 (no negation), the transpose flags (tail)."""
    acc = ", ".join(f"${i}" for i in range(N // 2))
    return (f"{{ .reg .pred p; setp.ne.b32 p, {p_op}, 0; wgmma.mma_async{_WG}.m64n{N}k16.f32.{_TYPES[dtype]} "
            f"{{{acc}}}, {a_ops}, {b_op}, p, 1, 1{tail}; }}")


def _mma_codegen(N, dtype, n_a, trans_b, scale_ty):
    """Lowering of one wgmma: acc (N/2 floats, tied in and out), n_a A operands (4 uint32 registers for rs, one int64
    descriptor for ss), B's descriptor, scale_d."""
    R = N // 2                                     # operands $0..$(R-1) the outputs, $R..$(2R-1) the tied inputs
    a_ops = "{" + ", ".join(f"${2 * R + i}" for i in range(4)) + "}" if n_a == 4 else f"${2 * R}"
    b_op = f"${2 * R + n_a}"

    def codegen(context, builder, sig, args):
        ptrs = _local_ptrs(context, builder, sig.args[0], args[0], R)
        ins = [builder.load(p) for p in ptrs]
        a = [context.cast(builder, v, t, types.uint32 if n_a == 4 else types.int64)
             for v, t in zip(args[1:1 + n_a], sig.args[1:1 + n_a])]
        b = context.cast(builder, args[1 + n_a], sig.args[1 + n_a], types.int64)
        reg, imm = _flag(context, builder, args[2 + n_a], scale_ty)
        extra = [] if reg is None else [reg]
        p_op = imm if reg is None else f"${2 * R + n_a + 1}"
        tail = f", {trans_b}" if n_a == 4 else f", 0, {trans_b}"     # rs: imm-trans-b; ss: imm-trans-a, -b
        cons = ",".join([f"=f"] * R + [str(i) for i in range(R)] + ["r" if n_a == 4 else "l"] * n_a + ["l"] +
                        ["r"] * len(extra) + ["~{memory}"])
        r = _asm(builder, ir.LiteralStructType([_f32] * R), ins + a + [b] + extra,
                 _mma_text(N, dtype, a_ops, b_op, p_op, tail), cons)
        for i, p in enumerate(ptrs):
            builder.store(builder.extract_value(r, i), p)
        return context.get_dummy_value()
    return codegen


def _acc_ok(acc, N):
    return isinstance(acc, types.Array) and acc.ndim == 1 and acc.dtype == types.float32


def _check(N, dtype):
    if N not in (64, 128) or dtype not in _TYPES:
        raise ValueError(f"wgmma here: N = 64 or 128 and dtype float16 or bfloat16, got N={N}, {dtype!r}")


@functools.lru_cache(maxsize=None)
def mma_rs(N, dtype):
    """The intrinsic (acc, a0, a1, a2, a3, desc_b, scale_d, trans_b): acc = A B (+ acc if scale_d) for m64nNk16,
    A (64 x 16) in registers: this thread's 4 uint32 of mma.m16n8k16's A fragment for its warp's 16 rows."""
    _check(N, dtype)

    def mma(typingctx, acc, a0, a1, a2, a3, desc, scale_d, trans_b):
        if not (_acc_ok(acc, N) and isinstance(trans_b, types.IntegerLiteral) and isinstance(scale_d, types.Integer)):
            return None
        sig = types.void(acc, a0, a1, a2, a3, desc, scale_d, trans_b)
        return sig, _mma_codegen(N, dtype, 4, int(trans_b.literal_value), scale_d)
    mma.__name__ = f"wgmma_rs_m64n{N}k16_{dtype}"
    return intrinsic(mma)


@functools.lru_cache(maxsize=None)
def mma_ss(N, dtype):
    """The intrinsic (acc, desc_a, desc_b, scale_d, trans_b): acc = A B (+ acc if scale_d) for m64nNk16, A and B
    both read from shared memory through descriptors (A K-major)."""
    _check(N, dtype)

    def mma(typingctx, acc, desc_a, desc_b, scale_d, trans_b):
        if not (_acc_ok(acc, N) and isinstance(trans_b, types.IntegerLiteral) and isinstance(scale_d, types.Integer)):
            return None
        sig = types.void(acc, desc_a, desc_b, scale_d, trans_b)
        return sig, _mma_codegen(N, dtype, 1, int(trans_b.literal_value), scale_d)
    mma.__name__ = f"wgmma_ss_m64n{N}k16_{dtype}"
    return intrinsic(mma)


# Byte offset of element (r, c) (c a multiple of 8) of an R-row 16-bit tile in the 128-byte swizzle that desc_sw128
# describes: rung 6's layout, one home (cupy_kernels.config_hopper.sw128, pure Python) compiled here as device code
sw128 = cuda.jit(device=True, inline="always")(_sw128)


def make_probe(N, dtype, form="ss", trans_b=0):
    """probe[1, 128](a, b, out): out (64, N) float32 = A B for A (64 x 64: a, (64, 32) uint32 of 16-bit pairs) and
    B given as b: (N, 32) words of B^T (trans_b = 0, K-major, as K in S = Q K^T) or (64, N/2) words of B (trans_b = 1,
    MN-major, as V in O += P V). Four k16 steps of mma_ss (form 'ss') or mma_rs ('rs': A by ldmatrix into registers,
    as fa2_wgmma loads Q). One warpgroup, the tiles staged swizzled in static shared memory."""
    MMA = (mma_ss if form == "ss" else mma_rs)(N, dtype)
    RB, WB = (64, N // 2) if trans_b else (N, 32)           # B's rows and 32-bit words a row in global memory
    NB = 64 * 32 + RB * WB                                  # words of shared memory: A, then B
    AB = 64 * 128                                           # bytes of A
    TB, NA = trans_b, N // 2                               # NA: accumulator registers

    if trans_b:   # B's k16 step kk: 16 rows of 128 bytes further; LBO: the stride between its 64-column blocks
        @cuda.jit(device=True, inline="always")
        def desc_b(base, kk):
            return desc_sw128(base + AB + kk * 2048, RB * 128, 1024)
    else:         # K-major: 32 bytes further in the row; SBO 1024: the next 8 rows
        @cuda.jit(device=True, inline="always")
        def desc_b(base, kk):
            return desc_sw128(base + AB + kk * 32, 16, 1024)

    if form == "ss":
        @cuda.jit(device=True, inline="always")
        def step(acc, base, qf, kk):
            MMA(acc, desc_sw128(base + kk * 32, 16, 1024), desc_b(base, kk), kk, TB)
    else:
        @cuda.jit(device=True, inline="always")
        def step(acc, base, qf, kk):
            MMA(acc, qf[4 * kk], qf[4 * kk + 1], qf[4 * kk + 2], qf[4 * kk + 3], desc_b(base, kk), kk, TB)

    @cuda.jit(device=True, inline="always")
    def word(r, cw, R):                                     # the word of 16-bit columns 2cw, 2cw + 1 of row r
        return (sw128(r, (2 * cw) & ~7, R) + 4 * (cw & 3)) >> 2

    @cuda.jit
    def probe(a, b, out):
        sm = cuda.shared.array(NB, uint32, alignment=1024)
        acc = cuda.local.array(NA, float32)
        qf = cuda.local.array(16, uint32)
        tid = cuda.threadIdx.x
        for i in range(tid, 64 * 32, 128):
            sm[word(i // 32, i % 32, 64)] = a[i // 32, i % 32]
        for i in range(tid, RB * WB, 128):
            sm[64 * 32 + word(i // WB, i % WB, RB)] = b[i // WB, i % WB]
        fence_proxy_async()
        cuda.syncthreads()
        base = shared_base(sm)
        lane, w = tid & 31, tid >> 5
        for kk in range(4):
            x = ldmatrix_x4_at(base + sw128(16 * w + (lane & 15), 16 * kk + 8 * (lane >> 4), 64))
            for e in range(4):
                qf[4 * kk + e] = x[e]
        pin(qf, 16)
        fence()
        for kk in range(4):                                 # scale_d = kk: D = A B at kk = 0, then +=
            step(acc, base, qf, kk)
        commit()
        wait(0)
        pin(acc, NA)
        g, t = lane >> 2, lane & 3
        for n in range(N // 8):
            for i in range(4):
                out[16 * w + g + 8 * (i >> 1), 8 * n + 2 * t + (i & 1)] = acc[4 * n + i]
    return probe
