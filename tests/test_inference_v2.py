"""The Open Inference Protocol (KServe V2) over gRPC with Triton's extensions, tested with
tritonclient as the client (tests/test_inference_v2_rest.py: over HTTP). tritonclient's
gRPC client pins protobuf < 7, so it runs from its own virtual environment
(tests/clients/triton_check.py) and reports back as JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from serving_helpers import RunningServer

from serving.api.inference_v2.tensors import encode_bytes
from serving.proto_gen.inference import grpc_service_pb2 as v2
from serving.proto_gen.inference import grpc_service_pb2_grpc as v2_grpc
from serving.proto_gen.inference import model_config_pb2 as mc

CHECK = Path(__file__).parent / "clients" / "triton_check.py"
TEXTS = ["the old dogs", "that the cat sees", "run"]


@pytest.fixture(scope="module")
def triton_python(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("tritonclient") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "-q",
                           "--disable-pip-version-check", "tritonclient[grpc]>=2.40"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return python


@pytest.fixture(scope="module")
def server(model_repository, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text("v" * 32 + "\n")
    running = RunningServer(model_repository, state_token_keys=str(keys))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def report(server, triton_python) -> dict:
    done = subprocess.run([str(triton_python), str(CHECK), server.target, "demo-lm", *TEXTS],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def recur_appends(server: RunningServer) -> list[list[float]]:
    session = server.client.create_session("demo-lm", prefix=TEXTS[0])
    pieces = [[t.logprob for t in session.tokens]]
    pieces += [[t.logprob for t in server.client.append(session.session_id, text).tokens]
               for text in TEXTS[1:]]
    server.client.close_session(session.session_id)
    return pieces


@pytest.mark.slow
def test_metadata_and_config_as_tritonclient_reads_them(report):
    assert report["live"] and report["ready"] and report["model_ready"]
    assert report["unknown_model_ready"] is False
    assert report["server"]["name"] == "recur"
    assert "sequence" in report["server"]["extensions"]
    metadata = report["metadata"]
    assert metadata["name"] == "demo-lm" and metadata["versions"] == ["1"]
    # TEXT alone is declared (TOKEN_IDS is accepted in its place): see core.DECLARED
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [
        ("TEXT", "BYTES", ["-1", "1"])]
    assert {t["name"] for t in metadata["outputs"]} == {"TOKEN_LOGPROBS", "TOKEN_COUNT",
                                                        "TOTAL_LOGPROB"}
    assert report["config_has_sequence_batching"]
    config = report["config"]
    assert config["name"] == "demo-lm" and int(config["max_batch_size"]) > 0
    assert [(i["name"], i["data_type"], i.get("optional", False)) for i in config["input"]] == [
        ("TEXT", "TYPE_STRING", False)]
    assert int(config["sequence_batching"]["max_sequence_idle_microseconds"]) == 600_000_000


@pytest.mark.slow
def test_stateless_infer_equals_score(report, server):
    scores = server.client.score("demo-lm", TEXTS[:2])
    for got, total, want in zip(report["stateless"], report["stateless_totals"], scores):
        np.testing.assert_allclose(got, [t.logprob for t in want.tokens], atol=1e-5)
        assert total == pytest.approx(want.total_logprob, abs=1e-4)


@pytest.mark.slow
def test_a_sequence_equals_recur_appends_unary_and_streamed(report, server):
    expected = recur_appends(server)
    for name in ("sequence", "streamed"):
        assert [len(p) for p in report[name]] == [len(p) for p in expected], name
        for got, want in zip(report[name], expected):
            np.testing.assert_allclose(got, want, atol=1e-5)
    assert report["after_end"].startswith("StatusCode.INVALID_ARGUMENT")
    assert "has not started" in report["after_end"]


@pytest.mark.slow
def test_statistics_and_the_repository_as_tritonclient_reads_them(report):
    """The statistics count what the check sent: a stateless batch of two, a sequence of
    three (unary, and once more streamed); the request refused after the sequence ended
    never reached the model."""
    (stats,) = report["statistics"]["model_stats"]
    assert (stats["name"], stats["version"]) == ("demo-lm", "1")
    assert int(stats["inference_count"]) == 2 + 3 + 3
    inference = stats["inference_stats"]
    assert int(inference["success"]["count"]) == 1 + 3 + 3
    assert int(inference["compute_infer"]["count"]) == 7 and int(inference["queue"]["ns"]) > 0
    assert int(stats["execution_count"]) == sum(int(b["compute_infer"]["count"])
                                                for b in stats["batch_stats"]) > 0
    models = {(m["name"], m.get("version"), m["state"]) for m in report["index"]["models"]}
    assert ("demo-lm", "1", "READY") in models and ("tagger-bi", "1", "READY") in models
    assert report["unload"].startswith("StatusCode.FAILED_PRECONDITION")
    assert "--model-control" in report["unload"]


@pytest.mark.slow
def test_the_wire_format_matches_tritonclients_descriptors(report):
    theirs = report["descriptors"]
    ours = {}
    for module in (v2, mc):
        pending = list(module.DESCRIPTOR.message_types_by_name.values())
        while pending:
            message = pending.pop()
            pending.extend(message.nested_types)
            ours[message.full_name] = {f.name: [f.number, f.type] for f in message.fields}
    for message, fields in ours.items():
        assert message in theirs["fields"], f"{message} is not in the protocol"
        for name, spec in fields.items():
            assert theirs["fields"][message].get(name) == spec, f"{message}.{name}"
    service = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert len(service.methods) == 12
    for method in service.methods:
        assert theirs["methods"][method.name] == [method.input_type.full_name,
                                                  method.output_type.full_name]


# Without tritonclient: the protocol's edges, through our own stubs.

def infer(server: RunningServer, **fields) -> v2.ModelInferResponse:
    stub = v2_grpc.GRPCInferenceServiceStub(server.channel)
    return stub.ModelInfer(v2.ModelInferRequest(**fields), timeout=30)


def text_tensor(*texts: str) -> dict:
    return {"inputs": [v2.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES",
                                                             shape=[len(texts), 1])],
            "raw_input_contents": [encode_bytes([t.encode() for t in texts])]}


def test_token_ids_typed_contents_and_encoders(server):
    ids = server.client.score("demo-lm", ["the old dogs"])[0].tokens
    row = [t.id for t in ids][:-1]  # without <eos>: it is appended by add_eos
    tensor = v2.ModelInferRequest.InferInputTensor(
        name="TOKEN_IDS", datatype="INT64", shape=[2, len(row)],
        contents=v2.InferTensorContents(int64_contents=row + row[:1] + [-1] * (len(row) - 1)))
    response = infer(server, model_name="demo-lm", inputs=[tensor])
    counts = np.frombuffer(response.raw_output_contents[1], "<i8")
    assert counts.tolist() == [len(row) + 1, 2]
    tagged = infer(server, model_name="tagger-bi", **text_tensor("the dog sleeps", "a cat"),
                   outputs=[v2.ModelInferRequest.InferRequestedOutputTensor(name="TAGS")])
    assert [o.name for o in tagged.outputs] == ["TAGS"] and list(tagged.outputs[0].shape) == [2, 3]
    classified = infer(server, model_name="classifier-uni", **text_tensor("the dog sleeps"))
    probs = np.frombuffer(classified.raw_output_contents[1], "<f4")
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("fields, field, message", [
    ({"model_name": "nope"}, grpc.StatusCode.NOT_FOUND, "model_name: no model named 'nope'"),
    ({"model_name": "demo-lm", "model_version": "x"}, grpc.StatusCode.INVALID_ARGUMENT,
     "model_version: must be a version number"),
    ({"model_name": "demo-lm"}, grpc.StatusCode.INVALID_ARGUMENT, "inputs: give exactly one"),
    ({"model_name": "demo-lm", "inputs": [v2.ModelInferRequest.InferInputTensor(
        name="TEXT", datatype="BYTES", shape=[1, 1])], "raw_input_contents": [b"\x09\x00"]},
     grpc.StatusCode.INVALID_ARGUMENT, "length prefix"),
    ({"model_name": "demo-lm", "inputs": [v2.ModelInferRequest.InferInputTensor(
        name="IMAGE", datatype="FP32", shape=[1])]}, grpc.StatusCode.INVALID_ARGUMENT,
     "inputs[0].name: unknown input 'IMAGE'"),
    ({"model_name": "demo-lm", "inputs": [v2.ModelInferRequest.InferInputTensor(
        name="TOKEN_IDS", datatype="INT64", shape=[1, 3],
        contents=v2.InferTensorContents(int64_contents=[1, 2]))]},
     grpc.StatusCode.INVALID_ARGUMENT, "2 values for shape [1, 3]"),
    ({"model_name": "demo-lm", "inputs": [v2.ModelInferRequest.InferInputTensor(
        name="TOKEN_IDS", datatype="INT64", shape=[2, 2],
        contents=v2.InferTensorContents(int64_contents=[1, 2, 3, 10**6]))]},
     grpc.StatusCode.INVALID_ARGUMENT, "inputs[TOKEN_IDS][1][1]: token id 1000000"),
    ({"model_name": "tagger-bi", **text_tensor("w1", "")}, grpc.StatusCode.INVALID_ARGUMENT,
     "inputs[TEXT][1]: empty text"),
    ({"model_name": "demo-lm", **text_tensor("w1"),
      "outputs": [v2.ModelInferRequest.InferRequestedOutputTensor(name="TAGS")]},
     grpc.StatusCode.INVALID_ARGUMENT, "outputs[0].name: demo-lm/1 has no output 'TAGS'"),
])
def test_bad_requests_are_named(server, fields, field, message):
    with pytest.raises(grpc.RpcError) as caught:
        infer(server, **fields)
    assert caught.value.code() == field and message in caught.value.details()


def test_a_refused_request_leaves_its_sequence_as_it_was(server):
    """The request is checked whole (here: an output the model does not have) before its
    words are read into the sequence."""
    def step(text: str, start: bool = False, outputs=()) -> v2.ModelInferResponse:
        request = v2.ModelInferRequest(model_name="demo-lm", **text_tensor(text),
                                       outputs=[v2.ModelInferRequest.InferRequestedOutputTensor(
                                           name=name) for name in outputs])
        request.parameters["sequence_id"].uint64_param = 41
        request.parameters["sequence_start"].bool_param = start
        return infer(server, **{f.name: v for f, v in request.ListFields()})

    step("the old", start=True)
    with pytest.raises(grpc.RpcError) as caught:
        step("cat", outputs=["TAGS"])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = np.frombuffer(step("dogs").raw_output_contents[0], "<f4")
    (whole,) = server.client.score("demo-lm", ["the old dogs"], add_eos=False)
    np.testing.assert_allclose(after, [whole.tokens[2].logprob], atol=1e-5)
