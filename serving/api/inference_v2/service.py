"""inference.GRPCInferenceService: the Open Inference Protocol (KServe V2) and Triton's
ModelConfig and ModelStreamInfer, on the same engine as recur.v1.

Tensors per task (the first dimension is the batch; -1 is any size):

    inputs   TEXT BYTES [B, 1] (UTF-8), or TOKEN_IDS INT64 [B, T] (rows padded with -1)
    lm       TOKEN_LOGPROBS FP32 [B, T] (0 past a row's TOKEN_COUNT), TOKEN_COUNT INT64 [B, 1],
             TOTAL_LOGPROB FP32 [B, 1]
    tag      TAGS BYTES [B, T] (empty past a row's TOKEN_COUNT), TAG_LOGPROBS FP32 [B, T],
             TOKEN_COUNT INT64 [B, 1]
    classify LABEL BYTES [B, 1], CLASS_PROBS FP32 [B, C] (in the order of the label set)

Request parameters: `add_eos` (bool, stateless language-model scoring, default true) and,
for stateful use, `sequence_id` (uint64 or string), `sequence_start`, `sequence_end`
(bool). A sequence maps onto an engine session: its first request (sequence_start)
creates the session from its input, later ones append to it and return the appended
tokens' log-probs, the last (sequence_end) closes it. Responses of a sequence carry the
session's `state_token` (base64) as a parameter when the server has state token keys.
A request is checked whole (inputs, parameters, requested outputs, the size of its
response) before it runs.

Sequence ids are per model, as in Triton: id 7 of one model is not id 7 of another. Within
a model they are one namespace shared by every client of the server, so an id is only as
private as it is hard to guess: clients that must not reach each other's sequences use
random string ids (or separate servers). A sequence is forgotten when its session ends
(sequence_end, expiry, eviction, its model version unloaded).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

import grpc
import numpy as np

from serving.api.inference_v2 import tensors
from serving.api.rpc.auth import peer_of
from serving.api.rpc.handlers import rpc, until_closing
from serving.api.rpc.status import code_of
from serving.engine.engine import Engine
from serving.engine.errors import EngineError, InvalidArgument, LimitExceeded, NotFound, shown
from serving.engine.inputs import Input
from serving.engine.repository import LoadedModel
from serving.engine.results import Classified, Scored, SessionStep, Tagged
from serving.model.artifact import MAX_VERSION
from serving.proto_gen.inference import grpc_service_pb2 as v2
from serving.proto_gen.inference import grpc_service_pb2_grpc as v2_grpc
from serving.proto_gen.inference import model_config_pb2 as mc

SERVICE = "GRPCInferenceService"
INPUTS = {"TEXT": ("BYTES", [1]), "TOKEN_IDS": ("INT64", [-1])}
OUTPUTS = {
    "lm": {"TOKEN_LOGPROBS": ("FP32", [-1]), "TOKEN_COUNT": ("INT64", [1]),
           "TOTAL_LOGPROB": ("FP32", [1])},
    "tag": {"TAGS": ("BYTES", [-1]), "TAG_LOGPROBS": ("FP32", [-1]),
            "TOKEN_COUNT": ("INT64", [1])},
    "classify": {"LABEL": ("BYTES", [1]), "CLASS_PROBS": ("FP32", [-1])},
}
CONFIG_TYPES = {"BYTES": mc.TYPE_STRING, "INT64": mc.TYPE_INT64, "FP32": mc.TYPE_FP32}
EXTENSIONS = ["model_configuration", "sequence", "parameters", "binary_tensor_data"]


def _server_version() -> str:
    try:
        return version("recur")
    except PackageNotFoundError:
        return "0"


class InferenceService(v2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, engine: Engine, max_message_bytes: int = 4 << 20,
                 max_sequence_id_bytes: int = 128,
                 client_of: Callable[[grpc.aio.ServicerContext], str] = peer_of):
        self.engine, self.metrics, self.client_of = engine, engine.metrics, client_of
        self.max_message_bytes, self.max_sequence_id_bytes = (max_message_bytes,
                                                              max_sequence_id_bytes)
        # (model name, sequence id) -> session id, and back; an entry leaves with its
        # session, so the map is bounded by the session table
        self.sequences: dict[tuple[str, str], str] = {}
        self._sequence_of: dict[str, tuple[str, str]] = {}
        engine.on_session_removed(self._forget)

    # -- health and metadata --------------------------------------------------------------
    @rpc(SERVICE)
    async def ServerLive(self, request, context) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    @rpc(SERVICE)
    async def ServerReady(self, request, context) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=not self.engine.closing.is_set())

    @rpc(SERVICE)
    async def ModelReady(self, request: v2.ModelReadyRequest, context) -> v2.ModelReadyResponse:
        try:
            self._model(request.name, request.version, "name", "version")
        except NotFound:
            return v2.ModelReadyResponse(ready=False)
        return v2.ModelReadyResponse(ready=not self.engine.closing.is_set())

    @rpc(SERVICE)
    async def ServerMetadata(self, request, context) -> v2.ServerMetadataResponse:
        return v2.ServerMetadataResponse(name="recur", version=_server_version(),
                                         extensions=EXTENSIONS)

    @rpc(SERVICE)
    async def ModelMetadata(self, request: v2.ModelMetadataRequest,
                            context) -> v2.ModelMetadataResponse:
        model = self._model(request.name, request.version, "name", "version")
        response = v2.ModelMetadataResponse(
            name=model.name, platform="recur_onnx",
            versions=[str(v) for v in self.engine.versions(model.name)])
        for name, (datatype, dims) in INPUTS.items():
            response.inputs.add(name=name, datatype=datatype, shape=[-1, *dims])
        for name, (datatype, dims) in OUTPUTS[model.task].items():
            response.outputs.add(name=name, datatype=datatype, shape=[-1, *dims])
        return response

    @rpc(SERVICE)
    async def ModelConfig(self, request: v2.ModelConfigRequest, context) -> v2.ModelConfigResponse:
        model = self._model(request.name, request.version, "name", "version")
        settings = self.engine.config
        config = mc.ModelConfig(name=model.name, platform="recur_onnx", backend="recur",
                                max_batch_size=settings.max_sequences_per_request)
        for name, (datatype, dims) in INPUTS.items():
            config.input.add(name=name, data_type=CONFIG_TYPES[datatype], dims=dims,
                             optional=True)  # one of the two
        for name, (datatype, dims) in OUTPUTS[model.task].items():
            config.output.add(name=name, data_type=CONFIG_TYPES[datatype], dims=dims)
        gpu = model.device.startswith("cuda")
        config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_GPU if gpu
                                  else mc.ModelInstanceGroup.KIND_CPU,
                                  gpus=[model.device_id] if gpu else [])
        delay = int(settings.max_queue_delay_ms * 1000)
        if model.sessions_allowed is None:  # a stateful model: sequences keep their state
            config.sequence_batching.max_sequence_idle_microseconds = int(
                settings.session_ttl_s * 1e6)
            config.sequence_batching.oldest.max_candidate_sequences = settings.max_sessions
            config.sequence_batching.oldest.max_queue_delay_microseconds = delay
        else:
            config.dynamic_batching.max_queue_delay_microseconds = delay
        return v2.ModelConfigResponse(config=config)

    # -- inference ------------------------------------------------------------------------
    @rpc(SERVICE)
    async def ModelInfer(self, request: v2.ModelInferRequest, context) -> v2.ModelInferResponse:
        return await self._infer(request, self.client_of(context))

    @rpc(SERVICE)
    async def ModelStreamInfer(self, requests, context) -> None:
        """Requests run in order; a failed one answers with its error_message and the
        stream goes on, as Triton's does."""
        client = self.client_of(context)
        async for request in until_closing(requests, self.engine.closing):
            try:
                response = v2.ModelStreamInferResponse(
                    infer_response=await self._infer(request, client))
            except EngineError as error:
                response = v2.ModelStreamInferResponse(
                    error_message=f"{code_of(error).name}: {error.message}",
                    infer_response=v2.ModelInferResponse(model_name=request.model_name,
                                                         id=request.id))
            await context.write(response)

    async def _infer(self, request: v2.ModelInferRequest, client: str) -> v2.ModelInferResponse:
        model = self._model(request.model_name, request.model_version, "model_name",
                            "model_version")
        inputs = self._inputs(request)
        parameters = request.parameters
        outputs = OUTPUTS[model.task]
        wanted = [o.name for o in request.outputs] or list(outputs)
        for index, name in enumerate(wanted):
            if name not in outputs:
                raise InvalidArgument(f"outputs[{index}].name", f"{model.label} has no output "
                                      f"{shown(name)} (outputs: {', '.join(outputs)})")
        sequence = _sequence_id(parameters, self.max_sequence_id_bytes)
        if sequence:
            model, tensors_out, extra = await self._sequence_step(
                model, bool(request.model_version), sequence, inputs, parameters, client)
        else:
            tensors_out, extra = await self._stateless(model, inputs, parameters), {}
        response = v2.ModelInferResponse(model_name=model.name, model_version=str(model.version),
                                         id=request.id)
        for key, value in extra.items():
            response.parameters[key].string_param = value
        for name in wanted:
            array, datatype = tensors_out[name]
            tensors.output(name, array, datatype, response)
        return response

    def _model(self, name: str, version: str, name_field: str, version_field: str):
        if version and not (version.isascii() and version.isdigit() and len(version) <= 19
                            and int(version) <= MAX_VERSION):
            raise InvalidArgument(version_field, f"must be a version number (ASCII digits) "
                                  f"or empty, got {shown(version)}")
        return self.engine.model(name, int(version or 0), name_field=name_field,
                                 version_field=version_field)

    def _inputs(self, request: v2.ModelInferRequest) -> list[Input]:
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise InvalidArgument("raw_input_contents", f"{len(raw)} entries for "
                                  f"{len(request.inputs)} inputs: give one per input, or none")
        given = {}
        for index, tensor in enumerate(request.inputs):
            field = f"inputs[{index}]"
            if tensor.name not in INPUTS:
                raise InvalidArgument(f"{field}.name", f"unknown input {shown(tensor.name)} "
                                      f"(inputs: {', '.join(INPUTS)})")
            if tensor.name in given:
                raise InvalidArgument(f"{field}.name", f"input {tensor.name!r} given twice")
            if tensor.datatype != INPUTS[tensor.name][0]:
                raise InvalidArgument(f"{field}.datatype", f"{tensor.name} is "
                                      f"{INPUTS[tensor.name][0]}, not "
                                      f"{shown(tensor.datatype)}")
            self._check_shape(tensor, field)
            given[tensor.name] = tensors.read_input(tensor, raw[index] if raw else None, field)
        if len(given) != 1:
            raise InvalidArgument("inputs", "give exactly one of TEXT (BYTES) and TOKEN_IDS "
                                  "(INT64)")
        if "TEXT" in given:
            texts = given["TEXT"].reshape(-1)
            try:
                return [Input(text=t.decode("utf-8"), field=f"inputs[TEXT][{row}]")
                        for row, t in enumerate(texts)]
            except UnicodeDecodeError as error:
                raise InvalidArgument("inputs[TEXT]", f"not UTF-8 ({error})") from None
        ids = given["TOKEN_IDS"]
        ids = ids.reshape(1, -1) if ids.ndim == 1 else ids
        if ids.ndim != 2:
            raise InvalidArgument("inputs[TOKEN_IDS].shape", f"must be [B, T], got "
                                  f"{list(ids.shape)}")
        rows = []
        for number, row in enumerate(ids):
            padding = np.flatnonzero(row == -1)
            end = int(padding[0]) if padding.size else len(row)
            if np.any(row[end:] != -1):
                raise InvalidArgument("inputs[TOKEN_IDS]", "-1 pads the end of a row only")
            rows.append(Input(ids=row[:end].tolist(), field=f"inputs[TOKEN_IDS][{number}]"))
        return rows

    def _check_shape(self, tensor, field: str) -> None:
        """The declared batch and row length against the limits, before any row is read
        (each row costs a little work: a million of them, seconds)."""
        config, shape = self.engine.config, list(tensor.shape)
        if len(shape) >= 1 and shape[0] > config.max_sequences_per_request:
            raise LimitExceeded("max_sequences_per_request", shape[0],
                                config.max_sequences_per_request, f"{field}.shape")
        if tensor.name == "TOKEN_IDS" and len(shape) >= 2 and (
                shape[-1] > config.max_tokens_per_sequence):
            raise LimitExceeded("max_tokens_per_sequence", shape[-1],
                                config.max_tokens_per_sequence, f"{field}.shape")

    async def _stateless(self, model: LoadedModel, inputs: list[Input], parameters) -> dict:
        check = self._response_limit(model)
        if model.task == "lm":
            add_eos = _bool(parameters, "add_eos", True)
            return _lm_outputs(await self.engine.score(model, inputs, add_eos, check=check))
        if model.task == "tag":
            return _tag_outputs(await self.engine.tag(model, inputs, check=check))
        return _class_outputs(await self.engine.classify(model, inputs))

    def _response_limit(self, model: LoadedModel):
        """A Check: the padded output tensors of a batch must fit in one message (an lm's
        rows are one token longer with add_eos; a tagger's tags are BYTES)."""
        per_token = 8 if model.task == "lm" else 8 + max(map(len, model.labels), default=0)

        def check(encoded) -> None:
            size = len(encoded) * (max(len(e.ids) for e in encoded) + 1) * per_token
            if size > self.max_message_bytes:
                raise LimitExceeded("max_message_bytes", size, self.max_message_bytes,
                                    "inputs", "a response of up to ", " bytes")

        return check

    def _forget(self, session_id: str) -> None:
        if (key := self._sequence_of.pop(session_id, None)) is not None:
            self.sequences.pop(key, None)

    async def _sequence_step(self, model: LoadedModel, named: bool, sequence: str,
                             inputs: list[Input], parameters, client: str
                             ) -> tuple[LoadedModel, dict, dict]:
        """(the version that served, outputs, response parameters). `named`: the request
        named its version; one that does not goes on with the version its sequence started
        on, through a rollout."""
        if len(inputs) != 1:
            raise InvalidArgument("inputs", f"a request of sequence {shown(sequence)} carries one "
                                  f"sequence (batch 1), got {len(inputs)}")
        engine, (item,) = self.engine, inputs
        start, end = (_bool(parameters, "sequence_start", False),
                      _bool(parameters, "sequence_end", False))
        key = (model.name, sequence)
        if start:
            step = await engine.create_session(model, item, client=client,
                                               check=self._response_limit(model))
            # the new session is made first: a refused start leaves the old one running
            if (old := self.sequences.get(key)) is not None and engine.has_session(old):
                engine.close_session(old)  # forgets the key too
            runs_on = model
            self.sequences[key] = step.session_id
            self._sequence_of[step.session_id] = key
        else:
            session_id = self.sequences.get(key)
            if session_id is None:
                raise InvalidArgument("parameters.sequence_id", f"sequence {shown(sequence)} "
                                      f"of model {shown(model.name)} has not started here (or "
                                      "has ended): its first request sets sequence_start=true")
            runs_on = engine.session_model(session_id, "parameters.sequence_id")
            if runs_on.name != model.name or runs_on.task != model.task or (
                    named and runs_on is not model):
                raise InvalidArgument("model_name", f"sequence {shown(sequence)} runs on "
                                      f"{runs_on.label}, not {model.label}")
            step = await engine.append(session_id, item, allow_empty=True, client=client,
                                       check=self._response_limit(runs_on))
        if end and engine.has_session(step.session_id):
            engine.close_session(step.session_id)
        extra = ({"state_token": base64.b64encode(step.state_token).decode()}
                 if step.state_token else {})
        return runs_on, _session_outputs(runs_on, step), extra


