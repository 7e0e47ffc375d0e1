"""LogLikelihood and LogLikelihoodRolling (lm-evaluation-harness's loglikelihood and
loglikelihood_rolling) over recur.v1, against brute force: Score's per-token log-probs of
the joined text, and a session's most likely next token before each continuation token."""

from __future__ import annotations

import grpc
import httpx
import pytest
from serving_helpers import RunningServer

from serving.proto_gen.recur.v1 import recur_pb2 as pb

MODEL = "demo-lm"
PAIRS = [("the old dogs", "that see a cat"), ("the cat", "sleeps"),
         ("a cat", "sees the old dogs sleep"), ("the old dogs that", "the cat sees sleep"),
         ("the cruel cats", "sleep")]
RESPONSE_LIMIT = 1 << 14


@pytest.fixture(scope="module")
def server(model_repository):
    running = RunningServer(model_repository)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def with_http(model_repository):
    running = RunningServer(model_repository, http_port=0)
    yield running
    running.stop()


def test_the_openai_echo_path_gives_the_same_numbers(with_http):
    """lm-evaluation-harness over an OpenAI-compatible API: prompt = context +
    continuation (token ids), echo, logprobs 1, nothing generated; the continuation's
    log-prob is the sum of token_logprobs[ctxlen:], is_greedy compares each token with the
    top alternative there."""
    for context, continuation in PAIRS:
        context_ids, continuation_ids = ids_of(with_http, context), ids_of(with_http,
                                                                          continuation)
        (want,) = with_http.client.loglikelihood(MODEL, [(context_ids, continuation_ids)])
        reply = httpx.post(f"{with_http.http_url}/v1/completions", timeout=30, json={
            "model": MODEL, "prompt": context_ids + continuation_ids, "max_tokens": 0,
            "echo": True, "logprobs": 1}).json()
        logprobs = reply["choices"][0]["logprobs"]
        start = len(context_ids)
        tail = logprobs["token_logprobs"][start:]
        assert tail == pytest.approx(want.token_logprobs, abs=1e-6)
        assert sum(tail) == pytest.approx(want.logprob, abs=1e-5)
        greedy = all(max(top, key=top.get) == token for top, token in
                     zip(logprobs["top_logprobs"][start:], logprobs["tokens"][start:],
                         strict=True))
        assert greedy == want.is_greedy


@pytest.fixture(scope="module")
def uncached(model_repository):
    """No prefix cache, and a small max_message_bytes (for the response-size refusal)."""
    running = RunningServer(model_repository, prefix_cache_mib=0,
                            max_message_bytes=RESPONSE_LIMIT)
    yield running
    running.stop()


def ids_of(server, text: str) -> list[int]:
    (score,) = server.client.score(MODEL, [text], add_eos=False)
    return [t.id for t in score.tokens]


def brute_force(server, context, continuation) -> list[float]:
    """The continuation's log-probs, from Score of the whole text without a closing <eos>
    (for this word-level model, tokenizing apart and joining with a space agree)."""
    if isinstance(continuation, str):
        joined, count = f"{context or ''} {continuation}".strip(), len(continuation.split())
    else:
        joined, count = [*(context or []), *continuation], len(continuation)
    (score,) = server.client.score(MODEL, [joined], add_eos=False)
    return [t.logprob for t in score.tokens][-count:]


def greedy_by_session(server, context, continuation_ids: list[int]) -> bool:
    """Whether each continuation token is a session's most likely next token there."""
    client = server.client
    session = client.create_session(MODEL, context or None, top_k=1)
    step, greedy = session, True
    try:
        for token in continuation_ids:
            greedy &= step.next_tokens[0].id == token
            step = client.append(session.session_id, [token], top_k=1)
    finally:
        client.close_session(session.session_id)
    return greedy


