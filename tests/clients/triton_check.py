"""Runs under a separate virtual environment with tritonclient[grpc] (which pins
protobuf < 7): tritonclient talks to a Recur server, and its own descriptors describe the
protocol's messages. Prints one JSON object for tests/test_inference_v2.py.

usage: python triton_check.py HOST:PORT MODEL TEXT1 TEXT2 TEXT3
"""

import json
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from google.protobuf.json_format import MessageToDict
from tritonclient.grpc import model_config_pb2, service_pb2


def text_input(text: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[text.encode()]], dtype=object))
    return tensor


def logprobs(result) -> list[float]:
    count = int(result.as_numpy("TOKEN_COUNT")[0, 0])
    return result.as_numpy("TOKEN_LOGPROBS")[0, :count].tolist()


def descriptors() -> dict:
    """Field names, numbers and types of every message, and the service's methods."""
    fields = {}
    for module in (service_pb2, model_config_pb2):
        pending = list(module.DESCRIPTOR.message_types_by_name.values())
        while pending:
            message = pending.pop()
            pending.extend(message.nested_types)
            fields[message.full_name] = {f.name: [f.number, f.type] for f in message.fields}
    service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    methods = {m.name: [m.input_type.full_name, m.output_type.full_name]
               for m in service.methods}
    return {"fields": fields, "methods": methods}


def main() -> None:
    url, model, *texts = sys.argv[1:]
    client = grpcclient.InferenceServerClient(url)
    out = {"live": client.is_server_live(), "ready": client.is_server_ready(),
           "model_ready": client.is_model_ready(model),
           "unknown_model_ready": client.is_model_ready("no-such-model"),
           "server": client.get_server_metadata(as_json=True),
           "metadata": client.get_model_metadata(model, as_json=True)}
    config = client.get_model_config(model)  # decoded by Triton's own message classes
    out["config"] = MessageToDict(config.config, preserving_proto_field_name=True)
    out["config_has_sequence_batching"] = config.config.HasField("sequence_batching")
    # stateless: both texts in one batch
    batch = grpcclient.InferInput("TEXT", [2, 1], "BYTES")
    batch.set_data_from_numpy(np.array([[texts[0].encode()], [texts[1].encode()]], object))
    result = client.infer(model, [batch])
    counts = result.as_numpy("TOKEN_COUNT")[:, 0].tolist()
    out["stateless"] = [result.as_numpy("TOKEN_LOGPROBS")[i, :c].tolist()
                        for i, c in enumerate(counts)]
    out["stateless_totals"] = result.as_numpy("TOTAL_LOGPROB")[:, 0].tolist()
    # a 3-request sequence
    sequence = []
    for index, text in enumerate(texts):
        result = client.infer(model, [text_input(text)], sequence_id=1042,
                              sequence_start=index == 0, sequence_end=index == len(texts) - 1)
        sequence.append(logprobs(result))
    out["sequence"] = sequence
    try:  # the sequence ended: its id is gone
        client.infer(model, [text_input(texts[0])], sequence_id=1042)
        out["after_end"] = "accepted"
    except grpcclient.InferenceServerException as error:
        out["after_end"] = f"{error.status()}: {error.message()}"
    # the same sequence over one stream
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    for index, text in enumerate(texts):
        client.async_stream_infer(model, [text_input(text)], sequence_id="stream-7",
                                  sequence_start=index == 0,
                                  sequence_end=index == len(texts) - 1)
    streamed = []
    for _ in texts:
        result, error = results.get(timeout=30)
        streamed.append(f"error: {error}" if error else logprobs(result))
    client.stop_stream()
    out["streamed"] = streamed
    # the extensions: statistics (perf_analyzer's server-side numbers), the repository
    out["statistics"] = client.get_inference_statistics(model, as_json=True)
    out["index"] = client.get_model_repository_index(as_json=True)
    try:  # the server runs without model control
        client.unload_model(model)
        out["unload"] = "accepted"
    except grpcclient.InferenceServerException as error:
        out["unload"] = f"{error.status()}: {error.message()}"
    out["descriptors"] = descriptors()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
