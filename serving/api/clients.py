"""Who is calling, named the same way on every port (gRPC, HTTP), so that per-client
quotas (max_sessions_per_client) count a client once whichever front it uses: the hash of
the bearer token it presented where tokens are required (never the token itself), else
its address without the port."""

from __future__ import annotations

import hashlib


def bearer_credential(value: bytes | str) -> bytes:
    """The credential of an `authorization` value `Bearer <credential>` (the scheme in any
    case, the credential stripped), b"" for any other value."""
    raw = value.encode() if isinstance(value, str) else value
    scheme, _, credential = raw.partition(b" ")
    return credential.strip() if scheme.lower() == b"bearer" else b""


def token_client(token: bytes) -> str:
    return "token:" + hashlib.sha256(token).hexdigest()[:16]


def address_client(host: str) -> str:
    """An address's client name: an IPv6 address in brackets, as gRPC writes it."""
    return f"peer:[{host}]" if ":" in host and not host.startswith("[") else f"peer:{host}"
