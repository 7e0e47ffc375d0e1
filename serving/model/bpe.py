"""Byte-level BPE (GPT-2's scheme), trained and run by HuggingFace `tokenizers`: any text
is a sequence of byte pieces, so it round-trips exactly and never needs `<unk>`. A BPE
vocabulary (serving.model.tokenizer.Vocabulary with normalization level "bpe") carries
one, serialised inside vocab.json, so serving reads exactly the merges training wrote."""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence


class BytePairEncoding:
    """Byte-level BPE (GPT-2's scheme) trained and run by HuggingFace `tokenizers`: any text
    is a sequence of byte pieces, so it round-trips exactly and never needs `<unk>`.
    The merges travel inside vocab.json, so serving reads exactly what training wrote."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        pieces = [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]
        self.pieces: list[str] = pieces
        byte_of = {c: b for b, c in _byte_alphabet().items()}
        # each piece's bytes (specials: none); a piece is at most this many bytes long
        self.bytes = [bytes(byte_of[c] for c in p) if all(c in byte_of for c in p) else b""
                      for p in pieces]
        self.max_piece_bytes = max(1, *(len(b) for b in self.bytes))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, specials: Sequence[str]
              ) -> BytePairEncoding:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tokenizer.train_from_iterator(texts, trainer)
        return cls(tokenizer)

    @classmethod
    def from_json(cls, text: str) -> BytePairEncoding:
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_str(text)
        except Exception as error:  # tokenizers raises its own exception type
            raise ValueError(f"not a tokenizers BPE ({error})") from None
        return cls(tokenizer)

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    def tokenize(self, text: str) -> list[str]:
        return self.tokenizer.encode(text, add_special_tokens=False).tokens

    def decode(self, ids: Sequence[int]) -> str:
        stream = self.stream()
        return "".join(stream.step(i) for i in ids) + stream.finish()

    def stream(self) -> PieceStream:
        return PieceStream(self)


class PieceStream:
    """Incremental decoding of BPE ids: step(id) gives the characters that id completes
    ("" while a character's bytes are still arriving), finish() what is left (U+FFFD for
    a character cut short), so the pieces join to the decoded text.

    Written here rather than `tokenizers`' DecodeStream, which decodes its whole window
    again at every step and holds the window while the text ends in U+FFFD: quadratic on
    text that is made of it. This holds at most 3 bytes (Python's incremental UTF-8
    decoder, invalid bytes replaced as in a whole decode) and is linear."""

    def __init__(self, bpe: BytePairEncoding) -> None:
        self._bytes, self._pieces = bpe.bytes, bpe.pieces
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def step(self, token: int) -> str:
        raw = self._bytes[token]
        if raw:
            return self._utf8.decode(raw)
        return self.finish() + self._pieces[token]  # a special token: its name, as it is

    def finish(self) -> str:
        return self._utf8.decode(b"", final=True)


def piece_text(piece: str, raw: bytes) -> str:
    """A piece shown alone: its characters, or when its bytes are not whole characters
    spelled by them as OpenAI's API does (`bytes:\\xe2\\x80`)."""
    if not raw:
        return piece  # a special token
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's map of bytes to printable characters, which byte-level BPE pieces are
    spelled in (what `tokenizers`' ByteLevel uses)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping
