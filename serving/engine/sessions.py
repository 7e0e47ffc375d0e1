"""Sessions: the stored state of a text read piece by piece.

A session holds its model's state after everything appended so far and, for language
models, the next-token distribution, so that an Append runs only its new tokens. The table
is bounded three ways: idle sessions expire after a TTL, and beyond `max_sessions` or
`max_session_bytes` the least recently used are evicted; optionally each client holds at
most `max_sessions_per_client`. A later request for a removed session is told which
happened (expired, evicted, closed, its model unloaded, or never existed): the ids of
removed sessions are remembered, up to a bound.

A session object is never replaced while it is held: an Append's result is stored only if
the table still holds the session it read, at the position it read (compare-and-set), so
no acknowledged Append is overwritten by another request's older state.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from serving.engine.errors import FailedPrecondition, NotFound, Overloaded, shown
from serving.engine.metrics import Metrics
from serving.engine.repository import LoadedModel

REMEMBERED_REMOVALS = 100_000
_GENERATIONS = itertools.count(1)
# What a session costs beyond its arrays' bytes: the Session object, its three ndarray
# headers, its lock, its id and its table entry (measured with tracemalloc,
# tests/test_sessions.py keeps the figure honest).
SESSION_OVERHEAD_BYTES = 1024


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
    client: str = ""  # who created it, for max_sessions_per_client
    # which incarnation of its id: one resumed anew under the same id is another session
    generation: int = field(default_factory=lambda: next(_GENERATIONS))
    # Appends to one session run one at a time, in arrival order (asyncio.Lock is FIFO).
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def nbytes(self) -> int:
        extra = 0 if self.next_logprobs is None else self.next_logprobs.nbytes
        if self.resume_state is not None and self.resume_state is not self.state:
            extra += self.resume_state.nbytes
        return self.state.nbytes + extra + SESSION_OVERHEAD_BYTES


class SessionLive(Exception):
    """A session with this id is held here already (it is never replaced)."""

    def __init__(self, session: Session):
        super().__init__(session.id)
        self.session = session


class SessionStore:
    def __init__(self, ttl_s: float, max_sessions: int, max_bytes: int, metrics: Metrics,
                 max_per_client: int = 0):
        self.ttl_s, self.max_sessions, self.max_bytes = ttl_s, max_sessions, max_bytes
        self.max_per_client = max_per_client
        self.metrics = metrics
        # least recently used first: the order of last_used, so expiry looks at the front
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._removed: OrderedDict[str, str] = OrderedDict()  # id -> why it went
        self._per_model: dict[LoadedModel, int] = {}  # sessions held on each version
        self._per_client: dict[str, int] = {}
        self.on_remove: list[Callable[[str], None]] = []  # called with each removed id
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def create(self, model: LoadedModel, state: np.ndarray, next_logprobs: np.ndarray | None,
               resume_state: np.ndarray | None = None, last_token: int = -1,
               session_id: str | None = None, position: int = 0,
               client: str = "") -> Session:
        """A new session; with `session_id`, one resumed from a state token. A session
        held under that id is never replaced: SessionLive carries it instead."""
        self.expire()
        if session_id is not None and (held := self._sessions.get(session_id)) is not None:
            raise SessionLive(held)
        if session_id is not None and self.was_closed(session_id):  # closed meanwhile
            raise FailedPrecondition("state_token", f"session {shown(session_id)} was "
                                     "closed on this server; its token does not reopen it",
                                     "SESSION_CLOSED")
        if self.max_per_client and self._per_client.get(client, 0) >= self.max_per_client:
            raise Overloaded(f"this client holds {self._per_client[client]} sessions, the "
                             f"server's limit max_sessions_per_client={self.max_per_client}: "
                             "close some (CloseSession) or wait for them to expire",
                             min(self.ttl_s, 60.0))
        session = Session(session_id or secrets.token_urlsafe(16), model, state.copy(),
                          None if next_logprobs is None else next_logprobs.copy(), position,
                          None if resume_state is None else resume_state.copy(), last_token,
                          client=client)
        if session.nbytes > self.max_bytes:
            raise Overloaded(f"one session of {model.label} needs {session.nbytes} bytes, more "
                             f"than max_session_bytes={self.max_bytes}", 1.0)
        self._removed.pop(session.id, None)
        self._sessions[session.id] = session
        self._per_model[model] = self._per_model.get(model, 0) + 1
        self._per_client[client] = self._per_client.get(client, 0) + 1
        self.bytes += session.nbytes
        self.metrics.sessions.labels(model.label).inc()
        while len(self._sessions) > self.max_sessions:
            self._remove(next(iter(self._sessions)), "evicted", "max_sessions")
        while self.bytes > self.max_bytes:
            self._remove(next(iter(self._sessions)), "evicted", "max_session_bytes")
        self._publish()
        return session

    def get(self, session_id: str, field_name: str = "session_id",
            touch: bool = True) -> Session:
        """The session, or NotFound saying why not; `touch`: it counts as used now (not
        for a request still being checked, which must not keep a session alive)."""
        session = self._sessions.get(session_id)
        now = time.monotonic()
        if session is not None and now - session.last_used > self.ttl_s:
            self._remove(session_id, "expired", "expired")
            self._publish()
            session = None
        if session is None:
            raise self._missing(session_id, field_name)
        if touch:
            session.last_used = now
            self._sessions.move_to_end(session_id)
        return session

    def peek(self, session_id: str) -> Session | None:
        """The session if held and not idle past the TTL, without touching it."""
        session = self._sessions.get(session_id)
        if session is None or time.monotonic() - session.last_used > self.ttl_s:
            return None
        return session

    def was_closed(self, session_id: str) -> bool:
        return self._removed.get(session_id) == "closed"

    def update(self, session: Session, read_at: int, state: np.ndarray,
               next_logprobs: np.ndarray | None, appended: int,
               resume_state: np.ndarray | None = None, last_token: int = -1) -> bool:
        """Stores a finished Append's result if the table still holds `session` at
        position `read_at`, where the Append read it (compare-and-set); returns whether
        it did."""
        if self._sessions.get(session.id) is not session or session.position != read_at:
            return False
        self.bytes -= session.nbytes
        session.state, session.next_logprobs = state, next_logprobs
        session.resume_state, session.last_token = resume_state, last_token
        session.position += appended
        session.last_used = time.monotonic()
        self._sessions.move_to_end(session.id)
        self.bytes += session.nbytes
        self._publish()
        return True

    def close(self, session_id: str) -> None:
        if session_id not in self._sessions:
            raise self._missing(session_id, "session_id")
        self._remove(session_id, "closed", None)
        self._publish()

    def discard(self, session_id: str, generation: int | None = None) -> bool:
        """Removes a session without a trace, as if never held here (its token can bring
        it back): one a failed request had just created, or one a stream held for its
        life. With `generation`, only that incarnation of the id; returns whether it was
        removed."""
        session = self._sessions.get(session_id)
        if session is None or generation is not None and session.generation != generation:
            return False
        self._remove(session_id, "discarded", None)
        self._removed.pop(session_id, None)
        self._publish()
        return True

    def expire(self) -> int:
        """Removes sessions idle past the TTL; returns how many. The table is in order of
        last use, so this looks only at the sessions it removes and one more."""
        deadline = time.monotonic() - self.ttl_s
        removed = 0
        while self._sessions:
            session = next(iter(self._sessions.values()))
            if session.last_used >= deadline:
                break
            self._remove(session.id, "expired", "expired")
            removed += 1
        if removed:
            self._publish()
        return removed

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
    def _remove(self, session_id: str, outcome: str, reason: str | None) -> None:
        session = self._sessions.pop(session_id)
        if (left := self._per_model[session.model] - 1) > 0:
            self._per_model[session.model] = left
        else:
            del self._per_model[session.model]
        if (left := self._per_client[session.client] - 1) > 0:
            self._per_client[session.client] = left
        else:
            del self._per_client[session.client]
        self.bytes -= session.nbytes
        self.metrics.sessions.labels(session.model.label).dec()
        if reason is not None:
            self.metrics.evictions.labels(reason).inc()
        self._removed[session_id] = outcome
        if len(self._removed) > REMEMBERED_REMOVALS:
            self._removed.popitem(last=False)
        for callback in self.on_remove:
            callback(session_id)

    def _missing(self, session_id: str, field_name: str) -> NotFound:
        outcome, name = self._removed.get(session_id), shown(session_id)
        if outcome == "expired":
            message, reason = f"expired after {self.ttl_s:g} s idle", "SESSION_EXPIRED"
        elif outcome == "evicted":
            message, reason = (f"was evicted to make room (max_sessions={self.max_sessions}, "
                               f"max_session_bytes={self.max_bytes})", "SESSION_EVICTED")
        elif outcome == "unloaded":
            message, reason = ("ended when its model version was unloaded (a state token "
                               "resumes it where that version is served)",
                               "SESSION_MODEL_UNLOADED")
        elif outcome == "closed":
            message, reason = "was closed", "SESSION_CLOSED"
        else:
            message, reason = ("does not exist (never existed, or closed long ago)",
                               "SESSION_NOT_FOUND")
        return NotFound(f"{field_name}: session {name} {message}", reason,
                        session_id=shown(session_id, quote=False))

    def _publish(self) -> None:
        self.metrics.session_bytes.set(self.bytes)
