"""recur.v1 messages to engine values and the engine's results back to messages."""

from __future__ import annotations

from collections.abc import Sequence

from serving.engine.decoding import EOS, LENGTH, STOP, FinishEvent, TokenEvent
from serving.engine.errors import InvalidArgument, LimitExceeded
from serving.engine.inputs import Encoded, Input
from serving.engine.repository import LoadedModel
from serving.engine.results import Classified, Likelihood, ModelId, Scored, SessionStep, Tagged
from serving.proto_gen.recur.v1 import recur_pb2 as pb

FINISH_REASONS = {EOS: pb.FINISH_REASON_EOS, LENGTH: pb.FINISH_REASON_LENGTH,
                  STOP: pb.FINISH_REASON_STOP}


def to_input(message: pb.Input, field: str) -> Input | None:
    """A request's Input as the engine's, named as the request names it; None if unset
    (the engine says whether that is allowed)."""
    kind = message.WhichOneof("content")
    if kind == "text":
        return Input(text=message.text, field=field, part=f"{field}.text")
    if kind == "token_ids":
        return Input(ids=message.token_ids.ids, field=field, part=f"{field}.token_ids.ids")
    return None


class _Inputs(Sequence):
    """A request's Inputs, converted as they are read: the engine checks their number
    first, so a request of a million inputs is refused before a million are built."""

    def __init__(self, messages, field: str):
        self._messages, self._field = messages, field

    def __len__(self) -> int:
        return len(self._messages)

    def __getitem__(self, index: int) -> Input | None:
        return to_input(self._messages[index], f"{self._field}[{index}]")


def to_inputs(messages, field: str) -> Sequence[Input | None]:
    return _Inputs(messages, field)


class _Pairs(Sequence):
    """A LogLikelihoodRequest's pairs as (context, continuation) Inputs, converted as they
    are read (as _Inputs), each named `pairs[i].context` / `pairs[i].continuation`."""

    def __init__(self, messages, field: str):
        self._messages, self._field = messages, field

    def __len__(self) -> int:
        return len(self._messages)

    def __getitem__(self, index: int) -> tuple[Input | None, Input | None]:
        pair, where = self._messages[index], f"{self._field}[{index}]"
        return (to_input(pair.context, f"{where}.context"),
                to_input(pair.continuation, f"{where}.continuation"))


def to_pairs(messages, field: str) -> Sequence[tuple[Input | None, Input | None]]:
    return _Pairs(messages, field)


def model_ref(model: LoadedModel | ModelId) -> pb.ModelRef:
    return pb.ModelRef(name=model.name, version=model.version)


def sequence_score(scored: Scored) -> pb.SequenceScore:
    # Tokens as dicts of Python values: half the cost of Token messages built from numpy
    # scalars, a large part of the server's own work per scored token.
    return pb.SequenceScore(
        tokens=[{"id": i, "text": w, "logprob": lp}
                for i, w, lp in zip(scored.ids, scored.words, scored.logprobs)],
        total_logprob=scored.total_logprob, token_count=scored.token_count,
        perplexity=scored.perplexity, unknown_count=scored.unknown)


def log_likelihood(likelihood: Likelihood) -> pb.LogLikelihood:
    return pb.LogLikelihood(
        logprob=likelihood.logprob, token_count=likelihood.token_count,
        is_greedy=likelihood.is_greedy, token_logprobs=likelihood.token_logprobs,
        context_token_count=likelihood.context_tokens, unknown_count=likelihood.unknown)


def rolling_log_likelihood(scored: Scored) -> pb.RollingLogLikelihood:
    return pb.RollingLogLikelihood(logprob=scored.total_logprob,
                                   token_count=scored.token_count, unknown_count=scored.unknown)


def tagged_tokens(tagged: Tagged) -> list[pb.TaggedToken]:
    return [pb.TaggedToken(token=w, tag=t, logprob=lp)
            for w, t, lp in zip(tagged.words, tagged.tags, tagged.logprobs)]


def class_probabilities(classified: Classified) -> list[pb.ClassProbability]:
    return [pb.ClassProbability(label=label, probability=p)
            for label, p in classified.ranked()]


def session_response(step: SessionStep) -> pb.SessionResponse:
    response = pb.SessionResponse(session_id=step.session_id, model=model_ref(step.model),
                                  position=step.position, unknown_count=step.unknown,
                                  state_token=step.state_token)
    if step.scored is not None:
        response.tokens.extend(
            pb.Token(id=i, text=w, logprob=lp)
            for i, w, lp in zip(step.scored.ids, step.scored.words, step.scored.logprobs))
    if step.tagged is not None:
        response.tags.extend(tagged_tokens(step.tagged))
    if step.classified is not None:
        response.classes.extend(class_probabilities(step.classified))
    response.next_tokens.extend(pb.Token(id=i, text=text, logprob=lp)
                                for i, text, lp in step.next_tokens)
    return response


def completion_message(event: TokenEvent | FinishEvent, model: LoadedModel
                       ) -> pb.CompleteResponse:
    if isinstance(event, TokenEvent):
        return pb.CompleteResponse(index=event.index, token=pb.Token(
            id=event.id, text=event.text, logprob=event.logprob))
    return pb.CompleteResponse(index=event.index, finish_reason=FINISH_REASONS[event.reason],
                               text=event.text, model=model_ref(model))


