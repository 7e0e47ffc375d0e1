import math

import pytest
import torch
from conftest import demo_config

from training.models.ngram import KneserNey
from training.train import train


@pytest.mark.parametrize("order", [2, 3, 5])
def test_kneser_ney_is_a_distribution(order):
    generator = torch.Generator().manual_seed(order)
    stream = torch.randint(0, 12, (3000,), generator=generator).tolist()
    stream += [1, 2, 3, 4] * 200  # some frequent n-grams
    model = KneserNey(order, vocab_size=15, discount=0.75).fit(stream)
    for history in [(), (1,), (1, 2, 3, 4), (14, 14, 14, 14), (3, 4, 1, 2)]:
        total = sum(model.prob(history[-(order - 1):] if order > 1 else (), w)
                    for w in range(15))
        assert abs(total - 1.0) < 1e-9, (history, total)


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
