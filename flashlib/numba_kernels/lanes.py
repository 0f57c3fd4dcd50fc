"""What each lane of a warp holds: the register-fragment layouts of `mma.sync` and `ldmatrix`, the index maps of
the Tensor Core kernels, and a NumPy model of a warp built on them. Pure Python and NumPy (no Numba): the figures
(flashlib.viz.fragments) and the tests (tests/test_numba_tc.py, test_numba_tf32.py, test_numba_bwd_tf32.py) use it on
a machine without a GPU, and the kernels compile the few functions marked "compiled" as inline device functions.
(This module imports only NumPy; importing it as flashlib.numba_kernels.lanes still runs the package's __init__,
which loads the kernels and numba.cuda.)

The layouts are the PTX ISA's (section 9.7.14, "Matrix fragments for mma.m16n8k16 / mma.m16n8k8"), element by
element; lane = 4g + t (g = groupID, t = threadID_in_group). 16-bit A, B and C/D fragments hold their elements
packed two to a 32-bit register: element i of a lane sits in register i // 2, the lower half when i is even.
  a_index, b_index, c_index, ldmatrix_index, a_from_c     fp16 / bf16 m16n8k16 and m16n8k8, ldmatrix.x4
  tf32_a_index, tf32_b_index (c_index as above)           TF32 m16n8k8 (one 32-bit element per register)
  q_ldm, k_ldm, v_ldm                                     fa2_tc's ldmatrix row addresses (compiled)
  slot_dim, q_frag, k_frag, slot_key, o_dim, v_frag       fa2_tf32's k / n permutations and loads
  st_a, st_b, dv_b, dq_a, dq_b                            fa2_bwd_tf32's fragment loads
  to_bits, from_bits, elements, words, fragments, c_fragments, gather_c, mma_model, ldmatrix_model   the warp model
  split_model, tf32_round, matmul_model                   the 3xTF32 split (fa2_tf32.py explains it) in NumPy
"""
import numpy as np

SHAPES = ("m16n8k16", "m16n8k8")
TF32_MASK = 0xFFFFE000                               # sign, exponent and the 10 mantissa bits of TF32
P_AS_A = (0, 2, 1, 3)    # TF32 kernels: A register i of P V (P^T dO) is C register P_AS_A[i] of S (S^T), same lane


# ---------------------------------------------------------------- fp16 / bf16 fragments
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

# ---------------------------------------------------------------- TF32 m16n8k8 fragments
def tf32_a_index(lane, i):
    """(row, k slot) of the 16x8 A that register i (0..3) of `lane` holds (mma.m16n8k8 .tf32):
    a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4)."""
    g, t = _gt(lane)
    return g + 8 * (i & 1), t + 4 * (i >> 1)


def tf32_b_index(lane, i):
    """(k slot, col) of the 8x8 B that register i (0..1) of `lane` holds: b0 (k = t, n = g), b1 (k = t+4, n = g)."""
    g, t = _gt(lane)
    return t + 4 * i, g


# ---------------------------------------------------------------- fa2_tc: ldmatrix row addresses (compiled)
# Each returns (row, col) in 16-bit elements, relative to the tile, of the row this lane hands to ldmatrix.x4; the
# kernel calls these very functions (as inline device functions), the tests model a warp with them.
def q_ldm(lane, warp, kk):
    """Q tile -> A fragment of k-step kk (head dims 16kk..16kk+15) of m-tile `warp` (16 rows): the four 8x8 matrices
    are (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) = registers a0..a3."""
    return 16 * warp + (lane & 15), 16 * kk + (lane >> 4) * 8


def k_ldm(lane, nn, kk):
    """K tile -> B fragments (b0, b1) of key n-tiles 2nn and 2nn+1 for k-step kk (B[k][n] = K[key n][dim k])."""
    return 16 * nn + (lane & 7) + (lane >> 4) * 8, 16 * kk + ((lane >> 3) & 1) * 8


def v_ldm(lane, kk, nn):
    """V tile (with .trans) -> B fragments of head-dim n-tiles 2nn and 2nn+1 for keys 16kk..16kk+15."""
    return 16 * kk + (lane & 7) + ((lane >> 3) & 1) * 8, 16 * nn + (lane >> 4) * 8


# ---------------------------------------------------------------- fa2_tf32: permutations (fa2_tf32.py's header)
def slot_dim(c, h, slot):
    """S = Q K^T: the head dim that k slot `slot` (0..7) of k-step 2c + h stands for."""
    return 16 * c + 4 * (slot & 3) + 2 * h + (slot >> 2)


def q_frag(lane, c, h):
    """(row in the warp's 16, head dim) of Q for A registers a0..a3 of k-step 2c + h."""
    out = []
    for i in range(4):
        r, slot = tf32_a_index(lane, i)
        out.append((r, slot_dim(c, h, slot)))
    return out


def k_frag(lane, n, c):
    """(key in the tile, first head dim) of the 16-byte load that holds b0, b1 of key n-tile n for k-steps 2c
    (words 0, 1) and 2c + 1 (words 2, 3)."""
    g, t = _gt(lane)
    return 8 * n + g, 16 * c + 4 * t


def slot_key(jj, slot):
    """O += P V: the key (in the tile) that k slot `slot` of key step jj stands for."""
    return 8 * jj + 2 * (slot & 3) + (slot >> 2)


