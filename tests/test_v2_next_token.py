"""The Open Inference Protocol's next-token outputs (NEXT_TOKEN_IDS, NEXT_TOKEN_LOGPROBS,
NEXT_LOGPROBS) over real servers: a client that feeds back the argmax each step decodes
what recur.v1's greedy Complete does, the distributions are recur.v1 Append's, both
bindings answer the same, and what is not asked for, or asked for badly, is as before or
refused naming the field."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.http as httpclient
from serving_helpers import RunningServer
from tritonclient.utils import InferenceServerException

from serving.api.inference_v2.core import HEADER_BYTES
from serving.api.inference_v2.tensors import encode_bytes
from serving.proto_gen.inference import grpc_service_pb2 as v2
from serving.proto_gen.inference import grpc_service_pb2_grpc as v2_grpc

MODEL = "demo-lm"
NEXT = ["NEXT_TOKEN_IDS", "NEXT_TOKEN_LOGPROBS", "NEXT_LOGPROBS"]
DEFAULT = ["TOKEN_LOGPROBS", "TOKEN_COUNT", "TOTAL_LOGPROB"]
DTYPES = {"FP32": "<f4", "INT64": "<i8"}


@pytest.fixture(scope="module")
def server(model_repository):
    running = RunningServer(model_repository, http_port=0)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def vocab_size(server) -> int:
    (info,) = [m for m in server.client.list_models() if m.name == MODEL]
    return info.vocab_size


@pytest.fixture(scope="module")
def small(model_repository, vocab_size):
    """Room for the default outputs and a top-1, not for V floats."""
    running = RunningServer(model_repository, http_port=0,
                            max_message_bytes=HEADER_BYTES + 2 * vocab_size)
    yield running
    running.stop()


def infer(server: RunningServer, text: str | None = None, ids: list[int] | None = None,
          outputs: list[str] = (), **parameters) -> dict[str, np.ndarray]:
    """One ModelInfer over gRPC: its outputs by name, in the order answered."""
    request = v2.ModelInferRequest(model_name=MODEL)
    if text is not None:
        request.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 1])
        request.raw_input_contents.append(encode_bytes([text.encode()]))
    else:
        request.inputs.add(name="TOKEN_IDS", datatype="INT64", shape=[1, len(ids)])
        request.raw_input_contents.append(np.array(ids, "<i8").tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    for key, value in parameters.items():
        kind = ("bool_param" if isinstance(value, bool) else
                "string_param" if isinstance(value, str) else "int64_param")
        setattr(request.parameters[key], kind, value)
    response = v2_grpc.GRPCInferenceServiceStub(server.channel).ModelInfer(request, timeout=30)
    return {o.name: np.frombuffer(raw, DTYPES[o.datatype]).reshape(list(o.shape))
            for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)}


def refused(server: RunningServer, **request) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        infer(server, **request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return caught.value.details()


def test_feeding_back_the_argmax_decodes_the_greedy_completion(server):
    steps = 8
    greedy = [e.token.id for e in server.client.complete(MODEL, "the old", max_tokens=steps,
                                                           temperature=0) if e.token]
    answer = infer(server, "the old", outputs=["NEXT_TOKEN_IDS"], sequence_id="greedy",
                   sequence_start=True)
    fed_back = []
    while len(fed_back) < len(greedy):
        assert answer["NEXT_TOKEN_IDS"].shape == (1, 1)  # top_k 1 by default
        fed_back.append(int(answer["NEXT_TOKEN_IDS"][0, 0]))
        answer = infer(server, ids=fed_back[-1:], outputs=["NEXT_TOKEN_IDS"],
                       sequence_id="greedy")
    infer(server, ids=[], sequence_id="greedy", sequence_end=True)
    assert len(greedy) >= 3 and fed_back == greedy
    # over HTTP, as docs/serving.md shows it: tritonclient, binary TOKEN_IDS fed back
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.ports.http}")
    wanted = [httpclient.InferRequestedOutput("NEXT_TOKEN_IDS")]
    tokens = httpclient.InferInput("TEXT", [1, 1], "BYTES")
    tokens.set_data_from_numpy(np.array([[b"the old"]], dtype=object))
    over_http = []
    for step in range(len(greedy)):
        result = client.infer(MODEL, [tokens], outputs=wanted, sequence_id="g-1",
                              sequence_start=step == 0, sequence_end=step == len(greedy) - 1)
        over_http.append(int(result.as_numpy("NEXT_TOKEN_IDS")[0, 0]))
        tokens = httpclient.InferInput("TOKEN_IDS", [1, 1], "INT64")
        tokens.set_data_from_numpy(np.array([over_http[-1:]], dtype=np.int64))
    assert over_http == greedy


def test_the_distribution_is_recur_v1_appends(server, vocab_size):
    top_k = 5
    first = infer(server, "the old", outputs=NEXT, sequence_id=7, sequence_start=True,
                  top_k=top_k)
    second = infer(server, "dogs", outputs=["TOKEN_LOGPROBS", *NEXT], sequence_id=7,
                   top_k=top_k, sequence_end=True)
    session = server.client.create_session(MODEL, "the old", top_k=top_k)
    appended = server.client.append(session.session_id, "dogs", top_k=top_k)
    server.client.close_session(session.session_id)
    for answer, want in [(first, session), (second, appended)]:
        assert list(answer) == [n for n in answer if n == "TOKEN_LOGPROBS"] + NEXT
        ids, logprobs = answer["NEXT_TOKEN_IDS"][0], answer["NEXT_TOKEN_LOGPROBS"][0]
        whole = answer["NEXT_LOGPROBS"][0]
        assert ids.shape == logprobs.shape == (top_k,) and whole.shape == (vocab_size,)
        assert ids.tolist() == [t.id for t in want.next_tokens]
        np.testing.assert_allclose(logprobs, [t.logprob for t in want.next_tokens], atol=1e-6)
        np.testing.assert_array_equal(logprobs, whole[ids])  # the same values, to the bit
        assert ids.tolist() == np.argsort(-whole, kind="stable")[:top_k].tolist()
        assert abs(np.exp(whole.astype(np.float64)).sum() - 1) < 1e-4
    np.testing.assert_allclose(second["TOKEN_LOGPROBS"][0], [t.logprob for t in appended.tokens],
                               atol=1e-6)


def test_outputs_not_asked_for_are_as_before(server):
    answer = infer(server, "the old", sequence_id="plain", sequence_start=True)
    assert list(answer) == DEFAULT
    answer = infer(server, "dogs", sequence_id="plain", top_k=3, sequence_end=True)
    assert list(answer) == DEFAULT  # top_k alone changes nothing
    metadata = v2_grpc.GRPCInferenceServiceStub(server.channel).ModelMetadata(
        v2.ModelMetadataRequest(name=MODEL), timeout=30)
    assert [o.name for o in metadata.outputs] == DEFAULT  # asked for by name only


@pytest.mark.parametrize("top_k, message", [
    (0, "must be from 1 to"), (-1, "must be from 1 to"), ("3", "must be an int64"),
    (True, "must be an int64"), (None, "exceeds")])
def test_a_bad_top_k_is_refused_and_the_sequence_is_unchanged(server, vocab_size, top_k,
                                                              message):
    top_k = vocab_size + 1 if top_k is None else top_k
    message = f"got {top_k}" if message == "exceeds" else message
    infer(server, "the old", sequence_id="bad-k", sequence_start=True)
    details = refused(server, text="dogs", outputs=["NEXT_TOKEN_LOGPROBS"], sequence_id="bad-k",
                      top_k=top_k)
    assert details.startswith("parameters.top_k: ") and message in details
    after = infer(server, "dogs", sequence_id="bad-k", sequence_end=True)
    (whole,) = server.client.score(MODEL, ["the old dogs"], add_eos=False)
    np.testing.assert_allclose(after["TOKEN_LOGPROBS"][0], [whole.tokens[2].logprob], atol=1e-5)


def test_stateless_requests_are_refused_the_next_token_outputs(server):
    for index, name in enumerate(NEXT):
        details = refused(server, text="the old", outputs=DEFAULT[:index] + [name])
        assert details.startswith(f"outputs[{index}].name: {name} is for sequences")
    details = refused(server, text="the old", outputs=["NEXT_TOKEN"], sequence_id=9,
                      sequence_start=True)
    assert details.startswith("outputs[0].name: demo-lm/1 has no output 'NEXT_TOKEN'")


@pytest.mark.parametrize("binary", [True, False])
def test_the_http_binding_answers_as_grpc_does(server, binary):
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.ports.http}")
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in NEXT]

    def http_step(text: str, **sequence) -> dict[str, np.ndarray]:
        tensor = httpclient.InferInput("TEXT", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[text.encode()]], object))
        result = client.infer(MODEL, [tensor], outputs=outputs, parameters={"top_k": 4},
                              **sequence)
        return {n: result.as_numpy(n) for n in NEXT}

    over_http = [http_step("the old", sequence_id=f"http-{binary}", sequence_start=True),
                 http_step("dogs", sequence_id=f"http-{binary}", sequence_end=True)]
    over_grpc = [infer(server, "the old", outputs=NEXT, top_k=4, sequence_id="g",
                       sequence_start=True),
                 infer(server, "dogs", outputs=NEXT, top_k=4, sequence_id="g", sequence_end=True)]
    for got, want in zip(over_http, over_grpc, strict=True):
        assert got["NEXT_TOKEN_IDS"].tolist() == want["NEXT_TOKEN_IDS"].tolist()
        for name in ("NEXT_TOKEN_LOGPROBS", "NEXT_LOGPROBS"):
            assert got[name].dtype == np.float32 and got[name].shape == want[name].shape
            np.testing.assert_allclose(got[name], want[name], atol=1e-6)
    tensor = httpclient.InferInput("TEXT", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[b"the old"]], object))
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, [tensor], outputs=outputs[:1], parameters={"top_k": 0},
                     sequence_id="h", sequence_start=True)
    assert caught.value.status() == "400"
    assert caught.value.message().startswith("parameters.top_k: must be from 1 to")


def test_the_message_limit_counts_the_whole_distribution(small, vocab_size):
    """NEXT_LOGPROBS is V floats: past max_message_bytes it is refused before the sequence
    starts; the default outputs and a top-1 fit."""
    details = refused(small, text="the old", outputs=["NEXT_LOGPROBS"], sequence_id=3,
                      sequence_start=True)
    assert "max_message_bytes" in details and "a response of up to" in details
    assert "has not started" in refused(small, text="dogs", sequence_id=3)
    answer = infer(small, "the old", outputs=[*DEFAULT, "NEXT_TOKEN_IDS"], sequence_id=3,
                   sequence_start=True, sequence_end=True)
    assert answer["NEXT_TOKEN_IDS"].shape == (1, 1)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{small.ports.http}")
    tensor = httpclient.InferInput("TEXT", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[b"the old"]], object))
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, [tensor], outputs=[httpclient.InferRequestedOutput("NEXT_LOGPROBS")],
                     sequence_id=4, sequence_start=True)
    assert "max_message_bytes" in caught.value.message()
