"""The Open Inference Protocol (KServe V2) over HTTP/REST, with Triton's extensions: model
configuration, statistics, the model repository and the binary tensor data extension.

This is the HTTP binding: `router(core)` gives the FastAPI routes, which translate JSON
(and binary tensor data) to the plain values of core.py, where the protocol's semantics
live, and back; the server shares one InferenceCore between this binding and the gRPC
one, so a sequence started over HTTP continues over gRPC.

Inference bodies are JSON: `{"id", "parameters", "inputs": [{"name", "shape", "datatype",
"parameters", "data"}], "outputs": [{"name", "parameters"}]}`, `data` flat or nested in
row-major order, BYTES as strings. With the binary tensor data extension (Triton's, which
tritonclient uses by default) the JSON is followed by the tensors' bytes: the header
`Inference-Header-Content-Length` gives the JSON's length and each binary input gives
its `binary_data_size` among its parameters; outputs come back binary when they ask with
`binary_data: true`, or all of them with the request parameter `binary_data_output`.

The HTTP port's front (serving/api/http/app.py) has already checked the bearer token and
read the body within `max_message_bytes` (413 past it); errors are answered in V2's shape,
`{"error": "<message>"}`: 400 for a bad request (the message names the field), 404 for an
unknown model, 429 (overloaded) or 503 (shutting down) with Retry-After, 500 with an error
id for what should never happen. A compressed body is inflated up to the same limit, a
large JSON body parsed off the event loop, and every size a client declares is checked
against what it sent before anything is allocated from it. An answer is refused before
it runs when it could exceed `max_message_bytes` as written (JSON values take up to six
times their raw bytes), and a large one is written off the event loop.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from fastapi import Request, Response

from serving.api.http.app import client_of
from serving.api.http.errors import PLAIN, HttpError, ShapedRouter
from serving.api.inference_v2 import tensors
from serving.api.inference_v2.core import InferenceCore
from serving.api.inference_v2.messages import InferRequest, InferResult, InputTensor, OutputTensor
from serving.engine.errors import InvalidArgument, shown

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_RANK = 8  # dimensions of a declared shape; Recur's tensors have two
OFF_LOOP_BYTES = 1 << 16  # larger JSON bodies are parsed in a worker thread
DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
# Answers of more values than this are written in a worker thread; a value's JSON takes up
# to 24 bytes (core.JSON_BYTES), so that is answers of about 256 KB
THREAD_VALUES = (256 << 10) // 24
# Values written by one json.dumps, which holds the GIL throughout (a million: a second):
# between chunks the event loop's thread runs
CHUNK_VALUES = 4096


def router(core: InferenceCore) -> ShapedRouter:
    """The V2 REST routes over `core`, for the HTTP port's app (create_app); client_of
    names the caller for per-client session quotas, as on the gRPC port."""
    limit = core.max_message_bytes  # of a decompressed body; the front bounds the body
    routes = ShapedRouter(errors=PLAIN, prefix="/v2")

    def add(path: str, handler, method: str = "GET", versioned: bool = True) -> None:
        routes.add_api_route(path, handler, methods=[method], include_in_schema=False)
        if versioned:
            path = path.replace("/models/{name}", "/models/{name}/versions/{version}", 1)
            routes.add_api_route(path, handler, methods=[method], include_in_schema=False)

    async def server_metadata(request: Request) -> Response:
        return _json(core.server_metadata())

    async def live(request: Request) -> Response:
        return _json({"live": True})

    async def ready(request: Request) -> Response:
        is_ready = core.ready()
        return _json({"ready": is_ready}, 200 if is_ready else 400)

    async def model_ready(request: Request) -> Response:
        name, version = _model_of(request)
        is_ready = core.model_ready(name, version)
        return _json({"name": name, "ready": is_ready}, 200 if is_ready else 400)

    async def model_metadata(request: Request) -> Response:
        return _json(core.model_metadata(*_model_of(request)))

    async def model_config(request: Request) -> Response:
        return _json(core.model_config(*_model_of(request)))

    async def model_statistics(request: Request) -> Response:
        return _json(core.statistics(*_model_of(request)))

    async def all_statistics(request: Request) -> Response:
        return _json(core.statistics("", ""))

    async def repository_index(request: Request) -> Response:
        body = await _json_body(request, limit, allow_empty=True)
        ready_only = _field(body, "ready", bool, False, "")
        return _json(await core.repository_index("", ready_only))

    async def load(request: Request) -> Response:
        body = await _json_body(request, limit, allow_empty=True)
        parameters = _field(body, "parameters", dict, {}, "")
        await core.load(request.path_params["name"], parameters)
        return Response(status_code=200)

    async def unload(request: Request) -> Response:
        await _json_body(request, limit, allow_empty=True)  # parameters: none that matter
        await core.unload(request.path_params["name"])
        return Response(status_code=200)

    async def infer(request: Request) -> Response:
        name, version = _model_of(request)
        core.model(name, version)  # an unknown model is 404 whatever the body, as over gRPC
        body = await _body(request, limit)
        header, binary = _split(body, request.headers.get(HEADER_LENGTH))
        document = await _parse(header)
        parsed, is_binary_output = _infer_request(name, version, document, binary)
        return await _answer(await core.infer(parsed, client_of(request)), is_binary_output)

    add("", server_metadata, versioned=False)
    add("/health/live", live, versioned=False)
    add("/health/ready", ready, versioned=False)
    # before /models/{name}, which would take "stats" for a model's name
    add("/models/stats", all_statistics, versioned=False)
    add("/models/{name}", model_metadata)
    add("/models/{name}/ready", model_ready)
    add("/models/{name}/config", model_config)
    add("/models/{name}/stats", model_statistics)
    add("/models/{name}/infer", infer, "POST")
    add("/repository/index", repository_index, "POST", versioned=False)
    add("/repository/models/{name}/load", load, "POST", versioned=False)
    add("/repository/models/{name}/unload", unload, "POST", versioned=False)
    return routes


def _json(content: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(_dumps(content), status, headers, media_type="application/json")


def _dumps(content: Any) -> str:
    return json.dumps(content, separators=(",", ":"))


# -- bodies ---------------------------------------------------------------------------------

async def _body(request: Request, limit: int) -> bytes:
    """The body (read by the front, within the limit), inflated (gzip, deflate: as
    tritonclient may send it) up to the limit too."""
    body = await request.body()
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in DECODERS:
        raise HttpError(415, f"Content-Encoding {shown(encoding)} is not supported "
                          "(gzip, deflate or identity)")
    decoder = zlib.decompressobj(DECODERS[encoding])
    try:
        plain = decoder.decompress(body, limit + 1)
    except zlib.error as error:
        raise InvalidArgument("request body", f"not valid {encoding} ({error})") from None
    if len(plain) > limit or decoder.unconsumed_tail:
        raise HttpError(413, f"the request body inflates to over {limit} bytes, the "
                        f"server's limit max_message_bytes")
    # a cut body would be read as far as it goes, and data after the stream ignored
    if not decoder.eof:
        raise InvalidArgument("Content-Encoding", f"the {encoding} body ends before its "
                              "stream does (truncated)")
    if decoder.unused_data:
        raise InvalidArgument("Content-Encoding", f"{len(decoder.unused_data)} bytes follow "
                              f"the {encoding} stream (send one stream, one gzip member)")
    return plain


async def _parse(data: bytes) -> Any:
    if len(data) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(_loads, data)
    return _loads(data)


# a \uD800-\uDFFF escape: half of a UTF-16 surrogate pair, which json.loads passes into
# a str that no UTF-8 encoder takes when it is alone
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _loads(data: bytes) -> Any:
    try:
        document = json.loads(data)
    except RecursionError:
        raise InvalidArgument("request body", "JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidArgument("request body", f"not JSON ({error})") from None
    if _SURROGATE_ESCAPE.search(data):  # rare: pairs are fine, a lone half is not text
        try:
            json.dumps(document, ensure_ascii=False).encode()
        except UnicodeEncodeError as error:
            raise InvalidArgument("request body", "a string holds a lone UTF-16 surrogate "
                                  f"(\\u{ord(error.object[error.start]):04x}), which "
                                  "is not Unicode text") from None
    return document


async def _json_body(request: Request, limit: int, allow_empty: bool = False) -> dict:
    body = await _body(request, limit)
    if not body.strip() and allow_empty:
        return {}
    document = await _parse(body)
    if not isinstance(document, dict):
        raise InvalidArgument("request body", "must be a JSON object")
    return document


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(the JSON, the binary tensor data after it)."""
    if header_length is None:
        return body, b""
    if not (header_length.isascii() and header_length.isdigit()) or (
            int(header_length) > len(body)):
        raise InvalidArgument(HEADER_LENGTH, f"must be the JSON's length in bytes, at most the "
                              f"body's {len(body)}; got {shown(header_length)}")
    return body[: int(header_length)], body[int(header_length):]


