"""Packed completion streams (CompleteRequest.pack_tokens, stream_interval_ms): several
tokens a message, the same samples as one message per token, the first token never held
back, and the client unpacking them into the same events."""

from __future__ import annotations

import time

import grpc
import pytest
from serving_helpers import RunningServer

from serving.api.recur_v1.convert import StreamPacker
from serving.engine.decoding import FinishEvent, TokenEvent
from serving.proto_gen.recur.v1 import recur_pb2 as pb

PROMPT = "the old dogs that"


@pytest.fixture(scope="module")
def server(model_repository):
    running = RunningServer(model_repository, max_completion_tokens=10_000,
                            version_policy="all")  # endless version 1 never draws <eos>
    yield running
    running.stop()


def request(model: str = "demo-lm", version: int = 0, **fields) -> pb.CompleteRequest:
    fields.setdefault("prompt", pb.Input(text=PROMPT))
    return pb.CompleteRequest(model=pb.ModelRef(name=model, version=version), **fields)


def samples_of(messages) -> dict[int, tuple[list[tuple[int, str, float]], int, str]]:
    """Per sample: its (id, text, log-prob) tokens in order, finish reason and text."""
    samples: dict[int, tuple[list, int, str]] = {}
    for message in messages:
        tokens, _, _ = samples.setdefault(message.index, ([], 0, ""))
        carried = [message.token] if message.HasField("token") else message.tokens
        tokens.extend((t.id, t.text, t.logprob) for t in carried)
        if message.finish_reason:
            samples[message.index] = (tokens, message.finish_reason, message.text)
    return samples


def by_sample(events) -> dict[int, list]:
    samples: dict[int, list] = {}
    for event in events:
        samples.setdefault(event.index, []).append(event)
    return samples


def test_packed_and_unpacked_streams_give_the_same_samples(server):
    stub = server.client.language_model
    common = dict(max_tokens=40, n=3, seed=11, temperature=0.9)
    unpacked = list(stub.Complete(request(**common)))
    assert all(m.HasField("token") != bool(m.finish_reason) and not m.tokens for m in unpacked)
    want = samples_of(unpacked)
    assert sorted(want) == [0, 1, 2] and len({tuple(s[0]) for s in want.values()}) == 3
    for packing in (dict(pack_tokens=True), dict(stream_interval_ms=30),
                    dict(pack_tokens=True, stream_interval_ms=5)):
        packed = list(stub.Complete(request(**common, **packing)))
        assert not any(m.HasField("token") for m in packed), packing
        assert samples_of(packed) == want, packing  # each sample's tokens in their order
        assert all(len(m.tokens) <= 256 for m in packed)
    # and the client's events are the same, one a token (interleaved otherwise across
    # the samples), however they came
    client_events = [by_sample(server.client.complete("demo-lm", PROMPT, **common, **packing))
                     for packing in ({}, dict(pack_tokens=True), dict(stream_interval_ms=30))]
    assert client_events[1] == client_events[0] == client_events[2]
    for index, (tokens, _, text) in want.items():
        *token_events, end = client_events[0][index]
        assert [(e.token.id, e.token.text, e.token.logprob) for e in token_events] == tokens
        assert end.token is None and end.text == text
    assert server.client.complete_text("demo-lm", PROMPT, **common) == [
        want[i][2] for i in range(3)]


def test_an_interval_gathers_tokens_but_never_holds_back_the_first(server):
    stub = server.client.language_model
    started = time.perf_counter()
    arrivals = []
    for message in stub.Complete(request("endless", 1, max_tokens=30, n=3, seed=5,
                                         stream_interval_ms=1000)):
        arrivals.append((time.perf_counter() - started, message))
    firsts: dict[int, tuple[float, pb.CompleteResponse]] = {}
    for at, message in arrivals:
        firsts.setdefault(message.index, (at, message))
    assert sorted(firsts) == [0, 1, 2]
    for at, message in firsts.values():
        assert len(message.tokens) == 1 and not message.finish_reason
        assert at < 0.5, f"the first token came after {at:.2f} s"  # not held for the 1 s
    # the rest, gathered for the interval, came with the closing messages, and as soon as
    # the samples ended: an interval never holds back a stream's end
    assert len(arrivals) < 3 * 30
    assert arrivals[-1][0] < 0.5, f"the end came after {arrivals[-1][0]:.2f} s"
    ends = [m for _, m in arrivals if m.finish_reason]
    assert len(ends) == 3 and any(len(m.tokens) > 1 for m in ends)
    assert all(len(tokens) == 30 for tokens, _, _ in samples_of(m for _, m in arrivals).values())


