"""Sessions and V2 sequences that the fuzzer drives with valid appends (and hostile
requests in between), then replays: every position and log-prob the server returned must
equal a sequential replay.

The replay is a stateless call on the concatenated tokens, under the scoring convention
(docs/serving.md): a session reads from the state after `<eos>`, so its tokens' log-probs
are those Score gives the concatenation with add_eos = false; a tagger session's tags are
Tag's tags of the concatenation, and a classifier session's classes after an append are
Classify's of the text up to it. Positions are the count of tokens read (on V2, the one in
the state token: the response has no other). Between the valid appends a scenario sends
requests that must leave the session as it was: a stale state token of the same session
(an older position), forged and truncated tokens, another session's token, bad inputs.
A request that is refused must change nothing; one that is answered must continue from
where the session was. After a close, the session is resumed from its last token (or an
older one, which continues from that token's position).

Completion answers are checked here too (`Checks.completion`): well-formed events, and a
tiny temperature gives the greedy tokens.
"""

from __future__ import annotations

import asyncio
import base64
import math
import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from bench.fuzzing import values as val
from bench.fuzzing.case import Context, Limits
from bench.fuzzing.cases_v2 import v2_ids, v2_text
from bench.fuzzing.client import Caller, Outcome, Recorder
from bench.fuzzing.models import VOCAB, WORDS, Served
from bench.fuzzing.values import chance, describe
from serving.proto_gen.inference import grpc_service_pb2 as v2
from serving.proto_gen.recur.v1 import recur_pb2 as pb

RETRY = {"RESOURCE_EXHAUSTED", "UNAVAILABLE"}
FINISHES = {pb.FINISH_REASON_EOS, pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP}


def word_ids(words: list[str]) -> list[int]:
    """Every model's vocabulary is [two specials] + WORDS (bench/fuzzing/models.py)."""
    return [WORDS.index(w) + 2 for w in words]


@dataclass
class Step:
    """One answered append: where it started on its branch, what it read, and what the
    server said (log-probs; tags and their log-probs; or class probabilities)."""

    branch: int
    start: int
    ids: list[int]
    position: int
    values: object
    request: object


@dataclass
class Drive:
    """A driven session: its branches of tokens (a resume from an older token starts a
    new one from that token's position) and the steps answered on them."""

    kind: str
    model: Served
    version: int = 0
    branches: list[list[int]] = field(default_factory=lambda: [[]])
    steps: list[Step] = field(default_factory=list)
    tokens: list[tuple[int, int, bytes]] = field(default_factory=list)  # (branch, pos, token)
    failed: bool = False
    log: list[str] = field(default_factory=list)  # what was sent, in order, for examples

    @property
    def branch(self) -> list[int]:
        return self.branches[-1]

    def fork(self, position: int, branch: int) -> None:
        self.branches.append(list(self.branches[branch][:position]))


