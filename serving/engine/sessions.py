"""Sessions: the stored state of a text read piece by piece.

A session holds its model's state after everything appended so far and, for language
models, the next-token distribution, so that an Append runs only its new tokens. The table
is bounded three ways: idle sessions expire after a TTL, and beyond `max_sessions` or
`max_session_bytes` the least recently used are evicted. A later request for a removed
session is told which happened (expired, evicted, its model unloaded, or never existed):
the ids of removed sessions are remembered, up to a bound.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from serving.engine.errors import NotFound, Overloaded
from serving.engine.metrics import Metrics
from serving.engine.repository import LoadedModel

REMEMBERED_REMOVALS = 100_000


@dataclass(eq=False)
class Session:
    id: str
    model: LoadedModel
    state: np.ndarray  # [L, S]
    next_logprobs: np.ndarray | None  # [V], language models
    position: int = 0
    # What a state token carries (serving/engine/state_tokens.py): for language models the state
    # before the last token read, and that token; otherwise the state and -1.
    resume_state: np.ndarray | None = None
    last_token: int = -1
    last_used: float = field(default_factory=time.monotonic)
    # Appends to one session run one at a time, in arrival order (asyncio.Lock is FIFO).
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def nbytes(self) -> int:
        extra = 0 if self.next_logprobs is None else self.next_logprobs.nbytes
        if self.resume_state is not None and self.resume_state is not self.state:
            extra += self.resume_state.nbytes
        return self.state.nbytes + extra


class SessionStore:
    def __init__(self, ttl_s: float, max_sessions: int, max_bytes: int, metrics: Metrics):
        self.ttl_s, self.max_sessions, self.max_bytes = ttl_s, max_sessions, max_bytes
        self.metrics = metrics
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._removed: OrderedDict[str, str] = OrderedDict()  # id -> expired | evicted
        self._per_model: dict[LoadedModel, int] = {}  # sessions held on each version
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def create(self, model: LoadedModel, state: np.ndarray, next_logprobs: np.ndarray | None,
               resume_state: np.ndarray | None = None, last_token: int = -1,
               session_id: str | None = None, position: int = 0) -> Session:
        """A new session; with `session_id`, one resumed from a state token (replacing any
        copy held here)."""
        session = Session(session_id or secrets.token_urlsafe(16), model, state.copy(),
                          None if next_logprobs is None else next_logprobs.copy(), position,
                          None if resume_state is None else resume_state.copy(), last_token)
        if session.nbytes > self.max_bytes:
            raise Overloaded(f"one session of {model.label} needs {session.nbytes} bytes, more "
                             f"than max_session_bytes={self.max_bytes}", 1.0)
        self.expire()
        if session.id in self._sessions:
            self._remove(session.id, None, None)
        self._removed.pop(session.id, None)
        self._sessions[session.id] = session
        self._per_model[model] = self._per_model.get(model, 0) + 1
        self.bytes += session.nbytes
        self.metrics.sessions.labels(model.label).inc()
        while len(self._sessions) > self.max_sessions:
            self._remove(next(iter(self._sessions)), "evicted", "max_sessions")
        while self.bytes > self.max_bytes:
            self._remove(next(iter(self._sessions)), "evicted", "max_session_bytes")
        self._publish()
        return session

    def get(self, session_id: str, field_name: str = "session_id") -> Session:
        session = self._sessions.get(session_id)
        now = time.monotonic()
        if session is not None and now - session.last_used > self.ttl_s:
            self._remove(session_id, "expired", "expired")
            self._publish()
            session = None
        if session is None:
            raise self._missing(session_id, field_name)
        session.last_used = now
        self._sessions.move_to_end(session_id)
        return session

    def peek(self, session_id: str) -> Session | None:
        """The session if held and not idle past the TTL, without touching it."""
        session = self._sessions.get(session_id)
        if session is None or time.monotonic() - session.last_used > self.ttl_s:
            return None
        return session

    def update(self, session: Session, state: np.ndarray, next_logprobs: np.ndarray | None,
               appended: int, resume_state: np.ndarray | None = None,
               last_token: int = -1) -> None:
        """Stores a finished Append's result, unless the session was removed meanwhile."""
        if self._sessions.get(session.id) is not session:
            return
        self.bytes -= session.nbytes
        session.state, session.next_logprobs = state, next_logprobs
        session.resume_state, session.last_token = resume_state, last_token
        session.position += appended
        session.last_used = time.monotonic()
        self.bytes += session.nbytes
        self._publish()

    def close(self, session_id: str) -> None:
        if session_id not in self._sessions:
            raise self._missing(session_id, "session_id")
        self._remove(session_id, None, None)
        self._publish()

    def expire(self) -> int:
        """Removes sessions idle past the TTL; returns how many."""
        deadline = time.monotonic() - self.ttl_s
        stale = [sid for sid, s in self._sessions.items() if s.last_used < deadline]
        for session_id in stale:
            self._remove(session_id, "expired", "expired")
        if stale:
            self._publish()
        return len(stale)

    def count_on(self, model: LoadedModel) -> int:
        return self._per_model.get(model, 0)

    def remove_model(self, model: LoadedModel) -> int:
        """Removes the sessions of a version being unloaded; returns how many."""
        if not self.count_on(model):
            return 0
        gone = [sid for sid, s in self._sessions.items() if s.model is model]
        for session_id in gone:
            self._remove(session_id, "unloaded", "unloaded")
        if gone:
            self._publish()
        return len(gone)

    async def expire_forever(self) -> None:
        while True:
            await asyncio.sleep(min(max(self.ttl_s / 4, 0.05), 5.0))
            self.expire()

    # -- internals ------------------------------------------------------------------------
    def _remove(self, session_id: str, outcome: str | None, reason: str | None) -> None:
        session = self._sessions.pop(session_id)
        if (left := self._per_model[session.model] - 1) > 0:
            self._per_model[session.model] = left
        else:
            del self._per_model[session.model]
        self.bytes -= session.nbytes
        self.metrics.sessions.labels(session.model.label).dec()
        if outcome is not None:
            self.metrics.evictions.labels(reason).inc()
            self._removed[session_id] = outcome
            if len(self._removed) > REMEMBERED_REMOVALS:
                self._removed.popitem(last=False)

    def _missing(self, session_id: str, field_name: str):
        outcome = self._removed.get(session_id)
        if outcome == "expired":
            return NotFound(f"{field_name}: session {session_id!r} expired after "
                            f"{self.ttl_s:g} s idle", "SESSION_EXPIRED", session_id=session_id)
        if outcome == "evicted":
            return NotFound(f"{field_name}: session {session_id!r} was evicted to make room "
                            f"(max_sessions={self.max_sessions}, max_session_bytes="
                            f"{self.max_bytes})", "SESSION_EVICTED", session_id=session_id)
        if outcome == "unloaded":
            return NotFound(f"{field_name}: session {session_id!r} ended when its model "
                            "version was unloaded (a state token resumes it where that "
                            "version is served)", "SESSION_MODEL_UNLOADED",
                            session_id=session_id)
        return NotFound(f"{field_name}: no session {session_id!r} (never existed, or closed)",
                        "SESSION_NOT_FOUND", session_id=session_id)

    def _publish(self) -> None:
        self.metrics.session_bytes.set(self.bytes)
