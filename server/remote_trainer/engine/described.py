"""A session's lock that keeps a description of what it guards, so a reader never waits for it.

ListSessions describes every session the caller sees. Waiting for each session's lock would hold a
worker thread for as long as any of them runs a long call (a Forward of a large batch), so that
enough ListSessions fill every worker and stall other sessions' calls. Instead the description is
made each time the lock is let go, and read without it while a call holds it.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

D = TypeVar("D")


class DescribedLock(Generic[D]):
    """A ``threading.Lock`` (``with lock:``) that, as its holder lets go, keeps ``describe()`` of
    what it guards: ``now_or_last`` is the description now when the lock is free, else the one made
    when it was last let go (never waits, but for a description never made yet)."""

    def __init__(self, describe: Callable[[], D]) -> None:
        """``describe``: a bound method of the lock's holder, kept weakly: a lock that kept its holder
        alive would be a cycle, and a closed session's memory (and its share of the memory budget,
        ``engine/budget.py``) would wait for the garbage collector."""
        self._lock = threading.Lock()
        self._describe_method = weakref.WeakMethod(describe)
        self._last: D | None = None

    def _describe(self) -> D:
        describe = self._describe_method()
        if describe is None:
            raise ReferenceError("the lock's holder is gone")
        return describe()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self._keep()
        finally:
            self._lock.release()

    def _keep(self) -> None:
        try:
            self._last = self._describe()
        except Exception:  # a half-built session (its constructor's first uses): described next time
            log.debug("no description kept", exc_info=True)

    def now_or_last(self) -> D:
        if self._lock.acquire(blocking=self._last is None):
            try:
                self._last = self._describe()
            finally:
                self._lock.release()
        assert self._last is not None
        return self._last
