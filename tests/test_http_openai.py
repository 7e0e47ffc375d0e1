"""The OpenAI-compatible API on the HTTP port, driven by the real `openai` package (and
httpx or a raw socket for what the package hides: headers, status lines, odd bodies),
against real servers on 127.0.0.1: completions (streamed or not, n, stop, logprobs, echo,
seed) equal to recur.v1's, sessions equal to recur.v1's, errors in OpenAI's JSON, TLS,
tokens, limits, the drain and the metrics."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import socket
import ssl
import threading
import time
from collections import defaultdict

import httpx
import openai
import pytest
from serving_helpers import RunningServer, running
from test_security import _certificate, _write

import serving.api.http.app
import serving.engine.errors
from serving.api.openai.completions import _all_or_none
from serving.client import RecurClient, connect

TOKEN, OTHER_TOKEN = "s3cret-token-0123456789", "another-token-abcdefghij"


@pytest.fixture(scope="module")
def server(model_repository, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text("k" * 32 + "\n")
    running = RunningServer(model_repository, http_port=0, state_token_keys=str(keys))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(api_key="unused", base_url=server.http_url + "/v1",
                       max_retries=0) as package_client:
        yield package_client


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http_url, timeout=60) as raw:
        yield raw


def complete(client: openai.OpenAI, **options):
    return client.completions.create(model="demo-lm", **options)


def eventually(read, expected, timeout: float = 5.0):
    """A metric is recorded as its request's answer ends: the client may read it first."""
    deadline = time.monotonic() + timeout
    while (value := read()) != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


# -- the model list -----------------------------------------------------------------------

def test_the_model_list_holds_the_language_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["demo-lm", "endless"]
    assert all(m.object == "model" and m.owned_by == "recur" for m in models.data)
    assert models.data[0].created > 1_600_000_000  # its exported_at
    assert client.models.retrieve("demo-lm").id == "demo-lm"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("tagger-uni")  # served, but it completes nothing


# -- completions --------------------------------------------------------------------------

def test_a_completion_has_openai_s_shape(client):
    out = complete(client, prompt="the cat", max_tokens=5, n=3, seed=7)
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert out.model == "demo-lm" and out.system_fingerprint == "demo-lm/1"
    assert [c.index for c in out.choices] == [0, 1, 2]
    generated = 0
    for choice in out.choices:
        words = choice.text.split()
        generated += len(words) + (choice.finish_reason == "stop")  # and its <eos>, drawn
        assert choice.logprobs is None
        assert (choice.finish_reason, len(words)) in (("length", 5), *(
            ("stop", k) for k in range(5)))
        assert choice.text.startswith(" ") or not choice.text  # it continues the prompt
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (2, generated)
    assert out.usage.total_tokens == 2 + generated


def test_the_same_seed_samples_recur_v1_s_tokens(server, client):
    options = dict(max_tokens=8, n=2, seed=11, temperature=0.8, top_p=0.9)
    out = complete(client, prompt="the cat", logprobs=0, extra_body={"top_k": 20}, **options)
    tokens, texts, ends = defaultdict(list), {}, {}
    for event in server.client.complete("demo-lm", "the cat", top_k=20, **options):
        if event.token is not None:
            tokens[event.index].append((event.token.text, event.token.logprob))
        else:
            texts[event.index], ends[event.index] = event.text, event.finish_reason
    for choice in out.choices:
        drawn = tokens[choice.index]
        eos = ["<eos>"] if ends[choice.index] == "eos" else []  # drawn, and listed here
        assert choice.logprobs.tokens == [" " + t for t, _ in drawn] + eos
        assert choice.logprobs.token_logprobs[:len(drawn)] == pytest.approx(
            [lp for _, lp in drawn], abs=1e-6)
        assert choice.text == (" " + texts[choice.index] if texts[choice.index] else "")


def test_streamed_chunks_add_up_to_the_completion(client):
    options = dict(prompt=["the cat", "a dog"], max_tokens=8, n=2, seed=3, logprobs=2,
                   stop=["the", "in"])
    whole = complete(client, **options)
    assert len(whole.choices) == 4
    assert any(c.finish_reason == "stop" for c in whole.choices)
    for choice in whole.choices:
        assert "the" not in choice.text and "in" not in choice.text
    text, logprobs, finish = defaultdict(str), defaultdict(lambda: defaultdict(list)), {}
    usage = None
    for chunk in complete(client, stream=True, stream_options={"include_usage": True},
                          **options):
        assert chunk.object == "text_completion" and chunk.id.startswith("cmpl-")
        if not chunk.choices:
            usage = chunk.usage
        for choice in chunk.choices:
            text[choice.index] += choice.text
            if choice.logprobs is not None:
                for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    logprobs[choice.index][name] += getattr(choice.logprobs, name)
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    for choice in whole.choices:
        assert text[choice.index] == choice.text
        assert finish[choice.index] == choice.finish_reason
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert logprobs[choice.index][name] == getattr(choice.logprobs, name)
    assert usage == whole.usage


