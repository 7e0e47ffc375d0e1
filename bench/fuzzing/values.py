"""Values for requests, valid and hostile, drawn from a random.Random: texts, token ids,
model names and versions, floats, state tokens and their forgeries, V2 tensors, and
protobuf bytes that no well-behaved client would send (invalid UTF-8 in string fields,
garbage). Every function takes the generator first, so a seed reproduces a run's
requests."""

from __future__ import annotations

import math
import random
import re
import struct

from google.protobuf import text_format

from bench.fuzzing.models import VOCAB, WORDS

LONG = 4096  # "very long" strings are longer than this (bytes)
INT32, INT64 = (-(2**31), 2**31 - 1), (-(2**63), 2**63 - 1)
ODD_WORDS = ["zebra", "<eos>", "<unk>", "<pad>", "W1", "w999", "ü", "日本語", "🙂", "\u200b",
             "a\x00b", "\ufeff", "w1\u0301", "٣", "ﬁ", "\U0010ffff"]
ODD_NAMES = ["", "nope", "\x00", "fuzz-lm/1", " fuzz-lm", "FUZZ-LM", "fuzz-lm\n", "fuzz lm",
             "../fuzz-lm", "fuzz-lm\x00", "🙂", "fuzz-lm" * 40, "TEXT", "TOKEN_IDS", "*", "%s"]
V2_VERSIONS = ["²", "١", "１", "٣", "⁹", "99999999999999999999", "18446744073709551616",
               "9223372036854775808", "-1", "1.0", " 1", "1 ", "01", "1e3", "0x1", "+1", "0",
               "3", "inf", "NaN", "1\x00", "一"]
TINY_TEMPERATURES = [1e-30, 1e-37, 1e-38, 1e-39, 1e-42, 1.4e-45]
INVALID_UTF8 = [b"\xff", b"\xfe\xff", b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                b"w1 \x80 w2", b"\xe2\x82", b"w3\xf0\x9f\x98"]


def chance(rng: random.Random, p: float) -> bool:
    return rng.random() < p


def long_string(rng: random.Random, minimum: int = LONG + 1) -> str:
    """A string of more than `minimum` UTF-8 bytes (4 KB+ by default)."""
    size = rng.choice([minimum, minimum * 2, minimum * 8, 70_000])
    unit = rng.choice(["a", "é", "日", "w1 ", "🙂", "\x00", "%s"])
    return unit * (size // len(unit.encode()) + 1)


def words(rng: random.Random, low: int = 1, high: int = 12) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(low, high))]


def text(rng: random.Random, low: int = 1, high: int = 12) -> str:
    return " ".join(words(rng, low, high))


def odd_text(rng: random.Random) -> str:
    """Text that is valid UTF-8 but unusual: unknown words, specials, control characters,
    odd whitespace, or very long."""
    kind = rng.randrange(6)
    if kind == 0:
        return " ".join(rng.choice(WORDS + ODD_WORDS) for _ in range(rng.randint(1, 12)))
    if kind == 1:
        return rng.choice(["", " ", "\t\n", "\u3000", "\x00", "\r\n\r\n"])
    if kind == 2:
        return long_string(rng)
    if kind == 3:  # more words than a sequence may hold
        return " ".join(rng.choice(WORDS) for _ in range(rng.choice([513, 2000, 25_000])))
    if kind == 4:
        return "".join(chr(rng.choice([rng.randrange(32, 0xD800), rng.randrange(0xE000, 0x110000)]))
                       for _ in range(rng.randint(1, 40)))
    return "\u202e" + text(rng) + "\u202c"


def ids(rng: random.Random, low: int = 1, high: int = 12, vocab: int = VOCAB) -> list[int]:
    return [rng.randrange(vocab) for _ in range(rng.randint(low, high))]


def odd_ids(rng: random.Random, vocab: int = VOCAB) -> list[int]:
    """Token ids out of range, negative, extreme, empty or too many."""
    kind = rng.randrange(6)
    base = ids(rng, 0, 8, vocab)
    bad = rng.choice([-1, -2, vocab, vocab + 1, 10**6, INT64[0], INT64[1], -vocab])
    if kind == 0:
        base.insert(rng.randint(0, len(base)), bad)
        return base
    if kind == 1:
        return [bad] * rng.randint(1, 5)
    if kind == 2:
        return []
    if kind == 3:
        return ids(rng, 513, 3000, vocab)
    if kind == 4:
        return [rng.randint(*INT64) for _ in range(rng.randint(1, 6))]
    return base + [vocab - 1, 0, vocab]


def int_in(rng: random.Random, bounds: tuple[int, int], usual: list[int]) -> int:
    """An integer in `bounds` (a protobuf field's range): usually one of `usual`, else an
    edge or a random value."""
    if chance(rng, 0.7):
        return rng.choice(usual)
    return rng.choice([bounds[0], bounds[1], -1, 0, rng.randint(*bounds)])


