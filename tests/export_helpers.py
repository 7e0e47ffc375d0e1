"""Writing an artifact for a model made in a test, as `recur export` would."""

from pathlib import Path

from serving.model.artifact import write_artifact
from serving.model.tokenizer import EOS, PAD, UNK, LabelSet, Normalization, Vocabulary
from training.export import model_metadata
from training.export.graph import build_graph
from training.models.language_model import RecurrentLM


def save_model(model, out: Path, vocab: Vocabulary | None = None) -> Path:
    size = model.embedding.weight.shape[0]
    is_lm = isinstance(model, RecurrentLM)
    specials = [UNK, EOS] if is_lm else [PAD, UNK]
    vocab = vocab or Vocabulary(specials + [f"w{i}" for i in range(size - 2)], Normalization())
    labels = None if is_lm else LabelSet([f"L{i}" for i in range(model.output.weight.shape[0])])
    graph = build_graph(model)
    task = "lm" if is_lm else ("tag" if "Tagger" in type(model).__name__ else "classify")
    metadata = {**model_metadata(model, graph), "task": task, "vocab_size": len(vocab),
                "num_labels": None if labels is None else len(labels),
                "pooling": getattr(model, "pooling", None),
                "special_tokens": {"eos": vocab.eos_id, "unk": vocab.unk_id}}
    return write_artifact(out, graph.SerializeToString(), vocab, labels, metadata)


def cuda_runtime(path: Path):
    """The artifact on CUDA, or a skip saying why ONNX Runtime cannot use CUDA here."""
    import pytest

    from serving.model.runtime import DeviceUnavailable, ModelRuntime

    try:
        return ModelRuntime(path, device="cuda")
    except DeviceUnavailable as error:
        pytest.skip(f"no usable CUDA device: {str(error).split(' (active')[0]}")
