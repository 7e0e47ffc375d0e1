"""The Open Inference Protocol (KServe V2) over HTTP/REST, with Triton's statistics and
model repository extensions, tested with tritonclient's HTTP client (binary tensor data,
as it sends by default, and JSON) and plain HTTP against real servers: the answers equal
the gRPC binding's, a sequence crosses between the bindings, statistics count the
requests sent, models load and unload where model control is on, and hostile bodies are
refused cheaply."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import shutil
import time
import tracemalloc
import zlib

import grpc
import numpy as np
import pytest
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_helpers import RunningServer
from tritonclient.utils import InferenceServerException

from serving.api.inference_v2 import rest
from serving.api.inference_v2.messages import InferResult, OutputTensor
from serving.api.inference_v2.tensors import encode_bytes
from serving.proto_gen.inference import grpc_service_pb2 as v2
from serving.proto_gen.inference import grpc_service_pb2_grpc as v2_grpc

TEXTS = ["the old dogs", "that the cat sees", "run"]
SMALL_MESSAGE_BYTES = 64 << 10


@pytest.fixture(scope="module")
def server(model_repository, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text("r" * 32 + "\n")
    running = RunningServer(model_repository, http_port=0, state_token_keys=str(keys))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def controlled(model_repository, tmp_path_factory):
    """Model control on, over a copy of the repository (its tests add folders), and
    stateful models declaring dynamic batching."""
    root = tmp_path_factory.mktemp("controlled") / "models"
    shutil.copytree(model_repository, root)
    running = RunningServer(root, http_port=0, model_control=True, v2_dynamic_batching=True,
                            session_ttl_s=30)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def small(model_repository):
    """Messages of at most 64 KB: answers past the limit are quick to ask for."""
    running = RunningServer(model_repository, http_port=0,
                            max_message_bytes=SMALL_MESSAGE_BYTES)
    yield running
    running.stop()


def triton(server: RunningServer) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(f"127.0.0.1:{server.ports.http}")


def send(server: RunningServer, method: str, path: str, body: bytes | str | dict | None = None,
         headers: dict | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one plain HTTP request."""
    if isinstance(body, dict):
        body = json.dumps(body)
    connection = http.client.HTTPConnection("127.0.0.1", server.ports.http, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def error_of(server: RunningServer, method: str, path: str, body=None,
             headers: dict | None = None) -> tuple[int, str]:
    status, answer_headers, answer = send(server, method, path, body, headers)
    assert answer_headers["content-type"] == "application/json"
    document = json.loads(answer)
    assert set(document) == {"error"}, document
    return status, document["error"]


def text_input(*texts: str, binary: bool = True) -> httpclient.InferInput:
    tensor = httpclient.InferInput("TEXT", [len(texts), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[t.encode()] for t in texts], object),
                               binary_data=binary)
    return tensor


def counted(result) -> list[list[float]]:
    counts = result.as_numpy("TOKEN_COUNT")[:, 0]
    return [result.as_numpy("TOKEN_LOGPROBS")[i, :c].tolist() for i, c in enumerate(counts)]


def grpc_infer(server: RunningServer, model: str, *texts: str,
               **parameters) -> v2.ModelInferResponse:
    request = v2.ModelInferRequest(model_name=model, inputs=[
        v2.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES",
                                              shape=[len(texts), 1])])
    request.raw_input_contents.append(encode_bytes([t.encode() for t in texts]))
    for key, value in parameters.items():
        kind = ("bool_param" if isinstance(value, bool) else
                "string_param" if isinstance(value, str) else "uint64_param")
        setattr(request.parameters[key], kind, value)
    return v2_grpc.GRPCInferenceServiceStub(server.channel).ModelInfer(request, timeout=30)


