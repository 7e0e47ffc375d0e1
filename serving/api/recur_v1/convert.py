"""recur.v1 messages to engine values and the engine's results back to messages."""

from __future__ import annotations

from serving.engine.decoding import EOS, LENGTH, STOP, FinishEvent, TokenEvent
from serving.engine.inputs import Input
from serving.engine.repository import LoadedModel
from serving.engine.results import Classified, ModelId, Scored, SessionStep, Tagged
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


def to_inputs(messages, field: str) -> list[Input | None]:
    return [to_input(m, f"{field}[{i}]") for i, m in enumerate(messages)]


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
