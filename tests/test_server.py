"""The gRPC service end to end: a real server on 127.0.0.1, real ONNX Runtime sessions."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from serving_helpers import PROVIDER, TEST_DEVICE, RunningServer

from serving.model.runtime import ModelRuntime
from serving.proto_gen.recur.v1 import recur_pb2 as pb

TEXTS = ["the old dogs that the cat sees run", "a dog sleeps", "the cats that a dog likes eat",
         "dogs run", "the cat that the dogs see sleeps quietly today"]


@pytest.fixture(scope="module")
def server(model_repository):
    running = RunningServer(model_repository, max_queue_delay_ms=2.0, version_policy="all")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def runtime(model_repository) -> ModelRuntime:
    return ModelRuntime(model_repository / "demo-lm" / "1")


def test_score_matches_the_runtime_and_the_scoring_convention(server, runtime):
    scores = server.client.score("demo-lm", TEXTS)
    vocab = runtime.vocab
    expected = runtime.score([vocab.encode(t, add_eos=True) for t in TEXTS])
    for score, want, text in zip(scores, expected, TEXTS):
        got = np.array([t.logprob for t in score.tokens])
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert score.token_count == len(text.split()) + 1
        assert score.tokens[-1].text == "<eos>"
        assert score.total_logprob == pytest.approx(float(np.sum(want)), abs=1e-4)
        assert score.perplexity == pytest.approx(np.exp(-np.sum(want) / len(want)), rel=1e-5)
    no_eos = server.client.score("demo-lm", TEXTS[:1], add_eos=False)[0]
    assert no_eos.token_count == len(TEXTS[0].split())
    np.testing.assert_allclose([t.logprob for t in no_eos.tokens],
                               [t.logprob for t in scores[0].tokens][:-1], atol=1e-6)


def test_score_counts_unknown_words_and_accepts_token_ids(server, runtime):
    text = "the zyzzyva dog qwerty sleeps"
    by_text = server.client.score("demo-lm", [text])[0]
    assert by_text.unknown_count == 2
    ids = runtime.vocab.encode(text)
    by_ids = server.client.score("demo-lm", [ids])[0]
    assert [t.logprob for t in by_ids.tokens] == [t.logprob for t in by_text.tokens]


def test_a_near_impossible_token_gives_an_infinite_perplexity(server):
    """endless/1 gives <eos> a log-prob near -1e4: exp(-mean) overflows a double."""
    (score,) = server.client.score("endless", ["w3"], version=1)
    assert score.tokens[-1].logprob < -1000 and score.perplexity == float("inf")


def test_incremental_appends_equal_one_score_and_the_torch_model(server, demo_lm_run):
    import torch

    from training.evaluate import load_run

    rng = np.random.default_rng(0)
    text = " ".join(TEXTS)
    words = text.split()
    session = server.client.create_session("demo-lm")
    got, start = [], 0
    while start < len(words):
        size = int(rng.integers(1, 6))
        response = server.client.append(session.session_id, " ".join(words[start:start + size]))
        got += [t.logprob for t in response.tokens]
        start += size
        assert response.position == start
    server.client.close_session(session.session_id)
    whole = server.client.score("demo-lm", [text], add_eos=False)[0]
    np.testing.assert_allclose(got, [t.logprob for t in whole.tokens], atol=1e-5)
    _, task, model = load_run(demo_lm_run, device="cpu")
    ids = torch.tensor([[task.vocab.eos_id] + task.vocab.encode(text)])
    with torch.inference_mode():
        logits, _ = model.eval()(ids[:, :-1])
        expected = torch.log_softmax(logits[0], -1).gather(1, ids[0, 1:, None])[:, 0]
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4)


def test_append_returns_the_top_k_next_tokens(server, runtime):
    session = server.client.create_session("demo-lm", prefix="the old dogs", top_k=5)
    assert session.position == 3 and len(session.tokens) == 3
    assert len(session.next_tokens) == 5
    logprobs = [t.logprob for t in session.next_tokens]
    assert logprobs == sorted(logprobs, reverse=True)
    best = session.next_tokens[0]
    response = server.client.append(session.session_id, [best.id], top_k=3)
    assert response.tokens[0].logprob == pytest.approx(best.logprob, abs=1e-6)
    assert len(response.next_tokens) == 3


def test_appends_cost_only_their_new_tokens(server, runtime):
    """Counted where the work happens: the token positions the model's runtime handed to
    ONNX Runtime, and the scheduler's count of what it batched."""
    words = [w for w in runtime.vocab.tokens if not w.startswith("<")]
    served = server.server.engine.model("demo-lm").runtime
    rng = np.random.default_rng(1)
    for history in (10, 5000):
        prefix = " ".join(rng.choice(words, history))
        session = server.client.create_session("demo-lm", prefix=prefix)
        ran = served.positions_run
        executed = server.metric("recur_executed_tokens_total", model="demo-lm/1")
        server.client.append(session.session_id, "the dog sleeps")
        assert served.positions_run - ran == 3, f"history {history}"
        assert server.metric("recur_executed_tokens_total", model="demo-lm/1") - executed == 3
        server.client.close_session(session.session_id)


