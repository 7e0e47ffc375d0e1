"""The engine's settings: the model repository and its version policy, devices, batching,
sessions and request limits, each with the sentence `recur serve --help` shows.

The server's own settings (ports, TLS, drain) extend these in serving/config.py, where
every field also becomes a flag, an environment variable and a TOML key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


def setting(default: Any, help: str, group: str) -> Any:
    """A config field with its help text and the --help group it is listed under."""
    return field(default=default, metadata={"help": help, "group": group})


MODELS, BATCHING, SESSIONS, LIMITS = "models", "batching", "sessions", "request limits"


@dataclass(frozen=True)
class VersionPolicy:
    """`latest:N`, `all` or `specific:V1,V2,...`."""

    kind: str = "latest"
    count: int = 1
    versions: frozenset[int] = frozenset()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        kind, _, argument = text.strip().partition(":")
        if kind == "all" and not argument:
            return cls("all")
        if kind == "latest" and re.fullmatch(r"[0-9]+", argument) and int(argument) >= 1:
            return cls("latest", int(argument))
        if kind == "specific" and re.fullmatch(r"[0-9]+(,[0-9]+)*", argument):
            return cls("specific", versions=frozenset(int(v) for v in argument.split(",")))
        raise ValueError(f"version_policy must be 'latest:N' (N >= 1), 'all' or "
                         f"'specific:V1,V2,...'; got {text!r}")

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest:{self.count}"
        if self.kind == "specific":
            return "specific:" + ",".join(map(str, sorted(self.versions)))
        return "all"

    def wanted(self, version: int, taken: int) -> bool:
        """Whether to serve `version`, given that `taken` higher versions are served."""
        if self.kind == "latest":
            return taken < self.count
        return self.kind == "all" or version in self.versions


@dataclass(frozen=True)
class EngineConfig:
    model_repository: str = setting(
        "models", "Folder of NAME/VERSION/ model artifacts to serve.", MODELS)
    repository_poll_s: float = setting(
        0.0, "How often (seconds) to look for versions added to or removed from the "
        "repository while serving; 0: only at start.", MODELS)
    version_policy: str = setting(
        "latest:1", "Which versions of each model are served, as in Triton: 'latest:N' (the "
        "N highest), 'all', or 'specific:V1,V2'. Versions that leave the policy are unloaded "
        "once their requests finish.", MODELS)
    device: str = setting("cpu", "Where models run: cpu or cuda[:N].", MODELS)
    allow_cpu_fallback: bool = setting(
        False, "Serve on the CPU when CUDA was asked for but cannot be used (logged), instead "
        "of refusing to start.", MODELS)
    model_control: bool = setting(
        False, "Let clients load and unload models while serving (the Open Inference "
        "Protocol's model repository extension: RepositoryModelLoad and RepositoryModelUnload "
        "over gRPC, POST /v2/repository/models/NAME/load and /unload over HTTP). Off: those "
        "calls are refused; the repository index is listed either way.", MODELS)
    strict_start: bool = setting(
        False, "Refuse to start when any version in the policy fails to load. Off: serve "
        "what loads, report the rest (log, ListModels, health) and retry them at every "
        "look at the repository, as while serving.", MODELS)
    threads: int = setting(
        0, "ONNX Runtime intra-op threads per model; 0: ONNX Runtime's default.", MODELS)
    spin_threads: bool = setting(
        False, "Let idle ONNX Runtime threads spin between calls. Off by default: in a server "
        "the event loop's own work runs between calls, and spinning threads take its cores.",
        MODELS)
    max_batch_size: int = setting(
        64, "Most sequences in one ONNX Runtime call.", BATCHING)
    max_queue_delay_ms: float = setting(
        0.0, "How long a batch may wait to fill; 0: run whatever is pending at once.", BATCHING)
    token_budget: int = setting(
        16384, "Most batch rows x padded length in one ONNX Runtime call.", BATCHING)
    max_queue: int = setting(
        4096, "Most sequence steps pending per model; beyond it requests are refused with "
        "RESOURCE_EXHAUSTED and a retry delay.", BATCHING)
    chunk_tokens: int = setting(
        256, "Long inputs run in chunks of this many tokens, the state carried between them, "
        "so one request's share of a batch stays bounded.", BATCHING)
    prefix_cache_mib: float = setting(
        64.0, "Memory (MiB) per language-model version for its prefix cache: exact states of "
        "prompts, prefixes and contexts already read, so a request extending one runs only "
        "the rest. Least recently used out; 0: off.", BATCHING)
    prefix_cache_interval: int = setting(
        256, "Long inputs also leave a state in the prefix cache every this many tokens.",
        BATCHING)
    max_fill_wait_us: float = setting(
        5000.0, "With several sessions stepping, the longest (microseconds) a batch may wait "
        "for the sessions just answered to send their next steps, so that calls run full "
        "batches: within this, two measured round trips or one call's time, and a lone "
        "session never waits (serving/engine/batch_fill.py). 0: run whatever is pending at "
        "once.", BATCHING)
    max_inline_step_ms: float = setting(
        5.0, "A lone one-token step that has been measured to take less than this runs on "
        "the event loop's thread, saving two thread hops; everything else runs on the "
        "model's worker thread, so the loop keeps answering. 0: always the worker.", BATCHING)
    session_ttl_s: float = setting(
        600.0, "Sessions idle this long (seconds) expire.", SESSIONS)
    state_token_keys: str = setting(
        "", "File of HMAC keys, one per line, the first signing (a Kubernetes Secret mounted "
        "as a file): session responses then carry a state_token from which any replica "
        "holding the key resumes the session. Empty: no state tokens.", SESSIONS)
    state_token_ttl_s: float = setting(
        86400.0, "How long (seconds) a state token can be resumed from.", SESSIONS)
    max_sessions: int = setting(
        10000, "Most sessions held; beyond it the least recently used are evicted.", SESSIONS)
    max_sessions_per_client: int = setting(
        0, "Most sessions one client (one bearer token, or one address without "
        "authentication) may hold; beyond it its creates are refused, so one client cannot "
        "evict everyone else's sessions. 0: no per-client limit.", SESSIONS)
    max_session_bytes: int = setting(
        1 << 30, "Most bytes of states and next-token distributions held by all sessions; "
        "beyond it the least recently used are evicted.", SESSIONS)
    max_sequences_per_request: int = setting(
        1024, "Most sequences (texts or token-id lists) in one request.", LIMITS)
    max_tokens_per_sequence: int = setting(
        20000, "Most tokens in one sequence of a request.", LIMITS)
    max_completion_tokens: int = setting(
        1024, "Most tokens a completion may ask for (max_tokens).", LIMITS)
    default_completion_tokens: int = setting(
        32, "Tokens a completion generates when it does not say (max_tokens = 0).", LIMITS)
    max_samples: int = setting(
        64, "Most samples one completion may ask for (n).", LIMITS)
    max_stop_strings: int = setting(
        16, "Most stop strings one completion may give.", LIMITS)
    max_stop_string_chars: int = setting(
        256, "Longest stop string, in characters.", LIMITS)
    max_top_logprobs: int = setting(
        20, "Most alternatives a request may ask for at each token (OpenAI logprobs, "
        "top_logprobs).", LIMITS)

    def __post_init__(self) -> None:
        positive = ("max_batch_size", "token_budget", "max_queue", "chunk_tokens",
                    "prefix_cache_interval",
                    "max_sessions", "max_session_bytes", "max_sequences_per_request",
                    "max_tokens_per_sequence", "max_completion_tokens",
                    "default_completion_tokens", "max_samples", "max_stop_strings",
                    "max_stop_string_chars", "max_top_logprobs")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("session_ttl_s", "max_queue_delay_ms", "threads", "state_token_ttl_s",
                     "repository_poll_s", "max_inline_step_ms", "max_fill_wait_us",
                     "prefix_cache_mib", "max_sessions_per_client"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_sequences_per_request > self.max_queue:
            raise ValueError("max_sequences_per_request must not exceed max_queue")
        if self.default_completion_tokens > self.max_completion_tokens:
            raise ValueError("default_completion_tokens must not exceed max_completion_tokens")
        VersionPolicy.parse(self.version_policy)  # raises ValueError naming the problem
