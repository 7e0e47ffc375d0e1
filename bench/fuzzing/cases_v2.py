"""Generated requests of the Open Inference Protocol (KServe V2 over gRPC) and of gRPC
health, valid and hostile, as cases.py's are for recur.v1."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

import numpy as np

from bench.fuzzing import values as val
from bench.fuzzing.case import Case, Context, mutated, utf8
from bench.fuzzing.values import chance
from serving.proto_gen.inference import grpc_service_pb2 as v2

HEALTH_SERVICES = ["", "liveness", "recur.v1.LanguageModel", "recur.v1.Tagger",
                   "recur.v1.Classifier", "recur.v1.Models", "inference.GRPCInferenceService"]
OUTPUTS = {"lm": ["TOKEN_LOGPROBS", "TOKEN_COUNT", "TOTAL_LOGPROB"],
           "tag": ["TAGS", "TAG_LOGPROBS", "TOKEN_COUNT"], "classify": ["LABEL", "CLASS_PROBS"]}
# a language model's outputs given only when named, in sequences (refused in stateless ones)
NEXT_OUTPUTS = ["NEXT_TOKEN_IDS", "NEXT_TOKEN_LOGPROBS", "NEXT_LOGPROBS"]


def bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def v2_text(request: v2.ModelInferRequest, texts: list[bytes], raw: bool) -> None:
    tensor = request.inputs.add(name="TEXT", datatype="BYTES", shape=[len(texts), 1])
    if raw:
        request.raw_input_contents.append(bytes_tensor(texts))
    else:
        tensor.contents.bytes_contents.extend(texts)


def v2_ids(request: v2.ModelInferRequest, rows: list[list[int]], raw: bool) -> None:
    width = max((len(r) for r in rows), default=0)
    array = np.full((len(rows), width), -1, np.int64)
    for i, row in enumerate(rows):
        array[i, : len(row)] = row
    tensor = request.inputs.add(name="TOKEN_IDS", datatype="INT64", shape=list(array.shape))
    if raw:
        request.raw_input_contents.append(array.astype("<i8").tobytes())
    else:
        tensor.contents.int64_contents.extend(array.reshape(-1).tolist())


def v2_infer(rng: random.Random, ctx: Context) -> tuple[object, str]:
    """A ModelInferRequest: valid, or with one or two hostile mutations."""
    model = rng.choice(ctx.served)
    request = v2.ModelInferRequest(model_name=model.name,
                                   model_version=rng.choice(["", "", str(model.versions[-1])]),
                                   id=rng.choice(["", "", "r1", "请求"]))
    raw = chance(rng, 0.6)
    batch = rng.choice([1, 1, 2, 4])
    if chance(rng, 0.5):
        v2_text(request, [val.text(rng).encode() for _ in range(batch)], raw)
    else:
        v2_ids(request, [val.ids(rng) for _ in range(batch)], raw)
    if chance(rng, 0.3):
        for name in rng.sample(OUTPUTS[model.task], rng.randint(1, len(OUTPUTS[model.task]))):
            request.outputs.add(name=name)
    if model.task == "lm" and chance(rng, 0.3):
        request.parameters["add_eos"].bool_param = chance(rng, 0.5)

    def reset(m):
        m.ClearField("inputs")
        m.ClearField("raw_input_contents")

    def huge_bytes(rng, m):
        reset(m)
        shape = rng.choice([[1 << 26], [1 << 13, 1 << 13], [1 << 25, 2], [1 << 24, 4],
                            [1 << 22, 1]])
        tensor = m.inputs.add(name="TEXT", datatype="BYTES", shape=shape)
        if chance(rng, 0.8):
            m.raw_input_contents.append(bytes_tensor([b"w1"]))
        else:
            tensor.contents.bytes_contents.append(b"w1")

    def huge_numeric(rng, m):
        reset(m)
        shape = rng.choice([[1 << 26], [1 << 20, 64], [1, 1 << 26]])
        m.inputs.add(name="TOKEN_IDS", datatype="INT64", shape=shape)
        m.raw_input_contents.append(struct.pack("<q", 2))

    def first(m) -> v2.ModelInferRequest.InferInputTensor:
        if not m.inputs:
            v2_ids(m, [val.ids(rng)], chance(rng, 0.6))
        return m.inputs[0]

    def bad_shape(rng, m):
        shape = rng.choice([[1 << 40], [1 << 62, 4], [2**63 - 1], [-1], [1, -3], [],
                            [1] * 40, [0, 5], [0], [2**62, 2**62], [-(2**63)]])
        first(m).ClearField("shape")
        m.inputs[0].shape.extend(shape)

    def bad_prefix(rng, m):
        reset(m)
        m.inputs.add(name="TEXT", datatype="BYTES", shape=rng.choice([[1, 1], [2, 1], [1]]))
        raw = rng.choice([
            struct.pack("<I", 1000) + b"w1 w2", struct.pack("<I", 0xFFFFFFFF) + b"w1",
            b"\x02\x00", struct.pack("<I", 2) + b"w1" + b"trailing", b"",
            struct.pack("<I", 0x7FFFFFFF), struct.pack("<I", 2) + b"w1" + b"\x05\x00"])
        m.raw_input_contents.append(raw)

    def bad_datatype(rng, m):
        tensor = first(m)
        tensor.datatype = rng.choice(["INT64", "FP32", "STRING", "", "bytes", "BYTES ",
                                      "INT32", "UINT64", "BOOL", "FP16", "INT128", "BF16"]
                                     if tensor.name == "TEXT" else
                                     ["INT32", "FP32", "UINT64", "BYTES", "INT128", "", "int64"])

    def bad_name(rng, m):
        first(m).name = rng.choice(["TEXTS", "", "text", "INPUT0", "TOKEN_IDS\x00",
                                       val.long_string(rng)])

    def both(rng, m):
        if first(m).name == "TEXT":
            v2_ids(m, [val.ids(rng)], bool(m.raw_input_contents))
        else:
            v2_text(m, [b"w1"], bool(m.raw_input_contents))

    def duplicate(rng, m):
        m.inputs.add().CopyFrom(first(m))
        if m.raw_input_contents:
            m.raw_input_contents.append(m.raw_input_contents[0])

    def no_inputs(rng, m):
        reset(m)

    def raw_count(rng, m):
        m.raw_input_contents.append(rng.randbytes(rng.randint(0, 16)))

    def bad_output(rng, m):
        m.outputs.add(name=rng.choice(["LOGITS", "", "text", "TAGS", "LABEL", "TOKEN_LOGPROBS",
                                       "TOKEN_COUNT", *NEXT_OUTPUTS, val.long_string(rng)]))
        if chance(rng, 0.5):
            m.outputs.add(name=m.outputs[0].name)

    def bad_utf8(rng, m):
        reset(m)
        v2_text(m, [rng.choice(val.INVALID_UTF8) for _ in range(rng.randint(1, 3))],
                chance(rng, 0.6))

    def odd_ids(rng, m):
        reset(m)
        kind = rng.randrange(5)
        if kind == 0:
            v2_ids(m, [val.odd_ids(rng)], chance(rng, 0.6))
        elif kind == 1:  # -1 inside a row, not only at its end
            v2_ids(m, [[3, -1, 4, 5]], chance(rng, 0.6))
        elif kind == 2:
            m.inputs.add(name="TOKEN_IDS", datatype="INT64", shape=rng.choice([[1, 1, 3], [3]]))
            m.raw_input_contents.append(np.array([2, 3, 4], "<i8").tobytes())
        elif kind == 3:
            v2_ids(m, [[]], chance(rng, 0.6))
        else:
            v2_ids(m, [val.ids(rng, 1, 3) for _ in range(ctx.limits.max_sequences + 1)], True)

    def odd_parameter(rng, m):
        key = rng.choice(["add_eos", "sequence_start", "sequence_end", "sequence_id",
                          "top_k", "unknown", val.long_string(rng)])
        value = m.parameters[key]
        kind = rng.randrange(5)
        if kind == 0:
            value.string_param = rng.choice(["true", "", val.long_string(rng)])
        elif kind == 1:
            value.int64_param = rng.choice([-1, 0, 1, 2**63 - 1, -(2**63)])
        elif kind == 2:
            value.double_param = rng.choice([float("nan"), 1.0, -0.0])
        elif kind == 3:
            value.uint64_param = rng.choice([0, 1, 2**64 - 1])
        else:
            value.bool_param = chance(rng, 0.5)

    def sequence(rng, m):  # a random sequence, mostly never started here
        if chance(rng, 0.5):
            m.parameters["sequence_id"].uint64_param = rng.choice(
                [rng.randint(1, 2**40), 2**64 - 1, 2**63])
        else:
            m.parameters["sequence_id"].string_param = rng.choice(
                [f"h-{rng.randrange(10**6)}", "0", "-1", "ü" * 65, val.long_string(rng)])
        for key in ("sequence_start", "sequence_end"):
            if chance(rng, 0.5):
                m.parameters[key].bool_param = chance(rng, 0.5)
        if chance(rng, 0.4):  # the next-token outputs, of any K (0 and past V refused)
            for name in rng.sample(NEXT_OUTPUTS, rng.randint(1, len(NEXT_OUTPUTS))):
                m.outputs.add(name=name)
            if chance(rng, 0.7):
                m.parameters["top_k"].int64_param = rng.choice([1, 3, 0, -1, 10**6, 2**63 - 1])

    def odd_version(rng, m):
        m.model_version = val.v2_version(rng, (1, 2)) or rng.choice(val.V2_VERSIONS)

    def odd_name(rng, m):
        m.model_name = val.model_name(rng, [], ["nope"])

    def long_id(rng, m):
        m.id = val.long_string(rng)

    def many_rows(rng, m):
        reset(m)
        v2_text(m, [b"w1 w2"] * rng.choice([ctx.limits.max_sequences + 1, 2000]),
                chance(rng, 0.6))

    def long_text(rng, m):
        reset(m)
        v2_text(m, [val.odd_text(rng).encode()], chance(rng, 0.6))

    mutators = [
        ("huge declared BYTES shape, few bytes", huge_bytes),
        ("huge declared INT64 shape, few bytes", huge_numeric),
        ("odd shape", bad_shape), ("BYTES with a bad length prefix", bad_prefix),
        ("BYTES with a bad length prefix", bad_prefix), ("wrong datatype", bad_datatype),
        ("unknown input name", bad_name), ("both inputs", both),
        ("duplicate input", duplicate), ("no inputs", no_inputs),
        ("raw contents for the wrong number of inputs", raw_count),
        ("unknown or repeated output", bad_output), ("TEXT with invalid UTF-8", bad_utf8),
        ("odd TOKEN_IDS", odd_ids), ("odd parameter", odd_parameter),
        ("sequence mix", sequence), ("sequence mix", sequence),
        ("odd model version", odd_version), ("odd model version", odd_version),
        ("odd model name", odd_name), ("4 KB+ request id", long_id),
        ("too many rows", many_rows), ("odd text", long_text),
        ("invalid UTF-8 model version",
         utf8(lambda m, s: setattr(m, "model_version", s))),
        ("invalid UTF-8 sequence id",
         utf8(lambda m, s: setattr(m.parameters["sequence_id"], "string_param", s))),
    ]
    return mutated(rng, request, mutators, p=0.7)


def model_infer(rng: random.Random, ctx: Context) -> Case:
    request, label = v2_infer(rng, ctx)
    return Case("GRPCInferenceService.ModelInfer", label, request)


def model_stream_infer(rng: random.Random, ctx: Context) -> Case:
    messages, labels = [], []
    for i in range(rng.choice([0, 1, 2, 3, 5]) if chance(rng, 0.3) else rng.randint(1, 3)):
        request, label = v2_infer(rng, ctx)
        messages.append(request)
        labels.append(f"request {i}: {label}")
    return Case("GRPCInferenceService.ModelStreamInfer", "; ".join(labels) or "no requests",
                messages)


def _named(rng: random.Random, ctx: Context, message_type, rpc: str) -> Case:
    message = message_type(name=val.model_name(rng, ctx.names(), ["nope"]),
                           version=val.v2_version(rng, (1, 2)))
    label = "valid" if ctx.model(message.name) and (
        not message.version or message.version in ("1", "2")) else "odd name or version"
    if chance(rng, 0.05):
        return Case(rpc, "invalid UTF-8 name", val.with_invalid_utf8(
            rng, message, lambda m, s: setattr(m, "name", s)))
    if chance(rng, 0.05):
        return Case(rpc, "invalid UTF-8 version", val.with_invalid_utf8(
            rng, message, lambda m, s: setattr(m, "version", s)))
    return Case(rpc, label, message)


def model_metadata(rng, ctx) -> Case:
    return _named(rng, ctx, v2.ModelMetadataRequest, "GRPCInferenceService.ModelMetadata")


def model_config(rng, ctx) -> Case:
    return _named(rng, ctx, v2.ModelConfigRequest, "GRPCInferenceService.ModelConfig")


def model_ready(rng, ctx) -> Case:
    return _named(rng, ctx, v2.ModelReadyRequest, "GRPCInferenceService.ModelReady")


def model_statistics(rng, ctx) -> Case:
    return _named(rng, ctx, v2.ModelStatisticsRequest, "GRPCInferenceService.ModelStatistics")


def repository_model(message_type, rpc: str) -> Callable:
    """A load or unload (refused: the fuzzed server runs without model control)."""
    def generate(rng, ctx) -> Case:
        message = message_type(model_name=val.model_name(rng, ctx.names(), ["nope"]))
        if chance(rng, 0.1):
            message.repository_name = "elsewhere"
        if chance(rng, 0.1):
            message.parameters["config"].string_param = "{}"
        return Case(rpc, "refused (no model control)", message)
    return generate


def empty_request(rpc: str, message_type) -> Callable:
    def generate(rng, ctx) -> Case:
        if chance(rng, 0.2):
            return Case(rpc, "unknown fields", b"\x08\x01\x12\x03abc")
        return Case(rpc, "valid", message_type())
    return generate


def _health_service(rng: random.Random) -> tuple[object, str]:
    from grpc_health.v1 import health_pb2

    roll = rng.random()
    if roll < 0.7:
        return health_pb2.HealthCheckRequest(service=rng.choice(HEALTH_SERVICES)), "valid"
    if roll < 0.85:
        return health_pb2.HealthCheckRequest(service=rng.choice(
            ["nope", "recur.v1.languagemodel", " ", "\x00", "grpc.health.v1.Health"])), \
            "unknown service"
    if roll < 0.95:
        return health_pb2.HealthCheckRequest(service=val.long_string(rng)), "4 KB+ service"
    return val.with_invalid_utf8(rng, health_pb2.HealthCheckRequest(),
                                 lambda m, s: setattr(m, "service", s)), "invalid UTF-8 service"


def health_check(rng, ctx) -> Case:
    request, label = _health_service(rng)
    return Case("Health.Check", label, request)


def health_watch(rng, ctx) -> Case:
    request, label = _health_service(rng)
    return Case("Health.Watch", label, request, first_only=True)


def health_list(rng, ctx) -> Case:
    from grpc_health.v1 import health_pb2

    return Case("Health.List", "valid", health_pb2.HealthListRequest())