def test_a_streamed_echo_is_each_sample_s_own(client):
    options = dict(prompt=["the cat sat", "a dog"], max_tokens=3, n=3, seed=2, echo=True,
                   logprobs=2)
    whole = complete(client, **options)
    text, tokens = defaultdict(str), defaultdict(list)
    for chunk in complete(client, stream=True, **options):
        for choice in chunk.choices:
            text[choice.index] += choice.text
            tokens[choice.index] += choice.logprobs.tokens
    assert [text[i] for i in range(6)] == [c.text for c in whole.choices]
    assert [tokens[i] for i in range(6)] == [c.logprobs.tokens for c in whole.choices]
    assert all(whole.choices[i].text.startswith("the cat sat") for i in range(3))


def _streamed(client, **options) -> tuple[str, list[str], str]:
    text, tokens, finish = "", [], None
    for chunk in complete(client, stream=True, **options):
        for choice in chunk.choices:
            text += choice.text
            tokens += choice.logprobs.tokens if choice.logprobs else []
            finish = choice.finish_reason or finish
    return text, tokens, finish


def test_a_prompt_cancelled_from_inside_fails_the_request_and_stops_the_others():
    """A prompt's step cancelled as the scheduler closes: the request fails as a whole
    (unavailable, not a CancelledError out of the handler), the other prompts stopped."""
    others: list[asyncio.Task] = []

    async def cancelled_from_inside() -> None:
        inner = asyncio.get_running_loop().create_future()
        inner.cancel()
        await inner

    async def endless() -> None:
        others.append(asyncio.current_task())
        await asyncio.sleep(3600)

    async def request() -> None:
        with pytest.raises(serving.engine.errors.Unavailable):
            await asyncio.wait_for(_all_or_none([endless(), cancelled_from_inside()]), 5)
        await asyncio.sleep(0)
        assert others and others[0].cancelled()

    asyncio.run(request())


@pytest.mark.parametrize("reads", [True, False])
def test_a_client_that_leaves_a_stream_frees_its_completions_at_once(server, reads):
    """A client leaves a stream, after it stopped reading (the server's writes block) or
    before its answer began: its completions are stopped then, not whenever the garbage
    collector finalizes the stream."""
    model = server.server.engine.model("demo-lm")
    prompt = "the cat " * (1 if reads else 2000)  # long: the client is gone before the answer
    body = json.dumps({"model": "demo-lm", "prompt": [prompt, "a dog"], "n": 16,
                       "max_tokens": 1024, "logprobs": 5, "stream": True}).encode()
    head = ("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    gc.disable()  # what a cycle holds stays held: the test sees what the server frees
    try:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
            sock.connect(("127.0.0.1", server.ports.http))
            sock.sendall(head + body)
            if reads:
                assert sock.recv(4096).startswith(b"HTTP/1.1 200")
                assert eventually(lambda: model.scheduler.stats.pending > 0, True)
                time.sleep(1.0)  # the server's buffers fill; its writes wait for the client
        time.sleep(0.5)
        assert eventually(lambda: (model.scheduler.stats.pending, model.scheduler.admitted),
                          (0, 0)) == (0, 0)
    finally:
        gc.enable()


def test_a_stop_string_that_begins_inside_a_sent_token_takes_nothing_back(client):
    """The engine cuts the text where a stop string begins, perhaps inside a token: the
    stream holds a token back while a stop string could still begin in it."""
    options = dict(prompt="the cat", max_tokens=8, temperature=0, logprobs=0)
    full = complete(client, **options).choices[0]
    tokens = full.logprobs.tokens  # each after its space: " cat"
    assert len(tokens) >= 4 and len(tokens[1]) >= 3, tokens
    stop = f"{tokens[1][-2:]} {tokens[2][1:2]}"  # from inside the second token to the third
    cut = full.text.find(stop)
    stopped = complete(client, stop=stop, **options).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == full.text[:cut]
    assert stopped.logprobs.tokens == tokens[:1]  # the second token is cut: not listed
    assert _streamed(client, stop=stop, **options) == (stopped.text, tokens[:1], "stop")


def test_logprobs_give_each_token_its_alternatives_and_offset(client):
    out = complete(client, prompt="the cat", max_tokens=6, logprobs=3, seed=5, n=4)
    assert {c.finish_reason for c in out.choices} == {"stop", "length"}
    assert sum(len(c.logprobs.tokens) for c in out.choices) == out.usage.completion_tokens
    for choice in out.choices:
        lp = choice.logprobs
        in_text = lp.tokens[:-1] if choice.finish_reason == "stop" else lp.tokens
        assert "".join(in_text) == choice.text  # as OpenAI's tokens, spaces and all
        if choice.finish_reason == "stop":  # the <eos> drawn: listed, not in the text
            assert lp.tokens[-1] == "<eos>" and lp.text_offset[-1] == len(choice.text)
        for token, offset in zip(in_text, lp.text_offset):
            assert choice.text[offset:offset + len(token)] == token
        for token, top, value in zip(lp.tokens, lp.top_logprobs, lp.token_logprobs,
                                     strict=True):
            assert 3 <= len(top) <= 4 and top[token] == value  # the 3 likeliest, and itself
            assert all(t.startswith(" ") or t == "<eos>" for t in top)  # spelled as tokens
            ranked = list(top.values())[:3]
            assert ranked == sorted(ranked, reverse=True) and ranked[0] >= value


def test_greedy_tokens_are_the_likeliest(client):
    out = complete(client, prompt="a dog", max_tokens=5, logprobs=1, temperature=0)
    lp = out.choices[0].logprobs
    assert all(value == max(top.values())
               for value, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True))


