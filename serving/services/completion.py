"""Streamed completions: the decoding loop of `Complete`, its samples, stop conditions and
the outbox that writes their messages."""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np

from serving.errors import invalid
from serving.metrics import Metrics
from serving.proto_gen.recur.v1 import recur_pb2 as pb
from serving.repository import LoadedModel
from serving.sampler import SamplingParams, sample_next
from serving.services import model_ref, shutting_down

# Messages a completion may have waiting to be written, per sample: beyond that a client
# that reads slowly holds its completion back (gRPC's flow control does the rest).
WRITE_AHEAD = 64


class Outbox:
    """A completion's messages, written by a task of their own. The decoding loop hands a
    token over and goes straight on to submit its next step: waiting for gRPC's write, whose
    completions come back at staggered times, would make the streams submit at staggered
    times too, and the shared batches would split into small ones."""

    def __init__(self, context, limit: int):
        self._queue: asyncio.Queue = asyncio.Queue(limit)
        self._writer = asyncio.ensure_future(self._write_all(context))

    async def _write_all(self, context) -> None:
        while (message := await self._queue.get()) is not None:
            await context.write(message)

    async def put(self, message) -> None:
        if self._writer.done():
            self._writer.result()  # a write failed: its error ends the completion
        await self._queue.put(message)

    async def close(self) -> None:
        """Returns when every message handed over has been written."""
        if not self._writer.done():
            await self._queue.put(None)
        await self._writer

    def cancel(self) -> None:
        self._writer.cancel()


class Sample:
    """One sample of a completion: its generator, its state and the token drawn next."""

    def __init__(self, index: int, rng: np.random.Generator, state: np.ndarray,
                 next_logprobs: np.ndarray, params: SamplingParams):
        self.index, self.rng, self.state = index, rng, state
        self.token = sample_next(next_logprobs, params, rng)
        self.logprob = float(next_logprobs[self.token])
        self.ids: list[int] = []
        self.text: str | None = None  # set when a stop string cut the text


class Stops:
    def __init__(self, token_ids: set[int], strings: list[str]):
        self.token_ids, self.strings = token_ids, strings

    def check(self, sample: Sample, token: int, vocab) -> int | None:
        """The finish reason if `token` ends the sample (it is then not emitted)."""
        if token == vocab.eos_id:
            return pb.FINISH_REASON_EOS
        if token in self.token_ids:
            return pb.FINISH_REASON_STOP
        if self.strings:
            text = vocab.decode(sample.ids + [token])
            cuts = [text.find(s) for s in self.strings if s in text]
            if cuts:
                sample.text = text[: min(cuts)]
                return pb.FINISH_REASON_STOP
        return None


def sampling_params(request: pb.CompleteRequest) -> SamplingParams:
    temperature = request.temperature if request.HasField("temperature") else 1.0
    top_p = request.top_p if request.HasField("top_p") else 1.0
    if not math.isfinite(temperature) or temperature < 0:
        raise invalid("temperature", f"must be >= 0 (0 is greedy), got {temperature}")
    if request.top_k < 0:
        raise invalid("top_k", f"must be >= 0 (0 is no limit), got {request.top_k}")
    if not 0.0 < top_p <= 1.0:
        raise invalid("top_p", f"must be in (0, 1], got {top_p}")
    return SamplingParams(temperature=temperature, top_k=request.top_k, top_p=top_p)


async def decode(model: LoadedModel, params: SamplingParams, max_tokens: int, stops: Stops,
                 active: list[Sample], outbox: Outbox, metrics: Metrics,
                 closing: asyncio.Event, started: float) -> None:
    """The decoding loop: hand each sample's drawn token to the outbox, submit its next
    step, wait for the batch that runs the steps and draws the next tokens."""
    vocab = model.runtime.vocab
    first = True
    while active:
        if closing.is_set():
            await outbox.close()  # what was generated is delivered before the status
            raise shutting_down()
        messages, steps = [], []
        for sample in active:
            token, logprob = sample.token, sample.logprob
            reason = stops.check(sample, token, vocab)
            if reason is None:
                sample.ids.append(token)
                messages.append(pb.CompleteResponse(
                    index=sample.index, token=pb.Token(id=token, text=vocab.tokens[token],
                                                       logprob=logprob)))
                if len(sample.ids) >= max_tokens:
                    reason = pb.FINISH_REASON_LENGTH
            if reason is None:
                future = model.batcher.submit(np.array([token], np.int64), sample.state,
                                              np.zeros(1, np.int64), (params, sample.rng))
                steps.append((sample, future))
            else:
                text = vocab.decode(sample.ids) if sample.text is None else sample.text
                messages.append(pb.CompleteResponse(index=sample.index, finish_reason=reason,
                                                    text=text, model=model_ref(model)))
        generated = sum(1 for m in messages if m.HasField("token"))
        metrics.tokens.labels(model.label, "generated").inc(generated)
        for message in messages:
            await outbox.put(message)
            if first:
                metrics.first_token.labels(model.label).observe(
                    time.perf_counter() - started)
                first = False
        active = []
        try:
            for sample, future in steps:
                result = await future
                sample.state, sample.token = result.state, result.token
                sample.logprob = result.token_logprob
                active.append(sample)
        finally:  # cancelled or failed: the other samples' steps need not run
            for _, future in steps:
                future.cancel()