def grpc_logprobs(response: v2.ModelInferResponse) -> list[list[float]]:
    raw = dict(zip([o.name for o in response.outputs], response.raw_output_contents))
    shape = {o.name: list(o.shape) for o in response.outputs}
    logprobs = np.frombuffer(raw["TOKEN_LOGPROBS"], "<f4").reshape(shape["TOKEN_LOGPROBS"])
    counts = np.frombuffer(raw["TOKEN_COUNT"], "<i8")
    return [logprobs[i, :c].tolist() for i, c in enumerate(counts)]


def health_becomes(server: RunningServer, service: str, status, within_s: float = 5) -> bool:
    """Whether grpc.health.v1 reports `status` for `service` within `within_s`."""
    stub = health_pb2_grpc.HealthStub(server.channel)
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if stub.Check(health_pb2.HealthCheckRequest(service=service)).status == status:
            return True
        time.sleep(0.1)
    return False


def stats_of(server: RunningServer, model: str) -> dict:
    (entry,) = triton(server).get_inference_statistics(model)["model_stats"]
    return entry


# -- tritonclient[http]: the same answers as the gRPC binding ------------------------------

def test_metadata_and_config_as_tritonclient_reads_them(server):
    client = triton(server)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("demo-lm") and not client.is_model_ready("no-such-model")
    metadata = client.get_server_metadata()
    assert metadata["name"] == "recur"
    assert {"sequence", "statistics", "model_repository",
            "binary_tensor_data"} <= set(metadata["extensions"])
    grpc_stub = v2_grpc.GRPCInferenceServiceStub(server.channel)
    model = client.get_model_metadata("demo-lm")
    theirs = grpc_stub.ModelMetadata(v2.ModelMetadataRequest(name="demo-lm"))
    assert model["versions"] == list(theirs.versions) == ["1"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in model["inputs"]] == [
        (t.name, t.datatype, list(t.shape)) for t in theirs.inputs]
    assert client.get_model_metadata("demo-lm", "1") == model
    config = client.get_model_config("demo-lm")
    assert config["max_batch_size"] == 1024 and "dynamic_batching" not in config
    assert config["sequence_batching"]["max_sequence_idle_microseconds"] == 600_000_000
    # TEXT alone, required (TOKEN_IDS is accepted in its place): perf_analyzer makes up
    # data for every input declared, and none for one of a dynamic shape
    assert [(i["name"], i["data_type"], i["dims"], i.get("optional", False))
            for i in config["input"]] == [("TEXT", "TYPE_STRING", [1], False)]
    assert [i["name"] for i in model["inputs"]] == ["TEXT"]
    assert "dynamic_batching" in client.get_model_config("tagger-bi")  # no sessions


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_a_stateless_batch_equals_the_grpc_bindings_answer(server, binary):
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary)
               for name in ("TOKEN_LOGPROBS", "TOKEN_COUNT", "TOTAL_LOGPROB")]
    result = triton(server).infer("demo-lm", [text_input(*TEXTS[:2], binary=binary)],
                                  outputs=outputs)
    response = result.get_response()
    assert all(("data" in o) != binary for o in response["outputs"])
    want = grpc_logprobs(grpc_infer(server, "demo-lm", *TEXTS[:2]))
    assert counted(result) == want  # the same float32 values, to the bit
    scores = server.client.score("demo-lm", TEXTS[:2])
    np.testing.assert_allclose(result.as_numpy("TOTAL_LOGPROB")[:, 0],
                               [s.total_logprob for s in scores], atol=1e-4)


def test_default_outputs_come_back_binary_and_encoders_answer(server):
    result = triton(server).infer("tagger-bi", [text_input("the dog sleeps", "a cat")])
    assert all("data" not in o for o in result.get_response()["outputs"])
    assert result.as_numpy("TAGS").shape == (2, 3)
    assert result.as_numpy("TOKEN_COUNT")[:, 0].tolist() == [3, 2]
    probs = triton(server).infer("classifier-uni", [text_input("the dog")]).as_numpy(
        "CLASS_PROBS")
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)


def test_a_sequence_equals_the_grpc_bindings_and_crosses_between_them(server):
    client = triton(server)
    over_rest = [counted(client.infer("demo-lm", [text_input(text)], sequence_id=7001,
                                      sequence_start=i == 0, sequence_end=i == 2))[0]
                 for i, text in enumerate(TEXTS)]
    over_grpc = [grpc_logprobs(grpc_infer(server, "demo-lm", text, sequence_id=7002,
                                          sequence_start=i == 0, sequence_end=i == 2))[0]
                 for i, text in enumerate(TEXTS)]
    assert over_rest == over_grpc
    # one sequence: started over HTTP, continued over gRPC, ended over HTTP
    first = client.infer("demo-lm", [text_input(TEXTS[0])], sequence_id="crossing",
                         sequence_start=True)
    assert first.get_response()["parameters"]["state_token"]
    middle = grpc_infer(server, "demo-lm", TEXTS[1], sequence_id="crossing")
    last = client.infer("demo-lm", [text_input(TEXTS[2])], sequence_id="crossing",
                        sequence_end=True)
    assert [counted(first)[0], grpc_logprobs(middle)[0], counted(last)[0]] == over_rest
    with pytest.raises(InferenceServerException) as ended:
        client.infer("demo-lm", [text_input("run")], sequence_id="crossing")
    assert ended.value.status() == "400" and "has not started" in ended.value.message()


def test_json_bodies_flat_or_nested_token_ids_and_curl_shaped_requests(server):
    ids = [t.id for t in server.client.score("demo-lm", ["the old dogs"])[0].tokens][:-1]
    flat = {"inputs": [{"name": "TOKEN_IDS", "shape": [2, len(ids)], "datatype": "INT64",
                        "data": ids + ids[:1] + [-1] * (len(ids) - 1)}],
            "id": "r1", "parameters": {"add_eos": False}}
    nested = dict(flat, inputs=[dict(flat["inputs"][0], data=[ids, ids[:1] + [-1] * 2])])
    answers = []
    for body in (flat, nested):
        status, headers, answer = send(server, "POST", "/v2/models/demo-lm/versions/1/infer",
                                       body, {"Content-Type": "application/json"})
        assert status == 200 and headers["content-type"] == "application/json"
        answers.append(json.loads(answer))
    assert answers[0] == answers[1]
    document = answers[0]
    assert document["id"] == "r1" and document["model_version"] == "1"
    outputs = {o["name"]: o for o in document["outputs"]}
    assert outputs["TOKEN_COUNT"]["data"] == [len(ids), 1]  # add_eos false: no <eos>
    (whole,) = server.client.score("demo-lm", ["the old dogs"], add_eos=False)
    np.testing.assert_allclose(outputs["TOKEN_LOGPROBS"]["data"][:len(ids)],
                               [t.logprob for t in whole.tokens], atol=1e-5)
    gzipped = gzip.compress(json.dumps(nested).encode())
    status, _, answer = send(server, "POST", "/v2/models/demo-lm/infer", gzipped,
                             {"Content-Encoding": "gzip"})
    assert status == 200 and json.loads(answer)["outputs"] == document["outputs"]


# -- statistics ------------------------------------------------------------------------------

def test_statistics_count_the_requests_sent_over_both_bindings(server):
    client, before = triton(server), stats_of(server, "classifier-uni")
    assert before["version"] == "1" and set(before["inference_stats"]) >= {
        "success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
        "cache_hit", "cache_miss"}
    for texts in (["the dog"], ["a cat", "the dog sleeps", "run"]):
        client.infer("classifier-uni", [text_input(*texts)])
    grpc_infer(server, "classifier-uni", "the cat", "run")
    after = stats_of(server, "classifier-uni")
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"][
        "success"]["count"] == 3
    assert after["inference_count"] - before["inference_count"] == 6
    assert after["execution_count"] > before["execution_count"]
    assert after["last_inference"] > 0
    assert sum(b["compute_infer"]["count"] for b in after["batch_stats"]) == after[
        "execution_count"]
    response = v2_grpc.GRPCInferenceServiceStub(server.channel).ModelStatistics(
        v2.ModelStatisticsRequest(name="classifier-uni"))
    (ours,) = response.model_stats
    assert ours.inference_count == after["inference_count"]
    assert ours.inference_stats.success.count == after["inference_stats"]["success"]["count"]
    every = client.get_inference_statistics()["model_stats"]
    assert {(s["name"], s["version"]) for s in every} >= {("demo-lm", "1"),
                                                          ("classifier-uni", "1")}
    status, message = error_of(server, "GET", "/v2/models/nope/stats")
    assert status == 404 and "no model named 'nope'" in message


