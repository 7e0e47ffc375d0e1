"""Request inputs (text or token ids) to token ids, checked against the model and limits.

An Input carries the names its request gave it (`field`, and `part` for where the text or
ids sit inside it), so that every error about it names the request's own field whatever
the protocol: `inputs[1].token_ids.ids[3]` from recur.v1, `prompt[0][3]` from another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from serving.engine.errors import InvalidArgument, LimitExceeded
from serving.model.tokenizer import Vocabulary


@dataclass(frozen=True, slots=True)
class Input:
    """One text or one sequence of token ids (exactly one of the two)."""

    text: str | None = None
    ids: Sequence[int] | None = None
    field: str = "input"
    part: str = ""  # where the text or ids are inside `field`; default: `field` itself


@dataclass
class Encoded:
    ids: np.ndarray  # int64 [n]; a character-aware model's [n, 1 + L], ids then spellings
    words: list[str]  # the input's own tokens (before mapping to <unk>); BPE: the text each
    # piece adds ("" for one that only starts a character), which join to the text
    unknown: int  # words mapped to <unk>


MISSING = "give a text or token ids"


def encode(item: Input | None, vocab: Vocabulary, max_tokens: int, allow_empty: bool = False,
           optional: bool = False, field: str = "input") -> Encoded:
    """`allow_empty`: an empty text or id list reads as no tokens; `optional`: so does no
    input at all (None), which is otherwise an error naming `field`."""
    if item is None:
        if optional:
            return Encoded(np.zeros(0, np.int64), [], 0)
        raise InvalidArgument(field, MISSING)
    part = item.part or item.field
    if item.text is not None:
        _check_text_length(item, vocab, max_tokens)
        words = vocab.tokenize(item.text)
        try:
            ids = np.array(vocab.encode_tokens(words), np.int64)
        except KeyError as error:  # a vocabulary without <unk>, such as some char models
            raise InvalidArgument(part, str(error.args[0])) from None
        unknown = vocab.unknown_count(words, ids.tolist())
        kind = "text"
    else:
        if len(item.ids or ()) > max_tokens:  # before converting a single id
            raise LimitExceeded("max_tokens_per_sequence", len(item.ids), max_tokens,
                                item.field)
        raw = list(item.ids or ())  # Python's min/max: faster than numpy's at this size
        if raw and (min(raw) < 0 or max(raw) >= len(vocab)):
            bad = next(i for i, t in enumerate(raw) if not 0 <= t < len(vocab))
            raise InvalidArgument(f"{part}[{bad}]",
                                  f"token id {raw[bad]} is out of range [0, {len(vocab)})")
        ids = np.array(raw, np.int64)
        words = [vocab.tokens[i] for i in raw]
        unknown = 0
        kind = "token ids"
    if len(ids) == 0 and not allow_empty:
        raise InvalidArgument(item.field, f"empty {kind}: nothing to read")
    if len(ids) > max_tokens:
        raise LimitExceeded("max_tokens_per_sequence", len(ids), max_tokens, item.field)
    if vocab.bpe is not None:  # pieces are spelled in bytes: each shows the text it adds
        words = vocab.pieces_of(ids.tolist())
    if vocab.spelling is not None:  # a character-aware model reads [id, spelling] rows
        width = 1 + vocab.spelling.max_word_length
        ids = np.array(vocab.encode_spelled(words, ids.tolist()),
                       np.int64).reshape(len(ids), width)
    return Encoded(ids, words, unknown)


def _check_text_length(item: Input, vocab: Vocabulary, max_tokens: int) -> None:
    """Refuses a text over the token limit before tokenizing it whole: a 4 MB text costs
    half a second to tokenize, on the event loop. A character model reads at least a token
    a character (lowercasing never shortens a text); a word model a token a word, counted
    by a split that stops after max_tokens words; a BPE model a token per longest piece's
    bytes, so what it tokenizes is at most max_tokens times that long."""
    text = item.text
    if vocab.bpe is not None:  # a piece is at most max_piece_bytes long
        bound = max_tokens * vocab.bpe.max_piece_bytes
        # lowercasing can shorten a text's bytes (the Kelvin sign: 3 to 1), never below a
        # byte a character; without it the bytes are what is tokenized (UTF-8: <= 4 a char)
        over = len(text) > bound if vocab.normalization.lowercase else (
            len(text) * 4 > bound and len(text.encode()) > bound)
    elif vocab.normalization.level == "char":
        over = len(text) > max_tokens
    else:
        over = len(text) > max_tokens and len(text.split(maxsplit=max_tokens)) > max_tokens
    if over:
        raise LimitExceeded("max_tokens_per_sequence", max_tokens + 1, max_tokens,
                            item.field, "at least ", " tokens")


def encode_all(items: Sequence[Input | None], vocab: Vocabulary, field: str,
               max_sequences: int, max_tokens: int, allow_empty: bool = False
               ) -> list[Encoded]:
    """The inputs of one request (`field` names their list): at least one, at most
    `max_sequences`, each given (None is an error naming `field[i]`) and checked as
    `encode` does."""
    if len(items) == 0:
        raise InvalidArgument(field, "at least one sequence is required")
    if len(items) > max_sequences:
        raise LimitExceeded("max_sequences_per_request", len(items), max_sequences, field)
    return [encode(item, vocab, max_tokens, allow_empty, field=f"{field}[{i}]")
            for i, item in enumerate(items)]
