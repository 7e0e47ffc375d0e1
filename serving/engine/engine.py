"""The engine: every operation the server offers, protocol-free.

Adapters (serving/api/) turn their protocol's requests into these calls and the results
back into their messages. Arguments are plain values (Input for text or token ids, ints,
floats, strings); results are the plain values of serving/engine/results.py, or an async
iterator of events for a completion. Errors are the exceptions of
serving/engine/errors.py, which each adapter maps to its protocol's statuses.

Beneath: operations.py turns a request into steps (token ids and states), the model's
Scheduler (scheduler.py) batches the steps of all requests into ONNX Runtime calls of the
model's ModelRuntime (serving/model/runtime.py).
"""

from __future__ import annotations

import asyncio
import functools
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from serving.engine import operations
from serving.engine.config import EngineConfig, VersionPolicy
from serving.engine.decoding import (
    WRITE_AHEAD,
    CompletionParams,
    CompletionStream,
    Sample,
    decode,
)
from serving.engine.errors import (
    FailedPrecondition,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    shown,
)
from serving.engine.inputs import Encoded, Input, encode, encode_all
from serving.engine.metrics import Metrics
from serving.engine.repository import LoadedModel, ModelRepository, ModelState
from serving.engine.results import (
    Classified,
    Likelihood,
    ModelId,
    Scored,
    SessionStep,
    Tagged,
    tagged,
)
from serving.engine.scheduler import Admission, BatchLimits
from serving.engine.sessions import Session, SessionLive, SessionStore
from serving.engine.state_tokens import Snapshot, StateTokenKeys, TokenRejected
from serving.engine.stats import ModelStatistics, counting, current_timing, note_model
from serving.model.sampler import SamplingParams, make_rng, most_likely

TOKEN_KINDS = {"lm": "scored", "tag": "tagged", "classify": "classified"}
# A request whose inputs hold more characters or token ids than this is tokenized on a
# worker thread: about 12 ms of the event loop's time at this size, and a 4 MB request
# (two million tokens) would hold the loop for most of a second.
OFF_LOOP_UNITS = 32768
# An adapter's own check of a request's tokenized inputs, run before anything is computed
# (the size of its response, say); it raises an EngineError to refuse the request.
Check = Callable[[Sequence[Encoded]], None]


def _counted(operation):
    """An inference request, counted in its model's statistics (stats.py) from its start
    to its end, its steps timed; the operation binds it to its model (`_bind`) once known."""

    @functools.wraps(operation)
    async def counted(self, *args, **kwargs):
        with counting():
            return await operation(self, *args, **kwargs)

    return counted


def _bind(model: LoadedModel, count: int = 1) -> None:
    note_model(model.name)  # a session step names no model: its session's counts
    if (timing := current_timing.get()) is not None:
        timing.count = count
        timing.bind(model.scheduler.stats)


class Engine:
    def __init__(self, config: EngineConfig, metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics or Metrics()
        limits = BatchLimits(config.max_batch_size, config.max_queue_delay_ms / 1000,
                             config.token_budget, config.max_queue,
                             config.max_inline_step_ms / 1000,
                             config.max_fill_wait_us / 1e6)
        self.token_keys = (StateTokenKeys.from_file(config.state_token_keys,
                                                    config.state_token_ttl_s)
                           if config.state_token_keys else None)
        self.repository = ModelRepository(config.model_repository, config.device,
                                          config.threads, config.allow_cpu_fallback, limits,
                                          self.metrics, config.spin_threads,
                                          VersionPolicy.parse(config.version_policy),
                                          drain_s=config.session_ttl_s,
                                          strict_start=config.strict_start,
                                          prefix_cache_bytes=int(config.prefix_cache_mib
                                                                 * (1 << 20)),
                                          prefix_cache_interval=config.prefix_cache_interval)
        self.sessions = SessionStore(config.session_ttl_s, config.max_sessions,
                                     config.max_session_bytes, self.metrics,
                                     config.max_sessions_per_client)
        # a retired version serves its open sessions for up to a session TTL
        self.repository.sessions_on = self.sessions.count_on
        self.repository.on_release = self.sessions.remove_model
        self.closing = asyncio.Event()  # set when open streams must end
        self._background: list[asyncio.Task] = []

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Starts the schedulers, session expiry and repository polling (in the loop)."""
        self.repository.start()
        self._background.append(asyncio.ensure_future(self.sessions.expire_forever()))
        if self.config.repository_poll_s > 0:
            self._background.append(asyncio.ensure_future(
                self.repository.refresh_forever(self.config.repository_poll_s)))

    async def close(self) -> None:
        self.closing.set()
        for task in self._background:
            task.cancel()
        await self.repository.close()

    # -- models ---------------------------------------------------------------------------
    def model(self, name: str, version: int = 0, task: str | None = None,
              name_field: str = "model.name",
              version_field: str = "model.version") -> LoadedModel:
        """The model a request names (version 0: the highest served); errors name the
        request's own fields. The name is noted for the request's metrics (stats.py)."""
        model = self.repository.get(name, version, task, name_field=name_field,
                                    version_field=version_field)
        note_model(model.name)  # only once found: a client's typo makes no metric series
        return model

    def models(self) -> list[LoadedModel]:
        return self.repository.all()

    def unavailable(self) -> list[tuple[tuple[str, int], str]]:
        """((name, version), why) of the versions in the policy that do not load (retried
        at every look at the repository), in order."""
        return sorted(self.repository.unavailable.items())

    def versions(self, name: str) -> list[int]:
        """The versions of `name` served, in order."""
        return self.repository.versions(name)

    def statistics(self, name: str = "", version: int = 0) -> list[ModelStatistics]:
        """Triton's statistics of every served version (of `name`, of `version` of it),
        in order; an unknown name or version is NotFound, as a lookup."""
        if name:
            self.model(name, version, name_field="name", version_field="version")  # or raise
            models = [self.model(name, v, name_field="name")
                      for v in ([version] if version else self.versions(name))]
        else:
            models = sorted(self.models(), key=lambda m: (m.name, m.version))
        return [m.scheduler.stats.snapshot(m.name, m.version) for m in models]

    # -- scoring --------------------------------------------------------------------------
    def prepare_scores(self, model: LoadedModel, inputs: Sequence[Input | None],
                       add_eos: bool = True,
                       field: str = "inputs") -> list[Encoded]:
        """Checks and tokenizes a scoring request. With add_eos an empty text is a sentence
        too: only its `<eos>` is scored."""
        return encode_all(inputs, model.vocab, field, self.config.max_sequences_per_request,
                          self.config.max_tokens_per_sequence, allow_empty=add_eos)

    async def admit_when_room(self, model: LoadedModel, count: int) -> Admission:
        """For streams: waits (instead of refusing) until the model admits `count`
        sequences; release the admission when their work ends."""
        return await model.scheduler.admit_when_room(count)

    @_counted
    async def score_prepared(self, model: LoadedModel, encoded: Sequence[Encoded],
                             add_eos: bool = True) -> list[Scored]:
        """Scores inputs of prepare_scores; the caller holds their admission."""
        _bind(model, len(encoded))
        return await self._score_encoded(model, encoded, add_eos)

    @_counted
    async def score(self, model: LoadedModel, inputs: Sequence[Input | None],
                    add_eos: bool = True, field: str = "inputs",
                    check: Check | None = None, top_logprobs: int = 0,
                    top_field: str = "top_logprobs") -> list[Scored]:
        """Each input's per-token log-probs under the scoring convention (read from the
        state after `<eos>`; with add_eos its final `<eos>` is scored too). `check` sees
        the tokenized inputs before anything runs (an adapter's own limits, such as the
        size of its response). With `top_logprobs` N, each token also gets the N most
        likely tokens at its position (Scored.top)."""
        _bind(model, len(inputs))
        self._check_top_logprobs(top_logprobs, top_field)
        encoded = await self.off_loop_if_large(inputs, self.prepare_scores, model, inputs,
                                                add_eos, field)
        _bind(model, len(encoded))
        if check is not None:
            check(encoded)
        with model.scheduler.admit(len(encoded)):
            return await self._score_encoded(model, encoded, add_eos, top_logprobs)

    async def _score_encoded(self, model: LoadedModel, encoded: Sequence[Encoded],
                             add_eos: bool, top: int = 0) -> list[Scored]:
        with model.in_use():
            return await _gather(*(self._score_one(model, e, add_eos, top) for e in encoded))

    async def _score_one(self, model: LoadedModel, encoded: Encoded, add_eos: bool,
                         top: int = 0) -> Scored:
        vocab = model.vocab
        ids, words = encoded.ids, list(encoded.words)
        if add_eos:
            ids, words = np.append(ids, vocab.eos_id), words + [vocab.texts[vocab.eos_id]]
        alternatives = None
        if top == 0 or (top == 1 and model.runtime.has_greedy):
            # one pass: the graph gives each position's most likely token beside its own
            read = await operations.score(model, ids, self.config.chunk_tokens,
                                          store_end=not add_eos)
            logprobs = read.logprobs.tolist()
            if top:
                alternatives = [[(int(i), vocab.texts[i], float(lp))]
                                for i, lp in zip(read.tokens["greedy_id"],
                                                 read.tokens["greedy_logprob"], strict=True)]
        else:
            logprobs, ranked = await operations.score_ranked(model, ids, top)
            alternatives = [[(i, vocab.texts[i], lp) for i, lp in row] for row in ranked]
        self.metrics.tokens.labels(model.label, "scored").inc(len(ids))
        return Scored(ids.tolist(), words, logprobs, encoded.unknown, math.fsum(logprobs),
                      alternatives)

    async def off_loop_if_large(self, inputs: Sequence[Input | None], encoder, *args):
        """`encoder(*args)` (a tokenization of `inputs`), on a worker thread when `inputs`
        are large (the thread gives the loop back the GIL every few milliseconds; a
        request over the count limit is refused at once, before its size is looked at).
        For adapters that tokenize a request themselves (prepare_scores) too."""
        if len(inputs) <= self.config.max_sequences_per_request and _large(inputs):
            return await asyncio.to_thread(encoder, *args)
        return encoder(*args)

    def _check_top_logprobs(self, top: int, field: str) -> None:
        if top < 0:
            raise InvalidArgument(field, f"must be >= 0, got {top}")
        if top > self.config.max_top_logprobs:
            raise LimitExceeded("max_top_logprobs", top, self.config.max_top_logprobs, field)

    # -- log-likelihoods (evaluation harnesses, rerankers) --------------------------------
    @_counted
    async def loglikelihood(self, model: LoadedModel,
                            pairs: Sequence[tuple[Input | None, Input | None]],
                            field: str = "pairs",
                            check: Check | None = None) -> list[Likelihood]:
        """lm-evaluation-harness's `loglikelihood`: for each (context, continuation), the
        sum of the continuation's token log-probs given `<eos>` + the context (an empty or
        missing context: the start of a sentence), their count, and whether every one was
        the most likely token at its position. Context and continuation are tokenized
        apart and joined, as the harness does. Pairs that share a context (multiple
        choice) read it once: it is read first and stored in the prefix cache, and each
        continuation starts from there; so do other requests with that context. `check`
        sees the tokenized continuations before anything runs."""
        if model.task != "lm":
            model = self.model(model.name, model.version, "lm")
        _bind(model, len(pairs))
        config = self.config
        if len(pairs) == 0:
            raise InvalidArgument(field, "at least one (context, continuation) pair is "
                                  "required")
        if len(pairs) > config.max_sequences_per_request:
            raise LimitExceeded("max_sequences_per_request", len(pairs),
                                config.max_sequences_per_request, field)
        flat = [item for pair in pairs for item in pair]
        encoded = (await asyncio.to_thread(self._encode_pairs, model, pairs, field)
                   if _large(flat) else self._encode_pairs(model, pairs, field))
        if check is not None:
            check([continuation for _, continuation in encoded])
        groups: dict[bytes, list[int]] = {}
        for i, (context, _) in enumerate(encoded):
            groups.setdefault(context.ids.tobytes(), []).append(i)
        chunk = config.chunk_tokens

        async def share(members: list[int]) -> list[Likelihood]:
            context = encoded[members[0]][0].ids
            if model.prefix_cache.enabled and len(context) > 1:
                await operations.read(model, context, chunk, store_end=True)
            return await _gather(*(self._likelihood(model, *encoded[i]) for i in members))

        with model.scheduler.admit(len(pairs)), model.in_use():
            shared = await _gather(*(share(members) for members in groups.values()))
        results: list[Likelihood | None] = [None] * len(pairs)
        for members, likelihoods in zip(groups.values(), shared, strict=True):
            for i, likelihood in zip(members, likelihoods, strict=True):
                results[i] = likelihood
        self.metrics.tokens.labels(model.label, "scored").inc(
            sum(len(c.ids) for _, c in encoded))
        return results

    def _encode_pairs(self, model: LoadedModel,
                      pairs: Sequence[tuple[Input | None, Input | None]],
                      field: str) -> list[tuple[Encoded, Encoded]]:
        limit = self.config.max_tokens_per_sequence
        encoded = []
        for i, (context, continuation) in enumerate(pairs):
            where = f"{field}[{i}]"
            before = encode(context, model.vocab, limit, allow_empty=True, optional=True,
                            field=f"{where}.context")
            after = encode(continuation, model.vocab, limit, field=f"{where}.continuation")
            if len(before.ids) + len(after.ids) > limit:
                raise LimitExceeded("max_tokens_per_sequence",
                                    len(before.ids) + len(after.ids), limit, where,
                                    "context and continuation: ", " tokens")
            encoded.append((before, after))
        return encoded

    async def _likelihood(self, model: LoadedModel, context: Encoded,
                          continuation: Encoded) -> Likelihood:
        ids = np.concatenate([context.ids, continuation.ids])
        start = len(context.ids)
        read = await operations.read(model, ids, self.config.chunk_tokens, store_end=False)
        tail = read.tokens[start:]
        if read.has_greedy:
            greedy = bool((tail["greedy_id"] == tail["id"]).all())
        else:  # an artifact exported without the greedy outputs: step through it
            _, ranked = await operations.score_ranked(model, ids, 1)
            greedy = all(row[0][0] == token for row, token in
                         zip(ranked[start:], continuation.ids.tolist(), strict=True))
        logprobs = tail["logprob"].tolist()
        return Likelihood(math.fsum(logprobs), len(logprobs), greedy, logprobs, start,
                          context.unknown + continuation.unknown)

    async def loglikelihood_rolling(self, model: LoadedModel, inputs: Sequence[Input | None],
                                    field: str = "inputs") -> list[Scored]:
        """lm-evaluation-harness's `loglikelihood_rolling`: the log-likelihood of whole
        documents, each token given `<eos>` and every token before it (a recurrent model
        reads the whole document: no windows), no `<eos>` scored after the last token.
        Score with add_eos=False, so the same numbers."""
        return await self.score(model, inputs, add_eos=False, field=field)

    # -- tagging and classification -------------------------------------------------------
    @_counted
    async def tag(self, model: LoadedModel, inputs: Sequence[Input | None],
                  field: str = "inputs", check: Check | None = None) -> list[Tagged]:
        _bind(model, len(inputs))
        labels = model.labels
        return [tagged(e.words, logprobs, labels) for e, logprobs in
                await self._encode_texts(model, "tag", inputs, field, check)]

    @_counted
    async def classify(self, model: LoadedModel, inputs: Sequence[Input | None],
                       field: str = "inputs") -> list[Classified]:
        _bind(model, len(inputs))
        labels = model.labels
        return [Classified(labels, logprobs)
                for _, logprobs in await self._encode_texts(model, "classify", inputs, field)]

    async def _encode_texts(self, model: LoadedModel, task: str,
                            inputs: Sequence[Input | None], field: str,
                            check: Check | None = None) -> list[tuple[Encoded, np.ndarray]]:
        if model.task != task:
            model = self.model(model.name, model.version, task)  # raises, naming the task
        config = self.config
        encoded = await self.off_loop_if_large(
            inputs, encode_all, inputs, model.vocab, field, config.max_sequences_per_request,
            config.max_tokens_per_sequence)
        if check is not None:
            check(encoded)
        with model.scheduler.admit(len(encoded)), model.in_use():
            results = await _gather(*(operations.run_chunks(
                model, e.ids, model.initial_state(), None, config.chunk_tokens)
                for e in encoded))
        self.metrics.tokens.labels(model.label, TOKEN_KINDS[task]).inc(
            sum(len(e.ids) for e in encoded))
        return [(e, r.outputs) for e, r in zip(encoded, results, strict=True)]

    # -- completion -----------------------------------------------------------------------
    @_counted
    async def complete(self, model: LoadedModel, prompt: Input | None, *, max_tokens: int = 0,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       n: int = 0, seed: int | None = None, stop: Sequence[str] = (),
                       stop_token_ids: Sequence[int] = (), top_logprobs: int = 0,
                       top_field: str = "top_logprobs") -> CompletionStream:
        """Streamed samples of continuations of `prompt` (None or empty: a new sentence).
        max_tokens 0 means the server's default, n 0 means one sample, temperature 0 is
        greedy, top_k 0 and top_p 1 are no limit; without a seed one is drawn. With
        `top_logprobs` N each token event also carries the N most likely tokens of the
        distribution it was drawn from (raw model log-probs, as its own). Everything is
        checked, and the prompt read, before the stream is returned; the request counts
        in the model's statistics until the stream ends."""
        started = time.perf_counter()
        if model.task != "lm":
            model = self.model(model.name, model.version, "lm")
        _bind(model, max(n, 1))
        params = self.check_completion(model, max_tokens=max_tokens, temperature=temperature,
                                       top_k=top_k, top_p=top_p, n=n, seed=seed, stop=stop,
                                       stop_token_ids=stop_token_ids,
                                       top_logprobs=top_logprobs, top_field=top_field)
        ids = encode(prompt, model.vocab, self.config.max_tokens_per_sequence,
                     allow_empty=True, optional=True).ids
        # admitted whole: all its samples, held until the decoding loop ends, except while
        # it waits for its reader (a client that stops reading takes no room meanwhile; it
        # is readmitted, never refused, when the reader goes on)
        admitted = [model.scheduler.admit(params.samples)]
        try:
            model.acquire()  # released when the decoding loop ends, however it ends
        except BaseException:
            admitted[0].release()
            raise
        try:
            start = await operations.read_prompt(model, ids, self.config.chunk_tokens)
            self.metrics.tokens.labels(model.label, "prompt").inc(len(ids))
            active = [Sample(i, make_rng(params.seed, i), start.state, start.next_logprobs,
                             params.sampling, params.top) for i in range(params.samples)]

            def produce(emit) -> Awaitable[None]:
                async def emit_or_give_way(event) -> None:
                    if not stream.full():
                        return await emit(event)
                    admitted[0].release()
                    await emit(event)  # until the reader takes an event
                    admitted[0] = model.scheduler.readmit(params.samples)

                return decode(model, params, active, emit_or_give_way, self.metrics,
                              self.closing, started)

            stream = CompletionStream(produce, WRITE_AHEAD * params.samples)
        except BaseException:
            model.release()
            admitted[0].release()
            raise
        stream.add_done_callback(model.release)
        stream.add_done_callback(lambda: admitted[0].release())
        timing = current_timing.get()
        if timing is not None:  # counted until the stream ends
            timing.detached = True
            stream.add_done_callback(lambda: timing.finish(stream.failure()))
        return stream

    def check_completion(self, model: LoadedModel, *, max_tokens: int = 0,
                         temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                         n: int = 0, seed: int | None = None, stop: Sequence[str] = (),
                         stop_token_ids: Sequence[int] = (), top_logprobs: int = 0,
                         top_field: str = "top_logprobs") -> CompletionParams:
        """A completion's settings, checked as `complete` checks them (raising what it
        would), for an adapter that answers without a completion (an echo alone)."""
        config, vocab = self.config, model.vocab
        self._check_top_logprobs(top_logprobs, top_field)
        if not math.isfinite(temperature) or temperature < 0:
            raise InvalidArgument("temperature", f"must be >= 0 (0 is greedy), got "
                                  f"{temperature}")
        if top_k < 0:
            raise InvalidArgument("top_k", f"must be >= 0 (0 is no limit), got {top_k}")
        if top_k > len(vocab):
            raise InvalidArgument("top_k", f"{top_k} exceeds the vocabulary size "
                                  f"{len(vocab)}")
        if not 0.0 < top_p <= 1.0:
            raise InvalidArgument("top_p", f"must be in (0, 1], got {top_p}")
        if max_tokens < 0:
            raise InvalidArgument("max_tokens", f"must be >= 0, got {max_tokens}")
        max_tokens = max_tokens or config.default_completion_tokens
        if max_tokens > config.max_completion_tokens:
            raise LimitExceeded("max_completion_tokens", max_tokens,
                                config.max_completion_tokens, "max_tokens")
        if n < 0:
            raise InvalidArgument("n", f"must be >= 0, got {n}")
        samples = n or 1
        if samples > config.max_samples:
            raise LimitExceeded("max_samples", samples, config.max_samples, "n")
        if len(stop_token_ids) > len(vocab):
            raise InvalidArgument("stop_token_ids", f"{len(stop_token_ids)} ids, more than "
                                  f"the vocabulary's {len(vocab)}")
        # as Python ints first: an id past int64 would overflow numpy's conversion
        stop_ids = np.asarray([i if 0 <= i < len(vocab) else -1 for i in stop_token_ids],
                              np.int64)
        if (bad := np.flatnonzero(stop_ids < 0)).size:
            i = int(bad[0])
            raise InvalidArgument(f"stop_token_ids[{i}]", f"token id "
                                  f"{shown(str(stop_token_ids[i]), quote=False)} is out of "
                                  f"range [0, {len(vocab)})")
        if len(stop) > config.max_stop_strings:
            raise LimitExceeded("max_stop_strings", len(stop), config.max_stop_strings, "stop")
        for i, text in enumerate(stop):
            if not text:
                raise InvalidArgument(f"stop[{i}]", "stop strings must not be empty")
            if len(text) > config.max_stop_string_chars:
                raise LimitExceeded("max_stop_string_chars", len(text),
                                    config.max_stop_string_chars, f"stop[{i}]")
        return CompletionParams(
            SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p), max_tokens,
            samples, secrets.randbits(63) if seed is None else seed, tuple(stop),
            frozenset(stop_token_ids), top_logprobs)

    # -- sessions -------------------------------------------------------------------------
    @_counted
    async def create_session(self, model: LoadedModel, prefix: Input | None = None,
                             top_k: int = 0, client: str = "",
                             check: Check | None = None,
                             with_next_logprobs: bool = False) -> SessionStep:
        """A session on `model` after reading `prefix` (optional). `client` names who holds
        it, for max_sessions_per_client. `with_next_logprobs`: the step carries the whole
        next-token distribution (SessionStep.next_logprobs), for a language model."""
        if (why_not := model.sessions_allowed) is not None:
            raise InvalidArgument("model", why_not)
        encoded = self._encode_step(model, prefix, top_k, True, "prefix", check)
        with self._admit(model, encoded), model.in_use():
            if model.task == "lm":
                state, next_logprobs = model.start_state, model.start_logprobs
                resume_state, last_token = model.initial_state(), model.vocab.eos_id
            else:
                state, next_logprobs = model.initial_state(), None
                resume_state, last_token = state, -1
            if self.token_keys is None:  # no state tokens: nothing to keep for them
                resume_state, last_token = None, -1
            session = self.sessions.create(model, state, next_logprobs, resume_state,
                                           last_token, client=client)
            return await self._first_step(session, encoded, top_k, None,
                                          with_next_logprobs)

    @_counted
    async def create_session_from(self, state_token: bytes, prefix: Input | None = None,
                                  top_k: int = 0, client: str = "",
                                  check: Check | None = None, model_name: str = "",
                                  version: int = 0) -> SessionStep:
        """A new session (a new id) starting where the token's session was when the token
        was issued, open or not: a fork, or a closed session continued on purpose.
        `model_name`/`version`, if given, must be the token's."""
        snapshot = self._open(state_token)
        if model_name and (model_name, version or snapshot.version) != (snapshot.model,
                                                                        snapshot.version):
            raise InvalidArgument("model", f"the state_token is for {snapshot.model}/"
                                  f"{snapshot.version}, not {shown(model_name)}/{version}")
        model = self._resumable_on(snapshot)
        encoded = self._encode_step(model, prefix, top_k, True, "prefix", check)
        with self._admit(model, encoded), model.in_use():
            state, next_logprobs = await self._resumed_state(model, snapshot)
            session = self.sessions.create(model, state, next_logprobs, snapshot.state,
                                           snapshot.last_token, position=snapshot.position,
                                           client=client)
            return await self._first_step(session, encoded, top_k, None)

    @_counted
    async def append(self, session_id: str, item: Input | None, top_k: int = 0,
                     state_token: bytes = b"", allow_empty: bool = False,
                     field: str = "input", client: str = "",
                     check: Check | None = None,
                     with_next_logprobs: bool = False) -> SessionStep:
        """Reads `item` into the session: held here, or resumed from its state token.
        `allow_empty`: no input (or an empty one) reads nothing and answers where the
        session is. Everything is checked before the session changes.
        `with_next_logprobs`: as create_session's.

        A state token continues its session only from where the token was issued: if the
        session is held here at another position, the token is stale (FAILED_PRECONDITION
        STATE_TOKEN_STALE; the session is not rewound), and a session closed here is not
        brought back by its old token (SESSION_CLOSED). Resumed elsewhere (another replica,
        after a restart, an eviction or its expiry), the session keeps its id."""
        if not state_token:
            if not session_id:
                raise InvalidArgument("session_id", "required (the session's id, or a "
                                      "state_token to resume it from)")
            session = self.sessions.get(session_id, touch=False)
            encoded = self._encode_step(session.model, item, top_k, allow_empty, field,
                                        check)
            with self._admit(session.model, encoded), session.model.in_use():
                return await self._append(session, encoded, top_k, None,
                                          with_next_logprobs)
        snapshot = self._open(state_token)
        if session_id and session_id != snapshot.session_id:
            raise InvalidArgument("state_token", f"is for session "
                                  f"{shown(snapshot.session_id)}, not {shown(session_id)}")
        if (held := self.sessions.peek(snapshot.session_id)) is not None:
            self._check_current(held, snapshot)
            session = self.sessions.get(held.id, touch=False)
            encoded = self._encode_step(session.model, item, top_k, allow_empty, field,
                                        check)
            with self._admit(session.model, encoded), session.model.in_use():
                return await self._append(session, encoded, top_k, snapshot.position,
                                          with_next_logprobs)
        if self.sessions.was_closed(snapshot.session_id):
            raise FailedPrecondition("state_token", f"session {shown(snapshot.session_id)} "
                                     "was closed on this server; its token does not reopen "
                                     "it", "SESSION_CLOSED")
        model = self._resumable_on(snapshot)
        encoded = self._encode_step(model, item, top_k, allow_empty, field, check)
        with self._admit(model, encoded), model.in_use():
            state, next_logprobs = await self._resumed_state(model, snapshot)
            try:
                session = self.sessions.create(model, state, next_logprobs, snapshot.state,
                                               snapshot.last_token, snapshot.session_id,
                                               snapshot.position, client)
            except SessionLive as live:  # resumed by another request meanwhile
                self._check_current(live.session, snapshot)
                return await self._append(live.session, encoded, top_k, snapshot.position,
                                          with_next_logprobs)
            return await self._first_step(session, encoded, top_k, snapshot.position,
                                          with_next_logprobs)

    async def fork_session(self, session_id: str, top_k: int = 0,
                           client: str = "") -> SessionStep:
        """A new session (a new id) at the position of the held session `session_id`,
        with a copy of its state, after the appends to it that arrived before this call;
        the source is not changed (not even its idle time). A copy of the state and no
        compute: as cheap as the state is small. `client` holds the fork, for
        max_sessions_per_client."""
        if not session_id:
            raise InvalidArgument("session_id", "required")
        source = self.sessions.get(session_id, touch=False)
        self._check_top_k(top_k, source.model)
        note_model(source.model.name)
        async with source.lock:  # in order with the appends to it
            source = self.sessions.get(session_id, touch=False)  # it may have gone
            session = self.sessions.create(source.model, source.state, source.next_logprobs,
                                           source.resume_state, source.last_token,
                                           position=source.position, client=client)
        with source.model.in_use():
            return await self._first_step(session, Encoded(np.zeros(0, np.int64), [], 0),
                                          top_k, None)

    def close_session(self, session_id: str) -> None:
        if not session_id:
            raise InvalidArgument("session_id", "required")
        if (held := self.sessions.peek(session_id)) is not None:
            note_model(held.model.name)
            held.model.scheduler.returning.forget(session_id)  # not expected back
        self.sessions.close(session_id)

    def end_session(self, session_id: str, generation: int) -> None:
        """Ends a session held for a stream's life (the stream created or resumed it): not
        a close, so its last token still resumes it here; and only that incarnation of
        the id, never a session resumed anew under it by someone else meanwhile."""
        self.sessions.discard(session_id, generation)

    def has_session(self, session_id: str) -> bool:
        return session_id in self.sessions

    def session_model(self, session_id: str, field: str = "session_id") -> LoadedModel:
        """The model a held session runs on (NotFound saying why it is not held, naming
        `field`)."""
        return self.sessions.get(session_id, field, touch=False).model

    def on_session_removed(self, callback: Callable[[str], None]) -> None:
        """`callback(session_id)` whenever a session leaves the table, however it leaves
        (for adapters that map their own ids onto sessions)."""
        self.sessions.on_remove.append(callback)

    def _admit(self, model: LoadedModel, encoded: Encoded) -> Admission:
        """A session step's admission: a multi-token language-model step with state tokens
        runs two rows (the state before its last token too)."""
        two = self.token_keys is not None and model.task == "lm" and len(encoded.ids) > 1
        return model.scheduler.admit(2 if two else 1)

    def _encode_step(self, model: LoadedModel, item: Input | None, top_k: int,
                     allow_empty: bool, field: str, check: Check | None) -> Encoded:
        _bind(model)
        self._check_top_k(top_k, model)
        encoded = encode(item, model.vocab, self.config.max_tokens_per_sequence,
                         allow_empty=allow_empty, optional=allow_empty, field=field)
        if check is not None:
            check([encoded])
        return encoded

    @staticmethod
    def _check_current(held: Session, snapshot: Snapshot) -> None:
        """A token for a session held here must be for where the session is now."""
        if (held.model.name, held.model.version) != (snapshot.model, snapshot.version):
            raise FailedPrecondition("state_token", f"session {shown(held.id)} is held here "
                                     f"on {held.model.label}, not {snapshot.model}/"
                                     f"{snapshot.version}", "STATE_TOKEN_STALE")
        if held.position != snapshot.position:
            raise FailedPrecondition(
                "state_token", f"is for position {snapshot.position} of session "
                f"{shown(held.id)}, which is held here at position {held.position}; "
                "append by session_id to continue it (the session is not rewound)",
                "STATE_TOKEN_STALE")

    def _open(self, token: bytes) -> Snapshot:
        if self.token_keys is None:
            raise FailedPrecondition("state_token", "this server has no state token keys "
                                     "(--state-token-keys), so it cannot resume sessions",
                                     "STATE_TOKENS_DISABLED")
        try:
            return self.token_keys.open(token)
        except TokenRejected as rejected:
            if rejected.precondition:
                raise FailedPrecondition("state_token", str(rejected),
                                         "STATE_TOKEN_UNUSABLE") from None
            raise InvalidArgument("state_token", str(rejected)) from None

    def _resumable_on(self, snapshot: Snapshot) -> LoadedModel:
        """The model a token's session resumes on, checked against the token (no
        compute)."""
        try:
            model = self.repository.get(snapshot.model, snapshot.version)
        except (InvalidArgument, NotFound):
            raise FailedPrecondition(
                "state_token", f"is for model {snapshot.model}/{snapshot.version}, "
                "which this server does not serve", "STATE_TOKEN_UNUSABLE") from None
        if (why_not := model.sessions_allowed) is not None:
            raise FailedPrecondition("state_token", why_not, "STATE_TOKEN_UNUSABLE")
        expected = model.runtime.artifact.state_shape
        if snapshot.state.shape != tuple(expected) or (
                model.task == "lm") != (snapshot.last_token >= 0):
            raise FailedPrecondition("state_token", f"holds a state of shape "
                                     f"{snapshot.state.shape}; {model.label} has {expected}",
                                     "STATE_TOKEN_UNUSABLE")
        if model.task == "lm" and snapshot.last_token >= len(model.vocab):
            raise FailedPrecondition("state_token", "holds a token outside the vocabulary",
                                     "STATE_TOKEN_UNUSABLE")
        return model

    async def _resumed_state(self, model: LoadedModel, snapshot: Snapshot
                             ) -> tuple[np.ndarray, np.ndarray | None]:
        if model.task != "lm":
            return snapshot.state, None
        step = await operations.resume(model, snapshot.state, snapshot.last_token)
        return step.state, step.next_logprobs

    async def _first_step(self, session: Session, encoded: Encoded, top_k: int,
                          expected: int | None, with_next_logprobs: bool = False) -> SessionStep:
        """The first step of a session this call put in the table: if it fails, the
        session goes again, so a refused request leaves nothing behind."""
        try:
            step = await self._append(session, encoded, top_k, expected, with_next_logprobs)
        except BaseException:
            if self.sessions.peek(session.id) is session:
                self.sessions.discard(session.id)
            raise
        step.opened = True
        return step

    async def _append(self, session: Session, encoded: Encoded, top_k: int,
                      expected: int | None, with_next_logprobs: bool = False) -> SessionStep:
        """Reads `encoded` into the session, one Append at a time; `expected`: the
        position the request's state token was issued at; `with_next_logprobs`: the step carries
        a copy of the next-token log-probs (the session's own array changes with it)."""
        model = session.model
        async with session.lock:
            current = self.sessions.get(session.id)  # it may have gone while waiting
            if current is not session:  # removed, then resumed anew under its id
                return await self._append(current, encoded, top_k, expected, with_next_logprobs)
            if expected is not None and session.position != expected:
                raise FailedPrecondition(
                    "state_token", f"is for position {expected} of session "
                    f"{shown(session.id)}, which another request moved to position "
                    f"{session.position}", "STATE_TOKEN_STALE")
            read_at = session.position
            position = read_at + len(encoded.ids)
            result = SessionStep(session.id, ModelId(model.name, model.version), position,
                                 encoded.unknown, generation=session.generation)
            next_logprobs = session.next_logprobs
            resume_state, last_token = session.resume_state, session.last_token
            if len(encoded.ids):
                keep = self.token_keys is not None and model.task == "lm"
                if read_at == 0 and model.task == "lm":  # from the start: the prefix cache's
                    step = await operations.read_prompt(model, encoded.ids,
                                                        self.config.chunk_tokens)
                else:
                    step = await operations.advance(model, session.state,
                                                    session.next_logprobs, encoded.ids,
                                                    self.config.chunk_tokens, keep,
                                                    key=session.id)
                if self.token_keys is None:
                    pass  # no state tokens: nothing to keep for them
                elif model.task == "lm":
                    resume_state, last_token = step.previous, int(encoded.ids[-1])
                else:
                    resume_state = step.state
                # Stored only if the table still holds this session where it was read
                # (appends hold its lock, so only a removal meanwhile refuses it: the
                # Append still answers, and its state token resumes from it).
                self.sessions.update(session, read_at, step.state, step.next_logprobs,
                                     len(encoded.ids), resume_state, last_token)
                self.metrics.tokens.labels(model.label, TOKEN_KINDS[model.task]).inc(
                    len(encoded.ids))
                _describe(result, model, encoded, step.outputs)
                next_logprobs = step.next_logprobs
            if model.task == "lm":
                tokens = model.vocab.texts
                result.next_tokens = [(i, tokens[i], lp)
                                      for i, lp in most_likely(next_logprobs, top_k)]
                if with_next_logprobs:
                    result.next_logprobs = np.array(next_logprobs, np.float32)
            if self.token_keys is not None and resume_state is not None:
                result.state_token = self.token_keys.seal(Snapshot(
                    model.name, model.version, position, resume_state, last_token,
                    session.id))
            if self.sessions.peek(session.id) is session:  # still open: it may step again
                model.scheduler.answered(session.id)
            return result

    @staticmethod
    def _check_top_k(top_k: int, model: LoadedModel) -> None:
        if top_k < 0:
            raise InvalidArgument("top_k", f"must be >= 0, got {top_k}")
        if top_k > len(model.vocab):
            raise InvalidArgument("top_k", f"{top_k} exceeds the vocabulary size "
                                  f"{len(model.vocab)}")

    # -- model control (the Open Inference Protocol's repository extension) ---------------
    async def repository_index(self) -> list[ModelState]:
        """Every model folder of the repository with its versions' states."""
        return await self.repository.index()

    async def load_model(self, name: str, field: str = "model_name") -> list[str]:
        """(Re)reads model `name` from the repository (model_control only): the versions
        served are replaced by fresh ones, the old ones retire as for a removed version."""
        self._check_model_control()
        loaded = await self.repository.load_model(name, field)
        note_model(name)  # once it is known: a typo makes no metric series
        return loaded

    async def unload_model(self, name: str, field: str = "model_name") -> None:
        """Retires every version of `name` (model_control only), until a load."""
        self._check_model_control()
        await self.repository.unload_model(name, field)
        note_model(name)

    def _check_model_control(self) -> None:
        if not self.config.model_control:
            raise FailedPrecondition("model_control", "loading and unloading models is off on "
                                     "this server (start it with --model-control, "
                                     "RECUR_MODEL_CONTROL=true or model_control = true)",
                                     "MODEL_CONTROL_DISABLED")


def _large(inputs: Sequence[Input | None]) -> bool:
    """Whether tokenizing `inputs` would hold the event loop too long (OFF_LOOP_UNITS)."""
    units = 0
    for item in inputs:
        if item is not None:
            units += (len(item.text) if item.text is not None
                      else len(item.ids) if item.ids is not None else 0)
        if units > OFF_LOOP_UNITS:
            return True
    return False


def _describe(result: SessionStep, model: LoadedModel, encoded: Encoded,
              outputs: np.ndarray) -> None:
    if model.task == "lm":
        logprobs = outputs.tolist()
        result.scored = Scored(encoded.ids.tolist(), list(encoded.words), logprobs,
                               encoded.unknown, math.fsum(logprobs))
    elif model.task == "tag":
        result.tagged = tagged(list(encoded.words), outputs, model.labels)
    else:
        result.classified = Classified(model.labels, outputs)


async def _gather(*awaitables: Awaitable) -> list:
    """Like asyncio.gather, but the first failure cancels the rest (they would only waste
    compute) and is raised as itself."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(a) for a in awaitables]
    except BaseExceptionGroup as errors:
        raise errors.exceptions[0] from None
    return [task.result() for task in tasks]
