"""Portable sessions: every session response carries a state token, and a replica that
does not hold the session (another server, a restart, an eviction) resumes it from the
token with the same log-probs; bad tokens are refused with a reason."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from serving_helpers import RunningServer
from test_server_process import ServeProcess, serve_command

from serving.client import RecurClient
from serving.engine.state_tokens import Snapshot, StateTokenKeys
from serving.proto_gen.recur.v1 import recur_pb2 as pb

WORDS = ["the", "old", "dogs", "that", "the", "cat", "sees", "run", "and", "a", "dog", "sleeps"]
PIECES = [WORDS[:1], WORDS[1:4], WORDS[4:5], WORDS[5:9], WORDS[9:]]  # 1, 3, 1, 4, 3 tokens


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "state-token-keys"
    path.write_text("# newest first\n" + "a" * 32 + "\n")
    return path


@pytest.fixture(scope="module")
def servers(model_repository, key_file):
    """Two replicas sharing the key, like two pods behind one Service."""
    first = RunningServer(model_repository, state_token_keys=str(key_file))
    second = RunningServer(model_repository, state_token_keys=str(key_file))
    yield first, second
    first.stop()
    second.stop()


def uninterrupted(client: RecurClient, model: str = "demo-lm") -> list[pb.SessionResponse]:
    session = client.create_session(model)
    responses = [client.append(session.session_id, " ".join(p)) for p in PIECES]
    client.close_session(session.session_id)
    return responses


def logprobs(responses) -> list[float]:
    return [t.logprob for r in responses for t in r.tokens]


@pytest.mark.parametrize("switch_after", [1, 2, 4])
def test_another_replica_resumes_from_the_token(servers, switch_after):
    first, second = servers
    expected = uninterrupted(first.client)
    session = first.client.create_session("demo-lm")
    assert session.state_token
    responses = [first.client.append(session.session_id, " ".join(p))
                 for p in PIECES[:switch_after]]
    token = responses[-1].state_token
    for piece in PIECES[switch_after:]:  # the second replica never saw this session
        response = second.client.append(session.session_id, " ".join(piece), top_k=3,
                                        state_token=token)
        responses.append(response)
        token = response.state_token
        assert response.session_id == session.session_id
    np.testing.assert_allclose(logprobs(responses), logprobs(expected), atol=1e-5)
    assert [r.position for r in responses] == [r.position for r in expected]
    assert len(responses[-1].next_tokens) == 3


def test_a_session_survives_its_eviction(model_repository, key_file):
    server = RunningServer(model_repository, state_token_keys=str(key_file), max_sessions=1)
    try:
        expected = uninterrupted(server.client)
        session = server.client.create_session("demo-lm")
        response = server.client.append(session.session_id, " ".join(PIECES[0]))
        server.client.create_session("demo-lm")  # evicts the first
        with pytest.raises(grpc.RpcError) as gone:
            server.client.append(session.session_id, " ".join(PIECES[1]))
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        resumed = server.client.append(session.session_id, " ".join(PIECES[1]),
                                       state_token=response.state_token)
        np.testing.assert_allclose(logprobs([response, resumed]), logprobs(expected[:2]),
                                   atol=1e-5)
    finally:
        server.stop()


def test_an_incremental_tagger_session_resumes(servers):
    first, second = servers
    expected = uninterrupted(first.client, "tagger-uni")
    session = first.client.create_session("tagger-uni")
    head = first.client.append(session.session_id, " ".join(PIECES[0]))
    tail = [second.client.append(session.session_id, " ".join(PIECES[1]),
                                 state_token=head.state_token)]
    got = [(t.tag, t.logprob) for r in [head, *tail] for t in r.tags]
    want = [(t.tag, t.logprob) for r in expected[:2] for t in r.tags]
    assert [g[0] for g in got] == [w[0] for w in want]
    np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], atol=1e-5)


def rejection(client: RecurClient, session_id: str, token: bytes) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        client.append(session_id, "the dog", state_token=token)
    return caught.value


def test_bad_tokens_are_refused_with_a_reason(servers, model_repository, key_file):
    first, second = servers
    session = first.client.create_session("demo-lm", prefix="the old dogs")
    token = session.state_token
    cases = {
        "tampered": (token[:60] + bytes([token[60] ^ 1]) + token[61:],
                     grpc.StatusCode.INVALID_ARGUMENT, "failed authentication"),
        "truncated": (token[:-5], grpc.StatusCode.INVALID_ARGUMENT, "failed authentication"),
        "garbage": (b"\x00" * 10, grpc.StatusCode.INVALID_ARGUMENT, "not a state token"),
        # a key retired since (or another deployment's): genuine perhaps, so not the
        # request's fault
        "unknown key": (StateTokenKeys([b"z" * 32], 60).seal(Snapshot(
            "demo-lm", 1, 3, np.zeros((1, 128), np.float32), 5, session.session_id)),
            grpc.StatusCode.FAILED_PRECONDITION, "key this server does not hold"),
        "other model": (StateTokenKeys.from_file(key_file, 60).seal(Snapshot(
            "no-such-model", 1, 3, np.zeros((1, 128), np.float32), 5, session.session_id)),
            grpc.StatusCode.FAILED_PRECONDITION, "no-such-model/1, which this server does not"),
        "wrong state": (StateTokenKeys.from_file(key_file, 60).seal(Snapshot(
            "demo-lm", 1, 3, np.zeros((1, 7), np.float32), 5, session.session_id)),
            grpc.StatusCode.FAILED_PRECONDITION, "holds a state of shape (1, 7)"),
    }
    for name, (bad, code, message) in cases.items():
        error = rejection(second.client, session.session_id, bad)
        assert error.code() == code, name
        assert error.details().startswith("state_token: ") and message in error.details(), (
            name, error.details())
    other = rejection(second.client, "another-session", token)
    assert other.code() == grpc.StatusCode.INVALID_ARGUMENT and "is for session" in (
        other.details())
    # a genuine token still works afterwards, on both replicas
    assert second.client.append(session.session_id, "run", state_token=token).position == 4
    assert first.client.append(session.session_id, "run").position == 4


def test_expired_tokens_and_servers_without_keys_refuse(model_repository, key_file):
    server = RunningServer(model_repository, state_token_keys=str(key_file),
                           state_token_ttl_s=0.0)
    plain = RunningServer(model_repository)
    try:
        session = server.client.create_session("demo-lm")
        time.sleep(1.1)  # tokens carry whole seconds
        error = rejection(server.client, session.session_id, session.state_token)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "expired" in error.details()
        unsigned = plain.client.create_session("demo-lm")
        assert unsigned.state_token == b""
        error = rejection(plain.client, unsigned.session_id, session.state_token)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no state token keys" in error.details()
    finally:
        server.stop()
        plain.stop()


def test_converse_resumes_from_a_token_and_ends_a_shutdown_with_one(model_repository,
                                                                    key_file):
    server = RunningServer(model_repository, state_token_keys=str(key_file), grace_s=1.0)
    try:
        expected = uninterrupted(server.client)
        head = server.client.create_session("demo-lm", prefix=" ".join(PIECES[0]))
        gate = threading.Event()

        def requests():
            yield pb.ConverseRequest(state_token=head.state_token,
                                     input=pb.Input(text=" ".join(PIECES[1])))
            gate.wait(10)  # hold the stream open until the server shuts down

        stream = server.client.language_model.Converse(requests(), timeout=30)
        first = next(stream)
        assert first.session_id == head.session_id and first.position == 4
        np.testing.assert_allclose(logprobs([head, first]), logprobs(expected[:2]), atol=1e-5)
        stopper = threading.Thread(target=lambda: server.call(server.server.stop(1.0)))
        stopper.start()
        last = next(stream)  # before the stream ends: where to resume
        assert last.state_token and last.position == first.position and not last.tokens
        with pytest.raises(grpc.RpcError) as cut:
            next(stream)
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        gate.set()
        stopper.join(10)
    finally:  # the server was stopped above; only its loop remains
        server.channel.close()
        server.loop.call_soon_threadsafe(server.loop.stop)
        server.thread.join(10)
        server.loop.close()


def test_a_killed_server_is_resumed_by_a_new_process(model_repository, key_file):
    command = serve_command(model_repository, "--state-token-keys", str(key_file))
    process = ServeProcess(command)
    try:
        with RecurClient(process.target) as client:
            session = client.create_session("demo-lm")
            head = [client.append(session.session_id, " ".join(p)) for p in PIECES[:2]]
    finally:
        process.process.send_signal(signal.SIGKILL)
        process.stop()
    replacement = ServeProcess(command)
    try:
        with RecurClient(replacement.target) as client:
            token, tail = head[-1].state_token, []
            for piece in PIECES[2:]:
                tail.append(client.append(session.session_id, " ".join(piece),
                                          state_token=token))
                token = tail[-1].state_token
            expected = uninterrupted(client)
    finally:
        replacement.stop()
    np.testing.assert_allclose(logprobs(head + tail), logprobs(expected), atol=1e-5)


def test_a_bad_key_file_stops_the_server_with_a_message(model_repository, tmp_path):
    short = tmp_path / "keys"
    short.write_text("tooshort\n")
    done = subprocess.run([sys.executable, "-m", "recur", "serve", "--model-repository",
                           str(model_repository), "--port", "0", "--metrics-port", "-1",
                           "--state-token-keys", str(short)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1
    assert "key 1 is 8 bytes; at least 16 are needed" in done.stderr
