"""Sessions' events pushed to their watchers (``WatchSession``): the hub, an observer of the servicer.

The servicer reports what happens to sessions to its one observer (server/events.py); ``SessionEvents``
is one of the observers that app.py puts behind it, beside the metrics and the TensorBoard log, so no
training path knows of watchers. It turns those reports into a session's events (a step with its
loss, gradient norm, learning rate and throughput; a freeze, a new head, a checkpoint written or
loaded, a reset; the session's end), keeps each session's latest ``RECENT`` for a watcher that joins
late, and hands every event to the session's watchers.

A watcher never slows the session: an event is put in each watcher's buffer without waiting (on the
thread that reported it, the call's worker, under a lock held for a moment); when a watcher's buffer
is full its oldest event goes, and the next event it gets says how many it missed. A watcher waits
for its events on the event loop (``Watcher.events``), holding no thread and no session turn.
Watchers are bounded per session and in all (RESOURCE_EXHAUSTED).

The events are those of the calls this process serves: with the Ray backend, a front-end's watchers
see the calls made through that front-end (docs/watch.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from remote_trainer.engine.errors import ResourceExhausted, Unavailable
from remote_trainer.server.events import CallObserver, Change, CheckpointLoaded, Ending, HeadReplaced, OptimizerReplaced, WasReset
from remote_trainer.server.session_policy import DEFAULT_SESSION_ID

if TYPE_CHECKING:  # the engine's protocol imports torch; the hub only asks a session its learning rate
    from remote_trainer.engine.protocol import Engine

# A session's latest events kept for a watcher that joins late (WatchSessionRequest.recent, at most).
RECENT = 16
# Sessions with no watcher whose latest events are kept, the least recently active forgotten first
# (with the Ray backend a session closed through another front-end is never heard of here as closed).
KNOWN_SESSIONS = 4096


@dataclass(frozen=True)
class Stepped:
    """An optimizer step and the iteration it ended: the last backward's loss and gradient norm (None
    when that backward had none), the learning rate, the iteration's wall time (from its first
    forward; 0 without one) and the samples of its forwards."""

    step_count: int
    loss: float | None
    grad_norm: float | None
    learning_rate: float
    seconds: float
    samples: int

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Ended:
    """The last event of a watch: the session ended (``Ending``), or the server stops."""

    why: Ending | Literal["server_stopping"]


Happening = Stepped | Change | Ended


@dataclass(frozen=True)
class SessionEvent:
    """One event of a session: its number among the session's events here (from 1), when (Unix seconds)."""

    sequence: int
    unix_seconds: float
    what: Happening


@dataclass
class _Pending:
    """An event a watcher has not taken yet, and how many it missed just before it."""

    event: SessionEvent
    missed: int = 0


class Watcher:
    """One watch: the events made for it on any thread, taken on the event loop it was made on.

    Holds at most ``buffer`` events not taken yet; a new one past that drops the oldest, and the
    event after the dropped ones carries their number (``events`` yields it beside each event)."""

    def __init__(self, session_id: str, buffer: int) -> None:
        self.session_id = session_id
        self._buffer = buffer
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._pending: deque[_Pending] = deque()
        self._ready = asyncio.Event()
        self._wake_scheduled = False

    def push(self, event: SessionEvent) -> None:
        """Adds ``event`` without waiting (any thread): the oldest goes when the buffer is full."""
        with self._lock:
            carried = 0
            if len(self._pending) >= self._buffer:
                carried = self._pending.popleft().missed + 1  # the dropped one, and those missed before it
                if self._pending:
                    self._pending[0].missed += carried
                    carried = 0
            self._pending.append(_Pending(event, carried))
            if self._wake_scheduled:
                return
            self._wake_scheduled = True
        self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:  # on the loop
        with self._lock:
            self._wake_scheduled = False
        self._ready.set()

    async def events(self) -> AsyncIterator[tuple[SessionEvent, int]]:
        """Each event as it comes, with how many were missed just before it; ends after ``Ended``."""
        while True:
            with self._lock:
                item = self._pending.popleft() if self._pending else None
                if item is None:
                    self._ready.clear()
            if item is None:
                await self._ready.wait()
                continue
            yield item.event, item.missed
            if isinstance(item.event.what, Ended):
                return


@dataclass
class _Iteration:
    """What a session's iteration so far has done: since its first forward after the last step."""

    started: float | None = None  # time.monotonic() of its first forward
    samples: int = 0
    loss: float | None = None
    grad_norm: float | None = None


@dataclass
class _Session:
    sequence: int = 0
    recent: deque[SessionEvent] = field(default_factory=lambda: deque(maxlen=RECENT))
    watchers: set[Watcher] = field(default_factory=set)
    iteration: _Iteration = field(default_factory=_Iteration)
    # The optimizer's learning rate as last heard (None: ask the session at its next step). Asked
    # once, then told by the calls that replace the optimizer, so a step costs no call to the
    # session (with the Ray backend one to its actor); a load, a reset or a new head asks again.
    learning_rate: float | None = None


