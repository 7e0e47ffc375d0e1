"""Writing an artifact for a model made in a test, as `recur export` would."""

from pathlib import Path

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


def cuda_runtime(path: Path):
    """The artifact on CUDA, or a skip saying why ONNX Runtime cannot use CUDA here."""
    import pytest

    from serving.model.runtime import DeviceUnavailable, ModelRuntime

    try:
        return ModelRuntime(path, device="cuda")
    except DeviceUnavailable as error:
        pytest.skip(f"no usable CUDA device: {str(error).split(' (active')[0]}")
