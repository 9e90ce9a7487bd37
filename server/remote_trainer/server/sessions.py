"""The session store: every open session by id, who owns it, when it was last used, and the limits.

A request with an empty id means the default session, which every caller may use and which never
expires. Other sessions belong to the caller that created them: to anyone else they do not exist.

``Sessions`` is what the servicer needs of a store. ``SessionStore`` keeps the sessions in this
process; ``server/ray_backend/store.py``'s ``RaySessionStore`` keeps each in a Ray actor. Both hand
out engines through the ``Engine`` protocol, build them from plain data (a ``ModelSpec`` and an
``OptimizerSpec``) and apply the same rules (``session_policy.py``: limits, ownership, NOT_FOUND and
SESSION_EXPIRED), so the servicer does not know which backend it has.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from remote_trainer.engine.errors import Abandoned, NotFound
from remote_trainer.engine.memory import release_freed_memory
from remote_trainer.engine.models import ModelSpec
from remote_trainer.engine.optimizer import OptimizerSpec
from remote_trainer.engine.protocol import Engine
from remote_trainer.server.session_policy import (
    DEFAULT_SESSION_ID,
    REMEMBERED,
    Expired,
    SessionLimits,
    check_closable,
    may_use,
    missing,
)

__all__ = ["DEFAULT_SESSION_ID", "EngineFactory", "Sessions", "SessionStore"]

log = logging.getLogger(__name__)


# Builds a session's engine from plain data (SessionEngine.from_spec with the server's limits).
EngineFactory = Callable[[ModelSpec, OptimizerSpec], Engine]


class Sessions(Protocol):
    """What the servicer needs of a session store, whichever backend holds the sessions."""

    # Whether the sessions live in this process, so that finding one and its ``describe()`` answer
    # from memory without waiting (the servicer then answers DescribeSession on its event loop).
    in_process: bool

    @property
    def idle_seconds(self) -> float: ...

    @property
    def pending_seconds(self) -> float: ...

    def get(self, session_id: str, owner: str = "") -> Engine:
        """The session called ``session_id`` ("" or "default": the default session), if ``owner`` may use it."""
        ...

    def create(
        self, model: ModelSpec, optimizer: OptimizerSpec, owner: str = "", still_wanted: Callable[[], bool] = lambda: True
    ) -> tuple[str, Engine]:
        """A new session of ``owner`` (within the limits), built from the specs; its id and engine.
        Dropped, raising ``Abandoned``, when ``still_wanted()`` is false once it is built."""
        ...

    def close(self, session_id: str, owner: str = "") -> None:
        """Ends a session of ``owner``."""
        ...

    def visible_to(self, owner: str = "") -> list[tuple[str, Engine]]:
        """The sessions ``owner`` may use: the default session first, then its own in creation order."""
        ...

    def expire_idle(self, busy: Callable[[str], bool] = lambda sid: False) -> list[str]:
        """Closes the sessions idle longer than ``idle_seconds`` (never one that is ``busy``) and drops
        pending graphs unused for ``pending_seconds``; returns the closed sessions' ids."""
        ...

    def checkpoint_deleted(self, owner: str, path: str) -> None:
        """``owner`` deleted the checkpoint file ``path``: no session of theirs names it as its last
        checkpoint any more (the Ray backend's lost sessions do)."""
        ...

    def __len__(self) -> int: ...


@dataclass
class _Entry:
    engine: Engine
    owner: str
    last_used: float


