"""Prometheus metrics, one registry per server (tests run several servers in one process):
the engine's (queues, batches, tokens, sessions) and the request counters adapters record.

Names follow Prometheus conventions: a `recur_` prefix, base units (seconds), `_total` on
counters. `promtool check metrics` is run on a live page in the tests.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)
BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("recur_requests", "Finished RPCs by service, method and code.",
                                ["service", "method", "code"], registry=registry)
        self.request_seconds = Histogram(
            "recur_request_duration_seconds", "RPC latency, from arrival to the last message.",
            ["service", "method"], buckets=LATENCY, registry=registry)
        self.queue_wait = Histogram(
            "recur_queue_wait_seconds", "Time a sequence step waited for its batch.",
            ["model"], buckets=LATENCY, registry=registry)
        self.execution = Histogram(
            "recur_execution_seconds", "ONNX Runtime time per batched call.",
            ["model"], buckets=LATENCY, registry=registry)
        self.batch_size = Histogram("recur_batch_size", "Sequences per ONNX Runtime call.",
                                    ["model"], buckets=BATCH, registry=registry)
        self.executed_tokens = Counter(
            "recur_executed_tokens", "Token positions run through the network in ONNX Runtime "
            "calls (padding not counted).", ["model"], registry=registry)
        self.tokens = Counter(
            "recur_tokens", "Tokens processed, by kind: scored (Score and session Appends), "
            "prompt, generated, tagged, classified.", ["model", "kind"], registry=registry)
        self.first_token = Histogram(
            "recur_time_to_first_token_seconds", "Complete: arrival to the first token sent.",
            ["model"], buckets=LATENCY, registry=registry)
        self.sessions = Gauge("recur_active_sessions", "Open sessions.", ["model"],
                              registry=registry)
        self.session_bytes = Gauge("recur_session_state_bytes",
                                   "Bytes held by all sessions' states.", registry=registry)
        self.evictions = Counter(
            "recur_session_evictions", "Sessions removed by the server, by reason: expired "
            "(idle past the TTL), max_sessions, max_session_bytes, unloaded (their model "
            "version was unloaded).", ["reason"],
            registry=registry)
        self.queue_depth = Gauge("recur_queue_depth", "Sequence steps waiting for a batch.",
                                 ["model"], registry=registry)
        self.rejected = Counter("recur_rejected", "Work refused because a queue was full.",
                                ["model"], registry=registry)
        self.model_info = Gauge("recur_model_info", "Models served (value 1).",
                                ["name", "version", "task", "cell", "device"], registry=registry)

    def add_model(self, label: str, name: str, version: int, task: str, cell: str,
                  device: str) -> None:
        """Publishes the model and creates its series at zero, so rates work from the start."""
        self.model_info.labels(name, str(version), task, cell, device).set(1)
        kinds = {"lm": ("scored", "prompt", "generated"), "tag": ("tagged",),
                 "classify": ("classified",)}[task]
        for kind in kinds:
            self.tokens.labels(label, kind)
        self.queue_depth.labels(label)  # at zero when new; a draining same-label version's
        self.sessions.labels(label)  # sessions still count
        self.executed_tokens.labels(label)

    def remove_model(self, label: str) -> None:
        """Drops an unloaded version's gauges, so dashboards stop showing it (its
        recur_model_info went when it was retired; counters and histograms stay: rates
        over them fall to zero)."""
        for gauge in (self.queue_depth, self.sessions):
            with contextlib.suppress(KeyError):
                gauge.remove(label)
