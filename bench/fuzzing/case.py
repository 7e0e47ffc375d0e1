"""What a generated request is (Case), what the generators know (Context, Limits), and
the mutations every RPC's generator shares: hostile model names and inputs, and the last
touches any request may get (`finish`). The generators themselves: cases.py (recur.v1)
and cases_v2.py (the Open Inference Protocol and health)."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bench.fuzzing import values as val
from bench.fuzzing.client import Outcome
from bench.fuzzing.models import Served
from bench.fuzzing.values import chance
from serving.proto_gen.recur.v1 import recur_pb2 as pb


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
