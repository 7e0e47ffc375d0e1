"""The fuzz run's model repository: small random-weight models of every kind the server
treats differently (two versions of a language model, a unidirectional and a
bidirectional tagger, a final-state and a mean-pooling classifier), exported through the
normal path as the other benchmarks' models are (bench/common.py), unverified."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

VOCAB = 64  # every model's vocabulary: two specials and the words w0 .. w61
WORDS = [f"w{i}" for i in range(VOCAB - 2)]


@dataclass(frozen=True)
class Served:
    name: str
    task: str  # lm, tag or classify
    versions: tuple[int, ...]
    labels: tuple[str, ...] = ()
    sessions: bool = True  # incremental: sessions and V2 sequences work on it

    @property
    def vocab_size(self) -> int:
        return VOCAB


SERVED = (
    Served("fuzz-lm", "lm", (1, 2)),
    Served("fuzz-tag", "tag", (1,), tuple(f"T{i}" for i in range(5))),
    Served("fuzz-tag-bi", "tag", (1,), tuple(f"T{i}" for i in range(5)), sessions=False),
    Served("fuzz-cls", "classify", (1,), ("neg", "mid", "pos")),
    Served("fuzz-cls-mean", "classify", (1,), ("neg", "mid", "pos"), sessions=False),
)


def encoder_artifact(model, out: Path, labels: tuple[str, ...]) -> Path:
    """A tagger or classifier exported to `out` with placeholder words, as lm_artifact
    exports a language model."""
    from serving.model.tokenizer import PAD, UNK, LabelSet, Normalization, Vocabulary
    from training.export import export_model

    vocab = Vocabulary([PAD, UNK] + WORDS, Normalization())
    return export_model(model, out, vocab, LabelSet(list(labels)), verified=False)[0]


def build(root: Path) -> tuple[Served, ...]:
    """Writes the repository (about a second; needs torch) and says what it serves."""
    import torch

    from bench.common import lm_artifact
    from training.models.encoders import RecurrentClassifier, RecurrentTagger
    from training.models.language_model import RecurrentLM

    torch.manual_seed(0)
    lm_artifact(RecurrentLM(VOCAB, "lstm", 16, 16, 1).eval(), root / "fuzz-lm" / "1")
    lm_artifact(RecurrentLM(VOCAB, "gru", 16, 16, 2).eval(), root / "fuzz-lm" / "2")
    tags, classes = SERVED[1].labels, SERVED[3].labels
    encoder_artifact(RecurrentTagger(VOCAB, len(tags), 0, "lstm", 8, 12, 2,
                                     bidirectional=False).eval(), root / "fuzz-tag" / "1", tags)
    encoder_artifact(RecurrentTagger(VOCAB, len(tags), 0, "gru", 8, 12,
                                     bidirectional=True).eval(), root / "fuzz-tag-bi" / "1", tags)
    encoder_artifact(RecurrentClassifier(VOCAB, len(classes), 0, "elman_tanh", 8, 12,
                                         bidirectional=False).eval(),
                     root / "fuzz-cls" / "1", classes)
    encoder_artifact(RecurrentClassifier(VOCAB, len(classes), 0, "gru", 8, 12,
                                         bidirectional=False, pooling="mean").eval(),
                     root / "fuzz-cls-mean" / "1", classes)
    return SERVED
