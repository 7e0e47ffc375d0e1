"""One request of each RPC, generated: a valid request, then (most of the time) one or two
hostile mutations of it, each named in the case's label so that counts and examples say
what was sent. This module has recur.v1's generators and the table of every RPC's
(`Generators`); cases_v2.py has the Open Inference Protocol's and health's, case.py what
they share.

`Generators(checks).table[rpc](rng, ctx)` returns a Case; the driver may still turn it
into garbage bytes, an empty request or a 1 ms deadline (`case.finish`). Sessions and V2
sequences that the fuzzer drives and replays are in scenarios.py; these cases only touch
sessions of their own (`Context.sessions`), so they never disturb a replayed one.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.fuzzing import values as val
from bench.fuzzing.case import (
    Case,
    Context,
    Mutator,
    inputs_mutators,
    model_mutators,
    model_ref,
    mutated,
    odd_input,
    pb_input,
    utf8,
)
from bench.fuzzing.cases_v2 import (
    empty_request,
    health_check,
    health_list,
    health_watch,
    model_config,
    model_infer,
    model_metadata,
    model_ready,
    model_statistics,
    model_stream_infer,
    repository_model,
)
from bench.fuzzing.models import VOCAB
from bench.fuzzing.values import chance
from serving.proto_gen.inference import grpc_service_pb2 as v2
from serving.proto_gen.recur.v1 import recur_pb2 as pb


def score(rng: random.Random, ctx: Context) -> Case:
    message = pb.ScoreRequest(model=model_ref(rng, ctx, "lm"),
                              inputs=[pb_input(rng) for _ in range(rng.choice([1, 1, 2, 4, 8]))])
    if chance(rng, 0.5):
        message.add_eos = chance(rng, 0.5)

    def empty_no_eos(rng, m):
        m.add_eos = False
        m.inputs.add(text=rng.choice(["", " "]))

    request, label = mutated(rng, message, model_mutators("lm", ctx) + inputs_mutators(ctx)
                             + [("empty text without add_eos", empty_no_eos)])
    return Case("LanguageModel.Score", label, request)


def score_stream(rng: random.Random, ctx: Context) -> Case:
    messages, labels = [], []
    for i in range(rng.choice([0, 1, 2, 3, 5, 8]) if chance(rng, 0.2) else rng.randint(1, 3)):
        message = pb.ScoreStreamRequest(id=f"m{i}", model=model_ref(rng, ctx, "lm"),
                                        inputs=[pb_input(rng) for _ in range(rng.randint(1, 3))])

        def long_id(rng, m):
            m.id = val.long_string(rng)

        request, label = mutated(rng, message, model_mutators("lm", ctx) + inputs_mutators(ctx)
                                 + [("4 KB+ message id", long_id)], p=0.25)
        messages.append(request)
        if label != "valid":
            labels.append(f"message {i}: {label}")
    label = "; ".join(labels) or ("valid" if messages else "no messages")
    return Case("LanguageModel.ScoreStream", label, messages)


def loglikelihood(rng: random.Random, ctx: Context) -> Case:
    """Multiple-choice style: often several continuations of one context (read once, through
    the prefix cache), sometimes none."""
    contexts = [pb_input(rng) for _ in range(rng.choice([1, 1, 2]))]
    message = pb.LogLikelihoodRequest(model=model_ref(rng, ctx, "lm"))
    for _ in range(rng.choice([1, 2, 4, 8])):
        pair = message.pairs.add(continuation=pb_input(rng))
        if chance(rng, 0.85):
            pair.context.CopyFrom(rng.choice(contexts))
    limits = ctx.limits

    def odd(rng, m):
        pair = m.pairs[rng.randrange(len(m.pairs))] if m.pairs else m.pairs.add()
        getattr(pair, rng.choice(["context", "continuation"])).CopyFrom(odd_input(rng))

    def no_continuation(rng, m):
        (m.pairs[0] if m.pairs else m.pairs.add()).ClearField("continuation")

    def many(rng, m):
        m.pairs.extend(pb.LogLikelihoodPair(continuation=pb_input(rng)) for _ in range(
            rng.choice([limits.max_sequences + 1, limits.max_sequences * 4, 2000])))

    def too_long(rng, m):  # context and continuation over the limit only together
        half = limits.max_tokens // 2 + 1
        m.pairs.add(context=pb.Input(token_ids=pb.TokenIds(ids=val.ids(rng, half, half))),
                    continuation=pb.Input(token_ids=pb.TokenIds(ids=val.ids(rng, half, half))))

    def no_pairs(rng, m):
        m.ClearField("pairs")

    def bad_text(m, s):
        (m.pairs[0] if m.pairs else m.pairs.add()).continuation.text = s

    request, label = mutated(rng, message, model_mutators("lm", ctx) + [
        ("odd context or continuation", odd), ("odd context or continuation", odd),
        ("no continuation", no_continuation), ("too many pairs", many),
        ("context and continuation over max_tokens", too_long), ("no pairs", no_pairs),
        ("invalid UTF-8 continuation", utf8(bad_text))])
    return Case("LanguageModel.LogLikelihood", label, request)


def loglikelihood_rolling(rng: random.Random, ctx: Context) -> Case:
    message = pb.LogLikelihoodRollingRequest(
        model=model_ref(rng, ctx, "lm"),
        inputs=[pb_input(rng) for _ in range(rng.choice([1, 1, 2, 4]))])
    request, label = mutated(rng, message, model_mutators("lm", ctx) + inputs_mutators(ctx))
    return Case("LanguageModel.LogLikelihoodRolling", label, request)


def _stops(rng: random.Random, count: int, length: int) -> list[str]:
    return [("".join(rng.choice("xyz ") for _ in range(8)) * (length // 8 + 1))[:length]
            for _ in range(count)]


def complete(rng: random.Random, ctx: Context, checks) -> Case:
    limits = ctx.limits
    message = pb.CompleteRequest(model=model_ref(rng, ctx, "lm"),
                                 max_tokens=rng.choice([0, 1, 2, 3, 4, 8, 16]),
                                 n=rng.choice([0, 1, 1, 1, 2, 4]))
    if chance(rng, 0.8):
        message.prompt.CopyFrom(pb_input(rng) if chance(rng, 0.8) else pb.Input(text=""))
    if chance(rng, 0.7):
        message.temperature = rng.choice([0.0, 0.5, 0.8, 1.0, 1.5])
    if chance(rng, 0.2):
        message.top_k = rng.randint(1, 10)
    if chance(rng, 0.2):
        message.top_p = rng.choice([0.5, 0.9, 1.0])
    if chance(rng, 0.8):
        message.seed = rng.randrange(2**32)
    if chance(rng, 0.15):
        message.stop.extend(rng.choice(["w3", "w1 w2", "w4 ", " w5"])
                            for _ in range(rng.randint(1, 3)))
    if chance(rng, 0.1):
        message.stop_token_ids.extend(rng.randrange(VOCAB) for _ in range(rng.randint(1, 3)))
    if chance(rng, 0.3):  # a packed stream: several tokens a message
        message.pack_tokens = True
        if chance(rng, 0.3):
            message.stream_interval_ms = rng.choice([0, 1, 5, 20])

    def tiny(rng, m):
        m.temperature = rng.choice(val.TINY_TEMPERATURES)

    def huge(rng, m):
        m.temperature = rng.choice([1e30, 3.4e38, float("inf")])

    def nan(rng, m):
        m.temperature = float("nan")

    def negative(rng, m):
        m.temperature = rng.choice([-1.0, -1e-45, -0.0])

    def top_k(rng, m):
        m.top_k = val.int_in(rng, val.INT32, [VOCAB, VOCAB + 1, -1, 2**31 - 1])

    def top_p(rng, m):
        m.top_p = rng.choice([0.0, -0.5, 1.5, float("nan"), 1e-30, float("inf"), 1e-45])

    def max_tokens(rng, m):
        m.max_tokens = val.int_in(rng, val.INT32, [limits.max_completion_tokens,
                                                   limits.max_completion_tokens + 1, -1])

    def n(rng, m):
        m.n = val.int_in(rng, val.INT32, [limits.max_samples, limits.max_samples + 1, -1])

    def seed(rng, m):
        m.seed = rng.choice([0, 2**64 - 1, 2**63])

    def many_stops(rng, m):
        count = rng.choice([17, 100, 1000, 4000])
        length = rng.choice([1, 64, 257, 1000, 4097])
        while count * length > 3_000_000:  # stay under the message limit, mostly
            count //= 2
        m.stop.extend(_stops(rng, count, length))

    def stall(rng, m):  # long greedy completions (greedy never draws <eos> here), 16
        # samples, and stop strings that never match: a server that searches every stop
        # string in the whole text at every step blocks its loop for longer and longer
        m.max_tokens, m.n, m.temperature = limits.max_completion_tokens, 16, 0.0
        m.stop.extend(_stops(rng, rng.choice([16, 20_000]), 16))

    def empty_stop(rng, m):
        m.stop.append("")

    def stop_ids(rng, m):
        m.stop_token_ids.extend(val.odd_ids(rng)[:8] or [-1])

    def prompt(rng, m):
        m.prompt.CopyFrom(odd_input(rng))

    def stream_interval(rng, m):  # the server's longest is 1000 ms
        m.stream_interval_ms = val.int_in(rng, val.INT32, [1000, 1001, -1, 2**31 - 1])

    mutators = model_mutators("lm", ctx) + [
        ("tiny temperature", tiny), ("tiny temperature", tiny), ("huge temperature", huge),
        ("NaN temperature", nan), ("negative temperature", negative), ("odd top_k", top_k),
        ("odd top_p", top_p), ("odd max_tokens", max_tokens), ("odd n", n),
        ("odd seed", seed), ("many long stop strings", many_stops),
        ("many stop strings, long greedy completions", stall), ("empty stop string", empty_stop),
        ("odd stop token ids", stop_ids), ("odd prompt", prompt),
        ("odd stream interval", stream_interval),
        ("invalid UTF-8 stop string", utf8(lambda m, s: m.stop.append(s))),
        ("invalid UTF-8 prompt", utf8(lambda m, s: setattr(m.prompt, "text", s)))]
    request, label = mutated(rng, message, mutators, p=0.5)
    case = Case("LanguageModel.Complete", label, request)
    if not isinstance(request, bytes):
        case.after = lambda outcome: checks.completion(request, label, outcome)
    return case


def create_session(rng: random.Random, ctx: Context) -> Case:
    message = pb.CreateSessionRequest(model=model_ref(rng, ctx, None, sessions=True),
                                      top_k=rng.choice([0, 0, 1, 3, VOCAB]))
    if chance(rng, 0.8):
        message.prefix.CopyFrom(pb_input(rng))

    def bidirectional(rng, m):
        m.model.name = rng.choice(ctx.names(sessions=False))

    def prefix(rng, m):
        m.prefix.CopyFrom(odd_input(rng))

    def top_k(rng, m):
        m.top_k = val.int_in(rng, val.INT32, [VOCAB + 1, -1, 2**31 - 1])

    mutators = model_mutators(None, ctx) + [
        ("a model without sessions", bidirectional), ("odd prefix", prefix),
        ("odd top_k", top_k),
        ("invalid UTF-8 prefix", utf8(lambda m, s: setattr(m.prefix, "text", s)))]
    request, label = mutated(rng, message, mutators, p=0.5)
    return Case("LanguageModel.CreateSession", label, request, after=ctx.keep)


def _session_id_mutators(ctx: Context) -> list[Mutator]:
    def unknown(rng, m):
        m.session_id = rng.choice(["nope", "A" * 22, rng.randbytes(16).hex(), " ",
                                   *list(ctx.closed)[:3]])

    def long_id(rng, m):
        m.session_id = val.long_string(rng)

    def empty(rng, m):
        m.session_id = ""

    return [("unknown or closed session id", unknown), ("4 KB+ session id", long_id),
            ("empty session id", empty),
            ("invalid UTF-8 session id", utf8(lambda m, s: setattr(m, "session_id", s)))]


def append(rng: random.Random, ctx: Context) -> Case:
    message = pb.AppendRequest(session_id=rng.choice(ctx.sessions) if ctx.sessions else "none",
                               input=pb_input(rng), top_k=rng.choice([0, 0, 2]))
    if ctx.tokens and chance(rng, 0.2):
        message.state_token = rng.choice(ctx.tokens)

    def forged(rng, m):
        what, m.state_token = val.forged_token(rng, rng.choice(ctx.tokens) if ctx.tokens
                                               else b"")

    def other(rng, m):  # a genuine token, of a session other than the one named
        if ctx.tokens:
            m.state_token = rng.choice(ctx.tokens)
        m.session_id = rng.choice(ctx.sessions) if ctx.sessions else "x"

    def resume(rng, m):  # a genuine token and no session id: resume where it was
        m.session_id = ""
        if ctx.tokens:
            m.state_token = rng.choice(ctx.tokens)

    def odd(rng, m):
        m.input.CopyFrom(odd_input(rng))

    def no_input(rng, m):
        m.ClearField("input")

    def top_k(rng, m):
        m.top_k = val.int_in(rng, val.INT32, [VOCAB + 1, -1, 2**31 - 1])

    mutators = _session_id_mutators(ctx) + [
        ("forged state token", forged), ("forged state token", forged),
        ("state token of another session", other), ("resume from a token", resume),
        ("odd input", odd), ("no input", no_input), ("odd top_k", top_k),
        ("invalid UTF-8 text", utf8(lambda m, s: setattr(m.input, "text", s)))]
    request, label = mutated(rng, message, mutators, p=0.6)
    return Case("LanguageModel.Append", label, request, after=ctx.keep)


def close_session(rng: random.Random, ctx: Context) -> Case:
    message = pb.CloseSessionRequest(session_id=ctx.sessions.popleft() if ctx.sessions
                                     else "none")
    if message.session_id != "none":
        ctx.closed.append(message.session_id)
    request, label = mutated(rng, message, _session_id_mutators(ctx), p=0.4)
    return Case("LanguageModel.CloseSession", label, request)


def fork_session(rng: random.Random, ctx: Context) -> Case:
    """A fork of a held session (left to expire: the fuzzer does not track forks)."""
    message = pb.ForkSessionRequest(session_id=ctx.sessions[0] if ctx.sessions else "none",
                                    top_k=rng.choice([0, 0, 3]))
    request, label = mutated(rng, message, _session_id_mutators(ctx), p=0.4)
    return Case("LanguageModel.ForkSession", label, request)


def converse(rng: random.Random, ctx: Context) -> Case:
    first = pb.ConverseRequest(model=model_ref(rng, ctx, None, sessions=True),
                               input=pb_input(rng), top_k=rng.choice([0, 2]))
    messages = [first] + [pb.ConverseRequest(input=pb_input(rng))
                          for _ in range(rng.randint(0, 4))]
    roll, label = rng.random(), "valid"
    if roll < 0.1:
        messages, label = [], "no messages"
    elif roll < 0.2:
        first.ClearField("model")
        label = "no model in the first message"
    elif roll < 0.3:
        first.model.name = rng.choice(ctx.names(sessions=False) + ["nope", val.long_string(rng)])
        label = "a model without sessions, or unknown"
    elif roll < 0.45:
        what, first.state_token = val.forged_token(rng, rng.choice(ctx.tokens) if ctx.tokens
                                                   else b"")
        label = f"forged state token ({what}) in the first message"
    elif roll < 0.55 and ctx.tokens:
        first.state_token = rng.choice(ctx.tokens)
        label = "resume from a token in the first message"
    elif roll < 0.65 and len(messages) > 1:
        messages[-1].state_token = rng.choice(ctx.tokens) if ctx.tokens else b"x"
        label = "state token in a later message"
    elif roll < 0.8:
        messages.insert(rng.randint(1, len(messages)),
                        pb.ConverseRequest(input=odd_input(rng)))
        label = "odd input mid-stream"
    elif roll < 0.9:
        messages.insert(rng.randint(1, len(messages)), val.garbage(rng))
        label = "garbage message mid-stream"
    elif roll < 0.95:
        messages[0] = val.with_invalid_utf8(rng, first,
                                            lambda m, s: setattr(m.input, "text", s))
        label = "invalid UTF-8 text in the first message"
    return Case("LanguageModel.Converse", label, messages)


def _encoder(rng: random.Random, ctx: Context, task: str, message) -> tuple[object, str]:
    message.model.CopyFrom(model_ref(rng, ctx, task))
    message.inputs.extend(pb_input(rng) for _ in range(rng.choice([1, 1, 2, 4, 8])))
    return mutated(rng, message, model_mutators(task, ctx) + inputs_mutators(ctx))


def tag(rng: random.Random, ctx: Context) -> Case:
    request, label = _encoder(rng, ctx, "tag", pb.TagRequest())
    return Case("Tagger.Tag", label, request)


def classify(rng: random.Random, ctx: Context) -> Case:
    request, label = _encoder(rng, ctx, "classify", pb.ClassifyRequest())
    return Case("Classifier.Classify", label, request)


def list_models(rng: random.Random, ctx: Context) -> Case:
    if chance(rng, 0.2):  # unknown fields, which a message keeps and a server ignores
        return Case("Models.ListModels", "unknown fields", b"\x08\x01\x12\x03abc")
    return Case("Models.ListModels", "valid", pb.ListModelsRequest())


@dataclass
class Generators:
    """The generator of each RPC's standalone cases (Complete's needs the checks)."""

    checks: object
    table: dict[str, Callable] = field(init=False)

    def __post_init__(self) -> None:
        self.table = {
            "LanguageModel.Score": score,
            "LanguageModel.ScoreStream": score_stream,
            "LanguageModel.LogLikelihood": loglikelihood,
            "LanguageModel.LogLikelihoodRolling": loglikelihood_rolling,
            "LanguageModel.Complete": lambda rng, ctx: complete(rng, ctx, self.checks),
            "LanguageModel.CreateSession": create_session,
            "LanguageModel.Append": append,
            "LanguageModel.CloseSession": close_session,
            "LanguageModel.ForkSession": fork_session,
            "LanguageModel.Converse": converse,
            "Tagger.Tag": tag,
            "Classifier.Classify": classify,
            "Models.ListModels": list_models,
            "GRPCInferenceService.ModelInfer": model_infer,
            "GRPCInferenceService.ModelStreamInfer": model_stream_infer,
            "GRPCInferenceService.ModelMetadata": model_metadata,
            "GRPCInferenceService.ModelConfig": model_config,
            "GRPCInferenceService.ModelReady": model_ready,
            "GRPCInferenceService.ServerLive": empty_request("GRPCInferenceService.ServerLive",
                                                      v2.ServerLiveRequest),
            "GRPCInferenceService.ServerReady": empty_request("GRPCInferenceService.ServerReady",
                                                       v2.ServerReadyRequest),
            "GRPCInferenceService.ServerMetadata": empty_request(
                "GRPCInferenceService.ServerMetadata", v2.ServerMetadataRequest),
            "GRPCInferenceService.ModelStatistics": model_statistics,
            "GRPCInferenceService.RepositoryIndex": empty_request(
                "GRPCInferenceService.RepositoryIndex", v2.RepositoryIndexRequest),
            "GRPCInferenceService.RepositoryModelLoad": repository_model(
                v2.RepositoryModelLoadRequest, "GRPCInferenceService.RepositoryModelLoad"),
            "GRPCInferenceService.RepositoryModelUnload": repository_model(
                v2.RepositoryModelUnloadRequest, "GRPCInferenceService.RepositoryModelUnload"),
            "Health.Check": health_check,
            "Health.Watch": health_watch,
            "Health.List": health_list,
        }
