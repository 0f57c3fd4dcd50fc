"""A torch model of fa3_fp8's arithmetic, tile by tile, for the tests and the error table: what the kernel computes
from its FP8 inputs, up to fp32 summation order and ex2.approx.

Per query row and K/V tile of Bc keys (in base 2, as the kernel): s = (q8 k8^T) * scale * q_descale * k_descale *
log2(e) in fp32, masked; m_new = max(m, max s), alpha = 2^(m - m_new), P = 2^(s - m_new + 8) rounded to e4m3 for
P V (l sums the unrounded P), O = alpha O + P8 V8; at the end O * v_descale / l and lse = (m + log2 l - 8) ln 2.
It runs on the device of its inputs (the CPU too) in float32.
"""
import math

import numpy as np

from .fp8 import key_permutation
from .fp8_tiles import FP8_TILES


def untranspose_v(vt8, Nk):
    """transpose_v's inverse: V^T (B, H_kv, d, Nk32), keys permuted in 32s -> V (B, H_kv, Nk, d) e4m3."""
    import torch
    B, Hkv, d, n32 = vt8.shape
    inv = torch.as_tensor(np.argsort(key_permutation()), device=vt8.device)
    u = vt8.view(torch.uint8).transpose(2, 3).reshape(B, Hkv, n32 // 32, 32, d)[:, :, :, inv]
    return u.reshape(B, Hkv, n32, d)[:, :, :Nk].contiguous().view(torch.float8_e4m3fn)


def dequantize(inp):
    """(q, k, v) float32 from Fp8Inputs: q8 * q_descale, ... (what the FP8 inputs stand for), k, v with H_kv heads."""
    q8, k8, vt8, qd, kd, vd, Nk = inp
    v8 = untranspose_v(vt8, Nk)
    return (q8.float() * qd[:, :, None, None], k8.float() * kd[:, :, None, None], v8.float() * vd[:, :, None, None])


def emulate(inp, causal=False, scale=None, Bc=None, reverse=False):
    """(o float32 (B, H, Nq, d), lse float32 (B, H, Nq)) as fa3_fp8 computes them from Fp8Inputs `inp`, keys in
    tiles of Bc (default FP8_TILES[d][0]), walked from the last tile down where `reverse` (the trimmed kernel's
    order; a tile a row sees none of changes nothing, so every row may walk them all)."""
    import torch
    q8, k8, vt8, qd, kd, vd, Nk = inp
    B, H, Nq, d = q8.shape
    G = H // k8.shape[1]
    Bc = Bc or FP8_TILES[d][0]
    scale = 1 / math.sqrt(d) if scale is None else scale
    rep = lambda x: x.repeat_interleave(G, dim=1)
    k, v = rep(k8.float()), rep(untranspose_v(vt8, Nk).float())
    sl = (scale * math.log2(math.e)) * (qd * rep(kd)).float()[:, :, None, None]
    s_all = (q8.float() @ k.transpose(-1, -2)) * sl
    if causal:
        keep = torch.ones(Nq, Nk, dtype=torch.bool, device=q8.device).tril()
        s_all = s_all.masked_fill(~keep, -math.inf)
    m = torch.full((B, H, Nq, 1), -math.inf, device=q8.device)
    l = torch.zeros_like(m)
    o = torch.zeros(B, H, Nq, d, device=q8.device)
    starts = range(0, Nk, Bc)
    for j in reversed(starts) if reverse else starts:
        s = s_all[..., j:j + Bc]
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        base = torch.where(m_new == -math.inf, torch.zeros_like(m_new), m_new)
        alpha = torch.exp2(m - base)
        p = torch.exp2(s - base + 8)
        l = l * alpha + p.sum(-1, keepdim=True)
        p8 = p.to(torch.float8_e4m3fn).float()
        o = o * alpha + p8 @ v[..., j:j + Bc, :]
        m = m_new
    f = torch.where(l > 0, rep(vd).float()[:, :, None, None] / l, torch.zeros_like(l))
    lse = (m + torch.log2(l) - 8) * math.log(2)
    return o * f, lse[..., 0]
