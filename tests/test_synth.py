"""The generated language: exact probabilities, and what they let us check about models."""

import math
from collections import Counter

from conftest import demo_config

from training.data.synth import Grammar, true_perplexity
from training.evaluate import load_run, probe_accuracy
from training.train import train


def test_sentence_probabilities_match_frequencies():
    grammar = Grammar(seed=7)
    samples = [grammar.sentence() for _ in range(200_000)]
    frequency = Counter(" ".join(s.words) for s in samples)
    logprob = {" ".join(s.words): s.logprob for s in samples}
    for text, count in frequency.most_common(5):
        expected = math.exp(logprob[text]) * len(samples)
        assert abs(count - expected) < 4 * math.sqrt(expected) + 1, text


def test_every_sentence_has_one_derivation():
    """Equal sentences always got equal log-probabilities: a second derivation would differ."""
    grammar = Grammar(seed=3)
    seen = {}
    for _ in range(50_000):
        s = grammar.sentence()
        text = " ".join(s.words)
        assert abs(seen.setdefault(text, s.logprob) - s.logprob) < 1e-9


def test_written_files_agree(synth_dir):
    lines = (synth_dir / "lm" / "valid.txt").read_text().splitlines()
    logprobs = (synth_dir / "lm" / "valid.logprob").read_text().split()
    assert len(lines) == len(logprobs) == 2000
    assert 5 < true_perplexity(synth_dir / "lm" / "valid") < 15
    probes = (synth_dir / "lm" / "probes.tsv").read_text().splitlines()
    assert all(good != bad and len(good.split()) == len(bad.split())
               for good, bad in (p.split("\t") for p in probes))


def test_bigram_baseline_stays_far_from_the_true_perplexity(synth_dir, tmp_path):
    config = demo_config("demo-lm", synth_dir, 'model.type="kn"', "model.order=2",
                         "model.tie_weights=false")
    summary = train(config, tmp_path)
    ratio = summary["valid"]["ppl"] / true_perplexity(synth_dir / "lm" / "valid")
    assert ratio > 1.3, ratio


def test_demo_lstm_comes_close_to_the_true_perplexity(demo_lm_run, synth_dir):
    _, task, model = load_run(demo_lm_run)
    import torch

    # evaluate with one column so every sentence is read from the start of the stream
    task.config.train.eval_batch_size = 1
    ppl = task.evaluate(model, "valid", torch.device("cpu"))["ppl"]
    ratio = ppl / true_perplexity(synth_dir / "lm" / "valid")
    assert ratio < 1.15, ratio


def test_demo_lstm_prefers_grammatical_agreement(demo_lm_run, synth_dir):
    _, task, model = load_run(demo_lm_run)
    assert probe_accuracy(model, task.vocab, synth_dir / "lm" / "probes.tsv") >= 0.95
