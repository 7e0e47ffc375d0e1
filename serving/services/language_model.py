"""recur.v1.LanguageModel: Score, ScoreStream, Complete and the session calls."""

from __future__ import annotations

import asyncio
import math
import secrets
import time

import grpc
import numpy as np

from serving import operations
from serving.config import ServerConfig
from serving.errors import ServiceError, failed_precondition, invalid, limit_exceeded
from serving.inputs import Encoded, encode, encode_all
from serving.metrics import Metrics
from serving.proto_gen.recur.v1 import recur_pb2 as pb
from serving.proto_gen.recur.v1 import recur_pb2_grpc as pb_grpc
from serving.repository import LoadedModel, ModelRepository
from serving.sampler import make_rng
from serving.services import gather, model_ref, rpc, until_closing
from serving.services.completion import (
    WRITE_AHEAD,
    Outbox,
    Sample,
    Stops,
    decode,
    sampling_params,
)
from serving.sessions import Session, SessionStore
from serving.state_tokens import Snapshot, StateTokenKeys, TokenRejected

SERVICE = "LanguageModel"


class LanguageModelService(pb_grpc.LanguageModelServicer):
    def __init__(self, repository: ModelRepository, sessions: SessionStore,
                 config: ServerConfig, metrics: Metrics, closing: asyncio.Event,
                 token_keys: StateTokenKeys | None = None):
        self.repository, self.sessions, self.config = repository, sessions, config
        self.token_keys = token_keys
        self.metrics, self.closing = metrics, closing

    # -- scoring --------------------------------------------------------------------------
    @rpc(SERVICE)
    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        model = self.repository.get(request.model.name, request.model.version, "lm")
        add_eos = request.add_eos if request.HasField("add_eos") else True
        encoded = self.encode_inputs(model, request.inputs, "inputs", add_eos)
        model.batcher.reserve(len(encoded))
        scores = await gather(*(self.score_sequence(model, e, add_eos) for e in encoded))
        return pb.ScoreResponse(scores=scores, model=model_ref(model))

    @rpc(SERVICE)
    async def ScoreStream(self, requests, context) -> None:
        """Reads a message only while fewer than `stream_window` sequences are outstanding:
        beyond that, HTTP/2 flow control holds the client back, so memory stays bounded."""
        window = _Window(self.config.stream_window)
        ordered: asyncio.Queue = asyncio.Queue()

        async def read() -> None:
            async for request in until_closing(requests, self.closing):
                field = f"request {request.id!r}"
                model = self.repository.get(request.model.name, request.model.version, "lm",
                                            f"{field}: model")
                add_eos = request.add_eos if request.HasField("add_eos") else True
                encoded = self.encode_inputs(model, request.inputs, f"{field}: inputs", add_eos)
                count = len(encoded)
                await window.acquire(count)
                await model.batcher.wait_for_room(count)
                work = asyncio.ensure_future(gather(*(self.score_sequence(model, e, add_eos)
                                                      for e in encoded)))
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
                await context.write(pb.ScoreStreamResponse(id=request_id, scores=await work))
                window.release(count)
        finally:
            reader.cancel()
            while not ordered.empty():
                if (item := ordered.get_nowait()) is not None:
                    item[2].cancel()

    def encode_inputs(self, model: LoadedModel, messages, field: str,
                      add_eos: bool) -> list[Encoded]:
        # With add_eos an empty text is a sentence too: only its <eos> is scored.
        return encode_all(messages, model.runtime.vocab, field,
                          self.config.max_sequences_per_request,
                          self.config.max_tokens_per_sequence, allow_empty=add_eos)

    async def score_sequence(self, model: LoadedModel, encoded: Encoded,
                             add_eos: bool) -> pb.SequenceScore:
        vocab = model.runtime.vocab
        ids, words = encoded.ids, list(encoded.words)
        if add_eos:
            ids, words = np.append(ids, vocab.eos_id), words + [vocab.tokens[vocab.eos_id]]
        logprobs = (await operations.score(model, ids, self.config.chunk_tokens)).tolist()
        self.metrics.tokens.labels(model.label, "scored").inc(len(ids))
        total = math.fsum(logprobs)
        # Tokens as dicts of Python values: half the cost of Token messages built from
        # numpy scalars, a large part of the server's own work per scored token.
        return pb.SequenceScore(
            tokens=[{"id": i, "text": w, "logprob": lp}
                    for i, w, lp in zip(ids.tolist(), words, logprobs)],
            total_logprob=total, token_count=len(ids),
            perplexity=math.exp(-total / len(ids)), unknown_count=encoded.unknown)

    # -- completion -----------------------------------------------------------------------
    @rpc(SERVICE)
    async def Complete(self, request: pb.CompleteRequest, context) -> None:
        started = time.perf_counter()
        model = self.repository.get(request.model.name, request.model.version, "lm")
        vocab, config = model.runtime.vocab, self.config
        params = sampling_params(request)
        max_tokens = request.max_tokens or config.default_completion_tokens
        if request.max_tokens < 0:
            raise invalid("max_tokens", f"must be >= 0, got {request.max_tokens}")
        if max_tokens > config.max_completion_tokens:
            raise limit_exceeded("max_completion_tokens", max_tokens,
                                 config.max_completion_tokens, "max_tokens")
        samples = request.n or 1
        if request.n < 0:
            raise invalid("n", f"must be >= 0, got {request.n}")
        if samples > config.max_samples:
            raise limit_exceeded("max_samples", samples, config.max_samples, "n")
        for i, token in enumerate(request.stop_token_ids):
            if not 0 <= token < len(vocab):
                raise invalid(f"stop_token_ids[{i}]", f"token id {token} is out of range "
                                                      f"[0, {len(vocab)})")
        if any(not s for s in request.stop):
            raise invalid("stop", "stop strings must not be empty")
        seed = request.seed if request.HasField("seed") else secrets.randbits(63)
        prompt = encode(request.prompt, vocab, "prompt", config.max_tokens_per_sequence,
                        allow_empty=True, optional=True)
        start = await operations.read_prompt(model, prompt.ids, config.chunk_tokens)
        self.metrics.tokens.labels(model.label, "prompt").inc(len(prompt.ids))
        stops = Stops(set(request.stop_token_ids), list(request.stop))
        active = [Sample(i, make_rng(seed, i), start.state, start.next_logprobs, params)
                  for i in range(samples)]
        outbox = Outbox(context, WRITE_AHEAD * samples)
        try:
            await decode(model, params, max_tokens, stops, active, outbox, self.metrics,
                         self.closing, started)
            await outbox.close()
        finally:
            outbox.cancel()

    # -- sessions -------------------------------------------------------------------------
    @rpc(SERVICE)
    async def CreateSession(self, request: pb.CreateSessionRequest, context) -> pb.SessionResponse:
        model = self.repository.get(request.model.name, request.model.version)
        return await self.open_session(model, request.prefix, request.top_k, "prefix")

    @rpc(SERVICE)
    async def Append(self, request: pb.AppendRequest, context) -> pb.SessionResponse:
        session = await self.find_session(request.session_id, request.state_token)
        return await self.append_to(session, request.input, request.top_k, "input")

    @rpc(SERVICE)
    async def CloseSession(self, request: pb.CloseSessionRequest,
                           context) -> pb.CloseSessionResponse:
        self.sessions.close(request.session_id)
        return pb.CloseSessionResponse()

    @rpc(SERVICE)
    async def Converse(self, requests, context) -> None:
        session: Session | None = None
        last: pb.SessionResponse | None = None
        try:
            async for request in until_closing(requests, self.closing):
                if session is None and request.state_token:  # resume, then read the input
                    session = await self.find_session("", request.state_token)
                    response = await self.append_to(session, request.input, request.top_k,
                                                  "input", allow_empty=True)
                elif session is None:
                    model = self.repository.get(request.model.name, request.model.version)
                    response = await self.open_session(model, request.input, request.top_k, "input")
                    session = self.sessions.get(response.session_id)
                else:
                    response = await self.append_to(session, request.input, request.top_k,
                                                  "input")
                await context.write(response)
                last = response
        except ServiceError as error:
            # Cut by the shutdown: the client's last message is the state to resume from.
            if error.code == grpc.StatusCode.UNAVAILABLE and last is not None and last.state_token:
                await context.write(pb.SessionResponse(
                    session_id=last.session_id, model=last.model, position=last.position,
                    state_token=last.state_token))
            raise
        finally:
            if session is not None and session.id in self.sessions:
                self.sessions.close(session.id)

    async def open_session(self, model: LoadedModel, prefix: pb.Input, top_k: int,
                           field: str) -> pb.SessionResponse:
        if (why_not := model.sessions_allowed) is not None:
            raise invalid("model", why_not)
        _check_top_k(top_k, model)
        encoded = encode(prefix, model.runtime.vocab, field,
                         self.config.max_tokens_per_sequence, allow_empty=True, optional=True)
        if model.task == "lm":
            state, next_logprobs = await model.start_point()
            resume_state, last_token = model.initial_state(), model.runtime.vocab.eos_id
        else:
            state, next_logprobs = model.initial_state(), None
            resume_state, last_token = state, -1
        if self.token_keys is None:  # no state tokens: nothing to keep for them
            resume_state, last_token = None, -1
        session = self.sessions.create(model, state, next_logprobs, resume_state, last_token)
        try:
            return await self.append_to(session, None, top_k, field, encoded)
        except BaseException:
            if session.id in self.sessions:
                self.sessions.close(session.id)
            raise

    async def find_session(self, session_id: str, token: bytes) -> Session:
        """The session to append to: held here, or resumed from its state token."""
        if not token:
            return self.sessions.get(session_id)
        snapshot = self._open(token)
        if session_id and session_id != snapshot.session_id:
            raise invalid("state_token", f"is for session {snapshot.session_id!r}, not "
                          f"{session_id!r}")
        held = self.sessions.peek(snapshot.session_id)
        if held is not None and held.position == snapshot.position and (
                held.model.name, held.model.version) == (snapshot.model, snapshot.version):
            return self.sessions.get(snapshot.session_id)
        return await self._resume(snapshot)

    def _open(self, token: bytes) -> Snapshot:
        if self.token_keys is None:
            raise failed_precondition("state_token", "this server has no state token keys "
                                      "(--state-token-keys), so it cannot resume sessions",
                                      "STATE_TOKENS_DISABLED")
        try:
            return self.token_keys.open(token)
        except TokenRejected as rejected:
            if rejected.precondition:
                raise failed_precondition("state_token", str(rejected),
                                          "STATE_TOKEN_UNUSABLE") from None
            raise invalid("state_token", str(rejected)) from None

    async def _resume(self, snapshot: Snapshot) -> Session:
        try:
            model = self.repository.get(snapshot.model, snapshot.version)
        except ServiceError:
            raise failed_precondition(
                "state_token", f"is for model {snapshot.model}/{snapshot.version}, which this "
                f"server does not serve", "STATE_TOKEN_UNUSABLE") from None
        if (why_not := model.sessions_allowed) is not None:
            raise failed_precondition("state_token", why_not, "STATE_TOKEN_UNUSABLE")
        expected = model.runtime.artifact.state_shape
        if snapshot.state.shape != tuple(expected) or (
                model.task == "lm") != (snapshot.last_token >= 0):
            raise failed_precondition("state_token", f"holds a state of shape "
                                      f"{snapshot.state.shape}; {model.label} has {expected}",
                                      "STATE_TOKEN_UNUSABLE")
        if model.task == "lm":
            if snapshot.last_token >= len(model.runtime.vocab):
                raise failed_precondition("state_token", "holds a token outside the "
                                          "vocabulary", "STATE_TOKEN_UNUSABLE")
            step = await operations.resume(model, snapshot.state, snapshot.last_token)
            state, next_logprobs = step.state, step.next_logprobs
        else:
            state, next_logprobs = snapshot.state, None
        return self.sessions.create(model, state, next_logprobs, snapshot.state,
                                    snapshot.last_token, snapshot.session_id, snapshot.position)

    async def append_to(self, session: Session, message: pb.Input | None, top_k: int,
                        field: str, encoded: Encoded | None = None,
                        allow_empty: bool = False) -> pb.SessionResponse:
        model = session.model
        _check_top_k(top_k, model)
        if encoded is None:
            encoded = encode(message, model.runtime.vocab, field,
                             self.config.max_tokens_per_sequence, allow_empty=allow_empty,
                             optional=allow_empty)
        async with session.lock:
            session = self.sessions.get(session.id)  # it may have gone while waiting
            position = session.position + len(encoded.ids)
            response = pb.SessionResponse(session_id=session.id, model=model_ref(model),
                                          position=position, unknown_count=encoded.unknown)
            next_logprobs = session.next_logprobs
            resume_state, last_token = session.resume_state, session.last_token
            if len(encoded.ids):
                keep = self.token_keys is not None and model.task == "lm"
                step = await operations.advance(model, session.state, session.next_logprobs,
                                                encoded.ids, self.config.chunk_tokens, keep)
                if self.token_keys is None:
                    pass  # no state tokens: nothing to keep for them
                elif model.task == "lm":
                    resume_state, last_token = step.previous, int(encoded.ids[-1])
                else:
                    resume_state = step.state
                # (if the session was evicted meanwhile, this Append still answers)
                self.sessions.update(session, step.state, step.next_logprobs,
                                     len(encoded.ids), resume_state, last_token)
                kind = {"lm": "scored", "tag": "tagged", "classify": "classified"}[model.task]
                self.metrics.tokens.labels(model.label, kind).inc(len(encoded.ids))
                _describe(response, model, encoded, step)
                next_logprobs = step.next_logprobs
            if model.task == "lm":
                vocab = model.runtime.vocab
                response.next_tokens.extend(
                    pb.Token(id=i, text=vocab.tokens[i], logprob=lp)
                    for i, lp in operations.top_k(next_logprobs, top_k))
            if self.token_keys is not None and resume_state is not None:
                response.state_token = self.token_keys.seal(Snapshot(
                    model.name, model.version, position, resume_state, last_token, session.id))
            return response


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


