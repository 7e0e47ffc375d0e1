"""One request of each RPC, generated: a valid request, then (most of the time) one or two
hostile mutations of it, each named in the case's label so that counts and examples say
what was sent.

`GENERATORS[rpc](rng, ctx)` returns a Case; the driver may still turn it into garbage
bytes, an empty request or a 1 ms deadline (`finish`). Sessions and V2 sequences that the
fuzzer drives and replays are in scenarios.py; these cases only touch sessions of their
own (`Context.sessions`), so they never disturb a replayed one.
"""

from __future__ import annotations

import random
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from bench.fuzzing import values as val
from bench.fuzzing.client import Outcome
from bench.fuzzing.models import VOCAB, Served
from bench.fuzzing.values import chance
from serving.proto_gen.inference import grpc_service_pb2 as v2
from serving.proto_gen.recur.v1 import recur_pb2 as pb

HEALTH_SERVICES = ["", "liveness", "recur.v1.LanguageModel", "recur.v1.Tagger",
                   "recur.v1.Classifier", "recur.v1.Models", "inference.GRPCInferenceService"]
OUTPUTS = {"lm": ["TOKEN_LOGPROBS", "TOKEN_COUNT", "TOTAL_LOGPROB"],
           "tag": ["TAGS", "TAG_LOGPROBS", "TOKEN_COUNT"], "classify": ["LABEL", "CLASS_PROBS"]}


@dataclass(frozen=True)
class Limits:
    """The server's request limits, as the fuzzer starts it (bench/fuzz.py)."""

    max_completion_tokens: int
    max_samples: int
    max_sequences: int
    max_tokens: int


@dataclass
class Case:
    rpc: str
    label: str
    request: object  # a message or bytes; a list of them for a bidirectional stream
    timeout: float | None = None  # None: the run's normal deadline
    first_only: bool = False  # a server stream cancelled after its first message
    # what to do with the outcome: keep a session for later cases, check an answer
    after: Callable[[Outcome], Awaitable[None] | None] | None = None


class Context:
    """What the generators know: the models served, the limits, and the sessions the
    standalone cases made (to append to, close, resume and forge the tokens of)."""

    def __init__(self, served: tuple[Served, ...], limits: Limits):
        self.served, self.limits = served, limits
        self.sessions: deque[str] = deque(maxlen=512)
        self.tokens: deque[bytes] = deque(maxlen=512)
        self.closed: deque[str] = deque(maxlen=128)

    def names(self, task: str | None = None, sessions: bool | None = None) -> list[str]:
        return [s.name for s in self.served if (task is None or s.task == task)
                and (sessions is None or s.sessions == sessions)]

    def others(self, task: str) -> list[str]:
        return [s.name for s in self.served if s.task != task]

    def model(self, name: str) -> Served | None:
        return next((s for s in self.served if s.name == name), None)

    def keep(self, outcome: Outcome) -> None:
        """A standalone session's answer: its id and token join the pools."""
        if outcome.ok and outcome.responses:
            response = pb.SessionResponse.FromString(outcome.responses[-1])
            if response.session_id:
                self.sessions.append(response.session_id)
            if response.state_token:
                self.tokens.append(response.state_token)


Mutator = tuple[str, Callable]  # (label, fn(rng, message) -> None, or bytes if byte-level)


def mutated(rng: random.Random, message, mutators: list[Mutator], p: float = 0.65):
    """(the request, its label): `message` as it is, or with one or two mutations applied
    (byte-level ones, which return bytes, last)."""
    if not chance(rng, p):
        return message, "valid"
    chosen = rng.sample(mutators, k=min(len(mutators), rng.choice([1, 1, 1, 2])))
    chosen.sort(key=lambda m: m[0].startswith("invalid UTF-8"))
    labels, request = [], message
    for label, fn in chosen:
        if label.startswith("invalid UTF-8") and not isinstance(request, bytes):
            request = fn(rng, request)
        elif not isinstance(request, bytes):
            fn(rng, request)
        else:
            continue
        labels.append(label)
    return request, " + ".join(labels)


def utf8(setter: Callable) -> Callable:
    """A byte-level mutator: the string field `setter` sets holds invalid UTF-8."""
    return lambda rng, message: val.with_invalid_utf8(rng, message, setter)


# -- recur.v1 --------------------------------------------------------------------------
def model_ref(rng: random.Random, ctx: Context, task: str | None,
              sessions: bool | None = None) -> pb.ModelRef:
    name = rng.choice(ctx.names(task, sessions))
    ref = pb.ModelRef(name=name)
    if chance(rng, 0.3):
        ref.version = rng.choice([0, *ctx.model(name).versions])
    return ref


