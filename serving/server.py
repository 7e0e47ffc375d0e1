"""`recur serve`: the gRPC server (grpc.aio) over the model repository.

A request's path: a servicer in serving/services/ validates it and tokenizes
(serving/inputs.py), serving/operations.py turns it into steps, the model's Batcher
(serving/batching.py) groups steps of all requests into one call of the ModelRuntime
(serving/runtime.py), which runs the ONNX graph in ONNX Runtime.

Services: recur.v1 (serving/services/), the Open Inference Protocol
(services/inference_v2.py) on the same models and sessions, health and reflection, each
registered through serving/wire.py (undecodable requests are INVALID_ARGUMENT). The
serving port may require TLS, client certificates and bearer tokens (serving/security.py).

Health: `grpc.health.v1` on the serving port and, with `health_port`, alone on a plaintext
port for probes. Service "" (and each recur.v1 service) is SERVING while the server takes
requests: the readiness probe. Service "liveness" stays SERVING as long as the event loop
answers, through the drain too: the liveness probe, which must not restart a pod that is
only shutting down.

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
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from serving.batching import BatchLimits
from serving.config import ServerConfig
from serving.metrics import Metrics
from serving.proto_gen.inference import grpc_service_pb2 as v2
from serving.proto_gen.inference import grpc_service_pb2_grpc as v2_grpc
from serving.proto_gen.recur.v1 import recur_pb2 as pb
from serving.proto_gen.recur.v1 import recur_pb2_grpc as pb_grpc
from serving.repository import ModelRepository
from serving.security import BearerTokenInterceptor, read_tokens, server_credentials
from serving.services.encoders import ClassifierService, TaggerService
from serving.services.inference_v2 import InferenceService
from serving.services.language_model import LanguageModelService
from serving.services.models import ModelsService
from serving.sessions import SessionStore
from serving.state_tokens import StateTokenKeys
from serving.wire import add_guarded

log = logging.getLogger("recur.serve")
SERVICES = {name: pb.DESCRIPTOR.services_by_name[name].full_name
            for name in ("LanguageModel", "Tagger", "Classifier", "Models")}
SERVICES["GRPCInferenceService"] = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
LIVENESS = "liveness"


class HealthService(health.aio.HealthServicer):
    """grpc.health.v1, with a message on NOT_FOUND (the stock servicer sends none)."""

    def __init__(self, services: list[str]):
        super().__init__()
        self.services = services

    async def Check(self, request, context):
        if request.service not in self.services:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"service: no health status for {request.service!r} (known: "
                                f"{', '.join(repr(s) for s in self.services)})")
        return await super().Check(request, context)


@dataclass
class Ports:
    grpc: int
    metrics: int | None
    health: int | None = None


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
        token_keys = (StateTokenKeys.from_file(config.state_token_keys, config.state_token_ttl_s)
                      if config.state_token_keys else None)
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
        if config.max_connection_age_s > 0:
            options += [("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
                        ("grpc.max_connection_age_grace_ms", int(config.grace_s * 1000))]
        interceptors = ([BearerTokenInterceptor(read_tokens(config.auth_tokens), self.metrics)]
                        if config.auth_tokens else [])
        self.grpc = grpc.aio.server(options=options, interceptors=interceptors)
        # add_guarded: malformed request bytes get INVALID_ARGUMENT (serving/wire.py)
        language_model = LanguageModelService(self.repository, self.sessions, config,
                                              self.metrics, self.closing, token_keys)
        tagger = TaggerService(self.repository, config, self.metrics)
        classifier = ClassifierService(self.repository, config, self.metrics)
        add_guarded(self.grpc, pb_grpc.add_LanguageModelServicer_to_server, language_model)
        add_guarded(self.grpc, pb_grpc.add_TaggerServicer_to_server, tagger)
        add_guarded(self.grpc, pb_grpc.add_ClassifierServicer_to_server, classifier)
        add_guarded(self.grpc, v2_grpc.add_GRPCInferenceServiceServicer_to_server,
                    InferenceService(self.repository, config, self.metrics, language_model,
                                     tagger, classifier, self.closing))
        add_guarded(self.grpc, pb_grpc.add_ModelsServicer_to_server,
                    ModelsService(self.repository, self.metrics))
        self.health = HealthService(["", *SERVICES.values(), LIVENESS])
        add_guarded(self.grpc, health_pb2_grpc.add_HealthServicer_to_server, self.health)
        add_guarded(self.grpc, reflection_pb2_grpc.add_ServerReflectionServicer_to_server,
                    reflection.aio.ReflectionServicer([*SERVICES.values(), health.SERVICE_NAME,
                                                       reflection.SERVICE_NAME]))
        address = f"{config.host}:{config.port}"
        port = (self.grpc.add_secure_port(address, server_credentials(
                    config.tls_cert, config.tls_key, config.tls_client_ca))
                if config.tls_cert else self.grpc.add_insecure_port(address))
        if port == 0:
            raise OSError(f"cannot listen on {config.host}:{config.port}")
        self.health_server, health_port = None, None
        if config.health_port >= 0:
            self.health_server = grpc.aio.server()
            add_guarded(self.health_server, health_pb2_grpc.add_HealthServicer_to_server,
                        self.health)
            health_port = self.health_server.add_insecure_port(
                f"{config.host}:{config.health_port}")
            if health_port == 0:
                raise OSError(f"cannot listen on {config.host}:{config.health_port} (health)")
        self.repository.start()
        self._expiry = asyncio.ensure_future(self.sessions.expire_forever())
        self._poll = (asyncio.ensure_future(
            self.repository.refresh_forever(config.repository_poll_s))
            if config.repository_poll_s > 0 else None)
        metrics_port = (self.metrics.serve(config.metrics_port, config.host)
                        if config.metrics_port >= 0 else None)
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        if self.health_server is not None:
            await self.health_server.start()
        await self.grpc.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self.ports = Ports(port, metrics_port, health_port)
        log.info("serving %s on %s:%d (metrics on %s, health on %s)",
                 ", ".join(m.label for m in self.repository.all()), config.host, port,
                 metrics_port, health_port)
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
        if self.health_server is not None:  # probes see NOT_SERVING until the very end
            await self.health_server.stop(0)
        self._expiry.cancel()
        if self._poll is not None:
            self._poll.cancel()
        await self.repository.close()
        self.metrics.close()
        self.stopped.set()


async def serve(config: ServerConfig) -> None:
    server = Server(config)
    ports = await server.start()
    print(f"recur serve: listening on {config.host}:{ports.grpc}, metrics on "
          f"{ports.metrics if ports.metrics is not None else 'off'}, health on "
          f"{ports.health if ports.health is not None else 'the serving port'}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: %g s grace", config.grace_s)
    await server.stop()
    print("recur serve: stopped", flush=True)
