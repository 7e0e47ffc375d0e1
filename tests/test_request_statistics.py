"""Per-request accounting in the engine: Triton's statistics and nv_inference_* families,
the model label of recur_requests, each message of a stream counted as a request, and the
most likely tokens (log-prob alternatives) of scoring and completion."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from serving_helpers import RunningServer

from serving.engine.inputs import Input
from serving.model.runtime import ModelRuntime
from serving.proto_gen.recur.v1 import recur_pb2 as pb

MODEL = {"model": "demo-lm", "version": "1"}


@pytest.fixture(scope="module")
def server(model_repository):
    running = RunningServer(model_repository)
    yield running
    running.stop()


def engine_call(server, coroutine_function):
    """Runs `coroutine_function(engine)` on the server's loop."""
    async def run():
        return await coroutine_function(server.server.engine)
    return server.call(run())


def test_scored_alternatives_are_the_distribution_at_each_position(server, model_repository):
    text = "the old dogs that the cat sees run"

    async def score(engine):
        model = engine.model("demo-lm")
        plain = await engine.score(model, [Input(text=text)], add_eos=False)
        ranked = await engine.score(model, [Input(text=text)], add_eos=False, top_logprobs=3)
        return plain[0], ranked[0]

    plain, ranked = engine_call(server, score)
    assert plain.top is None and len(ranked.top) == len(ranked.ids) == len(plain.ids)
    assert np.allclose(ranked.logprobs, plain.logprobs, atol=1e-5)
    # against the whole distribution at each position, from the runtime itself
    runtime = ModelRuntime(model_repository / "demo-lm" / "1")
    eos = runtime.vocab.eos_id
    for position, alternatives in enumerate(ranked.top):
        prefix = [eos, *ranked.ids[:position]]
        step = runtime.run_lm(np.array([prefix]), np.array([len(prefix)]))
        distribution = step.next_logprobs[0]
        best = np.argsort(-distribution, kind="stable")[:3]
        assert [a[0] for a in alternatives] == best.tolist()
        assert [a[1] for a in alternatives] == [runtime.vocab.tokens[i] for i in best]
        assert np.allclose([a[2] for a in alternatives], distribution[best], atol=1e-5)
        # the token's own log-prob comes from the same distribution as its alternatives
        if alternatives[0][0] == ranked.ids[position]:
            assert alternatives[0][2] == ranked.logprobs[position]


def test_completion_alternatives_come_with_each_token_and_change_no_token(server):
    async def complete(engine, top, temperature):
        model = engine.model("demo-lm")
        stream = await engine.complete(model, Input(text="the old dogs"), max_tokens=8,
                                       temperature=temperature, seed=11, n=2,
                                       top_logprobs=top)
        async with stream:
            return [event async for event in stream if hasattr(event, "logprob")]

    plain = engine_call(server, lambda e: complete(e, 0, 0.9))
    ranked = engine_call(server, lambda e: complete(e, 4, 0.9))
    assert [(e.index, e.id, e.logprob) for e in plain] == [(e.index, e.id, e.logprob)
                                                             for e in ranked]
    assert all(e.top == () for e in plain)
    for event in ranked:
        assert len(event.top) == 4
        logprobs = [lp for _, _, lp in event.top]
        assert logprobs == sorted(logprobs, reverse=True)
        assert event.logprob <= logprobs[0]
        if event.id in [i for i, _, _ in event.top]:
            assert dict((i, lp) for i, _, lp in event.top)[event.id] == event.logprob
    greedy = engine_call(server, lambda e: complete(e, 1, 0.0))
    assert all(e.top[0][0] == e.id and e.top[0][2] == e.logprob for e in greedy)


def test_alternatives_are_bounded_by_max_top_logprobs(server):
    async def ask(engine):
        model = engine.model("demo-lm")
        await engine.score(model, [Input(text="the dog")], top_logprobs=21,
                           top_field="logprobs")

    with pytest.raises(Exception, match=r"logprobs: 21 exceeds the server's limit "
                                        r"max_top_logprobs = 20"):
        engine_call(server, ask)