# Packed completion streams (CompleteRequest.pack_tokens): the most events one write takes
# (so a message holds at most this many tokens), and the longest stream interval.
MAX_PACKED_TOKENS, MAX_STREAM_INTERVAL_MS = 256, 1000


def stream_interval(request: pb.CompleteRequest) -> float | None:
    """The request's packing: None for one message per token, else the seconds to gather a
    sample's tokens for (0: only those ready when the writer is free)."""
    interval = request.stream_interval_ms
    if not 0 <= interval <= MAX_STREAM_INTERVAL_MS:
        raise InvalidArgument("stream_interval_ms", f"must be in [0, {MAX_STREAM_INTERVAL_MS}]"
                              f" milliseconds (0: no wait), got {interval}")
    if interval == 0 and not request.pack_tokens:
        return None
    return interval / 1000


class StreamPacker:
    """A packed stream's messages: the events taken in one write become, per sample in the
    order they came, one message with its tokens (and its end if it came with them),
    except that a sample's first token goes alone, at once."""

    def __init__(self, model: LoadedModel):
        self.model = model
        self.started: set[int] = set()  # the samples whose first token is out

    def holds_first_token(self, events: Sequence[TokenEvent | FinishEvent]) -> bool:
        return any(isinstance(e, TokenEvent) and e.index not in self.started for e in events)

    def messages(self, events: Sequence[TokenEvent | FinishEvent]
                 ) -> list[pb.CompleteResponse]:
        tokens: dict[int, list[TokenEvent]] = {}
        finishes: dict[int, FinishEvent] = {}
        for event in events:
            if isinstance(event, TokenEvent):
                tokens.setdefault(event.index, []).append(event)
            else:
                tokens.setdefault(event.index, [])
                finishes[event.index] = event
        messages = []
        for index, sample_tokens in tokens.items():
            if sample_tokens and index not in self.started:
                messages.append(self._message(index, sample_tokens[:1], None))
                sample_tokens = sample_tokens[1:]
            self.started.add(index)
            while len(sample_tokens) > MAX_PACKED_TOKENS:  # at most that many a message
                messages.append(self._message(index, sample_tokens[:MAX_PACKED_TOKENS], None))
                sample_tokens = sample_tokens[MAX_PACKED_TOKENS:]
            if sample_tokens or index in finishes:
                messages.append(self._message(index, sample_tokens, finishes.get(index)))
        return messages

    def _message(self, index: int, tokens: Sequence[TokenEvent], finish: FinishEvent | None
                 ) -> pb.CompleteResponse:
        message = pb.CompleteResponse(index=index, tokens=[  # dicts: cheaper (sequence_score)
            {"id": t.id, "text": t.text, "logprob": t.logprob} for t in tokens])
        if finish is not None:
            message.finish_reason, message.text = FINISH_REASONS[finish.reason], finish.text
            message.model.CopyFrom(model_ref(self.model))
        return message


# Upper bounds of a response's size in bytes, so that a request whose answer could not be
# sent (over max_message_bytes) is refused before it runs instead of after. A Token costs
# at most its text plus 20 bytes (tags, lengths, a 10-byte id, a 4-byte float); a sequence
# or a session response adds at most 64 more.
TOKEN_OVERHEAD, SEQUENCE_OVERHEAD = 20, 64


def response_bytes(encoded: Sequence[Encoded], extra_tokens: int = 0,
                   token_text_bytes: int = 0) -> int:
    """The most bytes a response listing each input's tokens (plus `extra_tokens` each,
    such as a scored `<eos>`, and `token_text_bytes` more text a token, such as a tag)
    can take. Text is counted in UTF-8 bytes, as protobuf sends it."""
    total = 0
    for e in encoded:
        tokens = len(e.ids) + extra_tokens
        total += (SEQUENCE_OVERHEAD + tokens * (TOKEN_OVERHEAD + token_text_bytes)
                  + len("".join(e.words).encode()) + extra_tokens * 8)
    return total


def response_limit(max_bytes: int, field: str, extra_tokens: int = 0,
                   token_text_bytes: int = 0):
    """A Check (serving/engine/engine.py) refusing requests whose response could exceed
    `max_bytes`."""

    def check(encoded: Sequence[Encoded]) -> None:
        size = response_bytes(encoded, extra_tokens, token_text_bytes)
        if size > max_bytes:
            raise LimitExceeded("max_message_bytes", size, max_bytes, field,
                                "a response of up to ", " bytes")

    return check


# a LogLikelihood result's bytes beside its token log-probs (4 bytes each, packed),
# bounded from above: its numbers, their tags and lengths, the framing
LIKELIHOOD_BYTES = 48


def likelihood_limit(max_bytes: int, field: str):
    """A Check (of the tokenized continuations) refusing LogLikelihood requests whose
    response could exceed `max_bytes`, before anything runs."""

    def check(continuations: Sequence[Encoded]) -> None:
        size = sum(LIKELIHOOD_BYTES + 4 * len(c.ids) for c in continuations) + 64
        if size > max_bytes:
            raise LimitExceeded("max_message_bytes", size, max_bytes, field,
                                "a response of up to ", " bytes")

    return check