def pb_input(rng: random.Random) -> pb.Input:
    if chance(rng, 0.55):
        return pb.Input(text=val.text(rng))
    return pb.Input(token_ids=pb.TokenIds(ids=val.ids(rng)))


def odd_input(rng: random.Random) -> pb.Input:
    roll = rng.random()
    if roll < 0.45:
        return pb.Input(text=val.odd_text(rng))
    if roll < 0.9:
        return pb.Input(token_ids=pb.TokenIds(ids=val.odd_ids(rng)))
    return pb.Input()  # neither text nor ids


def model_mutators(task: str | None, ctx: Context) -> list[Mutator]:
    others = ctx.others(task) if task else []

    def name(rng, m):
        m.model.name = val.model_name(rng, [], others or ["nope"])

    def version(rng, m):
        m.model.version = val.int_in(rng, val.INT64, [3, 99, -1, 2**31, 2**63 - 1])

    def long_name(rng, m):
        m.model.name = val.long_string(rng)

    def no_model(rng, m):
        m.ClearField("model")

    return [("odd model name", name), ("odd model version", version),
            ("4 KB+ model name", long_name), ("no model", no_model),
            ("invalid UTF-8 model name", utf8(lambda m, s: setattr(m.model, "name", s)))]


def inputs_mutators(ctx: Context, field: str = "inputs") -> list[Mutator]:
    limit = ctx.limits.max_sequences

    def odd(rng, m):
        items = getattr(m, field)
        if not items:
            items.add()
        items[rng.randrange(len(items))].CopyFrom(odd_input(rng))

    def many(rng, m):
        getattr(m, field).extend(pb_input(rng) for _ in range(
            rng.choice([limit + 1, limit * 4, 2000])))

    def none(rng, m):
        m.ClearField(field)

    def bad_text(m, s):
        items = getattr(m, field)
        (items[0] if items else items.add()).text = s

    return [("odd input", odd), ("odd input", odd), ("too many inputs", many),
            ("no inputs", none), ("invalid UTF-8 text", utf8(bad_text))]


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

    mutators = model_mutators("lm", ctx) + [
        ("tiny temperature", tiny), ("tiny temperature", tiny), ("huge temperature", huge),
        ("NaN temperature", nan), ("negative temperature", negative), ("odd top_k", top_k),
        ("odd top_p", top_p), ("odd max_tokens", max_tokens), ("odd n", n),
        ("odd seed", seed), ("many long stop strings", many_stops),
        ("many stop strings, long greedy completions", stall), ("empty stop string", empty_stop),
        ("odd stop token ids", stop_ids), ("odd prompt", prompt),
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


# -- the Open Inference Protocol -------------------------------------------------------
def bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def v2_text(request: v2.ModelInferRequest, texts: list[bytes], raw: bool) -> None:
    tensor = request.inputs.add(name="TEXT", datatype="BYTES", shape=[len(texts), 1])
    if raw:
        request.raw_input_contents.append(bytes_tensor(texts))
    else:
        tensor.contents.bytes_contents.extend(texts)


def v2_ids(request: v2.ModelInferRequest, rows: list[list[int]], raw: bool) -> None:
    width = max((len(r) for r in rows), default=0)
    array = np.full((len(rows), width), -1, np.int64)
    for i, row in enumerate(rows):
        array[i, : len(row)] = row
    tensor = request.inputs.add(name="TOKEN_IDS", datatype="INT64", shape=list(array.shape))
    if raw:
        request.raw_input_contents.append(array.astype("<i8").tobytes())
    else:
        tensor.contents.int64_contents.extend(array.reshape(-1).tolist())


def v2_infer(rng: random.Random, ctx: Context) -> tuple[object, str]:
    """A ModelInferRequest: valid, or with one or two hostile mutations."""
    model = rng.choice(ctx.served)
    request = v2.ModelInferRequest(model_name=model.name,
                                   model_version=rng.choice(["", "", str(model.versions[-1])]),
                                   id=rng.choice(["", "", "r1", "请求"]))
    raw = chance(rng, 0.6)
    batch = rng.choice([1, 1, 2, 4])
    if chance(rng, 0.5):
        v2_text(request, [val.text(rng).encode() for _ in range(batch)], raw)
    else:
        v2_ids(request, [val.ids(rng) for _ in range(batch)], raw)
    if chance(rng, 0.3):
        for name in rng.sample(OUTPUTS[model.task], rng.randint(1, len(OUTPUTS[model.task]))):
            request.outputs.add(name=name)
    if model.task == "lm" and chance(rng, 0.3):
        request.parameters["add_eos"].bool_param = chance(rng, 0.5)

    def reset(m):
        m.ClearField("inputs")
        m.ClearField("raw_input_contents")

    def huge_bytes(rng, m):
        reset(m)
        shape = rng.choice([[1 << 26], [1 << 13, 1 << 13], [1 << 25, 2], [1 << 24, 4],
                            [1 << 22, 1]])
        tensor = m.inputs.add(name="TEXT", datatype="BYTES", shape=shape)
        if chance(rng, 0.8):
            m.raw_input_contents.append(bytes_tensor([b"w1"]))
        else:
            tensor.contents.bytes_contents.append(b"w1")

    def huge_numeric(rng, m):
        reset(m)
        shape = rng.choice([[1 << 26], [1 << 20, 64], [1, 1 << 26]])
        m.inputs.add(name="TOKEN_IDS", datatype="INT64", shape=shape)
        m.raw_input_contents.append(struct.pack("<q", 2))

    def first(m) -> v2.ModelInferRequest.InferInputTensor:
        if not m.inputs:
            v2_ids(m, [val.ids(rng)], chance(rng, 0.6))
        return m.inputs[0]

    def bad_shape(rng, m):
        shape = rng.choice([[1 << 40], [1 << 62, 4], [2**63 - 1], [-1], [1, -3], [],
                            [1] * 40, [0, 5], [0], [2**62, 2**62], [-(2**63)]])
        first(m).ClearField("shape")
        m.inputs[0].shape.extend(shape)

    def bad_prefix(rng, m):
        reset(m)
        m.inputs.add(name="TEXT", datatype="BYTES", shape=rng.choice([[1, 1], [2, 1], [1]]))
        raw = rng.choice([
            struct.pack("<I", 1000) + b"w1 w2", struct.pack("<I", 0xFFFFFFFF) + b"w1",
            b"\x02\x00", struct.pack("<I", 2) + b"w1" + b"trailing", b"",
            struct.pack("<I", 0x7FFFFFFF), struct.pack("<I", 2) + b"w1" + b"\x05\x00"])
        m.raw_input_contents.append(raw)

    def bad_datatype(rng, m):
        tensor = first(m)
        tensor.datatype = rng.choice(["INT64", "FP32", "STRING", "", "bytes", "BYTES ",
                                      "INT32", "UINT64", "BOOL", "FP16", "INT128", "BF16"]
                                     if tensor.name == "TEXT" else
                                     ["INT32", "FP32", "UINT64", "BYTES", "INT128", "", "int64"])

    def bad_name(rng, m):
        first(m).name = rng.choice(["TEXTS", "", "text", "INPUT0", "TOKEN_IDS\x00",
                                       val.long_string(rng)])

    def both(rng, m):
        if first(m).name == "TEXT":
            v2_ids(m, [val.ids(rng)], bool(m.raw_input_contents))
        else:
            v2_text(m, [b"w1"], bool(m.raw_input_contents))

    def duplicate(rng, m):
        m.inputs.add().CopyFrom(first(m))
        if m.raw_input_contents:
            m.raw_input_contents.append(m.raw_input_contents[0])

    def no_inputs(rng, m):
        reset(m)

    def raw_count(rng, m):
        m.raw_input_contents.append(rng.randbytes(rng.randint(0, 16)))

    def bad_output(rng, m):
        m.outputs.add(name=rng.choice(["LOGITS", "", "text", "TAGS", "LABEL", "TOKEN_LOGPROBS",
                                       "TOKEN_COUNT", val.long_string(rng)]))
        if chance(rng, 0.5):
            m.outputs.add(name=m.outputs[0].name)

    def bad_utf8(rng, m):
        reset(m)
        v2_text(m, [rng.choice(val.INVALID_UTF8) for _ in range(rng.randint(1, 3))],
                chance(rng, 0.6))

    def odd_ids(rng, m):
        reset(m)
        kind = rng.randrange(5)
        if kind == 0:
            v2_ids(m, [val.odd_ids(rng)], chance(rng, 0.6))
        elif kind == 1:  # -1 inside a row, not only at its end
            v2_ids(m, [[3, -1, 4, 5]], chance(rng, 0.6))
        elif kind == 2:
            m.inputs.add(name="TOKEN_IDS", datatype="INT64", shape=rng.choice([[1, 1, 3], [3]]))
            m.raw_input_contents.append(np.array([2, 3, 4], "<i8").tobytes())
        elif kind == 3:
            v2_ids(m, [[]], chance(rng, 0.6))
        else:
            v2_ids(m, [val.ids(rng, 1, 3) for _ in range(ctx.limits.max_sequences + 1)], True)

    def odd_parameter(rng, m):
        key = rng.choice(["add_eos", "sequence_start", "sequence_end", "sequence_id",
                          "unknown", val.long_string(rng)])
        value = m.parameters[key]
        kind = rng.randrange(5)
        if kind == 0:
            value.string_param = rng.choice(["true", "", val.long_string(rng)])
        elif kind == 1:
            value.int64_param = rng.choice([-1, 0, 1, 2**63 - 1, -(2**63)])
        elif kind == 2:
            value.double_param = rng.choice([float("nan"), 1.0, -0.0])
        elif kind == 3:
            value.uint64_param = rng.choice([0, 1, 2**64 - 1])
        else:
            value.bool_param = chance(rng, 0.5)

    def sequence(rng, m):  # a random sequence, mostly never started here
        if chance(rng, 0.5):
            m.parameters["sequence_id"].uint64_param = rng.choice(
                [rng.randint(1, 2**40), 2**64 - 1, 2**63])
        else:
            m.parameters["sequence_id"].string_param = rng.choice(
                [f"h-{rng.randrange(10**6)}", "0", "-1", "ü" * 65, val.long_string(rng)])
        for key in ("sequence_start", "sequence_end"):
            if chance(rng, 0.5):
                m.parameters[key].bool_param = chance(rng, 0.5)

    def odd_version(rng, m):
        m.model_version = val.v2_version(rng, (1, 2)) or rng.choice(val.V2_VERSIONS)

    def odd_name(rng, m):
        m.model_name = val.model_name(rng, [], ["nope"])

    def long_id(rng, m):
        m.id = val.long_string(rng)

    def many_rows(rng, m):
        reset(m)
        v2_text(m, [b"w1 w2"] * rng.choice([ctx.limits.max_sequences + 1, 2000]),
                chance(rng, 0.6))

    def long_text(rng, m):
        reset(m)
        v2_text(m, [val.odd_text(rng).encode()], chance(rng, 0.6))

    mutators = [
        ("huge declared BYTES shape, few bytes", huge_bytes),
        ("huge declared INT64 shape, few bytes", huge_numeric),
        ("odd shape", bad_shape), ("BYTES with a bad length prefix", bad_prefix),
        ("BYTES with a bad length prefix", bad_prefix), ("wrong datatype", bad_datatype),
        ("unknown input name", bad_name), ("both inputs", both),
        ("duplicate input", duplicate), ("no inputs", no_inputs),
        ("raw contents for the wrong number of inputs", raw_count),
        ("unknown or repeated output", bad_output), ("TEXT with invalid UTF-8", bad_utf8),
        ("odd TOKEN_IDS", odd_ids), ("odd parameter", odd_parameter),
        ("sequence mix", sequence), ("sequence mix", sequence),
        ("odd model version", odd_version), ("odd model version", odd_version),
        ("odd model name", odd_name), ("4 KB+ request id", long_id),
        ("too many rows", many_rows), ("odd text", long_text),
        ("invalid UTF-8 model version",
         utf8(lambda m, s: setattr(m, "model_version", s))),
        ("invalid UTF-8 sequence id",
         utf8(lambda m, s: setattr(m.parameters["sequence_id"], "string_param", s))),
    ]
    return mutated(rng, request, mutators, p=0.7)


def model_infer(rng: random.Random, ctx: Context) -> Case:
    request, label = v2_infer(rng, ctx)
    return Case("GRPCInferenceService.ModelInfer", label, request)


def model_stream_infer(rng: random.Random, ctx: Context) -> Case:
    messages, labels = [], []
    for i in range(rng.choice([0, 1, 2, 3, 5]) if chance(rng, 0.3) else rng.randint(1, 3)):
        request, label = v2_infer(rng, ctx)
        messages.append(request)
        labels.append(f"request {i}: {label}")
    return Case("GRPCInferenceService.ModelStreamInfer", "; ".join(labels) or "no requests",
                messages)


def _named(rng: random.Random, ctx: Context, message_type, rpc: str) -> Case:
    message = message_type(name=val.model_name(rng, ctx.names(), ["nope"]),
                           version=val.v2_version(rng, (1, 2)))
    label = "valid" if ctx.model(message.name) and (
        not message.version or message.version in ("1", "2")) else "odd name or version"
    if chance(rng, 0.05):
        return Case(rpc, "invalid UTF-8 name", val.with_invalid_utf8(
            rng, message, lambda m, s: setattr(m, "name", s)))
    if chance(rng, 0.05):
        return Case(rpc, "invalid UTF-8 version", val.with_invalid_utf8(
            rng, message, lambda m, s: setattr(m, "version", s)))
    return Case(rpc, label, message)


def model_metadata(rng, ctx) -> Case:
    return _named(rng, ctx, v2.ModelMetadataRequest, "GRPCInferenceService.ModelMetadata")


def model_config(rng, ctx) -> Case:
    return _named(rng, ctx, v2.ModelConfigRequest, "GRPCInferenceService.ModelConfig")


def model_ready(rng, ctx) -> Case:
    return _named(rng, ctx, v2.ModelReadyRequest, "GRPCInferenceService.ModelReady")


def model_statistics(rng, ctx) -> Case:
    return _named(rng, ctx, v2.ModelStatisticsRequest, "GRPCInferenceService.ModelStatistics")


def _repository_model(message_type, rpc: str) -> Callable:
    """A load or unload (refused: the fuzzed server runs without model control)."""
    def generate(rng, ctx) -> Case:
        message = message_type(model_name=val.model_name(rng, ctx.names(), ["nope"]))
        if chance(rng, 0.1):
            message.repository_name = "elsewhere"
        if chance(rng, 0.1):
            message.parameters["config"].string_param = "{}"
        return Case(rpc, "refused (no model control)", message)
    return generate


def _empty(rpc: str, message_type) -> Callable:
    def generate(rng, ctx) -> Case:
        if chance(rng, 0.2):
            return Case(rpc, "unknown fields", b"\x08\x01\x12\x03abc")
        return Case(rpc, "valid", message_type())
    return generate


def _health_service(rng: random.Random) -> tuple[object, str]:
    from grpc_health.v1 import health_pb2

    roll = rng.random()
    if roll < 0.7:
        return health_pb2.HealthCheckRequest(service=rng.choice(HEALTH_SERVICES)), "valid"
    if roll < 0.85:
        return health_pb2.HealthCheckRequest(service=rng.choice(
            ["nope", "recur.v1.languagemodel", " ", "\x00", "grpc.health.v1.Health"])), \
            "unknown service"
    if roll < 0.95:
        return health_pb2.HealthCheckRequest(service=val.long_string(rng)), "4 KB+ service"
    return val.with_invalid_utf8(rng, health_pb2.HealthCheckRequest(),
                                 lambda m, s: setattr(m, "service", s)), "invalid UTF-8 service"


def health_check(rng, ctx) -> Case:
    request, label = _health_service(rng)
    return Case("Health.Check", label, request)


def health_watch(rng, ctx) -> Case:
    request, label = _health_service(rng)
    return Case("Health.Watch", label, request, first_only=True)


def health_list(rng, ctx) -> Case:
    from grpc_health.v1 import health_pb2

    return Case("Health.List", "valid", health_pb2.HealthListRequest())


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
            "GRPCInferenceService.ServerLive": _empty("GRPCInferenceService.ServerLive",
                                                      v2.ServerLiveRequest),
            "GRPCInferenceService.ServerReady": _empty("GRPCInferenceService.ServerReady",
                                                       v2.ServerReadyRequest),
            "GRPCInferenceService.ServerMetadata": _empty(
                "GRPCInferenceService.ServerMetadata", v2.ServerMetadataRequest),
            "GRPCInferenceService.ModelStatistics": model_statistics,
            "GRPCInferenceService.RepositoryIndex": _empty(
                "GRPCInferenceService.RepositoryIndex", v2.RepositoryIndexRequest),
            "GRPCInferenceService.RepositoryModelLoad": _repository_model(
                v2.RepositoryModelLoadRequest, "GRPCInferenceService.RepositoryModelLoad"),
            "GRPCInferenceService.RepositoryModelUnload": _repository_model(
                v2.RepositoryModelUnloadRequest, "GRPCInferenceService.RepositoryModelUnload"),
            "Health.Check": health_check,
            "Health.Watch": health_watch,
            "Health.List": health_list,
        }


def finish(rng: random.Random, case: Case) -> Case:
    """The last touches any request may get: a 1 ms deadline, or its bytes replaced by
    garbage or by nothing (the empty request)."""
    roll = rng.random()
    if roll < 0.03:
        case.timeout, case.label = 0.001, f"{case.label}, 1 ms deadline"
    elif roll < 0.05:
        if isinstance(case.request, list):
            if case.request:
                case.request[rng.randrange(len(case.request))] = val.garbage(rng)
        else:
            case.request = val.garbage(rng)
        case.label, case.after = f"garbage bytes (was {case.label})", None
    elif roll < 0.07:
        case.request = [b""] if isinstance(case.request, list) else b""
        case.label, case.after = "empty request", None
    return case