def _model_of(request: Request) -> tuple[str, str]:
    return request.path_params["name"], request.path_params.get("version", "")


# -- inference requests ---------------------------------------------------------------------

KINDS = {str: "a string", list: "a list", dict: "an object", bool: "a bool",
         int: "an integer"}


def _field(document: dict, key: str, kind: type, default: Any, prefix: str) -> Any:
    """document[key], which must be of `kind` when present (an int is never a bool);
    required where `default` is None."""
    if key not in document and default is None:
        raise InvalidArgument(f"{prefix}{key}", f"required ({KINDS[kind]})")
    value = document.get(key, default)
    if not _is(value, kind):
        raise InvalidArgument(f"{prefix}{key}", f"must be {KINDS[kind]}")
    return value


def _is(value: Any, kind: type) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _infer_request(name: str, version: str, document: Any, binary: bytes
                   ) -> tuple[InferRequest, Callable[[int], bool]]:
    """The request, and whether its i-th output goes back binary."""
    if not isinstance(document, dict):
        raise InvalidArgument("request body", "must be a JSON object")
    request_id = _field(document, "id", str, "", "")
    parameters = _field(document, "parameters", dict, {}, "")
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidArgument("parameters.binary_data_output", "must be a bool")
    inputs, offset = [], 0
    for index, tensor in enumerate(_field(document, "inputs", list, [], "")):
        parsed, offset = _input(tensor, f"inputs[{index}]", binary, offset)
        inputs.append(parsed)
    if offset != len(binary):
        raise InvalidArgument("inputs", f"the binary data after the JSON is {len(binary)} "
                              f"bytes; the inputs' binary_data_size add up to {offset}")
    names, binary_outputs = [], []
    for index, tensor in enumerate(_field(document, "outputs", list, [], "")):
        field = f"outputs[{index}]"
        if not isinstance(tensor, dict):
            raise InvalidArgument(field, "must be an object")
        names.append(_field(tensor, "name", str, None, f"{field}."))
        options = _field(tensor, "parameters", dict, {}, f"{field}.")
        _refuse_unsupported(options, f"{field}.parameters")
        binary_outputs.append(_field(options, "binary_data", bool, binary_default,
                                     f"{field}.parameters."))
    is_binary_output = (binary_outputs.__getitem__ if binary_outputs
                        else lambda index: binary_default)
    request = InferRequest(name, version, request_id, parameters, inputs, names,
                           json_output=lambda index: not is_binary_output(index))
    return request, is_binary_output