def _session_outputs(model: LoadedModel, step: SessionStep) -> dict:
    if model.task == "lm":
        scored = step.scored or Scored([], [], [], 0, 0.0)
        return _lm_outputs([scored])
    if model.task == "tag":
        tagged = step.tagged or Tagged([], [], [], np.zeros((0, 0), np.float32))
        return _tag_outputs([tagged])
    if step.classified is None:  # an empty first request: no distribution yet
        return {"LABEL": (np.array([[b""]], object), "BYTES"),
                "CLASS_PROBS": (np.zeros((1, len(model.labels)), np.float32), "FP32")}
    return _class_outputs([step.classified])


def _padded(rows: list[list], fill, dtype) -> np.ndarray:
    width = max((len(r) for r in rows), default=0)
    array = np.full((len(rows), width), fill, dtype)
    for i, row in enumerate(rows):
        array[i, : len(row)] = row
    return array


def _lm_outputs(scores: list[Scored]) -> dict:
    rows = [s.logprobs for s in scores]
    logprobs = _padded(rows, 0.0, np.float32)
    counts = np.array([[len(r)] for r in rows], np.int64)
    totals = np.array([[float(np.sum(r, dtype=np.float64))] for r in rows], np.float32)
    return {"TOKEN_LOGPROBS": (logprobs, "FP32"), "TOKEN_COUNT": (counts, "INT64"),
            "TOTAL_LOGPROB": (totals, "FP32")}


