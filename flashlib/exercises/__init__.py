"""Graders for the book's coding exercises: each runs the reader's function (or Numba kernel) on random and
edge-case inputs against float64 answers from flashlib's reference, and prints a short verdict that names the
first failing case (its shapes, the position, expected vs got).

    check_merge(merge)                 # chapter 06: merge two softmax states (m, l)
    check_online_softmax(fn)           # chapter 06: one pass over a row, (m, l)
    check_ring_step(fn)                # merge two partial attentions by their logsumexp (a ring step)
    check_tiled_matmul(fn)             # chapter 05: C = A B tile by tile, in NumPy
    check_matmul_kernel(kernel, T)     # chapter 05: the tiled matmul as a Numba kernel
    check_fa1_step(fn)                 # chapter 07: lines 10-13 of Algorithm 1 on one score tile
    check_tiled_forward(fn)            # chapters 07, 08: a whole tiled forward, (O, lse)
    check_numba_tile_kernel(kernel, Br, D)  # chapter 08: FA2's forward of one Q tile per thread block, Numba
    check_backward_dS(fn)              # chapter 09: D and dS of one tile
    check_backward(fn)                 # chapter 09: the tiled backward, (dQ, dK, dV)
    check_tile_visible(fn)             # chapter 10: which causal tiles to compute
    check_causal_skip(fn)              # chapter 10: a causal forward that skips the hidden tiles
    check_zigzag_positions(fn)         # chapter 15: the positions a rank holds in the zigzag layout
    check_block_kind(fn)               # chapter 15: skip, mask or compute fully one ring block under causality

Every grader returns a `Verdict` (truthy when all cases pass). A function that still raises NotImplementedError
gets a kind "not written yet" verdict. `strict=True` (the book's solution cells) raises ExerciseFailed on a
failure, so a solution that stops passing fails the build. Convention for a row that sees no key (fully
masked): m = -inf, l = 0, O = 0, lse = -inf. Kernels run in Numba's CUDA simulator without a GPU (each
grader there takes a few seconds) and on the GPU in Colab.
"""
from .grading import ExerciseFailed, Verdict, attention, softmax_state, where_run
from .matmul import check_tiled_matmul, check_matmul_kernel
from .softmax import check_merge, check_online_softmax, check_ring_step
from .forward import check_fa1_step, check_tiled_forward, check_numba_tile_kernel
from .backward import check_backward_dS, check_backward
from .causal import check_tile_visible, check_causal_skip
from .ring import check_zigzag_positions, check_block_kind

__all__ = ["ExerciseFailed", "Verdict", "attention", "softmax_state", "where_run", "check_tiled_matmul",
           "check_matmul_kernel", "check_merge", "check_online_softmax", "check_ring_step", "check_fa1_step",
           "check_tiled_forward", "check_numba_tile_kernel", "check_backward_dS", "check_backward",
           "check_tile_visible", "check_causal_skip", "check_zigzag_positions", "check_block_kind"]
