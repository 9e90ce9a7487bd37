"""How the Ray backend tells a lost session: the error its callers get, and how ListSessions shows it.

A session whose actor's process or node died stays in the registry as "lost" (``registry.py``) until
its owner closes it: a call on it answers UNAVAILABLE ``SESSION_LOST`` naming its last checkpoint
(``lost_error``), and ListSessions lists it with a description that says so (``lost_description``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from remote_trainer.engine.errors import Unavailable
from remote_trainer.engine.optimizer import OptimizerSpec
from remote_trainer.engine.results import SessionDescription
from remote_trainer.server.ray_backend.proxy import RayEngine
from remote_trainer.server.ray_backend.registry import Record

if TYPE_CHECKING:
    from remote_trainer.server.ray_backend.store import RaySessionStore


def lost_error(session_id: str, record: Record) -> Unavailable:
    """UNAVAILABLE SESSION_LOST, with the way back from the last checkpoint when there is one."""
    if record.checkpoint:
        hint = (f"its last checkpoint is {record.checkpoint!r} (step {record.checkpoint_step}): create a session "
                f"and LoadCheckpoint {record.checkpoint!r} to go on from there")
    else:
        hint = "it had no checkpoint (SaveCheckpoint, or the server's --checkpoint-every, makes them)"
    return Unavailable(
        f"session {session_id} was lost: the Ray node or process holding it died; {hint}",
        "SESSION_LOST",
        metadata={"checkpoint": record.checkpoint, "step_count": str(record.checkpoint_step)} if record.checkpoint else {},
    )


class Described(RayEngine):
    """A session as ListSessions shows it: described when listed (a lost one, without an actor, as lost)."""

    def __init__(self, store: RaySessionStore, session_id: str, owner: str, handle: Any, actor_id: str,
                 description: SessionDescription) -> None:
        super().__init__(store, session_id, owner, handle, actor_id)
        self._description = description

    def describe(self) -> SessionDescription:
        return self._description


def lost_description(record: Record) -> SessionDescription:
    """A lost session's description: its device says lost, and names the last checkpoint."""
    checkpoint = f" (last checkpoint {record.checkpoint!r})" if record.checkpoint else " (no checkpoint)"
    return SessionDescription(model="", weights="", device="lost" + checkpoint, num_classes=0,
                              optimizer=OptimizerSpec.tutorial(), step_count=record.checkpoint_step,
                              pending_forward_id=0, trainable_parameters=0, frozen_parameters=0)
