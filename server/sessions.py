"""The session store: every open session by id, the default one, and the limit on how many."""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable

from server.engine import SessionEngine
from server.errors import FailedPrecondition, NotFound, ResourceExhausted

log = logging.getLogger(__name__)

DEFAULT_SESSION_ID = "default"


class SessionStore:
    """Holds sessions by id. A request with an empty id means the default session."""

    def __init__(self, default: SessionEngine, max_sessions: int) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, SessionEngine] = {DEFAULT_SESSION_ID: default}
        self._max_sessions = max_sessions
        self._reserved = 0  # sessions being built, counted against the limit

    def get(self, session_id: str) -> SessionEngine:
        """The session called ``session_id`` ("" or "default": the default session)."""
        with self._lock:
            engine = self._sessions.get(session_id or DEFAULT_SESSION_ID)
        if engine is None:
            raise NotFound(f"no session {session_id!r} (closed, or never created)", "SESSION_NOT_FOUND")
        return engine

    def create(self, build: Callable[[], SessionEngine]) -> tuple[str, SessionEngine]:
        """Builds a session with ``build`` (outside the lock: it loads a model) and stores it under a new id."""
        with self._lock:
            if len(self._sessions) + self._reserved >= self._max_sessions:
                raise ResourceExhausted(
                    f"the server holds {len(self._sessions)} sessions, its limit max_sessions={self._max_sessions}; "
                    "close one first",
                    "TOO_MANY_SESSIONS",
                    metadata={"limit": str(self._max_sessions)},
                )
            self._reserved += 1
        try:
            engine = build()
        finally:
            with self._lock:
                self._reserved -= 1
        session_id = secrets.token_hex(16)  # unguessable: 128 random bits
        with self._lock:
            self._sessions[session_id] = engine
        log.info("session %s created", session_id)
        return session_id, engine

    def close(self, session_id: str) -> None:
        """Forgets a session; its memory is freed once in-flight calls on it finish."""
        if session_id in ("", DEFAULT_SESSION_ID):
            raise FailedPrecondition("the default session cannot be closed", "DEFAULT_SESSION")
        with self._lock:
            engine = self._sessions.pop(session_id, None)
        if engine is None:
            raise NotFound(f"no session {session_id!r} (closed, or never created)", "SESSION_NOT_FOUND")
        log.info("session %s closed", session_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)