def odd_float(rng: random.Random) -> float:
    return rng.choice([math.nan, math.inf, -math.inf, -0.0, 0.0, -1.0, 1e-45, 1e-30, 1e30,
                       3.4e38, -3.4e38, 2.0, 0.5])


def model_name(rng: random.Random, valid: list[str], others: list[str]) -> str:
    """Mostly a valid name for the RPC; else one of the wrong task, unknown or hostile."""
    roll = rng.random()
    if roll < 0.75 and valid:
        return rng.choice(valid)
    if roll < 0.85 and others:
        return rng.choice(others)
    if roll < 0.95:
        return rng.choice(ODD_NAMES)
    return long_string(rng)


def v2_version(rng: random.Random, versions: tuple[int, ...]) -> str:
    roll = rng.random()
    if roll < 0.6:
        return ""
    if roll < 0.8:
        return str(rng.choice(versions))
    if roll < 0.97:
        return rng.choice(V2_VERSIONS)
    return long_string(rng)


# -- state tokens ----------------------------------------------------------------------
# Layout (serving/engine/state_tokens.py): magic "RCS", format u8, key id 4 bytes,
# issued u64, version u32, position u64, ... ; the position is at byte 20.
TOKEN_POSITION = struct.Struct("<Q")


def token_position(token: bytes) -> int | None:
    """The position a state token carries (unauthenticated: only for checks)."""
    if len(token) < 28 or token[:3] != b"RCS":
        return None
    return TOKEN_POSITION.unpack_from(token, 20)[0]


def forged_token(rng: random.Random, token: bytes) -> tuple[str, bytes]:
    """(what was done, the token) altered so that it must not authenticate."""
    kind = rng.randrange(7)
    if not token:
        return "random bytes", rng.randbytes(rng.randint(1, 200))
    if kind == 0:
        i = rng.randrange(len(token))
        return f"bit {i * 8} flipped", token[:i] + bytes([token[i] ^ (1 << rng.randrange(8))]) \
            + token[i + 1:]
    if kind == 1:
        return "truncated", token[: rng.randrange(1, len(token))]  # empty would be no token
    if kind == 2:
        return "bytes appended", token + rng.randbytes(rng.randint(1, 64))
    if kind == 3 and len(token) >= 28:  # another position, as a client rewinding would
        forged = bytearray(token)
        position = token_position(token)
        forged[20:28] = TOKEN_POSITION.pack(rng.choice(
            [p for p in (0, 1, 2**63, 2**64 - 1) if p != position]))
        return "position rewritten", bytes(forged)
    if kind == 4:
        return "MAC zeroed", token[:-32] + bytes(32)
    if kind == 5:
        return "magic only", b"RCS" + rng.randbytes(rng.randint(0, 80))
    return "empty state, MAC kept", token[:60] + token[-32:]


# -- protobuf bytes --------------------------------------------------------------------
def with_invalid_utf8(rng: random.Random, message, setter) -> bytes:
    """`message` serialized with invalid UTF-8 in the string field that `setter(message,
    placeholder)` sets (protobuf's own serializer refuses it, so it is patched in)."""
    bad = rng.choice(INVALID_UTF8)
    placeholder = "\x7f" * len(bad)
    setter(message, placeholder)
    payload = message.SerializeToString()
    return payload.replace(placeholder.encode(), bad, 1)


def garbage(rng: random.Random) -> bytes:
    """Bytes that are mostly not a valid message of any type."""
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randbytes(rng.randint(1, 300))
    if kind == 1:  # a field with a length prefix longer than the message
        return bytes([0x0A, 0xFF, 0xFF, 0x03]) + rng.randbytes(8)
    if kind == 2:  # wrong wire types for field 1
        return bytes([0x0D]) + rng.randbytes(2)
    return bytes([0x08]) + b"\xff" * 11  # a varint longer than 10 bytes


_LONG_RUN = re.compile(r'"((?:[^"\\]|\\.){60,})"')


def describe(message) -> str:
    """A message as one line of text format, long strings shortened to their start and
    length, at most 600 characters: what a report shows of a request (a list: the messages
    of a stream)."""
    if isinstance(message, list):
        shown = "[" + "; ".join(describe(m) for m in message[:8]) + \
            (f"; ... {len(message)} messages]" if len(message) > 8 else "]")
        return shown if len(shown) <= 1500 else shown[:1500] + f"...<{len(shown)} chars>"
    if isinstance(message, bytes | bytearray):
        return f"raw bytes {bytes(message[:40])!r}{'...' if len(message) > 40 else ''} " \
               f"({len(message)} bytes)"
    shown = text_format.MessageToString(message, as_one_line=True, as_utf8=True)
    shown = _LONG_RUN.sub(lambda m: f'"{m[1][:24]}...<{len(m[1])} chars>"', shown)
    return shown if len(shown) <= 600 else shown[:600] + f"...<{len(shown)} chars>"
