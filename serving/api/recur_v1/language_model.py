"""recur.v1.LanguageModel: Score, ScoreStream, LogLikelihood(Rolling), Complete and the
session calls."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

import grpc

from serving.api.recur_v1.convert import (
    TOKEN_OVERHEAD,
    StreamPacker,
    completion_message,
    likelihood_limit,
    log_likelihood,
    model_ref,
    response_limit,
    rolling_log_likelihood,
    sequence_score,
    session_response,
    stream_interval,
    to_input,
    to_inputs,
    to_pairs,
)
from serving.api.rpc.auth import peer_of
from serving.api.rpc.handlers import message, record, rpc, until_closing
from serving.api.rpc.status import code_of
from serving.engine.decoding import CompletionStream, FinishEvent
from serving.engine.engine import Engine
from serving.engine.errors import EngineError, Unavailable
from serving.engine.stats import request_scope
from serving.proto_gen.recur.v1 import recur_pb2 as pb
from serving.proto_gen.recur.v1 import recur_pb2_grpc as pb_grpc

SERVICE = "LanguageModel"
# What a stream holds per token in flight, counted against stream_window_bytes: its id,
# word and log-prob as Python objects, then as a Token in the response (measured: about
# 120 bytes).
TOKEN_BYTES = 128


class LanguageModelService(pb_grpc.LanguageModelServicer):
    def __init__(self, engine: Engine, stream_window: int,
                 stream_window_bytes: int = 16 << 20, max_message_bytes: int = 4 << 20,
                 client_of: Callable[[grpc.aio.ServicerContext], str] = peer_of):
        """`client_of` names the caller, for per-client session quotas
        (serving/api/rpc/auth.py)."""
        self.engine, self.metrics, self.client_of = engine, engine.metrics, client_of
        self.stream_window, self.stream_window_bytes = stream_window, stream_window_bytes
        self.max_message_bytes = max_message_bytes

    # -- scoring --------------------------------------------------------------------------
    @rpc(SERVICE)
    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        model = self.engine.model(request.model.name, request.model.version, "lm")
        add_eos = request.add_eos if request.HasField("add_eos") else True
        scores = await self.engine.score(
            model, to_inputs(request.inputs, "inputs"), add_eos,
            check=response_limit(self.max_message_bytes, "inputs", int(add_eos)))
        return pb.ScoreResponse(scores=[sequence_score(s) for s in scores],
                                model=model_ref(model))

    @rpc(SERVICE, stream=True)
    async def ScoreStream(self, requests, context) -> None:
        """Reads a message only while fewer than `stream_window` sequences and
        `stream_window_bytes` bytes are outstanding: beyond that, HTTP/2 flow control holds
        the client back, so a stream's memory stays bounded however slowly it reads. Each
        message counts as a request, from its arrival to its answer."""
        engine = self.engine
        window = _Window(self.stream_window, self.stream_window_bytes)
        ordered: asyncio.Queue = asyncio.Queue()

        async def read() -> None:
            async for request in until_closing(requests, engine.closing):
                arrived = time.perf_counter()
                with request_scope() as scope:
                    try:
                        item = (*await take(request, scope), arrived)
                    except EngineError as error:  # ends the stream with its status
                        record(self.metrics, SERVICE, "ScoreStream", code_of(error).name,
                               scope.model, arrived)
                        raise
                ordered.put_nowait(item)
            ordered.put_nowait(None)

        async def take(request, scope) -> tuple:
            field = f"request {request.id!r}"
            model = engine.model(request.model.name, request.model.version, "lm",
                                 f"{field}: model.name", f"{field}: model.version")
            add_eos = request.add_eos if request.HasField("add_eos") else True
            encoded = engine.prepare_scores(
                model, to_inputs(request.inputs, f"{field}: inputs"), add_eos,
                f"{field}: inputs")
            response_limit(self.max_message_bytes, f"{field}: inputs",
                           int(add_eos))(encoded)
            count = len(encoded)
            # the version is held from its lookup, through the waits, to the end of
            # the work, so that a rollout meanwhile does not unload it under us
            cost = request.ByteSize() + TOKEN_BYTES * sum(len(e.ids) for e in encoded)
            model.acquire()
            try:
                await window.acquire(count, cost)
                admission = await engine.admit_when_room(model, count)
                work = asyncio.ensure_future(engine.score_prepared(model, encoded,
                                                                   add_eos))
            except BaseException:
                model.release()
                raise
            work.add_done_callback(model.release)
            work.add_done_callback(admission.release)
            return request.id, count, cost, work, scope.model

        reader = asyncio.ensure_future(read())
        head: asyncio.Future | None = None
        try:
            while True:
                head = asyncio.ensure_future(ordered.get())
                if not reader.done():
                    await asyncio.wait({head, reader}, return_when=asyncio.FIRST_COMPLETED)
                if reader.done() and reader.exception() is not None:
                    head.cancel()
                    reader.result()  # a bad message ends the stream with its status
                if (item := await head) is None:
                    break
                request_id, count, cost, work, model_name, arrived = item
                try:
                    scores = [sequence_score(s) for s in await work]
                except EngineError as error:
                    record(self.metrics, SERVICE, "ScoreStream", code_of(error).name,
                           model_name, arrived)
                    raise
                await context.write(pb.ScoreStreamResponse(id=request_id, scores=scores))
                record(self.metrics, SERVICE, "ScoreStream", "OK", model_name, arrived)
                window.release(count, cost)
        finally:  # the call ended, perhaps cancelled by its client: no task left behind
            reader.cancel()
            if head is not None:
                head.cancel()
            while not ordered.empty():
                if (item := ordered.get_nowait()) is not None:
                    item[3].cancel()

    # -- log-likelihoods ------------------------------------------------------------------
    @rpc(SERVICE)
    async def LogLikelihood(self, request: pb.LogLikelihoodRequest,
                            context) -> pb.LogLikelihoodResponse:
        model = self.engine.model(request.model.name, request.model.version, "lm")
        likelihoods = await self.engine.loglikelihood(
            model, to_pairs(request.pairs, "pairs"), field="pairs",
            check=likelihood_limit(self.max_message_bytes, "pairs"))
        response = pb.LogLikelihoodResponse(results=[log_likelihood(x) for x in likelihoods],
                                            model=model_ref(model))
        return response

    @rpc(SERVICE)
    async def LogLikelihoodRolling(self, request: pb.LogLikelihoodRollingRequest,
                                   context) -> pb.LogLikelihoodRollingResponse:
        model = self.engine.model(request.model.name, request.model.version, "lm")
        scores = await self.engine.loglikelihood_rolling(
            model, to_inputs(request.inputs, "inputs"), field="inputs")
        return pb.LogLikelihoodRollingResponse(
            results=[rolling_log_likelihood(s) for s in scores], model=model_ref(model))

    # -- completion -----------------------------------------------------------------------
    @rpc(SERVICE)
    async def Complete(self, request: pb.CompleteRequest, context) -> None:
        interval = stream_interval(request)  # None: one message per token
        model = self.engine.model(request.model.name, request.model.version, "lm")
        stream = await self.engine.complete(
            model, to_input(request.prompt, "prompt"),
            max_tokens=request.max_tokens,
            temperature=request.temperature if request.HasField("temperature") else 1.0,
            top_k=request.top_k, top_p=request.top_p if request.HasField("top_p") else 1.0,
            n=request.n, seed=request.seed if request.HasField("seed") else None,
            stop=list(request.stop), stop_token_ids=list(request.stop_token_ids))
        async with stream:
            if interval is None:
                async for event in stream:
                    await context.write(completion_message(event, model))
            else:
                await self._write_packed(stream, StreamPacker(model), context, interval)

    @staticmethod
    async def _write_packed(stream: CompletionStream, packer: StreamPacker, context,
                            interval: float) -> None:
        """A packed stream: each round takes every event that came while the last writes
        were pending, after gathering more for what is left of `interval` since those
        writes, unless the round holds a sample's first token or a sample's end. The
        gathering ends early when the decoding loop ends or the stream's buffer fills
        (the loop then waits for this writer), so an interval never holds back the end
        of a stream or slows one the client reads behind."""
        loop, written = asyncio.get_running_loop(), -math.inf
        async for event in stream:
            events = [event, *stream.ready()]
            wait = written + interval - loop.time()
            if wait > 0 and not packer.holds_first_token(events) and not any(
                    isinstance(e, FinishEvent) for e in events):
                await stream.gather(wait)
                events += stream.ready()
            for response in packer.messages(events):
                await context.write(response)
            written = loop.time()

    # -- sessions -------------------------------------------------------------------------
    @rpc(SERVICE)
    async def CreateSession(self, request: pb.CreateSessionRequest, context) -> pb.SessionResponse:
        prefix, client = to_input(request.prefix, "prefix"), self.client_of(context)
        check = self._session_limit("prefix", request.top_k)
        if request.state_token:
            step = await self.engine.create_session_from(
                request.state_token, prefix, request.top_k, client, check,
                request.model.name, request.model.version)
        else:
            model = self.engine.model(request.model.name, request.model.version)
            step = await self.engine.create_session(model, prefix, request.top_k, client,
                                                    check)
        return session_response(step)

    @rpc(SERVICE)
    async def Append(self, request: pb.AppendRequest, context) -> pb.SessionResponse:
        step = await self.engine.append(request.session_id, to_input(request.input, "input"),
                                        request.top_k, request.state_token,
                                        client=self.client_of(context),
                                        check=self._session_limit("input", request.top_k))
        return session_response(step)

    def _session_limit(self, field: str, top_k: int):
        # the next tokens count as tokens of the response, with their texts
        return response_limit(self.max_message_bytes - top_k * (TOKEN_OVERHEAD + 64), field)

    @rpc(SERVICE)
    async def ForkSession(self, request: pb.ForkSessionRequest, context) -> pb.SessionResponse:
        step = await self.engine.fork_session(request.session_id, request.top_k,
                                              self.client_of(context))
        return session_response(step)

    @rpc(SERVICE)
    async def CloseSession(self, request: pb.CloseSessionRequest,
                           context) -> pb.CloseSessionResponse:
        self.engine.close_session(request.session_id)
        return pb.CloseSessionResponse()

    @rpc(SERVICE, stream=True)
    async def Converse(self, requests, context) -> None:
        """A session for the stream's life: created by its first message (or resumed from
        that message's state token), ended with the stream if the stream brought it here
        (its last state token still resumes it); a session already held here stays open."""
        engine, client = self.engine, self.client_of(context)
        session_id: str | None = None
        opened: int = 0  # the generation of the session the stream opened, if it did
        last: pb.SessionResponse | None = None
        try:
            async for request in until_closing(requests, engine.closing):
                with message(self.metrics, SERVICE, "Converse"):
                    check = self._session_limit("input", request.top_k)
                    if session_id is None and request.state_token:  # resume, then read
                        step = await engine.append("", to_input(request.input, "input"),
                                                   request.top_k, request.state_token,
                                                   allow_empty=True, client=client,
                                                   check=check)
                    elif session_id is None:
                        model = engine.model(request.model.name, request.model.version)
                        step = await engine.create_session(
                            model, to_input(request.input, "input"), request.top_k, client,
                            check)
                    else:
                        step = await engine.append(session_id,
                                                   to_input(request.input, "input"),
                                                   request.top_k, check=check)
                    if session_id is None:
                        session_id, opened = step.session_id, step.opened and step.generation
                    last = session_response(step)
                    await context.write(last)
        except Unavailable:
            # Cut by the shutdown: the client's last message is the state to resume from.
            if last is not None and last.state_token:
                await context.write(pb.SessionResponse(
                    session_id=last.session_id, model=last.model, position=last.position,
                    state_token=last.state_token))
            raise
        finally:
            if opened:  # not a close: the last token still resumes it, here too
                engine.end_session(session_id, opened)


class _Window:
    """How many sequences and bytes a stream has in flight; a message larger than the
    whole window is let in alone."""

    def __init__(self, size: int, max_bytes: int):
        self.size, self.max_bytes = size, max_bytes
        self.used = self.bytes = 0
        self._released = asyncio.Event()

    async def acquire(self, count: int, cost: int) -> None:
        while self.used and (self.used + count > self.size
                             or self.bytes + cost > self.max_bytes):
            self._released.clear()
            await self._released.wait()
        self.used += count
        self.bytes += cost

    def release(self, count: int, cost: int) -> None:
        self.used -= count
        self.bytes -= cost
        self._released.set()