def _tag_outputs(results: list[Tagged]) -> dict:
    encoded = _padded([[t.encode() for t in r.tags] for r in results], b"", object)
    logprobs = _padded([r.logprobs for r in results], 0.0, np.float32)
    counts = np.array([[len(r.tags)] for r in results], np.int64)
    return {"TAGS": (encoded, "BYTES"), "TAG_LOGPROBS": (logprobs, "FP32"),
            "TOKEN_COUNT": (counts, "INT64")}


def _class_outputs(results: list[Classified]) -> dict:
    probs = np.exp(np.stack([r.logprobs for r in results])).astype(np.float32)
    labels = np.array([[r.label.encode()] for r in results], object)
    return {"LABEL": (labels, "BYTES"), "CLASS_PROBS": (probs, "FP32")}


def _sequence_id(parameters, max_bytes: int) -> str:
    """The sequence id as text ("" when absent or 0, which means no sequence)."""
    if "sequence_id" not in parameters:
        return ""
    value = parameters["sequence_id"]
    kind = value.WhichOneof("parameter_choice")
    if kind == "string_param":
        if len(value.string_param.encode()) > max_bytes:
            raise LimitExceeded("max_sequence_id_bytes", len(value.string_param.encode()),
                                max_bytes, "parameters.sequence_id", "", " bytes")
        return value.string_param
    if kind in ("uint64_param", "int64_param"):
        number = getattr(value, kind)
        if number < 0:
            raise InvalidArgument("parameters.sequence_id", f"must not be negative, got "
                                  f"{number}")
        return str(number) if number else ""
    raise InvalidArgument("parameters.sequence_id", "must be a uint64 or a string")


def _bool(parameters, key: str, default: bool) -> bool:
    if key not in parameters:
        return default
    value = parameters[key]
    if value.WhichOneof("parameter_choice") != "bool_param":
        raise InvalidArgument(f"parameters.{key}", "must be a bool")
    return value.bool_param