def test_echo_log_probs_are_recur_v1_s_scores(server, client):
    """What lm-evaluation-harness's local-completions asks for a log-likelihood."""
    texts = ["the cat sat on the mat", "a dog runs"]
    scores = server.client.score("demo-lm", texts, add_eos=False)
    for logprobs in (0, 1):
        out = complete(client, prompt=texts, max_tokens=0, echo=True, logprobs=logprobs)
        for choice, text, score in zip(out.choices, texts, scores, strict=True):
            assert choice.text == text and choice.finish_reason == "length"
            assert choice.logprobs.tokens == [(" " if i else "") + t.text
                                              for i, t in enumerate(score.tokens)]
            assert "".join(choice.logprobs.tokens) == text
            assert isinstance(choice.logprobs.token_logprobs[0], float)  # never null here
            assert all(abs(a - t.logprob) <= 1e-5 for a, t in zip(
                choice.logprobs.token_logprobs, score.tokens, strict=True))
        assert out.usage.completion_tokens == 0
        assert out.usage.prompt_tokens == sum(len(s.tokens) for s in scores)


def test_echo_then_a_token_as_harnesses_ask(server, client):
    out = complete(client, prompt="the cat sat", max_tokens=1, echo=True, logprobs=1,
                   temperature=0)
    choice = out.choices[0]
    score = server.client.score("demo-lm", ["the cat sat"], add_eos=False)[0]
    assert choice.logprobs.tokens[:3] == ["the", " cat", " sat"]
    assert len(choice.logprobs.tokens) == 3 + out.usage.completion_tokens
    assert choice.logprobs.token_logprobs[:3] == pytest.approx(
        [t.logprob for t in score.tokens], abs=1e-5)
    assert choice.text.startswith("the cat sat")
    in_text = [t for t in choice.logprobs.tokens if t != "<eos>"]  # a drawn <eos> is not
    assert "".join(in_text) == choice.text
    for token, offset in zip(in_text, choice.logprobs.text_offset):
        assert choice.text[offset:offset + len(token)] == token


@pytest.mark.parametrize("context, continuation", [
    ("the cat sees the", " dog"), ("alice hit", " bob"),
    ("the young teacher", " watches these dark farmers")])
def test_lm_eval_harness_loglikelihoods_are_recur_v1_s_scores(server, http, context,
                                                              continuation):
    """lm-evaluation-harness's local-completions: prompt = context + continuation, one
    greedy token, echo; the continuation's log-prob is sum(token_logprobs[ctxlen:-1]), the
    last entry being the drawn token's, even when it is the <eos> that ends the sample
    (these contexts + continuations end a sentence: the greedy token is <eos>)."""
    out = http.post("/v1/completions", json={
        "model": "demo-lm", "prompt": context + continuation, "max_tokens": 1,
        "echo": True, "logprobs": 1, "temperature": 0, "seed": 1234}).json()
    choice, lp = out["choices"][0], out["choices"][0]["logprobs"]
    assert choice["finish_reason"] == "stop" and lp["tokens"][-1] == "<eos>"
    assert choice["text"] == context + continuation and out["usage"]["completion_tokens"] == 1
    ctxlen = len(context.split())
    scored = server.client.score("demo-lm", [context + continuation], add_eos=False)[0]
    assert lp["token_logprobs"][ctxlen:-1] == pytest.approx(
        [t.logprob for t in scored.tokens[ctxlen:]], abs=1e-5)
    with_eos = server.client.score("demo-lm", [context + continuation], add_eos=True)[0]
    assert lp["token_logprobs"][-1] == pytest.approx(with_eos.tokens[-1].logprob, abs=1e-5)
    top = lp["top_logprobs"][-1]  # its is_greedy: the likeliest key is the token
    assert max(top, key=top.get) == "<eos>"


