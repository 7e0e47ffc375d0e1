"""`recur serve`: the gRPC server (grpc.aio) over the model repository.

A request's path: a servicer in serving/services/ validates it and tokenizes
(serving/inputs.py), serving/operations.py turns it into steps, the model's Batcher
(serving/batching.py) groups steps of all requests into one call of the ModelRuntime
(serving/runtime.py), which runs the ONNX graph in ONNX Runtime.

Shutdown (SIGTERM or SIGINT): health turns NOT_SERVING, the listener stops taking new RPCs,
in-flight requests get `grace_s` to finish, and streams still open near the end of it are
closed with UNAVAILABLE and a message.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving.batching import BatchLimits
from serving.config import ServerConfig
from serving.metrics import Metrics
from serving.proto_gen.recur.v1 import recur_pb2 as pb
from serving.proto_gen.recur.v1 import recur_pb2_grpc as pb_grpc
from serving.repository import ModelRepository
from serving.services.encoders import ClassifierService, TaggerService
from serving.services.language_model import LanguageModelService
from serving.services.models import ModelsService
from serving.sessions import SessionStore

log = logging.getLogger("recur.serve")
SERVICES = {name: pb.DESCRIPTOR.services_by_name[name].full_name
            for name in ("LanguageModel", "Tagger", "Classifier", "Models")}


@dataclass
class Ports:
    grpc: int
    metrics: int | None


class Server:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.metrics = Metrics()
        self.closing = asyncio.Event()  # set when open streams must end
        self.stopped = asyncio.Event()

    async def start(self) -> Ports:
        config = self.config
        limits = BatchLimits(config.max_batch_size, config.max_queue_delay_ms / 1000,
                             config.token_budget, config.max_queue)
        self.repository = ModelRepository(config.model_repository, config.device,
                                          config.threads, config.allow_cpu_fallback, limits,
                                          self.metrics, config.spin_threads)
        self.sessions = SessionStore(config.session_ttl_s, config.max_sessions,
                                     config.max_session_bytes, self.metrics)
        # Without BDP probing HTTP/2 keeps its 64 KB stream window, so what a client can
        # push ahead into a stream (ScoreStream) stays small, however long the stream.
        options = [("grpc.http2.bdp_probe", 0),
                   ("grpc.max_receive_message_length", config.max_message_bytes),
                   ("grpc.max_send_message_length", config.max_message_bytes)]
        self.grpc = grpc.aio.server(options=options)
        pb_grpc.add_LanguageModelServicer_to_server(LanguageModelService(
            self.repository, self.sessions, config, self.metrics, self.closing), self.grpc)
        pb_grpc.add_TaggerServicer_to_server(
            TaggerService(self.repository, config, self.metrics), self.grpc)
        pb_grpc.add_ClassifierServicer_to_server(
            ClassifierService(self.repository, config, self.metrics), self.grpc)
        pb_grpc.add_ModelsServicer_to_server(ModelsService(self.repository, self.metrics),
                                             self.grpc)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            [*SERVICES.values(), health.SERVICE_NAME, reflection.SERVICE_NAME], self.grpc)
        port = self.grpc.add_insecure_port(f"{config.host}:{config.port}")
        if port == 0:
            raise OSError(f"cannot listen on {config.host}:{config.port}")
        self.repository.start()
        self._expiry = asyncio.ensure_future(self.sessions.expire_forever())
        metrics_port = (self.metrics.serve(config.metrics_port, config.host)
                        if config.metrics_port >= 0 else None)
        await self.grpc.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self.ports = Ports(port, metrics_port)
        log.info("serving %s on %s:%d (metrics on %s)",
                 ", ".join(m.label for m in self.repository.all()), config.host, port,
                 metrics_port)
        return self.ports

    async def _set_health(self, status) -> None:
        for service in ["", *SERVICES.values()]:
            await self.health.set(service, status)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drains: NOT_SERVING, no new RPCs, in-flight work finishes within the grace."""
        grace = self.config.grace_s if grace_s is None else grace_s
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        stopping = asyncio.ensure_future(self.grpc.stop(grace))
        # Open streams are told why they end, shortly before the grace period does.
        await asyncio.wait({stopping}, timeout=max(grace - min(1.0, grace / 4), 0))
        self.closing.set()
        await stopping
        self._expiry.cancel()
        await self.repository.close()
        self.metrics.close()
        self.stopped.set()


async def serve(config: ServerConfig) -> None:
    server = Server(config)
    ports = await server.start()
    print(f"recur serve: listening on {config.host}:{ports.grpc}, metrics on "
          f"{ports.metrics if ports.metrics is not None else 'off'}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: %g s grace", config.grace_s)
    await server.stop()
    print("recur serve: stopped", flush=True)
