"""The HTTP port's ASGI app: the protocols' routers in one FastAPI app, behind a front that
does for every request what the gRPC interceptors and `rpc` wrapper do for calls.

The front, before any route runs: bearer tokens (`Authorization: Bearer <token>`, the
scheme in any case, compared in constant time against every token; a request with more
than one Authorization header is refused, as it could name two clients; the KServe health
endpoints /v2/health/live and /ready need none, as a load balancer's checker carries
none), and the body limits (a declared Content-Length over `max_body_bytes` is refused
before a byte is read, a chunked body as soon as it passes the limit; a body must keep
arriving, and arrive whole by a deadline that grows with its size, so that a body
dripped a byte at a time cannot hold a connection for ever). After: every request
counted in recur_http_requests{route, method, status, model} and timed in
recur_http_request_duration_seconds, `route` being the matched route's path template
(never the raw path: ids in paths would make a series per id), "unmatched" for a path
no route has, and `model` the one the request named, if it is served.

Errors take the format of the router they concern (errors.py); anything unexpected is a
500 with an error id that the log has with its traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.api.clients import address_client, bearer_credential, token_client
from serving.api.http.errors import (
    PLAIN,
    ErrorFormat,
    HttpError,
    format_of,
    validation_error,
)
from serving.engine.errors import EngineError
from serving.engine.metrics import Metrics
from serving.engine.stats import request_scope

log = logging.getLogger("recur.serve")
# the only paths that need no token (exactly these: any other path under /v2/health/
# needs one, so that an unauthenticated client learns nothing of the routes)
OPEN_PATHS = frozenset(("/v2/health/live", "/v2/health/ready"))
DENIED = "missing or invalid bearer token (send 'Authorization: Bearer <token>')"
# A request body must keep arriving: a client that stops sending for this long (seconds)
# is answered 408 and its connection closed.
BODY_TIMEOUT_S = 30
# ... and must arrive whole within max(BODY_DEADLINE_S, its size / BODY_MIN_RATE) seconds
# of the request head (a chunked body's size counted as the limit's).
BODY_DEADLINE_S = 30
BODY_MIN_RATE = 64 << 10  # bytes a second
TOKEN_KEY = "recur.token"  # where the front leaves the bearer token that matched
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"))
FORMAT_KEY = "recur.error_format"  # where the front leaves a request's ErrorFormat
LOGGED_KEY = "recur.logged"  # set once an unexpected error has been logged


def create_app(routers: Sequence, *, metrics: Metrics, tokens: Sequence[bytes] = (),
               max_body_bytes: int = 4 << 20,
               served: Callable[[str], bool] = lambda name: True) -> ASGIApp:
    """One app for the protocols' routers (APIRouters; a ShapedRouter brings its own error
    format). `tokens`: the bearer tokens every request must carry (none: no check);
    `served(name)`: whether a model name may label the metrics (a name no model has would
    make a series per client typo)."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    routes: list[tuple[BaseRoute, ErrorFormat]] = []
    prefixes: list[tuple[str, ErrorFormat]] = []
    for router in routers:
        app.include_router(router)
        routes += [(route, format_of(router)) for route in router.routes]
        if router.prefix:
            prefixes.append((router.prefix, format_of(router)))
    prefixes.sort(key=lambda item: -len(item[0]))
    _add_error_handlers(app)
    return Front(app, routes, prefixes, metrics, list(tokens), max_body_bytes, served)


def client_of(request: Request) -> str:
    """Who is calling, for per-client quotas, named as on the gRPC port
    (serving/api/rpc/auth.py: bearer_of and peer_of), so that a client's sessions count
    once across both: where the port requires tokens, the hash of the token the front
    accepted (however the header spelled it), else its address without the port."""
    token = request.scope.get(TOKEN_KEY)
    if token:
        return token_client(token)
    return address_client(request.client.host if request.client else "")


class Front:
    """The pure-ASGI wrapper around the app (see the module's docstring)."""

    def __init__(self, app: FastAPI, routes: list[tuple[BaseRoute, ErrorFormat]],
                 prefixes: list[tuple[str, ErrorFormat]], metrics: Metrics,
                 tokens: list[bytes], max_body_bytes: int, served: Callable[[str], bool]):
        self.app, self.routes, self.prefixes = app, routes, prefixes
        self.metrics, self.tokens, self.max_body_bytes = metrics, tokens, max_body_bytes
        self.served = served

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off; no websockets
            return
        started = time.perf_counter()
        route, errors = self._route_of(scope)
        scope[FORMAT_KEY] = errors
        status: int | None = None

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with request_scope() as counted:
            try:
                self._authenticate(scope)
                body = await self._read_body(scope, receive)
                if body is not None:
                    await self.app(scope, _replaying(body, receive), sending)
            except HttpError as error:
                if status is None:
                    await errors.response(error)(scope, receive, sending)
            except Exception as error:  # logged already if the app's handler answered it
                if not scope.get(LOGGED_KEY):
                    log.error("HTTP %s %s failed", scope["method"], route, exc_info=error)
                if status is None:
                    await errors.response(internal_error(error, scope))(scope, receive,
                                                                        sending)
            finally:
                method = scope["method"] if scope["method"] in METHODS else "other"
                model = counted.model if counted.model and self.served(counted.model) else ""
                # 499 (nginx's "client closed request"): it left before an answer began
                self.metrics.http_requests.labels(route, method, str(status or 499),
                                                  model).inc()
                self.metrics.http_request_seconds.labels(route, method, model).observe(
                    time.perf_counter() - started)

    def _route_of(self, scope: Scope) -> tuple[str, ErrorFormat]:
        """The path template of the route the request is for ("unmatched" if none), and
        the error format of its router (of the router whose prefix the path is under)."""
        partial = None
        for route, errors in self.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return route.path, errors
            if match is Match.PARTIAL and partial is None:  # the path, another method
                partial = (route.path, errors)
        if partial is not None:
            return partial
        path = scope["path"]
        for prefix, errors in self.prefixes:
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                return "unmatched", errors
        return "unmatched", PLAIN

    def _authenticate(self, scope: Scope) -> None:
        """Refuses a request without a valid token (401), or with several Authorization
        headers (400); leaves the token that matched in the scope, for client_of."""
        headers = [value for key, value in scope["headers"] if key == b"authorization"]
        if len(headers) > 1:
            raise HttpError(400, f"{len(headers)} Authorization headers: send one "
                            "('Authorization: Bearer <token>')", code="invalid_authorization")
        if not self.tokens or scope["path"] in OPEN_PATHS:
            return
        presented = bearer_credential(headers[0]) if headers else b""
        matched = False
        for token in self.tokens:  # every token compared: the time says nothing
            matched |= hmac.compare_digest(presented, token)
        if not (matched and presented):
            raise HttpError(401, DENIED, headers={"WWW-Authenticate": "Bearer"})
        scope[TOKEN_KEY] = presented

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, within the limits; None if the client left meanwhile."""
        limit = expected = self.max_body_bytes
        for key, value in scope["headers"]:
            if key == b"content-length":  # h11 checked it is digits
                expected = int(value)
        if expected > limit:
            raise _too_large(f"{expected} bytes", limit)
        allowed_s = max(BODY_DEADLINE_S, expected / BODY_MIN_RATE)
        deadline = time.monotonic() + allowed_s
        chunks, size = [], 0
        while True:
            wait_s = min(BODY_TIMEOUT_S, deadline - time.monotonic())
            try:
                if wait_s <= 0:
                    raise TimeoutError
                message = await asyncio.wait_for(receive(), wait_s)
            except TimeoutError:
                raise _too_slow(stalled=wait_s >= BODY_TIMEOUT_S, allowed_s=allowed_s) from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(f"over {limit} bytes", limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _too_large(size: str, limit: int) -> HttpError:
    return HttpError(413, f"the request body ({size}) exceeds the server's limit "
                     f"max_message_bytes = {limit}", code="request_too_large",
                     headers={"Connection": "close"})


def _too_slow(stalled: bool, allowed_s: float) -> HttpError:
    if stalled:
        message = f"the request body stopped arriving for {BODY_TIMEOUT_S} s"
    else:
        message = (f"the request body did not arrive within {allowed_s:g} s (a body may "
                   f"take {BODY_DEADLINE_S} s, or longer at {BODY_MIN_RATE >> 10} KiB/s)")
    return HttpError(408, message, headers={"Connection": "close"})


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the body read already, then the client's own messages (a
    streaming response learns of a disconnect from them)."""
    given = False

    async def replayed():
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def internal_error(error: BaseException, scope: Scope) -> HttpError:
    """A 500 that tells the client only an error id; the log has it with the traceback."""
    error_id = secrets.token_hex(6)
    log.error("HTTP %s %s: internal error (error id %s)", scope["method"], scope["path"],
              error_id, exc_info=error)
    scope[LOGGED_KEY] = True
    return HttpError(500, f"internal error (error id {error_id}; the server's log has the "
                     "details)", code="internal_error")


def _add_error_handlers(app: FastAPI) -> None:
    """Errors raised in routes, answered in their router's format."""

    def format_for(request: Request) -> ErrorFormat:
        return request.scope.get(FORMAT_KEY, PLAIN)

    @app.exception_handler(HttpError)
    async def http_error(request: Request, error: HttpError):
        return format_for(request).response(error)

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, error: EngineError):
        errors = format_for(request)
        return errors.response(errors.engine_errors(error))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        return format_for(request).response(validation_error(list(error.errors())))

    @app.exception_handler(HTTPException)
    async def starlette_error(request: Request, error: HTTPException):
        if error.status_code == 404:
            message = f"no route for {request.method} {request.url.path}"
        elif error.status_code == 405:
            message = f"{request.url.path} does not take {request.method}"
        else:
            message = str(error.detail)
        return format_for(request).response(HttpError(error.status_code, message,
                                                      headers=dict(error.headers or {})))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        return format_for(request).response(internal_error(error, request.scope))