def _check_top_k(top_k: int, model: LoadedModel) -> None:
    if top_k < 0:
        raise invalid("top_k", f"must be >= 0, got {top_k}")
    if top_k > len(model.runtime.vocab):
        raise invalid("top_k", f"{top_k} exceeds the vocabulary size {len(model.runtime.vocab)}")


def _describe(response: pb.SessionResponse, model: LoadedModel, encoded: Encoded,
              step: operations.Advance) -> None:
    if model.task == "lm":
        response.tokens.extend(pb.Token(id=i, text=w, logprob=lp) for i, w, lp in zip(
            encoded.ids.tolist(), encoded.words, step.outputs.tolist()))
    elif model.task == "tag":
        labels = model.runtime.labels.names
        best = step.outputs.argmax(axis=1)
        response.tags.extend(pb.TaggedToken(token=w, tag=labels[b], logprob=float(row[b]))
                             for w, b, row in zip(encoded.words, best, step.outputs))
    else:
        response.classes.extend(class_probabilities(step.outputs, model.runtime.labels.names))


def class_probabilities(logprobs: np.ndarray, labels: list[str]) -> list[pb.ClassProbability]:
    order = np.argsort(-logprobs, kind="stable")
    return [pb.ClassProbability(label=labels[i], probability=float(np.exp(logprobs[i])))
            for i in order]
