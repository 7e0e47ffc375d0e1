"""Trust: no acknowledged work is lost, no small request costs much, no admitted request
fails halfway. Each test is one way this went wrong before (tried as an attacker or an
unlucky operator would), against real servers on 127.0.0.1."""

from __future__ import annotations

import concurrent.futures
import struct
import time
import tracemalloc

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import given, settings
from hypothesis import strategies as st
from serving_helpers import RunningServer

from serving.api.inference_v2 import tensors
from serving.engine.decoding import Sample, Stops
from serving.engine.metrics import Metrics
from serving.engine.sessions import SessionStore
from serving.model.sampler import SamplingParams, make_rng, sample_batch, sample_next
from serving.model.tokenizer import Normalization, Vocabulary
from serving.proto_gen.inference import grpc_service_pb2 as v2
from serving.proto_gen.inference import grpc_service_pb2_grpc as v2_grpc
from serving.proto_gen.recur.v1 import recur_pb2 as pb
from serving.proto_gen.recur.v1 import recur_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys"
    path.write_text("k" * 32 + "\n")
    return path


@pytest.fixture(scope="module")
def server(model_repository, key_file):
    running = RunningServer(model_repository, state_token_keys=str(key_file))
    yield running
    running.stop()


def error_of(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value


def reason_of(error: grpc.RpcError) -> str:
    for detail in rpc_status.from_call(error).details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


# -- 1. a session changes only by compare-and-set -------------------------------------------

def test_an_old_token_does_not_rewind_a_live_session(server):
    client = server.client
    session = client.create_session("demo-lm", prefix="the old dogs")
    old_token = session.state_token
    moved = client.append(session.session_id, "run to the")
    error = error_of(client.append, session.session_id, "cat", state_token=old_token)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
    assert reason_of(error) == "STATE_TOKEN_STALE"
    assert f"held here at position {moved.position}" in error.details()
    # the session is where the acknowledged Append left it, for every holder of its id
    after = client.append(session.session_id, "cat")
    assert after.position == moved.position + 1
    # the token of where it is now continues it
    assert client.append("", "and", state_token=after.state_token).position == after.position + 1


def test_concurrent_appends_by_id_and_by_token_lose_nothing(server):
    """Every acknowledged Append counts: the final position is the sum of what was
    acknowledged, whatever stale tokens were sent meanwhile."""
    client = server.client
    session = client.create_session("demo-lm", prefix="the")
    stale = session.state_token
    acknowledged = []

    def by_id(i: int):
        return client.append(session.session_id, ["the dog runs", "a cat"][i % 2])

    def by_stale_token(_):
        try:
            return client.append(session.session_id, "dogs", state_token=stale)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
            return None

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(by_id, i) for i in range(12)]
        futures += [pool.submit(by_stale_token, i) for i in range(12)]
        for future in futures:
            if (result := future.result()) is not None:
                acknowledged.append(result)
    # a stale-token Append lands only while the session is still at the token's position
    positions = sorted(r.position for r in acknowledged)
    assert len(set(positions)) == len(positions), "two Appends acknowledged one position"
    final = client.append(session.session_id, "x")
    # every acknowledged token is in the session: none was overwritten
    assert final.position == 1 + sum(len(r.tokens) for r in acknowledged) + 1


def test_a_closed_session_is_not_brought_back_by_its_token(server):
    client = server.client
    session = client.create_session("demo-lm", prefix="the old dogs")
    client.close_session(session.session_id)
    error = error_of(client.append, session.session_id, "run", state_token=session.state_token)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(error) == "SESSION_CLOSED"
    error = error_of(client.append, session.session_id, "run")
    assert error.code() == grpc.StatusCode.NOT_FOUND and reason_of(error) == "SESSION_CLOSED"
    # asked for on purpose, a new session starts from the token
    fork = client.create_session("", "run", state_token=session.state_token)
    assert fork.session_id != session.session_id and fork.position == session.position + 1
    again = client.create_session("demo-lm", "run", state_token=session.state_token)
    np.testing.assert_allclose([t.logprob for t in again.tokens],
                               [t.logprob for t in fork.tokens], atol=1e-6)
    error = error_of(client.create_session, "endless", state_token=session.state_token)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_refused_append_by_token_leaves_nothing_behind(model_repository, key_file):
    """A token for a session this server does not hold, with a bad input: refused before
    the session is resumed."""
    first = RunningServer(model_repository, state_token_keys=str(key_file))
    second = RunningServer(model_repository, state_token_keys=str(key_file))
    try:
        session = first.client.create_session("demo-lm", prefix="the old dogs")
        error = error_of(second.client.append, session.session_id, [10 ** 6],
                         state_token=session.state_token)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "input.token_ids.ids[0]" in error.details()
        assert not second.server.engine.has_session(session.session_id)
    finally:
        first.stop()
        second.stop()


