"""HTTP errors: engine errors as status codes, and each protocol's JSON for them.

A protocol's routes come in a ShapedRouter, which carries its ErrorFormat: how its errors
look (OpenAI's {"error": {"message", "type", "param", "code"}}, KServe V2's
{"error": "..."}) and, if it differs from the common one, how engine errors map to
statuses. The app (app.py) answers every error of a route in its router's format, and an
error raised before any route is found (401, 413, an unknown path) in the format of the
router whose prefix the path starts with; a plain APIRouter, or a path under no router's
prefix, gets the V2 shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from serving.engine.errors import (
    EngineError,
    FailedPrecondition,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    Overloaded,
    Unavailable,
)

# Unavailable (the server is shutting down) carries no delay of its own: retry soon,
# another replica will answer.
UNAVAILABLE_RETRY_S = 1


@dataclass
class HttpError(Exception):
    """An error as the HTTP port answers it: `param` names the request field at fault,
    `code` is a short machine-readable reason (lower case), `headers` go with it."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.status}: {self.message}"


def retry_after(seconds: float) -> dict[str, str]:
    """Retry-After in whole seconds, rounded up (HTTP has no fractions)."""
    return {"Retry-After": str(max(0, math.ceil(seconds)))}


def from_engine(error: EngineError) -> HttpError:
    """The common mapping: a bad request 400 naming its field, a missing model or session
    404, a full queue 429 and a server shutting down 503 (both with Retry-After), a failed
    batch 500."""
    if isinstance(error, LimitExceeded):
        return HttpError(400, error.message, error.field, "limit_exceeded")
    if isinstance(error, InvalidArgument):
        return HttpError(400, error.message, error.field)
    if isinstance(error, FailedPrecondition):
        return HttpError(400, error.message, error.field, error.reason.lower())
    if isinstance(error, NotFound):
        return HttpError(404, error.message, code=error.reason.lower())
    if isinstance(error, Overloaded):
        return HttpError(429, error.message, code="overloaded",
                         headers=retry_after(error.retry_after_s))
    if isinstance(error, Unavailable):
        return HttpError(503, error.message, code="unavailable",
                         headers=retry_after(UNAVAILABLE_RETRY_S))
    return HttpError(500, error.message, code="execution_failed")  # ExecutionFailed


def plain_error(error: HttpError) -> dict:
    """KServe V2 REST's error body."""
    return {"error": error.message}


@dataclass(frozen=True)
class ErrorFormat:
    """How one protocol answers errors."""

    shape: Callable[[HttpError], dict] = plain_error
    engine_errors: Callable[[EngineError], HttpError] = from_engine

    def response(self, error: HttpError) -> JSONResponse:
        return JSONResponse(self.shape(error), error.status, headers=error.headers)


PLAIN = ErrorFormat()


class ShapedRouter(APIRouter):
    """An APIRouter whose errors (those of its routes, and those of paths under its prefix
    that no route matches) take its protocol's format."""

    def __init__(self, *, errors: ErrorFormat = PLAIN, **kwargs):
        super().__init__(**kwargs)
        self.errors = errors


def format_of(router: APIRouter) -> ErrorFormat:
    return getattr(router, "errors", PLAIN)


def validation_error(errors: list[dict]) -> HttpError:
    """A 400 for the first of pydantic's errors, naming the field (never FastAPI's 422)."""
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    location = list(first.get("loc", ()))
    if location and location[0] in ("body", "path", "query", "header"):
        location = location[1:]
    param = field_path([p for p in location if not (isinstance(p, str) and "[" in p)])
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        return HttpError(400, f"Unrecognized request argument supplied: {param}", param)
    if kind == "json_invalid":
        return HttpError(400, f"the request body is not valid JSON: {first.get('msg', '')}")
    if not param:
        return HttpError(400, "the request body must be a JSON object")
    if kind == "missing":
        return HttpError(400, f"{param}: required", param)
    return HttpError(400, f"{param}: {first.get('msg', 'invalid')}", param)


def field_path(parts: list) -> str | None:
    """("prompt", 1, 3) as prompt[1][3]."""
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or None