# -- the model repository --------------------------------------------------------------------

def test_the_index_lists_every_model_and_control_is_refused_when_off(server):
    index = triton(server).get_model_repository_index()
    assert {(m["name"], m["version"], m["state"]) for m in index} >= {
        ("demo-lm", "1", "READY"), ("tagger-bi", "1", "READY"), ("endless", "2", "READY")}
    for action in ("load", "unload"):
        status, message = error_of(server, "POST", f"/v2/repository/models/demo-lm/{action}")
        assert status == 400 and "model_control" in message and "--model-control" in message
    stub = v2_grpc.GRPCInferenceServiceStub(server.channel)
    with pytest.raises(grpc.RpcError) as refused:
        stub.RepositoryModelUnload(v2.RepositoryModelUnloadRequest(model_name="demo-lm"))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert triton(server).is_model_ready("demo-lm")
    listed = stub.RepositoryIndex(v2.RepositoryIndexRequest(ready=True)).models
    assert [(m.name, m.version, m.state) for m in listed] == [
        (m["name"], m["version"], m["state"]) for m in index if m["state"] == "READY"]


def test_unload_and_load_with_model_control(controlled):
    client = triton(controlled)
    assert "dynamic_batching" in client.get_model_config("demo-lm")  # v2_dynamic_batching
    client.unload_model("tagger-uni")
    assert not client.is_model_ready("tagger-uni")
    with pytest.raises(InferenceServerException) as gone:
        client.infer("tagger-uni", [text_input("the dog")])
    assert gone.value.status() == "404"
    states = {m["name"]: m for m in client.get_model_repository_index()}
    assert states["tagger-uni"]["state"] == "UNAVAILABLE"
    assert states["tagger-uni"]["reason"] == "unloaded"
    assert health_becomes(controlled, "model/tagger-uni",
                          health_pb2.HealthCheckResponse.NOT_SERVING)
    stub = v2_grpc.GRPCInferenceServiceStub(controlled.channel)
    stub.RepositoryModelLoad(v2.RepositoryModelLoadRequest(model_name="tagger-uni"))
    assert client.infer("tagger-uni", [text_input("the dog")]).as_numpy("TAGS").shape == (1, 2)
    assert health_becomes(controlled, "model/tagger-uni", health_pb2.HealthCheckResponse.SERVING)
    with pytest.raises(InferenceServerException) as unknown:
        client.load_model("no-such-model")
    assert unknown.value.status() == "404" and "no model folder" in unknown.value.message()