def test_every_prompt_form_and_the_choice_indices(server, client):
    ids = [t.id for t in server.client.score("demo-lm", ["the cat"], add_eos=False)[0].tokens]
    options = dict(max_tokens=4, n=2, seed=9)
    by_text = [c.text for c in complete(client, prompt="the cat", **options).choices]
    assert [c.text for c in complete(client, prompt=ids, **options).choices] == by_text
    several = complete(client, prompt=[ids, ids, [ids[0]]], **options)
    assert [c.index for c in several.choices] == list(range(6))
    assert [c.text for c in several.choices[:4]] == by_text * 2  # index = prompt * n + sample
    assert several.usage.prompt_tokens == 5
    strings = complete(client, prompt=["the cat", "the cat"], **options)
    assert [c.text for c in strings.choices] == by_text * 2
    new_text = complete(client, prompt="", max_tokens=3, seed=1).choices[0]
    assert not new_text.text.startswith(" ")  # nothing to continue


def test_a_body_is_read_as_json_whatever_its_content_type(http):
    body = json.dumps({"model": "demo-lm", "prompt": "the", "max_tokens": 2})
    response = http.post("/v1/completions", content=body,
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200 and len(response.json()["choices"]) == 1


# -- errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, param", [
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"n": 0}, "n"),
    ({"stream": "yes"}, "stream"),
    ({"echo": 1}, "echo"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 0, "echo": True, "temperature": -5}, "temperature"),  # echo alone: the
    ({"max_tokens": 0, "echo": True, "top_p": 2}, "top_p"),  # settings are checked anyway
    ({"max_tokens": 0, "echo": True, "stop": [""]}, "stop[0]"),
    ({"max_tokens": 0, "echo": True, "stop_token_ids": [10**9]}, "stop_token_ids[0]"),
    ({"max_tokens": 100_000}, "max_tokens"),
    ({"logprobs": 1000}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1, 2], [3, 10**9]]}, "prompt[1][1]"),
    ({"prompt": "x " * 30_000}, "prompt"),
    ({"stop": [1]}, "stop"),
    ({"stop": [""]}, "stop[0]"),
    ({"stop_token_ids": [10**9]}, "stop_token_ids[0]"),
    ({"seed": 2**64}, "seed"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"best_of": 3}, "best_of"),
    ({"suffix": "the end"}, "suffix"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"model": 5}, "model"),
])
def test_a_bad_request_is_a_400_naming_the_parameter(http, fields, param):
    response = http.post("/v1/completions", json={"model": "demo-lm", "prompt": "the",
                                                  **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert param in error["message"]


@pytest.mark.parametrize("body, says", [(b"{nope", "not valid JSON"),
                                        (b"[1, 2]", "JSON object"), (b"", "model")])
def test_a_body_that_is_no_request_is_a_400(http, body, says):
    response = http.post("/v1/completions", content=body)
    assert response.status_code == 400 and says in response.json()["error"]["message"]


def test_the_openai_package_sees_openai_s_errors(client):
    with pytest.raises(openai.BadRequestError) as caught:
        complete(client, prompt="the", max_tokens=-3)
    assert caught.value.param == "max_tokens" and caught.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="no-such-model", prompt="the")
    assert caught.value.code == "model_not_found" and "no-such-model" in caught.value.message
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="demo-lm",
                                       messages=[{"role": "user", "content": "hi"}])
    assert "no chat format" in caught.value.message and "/v1/completions" in caught.value.message


def test_paths_without_a_route_answer_in_their_prefix_s_format(http):
    openai_shaped = http.get("/v1/no-such-thing")
    assert openai_shaped.status_code == 404
    assert openai_shaped.json()["error"]["type"] == "invalid_request_error"
    plain = http.get("/no-such-thing")
    assert plain.status_code == 404 and isinstance(plain.json()["error"], str)
    wrong_method = http.get("/v1/completions")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


# -- sessions -----------------------------------------------------------------------------

def _tokens(answer: list[dict]) -> list[tuple[int, str]]:
    return [(t["id"], t["text"]) for t in answer]


def _same_session_step(over_http: dict, over_grpc) -> None:
    assert over_http["object"] == "session" and over_http["model"] == "demo-lm"
    assert over_http["position"] == over_grpc.position
    assert _tokens(over_http["tokens"]) == [(t.id, t.text) for t in over_grpc.tokens]
    assert [t["logprob"] for t in over_http["tokens"]] == pytest.approx(
        [t.logprob for t in over_grpc.tokens], abs=1e-6)
    assert _tokens(over_http["next_tokens"]) == [(t.id, t.text) for t in over_grpc.next_tokens]
    assert [t["logprob"] for t in over_http["next_tokens"]] == pytest.approx(
        [t.logprob for t in over_grpc.next_tokens], abs=1e-6)


