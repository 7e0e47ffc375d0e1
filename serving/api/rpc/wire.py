"""Malformed requests get INVALID_ARGUMENT, not gRPC's INTERNAL.

gRPC answers bytes that fail to deserialize with INTERNAL ("Exception deserializing
request!"), which tells a client the server broke. Every service (recur.v1, health,
reflection) is registered through `add_guarded`: its deserializers never raise, bytes that
are not a valid message become `Malformed`, and the handler answers INVALID_ARGUMENT naming
the message type it expected. Everything else passes through unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import grpc

from serving.engine.errors import InvalidArgument


class Malformed:
    def __init__(self, expected: str, error: Exception):
        self.message = (f"request: not a valid {expected} message "
                        f"({type(error).__name__}: {error})")


class _Capture:
    """Stands in for the server while a generated add_*_to_server registers handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass  # the same handlers arrive through add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.handlers[service] = handlers


def add_guarded(server: grpc.aio.Server, add_to_server: Callable, servicer) -> None:
    capture = _Capture()
    add_to_server(servicer, capture)
    for service, handlers in capture.handlers.items():
        guarded = {method: _guard(handler) for method, handler in handlers.items()}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, guarded),))
        server.add_registered_method_handlers(service, guarded)


def _safe(deserializer: Callable | None) -> Callable | None:
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)
    expected = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "request")

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as error:  # any decoding failure is the caller's bad bytes
            return Malformed(expected, error)

    return deserialize


async def _refuse_if_malformed(request, context) -> None:
    if isinstance(request, Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


class MalformedMessage(InvalidArgument):
    """A stream's message that did not decode. Raised (not aborted) where the stream is
    read, which may be a task of the handler's own (ScoreStream's reader): only the
    handler's task may end the call, so the error travels to it like any other."""

    def __init__(self, malformed: Malformed):
        super().__init__("request", malformed.message.removeprefix("request: "))


async def _checked(requests, context):
    async for request in requests:
        if isinstance(request, Malformed):
            raise MalformedMessage(request)
        yield request


def _guard(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    behaviour = (handler.unary_unary or handler.unary_stream or handler.stream_unary
                 or handler.stream_stream)
    streaming_in = handler.request_streaming

    # (handlers in serving/api/rpc/handlers.py's `rpc` turn a MalformedMessage into its
    # status themselves; for the others, such as reflection, the guard does)
    if inspect.isasyncgenfunction(behaviour):
        async def guarded(request, context):
            if streaming_in:
                request = _checked(request, context)
            else:
                await _refuse_if_malformed(request, context)
            try:
                async for response in behaviour(request, context):
                    yield response
            except MalformedMessage as error:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)
    else:
        async def guarded(request, context):
            if streaming_in:
                request = _checked(request, context)
            else:
                await _refuse_if_malformed(request, context)
            try:
                return await behaviour(request, context)
            except MalformedMessage as error:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)

    kind = {(False, False): "unary_unary", (False, True): "unary_stream",
            (True, False): "stream_unary", (True, True): "stream_stream"}[
        (handler.request_streaming, handler.response_streaming)]
    return handler._replace(request_deserializer=_safe(handler.request_deserializer),
                            **{kind: guarded})
