"""ScoreStream: a long job through one stream, in order, with the server's memory bounded."""

from __future__ import annotations

import numpy as np
import pytest
from serving_helpers import RunningServer


@pytest.fixture(scope="module")
def server(model_repository):
    running = RunningServer(model_repository, stream_window=64, max_queue=256,
                            max_sequences_per_request=256)
    yield running
    running.stop()


def test_streaming_50000_sentences_keeps_order_ids_and_a_bounded_queue(server):
    vocab = server.server.engine.model("demo-lm").runtime.vocab
    words = [w for w in vocab.tokens if not w.startswith("<")]
    rng = np.random.default_rng(5)
    sentences = [" ".join(rng.choice(words, int(rng.integers(1, 9)))) for _ in range(50_000)]
    consumed = 0

    def items():  # groups of 1 to 16 sentences per message
        nonlocal consumed
        start = 0
        while start < len(sentences):
            size = int(rng.integers(1, 17))
            consumed = min(start + size, len(sentences))
            yield f"g{start}", sentences[start:consumed]
            start = consumed

    results, ids, lead = [], [], 0
    for result in server.client.score_stream("demo-lm", items(), timeout=600):
        ids.append(result.id)
        assert result.id == f"g{len(results)}"  # in order, ids intact
        results += [(s.token_count, s.total_logprob) for s in result.scores]
        lead = max(lead, consumed - len(results))
    # Flow control: the client's sentences are taken only as fast as the server answers
    # them, plus what HTTP/2's 64 KB stream window holds in transit.
    assert lead < 5_000, lead
    assert len(results) == 50_000
    assert [r[0] for r in results] == [len(s.split()) + 1 for s in sentences]
    assert server.server.engine.model("demo-lm").scheduler.peak_depth <= 64
    check = [0, 1, 777, 49_999]
    direct = server.client.score("demo-lm", [sentences[i] for i in check])
    for i, score in zip(check, direct):
        assert results[i][1] == pytest.approx(score.total_logprob, abs=1e-4)
    tokens = sum(r[0] for r in results)
    assert server.metric("recur_tokens_total", model="demo-lm/1", kind="scored") >= tokens


def test_a_bad_message_ends_the_stream_with_its_id(server):
    import grpc

    def items():
        yield "fine", ["the dog"]
        yield "broken", ["a cat", [10**9]]

    with pytest.raises(grpc.RpcError) as caught:
        list(server.client.score_stream("demo-lm", items(), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'broken'" in caught.value.details()
