"""Prometheus /metrics over HTTP/1.1 on the server's event loop: the registry's page and
Triton's families (serving/engine/metrics.py) under uvicorn, as a task beside the gRPC
servers. (prometheus_client's own threaded server kept a thread for every idle
connection, forever.)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from collections.abc import Callable

import h11
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("recur.serve")
# The metrics port: a connection that sends no complete request for this long (seconds)
# after it opens or after its last answer is closed; beyond METRICS_MAX_CONNECTIONS open
# connections, requests are answered 503 (Prometheus needs one).
METRICS_KEEP_ALIVE_S = 5
METRICS_MAX_CONNECTIONS = 100


def bind(host: str, port: int, what: str) -> socket.socket:
    """A listening socket for the metrics (or HTTP) port, bound now, so that a taken port
    fails before the models load, with the message _listen gives (and never shared either:
    SO_REUSEADDR, which asyncio's servers set too, does not let two listen on one port;
    SO_REUSEPORT would)."""
    refused = OSError(f"cannot listen on {host}:{port} ({what} port): it is in use or not "
                      "available here")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError:
        raise refused from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise refused from None
    sock.setblocking(False)
    return sock


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 connection, which also closes a connection that has not sent
    a whole request head `timeout_keep_alive` seconds after it opened or after its last
    answer (uvicorn times out only the idle time after an answer, and any byte stops
    that). The HTTP port (serving/api/http/) uses it too."""

    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._await_request()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a request head arrived
            self._cancel_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._await_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def _await_request(self) -> None:
        self._cancel_deadline()
        if not self.transport.is_closing():
            self._deadline = self.loop.call_later(self.timeout_keep_alive, self._expire)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def metrics_app(registry, extra: Callable[[], str] | None = None):
    """The metrics page at every path, always in the Prometheus text format (0.0.4):
    Triton's families, appended as text, could not follow an OpenMetrics page, which ends
    with `# EOF`; Prometheus reads both formats."""
    headers = [(b"content-type", CONTENT_TYPE_LATEST.encode())]

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = generate_latest(registry)
        if extra is not None:
            body += extra().encode()
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body",
                    "body": b"" if scope["method"] == "HEAD" else body})

    return app


class LoopServer(uvicorn.Server):
    """uvicorn serving an ASGI app as a task on the server's event loop, beside the gRPC
    servers (the metrics port here, the HTTP port in serving/api/http/)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield  # SIGTERM and SIGINT are serve()'s; uvicorn would take them for itself

    @classmethod
    async def started(cls, config: uvicorn.Config, sock: socket.socket, what: str):
        """Serving on `sock` (bound by `bind`), once it listens."""
        server = cls(config)
        server.running = asyncio.ensure_future(server.serve(sockets=[sock]))
        server.running.add_done_callback(functools.partial(_report_failure, what))
        while not server.started:  # listening in a few turns of the loop
            if server.running.done():
                server.running.result()  # its reason
                raise OSError(f"the {what} server stopped as it started")
            await asyncio.sleep(0.005)
        return server

    async def stop(self) -> None:
        self.should_exit = True  # it closes its connections, within its graceful timeout
        await self.running


class MetricsServer(LoopServer):
    """/metrics over HTTP/1.1 on the server's event loop (prometheus_client's stock
    threaded server kept a thread for every idle connection, forever)."""

    @classmethod
    async def serving(cls, sock: socket.socket, registry,
                      extra: Callable[[], str] | None = None) -> MetricsServer:
        config = uvicorn.Config(
            metrics_app(registry, extra), loop="none", http=HeadTimeoutProtocol, ws="none",
            lifespan="off", interface="asgi3", log_config=None, log_level="warning",
            access_log=False, proxy_headers=False, server_header=False,
            timeout_keep_alive=METRICS_KEEP_ALIVE_S,
            limit_concurrency=METRICS_MAX_CONNECTIONS,
            timeout_graceful_shutdown=1)
        return await cls.started(config, sock, "metrics")


def _report_failure(what: str, task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the %s port stopped serving: %r", what, task.exception())
