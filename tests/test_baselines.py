import math

import pytest
import torch
from conftest import demo_config

from training.models.ngram import KneserNey
from training.train import train


@pytest.mark.parametrize("discount", [0.0, 0.75])
@pytest.mark.parametrize("order", [2, 3, 5])
def test_kneser_ney_is_a_distribution(order, discount):
    generator = torch.Generator().manual_seed(order)
    stream = torch.randint(0, 12, (3000,), generator=generator).tolist()
    stream += [1, 2, 3, 4] * 200  # some frequent n-grams
    model = KneserNey(order, vocab_size=15, discount=discount).fit(stream)
    for history in [(), (1,), (1, 2, 3, 4), (14, 14, 14, 14), (3, 4, 1, 2)]:
        total = sum(model.prob(history[-(order - 1):] if order > 1 else (), w)
                    for w in range(15))
        assert abs(total - 1.0) < 1e-9, (history, total)


def test_modified_kneser_ney_estimates_three_discounts_from_count_of_counts():
    rng = torch.Generator().manual_seed(0)
    ranks = torch.arange(1, 301, dtype=torch.float)
    stream = torch.multinomial(1 / ranks, 20_000, replacement=True, generator=rng).tolist()
    model = KneserNey(2, vocab_size=300).fit(stream)
    counts = list(model.effective[2].values())
    n1, n2, n3, n4 = (counts.count(k) for k in (1, 2, 3, 4))
    y = n1 / (n1 + 2 * n2)
    expected = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
    assert model.discounts[2] == pytest.approx(expected)
    d1, d2, d3 = model.discounts[2]
    assert 0 < d1 < d2 < d3 < 3


def test_kneser_ney_learns_frequent_continuations():
    model = KneserNey(3, vocab_size=6).fit([0, 1, 2, 3, 4, 5] * 100)
    assert model.prob((0, 1), 2) > 0.9
    logprobs = model.stream_logprobs([2, 3, 4], history=[0, 1])
    assert all(lp > math.log(0.9) for lp in logprobs)


def test_feedforward_lm_trains_through_the_same_command(synth_dir, tmp_path):
    config = demo_config("demo-lm", synth_dir, 'model.type="ffnn"', "model.window=4",
                         "model.tie_weights=false", "train.epochs=1")
    summary = train(config, tmp_path)
    assert summary["valid"]["ppl"] < 15  # uniform over the vocabulary would be about 70
