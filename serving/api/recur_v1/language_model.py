"""recur.v1.LanguageModel: Score, ScoreStream, Complete and the session calls."""

from __future__ import annotations

import asyncio

from serving.api.recur_v1.convert import (
    completion_message,
    model_ref,
    sequence_score,
    session_response,
    to_input,
    to_inputs,
)
from serving.api.rpc.handlers import rpc, until_closing
from serving.engine.engine import Engine
from serving.engine.errors import Unavailable
from serving.proto_gen.recur.v1 import recur_pb2 as pb
from serving.proto_gen.recur.v1 import recur_pb2_grpc as pb_grpc

SERVICE = "LanguageModel"


class LanguageModelService(pb_grpc.LanguageModelServicer):
    def __init__(self, engine: Engine, stream_window: int):
        self.engine, self.metrics, self.stream_window = engine, engine.metrics, stream_window

    # -- scoring --------------------------------------------------------------------------
    @rpc(SERVICE)
    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        model = self.engine.model(request.model.name, request.model.version, "lm")
        add_eos = request.add_eos if request.HasField("add_eos") else True
        scores = await self.engine.score(model, to_inputs(request.inputs, "inputs"), add_eos)
        return pb.ScoreResponse(scores=[sequence_score(s) for s in scores],
                                model=model_ref(model))

    @rpc(SERVICE)
    async def ScoreStream(self, requests, context) -> None:
        """Reads a message only while fewer than `stream_window` sequences are outstanding:
        beyond that, HTTP/2 flow control holds the client back, so memory stays bounded."""
        engine = self.engine
        window = _Window(self.stream_window)
        ordered: asyncio.Queue = asyncio.Queue()

        async def read() -> None:
            async for request in until_closing(requests, engine.closing):
                field = f"request {request.id!r}"
                model = engine.model(request.model.name, request.model.version, "lm",
                                     f"{field}: model.name", f"{field}: model.version")
                add_eos = request.add_eos if request.HasField("add_eos") else True
                encoded = engine.prepare_scores(
                    model, to_inputs(request.inputs, f"{field}: inputs"), add_eos,
                    f"{field}: inputs")
                count = len(encoded)
                # the version is held from its lookup, through the waits, to the end of
                # the work, so that a rollout meanwhile does not unload it under us
                model.acquire()
                try:
                    await window.acquire(count)
                    await engine.wait_for_room(model, count)
                    work = asyncio.ensure_future(engine.score_prepared(model, encoded,
                                                                       add_eos))
                except BaseException:
                    model.release()
                    raise
                work.add_done_callback(model.release)
                ordered.put_nowait((request.id, count, work))
            ordered.put_nowait(None)

        reader = asyncio.ensure_future(read())
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
                request_id, count, work = item
                scores = [sequence_score(s) for s in await work]
                await context.write(pb.ScoreStreamResponse(id=request_id, scores=scores))
                window.release(count)
        finally:
            reader.cancel()
            while not ordered.empty():
                if (item := ordered.get_nowait()) is not None:
                    item[2].cancel()

    # -- completion -----------------------------------------------------------------------
    @rpc(SERVICE)
    async def Complete(self, request: pb.CompleteRequest, context) -> None:
        model = self.engine.model(request.model.name, request.model.version, "lm")
        stream = await self.engine.complete(
            model, to_input(request.prompt, "prompt"),
            max_tokens=request.max_tokens,
            temperature=request.temperature if request.HasField("temperature") else 1.0,
            top_k=request.top_k, top_p=request.top_p if request.HasField("top_p") else 1.0,
            n=request.n, seed=request.seed if request.HasField("seed") else None,
            stop=list(request.stop), stop_token_ids=list(request.stop_token_ids))
        async with stream:
            async for event in stream:
                await context.write(completion_message(event, model))

    # -- sessions -------------------------------------------------------------------------
    @rpc(SERVICE)
    async def CreateSession(self, request: pb.CreateSessionRequest, context) -> pb.SessionResponse:
        model = self.engine.model(request.model.name, request.model.version)
        step = await self.engine.create_session(
            model, to_input(request.prefix, "prefix"), request.top_k)
        return session_response(step)

    @rpc(SERVICE)
    async def Append(self, request: pb.AppendRequest, context) -> pb.SessionResponse:
        step = await self.engine.append(request.session_id, to_input(request.input, "input"),
                                        request.top_k, request.state_token)
        return session_response(step)

    @rpc(SERVICE)
    async def CloseSession(self, request: pb.CloseSessionRequest,
                           context) -> pb.CloseSessionResponse:
        self.engine.close_session(request.session_id)
        return pb.CloseSessionResponse()

    @rpc(SERVICE)
    async def Converse(self, requests, context) -> None:
        engine = self.engine
        session_id: str | None = None
        last: pb.SessionResponse | None = None
        try:
            async for request in until_closing(requests, engine.closing):
                if session_id is None and request.state_token:  # resume, then read the input
                    step = await engine.append("", to_input(request.input, "input"),
                                               request.top_k, request.state_token,
                                               allow_empty=True)
                elif session_id is None:
                    model = engine.model(request.model.name, request.model.version)
                    step = await engine.create_session(
                        model, to_input(request.input, "input"), request.top_k)
                else:
                    step = await engine.append(session_id, to_input(request.input, "input"),
                                               request.top_k)
                session_id = step.session_id
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
            if session_id is not None and engine.has_session(session_id):
                engine.close_session(session_id)


class _Window:
    """How many sequences a stream has in flight; a message larger than the whole window
    is let in alone."""

    def __init__(self, size: int):
        self.size, self.used = size, 0
        self._released = asyncio.Event()

    async def acquire(self, count: int) -> None:
        while self.used and self.used + count > self.size:
            self._released.clear()
            await self._released.wait()
        self.used += count

    def release(self, count: int) -> None:
        self.used -= count
        self._released.set()
