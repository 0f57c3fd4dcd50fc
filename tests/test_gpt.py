"""flashlib.gpt: the data pipeline, the naive attention, and equal loss curves whichever attention trains."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flashlib import gpt

TINY = gpt.GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def data():
    return gpt.CharData()


def test_text_ships_with_python(data):
    assert len(data.train) + len(data.val) > 300_000 and 60 < data.vocab_size < 200
    assert data.decode(data.encode("def f(x): return x")) == "def f(x): return x"


def test_batches_are_next_character_pairs_in_a_seeded_order(data):
    a, b = data.batch_starts(3, 4, 16, seed=5), data.batch_starts(3, 4, 16, seed=5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, data.batch_starts(3, 4, 16, seed=6))
    x, y = data.batch(a[0], 16)
    assert x.shape == y.shape == (4, 16)
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    torch.testing.assert_close(x[0], data.train[a[0, 0]:a[0, 0] + 16])


@pytest.mark.parametrize("Nq,Nk", [(7, 7), (5, 9), (9, 4)])
def test_naive_attention_is_pytorchs(Nq, Nk):
    g = torch.Generator().manual_seed(Nq * Nk)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (Nq, Nk, Nk))
    for causal in (False, True):
        torch.testing.assert_close(gpt.naive_attention(q, k, v, causal),
                                   F.scaled_dot_product_attention(q, k, v, is_causal=causal), rtol=1e-5, atol=1e-6)


def test_model_is_causal_and_starts_near_uniform(data):
    cfg = gpt.GPTConfig(vocab_size=data.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model = gpt.GPT(cfg)
    x, y = data.batch(data.batch_starts(1, 3, 16)[0], 16)
    logits, loss = model(x, y)
    assert logits.shape == (3, 16, data.vocab_size)
    assert abs(loss.item() - math.log(data.vocab_size)) < 0.2        # small initial weights: ~uniform guesses
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % data.vocab_size                  # change the future ...
    torch.testing.assert_close(model(x2)[:, :10], logits[:, :10])     # ... the past does not see it
    assert model.generate(x[:1, :4], 5).shape == (1, 9)


def test_same_loss_curve_for_every_attention(data):
    runs = {f"{a}/{b}": gpt.train(TINY, a, b, steps=12, batch=4, data=data, lr=3e-3)[0]
            for a, b in [("naive", "auto"), ("sdpa", "auto"), ("flashlib", "reference"), ("flashlib", "tiled")]}
    base = np.array(runs["naive/auto"]["losses"])
    assert base[-1] < base[0] - 0.1, base                              # it learns
    for name, r in runs.items():
        np.testing.assert_allclose(r["losses"], base, rtol=0, atol=1e-4, err_msg=name)
    assert runs["flashlib/tiled"]["backend"] == "tiled" and runs["naive/auto"]["backend"] is None


def test_a_different_seed_gives_a_different_curve(data):
    a = gpt.train(TINY, "sdpa", steps=3, batch=4, data=data, seed=0)[0]["losses"]
    b = gpt.train(TINY, "sdpa", steps=3, batch=4, data=data, seed=1)[0]["losses"]
    assert abs(a[0] - b[0]) > 1e-4


def test_unknown_attention():
    with pytest.raises(ValueError, match="naive, sdpa or flashlib"):
        gpt.attention_fn("fast")