class SessionEvents(CallObserver):
    """The sessions' events and their watchers: at most ``max_watchers`` in all, ``per_session`` on
    one session, each buffering at most ``buffer`` events it has not taken. Thread-safe."""

    def __init__(self, max_watchers: int, per_session: int, buffer: int, clock: Callable[[], float] = time.time) -> None:
        self.max_watchers = max_watchers
        self.per_session = per_session
        self.buffer = buffer
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._watchers: set[Watcher] = set()
        self._closed = False

    # -- watching --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def watch(self, session_id: str) -> Iterator[tuple[Watcher, list[SessionEvent]]]:
        """A watcher of the session (on the event loop), with the session's latest events, until the
        block ends; RESOURCE_EXHAUSTED past the limits, UNAVAILABLE once the server stops."""
        sid = session_id or DEFAULT_SESSION_ID
        with self._lock:
            if self._closed:
                raise Unavailable("the server is stopping: watch again once it is back", "SERVER_STOPPING")
            if len(self._watchers) >= self.max_watchers:
                raise ResourceExhausted(
                    f"the server has {len(self._watchers)} watchers, its limit max_watchers={self.max_watchers}: "
                    "stop a watch first, or retry later", "TOO_MANY_WATCHERS", metadata={"limit": str(self.max_watchers)},
                )
            state = self._state(sid)
            if len(state.watchers) >= self.per_session:
                raise ResourceExhausted(
                    f"session {sid!r} has {len(state.watchers)} watchers, its limit max_watchers_per_session="
                    f"{self.per_session}: stop a watch of it first", "TOO_MANY_SESSION_WATCHERS",
                    metadata={"limit": str(self.per_session)},
                )
            watcher = Watcher(sid, self.buffer)
            state.watchers.add(watcher)
            self._watchers.add(watcher)
            latest = list(state.recent)
        try:
            yield watcher, latest
        finally:
            with self._lock:
                self._watchers.discard(watcher)
                if (known := self._sessions.get(sid)) is not None:
                    known.watchers.discard(watcher)

    def watching(self) -> int:
        """Watchers open now, all sessions together."""
        with self._lock:
            return len(self._watchers)

    def close(self) -> None:
        """The server stops: every watch gets its last event (``server_stopping``); no new one starts."""
        with self._lock:
            self._closed = True
            for state in self._sessions.values():
                if state.watchers:
                    self._publish(state, Ended("server_stopping"), keep=False)
                    state.watchers.clear()

    # -- what the servicer reports ---------------------------------------------------------------

    def forwarded(self, session_id: str, began: float | None = None, samples: int = 0) -> None:
        with self._lock:
            iteration = self._state(session_id).iteration
            if iteration.started is None:
                iteration.started = time.monotonic() if began is None else began
            iteration.samples += samples

    def backwarded(self, session_id: str, session: Engine, loss: float | None, grad_norm: float | None,
                   step_count: int | None = None) -> None:
        with self._lock:
            iteration = self._state(session_id).iteration
            iteration.loss, iteration.grad_norm = loss, grad_norm

    def stepped(self, session_id: str, session: Engine, step_count: int) -> None:
        now = time.monotonic()
        with self._lock:
            learning_rate = self._state(session_id).learning_rate
        if learning_rate is None:  # as the call left it (it holds the session's turn)
            learning_rate = session.describe().optimizer.lr
        with self._lock:
            state = self._state(session_id)
            state.learning_rate = learning_rate
            done, state.iteration = state.iteration, _Iteration()
            seconds = 0.0 if done.started is None else now - done.started
            self._publish(state, Stepped(step_count, done.loss, done.grad_norm, learning_rate, seconds, done.samples))

    def session_changed(self, session_id: str, change: Change) -> None:
        with self._lock:
            state = self._state(session_id)
            if isinstance(change, OptimizerReplaced):
                state.learning_rate = change.optimizer.lr
            elif isinstance(change, (CheckpointLoaded, WasReset, HeadReplaced)):
                state.learning_rate = None
            self._publish(state, change)

    def session_closed(self, session_id: str, ending: Ending = "closed") -> None:
        with self._lock:
            state = self._sessions.pop(session_id or DEFAULT_SESSION_ID, None)
            if state is not None:
                self._publish(state, Ended(ending), keep=False)
                state.watchers.clear()

    def call_finished(self, method: str, session_id: str | None, code: str, seconds: float, reason: str = "") -> None:
        if reason == "SESSION_LOST" and session_id is not None:  # a call met the session's Ray actor gone
            self.session_closed(session_id, "lost")
        elif reason == "SESSION_RESTARTED":  # the default session made again, fresh: its optimizer too
            with self._lock:
                self._state(DEFAULT_SESSION_ID).learning_rate = None

    # -- inside the lock -------------------------------------------------------------------------

    def _state(self, session_id: str) -> _Session:
        """The session's record (made when first heard of), as the most recently active."""
        sid = session_id or DEFAULT_SESSION_ID
        state = self._sessions.get(sid)
        if state is None:
            state = self._sessions[sid] = _Session()
            if len(self._sessions) > KNOWN_SESSIONS:
                quiet = next((s for s, known in self._sessions.items() if not known.watchers and s != sid), None)
                if quiet is not None:
                    del self._sessions[quiet]
        self._sessions.move_to_end(sid)
        return state

    def _publish(self, state: _Session, what: Happening, keep: bool = True) -> None:
        state.sequence += 1
        event = SessionEvent(state.sequence, self._clock(), what)
        if keep:
            state.recent.append(event)
        for watcher in state.watchers:
            watcher.push(event)
