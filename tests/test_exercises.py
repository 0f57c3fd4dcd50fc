"""The exercise graders, both ways: the book's solutions (read from the notebooks' solution cells) pass, the
starters get a kind "not written yet", and typical wrong answers fail with a message naming what is wrong."""
import json
import math
import pathlib

import numpy as np
import pytest
from numba import cuda, float32     # after conftest's flashlib.setup(): the simulator without a GPU

from flashlib import exercises as ex

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHAPTERS = ("05", "06", "07", "08", "09", "10", "15")   # the algorithm chapters and the multi-GPU one


def cells(chapter, tag=None):
    nb = json.loads(next((ROOT / "notebooks").glob(f"{chapter}_*.ipynb")).read_text())
    return [c for c in nb["cells"] if str(c.get("id", "")).startswith(f"ex{chapter}-") and c["cell_type"] == "code"
            and (tag is None or tag in c["metadata"].get("tags", []))]


@pytest.fixture(scope="module")
def solutions():
    """Each chapter's solution cells run in order in one namespace, as the book runs them (strict graders)."""
    spaces = {}
    for ch in CHAPTERS:
        ns = {"np": np}
        for c in cells(ch, "exercise-solution"):
            exec(compile("".join(c["source"]), f"<{ch} solution>", "exec"), ns)
        spaces[ch] = ns
    return spaces


def test_every_algorithm_chapter_has_two_graded_exercises():
    for ch in CHAPTERS:
        sol = cells(ch, "exercise-solution")
        assert len(sol) >= 2, ch
        for c in sol:
            src = "".join(c["source"])
            assert "strict=True" in src and "hide-input" in c["metadata"]["tags"], (ch, src[:80])


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_starters_are_reported_kindly(chapter, capsys):
    """Starter cells run without raising: the grader says 'not written yet' or FAIL (a kernel left empty)."""
    ns = {"np": np}
    for c in cells(chapter):
        if "exercise-solution" not in c["metadata"].get("tags", []):
            exec(compile("".join(c["source"]), f"<{chapter} starter>", "exec"), ns)
    out = capsys.readouterr().out
    assert out.count("not written yet") + out.count("FAIL ") == len(
        [c for c in cells(chapter) if "exercise-solution" not in c["metadata"].get("tags", [])])
    assert "PASS" not in out


def test_solutions_pass_and_time(solutions, capsys):
    for ch, ns in solutions.items():
        assert ns, ch
    verdicts = [ex.check_merge(solutions["06"]["merge_solution"]),
                ex.check_fa1_step(solutions["07"]["fa1_step_solution"])]
    assert all(verdicts) and all(v.seconds < 20 for v in verdicts)
    assert "PASS check_merge: all 4 cases" in capsys.readouterr().out


def failing(verdict, *needles):
    assert not verdict, verdict.message
    for n in needles:
        assert n in verdict.message, (n, verdict.message)
    return verdict.message


# ----- wrong answers -----------------------------------------------------------------------------------------

def test_merge_wrong_answers():
    failing(ex.check_merge(lambda ma, la, mb, lb: (np.maximum(ma, mb), la + lb)),     # missing rescale
            "case 1/4 (random scores", "l[0]")
    def no_guard(ma, la, mb, lb):                                                     # nan on empty rows
        m = np.maximum(ma, mb)
        return m, la * np.exp(ma - m) + lb * np.exp(mb - m)
    failing(ex.check_merge(no_guard), "case 4/4", "fully masked", "nan", "Hint")
    with pytest.raises(ex.ExerciseFailed):
        ex.check_merge(no_guard, strict=True)


def test_online_softmax_wrong_answers(solutions):
    def forgot_max(x):
        return x.max(axis=1), np.exp(x).sum(axis=1)
    msg = failing(ex.check_online_softmax(forgot_max), "l[")
    def no_rescale(x):
        m, l = np.full(x.shape[0], -np.inf), np.zeros(x.shape[0])
        for j in range(x.shape[1]):
            m = np.maximum(m, x[:, j])
            l = l + np.exp(x[:, j] - m)
        return m, l
    failing(ex.check_online_softmax(no_rescale), "l[", "expected")
    assert ex.check_online_softmax(solutions["06"]["online_state_solution"])
    assert "expected" in msg


def test_ring_step_wrong_answer():
    def average(Oa, la, Ob, lb):                                 # ignores the weights
        return (Oa + Ob) / 2, np.logaddexp(la, lb)
    failing(ex.check_ring_step(average), "case 1/3", "O[")


def test_matmul_wrong_answers(solutions):
    assert ex.check_tiled_matmul(solutions["05"]["tiled_matmul_solution"])
    def drops_ragged(A, B, T):                                   # off-by-one tile edge: full tiles only
        C = np.zeros((A.shape[0], B.shape[1]))
        for bi in range(0, A.shape[0] - T + 1, T):
            for bj in range(0, B.shape[1] - T + 1, T):
                for k in range(0, A.shape[1] - T + 1, T):
                    C[bi:bi + T, bj:bj + T] += A[bi:bi + T, k:k + T] @ B[k:k + T, bj:bj + T]
        return C
    failing(ex.check_tiled_matmul(drops_ragged), "case 2/3 (M, K, N = 19, 23, 13", "C[")


T = 8


@cuda.jit
def no_zero_padding(A, B, C):                                # the last K tile reads past the edge
    As = cuda.shared.array((T, T), float32)
    Bs = cuda.shared.array((T, T), float32)
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    row, col = cuda.blockIdx.y * T + ty, cuda.blockIdx.x * T + tx
    acc = float32(0.0)
    for t in range(A.shape[1] // T):                          # off by one tile: the ragged one is dropped
        As[ty, tx] = A[row, t * T + tx] if row < A.shape[0] else 0.0
        Bs[ty, tx] = B[t * T + ty, col] if col < B.shape[1] else 0.0
        cuda.syncthreads()
        for kk in range(T):
            acc += As[ty, kk] * Bs[kk, tx]
        cuda.syncthreads()
    if row < C.shape[0] and col < C.shape[1]:
        C[row, col] = acc


def test_matmul_kernel_wrong_answer():
    msg = failing(ex.check_matmul_kernel(no_zero_padding, T), "case 2/2", "C[", "simulator")
    assert "nan" not in msg.split("expected")[0].split("=")[-1]   # a wrong value, not an unwritten one


def test_fa1_step_wrong_answers(solutions):
    good = solutions["07"]["fa1_step_solution"]
    def no_rescale(S, V, O, l, m):                               # adds the new tile without rescaling the old
        O2, l2, m2 = good(S, V, O, l, m)
        return (O * l[:, None] + np.exp(S - m2[:, None]) @ V) / np.where(l2 > 0, l2, 1)[:, None], l2, m2
    failing(ex.check_fa1_step(no_rescale), "Oi[")
    def naive_max(S, V, O, l, m):                                # exp(-inf - -inf): nan on masked rows
        m_t = S.max(axis=1)
        P = np.exp(S - m_t[:, None])
        m_new = np.maximum(m, m_t)
        a, b = np.exp(m - m_new), np.exp(m_t - m_new)
        l_new = a * l + b * P.sum(axis=1)
        return ((a * l)[:, None] * O + b[:, None] * (P @ V)) / l_new[:, None], l_new, m_new
    failing(ex.check_fa1_step(naive_max), "case 4/5 (rows 1 and 3 fully masked", "= nan")


def test_tiled_forward_wrong_answers(solutions):
    good = solutions["08"]["fa2_forward_solution"]
    assert ex.check_tiled_forward(solutions["07"]["fa1_forward_solution"])
    def last_tile_dropped(q, k, v, causal, Br, Bc):              # off-by-one: range(0, Nk - Bc + 1, Bc)
        keep = (k.shape[0] // Bc) * Bc or k.shape[0]
        return good(q, k[:keep], v[:keep], causal, Br, Bc)
    failing(ex.check_tiled_forward(last_tile_dropped), "case 2/6 (Nq = 37, Nk = 29", "O[")
    def bottom_right(q, k, v, causal, Br, Bc):                   # the other causal convention
        if not causal:
            return good(q, k, v, causal, Br, Bc)
        from flashlib.exercises import attention
        Nq, Nk = q.shape[0], k.shape[0]
        return attention(q, k, v, mask=np.arange(Nk)[None, :] <= np.arange(Nq)[:, None] + Nk - Nq)
    failing(ex.check_tiled_forward(bottom_right), "case 3/6 (Nq = 20, Nk = 45, d = 5, Br = 8, Bc = 16, causal)")
    failing(ex.check_tiled_forward(lambda *a: good(*a)[0]), "return 2 values (O, lse)")


BR, BC, D = 8, 4, 8


def make(use_max, guard):
    @cuda.jit
    def kernel(q, k, v, O, lse, scale):
        t = cuda.threadIdx.x
        row = cuda.blockIdx.x * BR + t
        if row < q.shape[0]:
            m, l = float32(-math.inf), float32(0.0)
            acc = cuda.local.array(D, float32)
            for x in range(D):
                acc[x] = 0.0
            n = k.shape[0] if guard else k.shape[0] - k.shape[0] % BC or k.shape[0]
            for c in range(n):
                s = float32(0.0)
                for x in range(q.shape[1]):
                    s += q[row, x] * k[c, x]
                s *= scale
                m_new = max(m, s) if use_max else float32(0.0)
                a = math.exp(m - m_new) if use_max else float32(1.0)
                p = math.exp(s - m_new)
                l = l * a + p
                for x in range(q.shape[1]):
                    acc[x] = acc[x] * a + p * v[c, x]
                m = m_new
            for x in range(q.shape[1]):
                O[row, x] = acc[x] / l
            lse[row] = m + math.log(l)
    return kernel


def test_numba_tile_kernel_wrong_answers():
    assert ex.check_numba_tile_kernel(make(True, True), BR, D)                # right, if untiled
    failing(ex.check_numba_tile_kernel(make(False, True), BR, D), "case 3/3", "large scores")   # forgotten max
    failing(ex.check_numba_tile_kernel(make(True, False), BR, D), "case 2/3 (Nq = 13, Nk = 21")  # ragged tile lost


def test_backward_wrong_answers(solutions):
    failing(ex.check_backward_dS(lambda P, dO, O, V: ((dO * O).sum(1), P * (dO @ V.T) - (dO * O).sum(1)[:, None])),
            "case 1/3", "dS[")
    good = solutions["09"]["flash_backward_solution"]
    assert ex.check_backward(good)
    def no_scale(q, k, v, o, lse, do, causal, Br, Bc):          # forgets the 1/sqrt(d) on dQ
        dq, dk, dv = good(q, k, v, o, lse, do, causal, Br, Bc)
        return dq * np.sqrt(q.shape[1]), dk, dv
    failing(ex.check_backward(no_scale), "case 1/5", "dq[")


def test_causal_wrong_answers(solutions):
    failing(ex.check_tile_visible(lambda i, j, Br, Bc, Nq, Nk: j * Bc <= i * Br),          # first query, not last
            "tile (i, j) = (0, 1)", "expected True, got False")
    failing(ex.check_tile_visible(lambda i, j, Br, Bc, Nq, Nk: j * Bc <= min((i + 1) * Br, Nq) - 1 + Nk - Nq),
            "case 4/6 (Br = 4, Bc = 4, Nq = 10, Nk = 13)", "expected False, got True")        # bottom-right
    good = solutions["10"]["causal_forward_solution"]
    def no_skip(q, k, v, Br, Bc):
        O, lse, computed = good(q, k, v, Br, Bc)
        return O, lse, [(i, j) for i in range(-(-q.shape[0] // Br)) for j in range(-(-k.shape[0] // Bc))]
    failing(ex.check_causal_skip(no_skip), "computed tile (0, 1), which the causal mask hides entirely")
    def skips_one(q, k, v, Br, Bc):
        O, lse, computed = good(q, k, v, Br, Bc)
        return O, lse, computed[1:]
    failing(ex.check_causal_skip(skips_one), "tile (0, 0) has visible scores but is not listed")


def test_reference_attention_convention():
    q, k, v = (np.random.default_rng(0).standard_normal((n, 3)) for n in (4, 5, 5))
    mask = np.ones((4, 5), bool)
    mask[2] = False
    O, lse = ex.attention(q, k, v, mask=mask)
    assert (O[2] == 0).all() and lse[2] == -np.inf and np.isfinite(lse[[0, 1, 3]]).all()
    Oe, le = ex.attention(q, k, v)
    from flashlib import reference
    Or, lr = reference.attention_forward(q, k, v)
    assert np.allclose(Oe, Or) and np.allclose(le, lr)


def test_ring_layout_graders_both_ways():
    """Chapter 15's graders: the solutions pass; a contiguous layout given for zigzag, chunks in the wrong order,
    and a kind that forgets partly visible blocks fail with the case named."""
    ns = {"np": np}
    nb = json.loads((ROOT / "notebooks" / "15_beyond_one_gpu.ipynb").read_text())
    for c in nb["cells"]:
        if "exercise-solution" in c["metadata"].get("tags", []):
            exec(compile("".join(c["source"]), "<15 solution>", "exec"), ns)
    assert ex.check_zigzag_positions(ns["zigzag_positions_solution"])
    assert ex.check_block_kind(ns["block_kind_solution"])
    contiguous = lambda r, P, N: list(range(r * N // P, (r + 1) * N // P))
    failing(ex.check_zigzag_positions(contiguous), "rank 0 of P = 2, N = 8", "expected [0, 1, 6, 7]")
    swapped = lambda r, P, N: ns["zigzag_positions_solution"](r, P, N)[N // P // 2:] + \
        ns["zigzag_positions_solution"](r, P, N)[:N // P // 2]
    failing(ex.check_zigzag_positions(swapped), "rank 0")
    no_mask = lambda q, k: "skip" if min(k) > max(q) else "full"
    failing(ex.check_block_kind(no_mask), "expected 'mask', got 'full'")