def test_sessions_over_http_are_recur_v1_s_sessions(server, http):
    by_grpc = server.client.create_session("demo-lm", "the cat", top_k=3)
    created = http.post("/v1/sessions", json={"model": "demo-lm", "prefix": "the cat",
                                              "top_k": 3}).json()
    _same_session_step(created, by_grpc)
    by_grpc = server.client.append(by_grpc.session_id, "likes the", top_k=2)
    appended = http.post(f"/v1/sessions/{created['id']}/append",
                         json={"input": "likes the", "top_k": 2}).json()
    assert appended["id"] == created["id"]
    _same_session_step(appended, by_grpc)
    ids = [t["id"] for t in appended["tokens"]]
    by_ids = http.post(f"/v1/sessions/{created['id']}/append", json={"input": ids}).json()
    assert by_ids["position"] == 6 and _tokens(by_ids["tokens"]) == _tokens(appended["tokens"])
    # a fork from a state token (base64), as CreateSession with one
    token = base64.b64decode(appended["state_token"])
    assert token == bytes(token) and len(token) > 16
    forked = http.post("/v1/sessions", json={"state_token": appended["state_token"],
                                             "prefix": "the", "top_k": 2}).json()
    _same_session_step(forked, server.client.create_session("", "the", top_k=2,
                                                            state_token=by_grpc.state_token))
    assert forked["id"] != created["id"] and forked["position"] == 5
    closed = http.delete(f"/v1/sessions/{created['id']}")
    assert closed.json() == {"id": created["id"], "object": "session", "deleted": True}
    gone = http.post(f"/v1/sessions/{created['id']}/append", json={"input": "the"})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "session_closed"
    server.client.close_session(by_grpc.session_id)
    http.delete(f"/v1/sessions/{forked['id']}")


