"""A completion choice's text and log-probs as OpenAI's answers carry them: tokens spelled
as they are in the text, their log-probs and alternatives, text offsets, and the echo of
a prompt; and the JSON sizes that bound an answer before it runs. completions.py runs the
requests and puts these together.
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

from serving.engine.decoding import EOS, LENGTH, STOP, FinishEvent, TokenEvent
from serving.engine.repository import LoadedModel
from serving.engine.results import Scored

FINISH_REASONS = {EOS: "stop", STOP: "stop", LENGTH: "length"}
# The longest token of each model version, in JSON bytes (computed once per version: a
# version reloaded under the same label may have another vocabulary).
_LONGEST: weakref.WeakKeyDictionary[LoadedModel, int] = weakref.WeakKeyDictionary()


def json_text_bytes(text: str) -> int:
    """The size of `text` as a JSON string in an answer: UTF-8, escaped, quoted."""
    return len(json.dumps(text, ensure_ascii=False).encode())


def longest_token_bytes(model: LoadedModel) -> int:
    """The JSON size of the model's longest token, what an answer's size is bounded by."""
    if (longest := _LONGEST.get(model)) is None:
        vocab = model.vocab
        longest = max(map(json_text_bytes, vocab.texts))
        if vocab.bpe is not None:  # a streamed piece also ends the character before it
            # (up to 3 more bytes); escaped, a character is at most 6 bytes of JSON
            longest = max(longest, 6 * (vocab.bpe.max_piece_bytes + 3) + 2)
        _LONGEST[model] = longest
    return longest


def spell(token_id: int, text: str, prefix: str, eos_id: int) -> str:
    """A token as it would appear in the text at its position: after what goes before it
    there (the lead or the joiner), so that the tokens add up to the text as OpenAI's
    do; `<eos>`, which never joins a text, as it is."""
    return text if token_id == eos_id else prefix + text


@dataclass
class Piece:
    """Text of a choice, with its tokens' log-probs when asked for."""

    text: str = ""
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float | None]] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add_token(self, token: str, token_id: int, logprob: float,
                  top: Sequence[tuple[int, str, float]], prefix: str, eos_id: int,
                  offset: int) -> None:
        """A token spelled `token` (as spell() does), and its alternatives spelled the
        same way at its position (the drawn one always as `token`, so that a harness that
        compares the likeliest key with the token sees them equal)."""
        self.tokens.append(token)
        self.token_logprobs.append(json_number(logprob))
        alternatives: dict[str, float | None] = {}
        for i, text, lp in top:  # most likely first: a key two tokens spell keeps the first
            alternatives.setdefault(token if i == token_id else spell(i, text, prefix, eos_id),
                                    json_number(lp))
        alternatives.setdefault(token, json_number(logprob))
        self.top_logprobs.append(alternatives)
        self.text_offset.append(offset)

    def extend(self, other: Piece) -> None:
        self.text += other.text
        self.tokens += other.tokens
        self.token_logprobs += other.token_logprobs
        self.top_logprobs += other.top_logprobs
        self.text_offset += other.text_offset

    def logprobs(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}


class Choice:
    """One choice's text and log-probs, released as they become final: a token is held
    while a stop string could still begin in its text, so that nothing sent is taken
    back when the engine cuts the text before a stop string."""

    def __init__(self, index: int, joiner: str, lead: str, hold: int, start: int,
                 eos_id: int):
        self.index, self.joiner, self.lead, self.hold = index, joiner, lead, hold
        self.eos_id = eos_id
        self.start = start  # where the completion begins in the choice's text (after echo)
        self.length = 0  # of the engine's text so far (its tokens joined)
        self.count = 0  # tokens so far
        self.held: list[tuple[TokenEvent, int, int]] = []  # (token, begin, end) in the text
        self.released = 0  # characters of the completion's own text sent (lead included)
        self.finish_reason: str | None = None
        self.echo: Piece | None = None  # the prompt, first, with echo

    def add(self, event: TokenEvent) -> Piece | None:
        begin = self.length + (len(self.joiner) if self.count else 0)
        self.count += 1
        self.length = begin + len(event.text)
        self.held.append((event, begin, self.length))
        safe = self.length - self.hold  # no stop string can begin before this
        return self._release(safe) if self.held[0][2] <= safe else None

    def finish(self, event: FinishEvent) -> Piece:
        """The tokens the final text still holds, and the rest of that text (a stop string
        may cut it inside a token); then the token that ended the sample (`<eos>` or a
        stop token), which adds nothing to the text but is listed with its log-prob, as
        vLLM lists it (a harness reading the last token's log-prob as the drawn one's
        would otherwise take the prompt's last)."""
        piece = self._release(len(event.text))
        whole = self.lead + event.text if event.text else ""
        piece.text += whole[self.released:]
        self.released = len(whole)
        self.finish_reason = FINISH_REASONS[event.reason]
        if (last := event.last) is not None:
            prefix = self.joiner if self.count else self.lead
            piece.add_token(spell(last.id, last.text, prefix, self.eos_id), last.id,
                            last.logprob, last.top, prefix, self.eos_id,
                            self.start + self.released)
        return piece

    def _release(self, upto: int) -> Piece:
        piece = Piece()
        while self.held and self.held[0][2] <= upto:
            event, begin, _ = self.held.pop(0)
            prefix = self.lead if begin == 0 else self.joiner
            text = prefix + event.text  # a drawn token is in the text, even an <eos> id
            piece.text += text
            piece.add_token(text, event.id, event.logprob, event.top, prefix, self.eos_id,
                            self.start + self.released)
            self.released += len(text)
        return piece


def echo_piece(words: Sequence[str], joiner: str, scored: Scored | None,
               eos_id: int) -> Piece:
    """The prompt as the model read it; with `scored`, its tokens' log-probs (each token
    spelled as it is in the text, after the joiner)."""
    piece = Piece(joiner.join(words))
    if scored is None:
        return piece
    offset = 0
    for i, word in enumerate(words):
        prefix = joiner if i else ""
        piece.add_token(prefix + word, scored.ids[i], scored.logprobs[i],
                        scored.top[i] if scored.top else (), prefix, eos_id, offset)
        offset += len(prefix) + len(word)
    return piece


def json_number(logprob: float) -> float | None:
    """JSON has no -inf: an impossible token's log-prob is null."""
    return logprob if math.isfinite(logprob) else None
