"""Running blocking work (torch, file I/O) off the asyncio server's event loop.

Work runs on a bounded pool of worker threads, one call at a time per session: calls on a busy
session wait their turn on the event loop, holding no thread, so one session (or one client that
sends many calls to it) can occupy at most one worker while other sessions keep theirs. A call whose
client gives up still finishes its work before the next call on that session starts: the session
never runs two calls at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from remote_trainer.server.sessions import DEFAULT_SESSION_ID

T = TypeVar("T")



class Dispatcher:
    """A worker pool and one turn-taking gate per session with calls waiting or running."""

    def __init__(self, workers: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc")
        self._gates: dict[str, tuple[asyncio.Lock, int]] = {}  # session -> (gate, calls holding or waiting)

    async def run(self, session_id: str | None, work: Callable[[], T]) -> T:
        """``work()`` on a worker thread; after the session's earlier calls when ``session_id`` is given
        ("" is the default session), at once for calls on no session."""
        if session_id is None:
            return await self._on_worker(work)
        async with self._turn(session_id or DEFAULT_SESSION_ID):
            return await self._on_worker(work)

    async def _on_worker(self, work: Callable[[], T]) -> T:
        future = asyncio.get_running_loop().run_in_executor(self.pool, work)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The client went away; the thread cannot be stopped, so the session's turn lasts until
            # the work is done (its result is dropped).
            await asyncio.wait([future])
            raise

    @contextlib.asynccontextmanager
    async def _turn(self, session_id: str) -> AsyncIterator[None]:
        gate, count = self._gates.get(session_id, (asyncio.Lock(), 0))
        self._gates[session_id] = (gate, count + 1)
        try:
            async with gate:
                yield
        finally:
            gate, count = self._gates[session_id]
            if count == 1:
                del self._gates[session_id]  # no call left: the gate goes, so closed sessions leave nothing
            else:
                self._gates[session_id] = (gate, count - 1)

    def busy(self, session_id: str) -> bool:
        """Whether a call is running or waiting on the session (safe from any thread)."""
        return (session_id or DEFAULT_SESSION_ID) in self._gates

    def close(self) -> None:
        """Lets running work finish; starts no more."""
        self.pool.shutdown(wait=False, cancel_futures=True)
