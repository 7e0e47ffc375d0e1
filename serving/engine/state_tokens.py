"""Portable sessions: a session's state in a compact token, authenticated with HMAC-SHA256.

Any replica holding the key resumes a session from its token, so sessions survive
restarts, evictions, scale-out and rollouts without sticky routing. The token carries the
model's name and version, the position, when it was issued, and the state. For a language
model that is the state *before* the last token read, plus that token: reading it again on
resume restores both the state and the next-token distribution (which at 4V bytes would
not fit in a token) exactly, at the cost of one token.

Layout (little-endian), then a 32-byte HMAC-SHA256 of everything before it:

    magic b"RCS" | format u8 | key id 4 bytes | issued u64 | version u32 | position u64 |
    last token i64 (-1: none) | layers u16 | state size u32 |
    model name (u8 length + UTF-8) | session id (u8 length + ASCII) | state f32[layers*size]

Keys come from a file (one per line, at least 16 bytes each; a Kubernetes Secret mounted
as a file): the first signs, all verify, so a key is rotated by adding the new one first,
rolling out, and removing the old one after the token lifetime.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"RCS"
FORMAT = 1
MAC_BYTES = 32
_HEADER = struct.Struct("<3sB4sQIQqHI")
MIN_KEY_BYTES = 16


class TokenRejected(Exception):
    """A token that cannot be used. `precondition` False: malformed, altered or forged
    (INVALID_ARGUMENT); True: genuine but unusable (expired, another model or version):
    FAILED_PRECONDITION."""

    def __init__(self, message: str, precondition: bool = False):
        super().__init__(message)
        self.precondition = precondition


@dataclass(frozen=True)
class Snapshot:
    model: str
    version: int
    position: int  # tokens read since the session began
    state: np.ndarray  # float32 [L, S]
    last_token: int  # language models: the token to read from `state`; -1 otherwise
    session_id: str
    issued: int = 0  # unix seconds; set when sealed


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"recur state token key\0" + key).digest()[:4]


class StateTokenKeys:
    def __init__(self, keys: list[bytes], ttl_s: float):
        if not keys:
            raise ValueError("state token keys: at least one key is needed")
        for number, key in enumerate(keys, 1):
            if len(key) < MIN_KEY_BYTES:
                raise ValueError(f"state token key {number} is {len(key)} bytes; at least "
                                 f"{MIN_KEY_BYTES} are needed")
        self.keys = {key_id(k): k for k in keys}
        self.signing = keys[0]
        self.ttl_s = ttl_s

    @classmethod
    def from_file(cls, path: str | Path, ttl_s: float) -> StateTokenKeys:
        lines = Path(path).read_bytes().splitlines()
        keys = [line.strip() for line in lines if line.strip() and not line.startswith(b"#")]
        try:
            return cls(keys, ttl_s)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def seal(self, snapshot: Snapshot, now: float | None = None) -> bytes:
        state = np.ascontiguousarray(snapshot.state, dtype="<f4")
        name, sid = snapshot.model.encode(), snapshot.session_id.encode("ascii")
        header = _HEADER.pack(MAGIC, FORMAT, key_id(self.signing),
                              int(time.time() if now is None else now), snapshot.version,
                              snapshot.position, snapshot.last_token, state.shape[0],
                              state.shape[1])
        body = (header + bytes([len(name)]) + name + bytes([len(sid)]) + sid
                + state.tobytes())
        return body + hmac.new(self.signing, body, hashlib.sha256).digest()

    def open(self, token: bytes, now: float | None = None) -> Snapshot:
        """The snapshot in a token this server can trust, or TokenRejected saying why."""
        if len(token) < _HEADER.size + 2 + MAC_BYTES or token[:3] != MAGIC:
            raise TokenRejected("not a state token (too short, or not one of Recur's)")
        body, mac = token[:-MAC_BYTES], token[-MAC_BYTES:]
        magic, fmt, kid, issued, version, position, last, layers, size = _HEADER.unpack_from(
            body)
        if fmt != FORMAT:
            raise TokenRejected(f"state token format {fmt} is not supported (expected "
                                f"{FORMAT})")
        key = self.keys.get(kid)
        if key is None:  # genuine perhaps, with a key retired since: not the client's fault
            raise TokenRejected("state token was signed with a key this server does not hold "
                                "(retired, or another deployment's)", precondition=True)
        if not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()):
            raise TokenRejected("state token failed authentication (altered or truncated)")
        # authentic from here on: what remains are checks of a genuine token
        offset = _HEADER.size
        name_length = body[offset]
        name = body[offset + 1 : offset + 1 + name_length].decode()
        offset += 1 + name_length
        sid_length = body[offset]
        sid = body[offset + 1 : offset + 1 + sid_length].decode("ascii")
        offset += 1 + sid_length
        state = np.frombuffer(body, "<f4", offset=offset).astype(np.float32)
        if state.size != layers * size:
            raise TokenRejected("state token holds a state of the wrong size")
        age = (time.time() if now is None else now) - issued
        if age > self.ttl_s:
            raise TokenRejected(f"state token expired ({age:.0f} s old; tokens last "
                                f"{self.ttl_s:g} s)", precondition=True)
        return Snapshot(name, version, position, state.reshape(layers, size), last, sid, issued)
