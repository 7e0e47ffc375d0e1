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
from functools import cached_property
from pathlib import Path

from serving.model.bpe import BytePairEncoding, piece_text

UNK = "<unk>"
EOS = "<eos>"
PAD = "<pad>"
LEVELS = ("word", "char", "bpe")

# PTB maps numbers to "N"; this matches tokens such as 12, 3.5, 1,000, -4 and 12th.
_NUMBER = re.compile(r"^[+-]?(\d[\d,]*(\.\d+)?|\.\d+)(st|nd|rd|th|s)?$")


@dataclass(frozen=True)
class Normalization:
    """How raw text becomes tokens. Recorded with every vocabulary."""

    # "word": whitespace tokens; "char": every character; "bpe": byte-level BPE pieces
    # (the vocabulary's BytePairEncoding tokenizes: see Vocabulary.tokenize)
    level: str = "word"
    lowercase: bool = False
    number_token: str | None = None  # replace numeric words by this token (e.g. "N")

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"normalization.level must be one of {', '.join(LEVELS)}, "
                             f"got {self.level!r}")

    def tokenize(self, text: str) -> list[str]:
        if self.lowercase:
            text = text.lower()
        if self.level == "bpe":
            raise ValueError("a BPE vocabulary tokenizes with its merges: use "
                             "Vocabulary.tokenize")
        if self.level == "char":
            return list(text)
        words = text.split()
        if self.number_token is not None:
            words = [self.number_token if _NUMBER.match(w) else w for w in words]
        return words

    def detokenize(self, tokens: Sequence[str]) -> str:
        """Word and character tokens; a BPE vocabulary's text comes from Vocabulary.decode
        (its pieces carry their own spaces, so they join with "")."""
        return (" " if self.level == "word" else "").join(tokens)


# character ids of a Spelling before its characters: padding, a character not seen in
# training, and the markers around every word (a word's first and last characters are
# where prefixes and suffixes show)
CHAR_PAD, CHAR_UNK, WORD_START, WORD_END = 0, 1, 2, 3
_CHAR_SPECIALS = 4


@dataclass
class Spelling:
    """The characters of a character-aware model: a word becomes `max_word_length` ids,
    its start marker, its first max_word_length - 2 characters, its end marker, then
    padding. A word's spelling is what gives a rare or unknown word a representation."""

    characters: list[str]
    max_word_length: int = 20
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_word_length < 3:
            raise ValueError(f"max_word_length must be >= 3, got {self.max_word_length}")
        self.index = {c: _CHAR_SPECIALS + i for i, c in enumerate(self.characters)}
        if len(self.index) != len(self.characters) or any(len(c) != 1 for c in self.characters):
            raise ValueError("a spelling's characters must be distinct single characters")

    @classmethod
    def build(cls, words: Iterable[str], max_word_length: int = 20) -> Spelling:
        """Every character of the training words, the most frequent first."""
        counts = Counter(c for word in words for c in word)
        return cls(sorted(counts, key=lambda c: (-counts[c], c)), max_word_length)

    def __len__(self) -> int:
        return _CHAR_SPECIALS + len(self.characters)

    def spell(self, word: str) -> list[int]:
        inner = [self.index.get(c, CHAR_UNK) for c in word[: self.max_word_length - 2]]
        ids = [WORD_START, *inner, WORD_END]
        return ids + [CHAR_PAD] * (self.max_word_length - len(ids))

    def to_json(self) -> dict:
        return {"characters": self.characters, "max_word_length": self.max_word_length}


@dataclass
class Vocabulary:
    """A fixed list of tokens; position in the list is the id.

    Language-model vocabularies hold `<unk>` and `<eos>` but no `<pad>`
    (explicit lengths handle padding); tagger and classifier vocabularies add `<pad>`.
    A character-aware model's vocabulary also has a `spelling`: each of its tokens is then
    read as [word id, the word's character ids...] (`encode_spelled`).
    """

    tokens: list[str]
    normalization: Normalization = field(default_factory=Normalization)
    spelling: Spelling | None = None
    bpe: BytePairEncoding | None = None  # normalization.level "bpe": the pieces' merges
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.index = {t: i for i, t in enumerate(self.tokens)}
        if len(self.index) != len(self.tokens):
            raise ValueError("vocabulary has duplicate tokens")
        if (self.bpe is not None) != (self.normalization.level == "bpe"):
            raise ValueError("a vocabulary has BPE merges exactly when its level is 'bpe'")
        if self.bpe is not None and self.bpe.pieces != self.tokens:
            raise ValueError("a BPE vocabulary's tokens must be its tokenizer's pieces, in "
                             "id order")

    @classmethod
    def from_bpe(cls, bpe: BytePairEncoding, lowercase: bool = False) -> Vocabulary:
        return cls(list(bpe.pieces), Normalization("bpe", lowercase), bpe=bpe)

    def tokenize(self, text: str) -> list[str]:
        """Text to tokens as this vocabulary's model was trained on them."""
        if self.bpe is None:
            return self.normalization.tokenize(text)
        return self.bpe.tokenize(text.lower() if self.normalization.lowercase else text)

    @cached_property
    def texts(self) -> list[str]:
        """Each token's own text, for showing one token alone: a BPE piece that is not
        whole characters is spelled by its bytes as OpenAI's API does (`bytes:\\xe2\\x80`);
        streamed text uses `stream_decoder` instead."""
        if self.bpe is None:
            return self.tokens
        return [piece_text(p, b) for p, b in zip(self.bpe.pieces, self.bpe.bytes, strict=True)]

    def pieces_of(self, ids: Sequence[int]) -> list[str]:
        """The text each token adds, in order (BPE: a token that only starts a character
        adds "", the one that ends it the whole character; the last one also what is left
        of a character cut short), so they join to decode(ids)."""
        if self.bpe is None:
            return [self.tokens[i] for i in ids]
        stream = self.bpe.stream()
        pieces = [stream.step(i) for i in ids]
        if pieces:
            pieces[-1] += stream.finish()
        return pieces

    def stream_decoder(self):
        """For BPE: an incremental decoder (BytePairEncoding.stream); None otherwise, where
        a token's text is the token itself."""
        return None if self.bpe is None else self.bpe.stream()

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

    def encode_spelled(self, tokens: Sequence[str], ids: Sequence[int]) -> list[list[int]]:
        """A character-aware model's rows, [id, *spelling of the token] for each token (its
        own spelling: an unknown word keeps its characters though its id is <unk>'s)."""
        if self.spelling is None:
            raise ValueError("this vocabulary has no spelling: its model reads word ids only")
        return [[i, *self.spelling.spell(t)] for t, i in zip(tokens, ids, strict=True)]

    def encode(self, text: str, add_eos: bool = False) -> list[int]:
        ids = self.encode_tokens(self.tokenize(text))
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
        if self.bpe is not None:
            return self.bpe.decode(list(ids))
        return self.normalization.detokenize([self.tokens[i] for i in ids])

    def to_json(self) -> dict:
        data = {"normalization": asdict(self.normalization), "tokens": self.tokens}
        if self.spelling is not None:
            data["spelling"] = self.spelling.to_json()
        if self.bpe is not None:
            data["bpe"] = self.bpe.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict) -> Vocabulary:
        spelling, bpe = data.get("spelling"), data.get("bpe")
        return cls(list(data["tokens"]), Normalization(**data["normalization"]),
                   None if spelling is None else Spelling(list(spelling["characters"]),
                                                          int(spelling["max_word_length"])),
                   None if bpe is None else BytePairEncoding.from_json(bpe))

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
