"""Server configuration: flags over environment variables over a TOML file over defaults.

Every field is a flag (`--max-batch-size 64`), an environment variable
(`RECUR_MAX_BATCH_SIZE=64`) and a key of the TOML file given by `--config` (`max_batch_size =
64`, at the top level or under `[serve]`).
"""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

ENV_PREFIX = "RECUR_"


@dataclass(frozen=True)
class ServerConfig:
    model_repository: str = "models"
    # How often to look for versions added to the repository while serving; 0: never.
    repository_poll_s: float = 0.0
    host: str = "127.0.0.1"
    port: int = 50051  # 0: pick a free port
    metrics_port: int = 9090  # 0: pick a free port; -1: no metrics endpoint
    # grpc.health.v1 alone on its own plaintext port, for Kubernetes probes; it stays
    # reachable whatever the serving port requires. 0: pick a free port; -1: none.
    health_port: int = -1
    device: str = "cpu"  # cpu or cuda[:N]
    allow_cpu_fallback: bool = False
    threads: int = 0  # ONNX Runtime intra-op threads per model; 0: ONNX Runtime's default
    # Idle ONNX Runtime threads spin between calls by default; in a server the loop's own
    # Python work runs between calls and the spinning threads take its cores.
    spin_threads: bool = False
    # batching
    max_batch_size: int = 64  # sequences in one ONNX Runtime call
    max_queue_delay_ms: float = 0.0  # how long a batch waits to fill; 0: run what is pending
    token_budget: int = 16384  # batch rows x padded length, per call
    max_queue: int = 4096  # pending sequences per model before RESOURCE_EXHAUSTED
    chunk_tokens: int = 256  # long inputs run in chunks of this many steps, state carried
    stream_window: int = 256  # ScoreStream: sequences in flight per stream
    # sessions
    session_ttl_s: float = 600.0
    # Portable sessions: a file of HMAC keys (one per line, the first signs; a Kubernetes
    # Secret mounted as a file). Empty: responses carry no state_token.
    state_token_keys: str = ""
    state_token_ttl_s: float = 86400.0  # how long a state_token can be resumed from
    max_sessions: int = 10000
    max_session_bytes: int = 1 << 30  # states and next-token distributions of all sessions
    # request limits
    max_message_bytes: int = 4 << 20
    max_sequences_per_request: int = 1024
    max_tokens_per_sequence: int = 20000
    max_completion_tokens: int = 1024
    default_completion_tokens: int = 32
    max_samples: int = 64
    # security of the serving port (the health and metrics ports stay plaintext)
    tls_cert: str = ""  # PEM certificate chain; with tls_key, the port requires TLS
    tls_key: str = ""
    tls_client_ca: str = ""  # PEM CA bundle: clients must present a certificate it signed
    auth_tokens: str = ""  # file of bearer tokens, one per line: calls must carry one
    # lifecycle
    grace_s: float = 10.0  # SIGTERM: how long in-flight requests get to finish
    # Clients are asked to reconnect after this long (GOAWAY; calls in flight get another
    # grace_s), so client-side load balancing picks up new replicas. 0: never.
    max_connection_age_s: float = 0.0

    def __post_init__(self) -> None:
        positive = ("max_batch_size", "token_budget", "max_queue", "chunk_tokens",
                    "stream_window", "max_sessions", "max_session_bytes", "max_message_bytes",
                    "max_sequences_per_request", "max_tokens_per_sequence",
                    "max_completion_tokens", "default_completion_tokens", "max_samples")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("session_ttl_s", "grace_s", "max_queue_delay_ms", "threads",
                     "max_connection_age_s", "state_token_ttl_s", "repository_poll_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_sequences_per_request > self.max_queue:
            raise ValueError("max_sequences_per_request must not exceed max_queue")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.default_completion_tokens > self.max_completion_tokens:
            raise ValueError("default_completion_tokens must not exceed max_completion_tokens")

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
    """One flag per field, defaulting to None so that unset flags fall through."""
    parser.add_argument("--config", help="TOML file with server settings")
    for f in fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, type=type(f.default), default=None,
                                help=f"default {f.default}")


def from_arguments(args: argparse.Namespace) -> ServerConfig:
    flags = {f.name: getattr(args, f.name) for f in fields(ServerConfig)}
    return ServerConfig.resolve(flags, file=args.config)
