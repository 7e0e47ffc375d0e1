"""`recur serve`: the engine behind its gRPC adapters (grpc.aio), and the metrics port.

A request's path: an adapter's servicer (serving/api/recur_v1/ or api/inference_v2/)
translates its message into an Engine call (serving/engine/engine.py), which turns it into
steps (engine/operations.py) that the model's Scheduler (engine/scheduler.py) batches
with everyone else's into one call of the ModelRuntime (serving/model/runtime.py), which
runs the ONNX graph in ONNX Runtime.

Every service is registered through serving/api/rpc/wire.py (undecodable requests are
INVALID_ARGUMENT). The serving port may require TLS, client certificates and bearer tokens
(serving/api/rpc/auth.py). Health (serving/api/health.py) is served on the serving port
and, with `health_port`, alone on a plaintext port for probes.

The metrics port is served on the same event loop (serving/api/metrics_http.py): an idle
connection costs a few kilobytes, not a thread, and is closed after a few seconds. So is
the HTTP port (`http_port`, serving/api/http/): the protocols' routers (OpenAI's API in
serving/api/openai/) calling the same engine, so HTTP and gRPC requests share batches,
with the serving port's TLS, tokens and limits.

Shutdown (SIGTERM or SIGINT): health turns NOT_SERVING and Watch streams end, the listener
stops taking new RPCs (the HTTP port new connections), in-flight requests get `grace_s` to
finish, and streams still open at half of it are closed with UNAVAILABLE and a message
(an HTTP stream with an error event). A second signal during the drain
exits at once, with status 1.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from serving.api import metrics_http
from serving.api.health import LIVENESS, MODEL_PREFIX, HealthService
from serving.api.http.app import create_app
from serving.api.http.server import HttpServer
from serving.api.inference_v2.core import InferenceCore
from serving.api.inference_v2.rest import router as v2_router
from serving.api.inference_v2.service import InferenceService
from serving.api.openai.routes import openai_router
from serving.api.recur_v1.encoders import ClassifierService, TaggerService
from serving.api.recur_v1.language_model import LanguageModelService
from serving.api.recur_v1.models import ModelsService
from serving.api.reflection import add_reflection
from serving.api.rpc.auth import (
    BearerTokenInterceptor,
    bearer_of,
    peer_of,
    read_tokens,
    server_credentials,
)
from serving.api.rpc.wire import add_guarded
from serving.config import ServerConfig
from serving.engine.engine import Engine
from serving.engine.metrics import Metrics
from serving.proto_gen.inference import grpc_service_pb2 as v2
from serving.proto_gen.inference import grpc_service_pb2_grpc as v2_grpc
from serving.proto_gen.recur.v1 import recur_pb2 as pb
from serving.proto_gen.recur.v1 import recur_pb2_grpc as pb_grpc

log = logging.getLogger("recur.serve")
SERVICES = {name: pb.DESCRIPTOR.services_by_name[name].full_name
            for name in ("LanguageModel", "Tagger", "Classifier", "Models")}
SERVICES["GRPCInferenceService"] = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Ports:
    grpc: int
    metrics: int | None
    health: int | None = None
    http: int | None = None


class Server:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.metrics = Metrics()
        self.stopped = asyncio.Event()
        self._following: asyncio.Task | None = None
        self._frozen = False

    async def start(self) -> Ports:
        config = self.config
        # Without BDP probing HTTP/2 keeps its 64 KB stream window, so what a client can
        # push ahead into a stream (ScoreStream) stays small, however long the stream.
        options = [("grpc.http2.bdp_probe", 0),
                   ("grpc.max_receive_message_length", config.max_message_bytes),
                   ("grpc.max_send_message_length", config.max_message_bytes),
                   ("grpc.max_concurrent_streams", config.max_concurrent_streams),
                   ("grpc.so_reuseport", 0)]
        if config.max_connection_age_s > 0:
            options += [("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
                        ("grpc.max_connection_age_grace_ms", int(config.grace_s * 1000))]
        interceptors = ([BearerTokenInterceptor(read_tokens(config.auth_tokens), self.metrics)]
                        if config.auth_tokens else [])
        self.grpc = server = grpc.aio.server(options=options, interceptors=interceptors)
        # the ports first: a taken one fails before minutes of loading models
        credentials = (server_credentials(config.tls_cert, config.tls_key,
                                          config.tls_client_ca) if config.tls_cert else None)
        port = _listen(server, config.host, config.port, "serving", credentials)
        self.health_server, health_port = None, None
        if config.health_port >= 0:
            self.health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_port = _listen(self.health_server, config.host, config.health_port,
                                  "health")
        metrics_socket = (metrics_http.bind(config.host, config.metrics_port, "metrics")
                          if config.metrics_port >= 0 else None)
        try:
            http_socket = (metrics_http.bind(config.host, config.http_port, "HTTP")
                           if config.http_port >= 0 else None)
        except OSError:
            if metrics_socket is not None:
                metrics_socket.close()
            raise
        self.metrics_http = self.http = None
        try:
            return await self._start(port, health_port, metrics_socket, http_socket)
        except BaseException:
            self._thaw()
            for started in (self.metrics_http, self.http):
                if started is not None:
                    started.running.cancel()
            for sock in (metrics_socket, http_socket):
                if sock is not None:
                    sock.close()
            raise

    async def _start(self, port: int, health_port: int | None,
                     metrics_socket: socket.socket | None,
                     http_socket: socket.socket | None = None) -> Ports:
        config, server = self.config, self.grpc
        self.engine = engine = Engine(config, self.metrics)
        # per-client quotas count bearer tokens where the port requires them, else addresses
        client_of = bearer_of if config.auth_tokens else peer_of
        add_guarded(server, pb_grpc.add_LanguageModelServicer_to_server,
                    LanguageModelService(engine, config.stream_window,
                                         config.stream_window_bytes, config.max_message_bytes,
                                         client_of))
        add_guarded(server, pb_grpc.add_TaggerServicer_to_server,
                    TaggerService(engine, config.max_message_bytes))
        add_guarded(server, pb_grpc.add_ClassifierServicer_to_server, ClassifierService(engine))
        add_guarded(server, pb_grpc.add_ModelsServicer_to_server, ModelsService(engine))
        # one Open Inference Protocol core for its gRPC and HTTP bindings: shared sequences
        self.inference = InferenceCore(engine, config.max_message_bytes,
                                       config.max_sequence_id_bytes, config.v2_dynamic_batching)
        add_guarded(server, v2_grpc.add_GRPCInferenceServiceServicer_to_server,
                    InferenceService(self.inference, client_of))
        self.health = HealthService(["", *SERVICES.values(), LIVENESS])
        add_guarded(server, health_pb2_grpc.add_HealthServicer_to_server, self.health)
        add_reflection(server, [*SERVICES.values(), health.SERVICE_NAME])
        if self.health_server is not None:
            add_guarded(self.health_server, health_pb2_grpc.add_HealthServicer_to_server,
                        self.health)
        engine.start()
        _freeze_heap()
        self._frozen = True
        metrics_port = None
        if metrics_socket is not None:
            metrics_port = metrics_socket.getsockname()[1]
            self.metrics_http = await metrics_http.MetricsServer.serving(
                metrics_socket, self.metrics.registry, self.metrics.triton_text)
        http_port = None
        if http_socket is not None:
            http_port = http_socket.getsockname()[1]
            self.http = await self._serve_http(http_socket)
        await self.health.set(LIVENESS, SERVING)
        if self.health_server is not None:
            await self.health_server.start()
        await server.start()
        await self.health.set_all(["", *SERVICES.values()], SERVING)
        await self._publish_model_health()
        if config.repository_poll_s > 0 or config.model_control:  # models come and go
            self._following = asyncio.ensure_future(
                self._follow_models(config.repository_poll_s or 1.0))
        self.ports = Ports(port, metrics_port, health_port, http_port)
        log.info("serving %s on %s:%d (metrics on %s, health on %s, HTTP on %s)",
                 ", ".join(m.label for m in engine.models()), config.host, port,
                 metrics_port, health_port, http_port)
        return self.ports

    async def _serve_http(self, sock: socket.socket) -> HttpServer:
        """The HTTP port: every protocol's router in one app, on this engine."""
        config, engine = self.config, self.engine
        routers = [openai_router(engine, config.max_message_bytes), v2_router(self.inference)]
        app = create_app(routers, metrics=self.metrics,
                         tokens=read_tokens(config.auth_tokens) if config.auth_tokens else (),
                         max_body_bytes=config.max_message_bytes,
                         served=lambda name: bool(engine.versions(name)))
        return await HttpServer.serving(
            sock, app, keep_alive_s=config.http_keep_alive_s,
            max_connections=config.http_max_connections, tls_cert=config.tls_cert,
            tls_key=config.tls_key, tls_client_ca=config.tls_client_ca)

    async def _publish_model_health(self) -> None:
        """Health per model: SERVING while a version of it is served, NOT_SERVING while
        the versions of it in the policy do not load."""
        served = {model.name for model in self.engine.models()}
        names = served | {name for (name, _), _ in self.engine.unavailable()}
        # a model that left the repository altogether is NOT_SERVING too
        names |= {s[len(MODEL_PREFIX):] for s in self.health.services
                  if s.startswith(MODEL_PREFIX)}
        for name in sorted(names):
            await self.health.set(MODEL_PREFIX + name,
                                  SERVING if name in served else NOT_SERVING)

    async def _follow_models(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self._publish_model_health()

    async def stop(self, grace_s: float | None = None) -> None:
        """Drains: NOT_SERVING, no new RPCs, in-flight work finishes within the grace."""
        grace = self.config.grace_s if grace_s is None else grace_s
        if self._following is not None:
            self._following.cancel()
        await self.health.set_all([s for s in self.health.services if s != LIVENESS],
                                  NOT_SERVING)
        self.health.shutdown()  # Watch streams send NOT_SERVING and end: none holds the drain
        # grpc's stop returns as soon as every call has ended, and cancels the rest at the
        # end of the grace, with its own "Cancelling all calls" and nothing else.
        stopping = {asyncio.ensure_future(self.grpc.stop(grace))}
        if self.http is not None:  # it stops listening; its requests get the grace too
            stopping.add(asyncio.ensure_future(self.http.drain(grace)))
        await asyncio.wait(stopping, timeout=closing_after(grace))
        self.engine.closing.set()  # open streams end, telling their clients why
        await asyncio.gather(*stopping)
        if self.health_server is not None:  # probes see NOT_SERVING until the very end
            await self.health_server.stop(0)
        await self.engine.close()
        if self.metrics_http is not None:
            await self.metrics_http.stop()
        self._thaw()
        self.stopped.set()

    def _thaw(self) -> None:
        if self._frozen:
            self._frozen = False
            _thaw_heap()


_servers_frozen = 0  # servers started in this process: they share one garbage collector


def _freeze_heap() -> None:
    """What startup made (modules, vocabularies, the models' tables) lives as long as the
    server: frozen out of the collector's sight, a full collection walks only what requests
    have allocated since, not the whole heap. One had held the event loop for 0.15 s in the
    middle of building a Score's response. Collected first, so no garbage is frozen."""
    global _servers_frozen
    gc.collect()
    gc.freeze()
    _servers_frozen += 1


def _thaw_heap() -> None:
    """When the last server of the process stops, what was frozen may be collected again."""
    global _servers_frozen
    _servers_frozen -= 1
    if _servers_frozen == 0:
        gc.unfreeze()


def closing_after(grace: float) -> float:
    """When, into a drain of `grace` seconds, open streams are told to end: at half the
    grace, and at least a second before its end (at once for a grace of 1 s or less).

    A stream told to end still has to be scheduled, stop its work and write its last
    message (UNAVAILABLE with the reason; with state-token keys, first a message with
    its token) before grpc cancels every call left at the end of the grace; on a busy
    loop (a backlog of batches, hundreds of streams each writing) that can take longer
    than the 250 ms to 1 s they used to get, and they then ended with grpc's "Cancelling
    all calls" instead. The cost of telling them early is small: a completion or
    a Converse stream ends sooner, and its client resumes it elsewhere from its token,
    while one cut by the cancel gets neither the reason nor the token. Unary requests
    keep the whole grace."""
    return max(0.0, min(grace / 2, grace - 1.0))


def _listen(server: grpc.aio.Server, host: str, port: int, what: str,
            credentials: grpc.ServerCredentials | None = None) -> int:
    """Binds the port (never shared: SO_REUSEPORT is off, so a second server on a taken
    port fails here instead of splitting its connections with the first)."""
    address = f"{host}:{port}"
    try:
        bound = (server.add_secure_port(address, credentials) if credentials
                 else server.add_insecure_port(address))
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {address} ({what} port): it is in use or not "
                      "available here")
    return bound


async def serve(config: ServerConfig) -> None:
    server = Server(config)
    ports = await server.start()
    print(f"recur serve: listening on {config.host}:{ports.grpc}, metrics on "
          f"{ports.metrics if ports.metrics is not None else 'off'}, health on "
          f"{ports.health if ports.health is not None else 'the serving port'}, HTTP on "
          f"{ports.http if ports.http is not None else 'off'}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal does not wait for the drain
        loop.add_signal_handler(sig, _exit_now, sig)
    log.info("shutting down: %g s grace", config.grace_s)
    await server.stop()
    print("recur serve: stopped", flush=True)


def _exit_now(sig: int) -> None:
    """A second SIGTERM or a SIGINT during the drain (an operator's second Ctrl-C, a
    supervisor that will not wait) exits at once, as most servers do."""
    print(f"recur serve: {signal.Signals(sig).name} during the drain: exiting now, without "
          "waiting for the requests in flight (exit 1)", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)  # not SystemExit: the drain's awaits and grpc's threads would hold it up