class Checks:
    def __init__(self, caller: Caller, recorder: Recorder, ctx: Context, limits: Limits,
                 default_tokens: int, tolerance: float):
        self.caller, self.recorder, self.ctx = caller, recorder, ctx
        self.limits, self.default_tokens, self.tolerance = limits, default_tokens, tolerance
        self.replay: Counter[str] = Counter()  # done, failed, inconclusive, per kind
        self.completions: Counter[str] = Counter()
        self._sequence = 0

    # -- helpers ------------------------------------------------------------------------
    async def _check_call(self, rpc: str, request, label: str) -> Outcome:
        for attempt in range(4):
            outcome = await self.caller.call(rpc, request, label, check=True)
            if outcome.code not in RETRY:
                return outcome
            await asyncio.sleep(0.2 * (attempt + 1))
        return outcome

    def _fail(self, drive: Drive, why: str, **extra) -> None:
        drive.failed = True
        self.recorder.fail("replay", {"scenario": drive.kind, "model": drive.model.name,
                                      "version": drive.version, "why": why, **extra,
                                      "sent": drive.log[-12:]}, f"{drive.kind} {why[:40]}")

    def _note(self, drive: Drive, what: str, message, outcome: Outcome | None = None) -> None:
        shown = f"{what}: {describe(message)[:300]}"
        if outcome is not None:
            shown += f" -> {outcome.code}"
        drive.log.append(shown)

    # -- recur.v1 sessions --------------------------------------------------------------
    def _inputs(self, rng: random.Random) -> tuple[pb.Input, list[int]]:
        if chance(rng, 0.5):
            words = val.words(rng, 1, 10)
            return pb.Input(text=" ".join(words)), word_ids(words)
        ids = val.ids(rng, 1, 10)
        return pb.Input(token_ids=pb.TokenIds(ids=ids)), ids

    @staticmethod
    def _values(task: str, response: pb.SessionResponse):
        if task == "lm":
            return [(t.id, t.logprob) for t in response.tokens]
        if task == "tag":
            return [(t.tag, t.logprob) for t in response.tags]
        return {c.label: c.probability for c in response.classes}

    def _answered(self, drive: Drive, ids: list[int], response: pb.SessionResponse,
                  request, start: int | None = None) -> bool:
        """Records an answered append on the current branch; False (and a failure) if its
        position is not where a sequential replay would be."""
        start = len(drive.branch) if start is None else start
        expected = start + len(ids)
        if response.position != expected:
            rewound = [p for _, p, _ in drive.tokens if p + len(ids) == response.position]
            self._fail(drive, f"position {response.position} answered, {expected} expected"
                       + (" (the session was rewound to an older state token's position)"
                          if rewound and response.position < expected else ""),
                       request=describe(request))
            return False
        del drive.branch[start:]
        drive.branch.extend(ids)
        drive.steps.append(Step(len(drive.branches) - 1, start, ids, response.position,
                                self._values(drive.model.task, response), request))
        if response.state_token:
            drive.tokens.append((len(drive.branches) - 1, response.position,
                                 response.state_token))
        return True

    async def session(self, rng: random.Random, appends: int) -> None:
        """CreateSession, `appends` Append calls (valid ones and hostile ones between
        them; after a close, a resume from a state token), CloseSession, then the replay."""
        model = rng.choice([s for s in self.ctx.served if s.sessions and s.task == "lm"] * 3
                           + [s for s in self.ctx.served if s.sessions and s.task != "lm"])
        drive = Drive("session", model, rng.choice([0, *model.versions]))
        prefix, ids = self._inputs(rng) if chance(rng, 0.8) else (None, [])
        create = pb.CreateSessionRequest(model=pb.ModelRef(name=model.name,
                                                           version=drive.version),
                                         top_k=rng.choice([0, 3]))
        if prefix is not None:
            create.prefix.CopyFrom(prefix)
        outcome = await self.caller.call("LanguageModel.CreateSession", create,
                                         "replayed session: create")
        self._note(drive, "CreateSession", create, outcome)
        if not outcome.ok:
            self.replay["inconclusive"] += 1
            return
        response = pb.SessionResponse.FromString(outcome.responses[0])
        session_id, drive.version = response.session_id, response.model.version
        if not self._answered(drive, ids, response, create):
            return await self._verify(drive)
        for number in range(appends):
            if drive.failed:
                break
            if number == appends - 1 and drive.tokens and chance(rng, 0.4):
                await self._close(drive, session_id)
                await self._resume(rng, drive, session_id)
                break
            await self._append(rng, drive, session_id)
        await self._close(drive, session_id)
        await self._verify(drive)

    async def _close(self, drive: Drive, session_id: str) -> None:
        request = pb.CloseSessionRequest(session_id=session_id)
        outcome = await self.caller.call("LanguageModel.CloseSession", request,
                                         "replayed session: close")
        self._note(drive, "CloseSession", request, outcome)

    async def _append(self, rng: random.Random, drive: Drive, session_id: str) -> None:
        item, ids = self._inputs(rng)
        request = pb.AppendRequest(session_id=session_id, input=item,
                                   top_k=rng.choice([0, 0, 2]))
        hostile, what = chance(rng, 0.35), "valid"
        current = drive.tokens[-1][2] if drive.tokens else b""
        if hostile:
            kind = rng.randrange(6)
            older = [t for t in drive.tokens if t[1] < len(drive.branch)
                     and t[0] == len(drive.branches) - 1]
            if kind == 0 and older:
                request.state_token = rng.choice(older)[2]
                what = "stale state token (an older position of this live session)"
            elif kind == 1 and older:
                request.state_token = rng.choice(older)[2]
                request.input.CopyFrom(pb.Input(token_ids=pb.TokenIds(ids=val.odd_ids(rng))))
                what = "stale state token with a bad input"
            elif kind == 2:
                forgery, request.state_token = val.forged_token(rng, current)
                what = f"forged state token ({forgery})"
            elif kind == 3 and self.ctx.tokens:
                request.state_token = rng.choice(self.ctx.tokens)
                what = "another session's state token"
            elif kind == 4:
                request.input.CopyFrom(pb.Input(token_ids=pb.TokenIds(ids=val.odd_ids(rng))))
                what = "bad input"
            else:
                request.state_token = current
                hostile, what = False, "the current state token"
        outcome = await self.caller.call("LanguageModel.Append", request,
                                         f"replayed session: {what}")
        self._note(drive, f"Append ({what})", request, outcome)
        if hostile:  # how the server answered each kind, for the report
            self.replay[f"session {what.split(' (')[0]}: {outcome.code}"] += 1
        if not outcome.ok:
            if not hostile and outcome.code not in RETRY | {"DEADLINE_EXCEEDED"}:
                self._fail(drive, f"a valid Append was refused: {outcome.code}: "
                           f"{outcome.details[:200]}", request=describe(request))
            return
        response = pb.SessionResponse.FromString(outcome.responses[0])
        if request.input.HasField("token_ids"):
            ids = list(request.input.token_ids.ids)
        if any(not 0 <= i < VOCAB for i in ids):
            self._fail(drive, f"{what}: answered OK with token ids out of range",
                       request=describe(request))
            return
        self._answered(drive, ids, response, request)

    async def _resume(self, rng: random.Random, drive: Drive, session_id: str) -> None:
        """After a close: Append from a state token (the last one, or an older one, which
        continues from its own position)."""
        branch, position, token = (drive.tokens[-1] if chance(rng, 0.7)
                                   else rng.choice(drive.tokens))
        item, ids = self._inputs(rng)
        request = pb.AppendRequest(session_id=rng.choice(["", session_id]), input=item,
                                   state_token=token)
        outcome = await self.caller.call("LanguageModel.Append", request,
                                         "replayed session: resume from a state token")
        self._note(drive, f"Append (resume at position {position})", request, outcome)
        if not outcome.ok:  # a server may refuse to reopen a session closed here
            self.replay[f"resume after close refused: {outcome.code}"] += 1
            return
        if position != len(drive.branch) or branch != len(drive.branches) - 1:
            drive.fork(position, branch)
        response = pb.SessionResponse.FromString(outcome.responses[0])
        self._answered(drive, ids, response, request)

    # -- Converse -----------------------------------------------------------------------
    async def converse(self, rng: random.Random) -> None:
        """A Converse stream of valid messages (sometimes a stale token in a later message,
        which must be ignored, or a bad input, which ends it), then sometimes a second
        stream resuming from the first one's last token."""
        model = rng.choice([s for s in self.ctx.served if s.sessions])
        drive = Drive("converse", model, rng.choice([0, *model.versions]))
        await self._converse_stream(rng, drive, None)
        if not drive.failed and drive.tokens and chance(rng, 0.3):
            await self._converse_stream(rng, drive, drive.tokens[-1])
        await self._verify(drive)

    async def _converse_stream(self, rng: random.Random, drive: Drive,
                               resume: tuple[int, int, bytes] | None) -> None:
        stream = self.caller.stream("LanguageModel.Converse",
                                    "replayed stream" + (": resumed" if resume else ""))
        try:
            for number in range(rng.randint(1, 4)):
                item, ids = self._inputs(rng)
                message = pb.ConverseRequest(input=item, top_k=rng.choice([0, 2]))
                # refusable: a refusal is allowed (an answer must still be right)
                what, refusable = "valid", False
                if number == 0 and resume is None:
                    message.model.CopyFrom(pb.ModelRef(name=drive.model.name,
                                                       version=drive.version))
                elif number == 0:
                    message.state_token = resume[2]
                    what, refusable = f"resume at position {resume[1]}", True
                    if resume[1] != len(drive.branch):
                        drive.fork(resume[1], resume[0])
                elif chance(rng, 0.15) and len(drive.tokens) > 1:
                    message.state_token = drive.tokens[0][2]
                    what = "stale state token in a later message (first message only)"
                    refusable = True
                elif chance(rng, 0.1):
                    message.input.CopyFrom(pb.Input(token_ids=pb.TokenIds(
                        ids=val.odd_ids(rng))))
                    what, refusable = "bad input", True
                answer = await stream.send(message)
                self._note(drive, f"Converse message {number} ({what})", message)
                if answer is None:
                    outcome = await stream.close()
                    drive.log[-1] += f" -> stream ended {outcome.code}"
                    if refusable:
                        kind = ("resume" if what.startswith("resume") else
                                "stale token" if what.startswith("stale") else what)
                        self.replay[f"converse {kind} refused: {outcome.code}"] += 1
                    elif outcome.code not in RETRY | {"DEADLINE_EXCEEDED"}:
                        self._fail(drive, f"a valid Converse message ended the stream: "
                                   f"{outcome.code}: {outcome.details[:200]}",
                                   request=describe(message))
                    return
                response = pb.SessionResponse.FromString(answer)
                if drive.version == 0:
                    drive.version = response.model.version
                if message.input.HasField("token_ids"):
                    ids = list(message.input.token_ids.ids)
                if not self._answered(drive, ids, response, message):
                    return
        finally:
            await stream.close()

    # -- V2 sequences -------------------------------------------------------------------
    def _v2_request(self, rng: random.Random, drive: Drive, sequence, start: bool,
                    end: bool, allow_empty: bool) -> tuple[v2.ModelInferRequest, list[int]]:
        request = v2.ModelInferRequest(model_name=drive.model.name,
                                       model_version=str(drive.version) if drive.version
                                       else "", id=f"s{len(drive.log)}")
        if chance(rng, 0.3):
            words = val.words(rng, 1, 8)
            v2_text(request, [" ".join(words).encode()], chance(rng, 0.6))
            ids = word_ids(words)
        else:
            ids = val.ids(rng, 0 if allow_empty else 1, 8)
            v2_ids(request, [ids], chance(rng, 0.6))
        if isinstance(sequence, int):
            request.parameters["sequence_id"].uint64_param = sequence
        else:
            request.parameters["sequence_id"].string_param = sequence
        if start:
            request.parameters["sequence_start"].bool_param = True
        if end or chance(rng, 0.3):
            request.parameters["sequence_end"].bool_param = end
        return request, ids

    def _v2_answer(self, drive: Drive, ids: list[int], response: v2.ModelInferResponse,
                   request, start: int) -> bool:
        outputs = {o.name: (o, raw) for o, raw in zip(response.outputs,
                                                       response.raw_output_contents,
                                                       strict=False)}
        try:
            count = int(np.frombuffer(outputs["TOKEN_COUNT"][1], "<i8")[0])
            logprobs = np.frombuffer(outputs["TOKEN_LOGPROBS"][1], "<f4")[:count].tolist()
        except (KeyError, IndexError, ValueError) as error:
            self._fail(drive, f"a sequence response without readable outputs ({error!r})",
                       request=describe(request))
            return False
        if "state_token" not in response.parameters:
            self._fail(drive, "a sequence response without a state_token parameter (the "
                       "server has state token keys)", request=describe(request))
            return False
        token = base64.b64decode(response.parameters["state_token"].string_param)
        position = val.token_position(token)
        if count != len(ids) or position != start + len(ids):
            self._fail(drive, f"TOKEN_COUNT {count} at position {position} answered; "
                       f"{len(ids)} tokens at position {start + len(ids)} expected",
                       request=describe(request))
            return False
        if drive.version == 0 and response.model_version.isascii() and \
                response.model_version.isdigit():
            drive.version = int(response.model_version)
        del drive.branch[start:]
        drive.branch.extend(ids)
        drive.steps.append(Step(len(drive.branches) - 1, start, ids, position,
                                list(zip(ids, logprobs, strict=True)), request))
        drive.tokens.append((len(drive.branches) - 1, position, token))
        return True

    async def sequence(self, rng: random.Random, requests: int, streamed: bool) -> None:
        """A V2 sequence on the language model, over ModelInfer (`requests` calls) or one
        ModelStreamInfer stream (`requests` messages): start, appends (empty ones too),
        sometimes a restart (sequence_start again: a new sequence from nothing) and
        refused requests in between (a wrong datatype, another model), then the end."""
        model = next(s for s in self.ctx.served if s.task == "lm")
        drive = Drive("v2-stream" if streamed else "v2-sequence", model,
                      rng.choice([0, 0, *model.versions]))
        self._sequence += 1
        sequence: int | str = ((1 << 62) + rng.getrandbits(40) if chance(rng, 0.5) else
                               rng.choice(["seq-", "序列-", "s "]) + f"{rng.getrandbits(48):x}")
        stream = (self.caller.stream("GRPCInferenceService.ModelStreamInfer",
                                     "replayed V2 sequence") if streamed else None)
        try:
            for number in range(requests):
                start, end = number == 0, number == requests - 1
                what, hostile = "valid", False
                if 0 < number < requests - 1 and chance(rng, 0.1):
                    start, what = True, "restart (sequence_start again)"
                request, ids = self._v2_request(rng, drive, sequence, start, end,
                                                allow_empty=not start)
                if number > 0 and not start and chance(rng, 0.15):
                    hostile = True
                    if chance(rng, 0.5):
                        request.inputs[0].datatype = "FP32"
                        what = "wrong datatype on the sequence"
                    else:
                        request.model_name = "fuzz-tag"
                        request.model_version = ""
                        what = "another model on the sequence"
                label = f"replayed V2 sequence: {what}"
                if stream is None:
                    outcome = await self.caller.call("GRPCInferenceService.ModelInfer",
                                                     request, label)
                    self._note(drive, f"ModelInfer {number} ({what})", request, outcome)
                    answer = (v2.ModelInferResponse.FromString(outcome.responses[0])
                              if outcome.ok else None)
                    refused = None if outcome.ok else f"{outcome.code}: {outcome.details}"
                else:
                    raw = await stream.send(request)
                    self._note(drive, f"ModelStreamInfer message {number} ({what})", request)
                    if raw is None:
                        outcome = await stream.close()
                        self._fail(drive, f"the stream ended: {outcome.code}: "
                                   f"{outcome.details[:200]}", request=describe(request))
                        return
                    message = v2.ModelStreamInferResponse.FromString(raw)
                    answer = None if message.error_message else message.infer_response
                    refused = message.error_message or None
                if hostile:
                    if answer is not None:
                        self._fail(drive, f"{what}: answered instead of refused",
                                   request=describe(request))
                        return
                    continue
                if answer is None:
                    if refused and refused.split(":")[0] not in RETRY | {"DEADLINE_EXCEEDED"}:
                        self._fail(drive, f"a valid sequence request was refused: "
                                   f"{refused[:200]}", request=describe(request))
                    return
                if start and number:
                    drive.branches.append([])
                if not self._v2_answer(drive, ids, answer, request,
                                       0 if start else len(drive.branch)):
                    return
        finally:
            if stream is not None:
                await stream.close()
        await self._verify(drive)

    # -- the replay ---------------------------------------------------------------------
    async def _verify(self, drive: Drive) -> None:
        kind = drive.kind
        if drive.failed:
            self.replay["done"] += 1
            self.replay["failed"] += 1
            self.replay[f"{kind} failed"] += 1
            return
        steps = [s for s in drive.steps if s.ids]
        if not steps:
            self.replay["inconclusive"] += 1
            return
        task = drive.model.task
        ref = pb.ModelRef(name=drive.model.name, version=drive.version)
        if task == "classify":
            expected = await self._classify(ref, [drive.branches[s.branch][: s.start + len(s.ids)]
                                                  for s in steps])
        else:
            used = sorted({s.branch for s in steps})
            replays = await self._replay(task, ref, [drive.branches[b] for b in used])
            expected = None if replays is None else [
                replays[used.index(s.branch)][s.start: s.start + len(s.ids)] for s in steps]
        if expected is None:
            self.replay["inconclusive"] += 1
            return
        self.replay["done"] += 1
        self.replay[f"{kind} done"] += 1
        for step, want in zip(steps, expected, strict=True):
            problem = self._compare(task, step, want)
            if problem:
                self._fail(drive, problem, request=describe(step.request),
                           position=step.position)
                self.replay["failed"] += 1
                self.replay[f"{kind} failed"] += 1
                return

    def _compare(self, task: str, step: Step, want) -> str | None:
        tolerance = self.tolerance
        if task == "classify":
            got = step.values
            if set(got) != set(want) or any(abs(got[k] - want[k]) > tolerance for k in want):
                return f"class probabilities {got} after position {step.position}; replay {want}"
            return None
        if len(step.values) != len(want):
            return (f"{len(step.values)} values for {len(step.ids)} tokens at position "
                    f"{step.position}; the replay has {len(want)}")
        for offset, ((got_key, got), (want_key, wanted)) in enumerate(
                zip(step.values, want, strict=True)):
            close = math.isfinite(got) and abs(got - wanted) <= tolerance
            if task == "lm" and got_key != want_key:
                return f"token {step.start + offset}: id {got_key}, replay {want_key}"
            if not close:  # a tagger's tag may differ only in a tie: then the log-probs agree
                return (f"token {step.start + offset} (position {step.position}): "
                        f"{got_key}/{got:.6f} answered, replay {want_key}/{wanted:.6f} "
                        f"(tolerance {tolerance:g})")
        return None

    async def _replay(self, task: str, ref: pb.ModelRef, branches: list[list[int]]):
        """Per branch, [(id or tag, log-prob)] from the stateless call; None if it failed."""
        inputs = [pb.Input(token_ids=pb.TokenIds(ids=b)) for b in branches]
        if task == "lm":
            request = pb.ScoreRequest(model=ref, inputs=inputs, add_eos=False)
            outcome = await self._check_call("LanguageModel.Score", request, "replay")
            if not outcome.ok:
                return None
            scores = pb.ScoreResponse.FromString(outcome.responses[0]).scores
            return [[(t.id, t.logprob) for t in s.tokens] for s in scores]
        request = pb.TagRequest(model=ref, inputs=inputs)
        outcome = await self._check_call("Tagger.Tag", request, "replay")
        if not outcome.ok:
            return None
        results = pb.TagResponse.FromString(outcome.responses[0]).results
        return [[(t.tag, t.logprob) for t in r.tokens] for r in results]

    async def _classify(self, ref: pb.ModelRef, texts: list[list[int]]):
        found = []
        size = self.limits.max_sequences
        for i in range(0, len(texts), size):
            request = pb.ClassifyRequest(model=ref, inputs=[
                pb.Input(token_ids=pb.TokenIds(ids=t)) for t in texts[i: i + size]])
            outcome = await self._check_call("Classifier.Classify", request, "replay")
            if not outcome.ok:
                return None
            results = pb.ClassifyResponse.FromString(outcome.responses[0]).results
            found += [{c.label: c.probability for c in r.classes} for r in results]
        return found

    # -- completions --------------------------------------------------------------------
    async def completion(self, request: pb.CompleteRequest, label: str,
                         outcome: Outcome) -> None:
        """An answered completion: one closing message per sample after its tokens,
        tokens in the vocabulary with finite log-probs <= 0, no more than max_tokens, a
        text free of stop strings; with a tiny temperature, the greedy tokens."""
        if not outcome.ok:
            return
        self.completions["checked"] += 1
        samples = request.n or 1
        limit = request.max_tokens or self.default_tokens
        tokens: dict[int, list[int]] = {i: [] for i in range(samples)}
        finished: dict[int, pb.CompleteResponse] = {}
        problem = None
        for raw in outcome.responses:
            event = pb.CompleteResponse.FromString(raw)
            if event.index not in tokens or event.index in finished:
                problem = f"an event for sample {event.index} (of {samples}) after its end " \
                          "or out of range"
                break
            packed = request.pack_tokens or request.stream_interval_ms > 0
            if (event.tokens and not packed) or (packed and event.HasField("token")):
                problem = "a packed message in an unpacked stream" if event.tokens else \
                    "a one-token message in a packed stream"
                break
            if event.tokens and not tokens[event.index] and len(event.tokens) > 1:
                problem = f"sample {event.index}'s first token held back for " \
                          f"{len(event.tokens) - 1} more"
                break
            carried = [event.token] if event.HasField("token") else list(event.tokens)
            bad = [t for t in carried if not 0 <= t.id < VOCAB or not math.isfinite(t.logprob)
                   or t.logprob > 1e-5]
            if bad:
                problem = f"token id {bad[0].id} with log-prob {bad[0].logprob}"
                break
            tokens[event.index].extend(t.id for t in carried)
            if event.finish_reason or not carried:  # a closing message (packed: with tokens)
                finished[event.index] = event
        if problem is None:
            for index in range(samples):
                end, count = finished.get(index), len(tokens[index])
                if end is None:
                    problem = f"sample {index} has no closing message"
                elif end.finish_reason not in FINISHES:
                    problem = f"sample {index} finished with reason {end.finish_reason}"
                elif count > limit or (end.finish_reason == pb.FINISH_REASON_LENGTH
                                       and count != limit):
                    problem = f"sample {index}: {count} tokens, max_tokens {limit}, " \
                              f"finish {pb.FinishReason.Name(end.finish_reason)}"
                elif any(s and s in end.text for s in request.stop):
                    problem = f"sample {index}'s text {end.text[:80]!r} holds a stop string"
                if problem:
                    break
        if problem is None and label == "tiny temperature":
            greedy = pb.CompleteRequest()
            greedy.CopyFrom(request)
            greedy.temperature = 0.0
            twin = await self._check_call("LanguageModel.Complete", greedy, "greedy twin")
            if twin.ok:
                self.completions["tiny temperature vs greedy"] += 1
                want = [pb.CompleteResponse.FromString(r) for r in twin.responses]
                want_ids = [t.id for e in want if e.index == 0
                            for t in ([e.token] if e.HasField("token") else e.tokens)]
                for index in range(samples):
                    if tokens[index] != want_ids:
                        problem = (f"temperature {request.temperature:g}: sample {index} "
                                   f"drew {tokens[index]}, greedy decoding gives {want_ids}")
                        break
        if problem:
            self.completions["failed"] += 1
            self.recorder.fail("completions", {"rpc": "LanguageModel.Complete", "label": label,
                                               "why": problem, "request": describe(request)},
                               f"{label} {problem[:30]}")

    def summary(self) -> dict:
        return {"replay": dict(self.replay), "completions": dict(self.completions)}

