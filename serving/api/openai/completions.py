"""POST /v1/completions: OpenAI's legacy Completions on Engine.complete and Engine.score.

Each prompt is one Engine.complete of `n` samples, all prompts started at once (a prompt
refused, say for a full queue, stops the others: the request is answered whole or not at
all); choice `index` = prompt_index * n + sample_index. `echo` puts the prompt, as the
model read it (its tokens joined), before the completion; with `logprobs` its tokens'
log-probs come from Engine.score(add_eos=False): exactly recur.v1 Score's with
add_eos = false, so the first token's is log P(token | <eos>), a number (OpenAI gives
null there). A completion's text continues its prompt's: for a word-level model it
starts with a space after a non-empty prompt, so prompt + text reads as the whole text.
With `logprobs`, tokens are spelled as they are in the text (" cat"), so that they add up
to it, as OpenAI's do; a sample that ended on <eos> or a stop token lists that token last
(not in the text), so that a harness taking the last entry as the drawn token's is right.
An answer that could exceed max_message_bytes is refused before it runs; streamed, so are
echoes that could (they all go out before the first token).

Streamed (`stream`), each token is a server-sent event with a choice of the same shape as
the non-streamed ones, then one with its finish_reason, then `data: [DONE]`. A token is
sent once no stop string can begin in its text any more (the engine cuts the text before
a stop string), so the streamed pieces always add up to the non-streamed text. An error
after the stream began (the server shutting down, say) is sent as a last event
`data: {"error": {...}}`, without [DONE].
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import numpy as np
from fastapi.responses import Response, StreamingResponse

from serving.api.http.errors import HttpError, from_engine
from serving.api.openai.choices import (
    Choice,
    Piece,
    echo_piece,
    json_text_bytes,
    longest_token_bytes,
)
from serving.api.openai.errors import openai_error
from serving.api.openai.schema import (
    CompletionRequest,
    check_completion,
    parse,
    prompts_of,
    stops_of,
)
from serving.engine.decoding import CompletionStream, FinishEvent, TokenEvent
from serving.engine.engine import Engine
from serving.engine.errors import EngineError, LimitExceeded, Unavailable
from serving.engine.inputs import Encoded, Input
from serving.engine.repository import LoadedModel
from serving.engine.results import Scored

log = logging.getLogger("recur.serve")
# Upper bounds of a non-streamed answer's size, in bytes, so that an answer over
# max_message_bytes is refused before it runs: a log-prob or an offset in JSON, and what
# a choice costs beyond its tokens.
NUMBER_BYTES, CHOICE_BYTES = 26, 256
# Answers larger than this are written to JSON on a worker thread, off the event loop.
THREAD_JSON_BYTES = 256 << 10
@dataclass
class Plan:
    """A checked completion request, before anything runs."""

    model: LoadedModel
    prompts: list[Input]
    encoded: list[Encoded]
    n: int
    max_tokens: int
    logprobs: int | None
    echo: bool
    stream: bool
    include_usage: bool
    options: dict  # Engine.complete's keyword arguments
    stops: list[str]
    answer_bytes: int = 0  # at most, not streamed
    echo_bytes: int = 0  # at most, of the echoes of every choice

    @property
    def joiner(self) -> str:
        return self.model.vocab.normalization.detokenize(["", ""])

    def lead(self, index: int) -> str:
        """What goes between the prompt (or its echo) and the completion's first token."""
        prompt, encoded = self.prompts[index], self.encoded[index]
        if not len(encoded.ids) or (prompt.text and prompt.text[-1].isspace()
                                    and not self.echo):
            return ""
        return self.joiner


