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
                subject=error.field, description=f"{error.limit} = {error.maximum}")])]
    if isinstance(error, InvalidArgument):
        return [error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=error.field,
                                                        description=error.problem)])]
    if isinstance(error, NotFound):
        return [error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN,
                                            metadata=error.metadata)]
    if isinstance(error, Overloaded):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        return [error_details_pb2.RetryInfo(retry_delay=delay),
                error_details_pb2.ErrorInfo(reason="OVERLOADED", domain=DOMAIN)]
    if isinstance(error, FailedPrecondition):
        return [error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN)]
    return []


def to_status(error: EngineError) -> grpc.Status:
    status = status_pb2.Status(code=code_of(error).value[0], message=error.message)
    for detail in _details(error):
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    return rpc_status.to_status(status)