def test_an_interval_paces_each_sample_however_many_there_are(server):
    """With n = 16 samples of 100 tokens and a 1 s interval, each sample's messages are
    its first token, then what gathered until the stream ended or its buffer filled: a
    handful, not one per few tokens (a round is not cut at 256 events across samples)."""
    stub = server.client.language_model
    messages: dict[int, int] = {}
    for message in stub.Complete(request("endless", 1, max_tokens=100, n=16, seed=2,
                                         stream_interval_ms=1000)):
        messages[message.index] = messages.get(message.index, 0) + 1
    assert sorted(messages) == list(range(16))
    assert max(messages.values()) <= 4, messages


def test_a_round_that_holds_a_first_token_sends_it_alone(server):
    """However many of a sample's events one write takes (a reader behind from the start),
    its first token goes alone and its end goes with its last tokens."""
    model = server.server.engine.model("demo-lm", 0, "lm")
    packer = StreamPacker(model)
    tokens = [TokenEvent(i % 2, 10 + i, f"w{i}", -1.0) for i in range(6)]
    first = packer.messages([*tokens[:5], FinishEvent(0, "length", "w0 w2 w4")])
    assert [(m.index, [t.id for t in m.tokens], m.finish_reason) for m in first] == [
        (0, [10], 0), (0, [12, 14], pb.FINISH_REASON_LENGTH), (1, [11], 0), (1, [13], 0)]
    assert first[1].text == "w0 w2 w4" and first[1].model.name == "demo-lm"
    assert [[t.id for t in m.tokens] for m in packer.messages(tokens[5:])] == [[15]]


def read(target: str, message: pb.CompleteRequest, pause_s: float
         ) -> list[pb.CompleteResponse]:
    """Every message of a completion, read with a pause after each, through a channel with
    a small receive window: a slow reader's transport buffers little, so the server's
    writes wait on it (with gRPC's default window of 64 KiB and more, about 2000 small
    messages would be taken off the server while the reader sleeps)."""
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    with grpc.insecure_channel(target, options=options) as channel:
        complete = channel.unary_stream("/recur.v1.LanguageModel/Complete",
                                        request_serializer=pb.CompleteRequest.SerializeToString,
                                        response_deserializer=pb.CompleteResponse.FromString)
        messages = []
        for received in complete(message, timeout=60):
            messages.append(received)
            time.sleep(pause_s)
        return messages


def test_a_slow_reader_gets_several_tokens_a_message(server):
    tokens = 600
    common = dict(max_tokens=tokens, seed=2, temperature=1.0)
    packed = read(server.target, request("endless", 1, pack_tokens=True, **common), 0.02)
    counts = [len(m.tokens) for m in packed]
    assert sum(counts) == tokens
    assert counts[0] == 1  # the first token alone
    # what came during each 20 ms pause, up to the 64 events a sample the engine holds
    # for a reader that is behind
    assert max(counts) >= 32 and len(packed) < tokens / 4, \
        f"{len(packed)} messages for {tokens} tokens, at most {max(counts)} in one"
    # without packing: one message a token, and the same sample
    unpacked = read(server.target, request("endless", 1, **common), 0)
    assert len(unpacked) == tokens + 1
    assert samples_of(unpacked) == samples_of(packed)


@pytest.mark.parametrize("interval", [-1, 1001, 2**31 - 1])
def test_an_interval_out_of_range_is_refused_naming_the_field(server, interval):
    with pytest.raises(grpc.RpcError) as refused:
        list(server.client.language_model.Complete(request(stream_interval_ms=interval)))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stream_interval_ms" in refused.value.details()
    assert str(interval) in refused.value.details()
