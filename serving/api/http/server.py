"""The HTTP port: the app of app.py under uvicorn (HTTP/1.1), as a task on the server's
event loop beside the gRPC servers, so that its requests call the same engine and share
its batches.

Its limits: the serving port's TLS (with `tls_client_ca`, a client certificate is
required), request heads of at most MAX_HEADER_BYTES, a connection that sends no whole
request head within `keep_alive_s` of opening or of its last answer is closed, and beyond
`max_connections` open connections requests are answered 503 (by uvicorn, in plain
text). On stop it takes no new connections, closes idle ones, and gives requests in
flight the grace; the app's streams end themselves (with an error event) when the engine
starts closing.
"""

from __future__ import annotations

import socket
import ssl

import uvicorn

from serving.api.metrics_http import HeadTimeoutProtocol, LoopServer

MAX_HEADER_BYTES = 16 << 10  # a request head larger than this is refused (400)


class HttpServer(LoopServer):
    @classmethod
    async def serving(cls, sock: socket.socket, app, *, keep_alive_s: float,
                      max_connections: int, tls_cert: str = "", tls_key: str = "",
                      tls_client_ca: str = "") -> HttpServer:
        tls = {}
        if tls_cert:
            tls = {"ssl_certfile": tls_cert, "ssl_keyfile": tls_key}
        if tls_client_ca:
            tls.update(ssl_ca_certs=tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(
            app, loop="none", http=HeadTimeoutProtocol, ws="none", lifespan="off",
            interface="asgi3", log_config=None, log_level="warning", access_log=False,
            proxy_headers=False, server_header=False, timeout_keep_alive=keep_alive_s,
            # uvicorn counts the connection asking among those open: one more lets
            # max_connections be served
            limit_concurrency=max_connections + 1,
            h11_max_incomplete_event_size=MAX_HEADER_BYTES, **tls)
        return await cls.started(config, sock, "HTTP")

    async def drain(self, grace_s: float) -> None:
        """Stops listening and waits up to `grace_s` for the requests in flight; then
        cancels what is left and closes every connection."""
        self.config.timeout_graceful_shutdown = grace_s
        await self.stop()
        for connection in list(self.server_state.connections):
            connection.transport.close()
