"""Loading artifacts: every way one can be broken gets a clear error naming the file."""

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from export_helpers import cuda_runtime, save_model

from serving.model.artifact import ArtifactError, load_artifact, write_artifact
from serving.model.runtime import DeviceUnavailable, ModelRuntime
from training.models.language_model import RecurrentLM


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(RecurrentLM(20, "gru", 8, 8, 1).eval(),
                      tmp_path_factory.mktemp("repo") / "tiny" / "1")


@pytest.fixture
def broken(artifact, tmp_path):
    copy = tmp_path / "tiny" / "2"
    shutil.copytree(artifact, copy)
    return copy


def test_good_artifact_loads(artifact):
    loaded = load_artifact(artifact)
    assert loaded.task == "lm" and loaded.incremental and loaded.state_shape == (1, 8)


@pytest.mark.parametrize("damage,message", [
    (lambda p: (p / "model.onnx").unlink(), "model.onnx: missing"),
    (lambda p: (p / "model.onnx").write_bytes((p / "model.onnx").read_bytes()[:1000]),
     "model.onnx: sha256 .* corrupt or truncated"),
    (lambda p: (p / "model.onnx").write_bytes(b"x" + (p / "model.onnx").read_bytes()[1:]),
     "corrupt or truncated"),
    (lambda p: (p / "metadata.json").unlink(), "metadata.json: missing"),
    (lambda p: (p / "metadata.json").write_text("{oops"), "metadata.json: not valid JSON"),
    (lambda p: _edit(p, lambda m: m.pop("cell")), "metadata.json: missing keys cell"),
    (lambda p: _edit(p, lambda m: m.update(vocab_size=99)), "vocab.json: 20 tokens, but"),
    (lambda p: _edit(p, lambda m: m.update(format_version=7)), "format_version 7 is not"),
    (lambda p: _edit(p, lambda m: m.update(task="translate")), "unknown task"),
    (lambda p: (p / "vocab.json").write_text("[]"), "vocab.json: expected a JSON object"),
])
def test_broken_artifacts_name_the_file_and_the_problem(broken, damage, message):
    damage(broken)
    with pytest.raises(ArtifactError, match=message):
        ModelRuntime(broken)


def _edit(path, change):
    metadata = json.loads((path / "metadata.json").read_text())
    change(metadata)
    (path / "metadata.json").write_text(json.dumps(metadata))


def test_missing_directory(tmp_path):
    with pytest.raises(ArtifactError, match="no such artifact directory"):
        load_artifact(tmp_path / "nothing" / "1")


def test_versions_are_integers_and_immutable(artifact, tmp_path):
    a = load_artifact(artifact)
    onnx_bytes = a.model_path.read_bytes()
    with pytest.raises(ArtifactError, match="must be a version"):
        write_artifact(tmp_path / "m" / "latest", onnx_bytes, a.vocab, None, a.metadata)
    with pytest.raises(ArtifactError, match="already exists"):
        write_artifact(artifact, onnx_bytes, a.vocab, None, a.metadata)


def test_failed_check_publishes_nothing(artifact, tmp_path):
    a = load_artifact(artifact)

    def refuse(staging):
        raise AssertionError("parity failed")

    with pytest.raises(AssertionError):
        write_artifact(tmp_path / "m" / "3", a.model_path.read_bytes(), a.vocab, None,
                       a.metadata, refuse)
    assert list((tmp_path / "m").iterdir()) == []


def test_cuda_without_a_gpu_fails_fast_with_a_clear_message(artifact):
    if "CUDAExecutionProvider" in ort.get_available_providers() and _cuda_works(artifact):
        pytest.skip("a CUDA device is present")
    with pytest.raises(DeviceUnavailable, match="device 'cuda' was requested"):
        ModelRuntime(artifact, device="cuda")
    fallback = ModelRuntime(artifact, device="cuda", allow_cpu_fallback=True)
    assert fallback.fallback and fallback.device == "cpu"
    assert fallback.providers == ["CPUExecutionProvider"]
    out = fallback.run_lm(np.array([[1, 2, 3]]), np.array([3]))
    assert out.state.device_name() == "cpu"


def _cuda_works(artifact):
    try:
        return ModelRuntime(artifact, device="cuda").device == "cuda"
    except DeviceUnavailable:
        return False


@pytest.mark.parametrize("call,message", [
    (lambda r: r.run_lm(np.array([[1, 50]]), np.array([2])), r"tokens must be ids in \[0, 20\)"),
    (lambda r: r.run_lm(np.array([[1, 2]]), np.array([3])), r"lengths must be in \[1, 2\]"),
    (lambda r: r.run_lm(np.zeros((0, 3)), np.zeros(0)), "non-empty"),
    (lambda r: r.run_lm(np.array([[1]]), np.array([1]), np.zeros((2, 1, 8))),
     r"state must have shape \[1, 1, 8\]"),
    (lambda r: r.run_encoder(np.array([[1]]), np.array([1])), "language model"),
])
def test_bad_calls_name_the_argument(artifact, call, message):
    with pytest.raises(ValueError, match=message):
        call(ModelRuntime(artifact))


@pytest.mark.gpu
def test_cuda_runs_the_graph_and_keeps_state_on_the_device(artifact):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider here")
    gpu = cuda_runtime(artifact)
    cpu = ModelRuntime(artifact)
    assert gpu.providers[0] == "CUDAExecutionProvider"
    tokens = np.random.default_rng(0).integers(0, 20, (4, 30))
    lengths = np.array([30, 12, 1, 29])
    a, b = gpu.run_lm(tokens, lengths), cpu.run_lm(tokens, lengths)
    assert a.state.device_name() == "cuda"  # never copied back to the host
    assert np.abs(a.token_logprobs - b.token_logprobs).max() <= 1e-4
    step = gpu.run_lm(tokens[:, :1], np.ones(4, np.int64), a.state)  # state stays an OrtValue
    assert step.state.device_name() == "cuda"
    assert np.abs(a.state.numpy() - b.state.numpy()).max() <= 1e-4
