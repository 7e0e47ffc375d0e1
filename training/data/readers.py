"""Readers for the corpus formats Recur trains on. Each returns plain Python lists.

Real corpora are read by path from RECUR_DATA (default ../shared/data);
nothing is downloaded or copied into the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

from serving.model.tokenizer import EOS, Normalization, Vocabulary


def data_root() -> Path:
    return Path(os.environ.get("RECUR_DATA", "../shared/data"))


def resolve(path: str | Path) -> Path:
    """`$RECUR_DATA/...` style paths: a path starting with `data:` is under data_root()."""
    text = str(path)
    if text.startswith("data:"):
        return data_root() / text[len("data:"):]
    return Path(text)


class CorpusError(ValueError):
    """A corpus file that cannot be read as configured."""


def _open_text(path: Path, encoding: str = "utf-8") -> str:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such corpus file (RECUR_DATA={data_root()})")
    raw = path.read_bytes()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as error:
        raise CorpusError(
            f"{path}: not valid {encoding} at byte {error.start} "
            f"({raw[error.start:error.start + 4]!r}...): set data.encoding to the file's "
            f"encoding, for example data.encoding = \"latin-1\"") from None
    except LookupError:
        raise CorpusError(f"data.encoding: unknown encoding {encoding!r}") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # as read_text's newlines


def read_lines_lm(path: str | Path, tokenizer: Normalization | Vocabulary,
                  encoding: str = "utf-8", blank_lines: str = "skip") -> list[list[str]]:
    """One sentence per line, tokenized by `tokenizer` (a Normalization, or a Vocabulary
    whose BPE pieces tokenize); `<eos>` appended to each (Penn Treebank style). Blank
    lines are skipped, or with blank_lines = "eos" read as an `<eos>` alone, which is how
    the published WikiText figures count (245,569 test tokens for WikiText-2)."""
    keep_blank = blank_lines == "eos"
    return [tokenizer.tokenize(line) + [EOS] for line in read_text_lines(path, encoding)
            if keep_blank or line.strip()]


def read_text_lines(path: str | Path, encoding: str = "utf-8") -> list[str]:
    """A text file's lines as they are (what a BPE tokenizer is trained on)."""
    return _open_text(resolve(path), encoding).splitlines()


def read_char_stream(path: str | Path, norm: Normalization, split: str | None = None,
                     fractions=(0.9, 0.05, 0.05), encoding: str = "utf-8") -> list[list[str]]:
    """A whole file as one character stream (Tiny Shakespeare), optionally one split of it:
    the first 90% of characters train, the next 5% valid, the last 5% test."""
    text = _open_text(resolve(path), encoding)
    if split is not None:
        n = len(text)
        a, b = int(n * fractions[0]), int(n * (fractions[0] + fractions[1]))
        text = {"train": text[:a], "valid": text[a:b], "test": text[b:]}[split]
    return [norm.tokenize(text)]


def read_conllu(path: str | Path, norm: Normalization, column: int = 3,
                encoding: str = "utf-8") -> list[tuple[list[str], list[str]]]:
    """CoNLL-U sentences as (words, tags); skips comments, multiword ranges and empty nodes.
    `column` is 0-based: 3 is UPOS, 4 is XPOS."""
    sentences, words, tags = [], [], []
    for line in _open_text(resolve(path), encoding).splitlines():
        if not line.strip():
            if words:
                sentences.append((words, tags))
            words, tags = [], []
            continue
        if line.startswith("#"):
            continue
        cols = line.split("\t")
        if "-" in cols[0] or "." in cols[0]:
            continue
        words.extend(norm.tokenize(cols[1]) or [cols[1]])
        tags.append(cols[column])
    if words:
        sentences.append((words, tags))
    return sentences


def read_columns(path: str | Path, norm: Normalization, token_column: int = 0,
                 tag_column: int = -1,
                 encoding: str = "utf-8") -> list[tuple[list[str], list[str]]]:
    """Whitespace-separated columns, blank line between sentences (CoNLL-2000, WNUT-17)."""
    sentences, words, tags = [], [], []
    for line in _open_text(resolve(path), encoding).splitlines():
        cols = line.split()
        if not cols:
            if words:
                sentences.append((words, tags))
            words, tags = [], []
            continue
        token = cols[token_column]
        words.append(norm.tokenize(token)[0] if norm.tokenize(token) else token)
        tags.append(cols[tag_column])
    if words:
        sentences.append((words, tags))
    return sentences


def read_labelled(path: str | Path, norm: Normalization,
                  encoding: str = "utf-8") -> list[tuple[list[str], str]]:
    """`label<space>sentence` or `label<TAB>sentence` lines."""
    examples = []
    for n, line in enumerate(_open_text(resolve(path), encoding).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t", 1) if "\t" in line else line.split(" ", 1)
        if len(parts) != 2 or not parts[1].strip():
            raise ValueError(f"{path}:{n}: expected 'label sentence', got {line[:60]!r}")
        examples.append((norm.tokenize(parts[1]), parts[0].strip()))
    return examples
