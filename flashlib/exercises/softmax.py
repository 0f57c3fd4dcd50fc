"""Chapter 06: softmax states, merged and streamed, and the ring step that merges two partial attentions."""
import numpy as np

from ..constants import NEG_INF
from .grading import EMPTY_HINT, attention, _compare, _empty_hint, _first, _grade, softmax_state, _unpack


def _rows(rng, shape, kind):
    x = rng.standard_normal(shape) * 3
    if kind == "large":
        x += 1000.0
    return x


def check_merge(fn, strict=False, seed=0):
    """fn(m_a, l_a, m_b, l_b) -> (m, l): arrays (rows,), the state of the union of two disjoint chunks."""
    rng = np.random.default_rng(seed)

    def case(xa, xb):
        def run():
            (ma, la), (mb, lb) = softmax_state(xa), softmax_state(xb)
            m, l = _unpack(fn(ma, la, mb, lb), 2, ("m", "l"))
            me, le = softmax_state(np.concatenate([xa, xb], axis=-1))
            return _first(_compare("m", m, me), _compare("l", l, le))
        return run

    a, b = _rows(rng, (5, 7), "random"), _rows(rng, (5, 4), "random")
    b[0] += 20                                         # b holds the max of row 0, a of others
    empty = np.full((3, 4), NEG_INF)
    mixed = _rows(rng, (3, 4), "random")
    mixed[1] = NEG_INF
    cases = [("random scores, 5 rows", case(a, b)),
             ("large scores (about 1000)", case(_rows(rng, (4, 6), "large"), _rows(rng, (4, 6), "large"))),
             ("one chunk empty (m_b = -inf, l_b = 0)", case(_rows(rng, (3, 5), "random"), empty)),
             ("both chunks empty: a fully masked row", lambda: _empty_hint(case(empty, mixed)()))]
    return _grade("check_merge", cases, strict)


def check_online_softmax(fn, strict=False, seed=0):
    """fn(x) -> (m, l): x (rows, n) read one column at a time; m, l (rows,) the running max and sum."""
    rng = np.random.default_rng(seed)

    def case(x, hint=None):
        def run():
            m, l = _unpack(fn(x.copy()), 2, ("m", "l"))
            me, le = softmax_state(x)
            p = _first(_compare("m", m, me), _compare("l", l, le))
            return p and (f"{p}. Hint: {hint}" if hint else p)
        return run

    grow = np.stack([np.arange(8.0), np.arange(8.0)[::-1], rng.standard_normal(8) * 4])
    masked = _rows(rng, (3, 9), "random")
    masked[0, ::2] = NEG_INF
    masked[2] = NEG_INF
    cases = [("random scores, 4 rows of 10", case(_rows(rng, (4, 10), "random"))),
             ("max grows at every key (row 0), never (row 1)", case(grow, "when the max grows, the sum so far "
                                                                      "must be rescaled by exp(m_old - m_new)")),
             ("large scores (about 1000)", case(_rows(rng, (3, 12), "large"), "subtract the running max before "
                                                                             "exp: exp(1000) overflows")),
             ("masked scores, row 2 fully masked", case(masked, EMPTY_HINT))]
    return _grade("check_online_softmax", cases, strict)


def check_ring_step(fn, strict=False, seed=0):
    """fn(O_a, lse_a, O_b, lse_b) -> (O, lse): two normalised partial attentions over disjoint key sets
    (O (Nq, d), lse (Nq,)) merged into the attention over both (one step of ring attention)."""
    rng = np.random.default_rng(seed)

    def case(q, k, v, split, mask=None):
        def run():
            ma = mb = None
            if mask is not None:
                ma, mb = mask[:, :split], mask[:, split:]
            Oa, la = attention(q, k[:split], v[:split], mask=ma)
            Ob, lb = attention(q, k[split:], v[split:], mask=mb)
            O, lse = _unpack(fn(Oa, la, Ob, lb), 2, ("O", "lse"))
            Oe, le = attention(q, k, v, mask=mask)
            return _first(_compare("O", O, Oe), _compare("lse", lse, le))
        return run

    q, k, v = (rng.standard_normal((n, 6)) for n in (5, 11, 11))
    mask = np.ones((5, 11), bool)
    mask[1, :4] = False                                # row 1 sees nothing in chunk a
    mask[3] = False                                    # row 3 sees nothing at all
    cases = [("random, Nq = 5, keys split 4 + 7", case(q, k, v, 4)),
             ("large scores", case(8 * q, 8 * k, v, 6)),
             ("row 1 masked in one chunk, row 3 fully masked (O = 0, lse = -inf)",
              lambda: _empty_hint(case(q, k, v, 4, mask)()))]
    return _grade("check_ring_step", cases, strict)
