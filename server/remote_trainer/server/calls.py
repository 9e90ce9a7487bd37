"""The call a worker thread runs: its deadline, whether its client went away, and how that is noticed.

Servicer methods run on worker threads (server/dispatch.py) while the event loop keeps the gRPC call;
``current_call()`` is how the work asks whether its client still waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from remote_trainer.engine.errors import Abandoned

T = TypeVar("T")


@dataclass
class Call:
    """What a running call knows of its client: when its deadline passes and whether it went away.

    Work checks ``still_wanted()`` right before it commits a change to a session, so a call the
    client saw fail (DEADLINE_EXCEEDED, CANCELLED) changes nothing; ``check()`` raises ``Abandoned``.
    Thread-safe: the flag is set on the event loop, read on worker threads.
    """

    deadline: float | None = None  # time.monotonic() by which the client wants its answer
    gone: threading.Event = field(default_factory=threading.Event)

    def still_wanted(self) -> bool:
        return self.outcome() is None

    def remaining(self) -> float | None:
        """Seconds until the deadline (None: no deadline)."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def outcome(self) -> str | None:
        """None while the client waits; else DEADLINE_EXCEEDED or CANCELLED."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "DEADLINE_EXCEEDED"
        return "CANCELLED" if self.gone.is_set() else None

    def check(self, doing: str) -> None:
        """Raises ``Abandoned`` when the client no longer waits for ``doing``."""
        outcome = self.outcome()
        if outcome is not None:
            why = "its deadline passed" if outcome == "DEADLINE_EXCEEDED" else "it was cancelled"
            raise Abandoned(f"{doing} not done: {why} first", outcome)


_CALL: contextvars.ContextVar[Call] = contextvars.ContextVar("call")


def current_call() -> Call:
    """The call the current worker thread runs (one that is always wanted outside a call)."""
    return _CALL.get(Call())


def call_of(context: Any) -> Call:
    """The call of a gRPC servicer context, its deadline from the time the client gave it."""
    remaining = context.time_remaining()
    return Call(None if remaining is None else time.monotonic() + remaining)


def in_call(call: Call, work: Callable[[], T]) -> T:
    """Runs ``work`` (on a worker thread) as ``call``, after checking that its client still waits
    (a call whose deadline passed while it waited for its session's turn does not run at all)."""
    token = _CALL.set(call)
    try:
        call.check("the call")
        return work()
    finally:
        _CALL.reset(token)


async def run_as(call: Call, run: Callable[[Callable[[], T]], Awaitable[T]], work: Callable[[], T]) -> T:
    """``run(work)`` (off the event loop) as ``call``: when the client goes away (cancel, deadline)
    the call is marked gone at once, so work that has not committed yet drops what it did; the
    answer waits for the work to end."""
    task = asyncio.ensure_future(run(functools.partial(in_call, call, work)))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        call.gone.set()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise
