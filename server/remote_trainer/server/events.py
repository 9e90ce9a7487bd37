"""What the RPC layer tells the rest of the process as calls happen: the ``CallObserver`` protocol.

The servicer and the decorators report events (a call finished, a session trained or closed) to one
observer; the process (server/app.py) hands them one that fans out to whatever listens: the metrics
(server/metrics.py) and the TensorBoard log (server/tensorboard.py). So the RPC layer imports neither.
Events are reported on the thread where they happen: ``call_finished`` on the event loop, the
training events on the call's worker thread while it holds its session's turn.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # the engine's protocol imports torch; events only pass sessions along
    from remote_trainer.engine.protocol import Engine


log = logging.getLogger(__name__)


class CallObserver(Protocol):
    """Listens to calls and sessions. Every event does nothing by default, so an observer subclasses
    this and implements only the events it wants."""

    def call_finished(self, method: str, session_id: str | None, code: str, seconds: float) -> None:
        """A call of ``method`` (on ``session_id``, None for calls on no session) ended with status
        ``code`` (a ``grpc.StatusCode`` name) after ``seconds``; a failed one before its status is sent."""
        return None

    def forwarded(self, session_id: str, began: float | None = None) -> None:
        """A forward ran on the session (a Forward, or the first part of a TrainStep); ``began`` is when
        it started (``time.monotonic()``), None for now."""
        return None

    def backwarded(self, session_id: str, session: Engine, loss: float | None, grad_norm: float | None,
                   step_count: int | None = None) -> None:
        """A backward ran on ``session`` (a Backward, or the middle of a TrainStep): its loss (when the
        server computed one) and gradient norm (when asked). ``step_count`` is the step count it ran at
        when the call knows it (it also stepped); None: the session's current one."""
        return None

    def stepped(self, session_id: str, session: Engine, step_count: int) -> None:
        """A call stepped ``session``'s optimizer (Step, Backward with step, TrainStep): now at ``step_count``."""
        return None

    def session_closed(self, session_id: str) -> None:
        """The session was closed (by its client, or as idle)."""
        return None


class Observers(CallObserver):
    """Observers as one: each event goes to each of them, in order. An observer that fails is logged
    and passed over: watching a call never fails it (its work may be done, its status not yet sent)."""

    def __init__(self, *observers: CallObserver) -> None:
        self._observers = observers

    def _each(self, event: str, *args: Any) -> None:
        for observer in self._observers:
            try:
                getattr(observer, event)(*args)
            except Exception:
                log.exception("observer %s failed on %s", type(observer).__name__, event)

    def call_finished(self, method: str, session_id: str | None, code: str, seconds: float) -> None:
        self._each("call_finished", method, session_id, code, seconds)

    def forwarded(self, session_id: str, began: float | None = None) -> None:
        self._each("forwarded", session_id, began)

    def backwarded(self, session_id: str, session: Engine, loss: float | None, grad_norm: float | None,
                   step_count: int | None = None) -> None:
        self._each("backwarded", session_id, session, loss, grad_norm, step_count)

    def stepped(self, session_id: str, session: Engine, step_count: int) -> None:
        self._each("stepped", session_id, session, step_count)

    def session_closed(self, session_id: str) -> None:
        self._each("session_closed", session_id)
