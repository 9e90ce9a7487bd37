"""Flow control of server streams: messages a method makes without waiting, written as their reader
takes them, within a byte bound over all streams and a time bound per message.

A streaming method runs on a worker thread and hands each message to ``emit``, which never waits;
the event loop writes the messages meanwhile (``Outbox``), so sending overlaps the making and a slow
reader holds no thread. The messages waiting meanwhile count against ``StreamBytes``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import grpc

from remote_trainer.contract import wire
from remote_trainer.engine.errors import ResourceExhausted

Emit = Callable[[Any], None]  # how a streaming method sends a message: never waits


class StreamBytes:
    """Bytes of stream responses made and not yet written, all streams together, within ``limit``:
    a stream's method makes its responses without waiting for its reader (so a slow reader holds no
    thread), so the responses wait in memory instead, and this is what bounds them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        return self._held

    def take(self, n: int) -> None:
        """Counts ``n`` more bytes; raises ``ResourceExhausted`` (nothing counted) past the limit."""
        with self._lock:
            if self._held + n > self.limit:
                raise ResourceExhausted(
                    f"tensor streams hold {self._held} bytes their clients have not read yet, and this one would "
                    f"pass the server's limit of {self.limit} (max_stream_bytes): read the streams you opened "
                    "before opening more, or retry later",
                    "STREAMS_UNREAD", metadata={"limit": str(self.limit)},
                )
            self._held += n

    def give(self, n: int) -> None:
        with self._lock:
            self._held -= n


def size(message: Any) -> int:
    """The bytes a response message holds while it waits to be written."""
    return len(message.data) if isinstance(message, wire.Serialized) else int(message.ByteSize())


class SlowReader(Exception):
    """A stream's client took none of its messages for the stream's write timeout."""


class ReaderGone(Exception):
    """A stream's message could not be written: its client cancelled the call (or went away)."""


_END = object()


class Outbox:
    """One stream's messages between the worker thread that makes them (``emit``) and the event loop
    that writes them (``write_all``); made on the loop. ``producer_done`` ends it after the last
    message; ``close`` drops what was never written (and any message emitted later)."""

    def __init__(self, held: StreamBytes) -> None:
        self._held = held
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._closed = False  # set on the loop when the stream is over: later messages are dropped

    def emit(self, message: Any) -> None:  # on the worker thread
        self._held.take(size(message))  # past the limit: the method fails with RESOURCE_EXHAUSTED
        self._loop.call_soon_threadsafe(self._deliver, message)

    def _deliver(self, message: Any) -> None:  # on the loop
        if self._closed:
            self._held.give(size(message))
        else:
            self._queue.put_nowait(message)

    def producer_done(self, task: asyncio.Future[None]) -> None:  # on the loop, after every message emitted
        if not task.cancelled():
            task.exception()  # retrieved here too, for a stream that ended before the method did
        self._queue.put_nowait(_END)

    async def write_all(self, context: grpc.aio.ServicerContext[Any, Any], timeout: float) -> None:
        """Writes each message as the reader takes it, until the producer is done; ``SlowReader``
        when one is not taken within ``timeout`` seconds, ``ReaderGone`` when the call ended first."""
        while (message := await self._queue.get()) is not _END:
            try:
                # asyncio.timeout, not wait_for: no task of its own for each message.
                async with asyncio.timeout(timeout):
                    await context.write(message)
            except TimeoutError:
                raise SlowReader() from None
            except Exception as exc:  # gRPC's own (ExecuteBatchError): the call is over, no status can follow
                raise ReaderGone() from exc
            finally:
                self._held.give(size(message))

    def close(self) -> None:
        self._closed = True
        while not self._queue.empty():  # made and never to be sent
            if (left := self._queue.get_nowait()) is not _END:
                self._held.give(size(left))
