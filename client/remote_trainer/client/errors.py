"""One exception class per gRPC status code, carrying the server's ErrorInfo reason.

``from_rpc_error`` turns a ``grpc.RpcError`` into the matching ``TrainerError`` subclass. Catch
``TrainerError`` for any failure, or a subclass for one kind. ``reason`` is a ``Reason`` of the
catalogue (docs/errors.md): ``error.reason is Reason.SESSION_NOT_FOUND`` and
``error.reason == "SESSION_NOT_FOUND"`` both hold; a reason the catalogue lacks (a newer server's)
stays the plain string, and an error without ErrorInfo has the empty reason. The SDK raises it
``from None``, so an uncaught one prints its own traceback and one line, not gRPC's internals above
it; the ``grpc.RpcError`` it came from stays reachable as ``.rpc_error``.

There is no ``CancelledError`` here: CANCELLED is ``Cancelled`` (as google-api-core names it), so
that ``from remote_trainer.client import *`` or ``except CancelledError`` never means this SDK's
class where asyncio's was meant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from remote_trainer.contract.reasons import Reason, known


@dataclass(frozen=True)
class FieldViolation:
    """A bad field of the request, as the server named it."""

    field: str
    description: str


class TrainerError(Exception):
    """A failed call: the status code, the server's message, its reason and details."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    reason: Reason | str
    rpc_error: grpc.RpcError | None = None
    """The failed call as gRPC raised it (None for an error the SDK made itself)."""

    def __init__(
        self,
        message: str,
        reason: str = "",
        metadata: dict[str, str] | None = None,
        violations: tuple[FieldViolation, ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = known(reason)
        self.metadata = metadata or {}
        self.violations = violations

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}" + (f" [{self.reason}]" if self.reason else "")


class Cancelled(TrainerError):
    """CANCELLED: the call was cancelled (named as google-api-core names it, so that it does not
    shadow ``asyncio.CancelledError``, which a cancelled task raises)."""

    code = grpc.StatusCode.CANCELLED


class UnknownError(TrainerError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(TrainerError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(TrainerError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(TrainerError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(TrainerError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(TrainerError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(TrainerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(TrainerError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(TrainerError):
    code = grpc.StatusCode.ABORTED


class OutOfRangeError(TrainerError):
    code = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(TrainerError):
    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(TrainerError):
    code = grpc.StatusCode.INTERNAL


class UnavailableError(TrainerError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLossError(TrainerError):
    code = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(TrainerError):
    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[TrainerError]] = {
    cls.code: cls
    for cls in (
        Cancelled, UnknownError, InvalidArgumentError, DeadlineExceededError, NotFoundError,
        AlreadyExistsError, PermissionDeniedError, ResourceExhaustedError, FailedPreconditionError,
        AbortedError, OutOfRangeError, UnimplementedError, InternalError, UnavailableError,
        DataLossError, UnauthenticatedError,
    )
}


def from_rpc_error(error: grpc.RpcError) -> TrainerError:
    """The ``TrainerError`` subclass for a failed call, with ErrorInfo and BadRequest unpacked."""
    # A failed grpc.aio call (AioRpcError) answers code(), details() and trailing_metadata() as a grpc.Call does.
    call = cast(grpc.Call, error) if isinstance(error, (grpc.Call, grpc.aio.AioRpcError)) else None
    code = call.code() if call is not None else grpc.StatusCode.UNKNOWN
    message = (call.details() if call is not None else str(error)) or ""
    reason = ""
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    try:
        status = rpc_status.from_call(call) if call is not None else None
    except ValueError:  # details that do not match the status code: keep code and message only
        status = None
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(info):
                reason = info.reason
                metadata = dict(info.metadata)
            elif detail.Unpack(bad):
                violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
    cls = _BY_CODE.get(code, UnknownError)
    result = cls(message, reason, metadata, tuple(violations))
    result.rpc_error = error
    return result
