"""Continuous batching: one scheduler per served model gathers the pending steps of all
requests (Score sequences, session Appends, completion steps, texts to tag or classify) into
one ONNX Runtime call.

A step is a piece of one sequence: its tokens, the state it starts from, and (language
models) the targets to score. Sequences join or leave between calls: a completion submits
its next step as soon as it has its token, and runs in whatever call comes next. Steps are
grouped by length bucket (lengths within 2x of each other) under a token budget, the oldest
bucket first, so a one-token step never waits behind a long chunk's padding for long.

Admission is whole: a request is admitted (`admit`) for all the sequences it will run at
once (a Score's inputs, a completion's samples, an Append's one) before it starts, and
holds them until it ends, so `max_queue` bounds the sequences in flight and an admitted
request never fails halfway for want of room. A request that does not fit is refused
before it starts (Overloaded); streams wait for room instead (`admit_when_room`).

The ONNX Runtime call runs on one worker thread per model (ONNX Runtime releases the GIL
while it computes), so the event loop stays free meanwhile: reads, writes and new requests
go on, and steps that arrive form the next batch. The worker also draws the completions'
next tokens, for all of a call's rows in one batched draw (2.2x faster than row by row at
B = 64 over 10,000 words, and off the loop's thread). On the loop's own thread the call
starved gRPC: with 64 completion streams, batches averaged 3 to 13 steps instead of 60.

With several sessions stepping one token at a time, a batch waits a little for the
sessions just answered to send their next steps (batch_fill.py: how long, and why a lone
session never waits), so that calls run full batches instead of a few rows each.

Only a lone one-token step that has been measured to take less than `max_inline_step_s`
runs on the loop's thread, saving the two thread hops (about 0.25 ms of an Append); a
longer step there would hold up every other request, health checks included.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from serving.engine.batch_fill import Returning
from serving.engine.errors import ExecutionFailed, Overloaded, Unavailable
from serving.engine.metrics import Metrics
from serving.engine.stats import RequestTiming, current_timing
from serving.model.runtime import ModelRuntime
from serving.model.sampler import SamplingParams, most_likely, sample_batch

Sampler = tuple[SamplingParams, np.random.Generator]


@dataclass(eq=False)
class Step:
    tokens: np.ndarray  # [T] int64; a character-aware encoder's [T, 1 + L] (ids, spellings)
    state: np.ndarray | None  # [L, S] float32; None for bidirectional encoders
    targets: np.ndarray | None  # [T] int64, language models only
    future: asyncio.Future
    enqueued: float
    sampler: Sampler | None = None  # a completion's: its next token is drawn in the batch
    top: int = 0  # with a sampler: the most likely tokens to return beside the drawn one
    timing: RequestTiming | None = None  # the request it is part of, for its statistics
    key: str | None = None  # the session stepping, expected back after its answer


class Admission:
    """Sequences admitted on a scheduler, held until `release()` (idempotent)."""

    def __init__(self, scheduler: Scheduler, count: int):
        self._scheduler, self.count = scheduler, count

    def release(self, *_) -> None:
        if self.count:
            self._scheduler._release(self.count)
            self.count = 0

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass
class StepResult:
    outputs: np.ndarray  # LM: token log-probs [T]; tagger: [T, C]; classifier: [C]
    next_logprobs: np.ndarray | None  # LM: [V] after the step's last token; None if sampled
    state: np.ndarray | None  # [L, S] after the step's last token
    token: int | None = None  # with a sampler: the next token drawn, and its log-prob
    token_logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # with a sampler and `top`: (id, log-prob)
    # LM, where the graph has them: the most likely token at each position [T], its log-prob
    greedy_ids: np.ndarray | None = None
    greedy_logprobs: np.ndarray | None = None


@dataclass(frozen=True)
class BatchLimits:
    max_batch_size: int = 64
    max_queue_delay_s: float = 0.0
    token_budget: int = 16384
    max_queue: int = 4096
    max_inline_step_s: float = 0.005
    max_fill_wait_s: float = 0.005  # 0: never wait for returning sessions


# weight of the newest measurement in the running estimate of a lone step's time
_SMOOTHING = 0.2


class Scheduler:
    def __init__(self, runtime: ModelRuntime, label: str, limits: BatchLimits,
                 metrics: Metrics):
        self.runtime, self.label, self.limits = runtime, label, limits
        self._buckets: dict[int, deque[Step]] = {}
        self._count = 0  # steps pending
        self.admitted = 0  # sequences admitted and not yet finished
        # seconds a lone one-token step takes, measured; None until one has run
        self.lone_step_s: float | None = None
        # seconds a call of one-token steps takes, measured (a running estimate): a batch
        # of such steps may wait that long for returning sessions (batch_fill.py)
        self.call_s: float | None = None
        self.returning = Returning()
        self._fill_target: int | None = None  # while a batch waits: the steps it waits for
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._task: asyncio.Task | None = None
        self.closed = False
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=label)
        self.peak_depth = 0
        self._depth = metrics.queue_depth.labels(label)
        self._wait = metrics.queue_wait.labels(label)
        self._execution = metrics.execution.labels(label)
        self._batch_size = metrics.batch_size.labels(label)
        self._fill_wait = metrics.fill_wait.labels(label)
        self._rejected = metrics.rejected.labels(label)
        self._executed = metrics.executed_tokens.labels(label)
        self.stats = metrics.stats_for(label)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=self.label)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None  # the task's coroutine refers back to this scheduler
        self._worker.shutdown(wait=False, cancel_futures=True)
        for bucket in self._buckets.values():
            for step in bucket:
                step.future.cancel()
        self.closed = True

    @property
    def depth(self) -> int:
        return self._count

    def admit(self, count: int) -> Admission:
        """Admits `count` sequences now, or refuses the whole request (Overloaded)."""
        if self.closed:
            raise Unavailable(f"model {self.label} is no longer served here; retry")
        if self.admitted + count > self.limits.max_queue:
            self._rejected.inc()
            raise Overloaded(f"model {self.label}: queue full ({self.admitted} of "
                             f"max_queue={self.limits.max_queue} sequences in flight)", 0.05)
        self.admitted += count
        return Admission(self, count)

    async def admit_when_room(self, count: int) -> Admission:
        """For streams: waits (instead of refusing) until `count` sequences fit."""
        while self.admitted + count > self.limits.max_queue:
            self._room.clear()
            await self._room.wait()
        return self.admit(count)

    def readmit(self, count: int) -> Admission:
        """Admits again, whatever the room, a request that was admitted and gave its room
        back while it waited for its client (a completion's reader): it was admitted whole
        once, so it runs to its end; the queue may go over max_queue by as much, briefly."""
        self.admitted += count
        return Admission(self, count)

    def _release(self, count: int) -> None:
        self.admitted -= count
        self._room.set()

    def submit(self, tokens: np.ndarray, state: np.ndarray | None,
               targets: np.ndarray | None = None,
               sampler: Sampler | None = None, top: int = 0,
               key: str | None = None) -> asyncio.Future:
        """Queues one step. With a sampler (completions), the result also carries the next
        token, drawn on the worker for all such rows of the batch at once (sample_batch),
        and with `top` the most likely tokens of that draw's distribution. The caller holds
        an admission for the sequence (`admit`). The step's time counts toward the request
        being timed in this context (stats.current_timing), if any. `key`: the session
        stepping (batch_fill.py)."""
        now = time.perf_counter()
        step = Step(tokens, state, targets, asyncio.get_running_loop().create_future(),
                    now, sampler, top, current_timing.get(), key)
        if key is not None:
            self.returning.came_back(key, now)
        self._buckets.setdefault(len(tokens).bit_length(), deque()).append(step)
        self._count += 1
        self.peak_depth = max(self.peak_depth, self._count)
        self._depth.set(self._count)
        if self._fill_target is None or self._count >= self._fill_target:
            self._wake.set()
        return step.future

    async def run(self, tokens: np.ndarray, state: np.ndarray | None,
                  targets: np.ndarray | None = None, key: str | None = None) -> StepResult:
        return await self.submit(tokens, state, targets, key=key)

    # -- the scheduler loop ---------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            if self._count == 0:
                self._wake.clear()
                await self._wake.wait()
            delay = self.limits.max_queue_delay_s
            if delay > 0 and self._count < self.limits.max_batch_size:
                oldest = min(b[0].enqueued for b in self._buckets.values() if b)
                if (wait := oldest + delay - time.perf_counter()) > 0:
                    await asyncio.sleep(wait)
            if self.limits.max_fill_wait_s > 0:
                await self._fill()
            batch = self._take()
            self._depth.set(self._count)
            if not batch:
                continue
            started = time.perf_counter()
            for step in batch:
                self._wait.observe(started - step.enqueued)
            try:
                if self._inline(batch):
                    results, times = self._execute(batch)
                else:
                    results, times = await asyncio.get_running_loop().run_in_executor(
                        self._worker, self._execute, batch)
            except Exception as error:  # one bad call fails its requests, not the server
                failure = ExecutionFailed(f"model {self.label}: ONNX Runtime failed: {error}")
                for step in batch:
                    if not step.future.done():
                        step.future.set_exception(failure)
                continue
            seconds = time.perf_counter() - started
            if len(batch[0].tokens) == 1:  # the bucket of one-token steps
                self.call_s = (seconds if self.call_s is None
                               else self.call_s + _SMOOTHING * (seconds - self.call_s))
            self._execution.observe(seconds)
            self._batch_size.observe(len(batch))
            self._account(batch, started, times)
            for step, result in zip(batch, results):
                if not step.future.done():
                    step.future.set_result(result)
            # Let the callers run before the next batch: a completion samples and submits
            # its next step, so it joins that batch.
            await asyncio.sleep(0)

    def answered(self, key: str) -> None:
        """The request of session `key` is done: its client may send its next step soon
        (batch_fill.py). Not recorded when batches never wait."""
        if self.limits.max_fill_wait_s > 0:
            self.returning.answered(key, time.perf_counter())

    async def _fill(self) -> None:
        """Waits for the sessions expected back (batch_fill.py) while the next batch is
        one of one-token steps, with fewer than a full batch pending and at least half as
        many sessions expected as steps pending, and waits have been paying: until they
        are all queued, or the fill budget after the oldest pending step was queued."""
        now = time.perf_counter()
        if self._count >= self.limits.max_batch_size or self.call_s is None:
            return
        expected = self.returning.expected(now)
        if not expected or 2 * expected < self._count:
            return
        oldest_bucket = min((b for b in self._buckets.values() if b),
                            key=lambda b: b[0].enqueued)
        if len(oldest_bucket[0].tokens) != 1:  # the next call is not the one they join
            return
        oldest = oldest_bucket[0].enqueued
        budget = min(self.limits.max_fill_wait_s, self.returning.budget_s(self.call_s))
        if (wait := oldest + budget - now) <= 0 or not self.returning.worth_waiting():
            return
        pending = self._count
        self._fill_target = min(self.limits.max_batch_size, self._count + expected)
        self._wake.clear()
        timer = asyncio.get_running_loop().call_later(wait, self._wake.set)
        try:
            await self._wake.wait()
        finally:
            timer.cancel()
            self._fill_target = None
            self._fill_wait.observe(time.perf_counter() - now)
            self.returning.waited(self._count - pending)

    def _account(self, batch: list[Step], started: float,
                 times: tuple[float, float, float]) -> None:
        """The call's times, once for the model and once for each request in the batch
        (however many of its steps the batch ran), and each request's longest wait."""
        input_s, infer_s, output_s = times
        self.stats.record_batch(len(batch), input_s, infer_s, output_s)
        waits: dict[int, tuple[RequestTiming, float]] = {}
        for step in batch:
            if step.timing is not None:
                wait = started - step.enqueued
                seen = waits.get(id(step.timing))
                if seen is None or seen[1] < wait:
                    waits[id(step.timing)] = (step.timing, wait)
        for timing, wait in waits.values():
            timing.queue_s += wait
            timing.input_s += input_s
            timing.infer_s += infer_s
            timing.output_s += output_s

    def _inline(self, batch: list[Step]) -> bool:
        """Whether the batch may run on the loop's thread: a lone one-token step, nothing
        else waiting, known to be quick, and no session expected back soon (sessions are
        expected back soon while waits for them pay: a step on the loop's thread would
        then hold up their requests)."""
        return (len(batch) == 1 and self._count == 0 and len(batch[0].tokens) == 1
                and not (self.returning.paying
                         and self.returning.expected(time.perf_counter()))
                and self.lone_step_s is not None
                and self.lone_step_s < self.limits.max_inline_step_s)

    def _take(self) -> list[Step]:
        """The oldest step's bucket, in arrival order, up to the batch size and token budget.
        Steps whose caller went away (cancelled, deadline passed) are dropped here."""
        for key in [k for k, b in self._buckets.items() if not b]:
            del self._buckets[key]
        if not self._buckets:
            return []
        bucket = min(self._buckets.values(), key=lambda b: b[0].enqueued)
        batch: list[Step] = []
        width = 0
        while bucket and len(batch) < self.limits.max_batch_size:
            step = bucket[0]
            if step.future.done():
                bucket.popleft()
                self._count -= 1
                continue
            new_width = max(width, len(step.tokens))
            if batch and (len(batch) + 1) * new_width > self.limits.token_budget:
                break
            batch.append(bucket.popleft())
            self._count -= 1
            width = new_width
        return batch

    def _execute(self, batch: Sequence[Step]) -> tuple[list[StepResult], tuple]:
        started = time.perf_counter()
        results, times = self._run(batch)
        if len(batch) == 1 and len(batch[0].tokens) == 1:  # all of it: the call, the draw
            seconds, previous = time.perf_counter() - started, self.lone_step_s
            self.lone_step_s = (seconds if previous is None
                                else previous + _SMOOTHING * (seconds - previous))
        return results, times

    def _run(self, batch: Sequence[Step]) -> tuple[list[StepResult], tuple]:
        """Pads the steps into one [B, T] call; returns the results and the times of its
        three parts (Triton's compute input, infer and output)."""
        began = time.perf_counter()
        sizes = [len(step.tokens) for step in batch]
        width = max(sizes)
        tokens = np.zeros((len(batch), width, *batch[0].tokens.shape[1:]), np.int64)
        lengths = np.array(sizes, np.int64)
        for row, step in enumerate(batch):
            tokens[row, : len(step.tokens)] = step.tokens
        state = (np.stack([step.state for step in batch], axis=1)
                 if batch[0].state is not None else None)
        self._executed.inc(sum(sizes))
        if self.runtime.task == "lm":
            targets = np.zeros_like(tokens)
            for row, step in enumerate(batch):
                targets[row, : len(step.tokens)] = step.targets
            prepared = time.perf_counter()
            out = self.runtime.run_lm(tokens, lengths, state, targets)
            ran = time.perf_counter()
            new_state = out.state.numpy()
            greedy_ids, greedy_logprobs = out.greedy_tokens, out.greedy_logprobs
            results = [StepResult(out.token_logprobs[row, :n],
                                  None if step.sampler else out.next_logprobs[row].copy(),
                                  new_state[:, row].copy(),
                                  greedy_ids=None if greedy_ids is None else greedy_ids[row, :n],
                                  greedy_logprobs=(None if greedy_logprobs is None
                                                   else greedy_logprobs[row, :n]))
                       for row, (step, n) in enumerate(zip(batch, lengths, strict=True))]
            if sampled := [row for row, step in enumerate(batch) if step.sampler]:
                logprobs = out.next_logprobs[sampled]
                drawn = sample_batch(logprobs, [batch[row].sampler[0] for row in sampled],
                                     [batch[row].sampler[1] for row in sampled])
                for i, (row, token) in enumerate(zip(sampled, drawn, strict=True)):
                    results[row].token = int(token)
                    results[row].token_logprob = float(logprobs[i, token])
                    if batch[row].top:
                        results[row].top = most_likely(logprobs[i], batch[row].top)
            return results, (prepared - began, ran - prepared, time.perf_counter() - ran)
        prepared = time.perf_counter()
        outputs, new_state = self.runtime.run_encoder(tokens, lengths, state)
        ran = time.perf_counter()
        new_state = new_state.numpy() if new_state is not None else None
        per_token = self.runtime.task == "tag"
        results = [StepResult(outputs[row, :n] if per_token else outputs[row], None,
                              None if new_state is None else new_state[:, row].copy())
                   for row, n in enumerate(lengths)]
        return results, (prepared - began, ran - prepared, time.perf_counter() - ran)

