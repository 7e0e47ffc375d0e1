"""State tokens: a round trip is exact; anything altered, truncated, forged or expired is
rejected with a reason, never misread."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.engine.state_tokens import Snapshot, StateTokenKeys, TokenRejected

KEY, OTHER = b"k" * 32, b"o" * 32
SNAPSHOT = Snapshot("demo-lm", 3, 17, np.arange(12, dtype=np.float32).reshape(2, 6) / 7, 42,
                    "abc-DEF_123")


def test_a_round_trip_is_exact_and_compact():
    keys = StateTokenKeys([KEY], ttl_s=60)
    token = keys.seal(SNAPSHOT, now=1000)
    opened = keys.open(token, now=1030)
    assert (opened.model, opened.version, opened.position, opened.last_token,
            opened.session_id, opened.issued) == ("demo-lm", 3, 17, 42, "abc-DEF_123", 1000)
    assert opened.state.dtype == np.float32 and np.array_equal(opened.state, SNAPSHOT.state)
    # the state, a 42-byte header, the two names with their lengths, the MAC
    assert len(token) == SNAPSHOT.state.nbytes + 42 + 2 + 7 + 11 + 32


def test_rotation_accepts_old_keys_and_signs_with_the_first():
    old = StateTokenKeys([OTHER], ttl_s=60).seal(SNAPSHOT, now=0)
    rotated = StateTokenKeys([KEY, OTHER], ttl_s=60)
    assert rotated.open(old, now=1).position == 17
    fresh = rotated.seal(SNAPSHOT, now=0)
    assert StateTokenKeys([KEY], ttl_s=60).open(fresh, now=1).position == 17
    with pytest.raises(TokenRejected, match="key this server does not hold"):
        StateTokenKeys([OTHER], ttl_s=60).open(fresh, now=1)


def test_forged_expired_and_truncated_tokens_are_rejected():
    keys = StateTokenKeys([KEY], ttl_s=60)
    token = keys.seal(SNAPSHOT, now=1000)
    with pytest.raises(TokenRejected, match="expired") as expired:
        keys.open(token, now=1061)
    assert expired.value.precondition
    with pytest.raises(TokenRejected, match="failed authentication") as altered:
        keys.open(token[:-40] + token[-39:] + b"x", now=1000)
    assert not altered.value.precondition
    for cut in (0, 3, 20, len(token) - 1):
        with pytest.raises(TokenRejected):
            keys.open(token[:cut], now=1000)
    with pytest.raises(TokenRejected, match="not a state token"):
        keys.open(b"hello, world" * 10)


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_altered_byte_is_caught(data):
    keys = StateTokenKeys([KEY], ttl_s=60)
    token = bytearray(keys.seal(SNAPSHOT, now=1000))
    position = data.draw(st.integers(0, len(token) - 1))
    token[position] ^= data.draw(st.integers(1, 255))
    with pytest.raises(TokenRejected):
        keys.open(bytes(token), now=1000)


def test_keys_come_from_a_file_and_must_be_long_enough(tmp_path):
    file = tmp_path / "keys"
    file.write_bytes(b"# newest first\n" + KEY + b"\n\n" + OTHER + b"\n")
    keys = StateTokenKeys.from_file(file, ttl_s=60)
    assert keys.signing == KEY and len(keys.keys) == 2
    file.write_bytes(b"short\n")
    with pytest.raises(ValueError, match="key 1 is 5 bytes; at least 16"):
        StateTokenKeys.from_file(file, ttl_s=60)
