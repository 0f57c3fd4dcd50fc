"""Chapter 10: which causal tiles to compute, and a forward that skips the hidden ones."""
import numpy as np

from .. import tiled
from .grading import attention, _compare, _first, _grade, _unpack


def check_tile_visible(fn, strict=False):
    """fn(i, j, Br, Bc, Nq, Nk) -> bool: does causal masking (top-left: query r sees keys 0..r) leave any score of
    tile (i, j) visible? Checked on every tile of many shapes, ragged ones and Nq != Nk included."""
    shapes = [(16, 16, 64, 64), (16, 8, 40, 40), (8, 16, 40, 40), (4, 4, 10, 13), (5, 3, 17, 11), (3, 7, 20, 30)]

    def case(Br, Bc, Nq, Nk):
        def run():
            for i in range(tiled.n_blocks(Nq, Br)):
                for j in range(tiled.n_blocks(Nk, Bc)):
                    e, g = tiled.tile_visible(i, j, Br, Bc, Nq, True), fn(i, j, Br, Bc, Nq, Nk)
                    if bool(g) != e:
                        rows, cols = (i * Br, min((i + 1) * Br, Nq) - 1), (j * Bc, min((j + 1) * Bc, Nk) - 1)
                        return (f"tile (i, j) = ({i}, {j}) (query rows {rows[0]}..{rows[1]}, keys "
                                f"{cols[0]}..{cols[1]}): expected {e}, got {g}"
                                + (": its last query sees its first key" if e else
                                   ": every key of it comes after its last query"))
        return run

    cases = [(f"Br = {Br}, Bc = {Bc}, Nq = {Nq}, Nk = {Nk}", case(Br, Bc, Nq, Nk)) for Br, Bc, Nq, Nk in shapes]
    return _grade("check_tile_visible", cases, strict)


def check_causal_skip(fn, strict=False, seed=0):
    """fn(q, k, v, Br, Bc) -> (O, lse, computed): a causal tiled forward (q (Nq, d), k, v (Nk, d)) and the list
    of tiles (i, j) it computed. Right answers that compute a hidden tile, or skip a visible one, fail."""
    rng = np.random.default_rng(seed)

    def case(Nq, Nk, d, Br, Bc):
        def run():
            q, k, v = (rng.standard_normal((n, d)) for n in (Nq, Nk, Nk))
            Oe, le = attention(q, k, v, True)
            O, lse, computed = _unpack(fn(q.copy(), k.copy(), v.copy(), Br, Bc), 3, ("O", "lse", "computed"))
            visible = {(i, j) for i in range(tiled.n_blocks(Nq, Br)) for j in range(tiled.n_blocks(Nk, Bc))
                       if tiled.tile_visible(i, j, Br, Bc, Nq, True)}
            done = [tuple(int(x) for x in t) for t in computed]
            extra = sorted(set(done) - visible)
            missing = sorted(visible - set(done))
            return _first(_compare("O", O, Oe), _compare("lse", lse, le),
                          extra and f"computed tile {extra[0]}, which the causal mask hides entirely "
                                    f"({len(extra)} such tiles)",
                          missing and f"tile {missing[0]} has visible scores but is not listed as computed",
                          len(done) != len(set(done)) and "a tile is listed twice")
        return run

    shapes = [(32, 32, 4, 8, 8), (37, 29, 5, 16, 8), (20, 45, 3, 8, 16)]
    cases = [(f"Nq = {Nq}, Nk = {Nk}, d = {d}, Br = {Br}, Bc = {Bc}", case(Nq, Nk, d, Br, Bc))
             for Nq, Nk, d, Br, Bc in shapes]
    return _grade("check_causal_skip", cases, strict)
