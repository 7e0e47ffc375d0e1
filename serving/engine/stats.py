"""Per-request accounting, kept by the engine so that every front counts alike.

Two things live here:

- which model a request named (`request_scope`): an adapter opens a scope around each
  request (each message of a stream), `Engine.model` notes the model it looked up, and the
  adapter labels its own request metrics with it;
- Triton's per-model statistics (`ModelStats`): requests that succeeded and failed, their
  durations, the time their steps waited for a batch and the time of the batched calls
  that ran them. They back the ModelStatistics extension and the `nv_inference_*` metric
  families, which carry Triton's names, labels and units so that dashboards built for
  Triton read them unmodified.

An inference request is one engine operation: a Score, a completion (until its stream
ends), a session step, a tagging or a classification. A front's request is as many as
the operations it makes (one for a V2 request or a recur.v1 call; one per prompt for an
OpenAI completion of several prompts, and one more for its echo). A request refused by
the engine once it has found its model (a bad parameter, a full queue) counts as a
failure of that model; one an adapter refuses before calling the engine (an undecodable
tensor) counts nowhere. A batched call that runs steps of several requests counts its
compute time once for each of them, as Triton does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

from serving.engine.errors import ExecutionFailed, Overloaded


@dataclass
class RequestScope:
    model: str = ""  # the name of the model the request looked up, once it has


_scope: ContextVar[RequestScope | None] = ContextVar("recur_request_scope", default=None)


@contextlib.contextmanager
def request_scope() -> Iterator[RequestScope]:
    """One request as an adapter counts it; `scope.model` names its model at the end."""
    scope = RequestScope()
    token = _scope.set(scope)
    try:
        yield scope
    finally:
        _scope.reset(token)


def note_model(name: str) -> None:
    if (scope := _scope.get()) is not None:
        scope.model = name


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * 1e9)


@dataclass(slots=True)
class BatchStats:
    batch_size: int
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class ModelStatistics:
    """Triton's ModelStatistics of one model version (durations in nanoseconds)."""

    name: str
    version: int
    last_inference: int  # ms since the epoch, 0 before the first request
    inference_count: int  # sequences inferred (a request of B inputs counts B)
    execution_count: int  # batched ONNX Runtime calls
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    batch_stats: list[BatchStats]
    failures: dict[str, int]  # by Triton's reasons: REJECTED, CANCELED, BACKEND, OTHER


@dataclass(slots=True, eq=False)
class RequestTiming:
    """One request: what its steps spent, summed over the batched calls that ran them, and
    the model version it counts toward (bound once the request has found its model)."""

    started: float
    count: int = 1  # sequences it infers (a Score of B inputs: B)
    stats: ModelStats | None = None
    queue_s: float = 0.0
    input_s: float = 0.0
    infer_s: float = 0.0
    output_s: float = 0.0
    finished: bool = False
    detached: bool = False  # outlives its block (a completion: until its stream ends)

    def bind(self, stats: ModelStats) -> None:
        if self.stats is None:
            self.stats = stats
            stats.pending += 1

    def finish(self, error: BaseException | None) -> None:
        """Counts the request (once; a request that never found its model counts nowhere)."""
        if self.stats is not None and not self.finished:
            self.finished = True
            self.stats.end(self, error)


# The request whose steps are being submitted: set by the engine around an operation and
# read by the scheduler's submit (a completion's decoding task inherits it when created).
current_timing: ContextVar[RequestTiming | None] = ContextVar("recur_request_timing",
                                                              default=None)


def failure_reason(error: BaseException) -> str:
    if isinstance(error, Overloaded):
        return "REJECTED"
    if isinstance(error, asyncio.CancelledError):
        return "CANCELED"
    if isinstance(error, ExecutionFailed):
        return "BACKEND"
    return "OTHER"


class ModelStats:
    """The counters of one model version (one per scheduler)."""

    def __init__(self) -> None:
        self.pending = 0  # requests begun and not ended
        self.last_inference = 0
        self.inference_count = self.execution_count = 0
        self.success, self.fail, self.queue = Duration(), Duration(), Duration()
        self.compute_input, self.compute_infer, self.compute_output = (Duration(), Duration(),
                                                                       Duration())
        self.batches: dict[int, BatchStats] = {}
        self.failures = {"REJECTED": 0, "CANCELED": 0, "BACKEND": 0, "OTHER": 0}

    def end(self, timing: RequestTiming, error: BaseException | None) -> None:
        self.pending -= 1
        seconds = time.perf_counter() - timing.started
        self.last_inference = int(time.time() * 1000)
        if error is not None:
            self.fail.add(seconds)
            self.failures[failure_reason(error)] += 1
            return
        self.success.add(seconds)
        self.inference_count += timing.count
        self.queue.add(timing.queue_s)
        self.compute_input.add(timing.input_s)
        self.compute_infer.add(timing.infer_s)
        self.compute_output.add(timing.output_s)

    def record_batch(self, size: int, input_s: float, infer_s: float,
                     output_s: float) -> None:
        self.execution_count += 1
        batch = self.batches.get(size) or self.batches.setdefault(size, BatchStats(size))
        batch.compute_input.add(input_s)
        batch.compute_infer.add(infer_s)
        batch.compute_output.add(output_s)

    def snapshot(self, name: str, version: int) -> ModelStatistics:
        def copy(d: Duration) -> Duration:
            return Duration(d.count, d.ns)

        return ModelStatistics(
            name, version, self.last_inference, self.inference_count, self.execution_count,
            copy(self.success), copy(self.fail), copy(self.queue), copy(self.compute_input),
            copy(self.compute_infer), copy(self.compute_output),
            [BatchStats(b.batch_size, copy(b.compute_input), copy(b.compute_infer),
                        copy(b.compute_output)) for _, b in sorted(self.batches.items())],
            dict(self.failures))


@contextlib.contextmanager
def counting() -> Iterator[RequestTiming]:
    """One request, from here to the end of the block (or, once `detached`, to its
    `finish`): the steps it submits meanwhile are timed into it. A later `bind` names the
    model version it counts toward; a request that never finds its model counts nowhere."""
    timing = RequestTiming(time.perf_counter())
    token = current_timing.set(timing)
    try:
        yield timing
    except BaseException as error:
        timing.finish(error)
        raise
    else:
        if not timing.detached:
            timing.finish(None)
    finally:
        current_timing.reset(token)
