"""What the RPC layer tells the rest of the process as calls happen: the ``CallObserver`` protocol.

The servicer and the decorators report events (a call finished, a session trained or closed) to one
observer; the process (server/app.py) hands them one that fans out to whatever listens: the metrics
(server/metrics.py) and the TensorBoard log (server/tensorboard.py). So the RPC layer imports neither.
Events are reported on the thread where they happen: ``call_finished`` on the event loop, the
training events (and a session's other changes) on the call's worker thread while it holds its
session's turn; ``session_closed`` on the thread that closed it (a call's, or the expiry thread).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:  # the engine's protocol imports torch; events only pass sessions along
    from remote_trainer.engine.optimizer import OptimizerSpec
    from remote_trainer.engine.protocol import Engine


log = logging.getLogger(__name__)

# Why a session ended: closed by its owner, closed for being idle, or its Ray actor gone.
Ending = Literal["closed", "expired", "lost"]


@dataclass(frozen=True)
class Froze:
    """A FreezeLayers call was taken: its patterns, and the parameters it changed, trainable and frozen after it."""

    patterns: tuple[str, ...]
    unfreeze: bool
    changed: int
    trainable: int
    frozen: int


@dataclass(frozen=True)
class HeadReplaced:
    """A new classifier head of ``num_classes``."""

    num_classes: int


@dataclass(frozen=True)
class OptimizerReplaced:
    """A ConfigureOptimizer call was taken: the new optimizer's settings."""

    optimizer: OptimizerSpec


@dataclass(frozen=True)
class CheckpointSaved:
    """A checkpoint of the session was written (``automatic``: by the server's ``checkpoint_every``)."""

    name: str
    step_count: int
    size_bytes: int
    automatic: bool = False


@dataclass(frozen=True)
class CheckpointLoaded:
    """The session was put in the state of checkpoint ``name``, at ``step_count``."""

    name: str
    step_count: int


@dataclass(frozen=True)
class WasReset:
    """The default session was put back as the server started it."""


# A change to a session other than training (``CallObserver.session_changed``).
Change = Froze | HeadReplaced | OptimizerReplaced | CheckpointSaved | CheckpointLoaded | WasReset


class CallObserver(Protocol):
    """Listens to calls and sessions. Every event does nothing by default, so an observer subclasses
    this and implements only the events it wants."""

    def call_finished(self, method: str, session_id: str | None, code: str, seconds: float, reason: str = "") -> None:
        """A call of ``method`` (on ``session_id``, None for calls on no session) ended with status
        ``code`` (a ``grpc.StatusCode`` name) after ``seconds``; a failed one before its status is sent,
        with the ``ErrorInfo`` reason of its status ("" when it has none)."""
        return None

    def forwarded(self, session_id: str, began: float | None = None, samples: int = 0) -> None:
        """A forward of ``samples`` (its batch size) ran on the session (a Forward, or the first part of
        a TrainStep); ``began`` is when it started (``time.monotonic()``), None for now."""
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

    def session_changed(self, session_id: str, change: Change) -> None:
        """The session was changed other than by training: layers frozen, head or optimizer replaced,
        checkpoint written or loaded, reset."""
        return None

    def session_closed(self, session_id: str, ending: Ending = "closed") -> None:
        """The session ended: closed by its client, ``expired`` as idle, or ``lost`` (its Ray actor is gone)."""
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

    def call_finished(self, method: str, session_id: str | None, code: str, seconds: float, reason: str = "") -> None:
        self._each("call_finished", method, session_id, code, seconds, reason)

    def forwarded(self, session_id: str, began: float | None = None, samples: int = 0) -> None:
        self._each("forwarded", session_id, began, samples)

    def backwarded(self, session_id: str, session: Engine, loss: float | None, grad_norm: float | None,
                   step_count: int | None = None) -> None:
        self._each("backwarded", session_id, session, loss, grad_norm, step_count)

    def stepped(self, session_id: str, session: Engine, step_count: int) -> None:
        self._each("stepped", session_id, session, step_count)

    def session_changed(self, session_id: str, change: Change) -> None:
        self._each("session_changed", session_id, change)

    def session_closed(self, session_id: str, ending: Ending = "closed") -> None:
        self._each("session_closed", session_id, ending)
