"""The SDK's one retry policy and a session's operation numbers, with no I/O: both faces run their
calls through ``Attempts`` and number a session's changes with ``Operations``.

**What is retried.** A failure is transient when the call may simply be made again: UNAVAILABLE
(but not the reasons in ``RetryPolicy.permanent_reasons``, such as the Ray backend's
``SESSION_LOST``: the session is gone), and the transport failures that gRPC reports under other
codes (INTERNAL or UNKNOWN whose details name a reset stream or socket,
``RetryPolicy.transport_details``). A transient failure is retried with bounded exponential backoff
and jitter, within the call's own deadline (each attempt gets the time left), so the caller sees an
exception only once the deadline is spent, the attempts are used up, or the failure is not
transient. Every call of the service is safe to retry: the read-only ones, ``CreateSession``,
``CloseSession`` and ``DeleteCheckpoint`` (which carry a ``client_token`` the server remembers) and
the calls that change a session, which carry an operation number (below). Attempts use ``wait_for_ready``: a call made
while the connection is down waits, within its deadline, for it to come back.

**Operation numbers.** A session's changing calls carry ``Operation(number=...)``, numbered 1, 2, 3,
... per session from ``SessionInfo.next_operation``; a number is taken when the call is made (so
calls pipelined on an event loop are numbered in the order they were made) and every retry of the
call reuses it, so the server runs it at most once and answers a repeat with the answer it gave.
A call that failed in any way makes the session's next numbered call carry ``supersede``: one that
failed in transit (DEADLINE_EXCEEDED, CANCELLED, UNAVAILABLE, a reset, an exception before its answer
came) may or may not have run, and one refused before the session's record (gRPC's own message
limit) did not use its number; superseding makes sure a late copy can never run after the next call,
and changes nothing when the number was used. Each number carries this client's id and the
session's numbering epoch (``SessionInfo.operation_epoch``): a repeat of another client's number, or
a call to a session made anew under the same id (a restarted server's default session), is refused
rather than answered or run. A server that does not number (``next_operation`` 0: one from before
numbering) gets the numbers, which it ignores, but no retries of changing calls. The handles one
client makes on a session share its numbers (a new handle asks for ``next_operation`` before its
first changing call).

**In flight.** At most ``IN_FLIGHT`` (64) numbered calls of one session are in flight from one
client: the server keeps a session's last 64 answers (engine/ledger.py), so a retried call is always
one it still remembers. A call made with 64 before it unfinished waits, within its deadline, until
the oldest has ended (in the order the calls were made: a call never waits behind a later one).
A client has at most ``CHANNEL_IN_FLIGHT`` (128) calls in flight on its channel, all sessions
together; the others wait, within their deadlines, in the order they were made: a connection carries
256 calls at once and the server refuses one past that (UNAVAILABLE: transient, and retried, but a
client that kept past it would be refused again and again).

**Deadlines.** Every call the SDK makes has one, the method's ``timeout`` or the client's (120 s
unless set), so no retry loop runs on; ``max_attempts`` bounds it too. Calls made through a
client's ``stub``, ``call`` and ``stream`` are the caller's own: one attempt, as given.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from remote_trainer.client import core
from remote_trainer.client.errors import DeadlineExceededError, TrainerError, UnavailableError

# Numbered calls of one session in flight from one client at once: the answers the server keeps.
IN_FLIGHT = 64
# Calls in flight on one client's channel at once: well below the 256 a connection carries, so the
# server never refuses one for the connection's limit (it may count a finished call a moment longer).
CHANNEL_IN_FLIGHT = 128


@dataclass(frozen=True)
class RetryPolicy:
    """How the SDK retries a call that failed transiently; ``client.retry_policy``.

    ``max_attempts`` counts the first attempt; the pause before retry ``n`` (1, 2, ...) is
    ``min(max_backoff, initial_backoff * multiplier ** (n - 1))`` seconds, scaled by a random
    factor in ``[1 - jitter, 1 + jitter]``; no pause reaches past the call's deadline.
    ``wait_for_ready`` makes an attempt wait for the connection (within the deadline) instead of
    failing at once while it is down. ``RetryPolicy.none()`` (or ``retry=None`` on a client) is
    one attempt that fails fast: the SDK's behaviour before it retried.

    What is transient: ``codes`` (UNAVAILABLE), except the server ``permanent_reasons``; and
    ``transport_codes`` (INTERNAL, UNKNOWN) when the details contain one of
    ``transport_details`` (how gRPC reports a connection that dropped mid-call).
    """

    max_attempts: int = 10
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2
    wait_for_ready: bool = True
    codes: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE})
    permanent_reasons: frozenset[str] = frozenset({"SESSION_LOST", "CHECKPOINT_DIR_NOT_WRITABLE", "CHECKPOINT_IO_ERROR"})
    transport_codes: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
    transport_details: tuple[str, ...] = ("RST_STREAM", "Stream removed", "Socket closed", "Connection reset")

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be 1 or more, got {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < self.initial_backoff or self.multiplier < 1:
            raise ValueError("need 0 <= initial_backoff <= max_backoff and multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be within [0, 1], got {self.jitter}")

    @classmethod
    def none(cls) -> RetryPolicy:
        """One attempt, failing fast when the server cannot be reached."""
        return cls(max_attempts=1, wait_for_ready=False)

    def transient(self, error: TrainerError) -> bool:
        """Whether ``error`` may go away if the call is made again."""
        if error.code in self.codes:
            return error.reason not in self.permanent_reasons
        return error.code in self.transport_codes and any(text in error.message for text in self.transport_details)

    def backoff(self, retry: int, uniform: Callable[[float, float], float] = random.uniform) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first retry)."""
        delay = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))
        return delay * uniform(1 - self.jitter, 1 + self.jitter)


