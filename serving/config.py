"""Server configuration: flags over environment variables over a TOML file over defaults.

Every field is a flag (`--max-batch-size 64`), an environment variable
(`RECUR_MAX_BATCH_SIZE=64`) and a key of the TOML file given by `--config` (`max_batch_size =
64`, at the top level or under `[serve]`). ServerConfig is the engine's settings
(serving/engine/config.py) plus the server's own: ports, limits of the wire, security and
the drain.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from serving.engine.config import EngineConfig, setting

ENV_PREFIX = "RECUR_"
NETWORK, SECURITY, LIFECYCLE = "network", "security of the serving port", "lifecycle"


@dataclass(frozen=True)
class ServerConfig(EngineConfig):
    host: str = setting("127.0.0.1", "Address the ports listen on (0.0.0.0 in the images).",
                        NETWORK)
    port: int = setting(50051, "The gRPC serving port; 0: pick a free one.", NETWORK)
    metrics_port: int = setting(
        9090, "Prometheus /metrics over HTTP; 0: pick a free port; -1: none.", NETWORK)
    http_port: int = setting(
        -1, "HTTP beside gRPC, on the same engine: the OpenAI-compatible API (/v1) and "
        "KServe V2 REST (/v2), with the serving port's TLS, tokens and limits; 0: pick a free "
        "port; -1: none.", NETWORK)
    http_max_connections: int = setting(
        1000, "HTTP port: most connections open at once; beyond it requests are answered "
        "503.", NETWORK)
    http_keep_alive_s: float = setting(
        5.0, "HTTP port: an idle connection (no whole request head) is closed after this "
        "long (seconds); set it above the idle timeout of a load balancer in front.", NETWORK)
    health_port: int = setting(
        -1, "grpc.health.v1 alone on its own plaintext port, for Kubernetes probes, reachable "
        "whatever the serving port requires; 0: pick a free port; -1: none.", NETWORK)
    max_message_bytes: int = setting(
        4 << 20, "Largest gRPC message received or sent, and largest HTTP request body, in "
        "bytes.", NETWORK)
    stream_window: int = setting(
        256, "ScoreStream: sequences in flight per stream before the server stops reading "
        "(HTTP/2 flow control then holds the client back).", NETWORK)
    stream_window_bytes: int = setting(
        16 << 20, "ScoreStream: bytes in flight per stream (requests read and results not yet "
        "sent, counted as the request's size plus 128 bytes a token) before the server stops "
        "reading.", NETWORK)
    max_concurrent_streams: int = setting(
        128, "Most calls open at once on one client connection (HTTP/2 "
        "max_concurrent_streams); more wait for one to finish.", NETWORK)
    max_sequence_id_bytes: int = setting(
        128, "Longest Open Inference Protocol sequence_id string, in bytes.", NETWORK)
    v2_dynamic_batching: bool = setting(
        False, "Open Inference Protocol: models that keep state declare dynamic_batching "
        "instead of sequence_batching in their ModelConfig, so that tools which drive a model "
        "by its config (perf_analyzer) send stateless batches of any size; sequences are "
        "still accepted.", NETWORK)
    tls_cert: str = setting(
        "", "PEM certificate chain; with tls_key, the serving port requires TLS.", SECURITY)
    tls_key: str = setting("", "PEM private key of tls_cert.", SECURITY)
    tls_client_ca: str = setting(
        "", "PEM CA bundle: clients must present a certificate it signed (mutual TLS).",
        SECURITY)
    auth_tokens: str = setting(
        "", "File of bearer tokens, one per line: every call must carry one "
        "(authorization: Bearer <token>); health checks need none.", SECURITY)
    grace_s: float = setting(
        10.0, "On SIGTERM, how long (seconds) requests in flight get to finish.", LIFECYCLE)
    max_connection_age_s: float = setting(
        0.0, "Clients are asked to reconnect (GOAWAY) after this long (seconds), so "
        "client-side load balancing picks up new replicas; calls in flight get another "
        "grace_s. 0: never.", LIFECYCLE)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_message_bytes", "stream_window", "stream_window_bytes",
                     "max_concurrent_streams", "max_sequence_id_bytes",
                     "http_max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.http_keep_alive_s <= 0:
            raise ValueError(f"http_keep_alive_s must be > 0, got {self.http_keep_alive_s}")
        for name in ("grace_s", "max_connection_age_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")

    @classmethod
    def resolve(cls, flags: dict, env: dict | None = None,
                file: str | Path | None = None) -> ServerConfig:
        """Merges the sources; `flags` holds only what was given on the command line."""
        env = os.environ if env is None else env
        values: dict = {}
        if file:
            data = tomllib.loads(Path(file).read_text())
            data = data.get("serve", data)
            unknown = set(data) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(f"{file}: unknown key(s) {', '.join(sorted(unknown))}")
            values.update(data)
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f, raw, f"{ENV_PREFIX}{f.name.upper()}")
        values.update({k: v for k, v in flags.items() if v is not None})
        return cls(**values)


def _parse(f, raw: str, source: str):
    kind = type(f.default) if f.default is not MISSING else str
    try:
        if kind is bool:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        return kind(raw)
    except ValueError:
        raise ValueError(f"{source}: expected a {kind.__name__}, got {raw!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field, with its sentence and default, in groups; defaulting to None so
    that unset flags fall through to the environment and the file."""
    parser.add_argument("--config", help="TOML file with server settings (keys as the flags, "
                        "with underscores; at the top level or under [serve])")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(ServerConfig):
        group_name = f.metadata["group"]
        group = groups.get(group_name) or groups.setdefault(
            group_name, parser.add_argument_group(group_name))
        flag = "--" + f.name.replace("_", "-")
        shown = f.default if f.default != "" else "none"
        help_text = f"{f.metadata['help']} Default: {shown}."
        if isinstance(f.default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        else:
            group.add_argument(flag, type=type(f.default), default=None, help=help_text,
                               metavar=type(f.default).__name__.upper())


def from_arguments(args: argparse.Namespace) -> ServerConfig:
    flags = {f.name: getattr(args, f.name) for f in fields(ServerConfig)}
    return ServerConfig.resolve(flags, file=args.config)