def test_sessions_of_taggers_and_classifiers_carry_their_results(http):
    tagged = http.post("/v1/sessions", json={"model": "tagger-uni", "prefix": "w1 w2"}).json()
    assert [t["token"] for t in tagged["tags"]] == ["w1", "w2"] and tagged["tokens"] == []
    classified = http.post("/v1/sessions", json={"model": "classifier-uni",
                                                 "prefix": "w1"}).json()
    assert len(classified["classes"]) == 3
    refused = http.post("/v1/sessions", json={"model": "tagger-bi", "prefix": "w1"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "model"
    for session in (tagged, classified):
        http.delete(f"/v1/sessions/{session['id']}")


@pytest.mark.parametrize("path, body, param", [
    ("/v1/sessions", {"model": "demo-lm", "prefix": 5}, "prefix"),
    ("/v1/sessions", {"prefix": "the"}, "model"),
    ("/v1/sessions", {"model": "demo-lm", "state_token": "!!not base64!!"}, "state_token"),
    ("/v1/sessions", {"model": "demo-lm", "top_k": -2}, "top_k"),
    ("/v1/sessions/nope/append", {"input": ["a"]}, "input"),
])
def test_a_bad_session_request_is_a_400_naming_the_field(http, path, body, param):
    response = http.post(path, json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_an_unknown_session_is_a_404(http):
    response = http.post("/v1/sessions/no-such-session/append", json={"input": "the"})
    assert response.status_code == 404 and response.json()["error"]["code"] == \
        "session_not_found"


# -- metrics ------------------------------------------------------------------------------

def test_requests_are_counted_by_route_method_status_and_model(server, http):
    def count(**labels) -> float:
        return server.metric("recur_http_requests_total", **labels)

    ok = dict(route="/v1/completions", method="POST", status="200", model="demo-lm")
    bad = dict(ok, status="400")
    unmatched = dict(route="unmatched", method="GET", status="404", model="")
    typo = dict(route="/v1/completions", method="POST", status="404")
    session = dict(route="/v1/sessions/{session_id}/append", method="POST", status="404")
    timed = dict(route="/v1/completions", method="POST", model="demo-lm")
    before = {name: count(**labels) for name, labels in
              dict(ok=ok, bad=bad, unmatched=unmatched, typo=typo, session=session).items()}
    timed_before = server.metric("recur_http_request_duration_seconds_count", **timed)
    for _ in range(2):
        http.post("/v1/completions", json={"model": "demo-lm", "prompt": "the", "max_tokens": 2})
    http.post("/v1/completions", json={"model": "demo-lm", "prompt": "the", "max_tokens": 0})
    http.get("/v1/no-such-path")
    http.post("/v1/completions", json={"model": "no-such-model", "prompt": "the"})
    http.post("/v1/sessions/some-id/append", json={"input": "the"})
    assert eventually(lambda: count(**ok), before["ok"] + 2) == before["ok"] + 2
    assert eventually(lambda: count(**bad), before["bad"] + 1) == before["bad"] + 1
    assert count(**unmatched) == before["unmatched"] + 1  # the path itself is no label
    assert count(**typo, model="") == before["typo"] + 1  # nor is a model nobody serves
    assert count(**typo, model="no-such-model") == 0
    assert count(**session) == before["session"] + 1  # a template, not the id
    assert server.metric("recur_http_request_duration_seconds_count", **timed) == \
        timed_before + 3


# -- limits: a small queue, a small body limit, one session per client ---------------------

@pytest.fixture(scope="module")
def limited(model_repository):
    """Room for 8 sequences a model, each batch waiting 1.5 s to fill (a completion is
    slow, so the first one is surely running when the second comes), bodies of 64 KiB,
    one session a client."""
    running = RunningServer(model_repository, http_port=0, max_queue=8,
                            max_sequences_per_request=8, max_queue_delay_ms=1500,
                            max_message_bytes=64 << 10, max_sessions_per_client=1)
    yield running
    running.stop()


def test_a_full_queue_is_a_429_with_retry_after(limited):
    with httpx.Client(base_url=limited.http_url, timeout=60) as http:
        body = {"model": "endless", "prompt": "", "n": 8, "max_tokens": 3, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as first:
            assert first.status_code == 200
            lines = first.iter_lines()  # kept: a closed iterator closes the response
            next(lines)  # admitted: its first tokens are out
            refused = http.post("/v1/completions", json={**body, "stream": False})
            assert refused.status_code == 429, refused.text
            assert int(refused.headers["Retry-After"]) >= 1
            error = refused.json()["error"]
            assert error["code"] == "overloaded" and "max_queue=8" in error["message"]
            with openai.OpenAI(api_key="unused", base_url=limited.http_url + "/v1",
                               max_retries=0) as package_client, \
                    pytest.raises(openai.RateLimitError):
                package_client.completions.create(model="endless", prompt="", n=8)


def _raw_request(port: int, head: str, body: bytes = b"") -> tuple[int, dict, bytes]:
    """Sends a request as written; the status, headers and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer:
                head_part, _, rest = answer.partition(b"\r\n\r\n")
                headers = dict(line.split(": ", 1) for line in
                               head_part.decode().split("\r\n")[1:])
                if len(rest) >= int(headers.get("content-length", 0) or 0):
                    return int(head_part.split()[1]), headers, rest
    raise AssertionError(f"no whole answer: {answer[:200]!r}")


def test_a_body_over_the_limit_is_a_413_before_it_is_read(limited):
    declared = ("POST /v1/completions HTTP/1.1\nHost: x\nContent-Type: application/json\n"
                f"Content-Length: {100 << 10}\n\n")
    status, _, body = _raw_request(limited.ports.http, declared)  # no byte of it sent
    assert status == 413
    error = json.loads(body)["error"]
    assert "max_message_bytes = 65536" in error["message"] and error["type"] == \
        "invalid_request_error"
    chunk = b"x" * (16 << 10)
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5)) + b"0\r\n\r\n"
    status, headers, body = _raw_request(
        limited.ports.http, "POST /v1/completions HTTP/1.1\nHost: x\n"
        "Transfer-Encoding: chunked\n\n", chunked)
    assert status == 413 and headers.get("connection") == "close"
    assert "max_message_bytes = 65536" in json.loads(body)["error"]["message"]


def test_a_body_that_stops_arriving_is_a_408(limited, monkeypatch):
    monkeypatch.setattr(serving.api.http.app, "BODY_TIMEOUT_S", 0.3)
    status, headers, body = _raw_request(
        limited.ports.http, "POST /v1/completions HTTP/1.1\nHost: x\nContent-Length: 40\n\n",
        b'{"model": ')  # and no more
    assert status == 408 and headers.get("connection") == "close"
    assert "stopped arriving" in json.loads(body)["error"]["message"]


def test_a_body_dripped_slowly_is_a_408_at_its_deadline(limited, monkeypatch):
    """A byte now and then keeps each receive short of BODY_TIMEOUT_S: the whole body
    has a deadline too (here 0.5 s for its 200 bytes)."""
    monkeypatch.setattr(serving.api.http.app, "BODY_DEADLINE_S", 0.5)
    with socket.create_connection(("127.0.0.1", limited.ports.http), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 200\r\n"
                     b"\r\n")
        started, answer = time.monotonic(), b""
        sock.settimeout(0.1)
        while b"\r\n\r\n" not in answer and time.monotonic() - started < 5:
            with contextlib.suppress(OSError):
                sock.sendall(b" ")
            with contextlib.suppress(TimeoutError):
                answer += sock.recv(65536)
        took = time.monotonic() - started
        sock.settimeout(2)
        with contextlib.suppress(OSError):  # the body may follow the head: read to the close
            while chunk := sock.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert b"did not arrive within 0.5 s" in answer and 0.4 < took < 2, took


def test_a_streamed_echo_is_bounded_too(limited):
    """Streamed, the echoes (each prompt once per sample, with log-probs) are sent at
    once, before any token: they are bounded by max_message_bytes (64 KiB here; a smaller
    streamed echo: test_a_streamed_echo_is_each_sample_s_own)."""
    body = {"model": "demo-lm", "prompt": " ".join(["the cat"] * 50), "max_tokens": 1,
            "echo": True, "logprobs": 5, "n": 8, "stream": True}
    with httpx.Client(base_url=limited.http_url, timeout=60) as http:
        refused = http.post("/v1/completions", json=body)
        assert refused.status_code == 400, refused.text[:300]
        error = refused.json()["error"]
        assert error["param"] == "logprobs" and "an echo of up to" in error["message"]
        assert "max_message_bytes = 65536" in error["message"]


def test_an_over_long_request_head_is_refused(limited):
    status, _, _ = _raw_request(limited.ports.http, "GET /v1/models HTTP/1.1\nHost: x\n"
                                f"X-Padding: {'p' * (1 << 20)}\n\n")
    assert status == 400


def test_the_session_quota_counts_a_client_once_across_both_fronts(limited):
    held = limited.client.create_session("demo-lm")  # over gRPC, from 127.0.0.1
    try:
        with httpx.Client(base_url=limited.http_url, timeout=60) as http:
            refused = http.post("/v1/sessions", json={"model": "demo-lm"})
            assert refused.status_code == 429, refused.text
            assert "max_sessions_per_client=1" in refused.json()["error"]["message"]
            assert int(refused.headers["Retry-After"]) >= 1
    finally:
        limited.client.close_session(held.session_id)


# -- TLS and bearer tokens ----------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = tmp_path_factory.mktemp("pki")
    files = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    files["ca"], _ = _write(folder, "ca", ca_key, _certificate("ca", ca_key, ca_key, "ca",
                                                               ca=True))
    for leaf in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        files[leaf], files[f"{leaf}-key"] = _write(
            folder, leaf, key, _certificate(leaf, key, ca_key, "ca", ca=False))
    (folder / "tokens").write_text(f"{TOKEN}\n{OTHER_TOKEN}\n")
    files["tokens"] = str(folder / "tokens")
    return files


@pytest.fixture(scope="module")
def secure(model_repository, pki):
    running = RunningServer(model_repository, http_port=0, tls_cert=pki["server"],
                            tls_key=pki["server-key"], tls_client_ca=pki["ca"],
                            auth_tokens=pki["tokens"], max_sessions_per_client=2,
                            channel_factory=lambda target: connect(
                                target, pki["ca"], pki["client"], pki["client-key"], TOKEN))
    yield running
    running.stop()


def tls_context(pki, client_certificate: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki["ca"])
    if client_certificate:
        context.load_cert_chain(pki["client"], pki["client-key"])
    return context


def test_tls_with_a_client_certificate_and_a_token_is_served(secure, pki):
    with openai.DefaultHttpxClient(verify=tls_context(pki)) as transport, openai.OpenAI(
            api_key=TOKEN, base_url=secure.http_url + "/v1", http_client=transport,
            max_retries=0) as package_client:
        out = package_client.completions.create(model="demo-lm", prompt="the", max_tokens=2)
        assert len(out.choices) == 1


def test_plaintext_and_clients_without_a_certificate_are_refused(secure, pki):
    with httpx.Client(verify=tls_context(pki, client_certificate=False)) as http, \
            pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        http.get(secure.http_url + "/v1/models", headers={"Authorization": f"Bearer {TOKEN}"})
    plain = secure.http_url.replace("https://", "http://")
    with httpx.Client() as http, pytest.raises(httpx.HTTPError):
        http.get(plain + "/v1/models")


def test_a_missing_or_wrong_token_is_a_401(secure, pki):
    with httpx.Client(base_url=secure.http_url, verify=tls_context(pki)) as http:
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"},
                        {"Authorization": f"Basic {TOKEN}"}):
            refused = http.get("/v1/models", headers=headers)
            assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == \
                "Bearer"
            assert refused.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {OTHER_TOKEN}"}
                        ).status_code == 200
        elsewhere = http.get("/v2/models/demo-lm")
        assert elsewhere.status_code == 401 and isinstance(elsewhere.json()["error"], str)
        assert http.get("/v2/health/live").status_code == 200  # probes carry no token
        assert http.get("/v2/health/ready").status_code == 200
        for path in ("/v2/health/nothing", "/v2/health/live/", "/v2/health/%2e%2e/models"):
            assert http.get(path).status_code == 401, path  # only the probes are open
        for twice in ([("Authorization", f"Bearer {TOKEN}")] * 2,
                      [("Authorization", "Bearer junk"), ("Authorization", f"Bearer {TOKEN}")]):
            refused = http.get("/v1/models", headers=httpx.Headers(twice))
            assert refused.status_code == 400, refused.text  # which client would it be?
            assert "2 Authorization headers" in refused.json()["error"]["message"]
    with openai.DefaultHttpxClient(verify=tls_context(pki)) as transport, openai.OpenAI(
            api_key="wrong-token-0123456789", base_url=secure.http_url + "/v1",
            http_client=transport, max_retries=0) as package_client, \
            pytest.raises(openai.AuthenticationError):
        package_client.models.list()


def test_the_session_quota_counts_a_token_once_across_both_fronts(secure, pki):
    """max_sessions_per_client = 2: two sessions over gRPC with TOKEN, and the token's
    client is full over HTTP too, however its header spells the scheme and spaces."""
    held = [secure.client.create_session("demo-lm") for _ in range(2)]  # over gRPC
    try:
        with httpx.Client(base_url=secure.http_url, verify=tls_context(pki)) as http:
            for header in (f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER  {TOKEN}",
                           f"Bearer   {TOKEN}"):
                same = http.post("/v1/sessions", json={"model": "demo-lm"},
                                 headers={"Authorization": header})
                assert same.status_code == 429, (header, same.text)
                assert "max_sessions_per_client=2" in same.json()["error"]["message"]
            other = http.post("/v1/sessions", json={"model": "demo-lm"},
                              headers={"Authorization": f"Bearer {OTHER_TOKEN}"})
            assert other.status_code == 200
            http.delete(f"/v1/sessions/{other.json()['id']}",
                        headers={"Authorization": f"Bearer {OTHER_TOKEN}"})
    finally:
        for session in held:
            secure.client.close_session(session.session_id)


# -- the connection cap and the drain -----------------------------------------------------

def test_beyond_max_connections_requests_are_a_503(model_repository):
    with running(model_repository, http_port=0, http_max_connections=2) as server:
        idle = [socket.create_connection(("127.0.0.1", server.ports.http)) for _ in range(2)]
        try:
            time.sleep(0.2)  # accepted
            status, _, _ = _raw_request(server.ports.http, "GET /v1/models HTTP/1.1\n"
                                        "Host: x\n\n")
            assert status == 503
            idle.pop().close()
            time.sleep(0.2)
            status, _, _ = _raw_request(server.ports.http, "GET /v1/models HTTP/1.1\n"
                                        "Host: x\n\n")
            assert status == 200
        finally:
            for sock in idle:
                sock.close()


def test_the_drain_ends_open_streams_with_an_error_and_requests_with_a_503(model_repository):
    """Server.stop (what SIGTERM runs): no new connections, and at half the grace an open
    stream gets an error event (no [DONE]) and a request in flight a 503."""
    with running(model_repository, http_port=0, version_policy="specific:1",
                 max_completion_tokens=1_000_000, max_message_bytes=1 << 30) as server:
        endless = {"model": "endless", "prompt": "", "max_tokens": 1_000_000}
        answered: dict = {}

        def unary() -> None:
            with httpx.Client(base_url=server.http_url, timeout=60) as http:
                answered["response"] = http.post("/v1/completions", json=endless)

        in_flight = threading.Thread(target=unary)
        in_flight.start()
        with httpx.Client(base_url=server.http_url, timeout=60) as http, \
                http.stream("POST", "/v1/completions", json={**endless, "stream": True}) \
                as stream:
            lines = (line for line in stream.iter_lines() if line)
            assert json.loads(next(lines)[6:])["choices"][0]["text"]
            scheduler = server.server.engine.model("endless").scheduler
            deadline = time.monotonic() + 10
            while scheduler.admitted < 2 and time.monotonic() < deadline:
                time.sleep(0.01)  # the unary one is running too
            stopping = threading.Thread(target=server.call, args=(server.server.stop(2.0),))
            started = time.monotonic()
            stopping.start()
            rest = list(lines)
            told = time.monotonic() - started
        assert rest and "data: [DONE]" not in rest
        last = json.loads(rest[-1][6:])
        assert last["error"]["code"] == "unavailable" and "shutting down" in \
            last["error"]["message"]
        assert 0.7 < told < 1.8, told  # at half of the 2 s grace
        in_flight.join(10)
        response = answered["response"]
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        stopping.join(10)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", server.ports.http), timeout=2)


def test_a_grpc_client_and_an_http_client_share_the_engine(server, http):
    """One engine: a session opened over gRPC is found over HTTP."""
    held = RecurClient(server.target, channel=server.channel).create_session("demo-lm", "the")
    appended = http.post(f"/v1/sessions/{held.session_id}/append", json={"input": "cat"})
    assert appended.status_code == 200 and appended.json()["position"] == 2
    http.delete(f"/v1/sessions/{held.session_id}")
