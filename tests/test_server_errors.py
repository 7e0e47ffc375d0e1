"""Bad input, limits, overload and lost sessions: each is a clear status naming the field or
limit, never a crash or a bare INTERNAL/UNKNOWN."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from serving_helpers import RunningServer

from serving.api.recur_v1.convert import response_bytes
from serving.engine.inputs import Encoded
from serving.engine.sessions import SESSION_OVERHEAD_BYTES
from serving.proto_gen.recur.v1 import recur_pb2 as pb

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def server(model_repository):
    running = RunningServer(model_repository, max_sequences_per_request=8, max_queue=64,
                            max_tokens_per_sequence=50, max_completion_tokens=20,
                            default_completion_tokens=10,
                            max_samples=4, max_message_bytes=64 * 1024)
    yield running
    running.stop()


def call(method, request):
    with pytest.raises(grpc.RpcError) as caught:
        result = method(request, timeout=30)
        if hasattr(result, "__iter__") and not hasattr(result, "DESCRIPTOR"):
            list(result)
    return caught.value


def details(error) -> list:
    status = rpc_status.from_call(error)
    found = []
    for packed in status.details if status else []:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest,
                     error_details_pb2.RetryInfo, error_details_pb2.QuotaFailure):
            if packed.Is(kind.DESCRIPTOR):
                message = kind()
                packed.Unpack(message)
                found.append(message)
    return found


def lm(**kwargs) -> pb.ModelRef:
    return pb.ModelRef(name="demo-lm", **kwargs)


TEXT = pb.Input(text="the dog")
BAD_REQUESTS = [
    ("Score", pb.ScoreRequest(model=lm()), INVALID, "inputs"),
    ("Score", pb.ScoreRequest(model=lm(), inputs=[pb.Input()]), INVALID, "inputs[0]"),
    ("Score", pb.ScoreRequest(model=lm(), inputs=[pb.Input(text="")], add_eos=False), INVALID,
     "inputs[0]"),
    ("Score", pb.ScoreRequest(model=lm(), inputs=[TEXT, pb.Input(token_ids=pb.TokenIds(
        ids=[1, 99999]))]), INVALID, "inputs[1].token_ids.ids[1]"),
    ("Score", pb.ScoreRequest(model=lm(), inputs=[pb.Input(token_ids=pb.TokenIds(ids=[-1]))]),
     INVALID, "inputs[0].token_ids.ids[0]"),
    ("Score", pb.ScoreRequest(inputs=[TEXT]), INVALID, "model.name"),
    ("Score", pb.ScoreRequest(model=pb.ModelRef(name="nope"), inputs=[TEXT]), NOT_FOUND,
     "model.name"),
    ("Score", pb.ScoreRequest(model=lm(version=7), inputs=[TEXT]), NOT_FOUND, "model.version"),
    ("Score", pb.ScoreRequest(model=lm(version=-1), inputs=[TEXT]), INVALID, "model.version"),
    ("Score", pb.ScoreRequest(model=pb.ModelRef(name="tagger-bi"), inputs=[TEXT]), INVALID,
     "a tagger, not a language model"),
    ("Score", pb.ScoreRequest(model=lm(), inputs=[TEXT] * 9), INVALID,
     "max_sequences_per_request"),
    ("Score", pb.ScoreRequest(model=lm(), inputs=[pb.Input(text="a " * 51)]), INVALID,
     "max_tokens_per_sequence"),
    ("Complete", pb.CompleteRequest(model=lm(), temperature=-0.5), INVALID, "temperature"),
    ("Complete", pb.CompleteRequest(model=lm(), top_p=0.0), INVALID, "top_p"),
    ("Complete", pb.CompleteRequest(model=lm(), top_p=1.5), INVALID, "top_p"),
    ("Complete", pb.CompleteRequest(model=lm(), top_k=-1), INVALID, "top_k"),
    ("Complete", pb.CompleteRequest(model=lm(), max_tokens=-3), INVALID, "max_tokens"),
    ("Complete", pb.CompleteRequest(model=lm(), max_tokens=21), INVALID,
     "max_completion_tokens"),
    ("Complete", pb.CompleteRequest(model=lm(), n=5), INVALID, "max_samples"),
    ("Complete", pb.CompleteRequest(model=lm(), n=-1), INVALID, "n: "),
    ("Complete", pb.CompleteRequest(model=lm(), stop_token_ids=[5, 10**6]), INVALID,
     "stop_token_ids[1]"),
    ("Complete", pb.CompleteRequest(model=lm(), stop=[""]), INVALID, "stop"),
    ("Complete", pb.CompleteRequest(model=pb.ModelRef(name="classifier-uni")), INVALID,
     "a classifier, not a language model"),
    ("CreateSession", pb.CreateSessionRequest(model=pb.ModelRef(name="tagger-bi")), INVALID,
     "bidirectional"),
    ("CreateSession", pb.CreateSessionRequest(model=pb.ModelRef(name="classifier-mean")),
     INVALID, "pools with 'mean'"),
    ("CreateSession", pb.CreateSessionRequest(model=lm(), top_k=-2), INVALID, "top_k"),
    ("CreateSession", pb.CreateSessionRequest(model=lm(), top_k=10**6), INVALID, "top_k"),
    ("Append", pb.AppendRequest(session_id="never-made", input=TEXT), NOT_FOUND, "never"),
]


@pytest.mark.parametrize("method,request_,code,needle", BAD_REQUESTS,
                         ids=[f"{m}-{n}" for m, _, _, n in BAD_REQUESTS])
def test_bad_requests_get_a_clear_status(server, method, request_, code, needle):
    error = call(getattr(server.client.language_model, method), request_)
    assert error.code() == code, error.details()
    assert needle in error.details()


def test_bad_field_errors_carry_a_bad_request_detail(server):
    error = call(server.client.language_model.Score,
                 pb.ScoreRequest(model=lm(), inputs=[TEXT, pb.Input()]))
    (bad,) = [d for d in details(error) if isinstance(d, error_details_pb2.BadRequest)]
    assert bad.field_violations[0].field == "inputs[1]"


def test_tag_and_classify_validate_their_inputs(server):
    error = call(server.client.tagger.Tag, pb.TagRequest(model=pb.ModelRef(name="tagger-bi")))
    assert error.code() == INVALID and "inputs" in error.details()
    error = call(server.client.classifier.Classify,
                 pb.ClassifyRequest(model=pb.ModelRef(name="tagger-bi"), inputs=[TEXT]))
    assert error.code() == INVALID and "a tagger, not a classifier" in error.details()


def test_empty_append_is_invalid_and_the_session_survives(server):
    session = server.client.create_session("demo-lm", prefix="the")
    error = call(server.client.language_model.Append,
                 pb.AppendRequest(session_id=session.session_id, input=pb.Input(text="")))
    assert error.code() == INVALID and "input" in error.details()
    assert server.client.append(session.session_id, "dog").position == 2


def test_an_oversized_message_is_refused_by_size(server):
    error = call(server.client.language_model.Score,
                 pb.ScoreRequest(model=lm(), inputs=[pb.Input(text="x" * 100_000)]))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in error.details()


def test_the_response_bound_counts_utf8_bytes_not_characters(server):
    """The bound a request is refused by (max_message_bytes, before it runs) must hold for
    the response actually sent: a CJK word is 3 bytes a character on the wire."""
    words = ["漢字" * 6] * 40
    response = server.client.language_model.Score(
        pb.ScoreRequest(model=lm(), inputs=[pb.Input(text=" ".join(words))]), timeout=30)
    assert [t.text for t in response.scores[0].tokens][:40] == words
    encoded = [Encoded(np.zeros(len(words), np.int64), words, len(words))]
    assert response.ByteSize() <= response_bytes(encoded, extra_tokens=1)


def test_lost_sessions_say_whether_they_expired_were_evicted_or_never_existed(model_repository):
    running = RunningServer(model_repository, session_ttl_s=0.3, max_sessions=2)
    try:
        client = running.client
        expired = client.create_session("demo-lm").session_id
        time.sleep(0.5)
        error = call(client.language_model.Append, pb.AppendRequest(session_id=expired,
                                                                    input=TEXT))
        assert error.code() == NOT_FOUND and "expired" in error.details()
        assert [d.reason for d in details(error)] == ["SESSION_EXPIRED"]

        before = running.metric("recur_session_evictions_total", reason="max_sessions")
        first = client.create_session("demo-lm").session_id
        client.create_session("demo-lm")
        client.create_session("demo-lm")  # the third evicts the least recently used
        assert running.metric("recur_session_evictions_total", reason="max_sessions") == \
            before + 1
        error = call(client.language_model.Append, pb.AppendRequest(session_id=first,
                                                                    input=TEXT))
        assert error.code() == NOT_FOUND and "evicted" in error.details()
        assert [d.reason for d in details(error)] == ["SESSION_EVICTED"]
        assert running.metric("recur_active_sessions", model="demo-lm/1") == 2
    finally:
        running.stop()


def test_session_bytes_are_bounded_by_lru_eviction(model_repository):
    import json

    meta = json.loads((model_repository / "demo-lm" / "1" / "metadata.json").read_text())
    # a language model's session: its state and its next-token distribution, float32,
    # and its bookkeeping
    per_session = (4 * (meta["layers"] * meta["state_size"] + meta["vocab_size"])
                   + SESSION_OVERHEAD_BYTES)
    running = RunningServer(model_repository, max_session_bytes=3 * per_session)
    try:
        ids = [running.client.create_session("demo-lm").session_id for _ in range(4)]
        assert running.metric("recur_session_state_bytes") == 3 * per_session
        assert running.metric("recur_session_evictions_total", reason="max_session_bytes") >= 1
        error = call(running.client.language_model.Append,
                     pb.AppendRequest(session_id=ids[0], input=TEXT))
        assert "evicted" in error.details()
        assert running.client.append(ids[-1], "the").position == 1
    finally:
        running.stop()


def test_a_full_queue_is_resource_exhausted_with_retry_info(model_repository):
    # A long queue delay holds the first request's sequences in the queue.
    running = RunningServer(model_repository, max_queue=4, max_sequences_per_request=4,
                            max_queue_delay_ms=1500)
    try:
        stub = running.client.language_model
        request = pb.ScoreRequest(model=lm(), inputs=[TEXT] * 4)
        first = stub.Score.future(request, timeout=30)
        time.sleep(0.3)
        error = call(stub.Score, request)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queue=4" in error.details()
        (retry,) = [d for d in details(error) if isinstance(d, error_details_pb2.RetryInfo)]
        assert retry.retry_delay.ToNanoseconds() > 0
        assert len(first.result().scores) == 4
        assert running.metric("recur_rejected_total", model="demo-lm/1") == 1
    finally:
        running.stop()
