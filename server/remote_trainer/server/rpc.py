"""The decorators that serve servicer methods on the asyncio server: ``@unary``, ``@streaming`` and ``@pushed``.

``@unary`` and ``@streaming`` run the method (blocking torch work) on a worker thread, one call at a
time per session, while waiting for the request, for the session or for a slow reader holds no
thread; a unary method marked ``@at_once`` (it answers from memory) runs on the event loop instead
when its session is free. ``@pushed`` serves a stream that waits for what it sends (a watch): the method is an async
generator on the event loop, which holds no thread and no session turn. What all three do
around the method is one context manager, ``_served``: the call is timed, reported to the servicer's
observer and logged in one line (method, session, status, duration), and any error goes through the
error map (server/status.py). Their log lines keep the logger ``remote_trainer.server.status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import Message

from remote_trainer.engine.errors import Abandoned, DeadlineExceeded, InvalidArgument, TrainerError
from remote_trainer.engine.operation import Operation
from remote_trainer.server.calls import Call, call_of, in_call, run_as
from remote_trainer.server.events import CallObserver
from remote_trainer.server.receive import Missing, Unreceived
from remote_trainer.server.status import status_for
from remote_trainer.server.streams import Emit, Outbox, ReaderGone, SlowReader, StreamBytes

# The logger operators (and the tests) filter the one line per call on, named before the error map
# moved out of the module that also served the calls.
log = logging.getLogger("remote_trainer.server.status")

S = TypeVar("S", bound="Servicer")
T = TypeVar("T")
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context = grpc.aio.ServicerContext[Any, Any]

# The call shape each decorator serves, marked on the methods it wraps so that registration can check
# it against the service descriptor (app.py).
UNARY_UNARY = "unary_unary"
UNARY_STREAM = "unary_stream"


def rpc_kind(client_streaming: bool, server_streaming: bool) -> str:
    """The kind of an RPC as its descriptor states it: one of the four gRPC call shapes."""
    return ("stream" if client_streaming else "unary") + "_" + ("stream" if server_streaming else "unary")


class Servicer(Protocol):
    """What the decorators need of a servicer: whom to tell of finished calls, how long a reader may
    stall a stream, the bound on unsent stream bytes, and a way to run blocking work off the event
    loop, one call at a time per session."""

    observer: CallObserver
    stream_write_timeout: float
    stream_bytes: StreamBytes

    async def run(self, session_id: str | None, work: Callable[[], T], operation: Operation | None = None) -> T: ...

    def free(self, session_id: str) -> bool:
        """Whether work that never waits may run on the session here and now, on the event loop:
        sessions in this process, none of the session's calls running or waiting."""
        ...


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request whose bytes did not parse, so the call is refused as the client's
    mistake (INVALID_ARGUMENT) rather than with gRPC's own INTERNAL "Exception deserializing request!"."""

    message_type: str
    error: str


def _session_of(request: object) -> str | None:
    """The session a request works on ("" is the default one), or None for calls on no session."""
    return getattr(request, "session_id", None)


def operation_of(request: Any, method: str, raw: memoryview | None = None, digest: bool = True) -> Operation | None:
    """The number a request that changes a session carries (``Operation``), or None when it is not
    numbered (no ``operation``, or number 0: run as it comes, as grpcurl's calls are). With ``digest``
    it carries what the request asks (``request_digest``, with ``raw``, the batch bytes the server cut
    out of it), so that a repeat that asks something else is refused; the dispatcher, which only
    orders calls, needs none."""
    if not hasattr(request, "operation") or not request.HasField("operation") or request.operation.number == 0:
        return None
    given = request.operation
    content = request_digest(request, raw) if digest else ""
    return Operation(given.number, method, given.supersede, given.client, given.epoch, content)


def request_digest(request: Message, raw: memoryview | None = None) -> str:
    """What a numbered request asks, as a short digest: every field but ``operation`` (a retry of the
    call may carry ``supersede`` where the first attempt did not) and ``session_id`` ("" and "default"
    name one session, whose record it is), and then ``raw``, by its length and CRC-32 (two batches of
    one size that differ agree there once in 2**32). A SharedTensor input is its place in the region,
    not the bytes there."""
    rest = type(request)()
    rest.CopyFrom(request)
    rest.ClearField("operation")
    rest.ClearField("session_id")
    digest = hashlib.sha256(rest.SerializeToString(deterministic=True))
    if raw is not None:  # a batch of many MB: its length and CRC-32 (5 GB/s here; SHA-256 is 2 GB/s)
        digest.update(b"raw%d:%d" % (len(raw), zlib.crc32(raw)))
    return digest.hexdigest()[:32]