def o_dim(n, col):
    """O += P V: the head dim that column col (0..7) of n-tile n stands for (B's column g, C's columns 2t, 2t+1)."""
    return 32 * (n >> 2) + 4 * col + (n & 3)


def v_frag(lane, jj, m):
    """(key, first head dim) of the two 16-byte loads of V whose word u is b0 (first) and b1 (second) of n-tile
    4m + u for key step jj."""
    g, t = _gt(lane)
    return (8 * jj + 2 * t, 32 * m + 4 * g), (8 * jj + 2 * t + 1, 32 * m + 4 * g)


# ---------------------------------------------------------------- fa2_bwd_tf32: fragment loads
def st_a(lane, kw, kk):
    """S^T = K Q^T: (key row in the tile, head dim) of K for A registers a0..a3 of k-step kk (warp's keys kw..)."""
    g, t = _gt(lane)
    return [(kw + g, 8 * kk + t), (kw + g + 8, 8 * kk + t), (kw + g, 8 * kk + t + 4), (kw + g + 8, 8 * kk + t + 4)]


def st_b(lane, n, kk):
    """S^T = K Q^T: (query row, head dim) of Q for B registers b0, b1 of query n-tile n, k-step kk."""
    g, t = _gt(lane)
    return [(8 * n + g, 8 * kk + t), (8 * n + g, 8 * kk + t + 4)]


def dv_b(lane, kk, n):
    """dV += P^T dO: (query row, head dim) of dO for b0, b1 of head-dim n-tile n, query k-step kk (permuted k)."""
    g, t = _gt(lane)
    return [(8 * kk + 2 * t, 8 * n + g), (8 * kk + 2 * t + 1, 8 * n + g)]


def dq_a(lane, m, kk):
    """dQ = dS K: (query row, key) of dS for a0..a3 of m-tile m, key k-step kk (permuted k)."""
    g, t = _gt(lane)
    return [(16 * m + g, 8 * kk + 2 * t), (16 * m + g + 8, 8 * kk + 2 * t),
            (16 * m + g, 8 * kk + 2 * t + 1), (16 * m + g + 8, 8 * kk + 2 * t + 1)]


def dq_b(lane, kk, col0):
    """dQ = dS K: (key, head dim) of K for b0, b1 of the n-tile of head dims col0 .. col0+7, key k-step kk."""
    g, t = _gt(lane)
    return [(8 * kk + 2 * t, col0 + g), (8 * kk + 2 * t + 1, col0 + g)]


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


def elements(regs):
    """(32, R) uint32 registers -> (32, 2R) uint16 elements, element 2r in the lower half of register r."""
    regs = np.asarray(regs, np.uint32)
    return np.stack([regs & 0xFFFF, regs >> 16], axis=-1).reshape(32, -1).astype(np.uint16)


def words(elems):
    """(32, 2R) 16-bit elements -> (32, R) uint32 registers, element 2r in the lower half of register r."""
    e = np.asarray(elems, np.uint32).reshape(32, -1, 2)
    return (e[..., 0] | (e[..., 1] << 16)).astype(np.uint32)


def fragments(M, operand, shape="m16n8k16", dtype="float16"):
    """Distribute matrix M (A: 16 x K, B: K x 8) over the 32 lanes: (32, registers) uint32, by a_index / b_index."""
    index = a_index if operand == "a" else b_index
    n = {"a": 8, "b": 4}[operand] // (1 if shape == "m16n8k16" else 2)
    bits = to_bits(M, dtype)
    return words([[bits[index(lane, i, shape)] for i in range(n)] for lane in range(32)])


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
        vals = from_bits(elements(regs), dtype)
        for lane in range(32):
            for i, x in enumerate(vals[lane]):
                rc = index(lane, i, shape)
                if not np.isnan(M[rc]):
                    raise ValueError(f"element {rc} is held twice")
                M[rc] = x
    if np.isnan(A).any() or np.isnan(B).any():
        raise ValueError("an element of A or B is held by no lane")
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
    return words(out)


# ---------------------------------------------------------------- the 3xTF32 split, in NumPy (what the PTX does)
def split_model(x):
    """float32 array -> (big, small) float32 arrays of TF32 values, bit for bit as mma.split_tf32."""
    b = np.ascontiguousarray(x, np.float32).view(np.uint32)
    big = (b & np.uint32(TF32_MASK)).view(np.float32)
    rest = (np.asarray(x, np.float32) - big).astype(np.float32)          # exact
    small = ((rest.view(np.uint32) + np.uint32(0x1000)) & np.uint32(TF32_MASK)).view(np.float32)
    return big, small


def tf32_round(x):
    """float32 -> nearest TF32 (ties away from zero), as cvt.rna.tf32.f32 for finite x."""
    b = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((b + np.uint32(0x1000)) & np.uint32(TF32_MASK)).view(np.float32)


def matmul_model(A, B, terms=3):
    """A @ B the way the kernel's mma see it, in float64: 1 term = tf32(A) tf32(B); 3 terms = 3xTF32."""
    if terms == 1:
        return tf32_round(A).astype(np.float64) @ tf32_round(B)
    (ab, as_), (bb, bs) = split_model(A), split_model(B)
    ab, as_, bb, bs = (x.astype(np.float64) for x in (ab, as_, bb, bs))
    return ab @ bb + ab @ bs + as_ @ bb
