"""A Python client for Recur's gRPC services: plain values in, plain values out.

    with RecurClient("localhost:50051") as client:
        print(client.score(["the cat sat"], model="demo-lm")[0].perplexity)
        for event in client.complete("the old dogs", model="demo-lm", seed=1):
            ...
        session = client.create_session("demo-lm")
        response = client.append(session.session_id, "the cat")

The generated stubs (serving.proto_gen) are typed; this wraps the common calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import grpc

from serving.proto_gen.recur.v1 import recur_pb2 as pb
from serving.proto_gen.recur.v1 import recur_pb2_grpc as pb_grpc

# Behind a proxy that hashes on this header (deploy/k8s/components/istio-session-affinity),
# calls carrying the same key reach the same replica: a session's calls find its state.
ROUTING_HEADER = "x-recur-routing-key"


def _routing(key: str | None) -> tuple | None:
    return ((ROUTING_HEADER, key),) if key else None


def text_or_ids(item: str | Sequence[int]) -> pb.Input:
    if isinstance(item, str):
        return pb.Input(text=item)
    return pb.Input(token_ids=pb.TokenIds(ids=list(item)))


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
    def __init__(self, target: str, timeout: float | None = 60.0,
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

    def list_models(self) -> list[pb.ModelInfo]:
        return list(self.models.ListModels(pb.ListModelsRequest(), timeout=self.timeout).models)

    def score(self, items: Sequence[str | Sequence[int]], model: str, version: int = 0,
              add_eos: bool = True) -> list[pb.SequenceScore]:
        request = pb.ScoreRequest(model=pb.ModelRef(name=model, version=version),
                                  inputs=[text_or_ids(i) for i in items], add_eos=add_eos)
        return list(self.language_model.Score(request, timeout=self.timeout).scores)

    def score_stream(self, items: Iterable[tuple[str, Sequence[str | Sequence[int]]]],
                     model: str, version: int = 0, add_eos: bool = True,
                     timeout: float | None = None) -> Iterator[pb.ScoreStreamResponse]:
        """(id, sequences) pairs in, one result per pair out, in the same order. Several
        sequences per message go faster; the input iterable is consumed only as fast as
        the server takes it."""
        ref = pb.ModelRef(name=model, version=version)
        requests = (pb.ScoreStreamRequest(id=str(key), model=ref,
                                          inputs=[text_or_ids(s) for s in group],
                                          add_eos=add_eos) for key, group in items)
        return self.language_model.ScoreStream(requests, timeout=timeout)

    def complete(self, prompt: str | Sequence[int], model: str, version: int = 0,
                 max_tokens: int = 0, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, n: int = 1,
                 stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                 timeout: float | None = None) -> Iterator[pb.CompleteResponse]:
        request = pb.CompleteRequest(
            model=pb.ModelRef(name=model, version=version), prompt=text_or_ids(prompt),
            max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, n=n,
            stop=list(stop), stop_token_ids=list(stop_token_ids))
        if seed is not None:
            request.seed = seed
        return self.language_model.Complete(request, timeout=timeout or self.timeout)

    def complete_text(self, prompt: str, model: str, **kwargs) -> list[str]:
        """The finished texts of all samples, by sample index."""
        texts: dict[int, str] = {}
        for event in self.complete(prompt, model, **kwargs):
            if event.finish_reason:
                texts[event.index] = event.text
        return [texts[i] for i in sorted(texts)]

    def create_session(self, model: str, prefix: str | Sequence[int] | None = None,
                       version: int = 0, top_k: int = 0,
                       routing_key: str | None = None) -> pb.SessionResponse:
        """`routing_key`: any stable key of the caller's (a conversation id), sent with this
        and every later call of the session so that a hashing proxy keeps them together."""
        request = pb.CreateSessionRequest(model=pb.ModelRef(name=model, version=version),
                                          top_k=top_k)
        if prefix is not None:
            request.prefix.CopyFrom(text_or_ids(prefix))
        return self.language_model.CreateSession(request, timeout=self.timeout,
                                                 metadata=_routing(routing_key))

    def append(self, session_id: str, item: str | Sequence[int], top_k: int = 0,
               routing_key: str | None = None, state_token: bytes = b"") -> pb.SessionResponse:
        """`state_token`: the last response's, so that a replica without the session
        resumes it."""
        request = pb.AppendRequest(session_id=session_id, input=text_or_ids(item), top_k=top_k,
                                   state_token=state_token)
        return self.language_model.Append(request, timeout=self.timeout,
                                          metadata=_routing(routing_key))

    def close_session(self, session_id: str, routing_key: str | None = None) -> None:
        self.language_model.CloseSession(pb.CloseSessionRequest(session_id=session_id),
                                         timeout=self.timeout, metadata=_routing(routing_key))

    def tag(self, texts: Sequence[str | Sequence[int]], model: str,
            version: int = 0) -> list[pb.TaggedSequence]:
        request = pb.TagRequest(model=pb.ModelRef(name=model, version=version),
                                inputs=[text_or_ids(t) for t in texts])
        return list(self.tagger.Tag(request, timeout=self.timeout).results)

    def classify(self, texts: Sequence[str | Sequence[int]], model: str,
                 version: int = 0) -> list[pb.Classification]:
        request = pb.ClassifyRequest(model=pb.ModelRef(name=model, version=version),
                                     inputs=[text_or_ids(t) for t in texts])
        return list(self.classifier.Classify(request, timeout=self.timeout).results)
