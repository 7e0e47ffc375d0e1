"""inference.GRPCInferenceService: the Open Inference Protocol (KServe V2) and Triton's
ModelConfig and ModelStreamInfer, on the same models, batcher and sessions as recur.v1.

Tensors per task (the first dimension is the batch; -1 is any size):

    inputs   TEXT BYTES [B, 1] (UTF-8), or TOKEN_IDS INT64 [B, T] (rows padded with -1)
    lm       TOKEN_LOGPROBS FP32 [B, T] (0 past a row's TOKEN_COUNT), TOKEN_COUNT INT64 [B, 1],
             TOTAL_LOGPROB FP32 [B, 1]
    tag      TAGS BYTES [B, T] (empty past a row's TOKEN_COUNT), TAG_LOGPROBS FP32 [B, T],
             TOKEN_COUNT INT64 [B, 1]
    classify LABEL BYTES [B, 1], CLASS_PROBS FP32 [B, C] (in the order of the label set)

Request parameters: `add_eos` (bool, stateless language-model scoring, default true) and,
for stateful use, `sequence_id` (uint64 or string), `sequence_start`, `sequence_end`
(bool). A sequence maps onto a Recur session: its first request (sequence_start) creates
the session from its input, later ones append to it and return the appended tokens'
log-probs, the last (sequence_end) closes it. Responses of a sequence carry the session's
`state_token` (base64) as a parameter when the server has state token keys.
"""

from __future__ import annotations

import asyncio
import base64
from collections import OrderedDict
from importlib.metadata import PackageNotFoundError, version

import grpc
import numpy as np

from serving import tensors
from serving.config import ServerConfig
from serving.errors import ServiceError, invalid
from serving.metrics import Metrics
from serving.proto_gen.inference import grpc_service_pb2 as v2
from serving.proto_gen.inference import grpc_service_pb2_grpc as v2_grpc
from serving.proto_gen.inference import model_config_pb2 as mc
from serving.proto_gen.recur.v1 import recur_pb2 as pb
from serving.repository import LoadedModel, ModelRepository
from serving.services import gather, rpc, until_closing
from serving.services.encoders import ClassifierService, TaggerService
from serving.services.language_model import LanguageModelService

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
    def __init__(self, repository: ModelRepository, config: ServerConfig, metrics: Metrics,
                 language_model: LanguageModelService, tagger: TaggerService,
                 classifier: ClassifierService, closing: asyncio.Event):
        self.repository, self.config, self.metrics = repository, config, metrics
        self.language_model, self.closing = language_model, closing
        self.encoders = {"tag": tagger, "classify": classifier}
        self.sequences: OrderedDict[str, str] = OrderedDict()  # sequence id -> session id

    # -- health and metadata --------------------------------------------------------------
    @rpc(SERVICE)
    async def ServerLive(self, request, context) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    @rpc(SERVICE)
    async def ServerReady(self, request, context) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=not self.closing.is_set())

    @rpc(SERVICE)
    async def ModelReady(self, request: v2.ModelReadyRequest, context) -> v2.ModelReadyResponse:
        try:
            self._model(request.name, request.version, "name", "version")
        except ServiceError as error:
            if error.code == grpc.StatusCode.NOT_FOUND:
                return v2.ModelReadyResponse(ready=False)
            raise
        return v2.ModelReadyResponse(ready=not self.closing.is_set())

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
            versions=[str(v) for v in sorted(self.repository.models[model.name])])
        for name, (datatype, dims) in INPUTS.items():
            response.inputs.add(name=name, datatype=datatype, shape=[-1, *dims])
        for name, (datatype, dims) in OUTPUTS[model.task].items():
            response.outputs.add(name=name, datatype=datatype, shape=[-1, *dims])
        return response

    @rpc(SERVICE)
    async def ModelConfig(self, request: v2.ModelConfigRequest, context) -> v2.ModelConfigResponse:
        model = self._model(request.name, request.version, "name", "version")
        config = mc.ModelConfig(name=model.name, platform="recur_onnx", backend="recur",
                                max_batch_size=self.config.max_sequences_per_request)
        for name, (datatype, dims) in INPUTS.items():
            config.input.add(name=name, data_type=CONFIG_TYPES[datatype], dims=dims,
                             optional=True)  # one of the two
        for name, (datatype, dims) in OUTPUTS[model.task].items():
            config.output.add(name=name, data_type=CONFIG_TYPES[datatype], dims=dims)
        gpu = model.runtime.device.startswith("cuda")
        config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_GPU if gpu
                                  else mc.ModelInstanceGroup.KIND_CPU,
                                  gpus=[model.runtime.device_id] if gpu else [])
        delay = int(self.config.max_queue_delay_ms * 1000)
        if model.sessions_allowed is None:  # a stateful model: sequences keep their state
            config.sequence_batching.max_sequence_idle_microseconds = int(
                self.config.session_ttl_s * 1e6)
            config.sequence_batching.oldest.max_candidate_sequences = self.config.max_sessions
            config.sequence_batching.oldest.max_queue_delay_microseconds = delay
        else:
            config.dynamic_batching.max_queue_delay_microseconds = delay
        return v2.ModelConfigResponse(config=config)

    # -- inference ------------------------------------------------------------------------
    @rpc(SERVICE)
    async def ModelInfer(self, request: v2.ModelInferRequest, context) -> v2.ModelInferResponse:
        return await self._infer(request)

    @rpc(SERVICE)
    async def ModelStreamInfer(self, requests, context) -> None:
        """Requests run in order; a failed one answers with its error_message and the
        stream goes on, as Triton's does."""
        async for request in until_closing(requests, self.closing):
            try:
                response = v2.ModelStreamInferResponse(infer_response=await self._infer(request))
            except ServiceError as error:
                response = v2.ModelStreamInferResponse(
                    error_message=f"{error.code.name}: {error.message}",
                    infer_response=v2.ModelInferResponse(model_name=request.model_name,
                                                         id=request.id))
            await context.write(response)

    async def _infer(self, request: v2.ModelInferRequest) -> v2.ModelInferResponse:
        model = self._model(request.model_name, request.model_version, "model_name",
                            "model_version")
        inputs = self._inputs(request)
        parameters = request.parameters
        sequence = _sequence_id(parameters)
        if sequence:
            outputs, extra = await self._sequence_step(model, sequence, inputs, parameters)
        else:
            outputs, extra = await self._stateless(model, inputs, parameters), {}
        response = v2.ModelInferResponse(model_name=model.name, model_version=str(model.version),
                                         id=request.id)
        for key, value in extra.items():
            response.parameters[key].string_param = value
        wanted = [o.name for o in request.outputs] or list(outputs)
        for index, name in enumerate(wanted):
            if name not in outputs:
                raise invalid(f"outputs[{index}].name", f"{model.label} has no output {name!r} "
                              f"(outputs: {', '.join(outputs)})")
            array, datatype = outputs[name]
            tensors.output(name, array, datatype, response)
        return response

    def _model(self, name: str, version: str, name_field: str, version_field: str):
        if version and not version.isdigit():
            raise invalid(version_field, f"must be an integer version or empty, got {version!r}")
        return self.repository.get(name, int(version or 0), name_field=name_field,
                                   version_field=version_field)

    def _inputs(self, request: v2.ModelInferRequest) -> list[pb.Input]:
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise invalid("raw_input_contents", f"{len(raw)} entries for {len(request.inputs)} "
                          "inputs: give one per input, or none")
        given = {}
        for index, tensor in enumerate(request.inputs):
            field = f"inputs[{index}]"
            if tensor.name not in INPUTS:
                raise invalid(f"{field}.name", f"unknown input {tensor.name!r} (inputs: "
                              f"{', '.join(INPUTS)})")
            if tensor.name in given:
                raise invalid(f"{field}.name", f"input {tensor.name!r} given twice")
            if tensor.datatype != INPUTS[tensor.name][0]:
                raise invalid(f"{field}.datatype", f"{tensor.name} is "
                              f"{INPUTS[tensor.name][0]}, not {tensor.datatype!r}")
            given[tensor.name] = tensors.read_input(tensor, raw[index] if raw else None, field)
        if len(given) != 1:
            raise invalid("inputs", "give exactly one of TEXT (BYTES) and TOKEN_IDS (INT64)")
        if "TEXT" in given:
            texts = given["TEXT"].reshape(-1)
            try:
                return [pb.Input(text=t.decode("utf-8")) for t in texts]
            except UnicodeDecodeError as error:
                raise invalid("inputs[TEXT]", f"not UTF-8 ({error})") from None
        ids = given["TOKEN_IDS"]
        ids = ids.reshape(1, -1) if ids.ndim == 1 else ids
        if ids.ndim != 2:
            raise invalid("inputs[TOKEN_IDS].shape", f"must be [B, T], got {list(ids.shape)}")
        rows = []
        for row in ids:
            padding = np.flatnonzero(row == -1)
            end = int(padding[0]) if padding.size else len(row)
            if np.any(row[end:] != -1):
                raise invalid("inputs[TOKEN_IDS]", "-1 pads the end of a row only")
            rows.append(pb.Input(token_ids=pb.TokenIds(ids=row[:end].tolist())))
        return rows

    async def _stateless(self, model: LoadedModel, inputs: list[pb.Input], parameters) -> dict:
        if model.task == "lm":
            add_eos = _bool(parameters, "add_eos", True)
            lm = self.language_model
            encoded = lm.encode_inputs(model, inputs, "inputs", add_eos)
            model.batcher.reserve(len(encoded))
            scores = await gather(*(lm.score_sequence(model, e, add_eos) for e in encoded))
            return _lm_outputs([[t.logprob for t in s.tokens] for s in scores])
        service = self.encoders[model.task]
        request_type = pb.TagRequest if model.task == "tag" else pb.ClassifyRequest
        model, results = await service.run(request_type(
            model=pb.ModelRef(name=model.name, version=model.version), inputs=inputs))
        names = model.runtime.labels.names
        if model.task == "tag":
            tags = [[names[i] for i in logprobs.argmax(axis=1)] for _, logprobs in results]
            chosen = [logprobs.max(axis=1).tolist() for _, logprobs in results]
            return _tag_outputs(tags, chosen)
        probs = np.exp(np.stack([logprobs for _, logprobs in results])).astype(np.float32)
        labels = np.array([[names[int(p.argmax())].encode()] for p in probs], object)
        return {"LABEL": (labels, "BYTES"), "CLASS_PROBS": (probs, "FP32")}

    async def _sequence_step(self, model: LoadedModel, sequence: str, inputs: list[pb.Input],
                             parameters) -> tuple[dict, dict]:
        if len(inputs) != 1:
            raise invalid("inputs", f"a request of sequence {sequence} carries one sequence "
                          f"(batch 1), got {len(inputs)}")
        lm, (item,) = self.language_model, inputs
        if _bool(parameters, "sequence_start", False):
            if (old := self.sequences.pop(sequence, None)) and old in lm.sessions:
                lm.sessions.close(old)
            response = await lm.open_session(model, item, 0, "inputs[0]")
            self.sequences[sequence] = response.session_id
            while len(self.sequences) > self.config.max_sessions:
                self.sequences.popitem(last=False)
        else:
            session_id = self.sequences.get(sequence)
            if session_id is None:
                raise invalid("parameters.sequence_id", f"sequence {sequence} has not started "
                              "here: its first request sets sequence_start=true")
            session = await lm.find_session(session_id, b"")
            if session.model is not model:
                raise invalid("model_name", f"sequence {sequence} runs on "
                              f"{session.model.label}, not {model.label}")
            response = await lm.append_to(session, item, 0, "inputs[0]", allow_empty=True)
        if _bool(parameters, "sequence_end", False):
            self.sequences.pop(sequence, None)
            if response.session_id in lm.sessions:
                lm.sessions.close(response.session_id)
        extra = ({"state_token": base64.b64encode(response.state_token).decode()}
                 if response.state_token else {})
        if model.task == "lm":
            return _lm_outputs([[t.logprob for t in response.tokens]]), extra
        if model.task == "tag":
            return _tag_outputs([[t.tag for t in response.tags]],
                                [[t.logprob for t in response.tags]]), extra
        names = model.runtime.labels.names
        by_label = {c.label: c.probability for c in response.classes}
        probs = np.array([[by_label.get(n, 0.0) for n in names]], np.float32)
        label = max(by_label, key=by_label.get) if by_label else ""
        return {"LABEL": (np.array([[label.encode()]], object), "BYTES"),
                "CLASS_PROBS": (probs, "FP32")}, extra


