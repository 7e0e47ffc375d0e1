"""Writing an artifact for a model made in a test, as `recur export` would."""

import json
from pathlib import Path

import onnx

from serving.model.artifact import METADATA_FILE, MODEL_FILE, sha256_of
from serving.model.tokenizer import EOS, PAD, UNK, LabelSet, Normalization, Vocabulary
from training.export import export_model
from training.models.language_model import RecurrentLM


def save_model(model, out: Path, vocab: Vocabulary | None = None) -> Path:
    """Unverified: the tests that need it verify the artifact themselves."""
    size = model.embedding.weight.shape[0]
    is_lm = isinstance(model, RecurrentLM)
    specials = [UNK, EOS] if is_lm else [PAD, UNK]
    vocab = vocab or Vocabulary(specials + [f"w{i}" for i in range(size - 2)], Normalization())
    labels = None if is_lm else LabelSet([f"L{i}" for i in range(model.output.weight.shape[0])])
    return export_model(model, out, vocab, labels, verified=False)[0]


def replace_graph(artifact: Path, graph: onnx.ModelProto) -> None:
    """Puts a graph the test edited (an output removed, a node changed) into an exported
    artifact, with the metadata that describes it, as an older export would have written."""
    (artifact / MODEL_FILE).write_bytes(graph.SerializeToString())
    metadata = json.loads((artifact / METADATA_FILE).read_text())
    metadata["outputs"] = [output.name for output in graph.graph.output]
    metadata["onnx_sha256"] = sha256_of(artifact / MODEL_FILE)
    (artifact / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")


def cuda_runtime(path: Path):
    """The artifact on CUDA, or a skip saying why ONNX Runtime cannot use CUDA here."""
    import pytest

    from serving.model.runtime import DeviceUnavailable, ModelRuntime

    try:
        return ModelRuntime(path, device="cuda")
    except DeviceUnavailable as error:
        pytest.skip(f"no usable CUDA device: {str(error).split(' (active')[0]}")