class SessionStore:
    """Holds sessions by id, with their owners; enforces the session limits and idle expiry."""

    in_process = True

    def __init__(
        self,
        default: Engine,
        factory: EngineFactory,
        max_sessions: int,
        max_per_owner: int = 0,
        idle_seconds: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        pending_seconds: float = 0.0,
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._factory = factory
        self._sessions: dict[str, _Entry] = {DEFAULT_SESSION_ID: _Entry(default, "", clock())}
        self._limits = SessionLimits(max_sessions, max_per_owner)
        self._idle_seconds = idle_seconds
        self._pending_seconds = pending_seconds
        self._reserved: dict[str, int] = {}  # sessions being built, by owner, counted against the limits
        self._expired: OrderedDict[str, Expired] = OrderedDict()

    @property
    def idle_seconds(self) -> float:
        return self._idle_seconds

    @property
    def pending_seconds(self) -> float:
        return self._pending_seconds

    def get(self, session_id: str, owner: str = "") -> Engine:
        """The session called ``session_id`` ("" or "default": the default session), if ``owner`` may use it."""
        sid = session_id or DEFAULT_SESSION_ID
        with self._lock:
            entry = self._sessions.get(sid)
            if entry is not None and may_use(sid, entry.owner, owner):
                entry.last_used = self._clock()
                return entry.engine
        raise self._missing(session_id, owner)

    def _missing(self, session_id: str, owner: str) -> NotFound:
        """The NOT_FOUND for a session that is not there: expired (told only to its owner) or unknown."""
        with self._lock:
            expired = self._expired.get(session_id)
        return missing(session_id, owner, expired)

    def create(
        self, model: ModelSpec, optimizer: OptimizerSpec, owner: str = "", still_wanted: Callable[[], bool] = lambda: True
    ) -> tuple[str, Engine]:
        """Builds a session from the specs (outside the lock: it loads a model) and stores it under a new
        id, unless ``still_wanted()`` says the caller stopped waiting meanwhile: then the session is
        dropped (no one could ever use or close it) and ``Abandoned`` is raised."""
        with self._lock:
            self._limits.check_room("server", [(sid, e.owner) for sid, e in self._sessions.items()], owner, self._reserved)
            self._reserved[owner] = self._reserved.get(owner, 0) + 1
        try:
            engine = self._factory(model, optimizer)
        finally:
            with self._lock:
                self._reserved[owner] -= 1
        session_id = secrets.token_hex(16)  # unguessable: 128 random bits
        with self._lock:
            wanted = still_wanted()
            if wanted:
                self._sessions[session_id] = _Entry(engine, owner, self._clock())
        if not wanted:
            del engine
            release_freed_memory()
            log.info("session built for owner %s dropped: its CreateSession call ended first", owner or "-")
            raise Abandoned("the session was built but dropped: its caller stopped waiting", "ABANDONED")
        log.info("session %s created (owner %s)", session_id, owner or "-")
        return session_id, engine

    def close(self, session_id: str, owner: str = "") -> None:
        """Forgets a session; its memory is freed once in-flight calls on it finish."""
        check_closable(session_id)
        with self._lock:
            entry = self._sessions.get(session_id)
            mine = entry is not None and entry.owner == owner
            if mine:
                del self._sessions[session_id]
        if not mine:
            raise self._missing(session_id, owner)  # unknown, expired, or someone else's
        release_freed_memory()  # the session's memory back to the OS (unless a call still holds it)
        log.info("session %s closed", session_id)

    def expire_idle(self, busy: Callable[[str], bool] = lambda sid: False) -> list[str]:
        """Closes the sessions idle longer than the configured time; returns their ids.

        A session with a call running or waiting (``busy``) is not idle: its idle time starts anew.
        Pending graphs of sessions (the default one too) unused for ``pending_seconds`` are dropped.
        """
        now = self._clock()
        with self._lock:
            for sid, e in self._sessions.items():
                if busy(sid):
                    e.last_used = now
            unused = [(sid, e.engine, now - e.last_used) for sid, e in self._sessions.items()]
        if self._pending_seconds:
            for sid, engine, idle in unused:
                if idle > self._pending_seconds and engine.drop_pending(f"unused for {idle:.0f} s (pending_graph_seconds)"):
                    log.info("session %s: pending graph dropped after %.0f s unused", sid, idle)
        if not self._idle_seconds:
            return []
        with self._lock:
            stale = [
                sid for sid, e in self._sessions.items()
                if sid != DEFAULT_SESSION_ID and now - e.last_used > self._idle_seconds
            ]
            for sid in stale:
                entry = self._sessions.pop(sid)
                self._expired[sid] = Expired(entry.owner, now - entry.last_used)
            while len(self._expired) > REMEMBERED:
                self._expired.popitem(last=False)
        for sid in stale:
            log.info("session %s expired after %.0f s idle", sid, self._expired[sid].idle_seconds)
        if stale:
            release_freed_memory()
        return stale

    def visible_to(self, owner: str = "") -> list[tuple[str, Engine]]:
        """The sessions ``owner`` may use: the default session first, then its own in creation order."""
        with self._lock:
            return [
                (sid, e.engine) for sid, e in self._sessions.items() if may_use(sid, e.owner, owner)
            ]

    def checkpoint_deleted(self, owner: str, path: str) -> None:
        """Nothing to forget: a session in this process never outlives this process's knowledge of it."""

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)
