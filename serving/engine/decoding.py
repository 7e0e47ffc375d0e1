"""Completions: the decoding loop, its samples and stop conditions, and the stream of events
it produces.

The loop runs as a task of its own and hands its events to a bounded queue that the
caller reads. It never waits for the caller to deliver an event (a protocol's write, whose
completions come back at staggered times): the streams would then submit their next steps
at staggered times too, and the shared batches would split into small ones. A caller that
reads slowly holds back only its own completion, by at most WRITE_AHEAD events a sample.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from serving.engine.errors import Unavailable, shutting_down
from serving.engine.metrics import Metrics
from serving.engine.repository import LoadedModel
from serving.model.sampler import SamplingParams, most_likely, sample_next

WRITE_AHEAD = 64
EOS, LENGTH, STOP = "eos", "length", "stop"  # why a sample finished


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """A sample's next token."""

    index: int
    id: int
    text: str
    logprob: float  # the model's, before temperature, top-k and top-p
    top: tuple[tuple[int, str, float], ...] = ()  # if asked: the most likely tokens there


@dataclass(frozen=True, slots=True)
class FinishEvent:
    """A sample's end: why (EOS, LENGTH or STOP) and its whole text (cut before a stop
    string that ended it); `last`, the token drawn that ended it without joining its text
    (`<eos>` or one of stop_token_ids), for a client that lists every drawn token's
    log-prob (None after a length or a stop-string finish)."""

    index: int
    reason: str
    text: str
    last: TokenEvent | None = None


Event = TokenEvent | FinishEvent


@dataclass(frozen=True)
class CompletionParams:
    sampling: SamplingParams
    max_tokens: int
    samples: int
    seed: int
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    top: int = 0  # most likely tokens to report beside each drawn one


class Sample:
    """One sample of a completion: its generator, its state and the token drawn next."""

    def __init__(self, index: int, rng: np.random.Generator, state: np.ndarray,
                 next_logprobs: np.ndarray, params: SamplingParams, top: int = 0):
        self.index, self.rng, self.state = index, rng, state
        self.token = sample_next(next_logprobs, params, rng)
        self.logprob = float(next_logprobs[self.token])
        self.top = most_likely(next_logprobs, top)  # (id, log-prob) of the token's draw
        self.ids: list[int] = []
        self.decoder = None  # a BPE vocabulary's incremental decoder, from the first read
        self.piece = ""  # the text of the token read last (`read`)
        self.length_streamed = 0  # characters its token events have carried
        self.tail = ""  # the end of the text, as far back as a stop string could start
        self.length = 0  # of the whole text, in characters
        self.text: str | None = None  # set when a stop string cut the text


    def read(self, token: int, vocab) -> str:
        """The text `token` adds: the token itself, or for BPE the characters its bytes
        complete ("" while a character's bytes are still arriving)."""
        if vocab.bpe is None:
            self.piece = vocab.tokens[token]
        else:
            if self.decoder is None:
                self.decoder = vocab.stream_decoder()
            self.piece = self.decoder.step(token)
        return self.piece


class Stops:
    """A completion's stop conditions. Stop strings are matched as the text grows: only
    where a match could end in the newest token's text, against the text's last few
    characters, so a token costs the same however long the text (the number and length
    of stop strings are capped by the engine)."""

    def __init__(self, token_ids: frozenset[int], strings: tuple[str, ...]):
        self.token_ids, self.strings = token_ids, strings
        self.longest = max(map(len, strings), default=0)

    def check(self, sample: Sample, token: int, vocab) -> str | None:
        """The finish reason if `token` ends the sample (it is then not emitted)."""
        if token == vocab.eos_id:
            return EOS
        if token in self.token_ids:
            return STOP
        text = sample.read(token, vocab)
        if self.strings:
            joiner = vocab.normalization.detokenize(["", ""]) if sample.length else ""
            piece = joiner + text
            window = sample.tail + piece  # the text's end: a new match ends in `piece`
            cuts = [i for i in (window.find(s) for s in self.strings) if i >= 0]
            if cuts:
                start = sample.length - len(sample.tail)  # where the window starts
                sample.text = vocab.decode(sample.ids + [token])[: start + min(cuts)]
                return STOP
            sample.tail = window[len(window) - self.longest + 1:] if self.longest > 1 else ""
            sample.length += len(piece)
        return None