def _abandoned_code(call: Call) -> grpc.StatusCode:
    return grpc.StatusCode.DEADLINE_EXCEEDED if call.outcome() == "DEADLINE_EXCEEDED" else grpc.StatusCode.CANCELLED


def _finish(servicer: Servicer, method: str, request: Any, code: grpc.StatusCode, start: float, reason: str = "") -> None:
    """Reports and logs a finished call. A call that fails is finished before its status is sent
    (``context.abort`` sends it at once), so a client that has seen the error finds it counted."""
    seconds = time.perf_counter() - start
    servicer.observer.call_finished(method, _session_of(request), code.name, seconds, reason)
    log.info(
        "rpc=%s session=%s status=%s duration_ms=%.1f",
        method, getattr(request, "session_id", "") or "-", code.name, seconds * 1000,
    )


@contextlib.asynccontextmanager
async def _served(servicer: Servicer, method: str, request: Any, context: Context, call: Call) -> AsyncIterator[None]:
    """Around one call: refuses a request that did not parse, never came or did not arrive whole in
    time (server/receive.py), times the call, maps its error to a status
    (sent with ``context.abort``) and finishes it exactly once, before any error status is sent."""
    start = time.perf_counter()
    code = grpc.StatusCode.OK
    finished = False
    try:
        if isinstance(request, Undecodable):
            raise InvalidArgument(f"the request is not a valid {request.message_type}: {request.error}", "MALFORMED_REQUEST")
        if isinstance(request, Missing):
            raise InvalidArgument("the call ended its request stream without a request message", "MALFORMED_REQUEST")
        if isinstance(request, Unreceived):
            raise DeadlineExceeded(
                f"the request did not arrive whole within {request.seconds:g} s of the call's start "
                "(request_receive_seconds): send it at once, or ask the operator for a longer limit",
                "REQUEST_NOT_RECEIVED",
            )
        yield
    except SlowReader:
        # The unsent message still occupies the stream, so no status can follow it: the call
        # is cancelled (the client sees CANCELLED), which frees the stream and what it held.
        code = grpc.StatusCode.CANCELLED
        log.warning("rpc=%s: the client read nothing for %.0f s; stream cancelled (stream_write_timeout_seconds)",
                    method, servicer.stream_write_timeout)
        raise asyncio.CancelledError() from None
    except ReaderGone:
        # The client cancelled a stream before reading it all: counted as it saw it, no traceback.
        code = _abandoned_code(call)
        raise asyncio.CancelledError() from None
    except asyncio.CancelledError:
        code = _abandoned_code(call)
        raise
    except grpc.aio.AbortError:  # context.abort's own way out: already answered
        raise
    except Exception as exc:
        status = status_for(exc, method)
        code = _abandoned_code(call) if isinstance(exc, Abandoned) else status.code
        reason = exc.reason if isinstance(exc, TrainerError) else ""
        _finish(servicer, method, request, code, start, reason)  # before the client can hear of it
        finished = True
        await context.abort(status.code, status.details, status.trailing_metadata)
        raise  # abort raises; this line is never reached
    finally:
        if not finished:
            _finish(servicer, method, request, code, start)


def _run(servicer: Servicer, method: str, request: Any, call: Call, work: Callable[[], T]) -> Coroutine[Any, Any, T]:
    """Runs ``work`` as ``call`` on a worker thread in its session's turn, and in its number's order
    when it is numbered (``Servicer.run``)."""
    session_id = _session_of(request)
    label = f"rpc={method} session={session_id or '-'}"

    def logged() -> T:
        log.debug("%s running", label)  # its session's turn is held from here to the end of work()
        return work()

    operation = operation_of(request, method, digest=False)
    return run_as(call, functools.partial(servicer.run, session_id, operation=operation), logged)


