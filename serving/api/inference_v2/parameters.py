"""What an inference request's parameters and version fields mean, read and checked for
both bindings (core.py): each refusal is an INVALID_ARGUMENT (or LimitExceeded) naming
the field, raised before anything runs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from serving.engine.errors import InvalidArgument, LimitExceeded, shown
from serving.engine.repository import LoadedModel
from serving.model.artifact import MAX_VERSION

UINT64_END = 1 << 64


def version_number(text: str, version_field: str) -> int:
    if text and not (text.isascii() and text.isdigit() and len(text) <= 19
                     and int(text) <= MAX_VERSION):
        raise InvalidArgument(version_field, f"must be a version number (ASCII digits) "
                              f"or empty, got {shown(text)}")
    return int(text or 0)


def read_top_k(parameters: Mapping[str, Any], model: LoadedModel) -> int:
    """K of NEXT_TOKEN_IDS and NEXT_TOKEN_LOGPROBS: 1 (the argmax) unless given."""
    if "top_k" not in parameters:
        return 1
    value, vocabulary = parameters["top_k"], len(model.vocab)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument("parameters.top_k", "must be an int64")
    if not 1 <= value <= vocabulary:
        raise InvalidArgument("parameters.top_k", f"must be from 1 to {model.label}'s "
                              f"vocabulary size {vocabulary}, got {value}")
    return value


def sequence_id(parameters: Mapping[str, Any], max_bytes: int) -> str:
    """The sequence id as text ("" when absent or 0, which means no sequence)."""
    if "sequence_id" not in parameters:
        return ""
    value = parameters["sequence_id"]
    if isinstance(value, str):
        if len(value.encode()) > max_bytes:
            raise LimitExceeded("max_sequence_id_bytes", len(value.encode()),
                                max_bytes, "parameters.sequence_id", "", " bytes")
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value < UINT64_END:
        if value < 0:
            raise InvalidArgument("parameters.sequence_id", f"must not be negative, got "
                                  f"{value}")
        return str(value) if value else ""
    raise InvalidArgument("parameters.sequence_id", "must be a uint64 or a string")


def flag(parameters: Mapping[str, Any], key: str, default: bool) -> bool:
    if key not in parameters:
        return default
    value = parameters[key]
    if not isinstance(value, bool):
        raise InvalidArgument(f"parameters.{key}", "must be a bool")
    return value
