"""The OpenAI-compatible routes under /v1, and Recur's sessions in the same style.

- GET /v1/models, GET /v1/models/{model}: the language models (the highest version of
  each is the one served here); taggers and classifiers have no completions, so they are
  not listed (the session routes take them, as recur.v1's do).
- POST /v1/completions: completions.py.
- POST /v1/chat/completions: 404, saying why (these models have no chat format).
- POST /v1/sessions, POST /v1/sessions/{id}/append, POST /v1/sessions/{id}/fork,
  DELETE /v1/sessions/{id}: recur.v1's CreateSession, Append, ForkSession and
  CloseSession, with the same engine calls, per-client quotas
  (the client named as on the gRPC port) and limits; state tokens travel as base64.
"""

from __future__ import annotations

import base64
import datetime
from collections.abc import Sequence

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from serving.api.http.app import client_of
from serving.api.http.errors import HttpError, ShapedRouter
from serving.api.openai.choices import json_number, json_text_bytes, longest_token_bytes
from serving.api.openai.completions import Completions
from serving.api.openai.errors import OPENAI_ERRORS
from serving.api.openai.schema import (
    SessionAppendRequest,
    SessionCreateRequest,
    SessionForkRequest,
    input_of,
    parse,
    state_token_of,
)
from serving.engine.engine import Engine
from serving.engine.errors import LimitExceeded, NotFound, shown
from serving.engine.inputs import Encoded
from serving.engine.repository import LoadedModel
from serving.engine.results import SessionStep

# A session answer's size, bounded before it runs as recur.v1 bounds it: JSON bytes per
# token beyond its text (id, log-prob, a tag), per next token beyond its text (the
# longest token of the served vocabularies), and for the rest.
TOKEN_JSON_BYTES, NEXT_TOKEN_BYTES, SESSION_JSON_BYTES = 96, 96, 512
NO_CHAT = ("these models have no chat format (no roles, no chat template): use "
           "/v1/completions with a prompt")


def openai_router(engine: Engine, max_message_bytes: int) -> ShapedRouter:
    router = ShapedRouter(prefix="/v1", errors=OPENAI_ERRORS)
    completions = Completions(engine, max_message_bytes)

    @router.get("/models")
    async def list_models() -> dict:
        latest: dict[str, LoadedModel] = {}
        for model in engine.models():
            if model.task == "lm" and model.version > getattr(latest.get(model.name),
                                                              "version", -1):
                latest[model.name] = model
        return {"object": "list", "data": [_model_json(latest[n]) for n in sorted(latest)]}

    @router.get("/models/{model}")
    async def retrieve_model(model: str) -> dict:
        found = engine.model(model, 0, name_field="model", version_field="model")
        if found.task != "lm":
            raise NotFound(f"model: {shown(model)} is not a language model",
                           "MODEL_NOT_FOUND")
        return _model_json(found)

    @router.post("/completions")
    async def create_completion(request: Request) -> Response:
        return await completions.create(await request.body())

    @router.post("/chat/completions")
    async def chat_completions() -> None:
        raise HttpError(404, NO_CHAT, code="chat_not_supported")

    @router.post("/sessions")
    async def create_session(request: Request) -> JSONResponse:
        body = parse(SessionCreateRequest, await request.body())
        prefix, top_k = input_of(body.prefix, "prefix"), body.top_k or 0
        check = _session_limit(engine, max_message_bytes, "prefix", top_k)
        token = state_token_of(body.state_token)
        if token:
            step = await engine.create_session_from(token, prefix, top_k, client_of(request),
                                                    check, body.model or "")
        else:
            model = engine.model(body.model or "", 0, name_field="model",
                                 version_field="model")
            step = await engine.create_session(model, prefix, top_k, client_of(request),
                                               check)
        return JSONResponse(_session_json(step))

    @router.post("/sessions/{session_id}/append")
    async def append(session_id: str, request: Request) -> JSONResponse:
        body = parse(SessionAppendRequest, await request.body())
        top_k = body.top_k or 0
        step = await engine.append(session_id, input_of(body.input, "input"), top_k,
                                   state_token_of(body.state_token),
                                   client=client_of(request),
                                   check=_session_limit(engine, max_message_bytes, "input",
                                                        top_k))
        return JSONResponse(_session_json(step))

    @router.post("/sessions/{session_id}/fork")
    async def fork(session_id: str, request: Request) -> JSONResponse:
        body = parse(SessionForkRequest, await request.body())
        step = await engine.fork_session(session_id, body.top_k or 0, client_of(request))
        return JSONResponse(_session_json(step))

    @router.delete("/sessions/{session_id}")
    async def close_session(session_id: str) -> dict:
        engine.close_session(session_id)
        return {"id": session_id, "object": "session", "deleted": True}

    return router


def _model_json(model: LoadedModel) -> dict:
    return {"id": model.name, "object": "model", "created": _created(model),
            "owned_by": "recur"}


def _created(model: LoadedModel) -> int:
    """When the version was exported (its metadata's exported_at), in seconds since the
    epoch; 0 if the artifact does not say."""
    try:
        stamp = datetime.datetime.fromisoformat(str(model.metadata["exported_at"]))
    except (KeyError, ValueError):
        return 0
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=datetime.UTC)
    return int(stamp.timestamp())


def _session_limit(engine: Engine, max_bytes: int, field: str, top_k: int):
    """A Check refusing a session step whose answer could exceed `max_bytes` (its texts
    counted as JSON bytes; a next token as the longest of any served vocabulary's, as
    the session's model is not known before the step looks it up)."""

    def check(encoded: Sequence[Encoded]) -> None:
        longest = max(map(longest_token_bytes, engine.models()), default=0) if top_k else 0
        size = SESSION_JSON_BYTES + top_k * (NEXT_TOKEN_BYTES + longest) + sum(
            len(e.ids) * TOKEN_JSON_BYTES + sum(map(json_text_bytes, e.words))
            for e in encoded)
        if size > max_bytes:
            raise LimitExceeded("max_message_bytes", size, max_bytes, field,
                                "an answer of up to ", " bytes")

    return check


def _session_json(step: SessionStep) -> dict:
    answer = {"id": step.session_id, "object": "session", "model": step.model.name,
              "version": step.model.version, "position": step.position,
              "unknown_count": step.unknown, "tokens": [], "next_tokens": [
                  {"id": i, "text": text, "logprob": json_number(lp)}
                  for i, text, lp in step.next_tokens]}
    if step.scored is not None:
        answer["tokens"] = [{"id": i, "text": w, "logprob": json_number(lp)} for i, w, lp in
                            zip(step.scored.ids, step.scored.words, step.scored.logprobs)]
    if step.tagged is not None:
        answer["tags"] = [{"token": w, "tag": t, "logprob": json_number(lp)} for w, t, lp in
                          zip(step.tagged.words, step.tagged.tags, step.tagged.logprobs)]
    if step.classified is not None:
        answer["classes"] = [{"label": label, "probability": p}
                             for label, p in step.classified.ranked()]
    if step.state_token:
        answer["state_token"] = base64.b64encode(step.state_token).decode()
    return answer
