"""Transport security and authentication for the serving port.

TLS (`tls_cert`, `tls_key`), mutual TLS (`tls_client_ca`: clients must present a
certificate signed by it) and bearer tokens (`auth_tokens`: a file, one token per line;
clients send `authorization: Bearer <token>`). The health port and the metrics port stay
plaintext and open, for probes and scrapes; on the serving port health checks need no
token either, since a load balancer's checker carries none.

A refused call is UNAUTHENTICATED with one message whatever was wrong (missing, malformed
or unknown token), and tokens are compared in constant time against every known token,
so a caller learns nothing about which tokens exist.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc
from grpc_health.v1 import health

from serving.api.clients import address_client, bearer_credential, token_client
from serving.engine.metrics import Metrics

OPEN_SERVICES = (health.SERVICE_NAME,)
DENIED = "missing or invalid bearer token (send 'authorization: Bearer <token>')"


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """TLS with the server's certificate chain; with `client_ca`, mutual TLS."""
    pair = (Path(key).read_bytes(), Path(cert).read_bytes())
    ca = Path(client_ca).read_bytes() if client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca,
                                       require_client_auth=ca is not None)


def read_tokens(path: str) -> list[bytes]:
    tokens = [line.strip() for line in Path(path).read_bytes().splitlines()]
    tokens = [t for t in tokens if t and not t.startswith(b"#")]
    if not tokens:
        raise ValueError(f"{path}: no bearer tokens (one per line)")
    short = [n for n, t in enumerate(tokens, 1) if len(t) < 16]
    if short:
        raise ValueError(f"{path}: token {short[0]} is shorter than 16 characters")
    return tokens


def peer_of(context: grpc.aio.ServicerContext) -> str:
    """Who is calling, for per-client quotas, on a port without bearer tokens: its address
    without the port (every connection from one host is one client; behind a proxy that
    is the proxy, so turn tokens on there)."""
    peer = context.peer() or ""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        address = address.rpartition(":")[0]
    return address_client(address or peer)


def presented_token(metadata) -> bytes:
    """The bearer token of a call's metadata: b"" unless it has exactly one
    `authorization` entry, `Bearer <token>` (the scheme in any case)."""
    entries = [value for key, value in metadata or () if key == "authorization"]
    return bearer_credential(entries[0]) if len(entries) == 1 else b""


def bearer_of(context: grpc.aio.ServicerContext) -> str:
    """Who is calling on a port that requires bearer tokens: the token the interceptor
    accepted (as a hash, never the token itself), however its header was spelled, so that
    one token is one client (on the HTTP port too: serving/api/http/app.py)."""
    token = presented_token(context.invocation_metadata())
    return token_client(token) if token else peer_of(context)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: list[bytes], metrics: Metrics):
        self.tokens = tokens
        self.metrics = metrics

    def allowed(self, metadata) -> bool:
        presented = presented_token(metadata)
        matched = False
        for token in self.tokens:  # every token compared: the time says nothing
            matched |= hmac.compare_digest(presented, token)
        return matched and bool(presented)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        service, _, method = details.method.strip("/").partition("/")
        if service in OPEN_SERVICES or self.allowed(details.invocation_metadata):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:  # an unknown method: let gRPC answer UNIMPLEMENTED
            return None
        self.metrics.requests.labels(service.rpartition(".")[2], method,
                                     "UNAUTHENTICATED", "").inc()
        return _denying(handler)


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that refuses the call."""

    async def deny(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)

    arguments = {"request_deserializer": handler.request_deserializer,
                 "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **arguments)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **arguments)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **arguments)
    return grpc.unary_unary_rpc_method_handler(deny, **arguments)