def test_concurrent_sessions_are_batched_and_isolated(server, runtime, model_repository):
    rng = np.random.default_rng(2)
    words = [w for w in runtime.vocab.tokens if not w.startswith("<")]
    texts = [" ".join(rng.choice(words, int(rng.integers(3, 12)))) for _ in range(64)]

    def alone(client, text):
        session = client.create_session("demo-lm", top_k=1)
        logprobs, greedy = [], []
        for word in text.split():
            response = client.append(session.session_id, word, top_k=1)
            logprobs.append(response.tokens[0].logprob)
            greedy.append(response.next_tokens[0].id)
        client.close_session(session.session_id)
        return logprobs, greedy

    expected = [alone(server.client, t) for t in texts]
    # A server whose batches wait up to 25 ms to fill: the clients here are 64 Python
    # threads sharing one interpreter with the server, so requests trickle in.
    batching = RunningServer(model_repository, max_queue_delay_ms=25.0)
    try:
        with ThreadPoolExecutor(64) as pool:
            together = list(pool.map(lambda t: alone(batching.client, t), texts))
        batches = batching.metric("recur_batch_size_count", model="demo-lm/1")
        sequences = batching.metric("recur_batch_size_sum", model="demo-lm/1")
    finally:
        batching.stop()
    for (want_lp, want_greedy), (got_lp, got_greedy) in zip(expected, together):
        np.testing.assert_allclose(got_lp, want_lp, atol=1e-5)
        assert got_greedy == want_greedy
    assert sequences / batches > 8, f"mean batch {sequences / batches:.1f}"


def test_concurrent_appends_to_one_session_apply_in_order(server, runtime):
    session = server.client.create_session("demo-lm")
    ids = runtime.vocab.encode("the old dogs that the cat sees run a dog sleeps dogs run")
    stub = server.client.language_model
    futures = [stub.Append.future(pb.AppendRequest(session_id=session.session_id,
                                                   input=pb.Input(token_ids=pb.TokenIds(
                                                       ids=[i])))) for i in ids]
    responses = [f.result(timeout=30) for f in futures]
    positions = sorted(r.position for r in responses)
    assert positions == list(range(1, len(ids) + 1))
    order = [r.tokens[0].id for r in sorted(responses, key=lambda r: r.position)]
    whole = server.client.score("demo-lm", [order], add_eos=False)[0]
    by_position = [r.tokens[0].logprob for r in sorted(responses, key=lambda r: r.position)]
    np.testing.assert_allclose(by_position, [t.logprob for t in whole.tokens], atol=1e-5)


def test_converse_stream_keeps_a_session_for_its_lifetime(server):
    def requests():
        yield pb.ConverseRequest(model=pb.ModelRef(name="demo-lm"), input=pb.Input(text="the"),
                                 top_k=2)
        yield pb.ConverseRequest(input=pb.Input(text="old dogs"))
        yield pb.ConverseRequest(input=pb.Input(text="run"))

    before = server.metric("recur_active_sessions", model="demo-lm/1")
    responses = list(server.client.language_model.Converse(requests(), timeout=30))
    assert [r.position for r in responses] == [1, 3, 4]
    assert len({r.session_id for r in responses}) == 1
    whole = server.client.score("demo-lm", ["the old dogs run"], add_eos=False)[0]
    got = [t.logprob for r in responses for t in r.tokens]
    np.testing.assert_allclose(got, [t.logprob for t in whole.tokens], atol=1e-5)
    assert server.metric("recur_active_sessions", model="demo-lm/1") == before


def test_list_models_reports_tasks_versions_and_devices(server):
    models = {(m.name, m.version): m for m in server.client.list_models()}
    lm = models[("demo-lm", 1)]
    assert lm.task == "lm" and lm.cell == "lstm" and lm.latest and lm.ready
    assert lm.device == TEST_DEVICE and lm.providers[0] == PROVIDER[TEST_DEVICE]
    assert lm.incremental
    assert not models[("tagger-bi", 1)].incremental
    assert models[("tagger-uni", 1)].incremental
    assert not models[("classifier-mean", 1)].incremental
    assert models[("endless", 2)].latest and not models[("endless", 1)].latest
    assert len(models[("classifier-uni", 1)].labels) == 3


def test_metrics_move_by_exactly_what_was_done(server):
    def scored():
        return server.metric("recur_tokens_total", model="demo-lm/1", kind="scored")

    def finished(method, code="OK"):
        return server.metric("recur_requests_total", service="LanguageModel", method=method,
                             code=code)

    before, requests = scored(), finished("Score")
    scores = server.client.score("demo-lm", TEXTS)
    assert scored() - before == sum(s.token_count for s in scores)
    assert finished("Score") == requests + 1
    failures = finished("Score", "INVALID_ARGUMENT")
    with pytest.raises(grpc.RpcError):
        server.client.score("demo-lm", [[10**9]])
    assert finished("Score", "INVALID_ARGUMENT") == failures + 1
    assert scored() - before == sum(s.token_count for s in scores)
    tagged = server.metric("recur_tokens_total", model="tagger-bi/1", kind="tagged")
    server.client.tag("tagger-bi", ["w1 w2 w3", "w4"])
    assert server.metric("recur_tokens_total", model="tagger-bi/1", kind="tagged") == tagged + 4
    assert server.metric("recur_model_info", name="demo-lm", version="1", task="lm",
                         cell="lstm", device=TEST_DEVICE) == 1