def test_a_stream_closes_only_the_session_it_opened(server):
    client = server.client
    held = client.create_session("demo-lm", prefix="the old dogs")
    stub = pb_grpc.LanguageModelStub(server.channel)
    responses = list(stub.Converse(iter([
        pb.ConverseRequest(state_token=held.state_token, input=pb.Input(text="run")),
        pb.ConverseRequest(input=pb.Input(text="to")),
    ]), timeout=30))
    assert [r.position for r in responses] == [held.position + 1, held.position + 2]
    # still open for its owner, where the stream left it
    assert client.append(held.session_id, "the").position == held.position + 3
    # a session the stream created goes with it, but is not closed: a client whose
    # stream broke resumes from its last token, here as on any replica
    created = list(stub.Converse(iter([pb.ConverseRequest(
        model=pb.ModelRef(name="demo-lm"), input=pb.Input(text="the"))]), timeout=30))
    assert not server.server.engine.has_session(created[0].session_id)
    resumed = client.append(created[0].session_id, "dog", state_token=created[0].state_token)
    assert resumed.position == created[0].position + 1


def test_append_without_a_session_id_names_the_field(server):
    stub = pb_grpc.LanguageModelStub(server.channel)
    error = error_of(stub.Append, pb.AppendRequest(), timeout=10)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("session_id: required")


# -- 2, 3. V2 sequences: checked whole, per model, forgotten with their sessions -------------

def text_request(model: str, text: str, **parameters) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name=model)
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append(tensors.encode_bytes([text.encode()]))
    for key, value in parameters.items():
        if isinstance(value, bool):
            request.parameters[key].bool_param = value
        elif isinstance(value, int):
            request.parameters[key].uint64_param = value
        else:
            request.parameters[key].string_param = value
    return request


def count_of(response: v2.ModelInferResponse) -> int:
    index = [o.name for o in response.outputs].index("TOKEN_COUNT")
    return int(np.frombuffer(response.raw_output_contents[index], "<i8")[0])


def test_sequence_ids_are_per_model(server):
    stub = v2_grpc.GRPCInferenceServiceStub(server.channel)
    stub.ModelInfer(text_request("demo-lm", "the old", sequence_id=7, sequence_start=True))
    stub.ModelInfer(text_request("endless", "a", sequence_id=7, sequence_start=True))
    # sequence 7 of demo-lm goes on where it was, untouched by endless's sequence 7
    response = stub.ModelInfer(text_request("demo-lm", "dogs run", sequence_id=7))
    assert count_of(response) == 2 and response.parameters["state_token"].string_param
    assert len({sid for (_, seq), sid in _sequences(server).items() if seq == "7"}) == 2
    for model in ("demo-lm", "endless"):
        stub.ModelInfer(text_request(model, "", sequence_id=7, sequence_end=True))
    assert not [key for key in _sequences(server) if key[1] == "7"]


def _sequences(server: RunningServer) -> dict:
    """The V2 adapter's sequence map (the adapter listens for removed sessions)."""
    engine = server.server.engine
    service = next(c.__self__ for c in engine.sessions.on_remove if hasattr(c, "__self__"))
    return server.call(_copy(service.sequences))


async def _copy(mapping: dict) -> dict:
    return dict(mapping)


def test_a_sequence_is_forgotten_when_its_session_expires(model_repository):
    running = RunningServer(model_repository, session_ttl_s=0.3)
    try:
        stub = v2_grpc.GRPCInferenceServiceStub(running.channel)
        for number in range(1, 6):
            stub.ModelInfer(text_request("demo-lm", "the", sequence_id=f"s{number}",
                                         sequence_start=True))
        assert len(_sequences(running)) == 5
        deadline = time.monotonic() + 10
        while _sequences(running) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _sequences(running) == {}
    finally:
        running.stop()


def test_long_sequence_ids_are_refused(server):
    stub = v2_grpc.GRPCInferenceServiceStub(server.channel)
    error = error_of(stub.ModelInfer, text_request("demo-lm", "the", sequence_id="x" * 129,
                                                   sequence_start=True))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_sequence_id_bytes = 128" in error.details()


