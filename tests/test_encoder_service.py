"""Tagger, Classifier, and sessions on unidirectional encoders."""

from __future__ import annotations

import numpy as np
import pytest
from serving_helpers import RunningServer

from serving.model.runtime import ModelRuntime

TEXTS = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9 w10 w11", "w3 w3 zzz"]


@pytest.fixture(scope="module")
def server(model_repository):
    running = RunningServer(model_repository)
    yield running
    running.stop()


def direct(model_repository, name: str, text: str):
    runtime = ModelRuntime(model_repository / name / "1")
    ids = np.array([runtime.vocab.encode(text)], np.int64)
    outputs, _ = runtime.run_encoder(ids, np.array([ids.shape[1]], np.int64))
    return runtime, outputs[0]


@pytest.mark.parametrize("name", ["tagger-bi", "tagger-uni"])
def test_tag_matches_the_runtime(server, model_repository, name):
    results = server.client.tag(name, TEXTS)
    for text, result in zip(TEXTS, results):
        runtime, logprobs = direct(model_repository, name, text)
        assert [t.token for t in result.tokens] == text.split()
        assert [t.tag for t in result.tokens] == [runtime.labels.names[i]
                                                  for i in logprobs.argmax(1)]
        np.testing.assert_allclose([t.logprob for t in result.tokens], logprobs.max(1),
                                   atol=1e-5)


@pytest.mark.parametrize("name", ["classifier-uni", "classifier-mean"])
def test_classify_matches_the_runtime(server, model_repository, name):
    results = server.client.classify(name, TEXTS)
    for text, result in zip(TEXTS, results):
        runtime, logprobs = direct(model_repository, name, text)
        probabilities = {c.label: c.probability for c in result.classes}
        expected = dict(zip(runtime.labels.names, np.exp(logprobs)))
        assert probabilities == pytest.approx(expected, abs=1e-5)
        assert result.label == max(expected, key=expected.get)
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)


def test_a_tagging_session_tags_each_piece_as_the_whole_text(server):
    text = "w1 w2 w3 w4 w5 w6 w7"
    whole = server.client.tag("tagger-uni", [text])[0]
    session = server.client.create_session("tagger-uni", prefix="w1 w2")
    pieces = [session] + [server.client.append(session.session_id, p)
                          for p in ("w3", "w4 w5 w6", "w7")]
    tags = [t for response in pieces for t in response.tags]
    assert [t.tag for t in tags] == [t.tag for t in whole.tokens]
    np.testing.assert_allclose([t.logprob for t in tags], [t.logprob for t in whole.tokens],
                               atol=1e-5)


def test_a_classifier_session_gives_the_class_distribution_of_the_text_so_far(server):
    session = server.client.create_session("classifier-uni")
    assert not session.classes  # nothing read yet
    text = []
    for piece in ("w1 w2", "w9", "w4 w4 w4"):
        text.append(piece)
        response = server.client.append(session.session_id, piece)
        whole = server.client.classify("classifier-uni", [" ".join(text)])[0]
        assert {c.label: c.probability for c in response.classes} == pytest.approx(
            {c.label: c.probability for c in whole.classes}, abs=1e-5)
