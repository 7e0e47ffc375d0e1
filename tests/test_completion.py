"""Complete: seeded sampling, greedy decoding against torch, concurrency, stops, deadlines."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from serving_helpers import RunningServer

from serving.model.sampler import SamplingParams

PROMPT = "the old dogs that"


@pytest.fixture(scope="module")
def server(model_repository):
    running = RunningServer(model_repository, max_completion_tokens=100_000,
                            version_policy="all")  # both versions of endless
    yield running
    running.stop()


def tokens_and_finish(events) -> dict[int, tuple[list[int], int, str]]:
    samples: dict[int, tuple[list[int], int, str]] = {}
    for event in events:
        ids, _, _ = samples.setdefault(event.index, ([], 0, ""))
        if event.token is not None:
            ids.append(event.token.id)
        else:
            samples[event.index] = (ids, event.finish_reason, event.text)
    return samples


def complete(server, seed, **kwargs):
    kwargs.setdefault("max_tokens", 15)
    return tokens_and_finish(server.client.complete("demo-lm", PROMPT, seed=seed, **kwargs))


def test_greedy_completion_matches_the_torch_model(server, demo_lm_run):
    from training.evaluate import load_run
    from training.generate import generate

    _, task, model = load_run(demo_lm_run, device="cpu")
    expected = generate(model, task.vocab, PROMPT, 15, SamplingParams(temperature=0.0))
    ids, reason, text = complete(server, seed=0, temperature=0.0)[0]
    eos = task.vocab.eos_id
    assert ids == [t for t in expected if t != eos]
    assert reason == ("eos" if expected[-1] == eos else "length")
    assert text == task.vocab.decode(ids)


@pytest.mark.parametrize("seed,sample", [(1, 0), (7, 2)])
def test_recur_generate_and_complete_agree_for_a_seed(server, demo_lm_run, seed, sample):
    from training.evaluate import load_run
    from training.generate import generate

    _, task, model = load_run(demo_lm_run, device="cpu")
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.95)
    expected = generate(model, task.vocab, PROMPT, 15, params, seed=seed, sample_index=sample)
    samples = complete(server, seed, temperature=0.9, top_k=20, top_p=0.95, n=sample + 1)
    ids, _, _ = samples[sample]
    assert ids == [t for t in expected if t != task.vocab.eos_id]


def test_seeded_completions_are_the_same_alone_and_among_63_others(server):
    alone = {seed: complete(server, seed) for seed in range(64)}
    batches = server.metric("recur_batch_size_count", model="demo-lm/1")
    steps = server.metric("recur_batch_size_sum", model="demo-lm/1")
    with ThreadPoolExecutor(64) as pool:
        together = dict(zip(range(64), pool.map(lambda s: complete(server, s), range(64))))
    assert together == alone
    batches = server.metric("recur_batch_size_count", model="demo-lm/1") - batches
    steps = server.metric("recur_batch_size_sum", model="demo-lm/1") - steps
    # The streams decode together: gRPC keeps admitting and writing while the model
    # computes. (With the call on the event loop's thread this was 1.6; now about 8 of the
    # 64, whose clients are threads sharing the server's interpreter.)
    assert steps / batches > 4, f"mean batch {steps / batches:.1f}"
    assert len({tuple(v[0][0]) for v in alone.values()}) > 10  # the seeds do differ


def test_n_samples_stream_each_with_its_own_finish(server):
    samples = complete(server, seed=3, n=4, max_tokens=6)
    assert sorted(samples) == [0, 1, 2, 3]
    for ids, reason, _ in samples.values():
        assert reason in ("eos", "length")
        assert len(ids) <= 6
        assert reason != "length" or len(ids) == 6


def test_stop_strings_and_stop_tokens_end_a_sample(server, model_repository):
    greedy, _, text = complete(server, seed=0, temperature=0.0, max_tokens=8)[0]
    words = text.split()
    assert len(words) >= 3
    ids, reason, cut = complete(server, seed=0, temperature=0.0, max_tokens=8,
                                stop=[words[2]])[0]
    assert reason == "stop"
    assert words[2] not in cut and cut.strip() == " ".join(words[:2])
    ids, reason, _ = complete(server, seed=0, temperature=0.0, max_tokens=8,
                              stop_token_ids=[greedy[1]])[0]
    assert reason == "stop" and ids == greedy[:1]


def test_an_empty_prompt_starts_a_new_sentence(server):
    samples = tokens_and_finish(server.client.complete("demo-lm", "", seed=2, max_tokens=5))
    assert samples[0][0]


def test_the_highest_version_serves_unless_one_is_named(server):
    events = list(server.client.complete("endless", "w3", seed=0, max_tokens=3))
    assert events[-1].model.version == 2
    events = list(server.client.complete("endless", "w3", version=1, seed=0, max_tokens=3))
    assert events[-1].model.version == 1


def generated(server) -> float:
    return server.metric("recur_tokens_total", model="endless/1", kind="generated")


def test_a_completion_runs_its_prompt_and_then_one_step_per_token(server):
    """The first token is drawn from the cached state after <eos> advanced over the prompt's
    own tokens, so an empty prompt needs no call before it; every later token is one step."""
    def calls() -> float:
        return server.metric("recur_execution_seconds_count", model="endless/1")

    def prompt_tokens() -> float:
        return server.metric("recur_tokens_total", model="endless/1", kind="prompt")

    list(server.client.complete("endless", "", version=1, seed=0, max_tokens=1))  # reads <eos>
    before, prompted = calls(), prompt_tokens()
    events = list(server.client.complete("endless", "", version=1, seed=0, max_tokens=6))
    assert sum(event.token is not None for event in events) == 6
    assert calls() - before == 5
    assert prompt_tokens() == prompted
    def executed() -> float:
        return server.metric("recur_executed_tokens_total", model="endless/1")

    before, ran = calls(), executed()
    events = list(server.client.complete("endless", "w3 w4 w5", version=1, seed=0,
                                         max_tokens=6))
    assert sum(event.token is not None for event in events) == 6
    # the prompt up to its last token (its state goes to the prefix cache), the last token
    assert calls() - before == 2 + 5 and executed() - ran == 3 + 5
    assert prompt_tokens() == prompted + 3
    # the same prompt again starts from the cached state: only its last token runs
    before, ran = calls(), executed()
    again = list(server.client.complete("endless", "w3 w4 w5", version=1, seed=0,
                                        max_tokens=6))
    assert calls() - before == 1 + 5 and executed() - ran == 1 + 5
    assert [e.token.id for e in again if e.token] == [e.token.id for e in events if e.token]


def test_a_deadline_stops_a_completion_at_the_next_step(server):
    stream = server.client.complete("endless", "w3", version=1, seed=0, max_tokens=100_000,
                                    timeout=0.5)
    with pytest.raises(grpc.RpcError) as caught:
        for _ in stream:
            pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(0.2)
    stopped = generated(server)
    time.sleep(0.5)
    assert generated(server) == stopped
    assert 0 < stopped < 100_000
    assert server.metric("recur_queue_depth", model="endless/1") == 0  # its slot is free


def test_a_cancelled_completion_stops_using_compute(server):
    before = generated(server)
    stream = server.client.complete("endless", "w3", version=1, seed=0, max_tokens=100_000)
    for count, _ in enumerate(stream):
        if count == 20:
            stream.cancel()
            break
    time.sleep(0.3)
    stopped = generated(server)
    time.sleep(0.5)
    assert generated(server) == stopped
    assert stopped - before < 100_000
    assert server.metric("recur_requests_total", service="LanguageModel", method="Complete",
                         code="CANCELLED") >= 1
    assert server.metric("recur_queue_depth", model="endless/1") == 0  # its slot is free


def test_time_to_first_token_is_observed(server):
    before = server.metric("recur_time_to_first_token_seconds_count", model="demo-lm/1")
    complete(server, seed=1, max_tokens=2)
    assert server.metric("recur_time_to_first_token_seconds_count",
                         model="demo-lm/1") == before + 1
