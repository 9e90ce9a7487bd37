"""The one error map: domain errors to gRPC status codes with google.rpc details, applied by a decorator.

Every servicer method is wrapped by ``@unary`` or ``@streaming``, which also serve it on the asyncio
server (blocking work on worker threads). A ``TrainerError`` becomes its status
code with ``ErrorInfo(reason, domain)`` (and ``BadRequest`` field violations for INVALID_ARGUMENT); a
device out-of-memory becomes RESOURCE_EXHAUSTED; anything else becomes INTERNAL with a safe message,
its traceback logged. Each call leaves one log line: method, session, status and duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

import grpc
import torch
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from remote_trainer.contract import wire
from remote_trainer.server.metrics import Metrics
from remote_trainer.engine.errors import (
    Abandoned,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TrainerError,
    Unavailable,
)

log = logging.getLogger(__name__)

DOMAIN = "trainer.v1"

# The table: each domain error kind and its status code.
CODES: dict[type[TrainerError], grpc.StatusCode] = {
    NotFound: grpc.StatusCode.NOT_FOUND,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,  # a session's process or node is gone (Ray), a folder not writable
}
# Shutting down (UNAVAILABLE) and bad tokens (UNAUTHENTICATED, server/auth.py) are answered by gRPC
# and the auth interceptor before a servicer method runs.


def status_code(error: TrainerError) -> grpc.StatusCode:
    """The status code of a domain error (by its class or nearest base)."""
    for cls in type(error).__mro__:
        if cls in CODES:
            return CODES[cls]
    return grpc.StatusCode.INTERNAL


def to_status(code: grpc.StatusCode, message: str, reason: str, error: TrainerError | None = None) -> grpc.Status:
    """A rich status: code, message, ErrorInfo and, for field errors, BadRequest."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=error.metadata if error else {})
    details = [_pack(info)]
    if error is not None and error.violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in error.violations
            ]
        )
        details.append(_pack(bad))
    proto = status_pb2.Status(code=code.value[0], message=message, details=details)
    return rpc_status.to_status(proto)


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _status_for(exc: BaseException, method: str) -> grpc.Status:
    if isinstance(exc, Abandoned):  # no one is listening; logged and counted as the client saw it
        return to_status(grpc.StatusCode.CANCELLED, exc.message, exc.reason, exc)
    if isinstance(exc, TrainerError):
        return to_status(status_code(exc), exc.message, exc.reason, exc)
    if isinstance(exc, torch.OutOfMemoryError):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return to_status(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the device ran out of memory: {exc}".splitlines()[0], "DEVICE_OUT_OF_MEMORY")
    if isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc):
        # The CPU allocator's out-of-memory is a plain RuntimeError; its first line says how much.
        return to_status(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the server ran out of memory: {exc}".splitlines()[0], "OUT_OF_MEMORY")
    ref = uuid.uuid4().hex[:12]
    log.exception("%s failed with an unexpected error (ref %s)", method, ref)
    return to_status(grpc.StatusCode.INTERNAL, f"internal error in {method} (ref {ref}; see the server log)", "INTERNAL")


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


def _call_of(context: Any) -> Call:
    remaining = context.time_remaining()
    return Call(None if remaining is None else time.monotonic() + remaining)


def _in_call(call: Call, label: str, work: Callable[[], T]) -> T:
    """Runs ``work`` on a worker thread as ``call``, after checking that its client still waits
    (a call whose deadline passed while it waited for its session's turn does not run at all)."""
    token = _CALL.set(call)
    try:
        call.check("the call")
        log.debug("%s running", label)  # its session's turn is held from here to the end of work()
        return work()
    finally:
        _CALL.reset(token)


async def _run_as(servicer: Servicer, method: str, session_id: str | None, call: Call, work: Callable[[], T]) -> T:
    """``servicer.run`` for ``call``: when the client goes away (cancel, deadline) the call is marked
    gone at once, so work that has not committed yet drops what it did; the answer waits for the
    work to end, as before."""
    label = f"rpc={method} session={session_id or '-'}"
    task = asyncio.ensure_future(servicer.run(session_id, functools.partial(_in_call, call, label, work)))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        call.gone.set()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise


def _abandoned_code(call: Call) -> grpc.StatusCode:
    return grpc.StatusCode.DEADLINE_EXCEEDED if call.outcome() == "DEADLINE_EXCEEDED" else grpc.StatusCode.CANCELLED


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request whose bytes did not parse, so the call is refused as the client's
    mistake (INVALID_ARGUMENT) rather than with gRPC's own INTERNAL "Exception deserializing request!"."""

    message_type: str
    error: str


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


def _size(message: Any) -> int:
    return len(message.data) if isinstance(message, wire.Serialized) else int(message.ByteSize())


class Servicer(Protocol):
    """What the decorators need of a servicer: its metrics, how long a reader may stall a stream, and
    a way to run blocking work off the event loop, one call at a time per session."""

    metrics: Metrics
    stream_write_timeout: float
    stream_bytes: StreamBytes

    async def run(self, session_id: str | None, work: Callable[[], T]) -> T: ...


def _finish(servicer: Servicer, method: str, request: Any, code: grpc.StatusCode, start: float) -> None:
    """Counts and logs a finished call. A call that fails is finished before its status is sent
    (``context.abort`` sends it at once), so a client that has seen the error finds it counted."""
    seconds = time.perf_counter() - start
    servicer.metrics.observe(method, code.name, seconds)
    log.info(
        "rpc=%s session=%s status=%s duration_ms=%.1f",
        method, getattr(request, "session_id", "") or "-", code.name, seconds * 1000,
    )


def _check_decoded(request: object) -> None:
    if isinstance(request, Undecodable):
        raise InvalidArgument(
            f"the request is not a valid {request.message_type}: {request.error}", "MALFORMED_REQUEST"
        )


def _session_of(request: object) -> str | None:
    """The session a request works on ("" is the default one), or None for calls on no session."""
    return getattr(request, "session_id", None)


async def _abort(context: grpc.aio.ServicerContext[Any, Any], status: grpc.Status) -> None:
    await context.abort(status.code, status.details, status.trailing_metadata)


# The call shape each decorator serves, marked on the methods it wraps so that registration can check
# it against the service descriptor (app.py).
UNARY_UNARY = "unary_unary"
UNARY_STREAM = "unary_stream"

S = TypeVar("S", bound=Servicer)
T = TypeVar("T")
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context = grpc.aio.ServicerContext[Any, Any]


def unary(method: Callable[[S, Req, Context], Resp]) -> Callable[[S, Req, Context], Coroutine[Any, Any, Resp]]:
    """Serves a unary servicer method on the asyncio server: the method itself (blocking torch work)
    runs on a worker thread, one call at a time per session, while waiting for the request or for
    the session holds no thread; errors go through the error map; one log line per call."""

    @functools.wraps(method)
    async def wrapper(self: S, request: Req, context: Context) -> Resp:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        finished = False
        call = _call_of(context)
        try:
            _check_decoded(request)
            return await _run_as(self, method.__name__, _session_of(request), call, functools.partial(method, self, request, context))
        except asyncio.CancelledError:
            code = _abandoned_code(call)
            raise
        except grpc.aio.AbortError:  # context.abort's own way out: already answered
            raise
        except Exception as exc:
            status = _status_for(exc, method.__name__)
            code = _abandoned_code(call) if isinstance(exc, Abandoned) else status.code
            _finish(self, method.__name__, request, code, start)  # before the client can hear of it
            finished = True
            await _abort(context, status)
            raise  # abort raises; this line is never reached
        finally:
            if not finished:
                _finish(self, method.__name__, request, code, start)

    wrapper.rpc_kind = UNARY_UNARY  # type: ignore[attr-defined]
    return wrapper


Emit = Callable[[Any], None]  # how a streaming method sends a message: never waits
_END = object()


def streaming(
    method: Callable[[S, Req, Context, Emit], None],
) -> Callable[[S, Req, Context], Coroutine[Any, Any, None]]:
    """Serves a server-streaming servicer method: the method runs on a worker thread (one call at a
    time per session) and hands each message to ``emit`` as soon as it is made, which never waits;
    the event loop writes them meanwhile, so sending overlaps the making. Each message is written
    within the servicer's ``stream_write_timeout`` (a reader that stops reading is cancelled); the
    worker and the session's turn are held only while the method runs, however slowly the client
    reads; the messages waiting meanwhile count against the servicer's ``stream_bytes`` (an
    ``emit`` past its limit fails the method). A method that fails after some messages ends the
    stream with its error status."""

    @functools.wraps(method)
    async def wrapper(self: S, request: Req, context: Context) -> None:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        finished = False
        call = _call_of(context)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        closed = False  # set on the loop when the stream is over: later messages are dropped
        held = self.stream_bytes

        def emit(message: Any) -> None:  # on the worker thread
            held.take(_size(message))  # past the limit: the method fails with RESOURCE_EXHAUSTED
            loop.call_soon_threadsafe(deliver, message)

        def deliver(message: Any) -> None:  # on the loop
            if closed:
                held.give(_size(message))
            else:
                queue.put_nowait(message)

        def ended(task: asyncio.Future[None]) -> None:  # on the loop, after every message emitted
            if not task.cancelled():
                task.exception()  # retrieved here too, for a stream that ended before the method did
            queue.put_nowait(_END)

        producer: asyncio.Future[None] | None = None
        try:
            _check_decoded(request)
            work = functools.partial(method, self, request, context, emit)
            producer = asyncio.ensure_future(_run_as(self, method.__name__, _session_of(request), call, work))
            producer.add_done_callback(ended)
            while (message := await queue.get()) is not _END:
                try:
                    await _write(self, context, message)
                finally:
                    held.give(_size(message))
            await producer  # the method's error, if it failed
        except SlowReader:
            # The unsent message still occupies the stream, so no status can follow it: the call
            # is cancelled (the client sees CANCELLED), which frees the stream and what it held.
            code = grpc.StatusCode.CANCELLED
            log.warning("rpc=%s: the client read nothing for %.0f s; stream cancelled (stream_write_timeout_seconds)",
                        method.__name__, self.stream_write_timeout)
            raise asyncio.CancelledError() from None
        except asyncio.CancelledError:
            code = _abandoned_code(call)
            raise
        except grpc.aio.AbortError:  # context.abort's own way out: already answered
            raise
        except Exception as exc:
            status = _status_for(exc, method.__name__)
            code = _abandoned_code(call) if isinstance(exc, Abandoned) else status.code
            _finish(self, method.__name__, request, code, start)  # before the client can hear of it
            finished = True
            await _abort(context, status)
            raise
        finally:
            closed = True
            while not queue.empty():  # made and never to be sent
                if (left := queue.get_nowait()) is not _END:
                    held.give(_size(left))
            if producer is not None and not producer.done():
                # The stream ended first (slow reader, client gone): the method's call is marked
                # gone (its sender stops at the next tensor) and ends on its own.
                producer.cancel()
            if not finished:
                _finish(self, method.__name__, request, code, start)

    wrapper.rpc_kind = UNARY_STREAM  # type: ignore[attr-defined]
    return wrapper


class SlowReader(Exception):
    """A stream's client took none of its messages for ``stream_write_timeout`` seconds."""


async def _write(servicer: Servicer, context: Context, message: Any) -> None:
    try:
        await asyncio.wait_for(context.write(message), servicer.stream_write_timeout)
    except asyncio.TimeoutError:
        raise SlowReader() from None


def rpc_kind(client_streaming: bool, server_streaming: bool) -> str:
    """The kind of an RPC as its descriptor states it: one of the four gRPC call shapes."""
    return ("stream" if client_streaming else "unary") + "_" + ("stream" if server_streaming else "unary")
