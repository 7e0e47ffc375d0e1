"""The Open Inference Protocol (KServe V2) with Triton's extensions, once, for both of its
bindings: service.py (gRPC) and rest.py (HTTP/JSON) translate their messages into the
plain values here and back. One InferenceCore serves both in a server, so a sequence
started over one binding continues over the other.

Tensors per task (the first dimension is the batch; -1 is any size):

    inputs   TEXT BYTES [B, 1] (UTF-8), or TOKEN_IDS INT64 [B, T] (rows padded with -1),
             which metadata and ModelConfig leave out (see DECLARED)
    lm       TOKEN_LOGPROBS FP32 [B, T] (0 past a row's TOKEN_COUNT), TOKEN_COUNT INT64 [B, 1],
             TOTAL_LOGPROB FP32 [B, 1]; in a sequence, only when asked for by name (see
             NEXT_OUTPUTS): NEXT_TOKEN_IDS INT64 [B, K] and NEXT_TOKEN_LOGPROBS FP32 [B, K]
             (the K most likely next tokens, most likely first), NEXT_LOGPROBS FP32 [B, V]
    tag      TAGS BYTES [B, T] (empty past a row's TOKEN_COUNT), TAG_LOGPROBS FP32 [B, T],
             TOKEN_COUNT INT64 [B, 1]
    classify LABEL BYTES [B, 1], CLASS_PROBS FP32 [B, C] (in the order of the label set)

Request parameters: `add_eos` (bool, stateless language-model scoring, default true) and,
for stateful use, `sequence_id` (uint64 or string), `sequence_start`, `sequence_end`
(bool). A sequence maps onto an engine session: its first request (sequence_start)
creates the session from its input, later ones append to it and return the appended
tokens' log-probs, the last (sequence_end) closes it. Responses of a sequence carry the
session's `state_token` (base64) as a parameter when the server has state token keys.
The NEXT_ outputs are the distribution after the sequence's tokens so far, so a client
continues without another call: K is the parameter `top_k` (int64, 1 to the vocabulary
size, default 1: the argmax token, to feed back as TOKEN_IDS; read only when a top-k
output is asked for). They are for sequences only (a stateless score reads no
distribution after its last token): a one-request sequence (sequence_start and
sequence_end together) gives one text's.
A request is checked whole (inputs, parameters, requested outputs, the size of its
response as its binding writes it: raw bytes, or JSON text at up to six times more a
value) before it runs.

Sequence ids are per model, as in Triton: id 7 of one model is not id 7 of another. Within
a model they are one namespace shared by every client of the server, so an id is only as
private as it is hard to guess: clients that must not reach each other's sequences use
random string ids (or separate servers). A sequence is forgotten when its session ends
(sequence_end, expiry, eviction, its model version unloaded).

Descriptions (server and model metadata, ModelConfig, ModelStatistics, the repository
index) are given as the JSON objects of Triton's HTTP protocol, whose names are the
protobuf messages' own: the HTTP binding sends them as they are, the gRPC one parses them
into its messages.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np

from serving.api.inference_v2.messages import InferRequest, InferResult, InputTensor, OutputTensor
from serving.api.inference_v2.outputs import (
    class_outputs,
    lm_outputs,
    session_outputs,
    statistics_json,
    tag_outputs,
)
from serving.api.inference_v2.parameters import flag, read_top_k, sequence_id, version_number
from serving.engine.engine import Check, Engine
from serving.engine.errors import InvalidArgument, LimitExceeded, NotFound, shown
from serving.engine.inputs import Input
from serving.engine.repository import LoadedModel

INPUTS = {"TEXT": ("BYTES", [1]), "TOKEN_IDS": ("INT64", [-1])}
# What metadata and ModelConfig declare: TEXT, required; TOKEN_IDS is accepted in its place
# but not declared. Tools that make requests from the declarations send every input
# declared, optional or not, and cannot make one of a dynamic shape up (perf_analyzer:
# src/data_loader.cc, DataLoader::GenerateData), so a declared alternative would make
# every generated request fail.
DECLARED = ("TEXT",)
OUTPUTS = {
    "lm": {"TOKEN_LOGPROBS": ("FP32", [-1]), "TOKEN_COUNT": ("INT64", [1]),
           "TOTAL_LOGPROB": ("FP32", [1])},
    "tag": {"TAGS": ("BYTES", [-1]), "TAG_LOGPROBS": ("FP32", [-1]),
            "TOKEN_COUNT": ("INT64", [1])},
    "classify": {"LABEL": ("BYTES", [1]), "CLASS_PROBS": ("FP32", [-1])},
}
# A language model's outputs given only when a request names them; like TOKEN_IDS, not
# declared: perf_analyzer asks for every output metadata declares in each request
# (src/infer_data_manager.cc, InitInferData) and refuses a ModelConfig output metadata
# lacks (src/model_parser.cc, "no metadata found for output tensor"), so a declared one
# would make its stateless runs fail, and its sequences carry V floats an answer.
NEXT_OUTPUTS = {"NEXT_TOKEN_IDS": ("INT64", [-1]), "NEXT_TOKEN_LOGPROBS": ("FP32", [-1]),
                "NEXT_LOGPROBS": ("FP32", [-1])}
TOP_K_OUTPUTS = ("NEXT_TOKEN_IDS", "NEXT_TOKEN_LOGPROBS")  # K wide; NEXT_LOGPROBS is V wide
CONFIG_TYPES = {"BYTES": "TYPE_STRING", "INT64": "TYPE_INT64", "FP32": "TYPE_FP32"}
EXTENSIONS = ["model_configuration", "sequence", "parameters", "binary_tensor_data",
              "statistics", "model_repository"]
# The most bytes a value takes in a response, with its separator: raw (gRPC; HTTP outputs
# with binary_data) or as JSON text, a float32 written as Python writes a float
# ("-1.1754943508222875e-38," is 24 bytes), an int64 in up to 21. BYTES: their length,
# with a 4-byte length raw, or quoted and escaped in JSON.
RAW_BYTES = {"FP32": 4, "INT64": 8}
JSON_BYTES = {"FP32": 24, "INT64": 21}
# A response's fixed fields (model name and version, output names and shapes) take at
# most this much beside the values and the id; a state token, this much beside its state
# (state_tokens.py: names, position, MAC), then base64's 4 bytes for 3
HEADER_BYTES, STATE_TOKEN_BYTES = 4096, 600
JSON_CHAR_BYTES = 6  # the most a character of the id takes in JSON ("\u0001")


def _server_version() -> str:
    try:
        return version("recur")
    except PackageNotFoundError:
        return "0"


class InferenceCore:
    """`dynamic_batching`: stateful models too declare dynamic batching in ModelConfig
    (tools that read the config, perf_analyzer, then drive them with stateless batches);
    their sequences are still accepted."""

    def __init__(self, engine: Engine, max_message_bytes: int = 4 << 20,
                 max_sequence_id_bytes: int = 128, dynamic_batching: bool = False):
        self.engine = engine
        self.max_message_bytes, self.max_sequence_id_bytes = (max_message_bytes,
                                                              max_sequence_id_bytes)
        self.dynamic_batching = dynamic_batching
        # (model name, sequence id) -> session id, and back; an entry leaves with its
        # session, so the map is bounded by the session table
        self.sequences: dict[tuple[str, str], str] = {}
        self._sequence_of: dict[str, tuple[str, str]] = {}
        engine.on_session_removed(self._forget)

    # -- health and descriptions ----------------------------------------------------------
    def ready(self) -> bool:
        return not self.engine.closing.is_set()

    def model_ready(self, name: str, version: str) -> bool:
        try:
            self.model(name, version, "name", "version")
        except NotFound:
            return False
        return self.ready()

    def server_metadata(self) -> dict:
        return {"name": "recur", "version": _server_version(), "extensions": EXTENSIONS}

    def model(self, name: str, version: str, name_field: str = "model_name",
              version_field: str = "model_version") -> LoadedModel:
        """The model a request names; its version is text, as both bindings carry it."""
        return self.engine.model(name, version_number(version, version_field),
                                 name_field=name_field, version_field=version_field)

    def model_metadata(self, name: str, version: str) -> dict:
        model = self.model(name, version, "name", "version")
        return {"name": model.name, "versions": [str(v) for v in self.engine.versions(model.name)],
                "platform": "recur_onnx",
                "inputs": [{"name": n, "datatype": INPUTS[n][0], "shape": [-1, *INPUTS[n][1]]}
                           for n in DECLARED],
                "outputs": [{"name": n, "datatype": t, "shape": [-1, *dims]}
                            for n, (t, dims) in OUTPUTS[model.task].items()]}

    def model_config(self, name: str, version: str) -> dict:
        """Triton's ModelConfig: the inputs DECLARED, required; a model that reads text
        incrementally declares sequence batching (its sequences keep their state), unless
        `dynamic_batching` is set."""
        model = self.model(name, version, "name", "version")
        settings = self.engine.config
        gpu = model.device.startswith("cuda")
        config = {
            "name": model.name, "platform": "recur_onnx", "backend": "recur",
            "max_batch_size": settings.max_sequences_per_request,
            "input": [{"name": n, "data_type": CONFIG_TYPES[INPUTS[n][0]], "dims": INPUTS[n][1]}
                      for n in DECLARED],
            "output": [{"name": n, "data_type": CONFIG_TYPES[t], "dims": dims}
                       for n, (t, dims) in OUTPUTS[model.task].items()],
            "instance_group": [{"count": 1, "kind": "KIND_GPU" if gpu else "KIND_CPU",
                                "gpus": [model.device_id] if gpu else []}]}
        delay = int(settings.max_queue_delay_ms * 1000)
        if model.sessions_allowed is None and not self.dynamic_batching:
            config["sequence_batching"] = {
                "max_sequence_idle_microseconds": int(settings.session_ttl_s * 1e6),
                "oldest": {"max_candidate_sequences": settings.max_sessions,
                           "max_queue_delay_microseconds": delay}}
        else:
            config["dynamic_batching"] = {"max_queue_delay_microseconds": delay}
        return config

    def statistics(self, name: str, version: str) -> dict:
        """Triton's ModelStatisticsResponse: every version served of `name` (of every
        model when empty), or the one named."""
        number = version_number(version, "version")
        if number and not name:
            raise InvalidArgument("version", "a version needs the model's name")
        # the engine's lookup answers NotFound for an unknown name or version
        return {"model_stats": [statistics_json(s)
                                for s in self.engine.statistics(name, number)]}

    # -- the repository extension ---------------------------------------------------------
    async def repository_index(self, repository: str = "", ready: bool = False) -> list[dict]:
        """Every model folder of the repository with its state (READY, UNAVAILABLE or
        UNLOADING, with the reason), as Triton's RepositoryIndex."""
        _one_repository(repository)
        return [{"name": entry.name, "version": entry.version, "state": entry.state,
                 "reason": entry.reason}
                for entry in await self.engine.repository_index()
                if not ready or entry.state == "READY"]

    async def load(self, name: str, parameters: Mapping[str, Any], repository: str = "") -> None:
        _one_repository(repository)
        for key in parameters:
            if key == "config" or key.startswith("file:"):
                raise InvalidArgument(f"parameters.{key}", "Recur loads models from its "
                                      "repository folder only (no config or files in the "
                                      "request)")
        await self.engine.load_model(name, "model_name")

    async def unload(self, name: str, repository: str = "") -> None:
        _one_repository(repository)
        await self.engine.unload_model(name, "model_name")

    # -- inference ------------------------------------------------------------------------
    async def infer(self, request: InferRequest, client: str) -> InferResult:
        model = self.model(request.model_name, request.model_version)
        inputs = self._inputs(request.inputs)
        parameters = request.parameters
        outputs = _outputs_of(model.task)
        wanted = list(request.outputs) or list(OUTPUTS[model.task])
        for index, name in enumerate(wanted):
            if name not in outputs:
                raise InvalidArgument(f"outputs[{index}].name", f"{model.label} has no output "
                                      f"{shown(name)} (outputs: {', '.join(outputs)})")
        sequence = sequence_id(parameters, self.max_sequence_id_bytes)
        if not sequence and (index := _first_next(wanted)) is not None:
            raise InvalidArgument(f"outputs[{index}].name", f"{wanted[index]} is for "
                                  "sequences (parameters.sequence_id): the next-token "
                                  "distribution after a sequence's tokens; for one text, "
                                  "send it as a sequence of one request (sequence_start "
                                  "and sequence_end true)")

        def limit(runs_on: LoadedModel, top_k: int) -> Check:
            return self._response_limit(runs_on, wanted, request, bool(sequence), top_k)

        if sequence:
            model, tensors_out, extra = await self._sequence_step(
                model, bool(request.model_version), sequence, inputs, parameters, client,
                limit, wanted)
        else:
            tensors_out, extra = await self._stateless(model, inputs, parameters,
                                                       limit(model, 0)), {}
        return InferResult(model.name, str(model.version), request.id, extra,
                           [OutputTensor(name, tensors_out[name][1], tensors_out[name][0])
                            for name in wanted])

    def _inputs(self, tensors: Sequence[InputTensor]) -> list[Input]:
        given = {}
        for index, tensor in enumerate(tensors):
            field_name = f"inputs[{index}]"
            if tensor.name not in INPUTS:
                raise InvalidArgument(f"{field_name}.name", f"unknown input "
                                      f"{shown(tensor.name)} (inputs: {', '.join(INPUTS)})")
            if tensor.name in given:
                raise InvalidArgument(f"{field_name}.name", f"input {tensor.name!r} given "
                                      "twice")
            if tensor.datatype != INPUTS[tensor.name][0]:
                raise InvalidArgument(f"{field_name}.datatype", f"{tensor.name} is "
                                      f"{INPUTS[tensor.name][0]}, not "
                                      f"{shown(tensor.datatype)}")
            self._check_shape(tensor, field_name)
            given[tensor.name] = tensor.read(field_name)
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

    def _check_shape(self, tensor: InputTensor, field_name: str) -> None:
        """The declared batch and row length against the limits, before any row is read
        (each row costs a little work: a million of them, seconds)."""
        config, shape = self.engine.config, list(tensor.shape)
        if len(shape) >= 1 and shape[0] > config.max_sequences_per_request:
            raise LimitExceeded("max_sequences_per_request", shape[0],
                                config.max_sequences_per_request, f"{field_name}.shape")
        if tensor.name == "TOKEN_IDS" and len(shape) >= 2 and (
                shape[-1] > config.max_tokens_per_sequence):
            raise LimitExceeded("max_tokens_per_sequence", shape[-1],
                                config.max_tokens_per_sequence, f"{field_name}.shape")

    async def _stateless(self, model: LoadedModel, inputs: list[Input],
                         parameters: Mapping[str, Any], check: Check) -> dict:
        if model.task == "lm":
            add_eos = flag(parameters, "add_eos", True)
            return lm_outputs(await self.engine.score(model, inputs, add_eos, check=check))
        if model.task == "tag":
            return tag_outputs(await self.engine.tag(model, inputs, check=check))
        check(inputs)  # a classifier's answer is as wide as its classes: only rows count
        return class_outputs(await self.engine.classify(model, inputs))

    def _response_limit(self, model: LoadedModel, wanted: Sequence[str],
                        request: InferRequest, in_sequence: bool, top_k: int) -> Check:
        """A Check: the answer to a batch, the outputs wanted padded to its longest row
        (an lm's rows are one token longer with add_eos; a classifier's are its classes;
        the NEXT_ outputs' are `top_k` or the vocabulary wide), each written as the binding
        writes it, must fit in one message."""
        wide = narrow = 0  # bytes a column of the outputs [B, T] (or [B, C]), and a row's rest
        for index, name in enumerate(wanted):
            datatype, dims = _outputs_of(model.task)[name]
            cost = _value_bytes(datatype, model.labels, request.json_output(index))
            if name in NEXT_OUTPUTS:
                narrow += cost * (top_k if name in TOP_K_OUTPUTS else len(model.vocab))
            elif dims == [-1]:
                wide += cost
            else:
                narrow += cost
        fixed = HEADER_BYTES + JSON_CHAR_BYTES * len(request.id)
        if in_sequence and self.engine.config.state_token_keys:  # a token in each answer
            fixed += 4 * (model.initial_state().nbytes + STATE_TOKEN_BYTES) // 3

        def check(batch: Sequence) -> None:  # encoded inputs (a classifier's: any rows)
            width = (len(model.labels) if model.task == "classify"
                     else max((len(e.ids) for e in batch), default=0) + 1)
            size = fixed + len(batch) * (width * wide + narrow)
            if size > self.max_message_bytes:
                raise LimitExceeded("max_message_bytes", size, self.max_message_bytes,
                                    "inputs", "a response of up to ", " bytes")

        return check

    def _forget(self, session_id: str) -> None:
        if (key := self._sequence_of.pop(session_id, None)) is not None:
            self.sequences.pop(key, None)

    async def _sequence_step(self, model: LoadedModel, named: bool, sequence: str,
                             inputs: list[Input], parameters: Mapping[str, Any], client: str,
                             limit: Callable[[LoadedModel, int], Check],
                             wanted: Sequence[str]) -> tuple[LoadedModel, dict, dict]:
        """(the version that served, outputs, response parameters). `named`: the request
        named its version; one that does not goes on with the version its sequence started
        on, through a rollout."""
        if len(inputs) != 1:
            raise InvalidArgument("inputs", f"a request of sequence {shown(sequence)} carries one "
                                  f"sequence (batch 1), got {len(inputs)}")
        engine, (item,) = self.engine, inputs
        start, end = (flag(parameters, "sequence_start", False),
                      flag(parameters, "sequence_end", False))
        key = (model.name, sequence)
        asks_top_k, whole = (any(n in TOP_K_OUTPUTS for n in wanted),
                             "NEXT_LOGPROBS" in wanted)

        def top_k_on(runs_on: LoadedModel) -> int:  # read (and checked) only where used
            return read_top_k(parameters, runs_on) if asks_top_k else 0

        if start:
            top_k = top_k_on(model)
            step = await engine.create_session(model, item, top_k, client=client,
                                               check=limit(model, top_k),
                                               with_next_logprobs=whole)
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
            top_k = top_k_on(runs_on)  # its vocabulary, not the one named's
            step = await engine.append(session_id, item, top_k, allow_empty=True,
                                       client=client, check=limit(runs_on, top_k),
                                       with_next_logprobs=whole)
        if end and engine.has_session(step.session_id):
            engine.close_session(step.session_id)
        extra = ({"state_token": base64.b64encode(step.state_token).decode()}
                 if step.state_token else {})
        return runs_on, session_outputs(runs_on, step, wanted), extra


def _outputs_of(task: str) -> dict[str, tuple[str, list[int]]]:
    """Every output a request may name: those declared, and a language model's NEXT_."""
    return {**OUTPUTS[task], **NEXT_OUTPUTS} if task == "lm" else OUTPUTS[task]


def _first_next(wanted: Sequence[str]) -> int | None:
    return next((i for i, name in enumerate(wanted) if name in NEXT_OUTPUTS), None)


def _value_bytes(datatype: str, labels: Sequence[str], as_json: bool) -> int:
    """The most bytes a value of an output takes (BYTES outputs hold labels, or nothing
    past a row's end)."""
    if datatype != "BYTES":
        return (JSON_BYTES if as_json else RAW_BYTES)[datatype]
    if as_json:
        return max(len(json.dumps(label)) for label in ["", *labels]) + 1
    return 4 + max((len(label.encode()) for label in labels), default=0)


def _one_repository(name: str) -> None:
    if name:
        raise InvalidArgument("repository_name", f"this server has one model repository; "
                              f"leave the name empty (got {shown(name)})")
