"""The model artifact: one directory per model version, readable without torch.

    REPO/NAME/VERSION/
        model.onnx      the graph (recurrence as an ONNX Loop)
        vocab.json      tokens and the tokenizer's normalisation (serving.model.tokenizer)
        labels.json     tag or class names (taggers and classifiers)
        metadata.json   what the graph is and where it came from, with model.onnx's sha256

Training writes artifacts through `write_artifact`; the runtime reads them through
`load_artifact`, which refuses anything missing, corrupt or inconsistent, naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.model.tokenizer import LabelSet, Vocabulary

FORMAT_VERSION = 1
MODEL_FILE, VOCAB_FILE, LABELS_FILE, METADATA_FILE = (
    "model.onnx", "vocab.json", "labels.json", "metadata.json")
TASKS = ("lm", "tag", "classify")

# The graph's interface. State layout: [layers, batch, state_size], where state_size is
# hidden_size for Elman and GRU cells and 2 * hidden_size for the LSTM ([h ; c] packed).
LM_INPUTS = ("tokens", "lengths", "state", "targets")
LM_OUTPUTS = ("token_logprobs", "next_logprobs", "new_state")
# since they were added: the most likely token at each position and its log-prob (an
# artifact exported before has none; the server then steps through a text to find them)
LM_GREEDY_OUTPUTS = ("greedy_tokens", "greedy_logprobs")
REQUIRED_METADATA = ("format_version", "task", "cell", "layers", "embedding_size",
                     "hidden_size", "state_size", "bidirectional", "vocab_size", "inputs",
                     "outputs", "onnx_sha256", "special_tokens")


class ArtifactError(ValueError):
    """A missing, corrupt, truncated or inconsistent artifact."""


@dataclass
class Artifact:
    path: Path
    metadata: dict[str, Any]
    vocab: Vocabulary
    labels: LabelSet | None

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def task(self) -> str:
        return self.metadata["task"]

    @property
    def incremental(self) -> bool:
        """Whether the graph takes and returns a state, so text can be fed piece by piece."""
        return "state" in self.metadata["inputs"]

    @property
    def state_shape(self) -> tuple[int, int]:
        return self.metadata["layers"], self.metadata["state_size"]


def _check_spelling(path: Path, metadata: dict, vocab: Vocabulary) -> None:
    """A graph reads "chars" exactly when the vocabulary spells words, with the number of
    character ids and the word length the graph was exported with."""
    reads_chars = "chars" in metadata["inputs"]
    if reads_chars != (vocab.spelling is not None):
        raise ArtifactError(
            f"{path / VOCAB_FILE}: " + ("the graph reads characters but the vocabulary has no "
                                        "spelling" if reads_chars else
                                        "the vocabulary spells words but the graph reads no "
                                        "characters"))
    if reads_chars:
        expected = metadata.get("characters")
        if not isinstance(expected, dict):
            raise ArtifactError(f"{path / METADATA_FILE}: the graph reads characters but "
                                "'characters' does not describe them")
        got = {"characters": len(vocab.spelling),
               "max_word_length": vocab.spelling.max_word_length}
        for key, value in got.items():
            if expected.get(key) != value:
                raise ArtifactError(f"{path / VOCAB_FILE}: the spelling has {key} {value}, "
                                    f"but metadata says {expected.get(key)}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# The highest version a folder may name: versions travel in protobuf int64 fields (ModelRef,
# ModelInfo), and Triton too reads version folders as int64 (std::stoll), not int32.
MAX_VERSION = 2**63 - 1


def version_of(folder_name: str) -> int | None:
    """The version a folder's name gives (1 to MAX_VERSION in ASCII digits, without
    leading zeros), or None. Leading zeros are refused, as newer Triton does: `1` and `01`
    would otherwise be two folders of one version, the second loaded over the first; and
    0, which requests use to mean "the highest version", could not be asked for."""
    if not re.fullmatch(r"[1-9][0-9]{0,18}", folder_name):
        return None
    version = int(folder_name)
    return version if version <= MAX_VERSION else None


def write_artifact(out: str | Path, onnx_bytes: bytes, vocab: Vocabulary,
                   labels: LabelSet | None, metadata: dict[str, Any],
                   check: Callable[[Path], None] | None = None) -> Path:
    """Writes the directory atomically: into a temporary sibling, then renamed into place.
    `check(staging_dir)` runs before the rename; if it raises, nothing is published."""
    out = Path(out)
    if version_of(out.name) is None:
        raise ArtifactError(f"{out}: the last path component must be a version (1 to "
                            f"{MAX_VERSION} in ASCII digits, without leading zeros)")
    if out.exists():
        raise ArtifactError(f"{out}: already exists; versions are immutable, use a new one")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        (staging / MODEL_FILE).write_bytes(onnx_bytes)
        vocab.save(staging / VOCAB_FILE)
        if labels is not None:
            labels.save(staging / LABELS_FILE)
        full = {**metadata, "format_version": FORMAT_VERSION,
                "onnx_sha256": hashlib.sha256(onnx_bytes).hexdigest()}
        (staging / METADATA_FILE).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
        load_artifact(staging)  # never publish what we could not read back
        if check is not None:
            check(staging)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise ArtifactError(f"{path}: missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    return data


def load_artifact(path: str | Path) -> Artifact:
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such artifact directory")
    metadata = _read_json(path / METADATA_FILE)
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ArtifactError(f"{path / METADATA_FILE}: missing keys {', '.join(missing)}")
    if metadata["format_version"] != FORMAT_VERSION:
        raise ArtifactError(f"{path / METADATA_FILE}: format_version {metadata['format_version']}"
                            f" is not supported (this runtime reads {FORMAT_VERSION})")
    if metadata["task"] not in TASKS:
        raise ArtifactError(f"{path / METADATA_FILE}: unknown task {metadata['task']!r}")
    model = path / MODEL_FILE
    if not model.exists():
        raise ArtifactError(f"{model}: missing")
    actual = sha256_of(model)
    if actual != metadata["onnx_sha256"]:
        raise ArtifactError(f"{model}: sha256 {actual[:12]}... does not match metadata "
                            f"({str(metadata['onnx_sha256'])[:12]}...): corrupt or truncated")
    try:
        vocab = Vocabulary.from_json(_read_json(path / VOCAB_FILE))
    except (KeyError, TypeError, ValueError) as error:
        raise ArtifactError(f"{path / VOCAB_FILE}: not a vocabulary ({error})") from error
    if len(vocab) != metadata["vocab_size"]:
        raise ArtifactError(f"{path / VOCAB_FILE}: {len(vocab)} tokens, but metadata says "
                            f"vocab_size {metadata['vocab_size']}")
    _check_spelling(path, metadata, vocab)
    labels = None
    if metadata["task"] != "lm":
        data = _read_json(path / LABELS_FILE)
        labels = LabelSet(list(data.get("labels", [])))
        if len(labels) != metadata.get("num_labels"):
            raise ArtifactError(f"{path / LABELS_FILE}: {len(labels)} labels, but metadata says "
                                f"num_labels {metadata.get('num_labels')}")
    return Artifact(path, metadata, vocab, labels)
