"""Hostile input: random and malformed messages, and raw random bytes, at every RPC. No
crash, never UNKNOWN or INTERNAL, every refusal with a status and a message, and the
server healthy afterwards. Property-based: fixed seed, fixed example counts, no deadline."""

from __future__ import annotations

import time

import grpc
import pytest
from google.protobuf import descriptor as d
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_helpers import RunningServer

from serving.proto_gen.inference import grpc_service_pb2 as v2
from serving.proto_gen.recur.v1 import recur_pb2 as pb

EXAMPLES = 200
NAMES = ["demo-lm", "tagger-uni", "tagger-bi", "classifier-uni", "classifier-mean", "endless",
         "", "nope", "demo-lm/1", "\x00", "a" * 300, "TEXT", "TOKEN_IDS", "BYTES", "INT64"]
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def methods() -> list[d.MethodDescriptor]:
    services = [*pb.DESCRIPTOR.services_by_name.values(),
                health_pb2.DESCRIPTOR.services_by_name["Health"],
                v2.DESCRIPTOR.services_by_name["GRPCInferenceService"]]
    return [m for s in services for m in s.methods]


METHODS = {f"{m.containing_service.name}.{m.name}": m for m in methods()}


@pytest.fixture(scope="module")
def server(model_repository, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text("k" * 32 + "\n")
    running = RunningServer(model_repository, max_completion_tokens=8,
                            default_completion_tokens=4, max_samples=4,
                            max_sequences_per_request=8, max_tokens_per_sequence=64,
                            max_queue=64, state_token_keys=str(keys))
    yield running
    assert_healthy(running)
    running.stop()


def assert_healthy(server: RunningServer) -> None:
    (score,) = server.client.score("demo-lm", ["the dog sleeps"])
    assert score.token_count == 4


def scalar(field: d.FieldDescriptor) -> st.SearchStrategy:
    t = field.type
    if t == d.FieldDescriptor.TYPE_STRING:
        return st.sampled_from(NAMES) | st.text(max_size=40)
    if t == d.FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=200)
    if t == d.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (d.FieldDescriptor.TYPE_FLOAT, d.FieldDescriptor.TYPE_DOUBLE):
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    if t == d.FieldDescriptor.TYPE_ENUM:
        return st.integers(-3, 10)
    if t in (d.FieldDescriptor.TYPE_INT32, d.FieldDescriptor.TYPE_SINT32,
             d.FieldDescriptor.TYPE_SFIXED32):
        return st.sampled_from([0, 1, 2, 3, -1, 2**31 - 1, -(2**31)]) | st.integers(-2**31,
                                                                                    2**31 - 1)
    if t in (d.FieldDescriptor.TYPE_UINT32, d.FieldDescriptor.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if t in (d.FieldDescriptor.TYPE_UINT64, d.FieldDescriptor.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    return st.sampled_from([0, 1, 5, 40, -1, 2**63 - 1, -(2**63)]) | st.integers(-2**63,
                                                                               2**63 - 1)


@st.composite
def message(draw, descriptor: d.Descriptor, depth: int = 0):
    """A message of this type with random fields set: valid, nonsense, or extreme."""
    cls = _class_of(descriptor)
    result = cls()
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        is_message = field.type == d.FieldDescriptor.TYPE_MESSAGE
        if is_message and depth >= 3:
            continue
        if is_message and field.message_type.GetOptions().map_entry:  # map<string, Message>
            value_type = field.message_type.fields_by_name["value"].message_type
            keys = st.sampled_from(["sequence_id", "sequence_start", "sequence_end", "add_eos"])
            entries = draw(st.dictionaries(keys | st.text(max_size=10),
                                           message(value_type, depth + 1), max_size=4))
            for key, value in entries.items():
                getattr(result, field.name)[key].CopyFrom(value)
            continue
        values = (message(field.message_type, depth + 1) if is_message else scalar(field))
        if field.is_repeated:
            items = draw(st.lists(values, max_size=4))
            container = getattr(result, field.name)
            if is_message:
                for item in items:
                    container.add().CopyFrom(item)
            else:
                container.extend(items)
        elif is_message:
            getattr(result, field.name).CopyFrom(draw(values))
        else:
            setattr(result, field.name, draw(values))
    return result


def _class_of(descriptor: d.Descriptor):
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


def call(server: RunningServer, method: d.MethodDescriptor, payloads: list[bytes]):
    """Sends raw request bytes; returns the status code."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    channel = server.channel
    timeout = 0.05 if method.name == "Watch" else 20.0  # Watch streams until cancelled
    try:
        if method.client_streaming and method.server_streaming:
            list(channel.stream_stream(path)(iter(payloads), timeout=timeout))
        elif method.client_streaming:
            channel.stream_unary(path)(iter(payloads), timeout=timeout)
        elif method.server_streaming:
            list(channel.unary_stream(path)(payloads[0], timeout=timeout))
        else:
            channel.unary_unary(path)(payloads[0], timeout=timeout)
    except grpc.RpcError as error:
        code = error.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and method.name == "Watch":
            return code
        assert code not in FORBIDDEN, f"{path}: {code.name}: {error.details()}"
        assert code != grpc.StatusCode.DEADLINE_EXCEEDED, f"{path} hung"
        assert error.details(), f"{path}: {code.name} without a message"
        return code
    return grpc.StatusCode.OK


@pytest.mark.parametrize("name", sorted(METHODS))
def test_random_messages_get_clear_answers(server, name):
    method = METHODS[name]
    count = 3 if method.client_streaming else 1

    @SETTINGS
    @given(st.lists(message(method.input_type), min_size=1, max_size=count))
    def check(requests):
        call(server, method, [r.SerializeToString() for r in requests])

    check()
    assert_healthy(server)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_random_bytes_get_clear_answers(server, name):
    method = METHODS[name]
    count = 3 if method.client_streaming else 1
    codes = set()

    @SETTINGS
    @given(st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=count))
    def check(payloads):
        codes.add(call(server, method, payloads))

    check()
    assert grpc.StatusCode.INVALID_ARGUMENT in codes  # undecodable bytes are named as such
    assert_healthy(server)


def test_undecodable_bytes_name_the_expected_message(server):
    with pytest.raises(grpc.RpcError) as caught:
        server.channel.unary_unary("/recur.v1.LanguageModel/Score")(b"\xff\xff\xff", timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid recur.v1.ScoreRequest message" in caught.value.details()


@pytest.mark.parametrize("method", ["/recur.v1.LanguageModel/ScoreStream",
                                    "/recur.v1.LanguageModel/Converse",
                                    "/inference.GRPCInferenceService/ModelStreamInfer"])
def test_an_undecodable_message_after_a_good_one_ends_the_stream_at_once(server, method):
    """ScoreStream reads its messages in a task of its own: the bad message's error must
    still end the call, at once, instead of leaving it open until its deadline."""
    good = {"ScoreStream": pb.ScoreStreamRequest(id="m0", model=pb.ModelRef(name="demo-lm"),
                                                 inputs=[pb.Input(text="the dog")]),
            "Converse": pb.ConverseRequest(model=pb.ModelRef(name="demo-lm"),
                                           input=pb.Input(text="the dog")),
            "ModelStreamInfer": v2.ModelInferRequest(model_name="demo-lm")}
    first = good[method.rpartition("/")[2]].SerializeToString()
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        bad = b"\n\x02m1\x12\x06\n\x04\xf4\x90\x80\x80"  # a name that is not UTF-8
        list(server.channel.stream_stream(method)(iter([first, bad]), timeout=20))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert "not a valid" in caught.value.details()
    assert time.monotonic() - started < 10
