"""How a request's bytes are let in: a bounded number at a time, each within a time limit.

gRPC reads a unary request whole before the method sees it, and lets its client send as much as the
message's declared length (up to ``max_message_bytes``) the moment the call starts. A client that
declares large requests and then stops sending would make the server hold all of them, with nothing
to end the calls. So every method here is served as a call whose one request the server reads
itself (``one_request``): the read is started only when a receiving slot is free (``ReceiveGate``:
``max_receiving_bytes / max_message_bytes`` calls at once, half of them at most for one caller: its
token, or its connection when there are no tokens), and a request not received whole within
``request_receive_seconds`` of the call's start is refused (the call ends; gRPC frees what it had
taken in). Until its read starts, a call's stream may hold no more than HTTP/2's stream window
(``STREAM_WINDOW_BYTES``): what the server holds of requests in progress is bounded by the slots'
messages plus those windows. The wire is the same for clients: a unary call, answered once.
Strangers are refused at their headers, before any of this (server/auth.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

# The stream window each call starts with (gRPC's "lookahead"; HTTP/2's default is 64 KiB): what a
# client may send before the server reads. The server opens it to the whole message's length once it
# reads, so a large upload costs one more round trip, no more.
STREAM_WINDOW_BYTES = 64 * 1024

Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True)
class Unreceived:
    """Stands in for a request that did not arrive whole in time (refused by the method's wrapper,
    server/rpc.py, so the call is counted and logged as every other)."""

    seconds: float


@dataclass(frozen=True)
class Missing:
    """Stands in for the request of a call that ended its request stream without sending one."""


class ReceiveGate:
    """At most ``slots`` requests being received at once, at most ``per_caller`` of them one caller's."""

    def __init__(self, slots: int, per_caller: int) -> None:
        self.slots = slots
        self.per_caller = per_caller
        self._all = asyncio.Semaphore(slots)
        self._callers: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def slot(self, caller: str) -> AsyncIterator[None]:
        """Holds one slot of the caller's and one of all, waiting for them in turn."""
        own, users = self._callers.setdefault(caller, (asyncio.Semaphore(self.per_caller), [0]))
        users[0] += 1
        try:
            async with own, self._all:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._callers[caller]


def slots_for(max_receiving_bytes: int, max_message_bytes: int) -> tuple[int, int]:
    """Receiving slots in all and for one caller: as many largest requests as the budget holds (at
    least 2), half of them for one caller (at least 1)."""
    slots = max(2, max_receiving_bytes // max(1, max_message_bytes))
    return slots, max(1, slots // 2)


def one_request(
    implementation: Callable[[Any, Context], Awaitable[Any]],
    gate: ReceiveGate,
    seconds: float,
    caller: Callable[[Context], str],
) -> Callable[[AsyncIterator[Any], Context], Awaitable[Any]]:
    """Serves ``implementation`` (a unary-request method) as a client-streaming handler that reads the
    call's one request itself, in a slot of ``gate``, within ``seconds`` of the call's start."""

    async def handler(requests: AsyncIterator[Any], context: Context) -> Any:
        request: Any
        try:
            async with asyncio.timeout(seconds or None), gate.slot(caller(context)):
                request = await context.read()
        except TimeoutError:
            request = Unreceived(seconds)
        if request is grpc.aio.EOF:  # type: ignore[attr-defined]  # in grpc.aio, not in its stubs
            request = Missing()
        return await implementation(request, context)

    return handler