def test_a_load_reads_a_new_version_and_open_sequences_drain_on_the_old(controlled):
    client, root = triton(controlled), controlled.config.model_repository
    client.infer("demo-lm", [text_input(TEXTS[0])], sequence_id="drain", sequence_start=True)
    shutil.copytree(f"{root}/demo-lm/1", f"{root}/demo-lm/2")
    client.load_model("demo-lm")
    assert client.get_model_metadata("demo-lm")["versions"] == ["2"]
    fresh = client.infer("demo-lm", [text_input("run")])
    assert fresh.get_response()["model_version"] == "2"
    states = {(m["version"], m["state"]) for m in client.get_model_repository_index()
              if m["name"] == "demo-lm"}
    assert states == {("1", "UNLOADING"), ("2", "READY")}
    # the sequence goes on where it started, then ends
    later = client.infer("demo-lm", [text_input(TEXTS[1])], sequence_id="drain",
                         sequence_end=True)
    assert later.get_response()["model_version"] == "1"
    broken = f"{root}/broken/1"
    shutil.copytree(f"{root}/demo-lm/1", broken)
    with open(f"{broken}/model.onnx", "wb") as spoiled:
        spoiled.write(b"not a model")
    with pytest.raises(InferenceServerException) as failed:
        client.load_model("broken")
    assert failed.value.status() == "400" and "no version of 'broken' loaded" in (
        failed.value.message())
    states = {m["name"]: m for m in client.get_model_repository_index()}
    assert states["broken"]["state"] == "UNAVAILABLE" and states["broken"]["version"] == "1"
    assert states["broken"]["reason"]  # why it did not load


# -- errors and hostile bodies ---------------------------------------------------------------

def text_body(**changes) -> dict:
    tensor = {"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": ["the dog"]}
    return {"inputs": [dict(tensor, **changes)]}


@pytest.mark.parametrize("path, body, status, message", [
    ("/v2/models/nope/infer", text_body(), 404, "model_name: no model named 'nope'"),
    ("/v2/models/demo-lm/versions/7/infer", text_body(), 404, "model 'demo-lm' has no version 7"),
    # the model is looked up first, as over gRPC: NOT_FOUND whatever else is wrong
    ("/v2/models/nope/infer", "{not json", 404, "model_name: no model named 'nope'"),
    ("/v2/models/demo-lm/versions/7/infer", {"inputs": {}}, 404,
     "model 'demo-lm' has no version 7"),
    ("/v2/models/demo-lm/versions/x/infer", text_body(), 400, "model_version: must be a version"),
    ("/v2/models/demo-lm/infer", "{not json", 400, "request body: not JSON"),
    ("/v2/models/demo-lm/infer", "[1]", 400, "request body: must be a JSON object"),
    ("/v2/models/demo-lm/infer", {"inputs": {}}, 400, "inputs: must be a list"),
    ("/v2/models/demo-lm/infer", {"inputs": []}, 400, "inputs: give exactly one"),
    ("/v2/models/demo-lm/infer", text_body(datatype="FP32"), 400,
     "inputs[0].datatype: TEXT is BYTES, not 'FP32'"),
    ("/v2/models/demo-lm/infer", text_body(shape="1"), 400, "inputs[0].shape: must be a list"),
    ("/v2/models/demo-lm/infer", text_body(shape=[True, 1]), 400, "inputs[0].shape: must be"),
    ("/v2/models/demo-lm/infer", text_body(data=[7]), 400,
     "inputs[0].data: BYTES elements must be strings"),
    ("/v2/models/demo-lm/infer", text_body(data="the dog"), 400, "inputs[0].data: must be a list"),
    ("/v2/models/demo-lm/infer", text_body(data=[[["the dog"]]]), 400,
     "inputs[0].data: nested deeper than shape [1, 1]"),
    ("/v2/models/demo-lm/infer", text_body(data=["a", "b"]), 400,
     "inputs[0].data: 2 values for shape [1, 1]"),
    ("/v2/models/demo-lm/infer", {"inputs": [{"name": "TOKEN_IDS", "shape": [1, 2],
                                              "datatype": "INT64", "data": [1, 2.5]}]},
     400, "inputs[0].data: INT64 elements must be integers"),
    ("/v2/models/demo-lm/infer", {"inputs": [{"name": "TOKEN_IDS", "shape": [1, 1],
                                              "datatype": "INT64", "data": [2 ** 70]}]},
     400, "inputs[0].data: a value is out of the range of INT64"),
    ("/v2/models/demo-lm/infer", dict(text_body(), outputs=[{"name": "TAGS"}]), 400,
     "outputs[0].name: demo-lm/1 has no output 'TAGS'"),
    ("/v2/models/demo-lm/infer", dict(text_body(), parameters={"sequence_id": [1]}), 400,
     "parameters.sequence_id: must be a uint64 or a string"),
    ("/v2/models/demo-lm/infer", dict(text_body(), parameters={"sequence_id": 2 ** 64}), 400,
     "parameters.sequence_id: must be a uint64 or a string"),
    ("/v2/models/demo-lm/infer", dict(text_body(), parameters={"sequence_id": 3,
                                                               "sequence_start": "yes"}),
     400, "parameters.sequence_start: must be a bool"),
    ("/v2/models/demo-lm/infer", dict(text_body(), parameters={"binary_data_output": 1}), 400,
     "parameters.binary_data_output: must be a bool"),
    ("/v2/models/demo-lm/infer", text_body(parameters={"shared_memory_region": "r"}), 400,
     "inputs[0].parameters.shared_memory_region: not supported"),
    # json.dumps writes these as \\ud800 escapes: half a surrogate pair is not text
    ("/v2/models/demo-lm/infer", text_body(data=["the \ud800 dog"]), 400,
     "request body: a string holds a lone UTF-16 surrogate (\\ud800)"),
    ("/v2/models/demo-lm/infer", dict(text_body(), parameters={"sequence_id": "\udfff"}), 400,
     "request body: a string holds a lone UTF-16 surrogate (\\udfff)"),
    ("/v2/repository/models/demo-lm/load", {"parameters": {"config": "{}"}}, 400,
     "parameters.config: Recur loads models from its repository folder only"),
])
def test_bad_requests_are_named_in_v2s_error_shape(server, path, body, status, message):
    got_status, got = error_of(server, "POST", path, body)
    assert (got_status, message in got) == (status, True), got


