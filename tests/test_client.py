"""serving.client.RecurClient: the model first in every call that names one, plain Python
values back."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from serving_helpers import RunningServer

from serving import client as client_module
from serving.client import RecurClient


@pytest.fixture(scope="module")
def server(model_repository):
    running = RunningServer(model_repository)
    yield running
    running.stop()


def test_every_call_that_names_a_model_takes_it_first_then_keywords():
    for name, method in inspect.getmembers(RecurClient, inspect.isfunction):
        parameters = list(inspect.signature(method).parameters.values())[1:]
        names = [p.name for p in parameters]
        if "model" in names:
            assert names[0] == "model", name
            keyword_only = {p.name for p in parameters if p.kind is p.KEYWORD_ONLY}
            forwards = any(p.kind is p.VAR_KEYWORD for p in parameters)  # to complete()
            assert "version" in keyword_only or forwards, name


def test_results_are_dataclasses_of_python_values(server):
    client = server.client
    (score,) = client.score("demo-lm", ["the old dogs"])
    assert dataclasses.is_dataclass(score) and isinstance(score.tokens[0].logprob, float)
    assert score.token_count == 4 and score.tokens[-1].text == "<eos>"
    events = list(client.complete("demo-lm", "the old dogs", seed=1, max_tokens=3, n=2))
    finished = [e for e in events if e.token is None]
    assert {e.index for e in finished} == {0, 1}
    assert {e.finish_reason for e in finished} <= {"eos", "length", "stop"}
    assert all(e.model == client_module.ModelRef("demo-lm", 1) for e in finished)
    session = client.create_session("demo-lm", "the old dogs", top_k=2)
    step = client.append(session.session_id, "that", top_k=2)
    assert step.position == 4 and len(step.next_tokens) == 2 and step.state_token == b""
    client.close_session(session.session_id)
    (tagging,) = client.tag("tagger-bi", ["w1 w2"])
    assert [t.token for t in tagging.tokens] == ["w1", "w2"]
    (classified,) = client.classify("classifier-uni", ["w1 w2"])
    assert classified.label == classified.classes[0].label
    assert sum(c.probability for c in classified.classes) == pytest.approx(1.0, abs=1e-5)
    infos = client.list_models()
    assert all(dataclasses.is_dataclass(i) for i in infos)
    assert ("demo-lm", 1, "lm") in {(i.name, i.version, i.task) for i in infos}
    streamed = list(client.score_stream("demo-lm", [("a", ["the old dogs"]), ("b", ["x y"])]))
    assert [s.id for s in streamed] == ["a", "b"] and streamed[0].scores == [score]
