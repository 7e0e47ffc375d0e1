"""Prometheus /metrics over HTTP/1.1 on the server's event loop: prometheus_client's ASGI
app under uvicorn, as a task beside the gRPC servers. (prometheus_client's own threaded
server kept a thread for every idle connection, forever.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import h11
import uvicorn
from prometheus_client import make_asgi_app
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("recur.serve")
# The metrics port: a connection that sends no complete request for this long (seconds)
# after it opens or after its last answer is closed; beyond METRICS_MAX_CONNECTIONS open
# connections, requests are answered 503 (Prometheus needs one).
METRICS_KEEP_ALIVE_S = 5
METRICS_MAX_CONNECTIONS = 100


def bind(host: str, port: int, what: str) -> socket.socket:
    """A listening socket for the metrics port, bound now, so that a taken port fails
    before the models load, with the message _listen gives (and never shared either:
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


class _MetricsProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 connection, which also closes a connection that has not sent
    a whole request head METRICS_KEEP_ALIVE_S after it opened or after its last answer
    (uvicorn times out only the idle time after an answer, and any byte stops that)."""

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


class MetricsServer(uvicorn.Server):
    """/metrics over HTTP/1.1 on the server's event loop: prometheus_client's ASGI app
    under uvicorn, as a task beside the gRPC servers (its stock threaded server kept a
    thread for every idle connection, forever)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield  # SIGTERM and SIGINT are serve()'s; uvicorn would take them for itself

    @classmethod
    async def serving(cls, sock: socket.socket, registry) -> MetricsServer:
        config = uvicorn.Config(
            make_asgi_app(registry=registry), loop="none", http=_MetricsProtocol, ws="none",
            lifespan="off", interface="asgi3", log_config=None, log_level="warning",
            access_log=False, proxy_headers=False, server_header=False,
            timeout_keep_alive=METRICS_KEEP_ALIVE_S,
            limit_concurrency=METRICS_MAX_CONNECTIONS,
            timeout_graceful_shutdown=1)
        server = cls(config)
        server.running = asyncio.ensure_future(server.serve(sockets=[sock]))
        server.running.add_done_callback(_report_failure)
        while not server.started:  # listening in a few turns of the loop
            if server.running.done():
                server.running.result()  # its reason
                raise OSError("the metrics server stopped as it started")
            await asyncio.sleep(0.005)
        return server

    async def stop(self) -> None:
        self.should_exit = True  # it closes its connections, within a second
        await self.running


def _report_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the metrics port stopped serving: %r", task.exception())