def test_the_numbers_are_scores_of_the_joined_text_and_greedy_is_the_argmax(server):
    as_ids = [(ids_of(server, c), ids_of(server, x)) for c, x in PAIRS]
    for pairs in (PAIRS, as_ids):
        results = server.client.loglikelihood(MODEL, pairs)
        assert len(results) == len(pairs)
        for (context, continuation), result in zip(pairs, results, strict=True):
            expected = brute_force(server, context, continuation)
            assert result.token_count == len(expected)
            assert result.token_logprobs == pytest.approx(expected, abs=1e-5)
            assert result.logprob == pytest.approx(sum(expected), abs=1e-5)
            assert result.context_token_count == len(ids_of(server, context)
                                                     if isinstance(context, str) else context)
            continuation_ids = (ids_of(server, continuation) if isinstance(continuation, str)
                                else continuation)
            assert result.is_greedy == greedy_by_session(server, context, continuation_ids)


def test_a_greedy_completion_is_greedy_and_one_other_last_token_is_not(server):
    client = server.client
    eos = ids_of(server, "<eos>")[0]
    for context in ("the old dogs that", "a cat", ""):
        events = list(client.complete(MODEL, context, temperature=0, max_tokens=4))
        greedy = [e.token.id for e in events if e.token is not None and e.token.id != eos]
        assert greedy, "the greedy completion ended at once"
        other = next(i for i in ids_of(server, "the cat dogs") if i != greedy[-1])
        context_ids = ids_of(server, context) if context else []
        wrong = [*greedy[:-1], other]
        took, missed = client.loglikelihood(MODEL, [(context_ids, greedy), (context_ids, wrong)])
        assert took.is_greedy and not missed.is_greedy
        assert took.logprob > missed.logprob
        assert greedy_by_session(server, context_ids, greedy)


def test_no_context_is_the_start_of_a_sentence(server):
    continuation = "the old dogs sleep"
    (scored,) = server.client.score(MODEL, [continuation], add_eos=False)
    expected = [t.logprob for t in scored.tokens]
    for context in (None, "", []):
        (result,) = server.client.loglikelihood(MODEL, [(context, continuation)])
        assert result.context_token_count == 0 and result.token_count == 4
        assert result.token_logprobs == pytest.approx(expected, abs=1e-5)
        assert result.logprob == pytest.approx(scored.total_logprob, abs=1e-5)


def test_continuations_sharing_a_context_read_it_once_and_change_no_number(server,
                                                                          uncached):
    # a context no other test reads, long enough that reading it four times would show
    context = " ".join(["the old dogs that the cat sees"] * 4) + " a"
    choices = ["cat sleeps", "old dogs sleep", "cat", "dogs that see the cat sleep"]
    pairs = [(context, choice) for choice in choices]
    context_tokens = len(context.split())
    executed = server.metric("recur_executed_tokens_total", model=f"{MODEL}/1")
    together = server.client.loglikelihood(MODEL, pairs)
    executed = server.metric("recur_executed_tokens_total", model=f"{MODEL}/1") - executed
    assert executed < 2 * context_tokens  # 4 x the context, were it read for each pair
    alone = [server.client.loglikelihood(MODEL, [pair])[0] for pair in pairs]
    without_cache = uncached.client.loglikelihood(MODEL, pairs)
    for shared, *others in zip(together, alone, without_cache, strict=True):
        for other in others:
            assert shared.logprob == pytest.approx(other.logprob, abs=1e-6)
            assert shared.token_logprobs == pytest.approx(other.token_logprobs, abs=1e-6)
            assert (shared.token_count, shared.is_greedy, shared.context_token_count) == (
                other.token_count, other.is_greedy, other.context_token_count)


def test_rolling_is_score_without_the_closing_eos(server):
    documents = ["the old dogs that see a cat sleep", "zebra unknownword the",
                 ids_of(server, "the cat sees the old dogs"), "a"]
    rolling = server.client.loglikelihood_rolling(MODEL, documents)
    scores = server.client.score(MODEL, documents, add_eos=False)
    for result, score in zip(rolling, scores, strict=True):
        assert result.logprob == pytest.approx(score.total_logprob, abs=1e-5)
        assert (result.token_count, result.unknown_count) == (score.token_count,
                                                              score.unknown_count)
    assert rolling[1].unknown_count == 2


def text(value: str) -> pb.Input:
    return pb.Input(text=value)


def ids(*values: int) -> pb.Input:
    return pb.Input(token_ids=pb.TokenIds(ids=list(values)))