@pytest.mark.parametrize("version", ["²", "١", "1x", "-1", "1" * 5000,
                                     "99999999999999999999"])
def test_versions_are_ascii_digits(server, version):
    stub = v2_grpc.GRPCInferenceServiceStub(server.channel)
    request = text_request("demo-lm", "the dog")
    request.model_version = version
    error = error_of(stub.ModelInfer, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("model_version: ")
    # on a stream: an error_message, and the stream goes on
    replies = list(stub.ModelStreamInfer(iter([request, text_request("demo-lm", "the")]),
                                         timeout=30))
    assert replies[0].error_message.startswith("INVALID_ARGUMENT: model_version")
    assert not replies[1].error_message and count_of(replies[1].infer_response) == 2


# -- 4. tiny temperatures ---------------------------------------------------------------------

def test_a_tiny_temperature_is_greedy(server):
    greedy = server.client.complete_text("demo-lm", "the", temperature=0.0, max_tokens=8)
    for tiny in (1e-40, 1e-7):
        assert server.client.complete_text("demo-lm", "the", temperature=tiny, max_tokens=8,
                                           seed=3) == greedy


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.floats(-60, 0), min_size=2, max_size=40),
       st.sampled_from([0.0, 1e-300, 1e-40, 1e-12, 1e-6, 1e-5, 0.01, 1.0, 50.0, 1e30]),
       st.integers(0, 5), st.sampled_from([1.0, 0.5]), st.integers(0, 2 ** 32))
def test_the_sampler_draws_only_possible_tokens(logits, temperature, top_k, top_p, seed):
    """Whatever the temperature, the drawn token has a finite log-prob, and below the
    greedy threshold it is the most likely one; alone and batched alike."""
    raw = np.asarray(logits, np.float32)
    logprobs = raw - np.logaddexp.reduce(raw.astype(np.float64)).astype(np.float32)
    logprobs[len(logprobs) // 2] = -np.inf  # an impossible token
    params = SamplingParams(temperature, top_k, top_p)
    token = sample_next(logprobs, params, make_rng(seed))
    assert np.isfinite(logprobs[token])
    if temperature < 1e-5:
        assert token == int(np.argmax(logprobs))
    batched = sample_batch(np.stack([logprobs, logprobs]), [params, params],
                           [make_rng(seed), make_rng(seed)])
    assert batched.tolist() == [token, token]


# -- 6. declared sizes are checked against the bytes sent ---------------------------------------

def test_a_huge_declared_bytes_tensor_allocates_nothing():
    tensor = v2.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES",
                                                   shape=[1 << 26, 1])
    tracemalloc.start()
    try:
        with pytest.raises(Exception, match="needs at least 268435456"):
            tensors.read_input(tensor, struct.pack("<I", 0), "inputs[0]")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_a_huge_declared_batch_is_refused_before_its_rows_are_read(server):
    request = v2.ModelInferRequest(model_name="demo-lm")
    request.inputs.add(name="TOKEN_IDS", datatype="INT64", shape=[500_000, 1])
    request.raw_input_contents.append(np.full(500_000, 3, "<i8").tobytes())
    channel = grpc.insecure_channel(server.target, options=[
        ("grpc.max_send_message_length", 8 << 20)])
    with channel:
        error = error_of(v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer, request,
                         timeout=30)
    # 4 MB: within the receive limit
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error.details().startswith("inputs[0].shape: 500000 exceeds the server's limit "
                                      "max_sequences_per_request")


def test_a_huge_declared_bytes_tensor_is_refused(server):
    stub = v2_grpc.GRPCInferenceServiceStub(server.channel)
    request = v2.ModelInferRequest(model_name="demo-lm")
    # a batch of 1 (within the limit), 2^26 elements declared, 4 bytes sent
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1, 1 << 26])
    request.raw_input_contents.append(struct.pack("<I", 0))
    error = error_of(stub.ModelInfer, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("inputs[0]: raw contents are 4 bytes")


# -- 7. stop strings ----------------------------------------------------------------------------

@pytest.mark.parametrize("stop, limit", [(["a"] * 17, "max_stop_strings = 16"),
                                         (["x" * 257], "max_stop_string_chars = 256")])
def test_stop_strings_are_capped(server, stop, limit):
    error = error_of(lambda: list(server.client.complete("demo-lm", "the", stop=stop)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and limit in error.details()


WORDS = ["the", "dog", "a", "cat", "runs", "dogs", "ran", "<eos>"]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, len(WORDS) - 2), min_size=1, max_size=30),
       st.lists(st.text("adghenrstuo ", min_size=1, max_size=9), min_size=1, max_size=4),
       st.sampled_from(["word", "char"]))
