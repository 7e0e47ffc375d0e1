"""The server on CUDA (skipped without a usable GPU): every model runs on
CUDAExecutionProvider and serves what the same server serves on the CPU. The rest of the
serving suite runs on the GPU too with RECUR_TEST_DEVICE=cuda (make test-gpu)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from export_helpers import cuda_runtime
from serving_helpers import RunningServer

pytestmark = pytest.mark.gpu
TEXTS = ["the old dogs that the cat sees run", "a dog sleeps", "the cats that a dog likes eat",
         "dogs run", "the cat that the dogs see sleeps quietly today"]
ENCODER_TEXTS = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9 w10 w11", "w3 w3 zzz"]


@pytest.fixture(scope="module")
def servers(model_repository):
    cuda_runtime(model_repository / "demo-lm" / "1")  # skips here unless CUDA really works
    gpu = RunningServer(model_repository, device="cuda")
    cpu = RunningServer(model_repository, device="cpu")
    yield gpu, cpu
    gpu.stop()
    cpu.stop()


def logprobs(results) -> list[list[float]]:
    return [[t.logprob for t in result.tokens] for result in results]


def test_every_model_runs_on_cuda(servers):
    models = servers[0].client.list_models()
    assert models and all(m.ready for m in models)
    assert {(m.device, m.providers[0]) for m in models} == {("cuda", "CUDAExecutionProvider")}


def test_scores_and_appends_on_cuda_equal_the_cpu(servers):
    gpu, cpu = servers
    on_gpu = logprobs(gpu.client.score("demo-lm", TEXTS))
    for a, b in zip(on_gpu, logprobs(cpu.client.score("demo-lm", TEXTS))):
        np.testing.assert_allclose(a, b, atol=1e-4)
    words = " ".join(TEXTS).split()
    session = gpu.client.create_session("demo-lm", prefix=" ".join(words[:3]))
    appended = [t.logprob for t in session.tokens]
    for start in range(3, len(words), 4):
        response = gpu.client.append(session.session_id, " ".join(words[start:start + 4]))
        appended += [t.logprob for t in response.tokens]
    gpu.client.close_session(session.session_id)
    whole = gpu.client.score("demo-lm", [" ".join(words)], add_eos=False)
    np.testing.assert_allclose(appended, logprobs(whole)[0], atol=1e-5)


def test_concurrent_greedy_completions_on_cuda_equal_the_cpu(servers):
    gpu, cpu = servers
    prompts = [" ".join(text.split()[:n]) for text in TEXTS for n in (1, 3)]

    def greedy(server, prompt):
        return server.client.complete_text("demo-lm", prompt, temperature=0.0, max_tokens=20)

    with ThreadPoolExecutor(len(prompts)) as pool:
        on_gpu = list(pool.map(lambda p: greedy(gpu, p), prompts))
    assert on_gpu == [greedy(cpu, p) for p in prompts]


@pytest.mark.parametrize("name", ["tagger-bi", "tagger-uni"])
def test_tags_on_cuda_equal_the_cpu(servers, name):
    gpu, cpu = (server.client.tag(name, ENCODER_TEXTS) for server in servers)
    assert [[t.tag for t in r.tokens] for r in gpu] == [[t.tag for t in r.tokens] for r in cpu]
    for a, b in zip(logprobs(gpu), logprobs(cpu)):
        np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("name", ["classifier-uni", "classifier-mean"])
def test_classes_on_cuda_equal_the_cpu(servers, name):
    gpu, cpu = (server.client.classify(name, ENCODER_TEXTS) for server in servers)
    for a, b in zip(gpu, cpu):
        assert a.label == b.label
        assert ({c.label: c.probability for c in a.classes}
                == pytest.approx({c.label: c.probability for c in b.classes}, abs=1e-4))
