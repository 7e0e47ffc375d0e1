"""Prometheus metrics, one registry per server (tests run several servers in one process):
the engine's (queues, batches, tokens, sessions) and the request counters adapters record.

Names follow Prometheus conventions: a `recur_` prefix, base units (seconds), `_total` on
counters. `promtool check metrics` is run on a live page in the tests.

Beside them, Triton's `nv_inference_*` families from each model version's ModelStats
(serving/engine/stats.py), with Triton's names, labels (`model`, `version`) and units
(microseconds), so that Triton's dashboards work unmodified. Triton's counters carry no
`_total`, which prometheus_client always adds, so `triton_text` writes them itself.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from serving.engine.stats import ModelStats

# (name, help, type, value of a ModelStats): Triton's families, as Triton documents them
TRITON_FAMILIES = (
    ("nv_inference_request_success", "Number of successful inference requests, all batch "
     "sizes", "counter", lambda s: s.success.count),
    ("nv_inference_request_failure", "Number of failed inference requests, all batch sizes",
     "counter", None),  # by reason
    ("nv_inference_count", "Number of inferences performed (does not include cached "
     "requests)", "counter", lambda s: s.inference_count),
    ("nv_inference_exec_count", "Number of model executions performed (does not include "
     "cached requests)", "counter", lambda s: s.execution_count),
    ("nv_inference_request_duration_us", "Cumulative inference request duration in "
     "microseconds (includes cached requests)", "counter", lambda s: s.success.ns // 1000),
    ("nv_inference_queue_duration_us", "Cumulative inference queuing duration in "
     "microseconds (includes cached requests)", "counter", lambda s: s.queue.ns // 1000),
    ("nv_inference_compute_input_duration_us", "Cumulative compute input duration in "
     "microseconds (does not include cached requests)", "counter",
     lambda s: s.compute_input.ns // 1000),
    ("nv_inference_compute_infer_duration_us", "Cumulative compute inference duration in "
     "microseconds (does not include cached requests)", "counter",
     lambda s: s.compute_infer.ns // 1000),
    ("nv_inference_compute_output_duration_us", "Cumulative inference compute output "
     "duration in microseconds (does not include cached requests)", "counter",
     lambda s: s.compute_output.ns // 1000),
    ("nv_inference_pending_request_count", "Instantaneous number of pending requests "
     "awaiting execution per-model.", "gauge", lambda s: s.pending),
)

LATENCY = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)
BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "recur_requests", "Finished gRPC requests by service, method, code and model (a "
            "stream's messages each count as a request; model empty when none was named).",
            ["service", "method", "code", "model"], registry=registry)
        self.request_seconds = Histogram(
            "recur_request_duration_seconds", "gRPC request latency, from arrival to the last "
            "message (a stream's message: from its arrival to its answer).",
            ["service", "method", "model"], buckets=LATENCY, registry=registry)
        self.streams = Counter("recur_streams", "Finished gRPC streams by service, method and "
                               "code.", ["service", "method", "code"], registry=registry)
        self.stream_seconds = Histogram(
            "recur_stream_duration_seconds", "gRPC stream lifetimes.", ["service", "method"],
            buckets=LATENCY, registry=registry)
        self.http_requests = Counter(
            "recur_http_requests", "Finished HTTP requests by route (its path template), "
            "method, status and model.", ["route", "method", "status", "model"],
            registry=registry)
        self.http_request_seconds = Histogram(
            "recur_http_request_duration_seconds", "HTTP request latency, from arrival to the "
            "end of the response.", ["route", "method", "model"], buckets=LATENCY,
            registry=registry)
        self.queue_wait = Histogram(
            "recur_queue_wait_seconds", "Time a sequence step waited for its batch.",
            ["model"], buckets=LATENCY, registry=registry)
        self.execution = Histogram(
            "recur_execution_seconds", "ONNX Runtime time per batched call.",
            ["model"], buckets=LATENCY, registry=registry)
        self.batch_size = Histogram("recur_batch_size", "Sequences per ONNX Runtime call.",
                                    ["model"], buckets=BATCH, registry=registry)
        self.fill_wait = Histogram(
            "recur_batch_fill_wait_seconds", "Time a batch waited for sessions just answered "
            "to send their next steps (--max-fill-wait-us), per wait.", ["model"],
            buckets=LATENCY, registry=registry)
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
        self.prefix_cache_lookups = Counter(
            "recur_prefix_cache_lookups", "Reads from the start state that looked in the "
            "prefix cache, by result: hit (it spared some of their tokens) or miss.",
            ["model", "result"], registry=registry)
        self.prefix_cache_lookup_tokens = Counter(
            "recur_prefix_cache_lookup_tokens", "Tokens that the reads which looked in the "
            "prefix cache would run without it.", ["model"], registry=registry)
        self.prefix_cache_hit_tokens = Counter(
            "recur_prefix_cache_hit_tokens", "Tokens of those reads that the prefix cache "
            "spared (not run through the network); over lookup_tokens: the hit rate.",
            ["model"], registry=registry)
        self.prefix_cache_bytes = Gauge("recur_prefix_cache_bytes", "Bytes the prefix cache "
                                        "holds (states and per-token values).", ["model"],
                                        registry=registry)
        self.prefix_cache_budget = Gauge("recur_prefix_cache_budget_bytes", "The prefix "
                                         "cache's budget (0: off).", ["model"],
                                         registry=registry)
        self.prefix_cache_entries = Gauge("recur_prefix_cache_entries", "States the prefix "
                                          "cache holds.", ["model"], registry=registry)
        self.prefix_cache_evictions = Counter(
            "recur_prefix_cache_evictions", "Prefix cache nodes evicted (least recently used "
            "first) to stay within the budget.", ["model"], registry=registry)
        self.model_info = Gauge("recur_model_info", "Models served (value 1).",
                                ["name", "version", "task", "cell", "device"], registry=registry)
        self.model_stats: dict[str, ModelStats] = {}  # by label, while the version is loaded

    def stats_for(self, label: str) -> ModelStats:
        """New ModelStats for a version's new scheduler, published under its label while
        it is loaded (a version loaded again starts from zero, as Triton's do)."""
        stats = self.model_stats[label] = ModelStats()
        return stats

    def triton_text(self) -> str:
        """Triton's families in the Prometheus text format."""
        lines: list[str] = []
        stats = sorted(self.model_stats.items())
        for name, help_text, kind, value in TRITON_FAMILIES:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            for label, model_stats in stats:
                model, _, version = label.rpartition("/")
                labels = f'model="{_escape(model)}",version="{version}"'
                if value is None:
                    lines += [f'{name}{{{labels},reason="{reason}"}} {count}'
                              for reason, count in model_stats.failures.items()]
                else:
                    lines.append(f"{name}{{{labels}}} {value(model_stats)}")
        return "\n".join(lines) + "\n"

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
        if task == "lm":
            for result in ("hit", "miss"):
                self.prefix_cache_lookups.labels(label, result)
            for counter in (self.prefix_cache_lookup_tokens, self.prefix_cache_hit_tokens,
                            self.prefix_cache_evictions):
                counter.labels(label)

    def remove_model(self, label: str) -> None:
        """Drops an unloaded version's gauges, so dashboards stop showing it (its
        recur_model_info went when it was retired; counters and histograms stay: rates
        over them fall to zero)."""
        for gauge in (self.queue_depth, self.sessions, self.prefix_cache_bytes,
                      self.prefix_cache_budget, self.prefix_cache_entries):
            with contextlib.suppress(KeyError):
                gauge.remove(label)
        self.model_stats.pop(label, None)  # Triton drops an unloaded model's series too


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
