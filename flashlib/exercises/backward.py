"""Chapter 09: D and dS of one tile, and the tiled backward."""
import numpy as np

from .. import reference
from ..constants import NEG_INF
from .grading import FORWARD_CASES, attention, _case_label, _compare, _first, _grade, _unpack


def check_backward_dS(fn, strict=False, seed=0):
    """fn(P, dO, O, V) -> (D, dS): P (Nq, Nk) the softmax, dO, O (Nq, d), V (Nk, d); D = rowsum(dO * O) (Nq,),
    dS = P * (dP - D) with dP = dO V^T (Nq, Nk)."""
    rng = np.random.default_rng(seed)

    def case(Nq, Nk, d, masked_row=None):
        def run():
            q, k, v, do = (rng.standard_normal((n, d)) for n in (Nq, Nk, Nk, Nq))
            mask = np.ones((Nq, Nk), bool)
            if masked_row is not None:
                mask[masked_row] = False
            O, lse = attention(q, k, v, mask=mask)
            S = np.where(mask, reference.scores(q, k), NEG_INF)
            P = np.where(np.isneginf(lse)[:, None], 0.0, np.exp(S - np.where(np.isneginf(lse), 0, lse)[:, None]))
            D, dS = _unpack(fn(P.copy(), do.copy(), O.copy(), v.copy()), 2, ("D", "dS"))
            De = (do * O).sum(axis=1)
            return _first(_compare("D", D, De), _compare("dS", dS, P * (do @ v.T - De[:, None])))
        return run

    cases = [("Nq = Nk = 6, d = 4", case(6, 6, 4)), ("Nq = 5, Nk = 9, d = 3", case(5, 9, 3)),
             ("row 2 fully masked (P = 0, O = 0: D = 0, dS = 0)", case(5, 7, 4, masked_row=2))]
    return _grade("check_backward_dS", cases, strict)


def check_backward(fn, strict=False, seed=0):
    """fn(q, k, v, o, lse, do, causal, Br, Bc) -> (dq, dk, dv), shapes as q, k, v (float64, scale 1/sqrt(d))."""
    rng = np.random.default_rng(seed)

    def case(Nq, Nk, d, Br, Bc, c, s):
        def run():
            q, k, v, do = (rng.standard_normal((n, d)) for n in (Nq, Nk, Nk, Nq))
            q *= s
            o, lse = reference.attention_forward(q, k, v, c)
            expected = reference.attention_backward(q, k, v, o, lse, do, c)
            got = _unpack(fn(*(a.copy() for a in (q, k, v, o, lse, do)), c, Br, Bc), 3, ("dq", "dk", "dv"))
            return _first(*(_compare(n, g, e) for n, g, e in zip(("dq", "dk", "dv"), got, expected)))
        return run

    cases = [(_case_label(*c), case(*c)) for c in FORWARD_CASES[:5]]
    return _grade("check_backward", cases, strict)
