"""ForkSession: a new session at the same position with a copy of the state; the source is
not changed. Over recur.v1 and the HTTP front."""

from __future__ import annotations

import grpc
import httpx
import numpy as np
import pytest
from serving_helpers import RunningServer

from serving.proto_gen.recur.v1 import recur_pb2 as pb


@pytest.fixture(scope="module")
def server(model_repository, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys"
    keys.write_text("f" * 32 + "\n")
    running = RunningServer(model_repository, http_port=0, state_token_keys=str(keys),
                            max_sessions_per_client=4)
    yield running
    running.stop()


def logprobs(step) -> list[float]:
    return [t.logprob for t in step.tokens]


def test_a_fork_continues_where_its_source_is_and_leaves_the_source_alone(server):
    client = server.client
    source = client.create_session("demo-lm", "the old dogs", top_k=3)
    fork = client.fork_session(source.session_id, top_k=3)
    assert fork.session_id != source.session_id and fork.position == source.position == 3
    assert [(t.id, t.logprob) for t in fork.next_tokens] == [(t.id, t.logprob)
                                                              for t in source.next_tokens]
    # branches: each goes its own way from the same state
    fork_steps = [client.append(fork.session_id, text) for text in ("that run", "sees")]
    source_step = client.append(source.session_id, "sleep")
    assert source_step.position == 4 and fork_steps[-1].position == 6
    # the fork's tokens are those of a session that read the same text in one go
    whole = client.create_session("demo-lm", "the old dogs that run sees")
    assert np.allclose([lp for s in fork_steps for lp in logprobs(s)],
                       logprobs(whole)[3:], atol=1e-5)
    # the source is where it was: its append is the one an unforked session gives
    alone = client.create_session("demo-lm", "the old dogs")
    assert np.allclose(logprobs(source_step), logprobs(client.append(alone.session_id,
                                                                     "sleep")), atol=1e-6)
    # a fork has its own state token, at its own position
    assert fork_steps[-1].state_token and fork_steps[-1].state_token != source_step.state_token
    for session in (source, fork, whole, alone):
        client.close_session(session.session_id)


def test_forks_are_sessions_of_their_client_and_need_a_held_source(server):
    client, stub = server.client, server.client.language_model
    error = _error(stub.ForkSession, pb.ForkSessionRequest(session_id="nope"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = _error(stub.ForkSession, pb.ForkSessionRequest())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "session_id" in error.details()
    source = client.create_session("demo-lm", "the cat")
    error = _error(stub.ForkSession, pb.ForkSessionRequest(session_id=source.session_id,
                                                           top_k=10 ** 6))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_k" in error.details()
    forks = [client.fork_session(source.session_id) for _ in range(3)]  # 4 sessions held
    error = _error(stub.ForkSession, pb.ForkSessionRequest(session_id=source.session_id))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_sessions_per_client=4" in error.details()
    for session in (source, *forks):
        client.close_session(session.session_id)


def test_a_fork_over_http_is_the_same_engine_call(server):
    with httpx.Client(base_url=server.http_url, timeout=30) as http:
        created = http.post("/v1/sessions", json={"model": "demo-lm", "prefix": "the old dogs",
                                                  "top_k": 2}).json()
        fork = http.post(f"/v1/sessions/{created['id']}/fork", json={"top_k": 2})
        assert fork.status_code == 200, fork.text
        fork = fork.json()
        assert fork["id"] != created["id"] and fork["position"] == 3
        assert fork["next_tokens"] == created["next_tokens"] and fork["state_token"]
        missing = http.post("/v1/sessions/nope/fork", json={})
        assert missing.status_code == 404 and missing.json()["error"]["message"]
        bad = http.post(f"/v1/sessions/{created['id']}/fork", json={"top_k": "2"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_k"
        for session in (created, fork):
            assert http.delete(f"/v1/sessions/{session['id']}").status_code == 200


def _error(method, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        method(request, timeout=10)
    return caught.value
