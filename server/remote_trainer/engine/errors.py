"""Typed domain errors of the training service.

The torch work raises these; ``remote_trainer.server.status`` maps each kind to one gRPC status code in one table.
This module imports neither grpc nor the generated protobuf code, so the engine stays free of transport
(the catalogue of reasons, ``remote_trainer.contract.reasons``, is plain Python).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from remote_trainer.contract.reasons import require


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request (google.rpc.BadRequest.FieldViolation)."""

    field: str
    description: str


@dataclass
class TrainerError(Exception):
    """Base of every error a client can cause or meet.

    ``reason`` is an UPPER_SNAKE_CASE constant that clients can branch on (google.rpc.ErrorInfo), one
    of the catalogue's (``remote_trainer.contract.reasons``, docs/errors.md): an error made with any
    other fails where it is made, so the first test that raises it shows it.
    """

    message: str
    reason: str
    violations: tuple[FieldViolation, ...] = field(default=())
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(self.reason)
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[type[TrainerError], tuple[str, str, tuple[FieldViolation, ...], dict[str, str]]]:
        # Pickled whole (an engine in another process raises these): Exception's own pickling keeps
        # only the message.
        return type(self), (self.message, self.reason, self.violations, self.metadata)


class NotFound(TrainerError):
    """An unknown session or parameter."""


class InvalidArgument(TrainerError):
    """A malformed request: bad shape, dtype, bytes, values, pattern, option."""


class FailedPrecondition(TrainerError):
    """A call out of order, such as Backward with no pending forward."""


class ResourceExhausted(TrainerError):
    """A configured limit was reached, or the device ran out of memory."""


class Unavailable(TrainerError):
    """The service cannot do it now, through no fault of the request: the process or node holding
    the session died (``SESSION_LOST``) or did not answer in time, or a folder the server cannot
    write. The caller may retry later or recover, e.g. from the session's last checkpoint."""


class DeadlineExceeded(TrainerError):
    """The client did not do its part in time: its request stopped arriving before it was whole."""


class Abandoned(TrainerError):
    """The caller stopped waiting (its deadline passed, or it cancelled) before the work was committed,
    so nothing was changed. The client never sees this
    error (it has its own); it makes the server's log and metrics tell the real outcome."""


def invalid(field_name: str, message: str, reason: str) -> InvalidArgument:
    """An InvalidArgument about one field, carrying its BadRequest violation."""
    return InvalidArgument(message, reason, (FieldViolation(field_name, message),))