def policy_of(retry: RetryPolicy | None) -> RetryPolicy:
    """The policy a client's ``retry`` argument means (None: ``RetryPolicy.none()``)."""
    return RetryPolicy.none() if retry is None else retry


class Attempts:
    """The attempts of one call within its deadline: how long each may take, whether and when the
    next one goes. ``retryable`` False: one attempt only."""

    def __init__(
        self, policy: RetryPolicy, timeout: float | None, retryable: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.retryable = retryable
        self.count = 0
        self.timeout = timeout
        self._clock = clock
        self._deadline = None if timeout is None else clock() + timeout

    def remaining(self) -> float | None:
        """Seconds left before the call's deadline (None: no deadline)."""
        return None if self._deadline is None else max(0.0, self._deadline - self._clock())

    def next(self) -> float | None:
        """Starts an attempt; returns its timeout, the time left."""
        self.count += 1
        return self.remaining()

    def delay(self, error: TrainerError) -> float | None:
        """Seconds to wait before the next attempt after ``error``, or None to give up (raise it)."""
        if not self.retryable or self.count >= self.policy.max_attempts or not self.policy.transient(error):
            return None
        pause = self.policy.backoff(self.count)
        left = self.remaining()
        return None if left is not None and pause >= left else pause


# What gRPC says when it found no server at the address (connection refused, no such host).
_NO_SERVER = ("failed to connect to all addresses", "Connection refused", "DNS resolution failed", "Failed to connect")


def final(error: TrainerError, attempts: Attempts, target: str, state: grpc.ChannelConnectivity) -> TrainerError:
    """The error to raise after the last attempt: as it came, except when no server answered at all.
    An attempt that waited for a connection (``wait_for_ready``) until its deadline, the connection
    still not READY, was never sent (DEADLINE_EXCEEDED would suggest a slow server), and one that
    failed fast is gRPC's "failed to connect to all addresses": both become UNAVAILABLE
    ``SERVER_UNREACHABLE``, saying which address and what to check (``unreachable``)."""
    if error.code is grpc.StatusCode.DEADLINE_EXCEEDED and attempts.policy.wait_for_ready:
        if state is grpc.ChannelConnectivity.READY:
            return error
        within = f" within {attempts.timeout:g} s" if attempts.timeout is not None else ""
        return unreachable(target, f"{within} (the connection is {state.name})", error)
    if error.code is grpc.StatusCode.UNAVAILABLE and not error.reason and any(t in error.message for t in _NO_SERVER):
        return unreachable(target, f" ({error.message})", error)
    return error


def unreachable(target: str, detail: str, error: TrainerError) -> UnavailableError:
    """UNAVAILABLE ``SERVER_UNREACHABLE``: no server at ``target`` answered; is one running there?"""
    port = target.rpartition(":")[2]
    start = f"trainer-server --port {port}" if port.isdigit() else "trainer-server"
    result = UnavailableError(
        f"no server at {target} answered{detail}: is it running? (`{start}` starts one there; or is the address wrong?)",
        "SERVER_UNREACHABLE",
    )
    result.rpc_error = error.rpc_error
    return result


@dataclass
class Operations:
    """The operation numbers of one session, shared by every handle on it made by one client.

    ``take`` hands out places in the order calls are made; ``begin`` learns where the session's
    numbering starts (its ``next_operation``) and a place's number is that plus the place. A place
    whose call ended in doubt is remembered until a later numbered call that superseded it was
    answered.
    """

    session_id: str
    client: str = ""  # this client's id, sent with every number (a repeat from another client is refused)
    epoch: str = ""  # the session's numbering (SessionInfo.operation_epoch): a session made anew refuses it
    start: int | None = None  # the number of place 0, once known
    numbering: bool = False  # the server numbers this session (retries of changing calls are safe)
    _taken: int = field(default=0, init=False)
    _doubt: int = field(default=-1, init=False)  # the highest place that ended in doubt, not superseded yet
    _oldest: int = field(default=0, init=False)  # every place before it has ended
    _ended: set[int] = field(default_factory=set, init=False)  # places after it that have ended
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _turns: threading.Condition = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._turns = threading.Condition(self._lock)

    @property
    def known(self) -> bool:
        return self.start is not None

    @property
    def next_number(self) -> int | None:
        """The number the next numbered call will carry (None until the start is known)."""
        return None if self.start is None else self.start + self._taken

    def begin(self, next_operation: int, epoch: str = "") -> None:
        """Learns the session's next number and its numbering's epoch from a ``SessionInfo`` (the
        first one learnt counts)."""
        with self._lock:
            if self.start is None:
                self.start = max(1, next_operation)
                self.numbering = next_operation >= 1
                self.epoch = epoch

    def take(self) -> int:
        """The next place, in the order calls are made."""
        with self._lock:
            self._taken += 1
            return self._taken - 1

    def may_start(self, place: int) -> bool:
        """Whether the call at ``place`` may be sent: fewer than ``IN_FLIGHT`` places before it are unfinished."""
        with self._lock:
            return self._has_room(place)

    def wait_turn(self, place: int, timeout: float | None) -> None:
        """Blocks until ``may_start(place)`` (the sync face); DEADLINE_EXCEEDED when ``timeout`` passes first."""
        with self._turns:
            if not self._turns.wait_for(lambda: self._has_room(place), timeout):
                raise waited_too_long()

    def _has_room(self, place: int) -> bool:  # under the lock
        return place < self._oldest + IN_FLIGHT

    def finish(self, place: int) -> None:
        """The call at ``place`` has ended: the calls waiting for their turn may go."""
        with self._turns:
            self._ended.add(place)
            while self._oldest in self._ended:
                self._ended.remove(self._oldest)
                self._oldest += 1
            self._turns.notify_all()

    def number(self, place: int) -> tuple[int, bool]:
        """The number of ``place`` and whether its call supersedes the places before it in doubt."""
        if self.start is None:
            raise RuntimeError("the session's first number is not known yet: begin() comes first")
        with self._lock:
            return self.start + place, 0 <= self._doubt < place

    def settle(self, place: int, doubtful: bool, superseded: bool) -> None:
        """Records how the call at ``place`` ended: in doubt, or answered (and then, if it carried
        ``supersede``, the places in doubt before it are given up on the server)."""
        with self._lock:
            if doubtful:
                self._doubt = max(self._doubt, place)
            elif superseded and self._doubt < place:
                self._doubt = -1


class Place:
    """One numbered call's place in its session's order, from when the call is made to its end."""

    def __init__(self, operations: Operations) -> None:
        self.operations = operations
        self.index = operations.take()
        self._superseding = False

    def stamp(self, request: object) -> None:
        """Puts the place's number in ``request``, before each attempt (``supersede`` as it stands now)."""
        number, self._superseding = self.operations.number(self.index)
        core.number(request, number, self._superseding, self.operations.client, self.operations.epoch)

    def end(self, error: BaseException | None) -> None:
        """Records how the call ended: answered, or failed. After any failure the session's next call
        supersedes this one: its number may be unused (refused before the session's record, or by
        gRPC's own limits) or in doubt (lost in transit), and superseding a number that was used
        changes nothing."""
        doubtful = error is not None
        self.operations.settle(self.index, doubtful, self._superseding)
        self.operations.finish(self.index)


def waited_too_long(limit: int = IN_FLIGHT, where: str = "on its session") -> DeadlineExceededError:
    """A call whose deadline passed while it waited for its turn (never sent)."""
    return DeadlineExceededError(
        f"the call's deadline passed while {limit} earlier calls {where} were still in flight; it was not sent",
        "CLIENT_CALLS_IN_FLIGHT",
    )