class CompletionStream:
    """The events of one completion, in order, as an async iterator; close it when done
    with it (`async with stream:`, or `cancel()`), which stops the decoding loop and drops
    its pending steps. An error of the loop (the server shutting down, a failed batch) is
    raised after the events produced before it; a loop stopped from outside (its steps
    dropped by the scheduler's closing at shutdown) ends the stream with Unavailable,
    never as if it had finished."""

    _END = object()

    def __init__(self, produce: Callable[[Callable[[Event], Awaitable[None]]], Awaitable[None]],
                 limit: int):
        self._queue: asyncio.Queue = asyncio.Queue()  # bounded by _room, so _END always fits
        self._room = asyncio.Semaphore(limit)
        self._cancelled = False
        self.capacity = limit
        # set when the loop ends or the buffer fills: what a packing writer waits on
        self._settled = asyncio.Event()
        self._task = asyncio.ensure_future(produce(self._emit))
        self._task.add_done_callback(self._ended)

    def _ended(self, _task) -> None:
        self._queue.put_nowait(self._END)
        self._settled.set()

    async def _emit(self, event: Event) -> None:
        await self._room.acquire()
        self._queue.put_nowait(event)
        if self._room.locked():  # full: the loop now waits for the reader
            self._settled.set()

    async def gather(self, seconds: float) -> None:
        """Waits up to `seconds` for more events to gather, returning early once the loop
        has ended or the buffer is full (the loop then waits for the reader, so waiting
        longer would only slow the stream)."""
        self._settled.clear()
        if self._task.done() or self.full():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), seconds)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        item = await self._queue.get()
        if item is self._END:
            self._queue.put_nowait(self._END)  # every later call ends too
            if self._task.cancelled():
                if self._cancelled:
                    raise StopAsyncIteration
                raise Unavailable("the completion was stopped before it finished: the "
                                  "server is shutting down")
            if self._task.exception() is not None:
                raise self._task.exception()
            raise StopAsyncIteration
        self._room.release()
        return item

    def ready(self) -> list[Event]:
        """The events already produced (at most `capacity`), in order, without waiting:
        for a caller that writes several in one message. The loop's end (or its error) is
        left for the iterator to raise."""
        taken: list[Event] = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is self._END:  # always the last item: put back, nothing follows it
                self._queue.put_nowait(item)
                break
            self._room.release()
            taken.append(item)
        return taken

    def full(self) -> bool:
        """Whether the next event waits for the reader to take one."""
        return self._room.locked()

    def cancel(self) -> None:
        self._cancelled = True
        if self._task.done():
            if not self._task.cancelled():
                self._task.exception()  # taken: an error nobody will read is not logged
        else:
            self._task.cancel()

    async def __aenter__(self) -> CompletionStream:
        return self

    async def __aexit__(self, *exc) -> None:
        self.cancel()

    def failure(self) -> BaseException | None:
        """Once the loop has ended: why it did not finish (its error, or CancelledError
        when it was stopped), or None."""
        if self._task.cancelled():
            return asyncio.CancelledError()
        return self._task.exception()

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """`callback()` once the decoding loop has ended, however it ended."""
        self._task.add_done_callback(lambda _: callback())


async def decode(model: LoadedModel, params: CompletionParams, active: list[Sample],
                 emit: Callable[[Event], Awaitable[None]], metrics: Metrics,
                 closing: asyncio.Event, started: float) -> None:
    """The decoding loop: emit each sample's drawn token, submit its next step, wait for
    the batch that runs the steps and draws the next tokens."""
    vocab = model.vocab
    stops = Stops(params.stop_token_ids, params.stop)
    sampler = params.sampling
    first = True
    while active:
        if closing.is_set():
            raise shutting_down()  # what was generated is delivered before the error
        events, steps = [], []
        for sample in active:
            token, logprob = sample.token, sample.logprob
            reason = stops.check(sample, token, vocab)
            if reason is None:
                sample.ids.append(token)
                sample.length_streamed += len(sample.piece)
                events.append(_token_event(sample, token, logprob, vocab))
                if len(sample.ids) >= params.max_tokens:
                    reason = LENGTH
            if reason is None:
                future = model.scheduler.submit(np.array([token], np.int64), sample.state,
                                                np.zeros(1, np.int64), (sampler, sample.rng),
                                                params.top)
                steps.append((sample, future))
            else:
                text = sample.text
                if text is None:
                    text = vocab.decode(sample.ids)
                    if vocab.bpe is not None:  # what was streamed: no character cut short
                        text = text[: sample.length_streamed]
                ended = (_token_event(sample, token, logprob, vocab, read=False)
                         if reason in (EOS, STOP) and sample.text is None else None)
                events.append(FinishEvent(sample.index, reason, text, ended))
        generated = sum(1 for e in events if isinstance(e, TokenEvent))
        metrics.tokens.labels(model.label, "generated").inc(generated)
        for event in events:
            await emit(event)
            if first:
                metrics.first_token.labels(model.label).observe(time.perf_counter() - started)
                first = False
        active = []
        try:
            for sample, future in steps:
                result = await future
                sample.state, sample.token = result.state, result.token
                sample.logprob, sample.top = result.token_logprob, result.top or []
                active.append(sample)
        finally:  # cancelled or failed: the other samples' steps need not run
            for _, future in steps:
                future.cancel()


def _token_event(sample: Sample, token: int, logprob: float, vocab,
                 read: bool = True) -> TokenEvent:
    """`read`: a token of the text (its text is what `Sample.read` gave); otherwise one
    that ended the sample, shown alone."""
    texts = vocab.texts
    return TokenEvent(sample.index, token, sample.piece if read else texts[token], logprob,
                      tuple((i, texts[i], lp) for i, lp in sample.top))