def test_every_request_and_stream_message_counts_once_with_its_model(server):
    stats = server.server.engine.statistics
    before = stats("demo-lm", 1)[0]
    success = server.metric("nv_inference_request_success", **MODEL)
    failure = server.metric("nv_inference_request_failure", **MODEL)
    executions = server.metric("nv_inference_exec_count", **MODEL)
    stub = server.client.language_model
    for _ in range(3):  # 3 requests of 2 sequences
        server.client.score("demo-lm", ["the dog", "a cat sees"])
    ref = pb.ModelRef(name="demo-lm")
    conversation = [pb.ConverseRequest(model=ref, input=pb.Input(text="the dog"))] + [
        pb.ConverseRequest(input=pb.Input(text=t)) for t in ("runs", "and", "sees")]
    assert len(list(stub.Converse(iter(conversation), timeout=30))) == 4
    scored = [pb.ScoreStreamRequest(id=str(i), model=ref, inputs=[pb.Input(text="the cat")])
              for i in range(5)]
    assert len(list(stub.ScoreStream(iter(scored), timeout=30))) == 5
    with pytest.raises(grpc.RpcError) as refused:  # a bad request counts as a failure
        stub.Score(pb.ScoreRequest(model=ref, inputs=[pb.Input(token_ids=pb.TokenIds(
            ids=[10 ** 9]))]), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    assert server.metric("nv_inference_request_success", **MODEL) - success == 3 + 4 + 5
    assert server.metric("nv_inference_request_failure", **MODEL,
                         reason="OTHER") - failure == 1
    assert server.metric("nv_inference_exec_count", **MODEL) > executions
    assert server.metric("nv_inference_pending_request_count", **MODEL) == 0
    for family in ("request_duration_us", "queue_duration_us", "compute_input_duration_us",
                   "compute_infer_duration_us", "compute_output_duration_us"):
        assert server.metric(f"nv_inference_{family}", **MODEL) > 0, family
    after = stats("demo-lm", 1)[0]
    assert after.success.count - before.success.count == 12
    assert after.inference_count - before.inference_count == 3 * 2 + 4 + 5
    assert after.fail.count - before.fail.count == 1
    assert after.failures["OTHER"] - before.failures["OTHER"] == 1
    assert after.execution_count == server.metric("nv_inference_exec_count", **MODEL)
    assert sum(b.compute_infer.count for b in after.batch_stats) == after.execution_count
    # recur_requests: a stream's messages each, with the model; the stream itself apart
    assert server.metric("recur_requests_total", service="LanguageModel", method="Converse",
                         code="OK", model="demo-lm") == 4
    assert server.metric("recur_requests_total", service="LanguageModel",
                         method="ScoreStream", code="OK", model="demo-lm") == 5
    assert server.metric("recur_requests_total", service="LanguageModel", method="Score",
                         code="INVALID_ARGUMENT", model="demo-lm") == 1
    assert server.metric("recur_streams_total", service="LanguageModel", method="Converse",
                         code="OK") == 1
    assert server.metric("recur_request_duration_seconds_count", service="LanguageModel",
                         method="Converse", model="demo-lm") == 4


def test_a_refused_request_counts_as_rejected(model_repository):
    running = RunningServer(model_repository, max_queue=2, max_sequences_per_request=2)
    try:
        async def overload(engine):
            model = engine.model("demo-lm")
            hold = model.scheduler.admit(2)  # the queue is full
            try:
                await engine.score(model, [Input(text="the dog")])
            finally:
                hold.release()

        with pytest.raises(Exception, match="queue full"):
            engine_call(running, overload)
        assert running.metric("nv_inference_request_failure", **MODEL,
                              reason="REJECTED") == 1
    finally:
        running.stop()


def test_a_completion_counts_until_its_stream_ends(server):
    before = server.server.engine.statistics("demo-lm")[0]
    events = list(server.client.complete("demo-lm", "the dog", max_tokens=5, seed=3, n=3))
    assert sum(1 for e in events if e.finish_reason) == 3
    after = server.server.engine.statistics("demo-lm")[0]
    assert after.success.count - before.success.count == 1
    assert after.inference_count - before.inference_count == 3
    # its duration covers its steps: at least the compute they took
    took = after.success.ns - before.success.ns
    assert took >= after.compute_infer.ns - before.compute_infer.ns > 0
    assert not math.isnan(took)


def test_statistics_of_unknown_models_are_not_found(server):
    from serving.engine.errors import NotFound

    with pytest.raises(NotFound):
        server.server.engine.statistics("no-such-model")
    names = {(s.name, s.version) for s in server.server.engine.statistics()}
    assert ("demo-lm", 1) in names


def test_a_sample_ended_by_eos_reports_the_eos_it_drew(server):
    async def complete(engine):
        model = engine.model("demo-lm")
        # greedy from a whole sentence: the demo grammar ends it with <eos>
        stream = await engine.complete(model, Input(text="the old dogs run"), max_tokens=30,
                                       temperature=0.0, top_logprobs=2)
        async with stream:
            return [event async for event in stream]

    *tokens, finish = engine_call(server, complete)
    assert finish.reason == "eos" and finish.last is not None
    eos = server.server.engine.model("demo-lm").vocab.eos_id
    assert finish.last.id == eos and finish.last.top[0][0] == eos
    assert finish.last.logprob == finish.last.top[0][2] <= 0
    assert finish.text == " ".join(t.text for t in tokens)


def test_completion_ids_and_top_k_are_checked_before_numpy_sees_them(server):
    from serving.engine.errors import InvalidArgument

    async def complete(engine, **options):
        await engine.complete(engine.model("demo-lm"), None, **options)

    with pytest.raises(InvalidArgument, match=r"stop_token_ids\[1\]: token id "
                                              r"9223372036854775808 is out of range"):
        engine_call(server, lambda e: complete(e, stop_token_ids=[1, 2 ** 63]))
    with pytest.raises(InvalidArgument, match="top_k: 1000000000000 exceeds the vocabulary"):
        engine_call(server, lambda e: complete(e, top_k=10 ** 12))


def test_large_inputs_are_tokenized_off_the_event_loop(server):
    """A 2 MB Score (refused after tokenizing, by the size of its answer) must not hold
    the loop for its tokenization: the loop's longest pause stays well under the time the
    tokenization takes."""
    import asyncio
    import time

    from serving.engine.inputs import encode_all

    text = " ".join(["the old dogs that the cat sees run"] * 750)  # 6,000 words
    inputs = [Input(text=text) for _ in range(64)]
    vocab = server.server.engine.model("demo-lm").vocab
    started = time.perf_counter()
    encode_all(inputs, vocab, "inputs", 1024, 20000)
    tokenizing = time.perf_counter() - started

    async def pauses_during_score(engine):
        longest = 0.0
        done = asyncio.Event()

        async def watch():
            nonlocal longest
            while not done.is_set():
                before = time.perf_counter()
                await asyncio.sleep(0.001)
                longest = max(longest, time.perf_counter() - before)

        watcher = asyncio.ensure_future(watch())
        await asyncio.sleep(0.01)  # the watcher is timing its sleeps

        def refuse(encoded):
            raise ValueError(f"{sum(len(e.ids) for e in encoded)} tokens")

        try:
            await engine.score(engine.model("demo-lm"), inputs, check=refuse)
        except ValueError as refused:
            tokens = str(refused)
        done.set()
        await watcher
        return longest, tokens

    longest, tokens = engine_call(server, pauses_during_score)
    assert tokens == "384000 tokens"
    assert longest < tokenizing / 3, (longest, tokenizing)
