"""Engine errors as gRPC statuses with google.rpc error details (BadRequest, QuotaFailure,
ErrorInfo, RetryInfo), so clients can act on them without parsing messages."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from serving.engine.errors import (
    EngineError,
    FailedPrecondition,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    Overloaded,
    Unavailable,
)

DOMAIN = "recur.v1"
# A status travels in response metadata, which clients cap (8 KB by default): a longer one
# would reach the client as RESOURCE_EXHAUSTED instead of the error. Engine messages cut
# the client's values they echo (errors.shown); these caps, in UTF-8 bytes (grpc-message
# percent-encodes each non-ASCII byte into three), hold for anything else.
MAX_MESSAGE_CHARS, MAX_DETAIL_CHARS = 1024, 256


def _cut(text: str, limit: int) -> str:
    encoded = text.encode()
    if len(encoded) <= limit:
        return text
    return encoded[: limit - 3].decode(errors="ignore") + "..."


def code_of(error: EngineError) -> grpc.StatusCode:
    for kind, code in ((InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
                       (NotFound, grpc.StatusCode.NOT_FOUND),
                       (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
                       (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
                       (Unavailable, grpc.StatusCode.UNAVAILABLE)):
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL  # ExecutionFailed: ONNX Runtime failed on a batch


def _details(error: EngineError) -> list:
    if isinstance(error, LimitExceeded):
        return [error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(
                subject=_cut(error.field, MAX_DETAIL_CHARS),
                description=f"{error.limit} = {error.maximum}")])]
    if isinstance(error, InvalidArgument):
        return [error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field=_cut(error.field, MAX_DETAIL_CHARS),
                description=_cut(error.problem, MAX_MESSAGE_CHARS))])]
    if isinstance(error, NotFound):
        return [error_details_pb2.ErrorInfo(
            reason=error.reason, domain=DOMAIN,
            metadata={k: _cut(v, MAX_DETAIL_CHARS) for k, v in error.metadata.items()})]
    if isinstance(error, Overloaded):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        return [error_details_pb2.RetryInfo(retry_delay=delay),
                error_details_pb2.ErrorInfo(reason="OVERLOADED", domain=DOMAIN)]
    if isinstance(error, FailedPrecondition):
        return [error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN)]
    return []


def to_status(error: EngineError) -> grpc.Status:
    status = status_pb2.Status(code=code_of(error).value[0],
                               message=_cut(error.message, MAX_MESSAGE_CHARS))
    for detail in _details(error):
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    return rpc_status.to_status(status)
