"""Tokenization and vocabularies, shared by training and serving.

Defined here (not in training/) because the server must turn text into ids
exactly as training did, without torch. A vocabulary file records its own
normalisation, so a model artifact is self-describing.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

UNK = "<unk>"
EOS = "<eos>"
PAD = "<pad>"

# PTB maps numbers to "N"; this matches tokens such as 12, 3.5, 1,000, -4 and 12th.
_NUMBER = re.compile(r"^[+-]?(\d[\d,]*(\.\d+)?|\.\d+)(st|nd|rd|th|s)?$")


@dataclass(frozen=True)
class Normalization:
    """How raw text becomes tokens. Recorded with every vocabulary."""

    level: str = "word"  # "word": whitespace tokens; "char": every character
    lowercase: bool = False
    number_token: str | None = None  # replace numeric words by this token (e.g. "N")

    def __post_init__(self) -> None:
        if self.level not in ("word", "char"):
            raise ValueError(f"normalization.level must be 'word' or 'char', got {self.level!r}")

    def tokenize(self, text: str) -> list[str]:
        if self.lowercase:
            text = text.lower()
        if self.level == "char":
            return list(text)
        words = text.split()
        if self.number_token is not None:
            words = [self.number_token if _NUMBER.match(w) else w for w in words]
        return words

    def detokenize(self, tokens: Sequence[str]) -> str:
        return ("" if self.level == "char" else " ").join(tokens)


@dataclass
class Vocabulary:
    """A fixed list of tokens; position in the list is the id.

    Language-model vocabularies hold `<unk>` and `<eos>` but no `<pad>`
    (explicit lengths handle padding); tagger and classifier vocabularies add `<pad>`.
    """

    tokens: list[str]
    normalization: Normalization = field(default_factory=Normalization)
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.index = {t: i for i, t in enumerate(self.tokens)}
        if len(self.index) != len(self.tokens):
            raise ValueError("vocabulary has duplicate tokens")

    @classmethod
    def build(
        cls,
        counts: Counter[str],
        specials: Sequence[str],
        normalization: Normalization,
        min_count: int = 1,
        max_size: int | None = None,
    ) -> Vocabulary:
        """Specials first, then tokens by decreasing count (ties alphabetically)."""
        ordered = sorted(
            (t for t, c in counts.items() if c >= min_count and t not in specials),
            key=lambda t: (-counts[t], t),
        )
        if max_size is not None:
            ordered = ordered[: max(0, max_size - len(specials))]
        return cls(list(specials) + ordered, normalization)

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self.index

    @property
    def unk_id(self) -> int | None:
        return self.index.get(UNK)

    @property
    def eos_id(self) -> int | None:
        return self.index.get(EOS)

    @property
    def pad_id(self) -> int | None:
        return self.index.get(PAD)

    def id(self, token: str) -> int:
        """The id of a token, `<unk>`'s for unknown ones (KeyError if there is no `<unk>`)."""
        found = self.index.get(token)
        if found is not None:
            return found
        if self.unk_id is None:
            raise KeyError(f"token {token!r} is not in a vocabulary without {UNK}")
        return self.unk_id

    def encode_tokens(self, tokens: Iterable[str]) -> list[int]:
        return [self.id(t) for t in tokens]

    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        ids = self.encode_tokens(self.normalization.tokenize(text))
        if add_eos:
            if self.eos_id is None:
                raise ValueError(f"this vocabulary has no {EOS}")
            ids.append(self.eos_id)
        return ids

    def unknown_count(self, words: Sequence[str], ids: Sequence[int]) -> int:
        """Words that were mapped to `<unk>` (a literal `<unk>` in the text is not one)."""
        unk = self.unk_id
        return sum(1 for w, i in zip(words, ids, strict=True) if i == unk and w != UNK)

    def decode(self, ids: Iterable[int]) -> str:
        return self.normalization.detokenize([self.tokens[i] for i in ids])

    def to_json(self) -> dict:
        return {"normalization": asdict(self.normalization), "tokens": self.tokens}

    @classmethod
    def from_json(cls, data: dict) -> Vocabulary:
        return cls(list(data["tokens"]), Normalization(**data["normalization"]))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), ensure_ascii=False, indent=0) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (KeyError, TypeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: not a vocabulary file ({error})") from error


@dataclass
class LabelSet:
    """Tags or classes: names in a fixed order, no specials."""

    names: list[str]

    def __post_init__(self) -> None:
        self.index = {n: i for i, n in enumerate(self.names)}

    @classmethod
    def build(cls, labels: Iterable[str]) -> LabelSet:
        return cls(sorted(set(labels)))

    def __len__(self) -> int:
        return len(self.names)

    def id(self, name: str) -> int:
        if name not in self.index:
            raise KeyError(f"unknown label {name!r}; known: {', '.join(self.names)}")
        return self.index[name]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"labels": self.names}, indent=0) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LabelSet:
        return cls(list(json.loads(Path(path).read_text())["labels"]))
