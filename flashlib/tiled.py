"""FlashAttention in plain NumPy, tile by tile, with the papers' names.

Q (Nq, d) is cut into Tr = ceil(Nq / Br) row blocks Q_i, K and V (Nk, d) into Tc = ceil(Nk / Bc) blocks K_j, V_j;
the last block of each may be shorter (ragged). Leading axes (batch, heads) ride along.

- `fa1_forward`: Algorithm 1 of FlashAttention (Dao et al. 2022): outer loop over K/V blocks j, inner over
  Q blocks i; O, l and m live in HBM and make a round trip at every step.
- `fa2_forward`: FlashAttention-2's forward (Dao 2023, Algorithm 1): outer loop over Q blocks, O, l, m stay on
  chip, normalisation deferred to the end, the logsumexp written for the backward pass.
- `backward`: FlashAttention-2's backward (Algorithm 2): P recomputed from the logsumexp, D = rowsum(dO * O).

Each takes `trace=`, a list to which one dict per (i, j) step is appended (see `_step`): which tiles were read
from HBM, the S and P tiles, m, l and the O rows after the step, and the HBM bytes read/written so far
(counting `itemsize` bytes per element: 4 for float32). Tiles that causal masking (or fa2_forward's block_mask)
leaves empty are skipped, not computed, and appear in the trace with skipped=True.

Grouped-query attention (k, v with H_kv heads dividing q's H): the query heads of a kv head are one axis of a
group, (..., H_kv, g, N, d), and K_j, V_j broadcast over it (`reference.group`); trace tiles keep that shape and
K/V traffic is counted once per kv head. A row that sees no key gives O = 0, lse = -inf and zero gradients.
Br, Bc must be positive ints.
"""
import numpy as np

from .constants import NEG_INF, default_scale
from .reference import check_block_size, group, kv_group, kv_sum, shared, ungroup

GQA = ("forward", "backward")   # k, v may have fewer heads than q (flashlib.api reads this)


