import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.model.sampler import BLOCK, SamplingParams, draw, make_rng, sample_batch, sample_next

LOGPROBS = np.log(np.array([0.5, 0.3, 0.15, 0.05]))


def test_temperature_zero_is_greedy():
    rng = make_rng(0)
    assert all(sample_next(LOGPROBS, SamplingParams(0.0), rng) == 0 for _ in range(20))


def test_same_seed_same_tokens_and_sample_index_changes_them():
    params = SamplingParams(1.0)
    draws = lambda seed, index: [sample_next(LOGPROBS, params, r)  # noqa: E731
                                 for r in [make_rng(seed, index)] for _ in range(50)]
    assert draws(7, 0) == draws(7, 0)
    assert draws(7, 0) != draws(7, 1)


def test_frequencies_follow_the_distribution():
    rng = make_rng(123)
    draws = np.array([sample_next(LOGPROBS, SamplingParams(1.0), rng) for _ in range(20000)])
    frequencies = np.bincount(draws, minlength=4) / len(draws)
    assert np.allclose(frequencies, np.exp(LOGPROBS), atol=0.015)


def test_top_k_and_top_p_restrict_the_support():
    rng = make_rng(5)
    top2 = {sample_next(LOGPROBS, SamplingParams(1.0, top_k=2), rng) for _ in range(500)}
    assert top2 == {0, 1}
    nucleus = {sample_next(LOGPROBS, SamplingParams(1.0, top_p=0.7), rng) for _ in range(500)}
    assert nucleus == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3


@pytest.mark.parametrize("kwargs,field", [({"temperature": -1.0}, "temperature"),
                                          ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                                          ({"top_k": -2}, "top_k")])
def test_bad_parameters_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.floats(-30, 0), min_size=1, max_size=40), st.integers(0, 10),
       st.floats(0.01, 1.0), st.floats(0.05, 3.0), st.integers(0, 2**32))
def test_sample_is_always_a_valid_kept_token(raw, top_k, top_p, temperature, seed):
    logprobs = np.array(raw)
    token = sample_next(logprobs, SamplingParams(temperature, top_k, top_p), make_rng(seed))
    assert 0 <= token < len(raw)
    if top_k:
        # never outside the k most likely (ties broken by position, as the sampler does)
        assert token in np.argsort(-logprobs, kind="stable")[:top_k]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1.0)), min_size=1, max_size=700),
       st.floats(0.0, 1.0, exclude_max=True))
def test_two_level_draw_is_the_inverse_cdf(weights, u):
    """draw() picks what one cumulative sum over all weights would (the blocks only change
    the order of additions), and never a zero weight."""
    w = np.array(weights, np.float32)
    if not w.any():
        w[len(w) // 2] = 1.0
    padded = np.zeros((1, -(-len(w) // BLOCK) * BLOCK), np.float32)
    padded[0, : len(w)] = w
    index = int(draw(padded, np.array([u]))[0])
    assert w[index] > 0
    cumulative = np.cumsum(w, dtype=np.float64)
    target = u * cumulative[-1]
    expected = min(int(np.searchsorted(cumulative, target, side="right")), len(w) - 1)
    if index != expected:  # only where the target sits on a boundary, within rounding
        assert abs(cumulative[min(index, expected)] - target) <= 1e-9 * cumulative[-1]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 300), st.lists(st.sampled_from([
    SamplingParams(1.0), SamplingParams(0.7), SamplingParams(0.0), SamplingParams(1.3, top_k=3),
    SamplingParams(1.0, top_p=0.8), SamplingParams(2.0)]), min_size=1, max_size=12),
    st.integers(0, 2**32))
def test_a_batched_draw_gives_each_row_what_it_gets_alone(vocab_size, params, seed):
    """The server draws the next tokens of all its streams in one batch: each row must get
    the token it gets alone (a seeded completion is the same alone and among others), and
    its generator must advance exactly as alone."""
    raw = np.random.default_rng(seed).standard_normal((len(params), vocab_size)) * 4
    logprobs = (raw - np.log(np.exp(raw).sum(axis=1, keepdims=True))).astype(np.float32)
    in_batch = [make_rng(seed, i) for i in range(len(params))]
    alone = [make_rng(seed, i) for i in range(len(params))]
    batched = sample_batch(logprobs, params, in_batch)
    assert list(batched) == [sample_next(row, p, rng)
                             for row, p, rng in zip(logprobs, params, alone, strict=True)]
    assert [r.random() for r in in_batch] == [r.random() for r in alone]
