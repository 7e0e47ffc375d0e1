"""The engine's errors: a few kinds, each saying what a client can do about it.

The engine never speaks a protocol; each adapter maps these to its own statuses and error
details (recur.v1 and the Open Inference Protocol to gRPC codes with google.rpc details,
an HTTP front to status codes and JSON). Messages name the request field or the limit at
fault, so a client can fix its request.
"""

from __future__ import annotations

SHOWN_CHARS = 64


class EngineError(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(EngineError):
    """The request is wrong: `field` names what to fix."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


class LimitExceeded(InvalidArgument):
    """The request is over one of the server's configured limits, which is named."""

    def __init__(self, limit: str, value: int, maximum: int, field: str, what: str = "",
                 unit: str = ""):
        super().__init__(field, f"{what}{value}{unit} exceeds the server's limit {limit} = "
                         f"{maximum}")
        self.limit, self.value, self.maximum = limit, value, maximum


class NotFound(EngineError):
    """A model, version or session that is not here; `reason` says which and why
    (MODEL_NOT_FOUND, SESSION_EXPIRED, SESSION_EVICTED, SESSION_NOT_FOUND, ...)."""

    def __init__(self, message: str, reason: str = "MODEL_NOT_FOUND", **metadata: str):
        super().__init__(message)
        self.reason, self.metadata = reason, metadata


class Overloaded(EngineError):
    """A full queue or table: back off and retry after `retry_after_s`."""

    def __init__(self, what: str, retry_after_s: float):
        super().__init__(f"{what}; retry after {retry_after_s:g} s")
        self.retry_after_s = retry_after_s


class FailedPrecondition(EngineError):
    """A well-formed request this server cannot act on as things stand (a state token for
    a model it does not serve, state tokens turned off)."""

    def __init__(self, field: str, problem: str, reason: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.reason = field, reason


class Unavailable(EngineError):
    """The server cannot serve this now (shutting down): retry, on another replica."""


class ExecutionFailed(EngineError):
    """ONNX Runtime failed on a batch: the requests in it fail, the server goes on."""


def shutting_down() -> Unavailable:
    return Unavailable("the server is shutting down and closed this stream; reconnect (another "
                       "replica will serve) and resume")


def shown(value: str, quote: bool = True, limit: int = SHOWN_CHARS) -> str:
    """A client's value as echoed in a message: cut to `limit` characters, so that an
    error about a 1 MB id stays small (a gRPC status over the metadata limit would reach
    the client as RESOURCE_EXHAUSTED instead of the error)."""
    cut = value if len(value) <= limit else f"{value[:limit]}... ({len(value)} characters)"
    return repr(cut) if quote else cut
