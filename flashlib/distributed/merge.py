"""The running state (m, l, O) of a rank's queries, folded block by block with online_softmax.merge.

The state lives in torch tensors; the merge works on NumPy views of them (CPU) or CuPy views (CUDA, through
DLPack, no copy). online_softmax's NumPy code runs on CuPy arrays unchanged: NumPy hands np.maximum and np.exp on
CuPy arrays to CuPy (the __array_ufunc__ protocol, NEP 13), so the merge of chapter 6 is the one used on GPUs.
"""
import numpy as np
import torch

from .. import online_softmax
from ..constants import NEG_INF


def as_array(t):
    """A NumPy (CPU) or CuPy (CUDA) view of tensor t; writing the view writes the tensor."""
    if t.is_cuda:
        import cupy
        return cupy.from_dlpack(t.detach())
    return t.detach().numpy()


def as_tensor(a, like):
    """The torch tensor of array a (NumPy or CuPy) on like's device, sharing a's memory where it can."""
    t = torch.from_numpy(a) if isinstance(a, np.ndarray) else torch.from_dlpack(a)
    return t.to(like.device)


def _module(a):
    return np if isinstance(a, np.ndarray) else __import__("cupy")


def fold(m, l, acc, o_b, lse_b):
    """Fold one block's result (O_b, lse_b) into the running state of the same rows; returns the new (m, l, acc).

    A block is the state (m, l) = (lse_b, 1) with acc = O_b. A row the block leaves empty (lse_b = -inf, O_b = 0)
    enters as (m, 0), which adds nothing and never forms inf - inf; the empty running state is (0, 0, 0).
    m, l: (B, H, n), acc: (B, H, n, d), all of one float dtype, all NumPy or all CuPy."""
    xp = _module(m)
    empty = lse_b == NEG_INF
    m_b = xp.where(empty, m, lse_b).astype(m.dtype)
    m_a = xp.where(l == 0, m_b, m)
    m_new, l_new = online_softmax.merge(m_a, l, m_b, (~empty).astype(l.dtype))
    add = xp.where(empty[..., None], 0, o_b * xp.exp(m_b - m_new)[..., None])
    return m_new, l_new, acc * xp.exp(m_a - m_new)[..., None] + add


def finish(m, l, acc):
    """(O, lse) from the running state; rows that saw no key give O = 0 and lse = -inf."""
    xp = _module(m)
    seen = l > 0
    safe = xp.where(seen, l, 1)
    return xp.where(seen[..., None], acc / safe[..., None], 0), xp.where(seen, m + xp.log(safe), NEG_INF)
