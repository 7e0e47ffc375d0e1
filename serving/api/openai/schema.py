"""The OpenAI-compatible requests: their fields, types and defaults as the OpenAI API
reference gives them (legacy Completions), plus Recur's extensions, read strictly.

A body is read whatever its Content-Type (curl's -d sends a form type), as JSON; a field
of the wrong type, an unknown field or a bad value is a 400 naming it. `null` means the
default, as in OpenAI's API. The union-typed fields (prompt, stop, a session's input) are
read by hand, so that their errors say what is allowed.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from serving.api.http.errors import HttpError, validation_error
from serving.engine.inputs import Input

MAX_SEED = 1 << 64  # recur.v1's seed is a uint64; negative seeds are taken modulo 2^64


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool | None = False
    include_obfuscation: bool | None = None  # accepted, ignored: nothing to obfuscate


class CompletionRequest(Strict):
    model: str
    prompt: Any = None  # a string, strings, token ids or lists of them; none: a new text
    max_tokens: int | None = 16
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    n: int | None = 1
    stop: Any = None  # a string or a list of strings
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    user: str | None = None  # accepted, ignored
    # Recur's extensions
    top_k: int | None = 0
    stop_token_ids: list[int] | None = None


class SessionCreateRequest(Strict):
    model: str | None = None  # may be left out with a state_token (it is the token's)
    prefix: Any = None  # a string or token ids
    top_k: int | None = 0
    state_token: str | None = None  # base64


class SessionAppendRequest(Strict):
    input: Any = None  # a string or token ids
    top_k: int | None = 0
    state_token: str | None = None  # base64


class SessionForkRequest(Strict):
    top_k: int | None = 0


Request = TypeVar("Request", bound=Strict)


def parse(kind: type[Request], body: bytes) -> Request:
    try:
        return kind.model_validate_json(body or b"{}")
    except ValidationError as error:
        raise validation_error(error.errors(include_url=False)) from None


def check_completion(request: CompletionRequest) -> None:
    """What the engine does not check itself. OpenAI's parameters these models cannot
    honour are refused when set to anything but their neutral value, rather than silently
    ignored."""
    if request.presence_penalty not in (None, 0):
        raise _unsupported("presence_penalty", "repetition penalties are not supported")
    if request.frequency_penalty not in (None, 0):
        raise _unsupported("frequency_penalty", "repetition penalties are not supported")
    if request.logit_bias:
        raise _unsupported("logit_bias", "logit biases are not supported")
    if request.suffix:
        raise _unsupported("suffix", "these models continue a text; they cannot insert "
                           "one before a suffix")
    n = 1 if request.n is None else request.n
    if request.best_of is not None and request.best_of != n:
        raise _unsupported("best_of", f"only best_of = n ({n}) is supported: every sample "
                           "is returned, none is picked")
    if request.stream_options is not None and not request.stream:
        raise HttpError(400, "stream_options: only allowed when stream is true",
                        "stream_options")
    if request.seed is not None and not -(MAX_SEED >> 1) <= request.seed < MAX_SEED:
        raise HttpError(400, f"seed: must be in [-2^63, 2^64), got {request.seed}", "seed")
    if n < 1:
        raise HttpError(400, f"n: must be >= 1, got {n}", "n")


def _unsupported(param: str, why: str) -> HttpError:
    return HttpError(400, f"{param}: not supported: {why}", param, "unsupported_parameter")


def prompts_of(prompt: Any) -> list[Input]:
    """The prompts of a completion, each an Input named as the request names it."""
    if prompt is None:
        return [Input(text="", field="prompt")]
    if isinstance(prompt, str):
        return [Input(text=prompt, field="prompt")]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [Input(text=p, field=f"prompt[{i}]") for i, p in enumerate(prompt)]
        if all(type(t) is int for t in prompt):
            return [Input(ids=prompt, field="prompt")]
        if all(isinstance(p, list) and all(type(t) is int for t in p) for p in prompt):
            return [Input(ids=p, field=f"prompt[{i}]") for i, p in enumerate(prompt)]
    raise HttpError(400, "prompt: must be a string, a non-empty list of strings, a list of "
                    "token ids or a list of token-id lists", "prompt")


def stops_of(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise HttpError(400, "stop: must be a string or a list of strings", "stop")


def input_of(value: Any, field: str) -> Input | None:
    """A session's prefix or input: a string or token ids (None if not given)."""
    if value is None:
        return None
    if isinstance(value, str):
        return Input(text=value, field=field)
    if isinstance(value, list) and all(type(t) is int for t in value):
        return Input(ids=value, field=field)
    raise HttpError(400, f"{field}: must be a string or a list of token ids", field)


def state_token_of(value: str | None) -> bytes:
    """A state token as sent (standard or URL-safe base64); b"" if none."""
    if not value:
        return b""
    try:
        return base64.b64decode(value.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, "state_token: not base64 (send the state_token of a session "
                        "response as it came)", "state_token") from None