class Completions:
    def __init__(self, engine: Engine, max_message_bytes: int):
        self.engine, self.max_message_bytes = engine, max_message_bytes

    async def create(self, body: bytes) -> Response:
        plan = await self.plan(parse(CompletionRequest, body))
        started = await _all_or_none(self._start(plan))
        streams, scores = started[:-1], started[-1]
        created, completion_id = int(time.time()), f"cmpl-{secrets.token_hex(12)}"
        head = {"id": completion_id, "object": "text_completion", "created": created,
                "model": plan.model.name, "system_fingerprint": plan.model.label}
        try:
            choices = await _off_loop(plan.echo_bytes > THREAD_JSON_BYTES, self._choices,
                                      plan, scores)
        except BaseException:
            for stream in streams:
                stream.cancel()
            raise
        if plan.stream:
            return StoppingStreamingResponse(
                _events(plan, head, choices, streams), lambda: _stop_all(streams),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # nginx
        pieces, generated = await _collect(plan, choices, streams)
        answer = {**head, "choices": [
            {"index": c.index, "text": p.text, "finish_reason": c.finish_reason,
             "logprobs": p.logprobs() if plan.logprobs is not None else None}
            for c, p in zip(choices, pieces, strict=True)], "usage": _usage(plan, generated)}
        if plan.answer_bytes > THREAD_JSON_BYTES:
            return Response(await asyncio.to_thread(_json, answer),
                            media_type="application/json")
        return Response(_json(answer), media_type="application/json")

    async def plan(self, request: CompletionRequest) -> Plan:
        """The whole request checked, the completion's settings too (as Engine.complete
        checks them, even for an echo alone, which runs no completion), and its prompts
        read (off the event loop when they are large), before anything runs."""
        check_completion(request)
        engine = self.engine
        model = engine.model(request.model, 0, "lm", name_field="model", version_field="model")
        prompts = prompts_of(request.prompt)
        max_tokens = 16 if request.max_tokens is None else request.max_tokens
        echo = bool(request.echo)
        if max_tokens < 0 or (max_tokens == 0 and not echo):
            raise HttpError(400, f"max_tokens: must be >= 1 (0 only with echo, to score the "
                            f"prompt), got {max_tokens}", "max_tokens")
        stops = stops_of(request.stop)
        stream = bool(request.stream)
        options = dict(
            max_tokens=max_tokens, temperature=_float32(request.temperature, 1.0),
            top_k=request.top_k or 0, top_p=_float32(request.top_p, 1.0),
            n=request.n or 1, seed=request.seed, stop=stops,
            stop_token_ids=request.stop_token_ids or (),
            top_logprobs=request.logprobs or 0, top_field="logprobs")
        # first: the answer's size is estimated from max_tokens, n and logprobs
        engine.check_completion(model, **options)
        plan = Plan(model, prompts, [], request.n or 1, max_tokens, request.logprobs,
                    echo, stream, bool(request.stream_options
                                       and request.stream_options.include_usage),
                    options, stops)
        await engine.off_loop_if_large(prompts, self._read_prompts, plan)
        return plan

    def _read_prompts(self, plan: Plan) -> None:
        """Tokenizes the prompts (once: the completions and scores take their ids) and
        bounds the answer. add_eos=True only allows empty prompts (a completion of
        nothing begins a sentence); nothing is appended to the ids here."""
        plan.encoded = self.engine.prepare_scores(plan.model, plan.prompts, add_eos=True,
                                                  field="prompt")
        self._bound(plan)

    def _bound(self, plan: Plan) -> None:
        """Refuses an answer that could exceed max_message_bytes; streamed, the echoes,
        which are all sent at once, before any token (the tokens come as they are drawn,
        each its own small event, as fast as the client reads)."""
        limit = self.max_message_bytes
        plan.answer_bytes, plan.echo_bytes = self._answer_bytes(plan)
        echo_field = "logprobs" if plan.logprobs is not None else "echo"
        if plan.echo_bytes > limit:  # streamed or not
            raise LimitExceeded("max_message_bytes", plan.echo_bytes, limit, echo_field,
                                "an echo of up to ", " bytes (each prompt once per sample, "
                                "with its log-probs; ask for fewer log-probs or samples, or "
                                "shorter prompts)")
        if not plan.stream and plan.answer_bytes > limit:
            raise LimitExceeded("max_message_bytes", plan.answer_bytes, limit, "max_tokens",
                                "an answer of up to ", " bytes (stream it, or ask for fewer "
                                "tokens, samples or log-probs)")

    def _start(self, plan: Plan) -> list:
        """The completions of every prompt (none for max_tokens 0), and the echo's scores
        (None without log-probs), as coroutines."""
        engine, model = self.engine, plan.model
        work: list = []
        if plan.max_tokens:
            work = [engine.complete(model, Input(ids=e.ids.tolist(), field=p.field),
                                    **plan.options)
                    for p, e in zip(plan.prompts, plan.encoded, strict=True)]
        scored = [Input(ids=e.ids.tolist(), field=p.field)
                  for p, e in zip(plan.prompts, plan.encoded, strict=True) if len(e.ids)]
        if plan.echo and plan.logprobs is not None and scored:
            work.append(engine.score(model, scored, add_eos=False, field="prompt",
                                     top_logprobs=plan.logprobs, top_field="logprobs"))
        else:
            work.append(_nothing())
        return work

    def _choices(self, plan: Plan, scores: list[Scored] | None) -> list[Choice]:
        """Every choice, in index order, with its echo (if asked) already in."""
        hold = max(map(len, plan.stops), default=1) - 1
        scored = iter(scores or ())
        choices = []
        for index, encoded in enumerate(plan.encoded):
            echo = None
            if plan.echo:
                score = next(scored) if scores is not None and len(encoded.ids) else None
                echo = echo_piece(encoded.words, plan.joiner, score, plan.model.vocab.eos_id)
            for sample in range(plan.n):
                choice = Choice(index * plan.n + sample, plan.joiner, plan.lead(index), hold,
                                len(echo.text) if echo else 0, plan.model.vocab.eos_id)
                choice.echo = echo
                choices.append(choice)
        return choices

    def _answer_bytes(self, plan: Plan) -> tuple[int, int]:
        """Upper bounds of the non-streamed answer's size, and of its echoes'."""
        longest = longest_token_bytes(plan.model)  # quoted, escaped
        joiner = json_text_bytes(plan.joiner) - 2
        per_top = longest + joiner + 4 + NUMBER_BYTES
        logprobs = plan.logprobs is not None
        extra = (NUMBER_BYTES * 2 + 4 + (plan.logprobs + 1) * per_top) if logprobs else 0
        generated = plan.max_tokens * ((longest + joiner) * (2 if logprobs else 1)
                                       + extra + 6)
        total = echoes = 0
        for encoded in plan.encoded:
            echoed = 0
            if plan.echo:
                words = (sum(map(json_text_bytes, encoded.words))
                         + len(encoded.words) * joiner)
                echoed = words * (2 if logprobs else 1) + len(encoded.words) * (extra + 6)
            total += plan.n * (CHOICE_BYTES + generated + echoed)
            echoes += plan.n * echoed
        return total, echoes



class StoppingStreamingResponse(StreamingResponse):
    """A streamed answer that stops its completions however the response ends: Starlette
    never closes the body's generator, so a client leaving while it waits at a `yield`
    would leave them running (the model acquired, the request pending) until the garbage
    collector finalized it."""

    def __init__(self, content: AsyncIterator[bytes], stop: Callable[[], None], **options):
        super().__init__(content, **options)
        self.stop = stop

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stop()
            body = self.body_iterator
            with contextlib.suppress(Exception):  # its own finally ends in stop() too
                await body.aclose()  # type: ignore[attr-defined]


def _stop_all(streams: Sequence[CompletionStream]) -> None:
    for stream in streams:
        stream.cancel()


async def _nothing() -> None:
    return None


async def _off_loop(large: bool, work, *args):
    """`work(*args)`, on a worker thread when `large`, so that the loop serves others."""
    return await asyncio.to_thread(work, *args) if large else work(*args)


def _float32(value: float | None, default: float) -> float:
    """As recur.v1 carries it (a float32), so that the same request over either front
    samples the same tokens."""
    value = default if value is None else value
    with np.errstate(over="ignore"):
        return float(np.float32(value))


async def _all_or_none(coroutines: list) -> list:
    """Runs the coroutines at once; at the first failure the others are cancelled, the
    completions they started stopped, and the failure raised. A coroutine cancelled from
    inside (its step cancelled as the scheduler closes) is a failure too."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    failed: list[asyncio.Future] = []
    try:
        running = set(tasks)
        while running and not failed:
            done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            failed = [t for t in tasks if t in done and (t.cancelled() or t.exception())]
    finally:
        if failed or not all(t.done() for t in tasks):  # a failure, or we were cancelled
            for task in tasks:
                task.cancel()
                task.add_done_callback(_stop_if_started)
    if failed:
        if failed[0].cancelled():
            raise Unavailable("the request was cancelled (the server is shutting down)")
        raise failed[0].exception()
    return [task.result() for task in tasks]


def _stop_if_started(task: asyncio.Future) -> None:
    """A started completion of a request that failed as a whole is stopped."""
    if not task.cancelled() and task.exception() is None and isinstance(task.result(),
                                                                        CompletionStream):
        task.result().cancel()


async def _collect(plan: Plan, choices: list[Choice], streams: list[CompletionStream]
                   ) -> tuple[list[Piece], int]:
    """The whole of every choice, and how many tokens were generated."""
    pieces = []
    for choice in choices:
        pieces.append(Piece())
        if choice.echo is not None:
            pieces[-1].extend(choice.echo)
    generated = 0

    async def read(prompt: int, stream: CompletionStream) -> None:
        nonlocal generated
        async with stream:
            async for event in stream:
                index = prompt * plan.n + event.index
                if isinstance(event, TokenEvent):
                    generated += 1
                    if (piece := choices[index].add(event)) is not None:
                        pieces[index].extend(piece)
                else:
                    generated += event.last is not None
                    pieces[index].extend(choices[index].finish(event))

    try:
        await _all_or_none([read(p, s) for p, s in enumerate(streams)])
    finally:
        for stream in streams:
            stream.cancel()
    if not streams:  # max_tokens 0: the echo alone
        for choice in choices:
            choice.finish_reason = "length"
    return pieces, generated


async def _events(plan: Plan, head: dict, choices: list[Choice],
                  streams: list[CompletionStream]) -> AsyncIterator[bytes]:
    """The server-sent events of a streamed completion."""
    events = ChoiceEvents(head, plan.include_usage, plan.logprobs is not None)
    generated = 0
    try:
        for first in range(0, len(choices), plan.n):  # a prompt's echo, once for its n
            if (echo := choices[first].echo) is not None:
                body = await _off_loop(plan.echo_bytes > THREAD_JSON_BYTES, events.body,
                                       echo)
                for choice in choices[first:first + plan.n]:
                    yield events.event(choice.index, body)
                del body
        if not streams:
            for choice in choices:
                yield events.event(choice.index, events.body(Piece(), "length"))
        async with contextlib.aclosing(_merged(streams)) as merged:
            async for prompt, token in merged:
                choice = choices[prompt * plan.n + token.index]
                if isinstance(token, TokenEvent):
                    generated += 1
                    if (piece := choice.add(token)) is not None:
                        yield events.event(choice.index, events.body(piece))
                else:
                    generated += token.last is not None
                    piece = choice.finish(token)
                    yield events.event(choice.index, events.body(piece, choice.finish_reason))
        if plan.include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(plan, generated)})
        yield b"data: [DONE]\n\n"
    except EngineError as error:
        yield _sse(openai_error(from_engine(error)))
    except Exception as error:
        error_id = secrets.token_hex(6)
        log.error("a streamed completion failed (error id %s)", error_id, exc_info=error)
        yield _sse(openai_error(HttpError(500, f"internal error (error id {error_id}; the "
                                          "server's log has the details)",
                                          code="internal_error")))
    finally:
        for stream in streams:
            stream.cancel()


class ChoiceEvents:
    """The server-sent events of one choice each, written as JSON once per choice's body
    (a prompt's echo, the same for its n choices, is written once)."""

    def __init__(self, head: dict, include_usage: bool, logprobs: bool):
        self.logprobs = logprobs
        self.start = b"data: " + _json(head)[:-1] + b',"choices":[{"index":'
        self.end = b"]" + (b',"usage":null' if include_usage else b"") + b"}\n\n"

    def body(self, piece: Piece, finish: str | None = None) -> bytes:
        """A choice but its index, as JSON."""
        return _json({"text": piece.text, "finish_reason": finish,
                      "logprobs": piece.logprobs() if self.logprobs else None})

    def event(self, index: int, body: bytes) -> bytes:
        return b"".join((self.start, str(index).encode(), b",", body[1:], self.end))


async def _merged(streams: list[CompletionStream]
                  ) -> AsyncIterator[tuple[int, TokenEvent | FinishEvent]]:
    """The events of several streams as they come, each with its stream's index; each
    stream is read only as fast as the events are taken (its own backpressure)."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    pending = {asyncio.ensure_future(s.__anext__()): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in sorted(done, key=pending.get):
                index = pending.pop(future)
                try:
                    item = future.result()
                except StopAsyncIteration:
                    continue
                yield index, item
                pending[asyncio.ensure_future(streams[index].__anext__())] = index
    finally:
        for future in pending:
            if future.done():
                if not future.cancelled():
                    future.exception()  # taken: not logged as never retrieved
            else:
                future.cancel()


def _usage(plan: Plan, generated: int) -> dict:
    prompt_tokens = sum(len(e.ids) for e in plan.encoded)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
            "total_tokens": prompt_tokens + generated}


def _json(content) -> bytes:
    return json.dumps(content, ensure_ascii=False, allow_nan=False,
                      separators=(",", ":")).encode()


def _sse(content) -> bytes:
    return b"data: " + _json(content) + b"\n\n"