def test_stop_strings_match_as_the_whole_text_would(ids, stops, level):
    """Matching only where a match can end in the newest token finds the same first stop,
    at the same place, as searching the whole text after every token."""
    vocab = Vocabulary(WORDS, Normalization(level))
    checker = Stops(frozenset(), tuple(stops))
    sample = Sample(0, make_rng(0), np.zeros((1, 1), np.float32),
                    np.zeros(len(WORDS), np.float32), SamplingParams())
    expected = None
    for step in range(len(ids)):
        text = vocab.decode(ids[: step + 1])
        cuts = [text.find(s) for s in stops if s in text]
        if cuts:
            expected = (step, text[: min(cuts)])
            break
    got = None
    for step, token in enumerate(ids):
        if checker.check(sample, token, vocab):
            got = (step, sample.text)
            break
        sample.ids.append(token)
    assert got == expected


# -- 9. work that could not be answered is refused up front --------------------------------------

def test_a_score_whose_answer_could_not_be_sent_is_refused_before_it_runs(server):
    ids = np.random.default_rng(0).integers(2, 50, 20_000).tolist()
    before = server.metric("recur_executed_tokens_total", model="demo-lm/1")
    request = pb.ScoreRequest(model=pb.ModelRef(name="demo-lm"),
                              inputs=[pb.Input(token_ids=pb.TokenIds(ids=ids))] * 100)
    stub = pb_grpc.LanguageModelStub(server.channel)
    error = error_of(stub.Score, request, timeout=60)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "max_message_bytes = 4194304" in error.details()
    assert server.metric("recur_executed_tokens_total", model="demo-lm/1") == before


def test_a_v2_batch_whose_outputs_could_not_be_sent_is_refused_before_it_runs(
        model_repository):
    running = RunningServer(model_repository, max_message_bytes=1 << 20)
    try:
        before = running.metric("recur_executed_tokens_total", model="demo-lm/1")
        request = v2.ModelInferRequest(model_name="demo-lm")
        texts = [("a " * 3000).encode()] * 100  # 600 KB in, 100 x 3002 x 4 bytes out
        request.inputs.add(name="TEXT", datatype="BYTES", shape=[100, 1])
        request.raw_input_contents.append(tensors.encode_bytes(texts))
        stub = v2_grpc.GRPCInferenceServiceStub(running.channel)
        error = error_of(stub.ModelInfer, request, timeout=60)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert "max_message_bytes = 1048576" in error.details()
        assert running.metric("recur_executed_tokens_total", model="demo-lm/1") == before
    finally:
        running.stop()


def test_an_over_long_text_is_refused_without_tokenizing_it(server):
    text = "the dog " * 15_000  # 30,000 words: a word model reads at least 30,000 tokens
    error = error_of(server.client.score, "demo-lm", [text])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at least 20001 tokens exceeds the server's limit max_tokens_per_sequence" in (
        error.details())
    # exactly at the limit is fine
    assert len(server.client.score("demo-lm", ["the dog " * 5_000])[0].tokens) == 10_001


# -- 10. sessions: expiry in order of use, their real size, per-client quotas ---------------------

class FakeModel:
    """A stand-in for a LoadedModel in the session table, which only labels it."""

    label = "m/1"


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.sampled_from(["create", "get", "update", "close"]),
                          st.integers(0, 9)), max_size=80))
def test_expiry_takes_exactly_the_idle_sessions_from_the_front(operations):
    """The table stays in order of last use, so expiry looks only at the front and still
    removes exactly the sessions idle past the TTL."""
    store = SessionStore(1e12, 100, 1 << 30, Metrics())  # nothing idle until the end
    ids: list[str] = []
    clock = [0.0]
    state = np.zeros((1, 4), np.float32)
    for kind, index in operations:
        clock[0] += 1.0
        if kind == "create" or not ids:
            ids.append(store.create(FakeModel(), state, None).id)
            store._sessions[ids[-1]].last_used = clock[0]
            continue
        session_id = ids[index % len(ids)]
        if session_id not in store:
            continue
        if kind == "get":
            store.get(session_id).last_used = clock[0]
        elif kind == "update":
            session = store._sessions[session_id]
            store.update(session, session.position, state, None, 1)
            session.last_used = clock[0]
        else:
            store.close(session_id)
    used = [s.last_used for s in store._sessions.values()]
    assert used == sorted(used)
    cutoff = clock[0] - 9.5  # between two uses: none is exactly at it
    stale = {sid for sid, s in store._sessions.items() if s.last_used < cutoff}
    store.ttl_s = time.monotonic() - cutoff  # sessions older than the cutoff are idle
    removed = store.expire()
    assert removed == len(stale) and not stale & set(store._sessions)


