"""How many bytes standard attention and FlashAttention move between HBM and on-chip SRAM.

Exact counts for the algorithms as `flashlib.tiled` runs them (the trace's byte counter must agree, and a test
checks it), and the orders of Theorem 2 of FlashAttention (Dao et al. 2022): standard attention needs
Theta(N d + N^2) HBM accesses, FlashAttention Theta(N^2 d^2 / M) for SRAM of M elements, d <= M <= N d.
Every function returns (bytes_read, bytes_written) for one (batch, head); multiply by B * H.
"""
import math

from .tiled import n_blocks, tile_visible


def _blocks(N, B):
    """Sizes of the tiles of a length-N axis cut into blocks of B (the last may be short)."""
    return [min(B, N - t * B) for t in range(n_blocks(N, B))]


def standard_hbm_bytes(Nq, Nk, d, itemsize=4):
    """Standard attention (Algorithm 0 of the paper): S = QK^T written, read back for P = softmax(S), P written,
    read back for O = PV. The N x N terms dominate."""
    read = (Nq + Nk) * d + Nq * Nk + Nq * Nk + Nk * d
    written = Nq * Nk + Nq * Nk + Nq * d
    return read * itemsize, written * itemsize


def fa1_hbm_bytes(Nq, Nk, d, Br, Bc, causal=False, itemsize=4):
    """FlashAttention Algorithm 1: K_j, V_j read once per outer step; Q_i, O_i, l_i, m_i read and O_i, l_i, m_i
    written back at every inner step."""
    rows, cols = _blocks(Nq, Br), _blocks(Nk, Bc)
    read, written = 0, Nq * d + 2 * Nq                      # O = 0, l = 0, m = -inf written to HBM first
    for j, bc in enumerate(cols):
        active = [br for i, br in enumerate(rows) if tile_visible(i, j, Br, Bc, Nq, causal)]
        read += 2 * bc * d if active else 0
        read += sum(br * (2 * d + 2) for br in active)
        written += sum(br * (d + 2) for br in active)
    return read * itemsize, written * itemsize


def fa2_hbm_bytes(Nq, Nk, d, Br, Bc, causal=False, itemsize=4):
    """FlashAttention-2 forward: Q_i read once, every visible K_j, V_j once per Q block; O_i and lse_i written once."""
    rows, cols = _blocks(Nq, Br), _blocks(Nk, Bc)
    read = Nq * d + sum(2 * bc * d for i in range(len(rows)) for j, bc in enumerate(cols)
                        if tile_visible(i, j, Br, Bc, Nq, causal))
    return read * itemsize, (Nq * d + Nq) * itemsize


def backward_hbm_bytes(Nq, Nk, d, Br, Bc, causal=False, itemsize=4):
    """FlashAttention-2 backward: D pre-pass over dO and O; per visible tile Q_i, dO_i, lse_i, D_i, dQ_i read and
    dQ_i written; dK_j, dV_j written once per K/V block."""
    rows, cols = _blocks(Nq, Br), _blocks(Nk, Bc)
    read, written = 2 * Nq * d, Nq + Nq * d                 # D written, dQ zeroed
    for j, bc in enumerate(cols):
        active = [br for i, br in enumerate(rows) if tile_visible(i, j, Br, Bc, Nq, causal)]
        if active:
            read += 2 * bc * d + sum(br * (3 * d + 2) for br in active)
            written += sum(br * d for br in active) + 2 * bc * d
    return read * itemsize, written * itemsize


def paper_block_sizes(M, d):
    """Block sizes of Algorithm 1 for SRAM of M elements: Bc = ceil(M / 4d), Br = min(ceil(M / 4d), d)."""
    Bc = math.ceil(M / (4 * d))
    return min(Bc, d), Bc


def theorem2(N, d, M):
    """The two orders of Theorem 2, in elements: standard N d + N^2, FlashAttention N^2 d^2 / M."""
    return {"standard": N * d + N * N, "flash": N * N * d * d / M}