def _padded(rows: list[list], fill, dtype) -> np.ndarray:
    width = max((len(r) for r in rows), default=0)
    array = np.full((len(rows), width), fill, dtype)
    for i, row in enumerate(rows):
        array[i, : len(row)] = row
    return array


def _lm_outputs(rows: list[list[float]]) -> dict:
    logprobs = _padded(rows, 0.0, np.float32)
    counts = np.array([[len(r)] for r in rows], np.int64)
    totals = np.array([[float(np.sum(r, dtype=np.float64))] for r in rows], np.float32)
    return {"TOKEN_LOGPROBS": (logprobs, "FP32"), "TOKEN_COUNT": (counts, "INT64"),
            "TOTAL_LOGPROB": (totals, "FP32")}


def _tag_outputs(tags: list[list[str]], logprobs: list[list[float]]) -> dict:
    encoded = _padded([[t.encode() for t in row] for row in tags], b"", object)
    return {"TAGS": (encoded, "BYTES"), "TAG_LOGPROBS": (_padded(logprobs, 0.0, np.float32),
                                                         "FP32"),
            "TOKEN_COUNT": (np.array([[len(r)] for r in tags], np.int64), "INT64")}


def _sequence_id(parameters) -> str:
    """The sequence id as text ("" when absent or 0, which means no sequence)."""
    if "sequence_id" not in parameters:
        return ""
    value = parameters["sequence_id"]
    kind = value.WhichOneof("parameter_choice")
    if kind == "string_param":
        return value.string_param
    if kind in ("uint64_param", "int64_param"):
        number = getattr(value, kind)
        if number < 0:
            raise invalid("parameters.sequence_id", f"must not be negative, got {number}")
        return str(number) if number else ""
    raise invalid("parameters.sequence_id", "must be a uint64 or a string")


def _bool(parameters, key: str, default: bool) -> bool:
    if key not in parameters:
        return default
    value = parameters[key]
    if value.WhichOneof("parameter_choice") != "bool_param":
        raise invalid(f"parameters.{key}", "must be a bool")
    return value.bool_param