def test_session_bytes_account_for_what_a_session_really_holds(model_repository):
    """Within 25% of the memory the table really takes (measured by tracemalloc)."""
    store = SessionStore(1000.0, 100_000, 1 << 40, Metrics())
    state, logprobs = np.zeros((2, 64), np.float32), np.zeros(50, np.float32)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(2000):
            store.create(FakeModel(), state, logprobs, state.copy(), 3)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert 0.75 * used <= store.bytes <= 1.25 * used, (store.bytes, used)


def test_one_client_cannot_take_everyone_elses_sessions(model_repository, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("a" * 20 + "\n" + "b" * 20 + "\n")
    running = RunningServer(model_repository, auth_tokens=str(tokens),
                            max_sessions_per_client=3)
    try:
        def stub_for(token: str):
            return pb_grpc.LanguageModelStub(running.channel), [("authorization",
                                                                 f"Bearer {token}")]

        greedy, metadata = stub_for("a" * 20)
        request = pb.CreateSessionRequest(model=pb.ModelRef(name="demo-lm"))
        # one token is one client however its header is spelled
        for spelled in ("Bearer ", "bearer ", "BEARER   "):
            greedy.CreateSession(request, metadata=[("authorization", spelled + "a" * 20)],
                                 timeout=10)
        error = error_of(greedy.CreateSession, request, metadata=metadata, timeout=10)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_sessions_per_client=3" in error.details()
        # two authorization entries are no token at all
        twice = [("authorization", "Bearer " + "x" * 20), ("authorization", metadata[0][1])]
        error = error_of(greedy.CreateSession, request, metadata=twice, timeout=10)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        other, other_metadata = stub_for("b" * 20)
        other.CreateSession(request, metadata=other_metadata, timeout=10)  # not refused
    finally:
        running.stop()


# -- 12. admitted whole, or refused before the first response ----------------------------

def small_queue_server(model_repository, **settings) -> RunningServer:
    """Room for 8 sequences in flight a model; both versions of `endless` served."""
    return RunningServer(model_repository, max_queue=8, max_sequences_per_request=8,
                         version_policy="all", **settings)


def endless_completion(n: int, max_tokens: int) -> pb.CompleteRequest:
    """Samples of `endless` version 1, which never ends one before max_tokens."""
    return pb.CompleteRequest(model=pb.ModelRef(name="endless", version=1),
                              prompt=pb.Input(text=""), n=n, max_tokens=max_tokens, seed=1)


def test_completions_are_admitted_whole(model_repository):
    running = small_queue_server(model_repository)
    try:
        stub = pb_grpc.LanguageModelStub(running.channel)
        request = endless_completion(5, 60)
        first = stub.Complete(request, timeout=60)
        next(first)  # admitted: it has started
        refused = stub.Complete(request, timeout=60)
        with pytest.raises(grpc.RpcError) as caught:
            next(refused)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queue=8" in caught.value.details()
        # the admitted one runs to its end: every sample its 60 tokens
        tokens = 1 + sum(1 for r in first if r.HasField("token"))
        assert tokens == 5 * 60
        # and room is given back when it ends
        assert sum(1 for r in stub.Complete(request, timeout=60) if r.HasField("token")) == 300
    finally:
        running.stop()


def test_a_completion_whose_reader_stops_gives_way(model_repository):
    """A completion blocked on a client that does not read takes no room in the queue
    meanwhile, and goes on to its end when the client reads again."""
    running = small_queue_server(model_repository)
    try:
        stub = pb_grpc.LanguageModelStub(running.channel)
        request = endless_completion(5, 1000)
        unread = stub.Complete(request, timeout=120)
        next(unread)
        scheduler = running.server.engine.model("endless", 1).scheduler
        deadline = time.monotonic() + 30
        while scheduler.admitted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scheduler.admitted == 0  # blocked on its reader: it gave its room back
        short = endless_completion(5, 20)
        assert sum(1 for r in stub.Complete(short, timeout=60) if r.HasField("token")) == 100
        assert 1 + sum(1 for r in unread if r.HasField("token")) == 5000
    finally:
        running.stop()


# -- 16. small ones -------------------------------------------------------------------------------

def test_long_echoed_values_do_not_swamp_the_status(server):
    huge = "s" * 20_000
    error = error_of(server.client.append, huge, "the")
    assert error.code() == grpc.StatusCode.NOT_FOUND, error.code()
    assert len(error.details()) < 400 and "(20000 characters)" in error.details()
    stub = v2_grpc.GRPCInferenceServiceStub(server.channel)
    for name in ("m" * 20_000, "\U0001f600" * 5_000):  # non-ASCII: 12 bytes each on the wire
        error = error_of(stub.ModelInfer, text_request(name, "the"))
        assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
        assert len(error.details().encode()) <= 1024


def test_a_passed_deadline_is_counted_as_such(server):
    stub = pb_grpc.LanguageModelStub(server.channel)
    ids = list(range(2, 40)) * 400  # 15,200 tokens x 8, a 3 MB answer: about 0.3 s of work here
    before = server.metric("recur_requests_total", method="Score", code="DEADLINE_EXCEEDED")
    missed = 0
    for attempt in range(10):  # on a fast machine one may finish within its 0.3 s
        request = pb.ScoreRequest(model=pb.ModelRef(name="demo-lm"), inputs=[
            pb.Input(token_ids=pb.TokenIds(ids=[2 + 8 * attempt + k] + ids))
            for k in range(8)])
        try:
            stub.Score(request, timeout=0.3)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error.details()
            missed += 1
            if missed == 2:
                break
    assert missed >= 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        counted = server.metric("recur_requests_total", method="Score",
                                code="DEADLINE_EXCEEDED") - before
        if counted >= 1:
            break
        time.sleep(0.1)
    assert counted >= 1
    assert server.metric("recur_requests_total", method="Score", code="CANCELLED") == 0


def test_an_internal_error_tells_an_id_not_the_exception(server, caplog):
    engine = server.server.engine
    original = engine.score

    async def broken(*args, **kwargs):
        raise RuntimeError("secret detail /etc/passwd")

    engine.score = broken
    try:
        error = error_of(server.client.score, "demo-lm", ["the dog"])
    finally:
        engine.score = original
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in error.details() and "error id " in error.details()
    error_id = error.details().split("error id ")[1].split(";")[0]
    assert any(error_id in r.getMessage() for r in caplog.records)



# -- 8. a stream's memory is bounded by bytes --------------------------------------------------

def test_a_score_stream_reads_ahead_only_its_byte_window(model_repository):
    """Long sequences: the sequence window (256) would let all 40 of them, 2.5 MB of
    results each as counted, pile up unread; the byte window lets one in at a time."""
    running = RunningServer(model_repository, stream_window=256,
                            stream_window_bytes=3_000_000)
    try:
        ids = np.random.default_rng(1).integers(2, 50, 20_000).tolist()
        sent = 0

        def items():
            nonlocal sent
            for number in range(40):
                sent = number + 1
                yield f"r{number}", [ids]

        lead = answered = 0
        for result in running.client.score_stream("demo-lm", items(), timeout=300):
            assert result.id == f"r{answered}"
            answered += 1
            lead = max(lead, sent - answered)
        assert answered == 40
        # one in the server's window, the rest in gRPC's and HTTP/2's buffers in transit
        # (about 200 KB: 10 of these 20 KB requests)
        assert lead <= 15, lead
    finally:
        running.stop()


def test_a_score_stream_waits_for_room_instead_of_failing(model_repository):
    """With the queue held by a completion, a ScoreStream's later messages wait; none
    fails halfway with RESOURCE_EXHAUSTED (one-token chunks: every sequence's later steps
    are submitted while the completion's are queued too)."""
    running = small_queue_server(model_repository, chunk_tokens=1)
    try:
        stub = pb_grpc.LanguageModelStub(running.channel)
        holding = stub.Complete(endless_completion(6, 300), timeout=120)
        next(holding)
        groups = [(f"g{i}", ["the dog runs", "a cat", "the cats ran"]) for i in range(30)]
        results = list(running.client.score_stream("demo-lm", iter(groups), timeout=120))
        assert [r.id for r in results] == [g[0] for g in groups]
        assert all(len(r.scores) == 3 for r in results)
        assert sum(1 for r in holding if r.HasField("token")) == 6 * 300 - 1
    finally:
        running.stop()
