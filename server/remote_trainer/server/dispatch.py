"""Running blocking work (torch, file I/O) off the asyncio server's event loop, in each session's order.

Work runs on a bounded pool of worker threads, one call at a time per session: calls on a busy
session wait their turn on the event loop, holding no thread, so one session (or one client that
sends many calls to it) can occupy at most one worker while other sessions keep theirs. A call whose
client gives up still finishes its work before the next call on that session starts: the session
never runs two calls at once.

Numbered calls (``Operation``, engine/ledger.py) take their turn in their number's order, not in the
order they arrived: a call whose number is ahead of the one the session expects waits (on the event
loop, before its turn, so the missing call can still take it) until the earlier ones have run, at
most ``ORDER_WAIT`` seconds; then the engine, which decides, refuses it. What the session expects is
learned from the answers: each numbered call that succeeded, an error that used its number (it says
the next one) and the engine's refusal of a call that came too early (it names the number it
expects), after which that call waits and is tried again, at least every ``ASK_AGAIN`` seconds (the
missing numbers may reach the session through another front-end, on the Ray backend).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from remote_trainer.engine.errors import TrainerError
from remote_trainer.engine.operation import Operation
from remote_trainer.server.sessions import DEFAULT_SESSION_ID

T = TypeVar("T")

log = logging.getLogger(__name__)

ORDER_WAIT = 10.0  # seconds a numbered call waits for the numbers before it
ASK_AGAIN = 1.0  # seconds between asking the engine again while a call waits for its turn
_KNOWN_SESSIONS = 4096  # sessions whose next number is remembered here (oldest forgotten first)


class Dispatcher:
    """A worker pool, one turn-taking gate per session with calls waiting or running, and the
    number each session expects next."""

    def __init__(self, workers: int, order_wait: float = ORDER_WAIT) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc")
        self._gates: dict[str, tuple[asyncio.Lock, int]] = {}  # session -> (gate, calls holding or waiting)
        self._expected: OrderedDict[str, int] = OrderedDict()  # session -> next number, as last heard
        self._heard: asyncio.Condition | None = None  # made on the event loop, at first use
        self._order_wait = order_wait

    async def run(self, session_id: str | None, work: Callable[[], T], operation: Operation | None = None) -> T:
        """``work()`` on a worker thread; after the session's earlier calls when ``session_id`` is given
        ("" is the default session), and after its lower numbers when ``operation`` is given (but
        for a call that supersedes them); at once for calls on no session."""
        if session_id is None:
            return await self._on_worker(work)
        sid = session_id or DEFAULT_SESSION_ID
        give_up_at = asyncio.get_running_loop().time() + self._order_wait
        while True:
            if operation is not None and not operation.supersede:
                await self._in_order(sid, operation.number, give_up_at)
            try:
                async with self._turn(sid):
                    result = await self._on_worker(work)
            except TrainerError as exc:
                if operation is None:
                    raise
                said = exc.metadata.get("expected" if exc.reason == "OPERATION_OUT_OF_ORDER" else "next_operation", "")
                if said.isdigit():
                    await self._hear(sid, int(said), exact=True)  # the engine's word, which may be lower than ours
                if exc.reason == "OPERATION_OUT_OF_ORDER" and asyncio.get_running_loop().time() < give_up_at:
                    continue  # it came before its turn: wait for the numbers before it, then try again
                raise
            if operation is not None:
                await self._hear(sid, operation.number + 1)
            return result

    async def _in_order(self, session_id: str, number: int, give_up_at: float) -> None:
        """Waits until the session expects ``number`` (or a later one: a repeat), ``give_up_at``, or
        ``ASK_AGAIN`` seconds (then the engine is asked again: another front-end may have run the
        missing numbers)."""
        if self._expected.get(session_id, number) >= number:
            return  # its turn already (the usual case): no waiting, no task for the timeout
        heard = self._condition()
        async with heard:
            expected = self._expected.get(session_id, number)
            if expected < number:
                log.debug("session %s: operation %d waits for operation %d", session_id, number, expected)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    heard.wait_for(lambda: self._expected.get(session_id, number) >= number),
                    max(0.0, min(ASK_AGAIN, give_up_at - asyncio.get_running_loop().time())),
                )

    async def _hear(self, session_id: str, expected: int, exact: bool = False) -> None:
        """The session expects ``expected`` next (from an answer: numbers only go up; ``exact``, the
        engine's own word); wakes the calls waiting for it."""
        heard = self._condition()
        async with heard:
            known = self._expected.get(session_id, 0)
            self._expected[session_id] = expected if exact else max(expected, known)
            self._expected.move_to_end(session_id)
            while len(self._expected) > _KNOWN_SESSIONS:
                self._expected.popitem(last=False)
            heard.notify_all()

    def _condition(self) -> asyncio.Condition:
        if self._heard is None:
            self._heard = asyncio.Condition()
        return self._heard

    async def _on_worker(self, work: Callable[[], T]) -> T:
        future = asyncio.get_running_loop().run_in_executor(self.pool, work)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The client went away; the thread cannot be stopped, so the session's turn lasts until
            # the work is done (its result is dropped).
            await asyncio.wait([future])
            if not future.cancelled():
                future.exception()  # dropped, as no one hears of it: not logged as "never retrieved"
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
