"""The rules every session store applies, whichever backend holds the sessions.

``SessionStore`` (``sessions.py``, sessions in this process) and the Ray backend's registry and store
(``ray_backend/``, sessions in a cluster) decide with these: who may use a session, whether one more
fits within the limits, and what a missing one answers. Plain functions over plain data: this module
imports neither torch nor ray, so the registry's actor loads it on a node without torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from remote_trainer.engine.errors import FailedPrecondition, NotFound, ResourceExhausted

DEFAULT_SESSION_ID = "default"
# Expired (and, with Ray, lost) sessions remembered to say so rather than "unknown", at most.
REMEMBERED = 10_000


def may_use(session_id: str, session_owner: str, owner: str) -> bool:
    """Whether ``owner`` may use the session: the default session anyone, any other its owner only."""
    return session_id == DEFAULT_SESSION_ID or session_owner == owner


def check_closable(session_id: str) -> None:
    """Refuses to close the default session ("" names it too)."""
    if session_id in ("", DEFAULT_SESSION_ID):
        raise FailedPrecondition("the default session cannot be closed", "DEFAULT_SESSION")


@dataclass(frozen=True)
class SessionLimits:
    """How many sessions a store holds (the default one included), in all and per owner (0: no limit)."""

    max_sessions: int
    max_per_owner: int = 0

    def check_room(
        self, place: str, held: Iterable[tuple[str, str]], owner: str, building: Mapping[str, int] | None = None
    ) -> None:
        """Raises RESOURCE_EXHAUSTED unless ``owner`` may have one more session. ``held``: (id, owner)
        of every session ``place`` ("server", "cluster") holds; ``building``: the sessions being built
        and not in ``held`` yet, by owner (they count against the limits, not in the messages)."""
        sessions = list(held)
        building = building or {}
        if len(sessions) + sum(building.values()) >= self.max_sessions:
            raise ResourceExhausted(
                f"the {place} holds {len(sessions)} sessions, its limit max_sessions={self.max_sessions}; close one first",
                "TOO_MANY_SESSIONS",
                metadata={"limit": str(self.max_sessions)},
            )
        owned = sum(1 for sid, session_owner in sessions if session_owner == owner and sid != DEFAULT_SESSION_ID)
        if self.max_per_owner and owned + building.get(owner, 0) >= self.max_per_owner:
            raise ResourceExhausted(
                f"this token holds {owned} sessions, its limit max_sessions_per_token={self.max_per_owner}; close one first",
                "TOO_MANY_SESSIONS_FOR_TOKEN",
                metadata={"limit": str(self.max_per_owner)},
            )


@dataclass(frozen=True)
class Expired:
    """A session closed for being idle: whose it was, and how long it had been idle."""

    owner: str
    idle_seconds: float


def missing(session_id: str, owner: str, expired: Expired | None) -> NotFound:
    """The NOT_FOUND for a session that is not there: expired (told only to its owner) or unknown."""
    if expired is not None and expired.owner == owner:  # to anyone else it never existed
        return NotFound(f"session {session_id!r} expired after {expired.idle_seconds:.0f} s without calls", "SESSION_EXPIRED")
    return NotFound(f"no session {session_id!r} (closed, or never created)", "SESSION_NOT_FOUND")
