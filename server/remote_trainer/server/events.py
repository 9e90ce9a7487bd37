"""What the RPC layer tells the rest of the process as calls happen: the ``CallObserver`` protocol.

The servicer and the decorators report events (a call finished, a session trained or closed) to one
observer; the process (server/app.py) hands them one that fans out to whatever listens: the metrics
(server/metrics.py) and the TensorBoard log (server/tensorboard.py). So the RPC layer imports neither.
Events are reported on the thread where they happen: ``call_finished`` on the event loop, the
training events on the call's worker thread while it holds its session's turn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the engine's protocol imports torch; events only pass sessions along
    from remote_trainer.engine.protocol import Engine


class CallObserver(Protocol):
    """Listens to calls and sessions. Every event does nothing by default, so an observer subclasses
    this and implements only the events it wants."""

    def call_finished(self, method: str, session_id: str | None, code: str, seconds: float) -> None:
        """A call of ``method`` (on ``session_id``, None for calls on no session) ended with status
        ``code`` (a ``grpc.StatusCode`` name) after ``seconds``; a failed one before its status is sent."""
        return None

    def forwarded(self, session_id: str) -> None:
        """A Forward ran on the session."""
        return None

    def backwarded(self, session_id: str, session: Engine, loss: float | None, grad_norm: float | None) -> None:
        """A Backward ran on ``session``: its loss (when the server computed one) and gradient norm (when asked)."""
        return None

    def stepped(self, session_id: str, session: Engine, step_count: int) -> None:
        """A call stepped ``session``'s optimizer (Step, Backward with step, TrainStep): now at ``step_count``."""
        return None

    def session_closed(self, session_id: str) -> None:
        """The session was closed (by its client, or as idle)."""
        return None


class Observers(CallObserver):
    """Several observers as one: each event goes to each of them, in order."""

    def __init__(self, *observers: CallObserver) -> None:
        self._observers = observers

    def call_finished(self, method: str, session_id: str | None, code: str, seconds: float) -> None:
        for observer in self._observers:
            observer.call_finished(method, session_id, code, seconds)

    def forwarded(self, session_id: str) -> None:
        for observer in self._observers:
            observer.forwarded(session_id)

    def backwarded(self, session_id: str, session: Engine, loss: float | None, grad_norm: float | None) -> None:
        for observer in self._observers:
            observer.backwarded(session_id, session, loss, grad_norm)

    def stepped(self, session_id: str, session: Engine, step_count: int) -> None:
        for observer in self._observers:
            observer.stepped(session_id, session, step_count)

    def session_closed(self, session_id: str) -> None:
        for observer in self._observers:
            observer.session_closed(session_id)
