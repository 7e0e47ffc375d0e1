"""Request inputs (text or token ids) to token ids, checked against the model and limits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serving.errors import invalid, limit_exceeded
from serving.proto_gen.recur.v1 import recur_pb2 as pb
from serving.tokenizer import Vocabulary


@dataclass
class Encoded:
    ids: np.ndarray  # int64 [n]
    words: list[str]  # the input's own tokens (before mapping to <unk>)
    unknown: int  # words mapped to <unk>


def encode(message: pb.Input, vocab: Vocabulary, field: str, max_tokens: int,
           allow_empty: bool = False, optional: bool = False) -> Encoded:
    """`allow_empty`: an empty text or id list is fine; `optional`: so is an unset input."""
    kind = message.WhichOneof("content")
    if kind is None:
        if optional:
            return Encoded(np.zeros(0, np.int64), [], 0)
        raise invalid(field, "set text or token_ids")
    if kind == "text":
        words = vocab.normalization.tokenize(message.text)
        try:
            ids = np.array(vocab.encode_tokens(words), np.int64)
        except KeyError as error:  # a vocabulary without <unk>, such as some char models
            raise invalid(f"{field}.text", str(error.args[0])) from None
        unknown = vocab.unknown_count(words, ids.tolist())
    else:
        raw = list(message.token_ids.ids)  # Python's min/max: faster than numpy's at this size
        if raw and (min(raw) < 0 or max(raw) >= len(vocab)):
            bad = next(i for i, t in enumerate(raw) if not 0 <= t < len(vocab))
            raise invalid(f"{field}.token_ids.ids[{bad}]",
                          f"token id {raw[bad]} is out of range [0, {len(vocab)})")
        ids = np.array(raw, np.int64)
        words = [vocab.tokens[i] for i in raw]
        unknown = 0
    if len(ids) == 0 and not allow_empty:
        raise invalid(field, f"empty {kind.replace('_', ' ')}: nothing to read")
    if len(ids) > max_tokens:
        raise limit_exceeded("max_tokens_per_sequence", len(ids), max_tokens, field)
    return Encoded(ids, words, unknown)


def encode_all(messages, vocab: Vocabulary, field: str, max_sequences: int, max_tokens: int,
               allow_empty: bool = False) -> list[Encoded]:
    """The inputs of one request (`field` names their list): at least one, at most
    `max_sequences`, each checked as `encode` does."""
    if len(messages) == 0:
        raise invalid(field, "at least one sequence is required")
    if len(messages) > max_sequences:
        raise limit_exceeded("max_sequences_per_request", len(messages), max_sequences, field)
    return [encode(m, vocab, f"{field}[{i}]", max_tokens, allow_empty)
            for i, m in enumerate(messages)]
