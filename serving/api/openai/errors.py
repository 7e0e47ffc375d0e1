"""OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from serving.api.http.errors import ErrorFormat, HttpError

# codes OpenAI gives where the error carries none of its own
DEFAULT_CODES = {401: "invalid_api_key", 413: "request_too_large"}


def openai_error(error: HttpError) -> dict:
    """Client errors are "invalid_request_error"; overload (429) and server-side failures
    are "server_error", as OpenAI's own "the engine is currently overloaded" is."""
    kind = "server_error" if error.status >= 500 or error.status == 429 else \
        "invalid_request_error"
    return {"error": {"message": error.message, "type": kind, "param": error.param,
                      "code": error.code or DEFAULT_CODES.get(error.status)}}


OPENAI_ERRORS = ErrorFormat(shape=openai_error)