def n_blocks(N, B):
    return -(-N // B)


def block(t, i, B):
    """Rows [i*B, min((i+1)*B, N)) of t (..., N, x): the i-th tile, shorter when it is the last one."""
    return t[..., i * B:(i + 1) * B, :]


def tile_visible(i, j, Br, Bc, Nq, causal):
    """False when causal masking hides the whole tile (i, j): its first key comes after its last query."""
    return not causal or j * Bc <= min((i + 1) * Br, Nq) - 1


def tile_scores(Qi, Kj, i, j, Br, Bc, causal, scale):
    """S_ij = scale * Q_i K_j^T, with -inf where key index > query index under causal masking."""
    S = scale * (Qi @ np.swapaxes(Kj, -1, -2))
    if causal:
        rows = i * Br + np.arange(S.shape[-2])[:, None]
        cols = j * Bc + np.arange(S.shape[-1])[None, :]
        S = np.where(cols <= rows, S, NEG_INF)
    return S


def _finite(m):
    """Row maxima with -inf (a row fully masked inside this tile) replaced by 0, so exp(S - m) is 0, not nan."""
    return np.where(np.isneginf(m), 0.0, m)


class _HBM:
    """Counts bytes moved between HBM and SRAM."""

    def __init__(self, itemsize):
        self.itemsize, self.read, self.written = itemsize, 0, 0

    def load(self, *tiles):
        self.read += self.itemsize * sum(t.size for t in tiles)

    def store(self, *tiles):
        self.written += self.itemsize * sum(t.size for t in tiles)


def _step(trace, hbm, **state):
    if trace is not None:
        state.update(hbm_read=hbm.read, hbm_written=hbm.written)
        trace.append({k: (np.copy(v) if isinstance(v, np.ndarray) else v) for k, v in state.items()})


def _amend(trace, hbm, written):
    """Add writes that end a loop (O_i at the end of FA2's row loop, dK_j, dV_j in the backward) to the last step."""
    if trace:
        trace[-1].update(written=trace[-1]["written"] + written, hbm_written=hbm.written)


def _setup(q, k, v, scale, Br, Bc):
    """float64 inputs (q grouped, k and v shared for GQA), g, the scale and the numbers of blocks Tr, Tc."""
    Br, Bc = check_block_size("Br", Br), check_block_size("Bc", Bc)
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    g = kv_group(q.shape, k.shape, v.shape)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    return group(q, g), shared(k, g), shared(v, g), g, scale, n_blocks(q.shape[-2], Br), n_blocks(k.shape[-2], Bc)


def _lse(m, l):
    """m + log(l), and -inf for a row that saw no key (l = 0)."""
    return np.where(l > 0, m + np.log(np.where(l > 0, l, 1.0)), NEG_INF)


def _divide(O, l):
    """O / l, and 0 for a row that saw no key (l = 0)."""
    return O / np.where(l > 0, l, 1.0)


def fa1_forward(q, k, v, causal=False, scale=None, Br=16, Bc=16, trace=None, itemsize=4):
    """Algorithm 1 of FlashAttention. q (..., H, Nq, d), k, v (..., H_kv, Nk, d) -> O (..., H, Nq, d), lse (..., H, Nq)."""
    q, k, v, g, scale, Tr, Tc = _setup(q, k, v, scale, Br, Bc)   # line 1: Br, Bc given (iomodel.paper_block_sizes)
    Nq = q.shape[-2]
    hbm = _HBM(itemsize)
    O = np.zeros(q.shape)                          # line 2: O, l, m initialised in HBM
    l = np.zeros(q.shape[:-1] + (1,))
    m = np.full(q.shape[:-1] + (1,), NEG_INF)
    hbm.store(O, l, m)
    for j in range(Tc):                            # line 5: outer loop over K/V blocks (lines 3-4: `block`)
        active = [i for i in range(Tr) if tile_visible(i, j, Br, Bc, Nq, causal)]
        Kj, Vj = block(k, j, Bc), block(v, j, Bc)
        if active:
            hbm.load(Kj, Vj)                       # line 6
        for i in range(Tr):                        # line 7: inner loop over Q blocks
            if i not in active:
                _step(trace, hbm, algo="fa1", i=i, j=j, skipped=True, loaded=(), written=())
                continue
            Qi, Oi, li, mi = block(q, i, Br), block(O, i, Br), block(l, i, Br), block(m, i, Br)
            hbm.load(Qi, Oi, li, mi)               # line 8
            S = tile_scores(Qi, Kj, i, j, Br, Bc, causal, scale)          # line 9
            m_t = S.max(axis=-1, keepdims=True)                          # line 10: tile-local max, sum
            P_t = np.exp(S - _finite(m_t))
            l_t = P_t.sum(axis=-1, keepdims=True)
            m_new = _finite(np.maximum(mi, m_t))                          # line 11 (0 while the row saw no key)
            l_new = np.exp(mi - m_new) * li + np.exp(m_t - m_new) * l_t
            Oi[...] = _divide(li * np.exp(mi - m_new) * Oi + np.exp(m_t - m_new) * (P_t @ Vj), l_new)  # line 12
            li[...], mi[...] = l_new, np.maximum(mi, m_t)                 # line 13
            hbm.store(Oi, li, mi)
            _step(trace, hbm, algo="fa1", i=i, j=j, skipped=False,
                  loaded=(("K", "V") if i == active[0] else ()) + ("Q", "O", "l", "m"),
                  written=("O", "l", "m"), S=S, P=P_t, m=mi[..., 0], l=li[..., 0], O=Oi)
    return ungroup(O, g), ungroup(_lse(m, l), g)[..., 0]


def fa2_forward(q, k, v, causal=False, scale=None, Br=16, Bc=16, trace=None, itemsize=4, block_mask=None):
    """FlashAttention-2's forward. q (..., H, Nq, d), k, v (..., H_kv, Nk, d) -> O (..., H, Nq, d), lse (..., H, Nq).

    block_mask (Tr, Tc) bool, if given, also skips the tiles it turns off (block-sparse FlashAttention).
    The comments name the lines of FlashAttention-2's Algorithm 1 (Dao 2023); lse is the paper's L.
    """
    q, k, v, g, scale, Tr, Tc = _setup(q, k, v, scale, Br, Bc)   # lines 1-2: Tr, Tc blocks (`block` cuts them)
    Nq = q.shape[-2]
    keep = _block_mask(block_mask, Tr, Tc)
    hbm = _HBM(itemsize)
    O = np.empty(q.shape)
    lse = np.empty(q.shape[:-1] + (1,))
    for i in range(Tr):                            # line 3: outer loop over Q blocks, one thread block each on a GPU
        Qi = block(q, i, Br)
        hbm.load(Qi)                               # line 4
        Oi = np.zeros(Qi.shape)                    # line 5, on chip: O_i, l_i, m_i stay there until the end
        li = np.zeros(Qi.shape[:-1] + (1,))
        mi = np.full(Qi.shape[:-1] + (1,), NEG_INF)
        first = True
        for j in range(Tc):                        # line 6
            if not (keep[i, j] and tile_visible(i, j, Br, Bc, Nq, causal)):
                _step(trace, hbm, algo="fa2", i=i, j=j, skipped=True, loaded=(), written=())
                continue
            Kj, Vj = block(k, j, Bc), block(v, j, Bc)
            hbm.load(Kj, Vj)                       # line 7
            S = tile_scores(Qi, Kj, i, j, Br, Bc, causal, scale)          # line 8
            m_new = np.maximum(mi, S.max(axis=-1, keepdims=True))        # line 9: m_i^(j), then P~ and l_i^(j)
            P_t = np.exp(S - _finite(m_new))       # unnormalised: divided by l only once, after the loop
            alpha = np.exp(mi - _finite(m_new))    # e^(m_i^(j-1) - m_i^(j)); _finite: a row with no key yet
            li = alpha * li + P_t.sum(axis=-1, keepdims=True)
            Oi = alpha * Oi + P_t @ Vj             # line 10
            mi = m_new
            _step(trace, hbm, algo="fa2", i=i, j=j, skipped=False, loaded=(("Q",) if first else ()) + ("K", "V"),
                  written=(), S=S, P=P_t, m=mi[..., 0], l=li[..., 0], O=_divide(Oi, li))
            first = False
        block(O, i, Br)[...] = _divide(Oi, li)     # line 12: deferred normalisation
        block(lse, i, Br)[...] = _lse(mi, li)      # line 13: L_i = m_i + log(l_i), kept for the backward
        hbm.store(block(O, i, Br), block(lse, i, Br))                    # lines 14-15
        _amend(trace, hbm, ("O", "lse"))
    return ungroup(O, g), ungroup(lse, g)[..., 0]


def backward(q, k, v, o, lse, do, causal=False, scale=None, Br=16, Bc=16, trace=None, itemsize=4):
    """FlashAttention-2's backward: (dq, dk, dv), P recomputed from lse. Shapes as in fa2_forward.

    P = exp(S - L_i) is only as good as lse: a ValueError says so when a row's P sums to more than 1 (a float32
    lse at |scores| >~ 1e3, or an lse from other inputs); flashlib.reference uses the exact P where lse is the
    row's own. The comments name the lines of FlashAttention-2's Algorithm 2 (Dao 2023): lse is the paper's L, D
    its D = rowsum(dO * O) (`delta` in the kernels). Line 9 loads O_i too; only D_i needs it, so it is not loaded.
    """
    q, k, v, g, scale, Tr, Tc = _setup(q, k, v, scale, Br, Bc)   # lines 1-2: Tr, Tc blocks (`block` cuts them)
    o, do = (group(np.asarray(a, np.float64), g) for a in (o, do))
    lse = group(np.asarray(lse, np.float64)[..., None], g)
    Nq = q.shape[-2]
    hbm = _HBM(itemsize)
    hbm.load(do, o)
    D = (do * o).sum(axis=-1, keepdims=True)       # line 4, a pre-pass: D_i = rowsum(dO_i * O_i)
    hbm.store(D)
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    hbm.store(dq)                                  # line 3: dQ = 0 in HBM
    P_sum = np.zeros(lse.shape)                    # rowsum(P) over all j: 1 when lse fits the scores
    for j in range(Tc):                            # line 5: outer loop over K/V blocks, dK_j, dV_j stay on chip
        active = [i for i in range(Tr) if tile_visible(i, j, Br, Bc, Nq, causal)]
        Kj, Vj = block(k, j, Bc), block(v, j, Bc)
        if active:                                 # line 6 (keys no query sees: dK_j = dV_j = 0, nothing moved)
            hbm.load(Kj, Vj)
        dKj, dVj = np.zeros(Kj.shape), np.zeros(Vj.shape)                # line 7
        for i in range(Tr):                        # line 8
            if i not in active:
                _step(trace, hbm, algo="bwd", i=i, j=j, skipped=True, loaded=(), written=())
                continue
            Qi, dOi, dQi = block(q, i, Br), block(do, i, Br), block(dq, i, Br)
            lse_i, Di = block(lse, i, Br), block(D, i, Br)
            hbm.load(Qi, dOi, lse_i, Di, dQi)      # line 9
            S = tile_scores(Qi, Kj, i, j, Br, Bc, causal, scale)          # line 10
            P = np.where(np.isneginf(lse_i), 0.0, np.exp(S - _finite(lse_i)))   # line 11: recomputed, never stored
            block(P_sum, i, Br)[...] += P.sum(axis=-1, keepdims=True)
            dVj += _per_kv(np.swapaxes(P, -1, -2) @ dOi, g)              # line 12
            dP = dOi @ np.swapaxes(Vj, -1, -2)                            # line 13
            dS = P * (dP - Di)                                            # line 14
            dQi += scale * (dS @ Kj)               # line 15: a GPU kernel adds this with atomics or in a second pass
            dKj += scale * _per_kv(np.swapaxes(dS, -1, -2) @ Qi, g)      # line 16
            hbm.store(dQi)
            _step(trace, hbm, algo="bwd", i=i, j=j, skipped=False, loaded=("Q", "dO", "lse", "D", "dQ"),
                  written=("dQ",), S=S, P=P, dS=dS)
        block(dk, j, Bc)[...], block(dv, j, Bc)[...] = dKj, dVj
        if active:
            hbm.store(dKj, dVj)                    # line 18
            _amend(trace, hbm, ("dK", "dV"))
    _check_lse(P_sum, lse)
    return ungroup(dq, g), kv_sum(dk, g), kv_sum(dv, g)


def _block_mask(block_mask, Tr, Tc):
    """The (Tr, Tc) bool tiles to compute (all when block_mask is None)."""
    if block_mask is None:
        return np.ones((Tr, Tc), bool)
    block_mask = np.asarray(block_mask)
    if block_mask.shape != (Tr, Tc) or block_mask.dtype != bool:
        raise ValueError(f"block_mask must be a bool array of shape (Tr, Tc) = ({Tr}, {Tc}), "
                         f"got {block_mask.dtype} {block_mask.shape}")
    return block_mask


def _per_kv(x, g):
    """A (..., H_kv, g, Bc, d) tile of per-query-head gradients summed over the group, keeping the axis."""
    return x if g == 1 else x.sum(axis=-3, keepdims=True)


def _check_lse(P_sum, lse, tol=1e-4):
    """Raise when exp(S - lse) sums to more than 1 in a row: lse is below the row's logsumexp (an lse of other
    inputs, or one rounded down too far), and the gradients would be off by as much. A sum below 1 is allowed:
    with the lse of a longer row (ring attention), k and v are one block of it."""
    bad = np.isfinite(lse) & ~(P_sum <= 1 + tol)
    if bad.any():
        worst = P_sum[bad].max()
        raise ValueError(f"lse does not fit the scores: exp(S - lse) sums to {worst:.6g} > 1 in "
                         f"{int(bad.sum())} row(s) (|lse| up to {np.abs(lse[bad]).max():.3g}); the gradients would "
                         f"be off by as much. Pass the lse the forward returned for these q, k, v (a float32 lse "
                         f"is too coarse beyond |lse| ~ 1e3: use the float64 one, or flashlib.reference)")