def at_once(method: Callable[[S, Req, Context], Resp]) -> Callable[[S, Req, Context], Resp]:
    """Marks a unary servicer method (under ``@unary``) whose work answers from memory and never
    waits (DescribeSession): when its session is free (``Servicer.free``) it runs on the event loop,
    saving the hop to a worker thread and back, which is most of what an empty call costs beyond
    gRPC's own. Run there, nothing else can run meanwhile, so it keeps its place in the session's
    order; on a busy session (or sessions elsewhere: Ray) it takes its turn as any other call."""
    method.at_once = True  # type: ignore[attr-defined]
    return method


def unary(method: Callable[[S, Req, Context], Resp]) -> Callable[[S, Req, Context], Coroutine[Any, Any, Resp]]:
    """Serves a unary servicer method: its answer is the method's return value."""
    quick = getattr(method, "at_once", False)

    @functools.wraps(method)
    async def wrapper(self: S, request: Req, context: Context) -> Resp:
        call = call_of(context)
        async with _served(self, method.__name__, request, context, call):
            work = functools.partial(method, self, request, context)
            session_id = _session_of(request)
            if quick and session_id is not None and self.free(session_id):
                response = in_call(call, work)
            else:
                response = await _run(self, method.__name__, request, call, work)
        return response

    wrapper.rpc_kind = UNARY_UNARY  # type: ignore[attr-defined]
    return wrapper


def streaming(
    method: Callable[[S, Req, Context, Emit], None],
) -> Callable[[S, Req, Context], Coroutine[Any, Any, None]]:
    """Serves a server-streaming servicer method: the method hands each message to ``emit`` as soon
    as it is made, which never waits; the event loop writes them meanwhile, so sending overlaps the
    making. Each message is written within the servicer's ``stream_write_timeout`` (a reader that
    stops reading is cancelled); the worker and the session's turn are held only while the method
    runs, however slowly the client reads; the messages waiting meanwhile count against the
    servicer's ``stream_bytes`` (an ``emit`` past its limit fails the method). A method that fails
    after some messages ends the stream with its error status."""

    @functools.wraps(method)
    async def wrapper(self: S, request: Req, context: Context) -> None:
        call = call_of(context)
        outbox = Outbox(self.stream_bytes)
        producer: asyncio.Future[None] | None = None
        async with _served(self, method.__name__, request, context, call):
            try:
                work = functools.partial(method, self, request, context, outbox.emit)
                producer = asyncio.ensure_future(_run(self, method.__name__, request, call, work))
                producer.add_done_callback(outbox.producer_done)
                await outbox.write_all(context, self.stream_write_timeout)
                await producer  # the method's error, if it failed
            finally:
                outbox.close()
                if producer is not None and not producer.done():
                    # The stream ended first (slow reader, client gone): the method's call is marked
                    # gone (its sender stops at the next tensor) and ends on its own.
                    producer.cancel()

    wrapper.rpc_kind = UNARY_STREAM  # type: ignore[attr-defined]
    return wrapper


def pushed(
    method: Callable[[S, Req, Context], AsyncGenerator[Resp, None]],
) -> Callable[[S, Req, Context], Coroutine[Any, Any, None]]:
    """Serves a server-streaming servicer method that waits for what it sends (events, as they
    happen): an async generator on the event loop, each message it yields written as the reader
    takes it. Waiting for the next message, or for a reader that does not read, holds no worker and
    no session's turn; the method hands any blocking work to ``Servicer.run`` itself, and bounds
    what it keeps for a slow reader itself. A method that fails ends the stream with its error
    status; a client that cancels ends the method (at its ``yield`` or where it waits)."""

    @functools.wraps(method)
    async def wrapper(self: S, request: Req, context: Context) -> None:
        call = call_of(context)
        async with _served(self, method.__name__, request, context, call):
            async with contextlib.aclosing(method(self, request, context)) as messages:
                async for message in messages:
                    try:
                        await context.write(message)
                    except Exception as exc:  # gRPC's own (ExecuteBatchError): the call is over, no status can follow
                        raise ReaderGone() from exc

    wrapper.rpc_kind = UNARY_STREAM  # type: ignore[attr-defined]
    return wrapper
