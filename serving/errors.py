"""The errors a request can end with, as gRPC statuses with messages and rich details.

Handlers raise ServiceError; the servicer wrapper (serving.services.rpc) turns it into the
status. Messages name the field or limit at fault, so a client can fix its request.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "recur.v1"


class ServiceError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, details: tuple = ()):
        super().__init__(message)
        self.code, self.message, self.details = code, message, details

    def to_status(self) -> grpc.Status:
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        for detail in self.details:
            packed = any_pb2.Any()
            packed.Pack(detail)
            status.details.append(packed)
        return rpc_status.to_status(status)


def invalid(field: str, problem: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {problem}",
                        (error_details_pb2.BadRequest(field_violations=[
                            error_details_pb2.BadRequest.FieldViolation(
                                field=field, description=problem)]),))


def not_found(message: str, reason: str = "MODEL_NOT_FOUND", **metadata: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, message,
                        (error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN,
                                                     metadata=metadata),))


def overloaded(what: str, retry_after_s: float) -> ServiceError:
    """A full queue or table: the client should back off and retry."""
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(retry_after_s * 1e9))
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"{what}; retry after {retry_after_s:g} s",
                        (error_details_pb2.RetryInfo(retry_delay=delay),
                         error_details_pb2.ErrorInfo(reason="OVERLOADED", domain=DOMAIN)))


def limit_exceeded(limit: str, value: int, maximum: int, field: str) -> ServiceError:
    """A request over a configured limit: the limit and the field are both named."""
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                        f"{field}: {value} exceeds the server's limit {limit} = {maximum}",
                        (error_details_pb2.QuotaFailure(violations=[
                            error_details_pb2.QuotaFailure.Violation(
                                subject=field, description=f"{limit} = {maximum}")]),))


def failed_precondition(field: str, problem: str, reason: str) -> ServiceError:
    """A well-formed request this server cannot act on as things stand."""
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"{field}: {problem}",
                        (error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN),))


def unavailable(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, message)