def test_a_surrogate_pair_escape_is_text(server):
    """The escaped pair of an emoji (as json.dumps writes it) is one character."""
    status, _, answer = send(server, "POST", "/v2/models/demo-lm/infer",
                             text_body(data=["the dog \U0001F600"]))
    assert status == 200, answer


def test_binary_data_is_checked_against_the_sizes_declared(server):
    raw = encode_bytes([b"the dog"])
    header = json.dumps({"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}]})
    path = "/v2/models/demo-lm/infer"
    ok, headers, answer = send(server, "POST", path, header.encode() + raw,
                               {"Inference-Header-Content-Length": str(len(header))})
    assert ok == 200
    cases = [
        (header.encode() + raw + b"x", str(len(header)), "the inputs' binary_data_size add up"),
        (header.encode() + raw[:-1], str(len(header)), "binary_data_size: 11 bytes from byte 0"),
        (header.encode() + raw, "12x", "Inference-Header-Content-Length: must be"),
        (header.encode() + raw, str(10 ** 9), "Inference-Header-Content-Length: must be"),
    ]
    for body, length, message in cases:
        status, got = error_of(server, "POST", path, body,
                               {"Inference-Header-Content-Length": length})
        assert status == 400 and message in got, got
    # a shape of many elements against the few bytes sent: refused before allocating
    header = json.dumps({"inputs": [{"name": "TEXT", "shape": [1000, 1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}]})
    status, got = error_of(server, "POST", path, header.encode() + raw,
                           {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and "needs at least 4000" in got


def test_hostile_bodies_are_refused_cheaply(server):
    path = "/v2/models/demo-lm/infer"
    cases = [
        # declared shapes far past the limits, and a huge shape with almost no data
        (text_body(shape=[1 << 40, 1]), 400, "exceeds the server's limit "
                                             "max_sequences_per_request = 1024"),
        ({"inputs": [{"name": "TOKEN_IDS", "shape": [1, 1 << 40], "datatype": "INT64",
                      "data": [1]}]}, 400, "max_tokens_per_sequence = 20000"),
        ({"inputs": [{"name": "TOKEN_IDS", "shape": [1024, 20000], "datatype": "INT64",
                      "data": [1]}]}, 400, "1 values for shape [1024, 20000]"),
        (text_body(shape=[1] * 100), 400, "must be a list of at most 8 integers"),
        # nesting: past what the JSON parser follows, and past the shape
        ("[" * 200_000 + "]" * 200_000, 400, "JSON nested too deeply"),
        (text_body(data=[[["x"] * 3] * 3] * 3, shape=[27, 1]), 400, "nested lists must match"),
    ]
    tracemalloc.start()
    try:
        for body, status, message in cases:
            started = time.perf_counter()
            got_status, got = error_of(server, "POST", path, body)
            assert (got_status, message in got) == (status, True), got
            assert time.perf_counter() - started < 2
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20  # the 20-million-element shape allocated nothing of its size
    # a body declared over the limit is refused before a byte of it is read
    connection = http.client.HTTPConnection("127.0.0.1", server.ports.http, timeout=30)
    try:
        connection.putrequest("POST", path)
        connection.putheader("Content-Length", str(5 << 20))
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 413
        assert "max_message_bytes" in json.loads(response.read())["error"]
    finally:
        connection.close()
    bomb = gzip.compress(b" " * (5 << 20))
    status, message = error_of(server, "POST", path, bomb, {"Content-Encoding": "gzip"})
    assert status == 413 and "inflates to over" in message
    status, message = error_of(server, "POST", path, b"{}", {"Content-Encoding": "br"})
    assert status == 415 and "Content-Encoding 'br'" in message
    assert triton(server).is_server_ready()


def test_compressed_bodies_must_be_one_whole_stream(server):
    path = "/v2/models/demo-lm/infer"
    plain = json.dumps(text_body()).encode()
    gzipped, deflated = gzip.compress(plain), zlib.compress(plain)
    for body, encoding, problem in [
            (gzipped[:-8], "gzip", "ends before its stream does"),
            (gzipped + gzip.compress(b"junk"), "gzip", "24 bytes follow the gzip stream"),
            (deflated[:-4], "deflate", "ends before its stream does"),
            (deflated + b"junk", "deflate", "4 bytes follow the deflate stream")]:
        status, message = error_of(server, "POST", path, body, {"Content-Encoding": encoding})
        assert (status, message.startswith("Content-Encoding: ")) == (400, True), message
        assert problem in message
    assert send(server, "POST", path, deflated, {"Content-Encoding": "deflate"})[0] == 200


@pytest.mark.parametrize("model, rows, words", [
    ("demo-lm", 4, 999), ("tagger-bi", 3, 999), ("classifier-uni", 1024, 1)])
def test_json_answers_are_bounded_by_their_json_size(small, model, rows, words):
    """A float takes up to 24 bytes in JSON, 4 raw: a batch whose JSON answer could exceed
    max_message_bytes is refused before it runs, and answered with binary outputs."""
    path = f"/v2/models/{model}/infer"
    body = text_body(data=[" ".join(["w1"] * words)] * rows, shape=[rows, 1])
    started = time.perf_counter()
    status, message = error_of(small, "POST", path, body)
    assert status == 400 and "a response of up to" in message
    assert f"max_message_bytes = {SMALL_MESSAGE_BYTES}" in message
    assert time.perf_counter() - started < 1  # refused before it ran
    for binary, batch in [(True, rows), (False, rows // 2)]:
        body = text_body(data=[" ".join(["w1"] * words)] * batch, shape=[batch, 1])
        body["parameters"] = {"binary_data_output": binary}
        status, headers, answer = send(small, "POST", path, body)
        assert status == 200 and len(answer) <= SMALL_MESSAGE_BYTES
        assert headers["content-type"] == ("application/octet-stream" if binary
                                           else "application/json")
    # one output binary, the others JSON: each is counted as it is written
    body = text_body(data=[" ".join(["w1"] * words)] * rows, shape=[rows, 1])
    wide = {"demo-lm": "TOKEN_LOGPROBS", "tagger-bi": "TAG_LOGPROBS",
            "classifier-uni": "CLASS_PROBS"}[model]
    body["outputs"] = [{"name": wide, "parameters": {"binary_data": True}}]
    assert send(small, "POST", path, body)[0] == 200


def test_a_large_json_answer_is_written_off_the_event_loop():
    """One json.dumps holds the GIL throughout (a million floats: about a second): a large
    answer is written in a worker thread, in chunks, and the event loop runs meanwhile."""
    logprobs = np.random.default_rng(0).standard_normal((10, 20000)).astype(np.float32)
    result = InferResult("demo-lm", "1", "", {}, [
        OutputTensor("TOKEN_LOGPROBS", "FP32", logprobs)])

    async def answer_and_watch_the_loop():
        done, worst = asyncio.Event(), [0.0]

        async def tick():
            while not done.is_set():
                before = time.perf_counter()
                await asyncio.sleep(0.001)
                worst[0] = max(worst[0], time.perf_counter() - before)

        ticking = asyncio.create_task(tick())
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        answer = await rest._answer(result, lambda index: False)
        elapsed = time.perf_counter() - started
        done.set()
        await ticking
        return answer, elapsed, worst[0]

    answer, elapsed, worst = asyncio.run(answer_and_watch_the_loop())
    (output,) = json.loads(answer.body)["outputs"]
    assert np.array_equal(np.array(output["data"], np.float32), logprobs.reshape(-1))
    assert worst < elapsed / 4, (worst, elapsed)


def test_non_finite_values_are_written_as_null_in_valid_json():
    """JSON has no -Infinity or NaN (json.dumps writes them unless told not to): the -inf
    log-prob of an impossible token is null, in whichever chunk it falls."""
    values = np.arange(rest.CHUNK_VALUES + 3, dtype=np.float32) / 8
    values[[1, rest.CHUNK_VALUES + 1]] = -np.inf
    values[2] = np.nan
    written = rest._values_json(OutputTensor("TOKEN_LOGPROBS", "FP32", values))
    parsed = json.loads(f"[{written}]", parse_constant=lambda name: pytest.fail(name))
    nulls = [i for i, v in enumerate(parsed) if v is None]
    assert nulls == [1, 2, rest.CHUNK_VALUES + 1]
    finite = np.isfinite(values)
    assert np.array_equal(np.array(parsed, dtype=object)[finite].astype(np.float32),
                          values[finite])

    result = InferResult("demo-lm", "1", "", {}, [
        OutputTensor("TOTAL_LOGPROB", "FP32", np.array([[-np.inf], [-1.5]], np.float32)),
        OutputTensor("TOKEN_COUNT", "INT64", np.array([[3], [2]], np.int64))])
    answer = json.loads(rest._infer_response(result, lambda index: False).body,
                        parse_constant=lambda name: pytest.fail(name))
    assert [o["data"] for o in answer["outputs"]] == [[None, -1.5], [3, 2]]


def test_a_full_queue_is_429_with_retry_after(server):
    engine = server.server.engine

    async def fill():
        return engine.model("endless").scheduler.admit(engine.config.max_queue)

    held = server.call(fill())
    try:
        status, headers, answer = send(server, "POST", "/v2/models/endless/infer",
                                       text_body())
    finally:
        server.loop.call_soon_threadsafe(held.release)
    assert status == 429 and int(headers["retry-after"]) >= 1
    assert "queue" in json.loads(answer)["error"]
    assert send(server, "POST", "/v2/models/endless/infer", text_body())[0] == 200


def test_unknown_routes_and_methods_answer_in_v2s_shape(server):
    assert error_of(server, "GET", "/v2/models/demo-lm/nothing")[0] == 404
    assert error_of(server, "GET", "/v2/models/demo-lm/infer")[0] == 405
    status, headers, answer = send(server, "GET", "/v2/models/nope/ready")
    assert status == 400 and json.loads(answer) == {"name": "nope", "ready": False}