def likelihood_request(*pairs: pb.LogLikelihoodPair, model: str = MODEL
                       ) -> pb.LogLikelihoodRequest:
    return pb.LogLikelihoodRequest(model=pb.ModelRef(name=model), pairs=list(pairs))


GOOD = pb.LogLikelihoodPair(context=text("the cat"), continuation=text("sleeps"))
BAD_REQUESTS = [
    ("no pairs", likelihood_request(), grpc.StatusCode.INVALID_ARGUMENT, "pairs:"),
    ("no continuation", likelihood_request(GOOD, pb.LogLikelihoodPair(context=text("a"))),
     grpc.StatusCode.INVALID_ARGUMENT, "pairs[1].continuation:"),
    ("empty text", likelihood_request(pb.LogLikelihoodPair(continuation=text(""))),
     grpc.StatusCode.INVALID_ARGUMENT, "pairs[0].continuation:"),
    ("empty ids", likelihood_request(GOOD, pb.LogLikelihoodPair(continuation=ids())),
     grpc.StatusCode.INVALID_ARGUMENT, "pairs[1].continuation:"),
    ("id out of range", likelihood_request(
        GOOD, pb.LogLikelihoodPair(context=text("a"), continuation=ids(3, 4, 5, 10 ** 6))),
     grpc.StatusCode.INVALID_ARGUMENT, "pairs[1].continuation.token_ids.ids[3]:"),
    ("context id out of range", likelihood_request(
        pb.LogLikelihoodPair(context=ids(-1), continuation=text("a"))),
     grpc.StatusCode.INVALID_ARGUMENT, "pairs[0].context.token_ids.ids[0]:"),
    ("unknown model", likelihood_request(GOOD, model="nope"), grpc.StatusCode.NOT_FOUND,
     "model.name:"),
    ("no model", likelihood_request(GOOD, model=""), grpc.StatusCode.INVALID_ARGUMENT,
     "model.name:"),
    ("a tagger", likelihood_request(GOOD, model="tagger-uni"),
     grpc.StatusCode.INVALID_ARGUMENT, "model.name:"),
]


@pytest.mark.parametrize(("request_", "code", "names"), [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_pairs_are_refused_naming_the_field(server, request_, code, names):
    error = _error(server.client.language_model.LogLikelihood, request_)
    assert error.code() == code and names in error.details(), error.details()


def test_bad_documents_are_refused_naming_the_field(server):
    stub = server.client.language_model
    for inputs, model, code, names in [
            ([], MODEL, grpc.StatusCode.INVALID_ARGUMENT, "inputs:"),
            ([text("a cat"), ids(3, 4, 10 ** 6)], MODEL, grpc.StatusCode.INVALID_ARGUMENT,
             "inputs[1].token_ids.ids[2]:"),
            ([text("a cat"), pb.Input()], MODEL, grpc.StatusCode.INVALID_ARGUMENT,
             "inputs[1]:"),
            ([text("a cat")], "nope", grpc.StatusCode.NOT_FOUND, "model.name:"),
            ([text("a cat")], "tagger-uni", grpc.StatusCode.INVALID_ARGUMENT, "model.name:")]:
        request = pb.LogLikelihoodRollingRequest(model=pb.ModelRef(name=model), inputs=inputs)
        error = _error(stub.LogLikelihoodRolling, request)
        assert error.code() == code and names in error.details(), error.details()


def test_an_answer_over_max_message_bytes_is_refused_naming_the_limit(uncached):
    # small ids cost a byte each in the request and 4 (a float) in the answer
    ids_ = [3, 4, 5, 6] * 250
    request = likelihood_request(*[pb.LogLikelihoodPair(continuation=ids(*ids_))] * 5)
    assert request.ByteSize() < RESPONSE_LIMIT // 2
    ran = uncached.metric("recur_executed_tokens_total", model=f"{MODEL}/1")
    error = _error(uncached.client.language_model.LogLikelihood, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pairs:" in error.details() and "max_message_bytes" in error.details()
    # refused before anything ran
    assert uncached.metric("recur_executed_tokens_total", model=f"{MODEL}/1") == ran
    (fits,) = uncached.client.loglikelihood(MODEL, [(None, ids_)])
    assert fits.token_count == len(ids_)


def _error(method, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        method(request, timeout=30)
    return caught.value