def _refuse_unsupported(options: dict, field: str) -> None:
    for key in ("shared_memory_region", "classification"):
        if key in options:
            raise InvalidArgument(f"{field}.{key}", "not supported by this server (no shared "
                                  "memory or classification extension)")


def _input(tensor: Any, field: str, binary: bytes, offset: int) -> tuple[InputTensor, int]:
    if not isinstance(tensor, dict):
        raise InvalidArgument(field, "must be an object")
    name = _field(tensor, "name", str, None, f"{field}.")
    datatype = _field(tensor, "datatype", str, None, f"{field}.")
    shape = _field(tensor, "shape", list, None, f"{field}.")
    if len(shape) > MAX_RANK or not all(_is(d, int) for d in shape):
        raise InvalidArgument(f"{field}.shape", f"must be a list of at most {MAX_RANK} "
                              "integers")
    options = _field(tensor, "parameters", dict, {}, f"{field}.")
    _refuse_unsupported(options, f"{field}.parameters")
    if "binary_data_size" in options:
        size = _field(options, "binary_data_size", int, None, f"{field}.parameters.")
        if size < 0 or offset + size > len(binary):
            raise InvalidArgument(f"{field}.parameters.binary_data_size",
                                  f"{size} bytes from byte {offset} of the binary data, "
                                  f"which is {len(binary)} bytes")
        raw = binary[offset : offset + size]
        return InputTensor(name, datatype, shape, lambda at: tensors.read_raw(
            datatype, shape, raw, at)), offset + size
    if "data" not in tensor:
        raise InvalidArgument(f"{field}.data", "required (or parameters.binary_data_size, "
                              "with the data after the JSON)")
    data = tensor["data"]
    return InputTensor(name, datatype, shape,
                       lambda at: _read_json(datatype, shape, data, at)), offset


def _read_json(datatype: str, shape: Sequence[int], data: Any, field: str) -> np.ndarray:
    """JSON `data` (flat, or nested as the shape) as an array of the shape, each element
    of the datatype's JSON type: BYTES strings (UTF-8), BOOL booleans, integers for the
    integer types, numbers for the floating ones."""
    part = f"{field}.data"
    if datatype not in tensors.DATATYPES:
        raise InvalidArgument(f"{field}.datatype", f"unknown datatype {datatype!r}")
    tensors.elements(shape, f"{field}.shape")  # before walking the data
    values = _flat(data, shape, part)
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise InvalidArgument(part, "BYTES elements must be strings")
        values = [v.encode() for v in values]
    elif datatype == "BOOL":
        if not all(isinstance(v, bool) for v in values):
            raise InvalidArgument(part, "BOOL elements must be true or false")
    elif datatype.startswith(("FP", "BF")):
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            raise InvalidArgument(part, f"{datatype} elements must be numbers")
    elif not all(type(v) is int for v in values):
        raise InvalidArgument(part, f"{datatype} elements must be integers")
    return tensors.read_values(datatype, shape, values, field, "data")


def _flat(data: Any, shape: Sequence[int], field: str) -> list:
    """The elements of `data` in row-major order: a flat list as it is, a nested one
    checked level by level against the shape (its cost is the data's, whatever the shape
    says)."""
    if not isinstance(data, list):
        raise InvalidArgument(field, "must be a list (flat, or nested as the shape)")
    if not any(isinstance(v, list) for v in data):
        return data
    level = [data]
    for depth, size in enumerate(shape):
        following = []
        for item in level:
            if not isinstance(item, list) or len(item) != size:
                raise InvalidArgument(field, f"nested lists must match shape {list(shape)} "
                                      f"(at depth {depth})")
            following.extend(item)
        level = following
    if any(isinstance(v, list) for v in level):
        raise InvalidArgument(field, f"nested deeper than shape {list(shape)}")
    return level


# -- inference responses --------------------------------------------------------------------

async def _answer(result: InferResult, is_binary_output: Callable[[int], bool]
                  ) -> Response:
    """The answer, written in a worker thread when large: the event loop goes on."""
    if sum(t.array.size for t in result.outputs) > THREAD_VALUES:
        return await asyncio.to_thread(_infer_response, result, is_binary_output)
    return _infer_response(result, is_binary_output)


def _infer_response(result: InferResult, is_binary_output: Callable[[int], bool]
                    ) -> Response:
    """The answer: JSON, with its binary outputs' bytes after it. The JSON values are
    written in chunks (see CHUNK_VALUES)."""
    body: dict[str, Any] = {"model_name": result.model_name,
                            "model_version": result.model_version}
    if result.id:
        body["id"] = result.id
    if result.parameters:
        body["parameters"] = result.parameters
    outputs, chunks = [], []
    for index, tensor in enumerate(result.outputs):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype,
                                 "shape": list(tensor.array.shape)}
        if is_binary_output(index):
            raw = tensors.to_raw(tensor.array, tensor.datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
            outputs.append(_dumps(entry))
        else:  # the entry's object, open for its data
            outputs.append(f'{_dumps(entry)[:-1]},"data":[{_values_json(tensor)}]}}')
    header = f'{_dumps(body)[:-1]},"outputs":[{",".join(outputs)}]}}'.encode()
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(chunks), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})


def _values_json(tensor: OutputTensor) -> str:
    """The tensor's values in row-major order, as the items of a JSON list; a non-finite
    float (the -inf log-prob of an impossible token) is null, as JSON has no infinity."""
    flat, parts = tensor.array.reshape(-1), []
    for start in range(0, flat.size, CHUNK_VALUES):
        chunk = flat[start : start + CHUNK_VALUES]
        values = ([v.decode(errors="replace") for v in chunk] if tensor.datatype == "BYTES"
                  else chunk.tolist())
        try:  # no check before: a numpy one (np.isfinite) here stalls the event loop
            parts.append(_dumps_finite(values)[1:-1])
        except ValueError:  # a non-finite float
            parts.append(_dumps_finite([v if math.isfinite(v) else None
                                        for v in values])[1:-1])
    return ",".join(parts)


def _dumps_finite(values: list) -> str:
    return json.dumps(values, separators=(",", ":"), allow_nan=False)
