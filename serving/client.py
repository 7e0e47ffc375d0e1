"""A Python client for Recur's gRPC services: plain Python values in and out.

    from serving.client import RecurClient

    with RecurClient("127.0.0.1:50051") as client:
        (score,) = client.score("demo-lm", ["the old dogs that see a cat sleep"])
        print(score.perplexity, [t.logprob for t in score.tokens])

        for event in client.complete("demo-lm", "the old dogs", seed=1, max_tokens=10):
            if event.token is not None:
                print(event.token.text, end=" ")
            else:
                print(f"({event.finish_reason})")   # "eos", "length" or "stop"

        session = client.create_session("demo-lm", "the old dogs", top_k=3)
        step = client.append(session.session_id, "that the cat sees", top_k=3)
        print(step.position, [t.text for t in step.next_tokens])
        client.close_session(session.session_id)

        print(client.tag("demo-pos", ["the cruel cats sleep"])[0].tokens)
        print(client.classify("demo-cls", ["every dark child sleeps again"])[0].label)

Every call that names a model takes it first, then what to run it on, then keyword
options (version 0: the highest served). A failed call raises grpc.RpcError with the
server's status and message. The generated stubs stay available as `language_model`,
`tagger`, `classifier` and `models` for what this does not wrap.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from serving.proto_gen.recur.v1 import recur_pb2 as pb
from serving.proto_gen.recur.v1 import recur_pb2_grpc as pb_grpc

# Behind a proxy that hashes on this header (deploy/k8s/components/istio-session-affinity),
# calls carrying the same key reach the same replica: a session's calls find its state.
ROUTING_HEADER = "x-recur-routing-key"
TextOrIds = str | Sequence[int]


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: int


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    logprob: float  # natural log


class TokenList(Sequence[Token]):
    """A scored sequence's tokens, made into Token values only when first read: a scoring
    job that reads only totals (a file's perplexity) does not pay for every token."""

    def __init__(self, messages):
        self._messages, self._tokens = messages, None

    def _all(self) -> list[Token]:
        if self._tokens is None:
            self._tokens = _tokens(self._messages)
        return self._tokens

    def __getitem__(self, index):
        return self._all()[index]

    def __len__(self) -> int:
        return len(self._messages)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and self._all() == list(other)

    def __repr__(self) -> str:
        return repr(self._all())


@dataclass(frozen=True)
class Score:
    tokens: Sequence[Token]  # every scored token, <eos> included unless add_eos was off
    total_logprob: float
    token_count: int
    perplexity: float
    unknown_count: int  # words mapped to <unk>


@dataclass(frozen=True)
class StreamedScores:
    id: str  # the id the caller gave the group
    scores: list[Score]


@dataclass(frozen=True)
class LogLikelihood:
    """A continuation given its context (lm-evaluation-harness's loglikelihood)."""

    logprob: float  # natural log, summed over the continuation's tokens
    token_count: int  # the continuation's
    is_greedy: bool  # every continuation token was the most likely at its position
    token_logprobs: list[float]
    context_token_count: int
    unknown_count: int  # words of context and continuation mapped to <unk>


@dataclass(frozen=True)
class RollingLogLikelihood:
    """A whole document's log-likelihood (lm-evaluation-harness's loglikelihood_rolling)."""

    logprob: float
    token_count: int  # no closing <eos>
    unknown_count: int


@dataclass(frozen=True)
class CompletionEvent:
    """A sample's next token, or (token None) its end: why, and its whole text."""

    index: int
    token: Token | None = None
    finish_reason: str | None = None  # "eos", "length" or "stop"
    text: str = ""
    model: ModelRef | None = None  # the version that served, on the closing event


@dataclass(frozen=True)
class TaggedToken:
    token: str
    tag: str
    logprob: float


@dataclass(frozen=True)
class Tagging:
    tokens: list[TaggedToken]


@dataclass(frozen=True)
class ClassProbability:
    label: str
    probability: float


@dataclass(frozen=True)
class Classification:
    label: str
    classes: list[ClassProbability]  # most likely first


@dataclass(frozen=True)
class SessionState:
    """A session after a call: where it is, and what the call read (by task)."""

    session_id: str
    model: ModelRef
    position: int  # tokens read so far
    tokens: list[Token] = field(default_factory=list)  # language models: the new tokens
    next_tokens: list[Token] = field(default_factory=list)  # the top_k next tokens
    tags: list[TaggedToken] = field(default_factory=list)  # taggers
    classes: list[ClassProbability] = field(default_factory=list)  # classifiers
    unknown_count: int = 0
    state_token: bytes = b""  # resumes the session on any replica holding the key


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: int
    latest: bool
    task: str
    cell: str
    layers: int
    hidden_size: int
    bidirectional: bool
    vocab_size: int
    labels: list[str]
    ready: bool
    device: str
    providers: list[str]
    incremental: bool


FINISH_REASONS = {pb.FINISH_REASON_EOS: "eos", pb.FINISH_REASON_LENGTH: "length",
                  pb.FINISH_REASON_STOP: "stop"}


def _tokens(messages) -> list[Token]:
    return [Token(t.id, t.text, t.logprob) for t in messages]


def _score(message: pb.SequenceScore) -> Score:
    return Score(TokenList(message.tokens), message.total_logprob, message.token_count,
                 message.perplexity, message.unknown_count)


def _ref(message: pb.ModelRef) -> ModelRef:
    return ModelRef(message.name, message.version)


def _classes(messages) -> list[ClassProbability]:
    return [ClassProbability(c.label, c.probability) for c in messages]


def _tagged(messages) -> list[TaggedToken]:
    return [TaggedToken(t.token, t.tag, t.logprob) for t in messages]


def _session(message: pb.SessionResponse) -> SessionState:
    return SessionState(message.session_id, _ref(message.model), message.position,
                        _tokens(message.tokens), _tokens(message.next_tokens),
                        _tagged(message.tags), _classes(message.classes),
                        message.unknown_count, message.state_token)


def _events(message: pb.CompleteResponse) -> list[CompletionEvent]:
    """A message's events: its token, or (packed streams) each of its tokens, then its
    sample's end if it carries it."""
    tokens = [message.token] if message.HasField("token") else message.tokens
    events = [CompletionEvent(message.index, Token(t.id, t.text, t.logprob)) for t in tokens]
    if message.finish_reason:
        events.append(CompletionEvent(message.index, None,
                                      FINISH_REASONS[message.finish_reason], message.text,
                                      _ref(message.model)))
    return events


def text_or_ids(item: TextOrIds) -> pb.Input:
    if isinstance(item, str):
        return pb.Input(text=item)
    return pb.Input(token_ids=pb.TokenIds(ids=list(item)))


def _routing(key: str | None) -> tuple | None:
    return ((ROUTING_HEADER, key),) if key else None


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call."""

    def __init__(self, token: str):
        self.header = ("authorization", f"Bearer {token}")

    def _with_token(self, details):
        return _CallDetails(details.method, details.timeout,
                            [*(details.metadata or ()), self.header], details.credentials,
                            details.wait_for_ready, getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready = credentials, wait_for_ready
        self.compression = compression


def connect(target: str, ca: str | None = None, cert: str | None = None,
            key: str | None = None, token: str | None = None) -> grpc.Channel:
    """A channel to `recur serve`: plaintext, or TLS with `ca` (the server's CA), plus a
    client certificate (`cert`, `key`) for mutual TLS, plus a bearer token."""
    if ca or cert:
        read = lambda path: Path(path).read_bytes() if path else None  # noqa: E731
        credentials = grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
        channel = grpc.secure_channel(target, credentials)
    else:
        channel = grpc.insecure_channel(target)
    return grpc.intercept_channel(channel, _BearerToken(token)) if token else channel


class RecurClient:
    def __init__(self, target: str = "127.0.0.1:50051", timeout: float | None = 60.0,
                 channel: grpc.Channel | None = None):
        self.channel = channel or connect(target)
        self.timeout = timeout
        self.language_model = pb_grpc.LanguageModelStub(self.channel)
        self.tagger = pb_grpc.TaggerStub(self.channel)
        self.classifier = pb_grpc.ClassifierStub(self.channel)
        self.models = pb_grpc.ModelsStub(self.channel)

    def __enter__(self) -> RecurClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def list_models(self) -> list[ModelInfo]:
        response = self.models.ListModels(pb.ListModelsRequest(), timeout=self.timeout)
        return [ModelInfo(m.name, m.version, m.latest, m.task, m.cell, m.layers, m.hidden_size,
                          m.bidirectional, m.vocab_size, list(m.labels), m.ready, m.device,
                          list(m.providers), m.incremental) for m in response.models]

    def score(self, model: str, items: Sequence[TextOrIds], *, version: int = 0,
              add_eos: bool = True) -> list[Score]:
        """Every token's log-prob of each text (or token-id list), in order."""
        request = pb.ScoreRequest(model=pb.ModelRef(name=model, version=version),
                                  inputs=[text_or_ids(i) for i in items], add_eos=add_eos)
        return [_score(s) for s in self.language_model.Score(request,
                                                             timeout=self.timeout).scores]

    def score_stream(self, model: str, groups: Iterable[tuple[str, Sequence[TextOrIds]]], *,
                     version: int = 0, add_eos: bool = True,
                     timeout: float | None = None) -> Iterator[StreamedScores]:
        """(id, sequences) pairs in, one result per pair out, in the same order. Several
        sequences per group go faster; the input iterable is consumed only as fast as the
        server takes it."""
        ref = pb.ModelRef(name=model, version=version)
        requests = (pb.ScoreStreamRequest(id=str(key), model=ref,
                                          inputs=[text_or_ids(s) for s in group],
                                          add_eos=add_eos) for key, group in groups)
        for response in self.language_model.ScoreStream(requests, timeout=timeout):
            yield StreamedScores(response.id, [_score(s) for s in response.scores])

    def loglikelihood(self, model: str, pairs: Sequence[tuple[TextOrIds | None, TextOrIds]],
                      *, version: int = 0) -> list[LogLikelihood]:
        """Per (context, continuation): the continuation's log-prob given `<eos>` + the
        context (None or "": the start of a sentence), in order. Pairs sharing a context
        read it once."""
        messages = []
        for context, continuation in pairs:
            pair = pb.LogLikelihoodPair(continuation=text_or_ids(continuation))
            if context is not None:
                pair.context.CopyFrom(text_or_ids(context))
            messages.append(pair)
        request = pb.LogLikelihoodRequest(model=pb.ModelRef(name=model, version=version),
                                          pairs=messages)
        return [LogLikelihood(r.logprob, r.token_count, r.is_greedy, list(r.token_logprobs),
                              r.context_token_count, r.unknown_count)
                for r in self.language_model.LogLikelihood(request,
                                                           timeout=self.timeout).results]

    def loglikelihood_rolling(self, model: str, inputs: Sequence[TextOrIds], *,
                              version: int = 0) -> list[RollingLogLikelihood]:
        """Each whole document's log-likelihood (Score's total without the closing
        `<eos>`), in order."""
        request = pb.LogLikelihoodRollingRequest(model=pb.ModelRef(name=model, version=version),
                                                 inputs=[text_or_ids(i) for i in inputs])
        response = self.language_model.LogLikelihoodRolling(request, timeout=self.timeout)
        return [RollingLogLikelihood(r.logprob, r.token_count, r.unknown_count)
                for r in response.results]

    def complete(self, model: str, prompt: TextOrIds = "", *, version: int = 0,
                 max_tokens: int = 0, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, n: int = 1,
                 stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                 timeout: float | None = None, pack_tokens: bool = False,
                 stream_interval_ms: int = 0) -> Iterator[CompletionEvent]:
        """The streamed events of n samples (max_tokens 0: the server's default; temperature
        0: greedy). Interleaved across samples; each sample ends with one event whose
        finish_reason is set. `pack_tokens` lets the server send several tokens a message
        (those ready when its writer is free; with `stream_interval_ms`, those drawn within
        that interval): fewer writes for it and fewer reads here, the same events."""
        request = pb.CompleteRequest(
            model=pb.ModelRef(name=model, version=version), prompt=text_or_ids(prompt),
            max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, n=n,
            stop=list(stop), stop_token_ids=list(stop_token_ids), pack_tokens=pack_tokens,
            stream_interval_ms=stream_interval_ms)
        if seed is not None:
            request.seed = seed
        call = self.language_model.Complete(request, timeout=timeout or self.timeout)
        return _Events(call)

    def complete_text(self, model: str, prompt: TextOrIds = "", **options) -> list[str]:
        """The finished texts of all samples, by sample index (from a packed stream unless
        `pack_tokens` is False: the tokens are not needed one by one)."""
        options.setdefault("pack_tokens", True)
        texts: dict[int, str] = {}
        for event in self.complete(model, prompt, **options):
            if event.finish_reason:
                texts[event.index] = event.text
        return [texts[i] for i in sorted(texts)]

    def create_session(self, model: str, prefix: TextOrIds | None = None, *, version: int = 0,
                       top_k: int = 0, routing_key: str | None = None,
                       state_token: bytes = b"") -> SessionState:
        """`routing_key`: any stable key of the caller's (a conversation id), sent with this
        and every later call of the session so that a hashing proxy keeps them together.
        `state_token`: start a new session where that token's session was (model may then
        be "")."""
        request = pb.CreateSessionRequest(model=pb.ModelRef(name=model, version=version),
                                          top_k=top_k, state_token=state_token)
        if prefix is not None:
            request.prefix.CopyFrom(text_or_ids(prefix))
        return _session(self.language_model.CreateSession(request, timeout=self.timeout,
                                                          metadata=_routing(routing_key)))

    def append(self, session_id: str, item: TextOrIds, *, top_k: int = 0,
               state_token: bytes = b"", routing_key: str | None = None) -> SessionState:
        """`state_token`: the last response's, so that a replica without the session
        resumes it."""
        request = pb.AppendRequest(session_id=session_id, input=text_or_ids(item), top_k=top_k,
                                   state_token=state_token)
        return _session(self.language_model.Append(request, timeout=self.timeout,
                                                   metadata=_routing(routing_key)))

    def fork_session(self, session_id: str, *, top_k: int = 0,
                     routing_key: str | None = None) -> SessionState:
        """A new session where `session_id` is now; the source is not changed."""
        request = pb.ForkSessionRequest(session_id=session_id, top_k=top_k)
        return _session(self.language_model.ForkSession(request, timeout=self.timeout,
                                                        metadata=_routing(routing_key)))

    def close_session(self, session_id: str, *, routing_key: str | None = None) -> None:
        self.language_model.CloseSession(pb.CloseSessionRequest(session_id=session_id),
                                         timeout=self.timeout, metadata=_routing(routing_key))

    def tag(self, model: str, texts: Sequence[TextOrIds], *, version: int = 0
            ) -> list[Tagging]:
        request = pb.TagRequest(model=pb.ModelRef(name=model, version=version),
                                inputs=[text_or_ids(t) for t in texts])
        return [Tagging(_tagged(r.tokens))
                for r in self.tagger.Tag(request, timeout=self.timeout).results]

    def classify(self, model: str, texts: Sequence[TextOrIds], *, version: int = 0
                 ) -> list[Classification]:
        request = pb.ClassifyRequest(model=pb.ModelRef(name=model, version=version),
                                     inputs=[text_or_ids(t) for t in texts])
        return [Classification(r.label, _classes(r.classes))
                for r in self.classifier.Classify(request, timeout=self.timeout).results]


class _Events:
    """A completion's events, as an iterator; `cancel()` ends the call."""

    def __init__(self, call):
        self._call = call
        self._pending: collections.deque[CompletionEvent] = collections.deque()

    def __iter__(self) -> Iterator[CompletionEvent]:
        return self

    def __next__(self) -> CompletionEvent:
        while not self._pending:  # a packed message may carry many events
            self._pending.extend(_events(next(self._call)))
        return self._pending.popleft()

    def cancel(self) -> None:
        self._call.cancel()
