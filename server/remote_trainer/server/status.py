"""The one error map: domain errors to gRPC status codes with google.rpc details.

A ``TrainerError`` becomes its status code with ``ErrorInfo(reason, domain)`` (and ``BadRequest``
field violations for INVALID_ARGUMENT); a device out-of-memory becomes RESOURCE_EXHAUSTED; anything
else becomes INTERNAL with a safe message, its traceback logged. Imports no torch: a torch error can
only exist once torch is loaded, so it is recognised through ``sys.modules``. The decorators that
apply it to every servicer method are in server/rpc.py.
"""

from __future__ import annotations

import logging
import sys
import uuid
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from remote_trainer.contract.reasons import require
from remote_trainer.engine.errors import (
    Abandoned,
    DeadlineExceeded,
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
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,  # a request that stopped arriving (server/receive.py)
}
# Shutting down (UNAVAILABLE) and bad tokens (UNAUTHENTICATED, server/auth.py) are answered by gRPC
# and the auth interceptor before a servicer method runs.


def status_code(error: TrainerError) -> grpc.StatusCode:
    """The status code of a domain error (by its class or nearest base)."""
    for cls in type(error).__mro__:
        if cls in CODES:
            return CODES[cls]
    return grpc.StatusCode.INTERNAL


# A status travels in trailing metadata, which gRPC clients take up to 16 KiB of by default (past
# it the client sees RESOURCE_EXHAUSTED and no reason). The message goes twice (grpc-message,
# percent-encoded: up to 12 characters for one, and in grpc-status-details-bin, base64), so every
# text a status carries is cut to these lengths, whatever value of the client's it echoes; the
# whole stays under 12 KiB.
MAX_MESSAGE = 400
MAX_VALUE = 100  # an ErrorInfo metadata value, a violation's field
MAX_ITEMS = 8  # metadata entries and field violations


def short(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text``, cut to ``limit`` characters and saying how much was cut."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def to_status(code: grpc.StatusCode, message: str, reason: str, error: TrainerError | None = None) -> grpc.Status:
    """A rich status: code, message, ErrorInfo and, for field errors, BadRequest; every text cut
    to a size that arrives whole (``short``). ``reason`` must be in the catalogue (docs/errors.md)."""
    require(reason)
    metadata = list((error.metadata if error else {}).items())[:MAX_ITEMS]
    info = error_details_pb2.ErrorInfo(
        reason=short(reason, MAX_VALUE), domain=DOMAIN, metadata={short(k, MAX_VALUE): short(v, MAX_VALUE) for k, v in metadata}
    )
    details = [_pack(info)]
    if error is not None and error.violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=short(v.field, MAX_VALUE), description=short(v.description, 200))
                for v in error.violations[:MAX_ITEMS]
            ]
        )
        details.append(_pack(bad))
    proto = status_pb2.Status(code=code.value[0], message=short(message), details=details)
    return rpc_status.to_status(proto)


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def status_for(exc: BaseException, method: str) -> grpc.Status:
    """The status a call of ``method`` that raised ``exc`` answers with."""
    if isinstance(exc, Abandoned):  # no one is listening; logged and counted as the client saw it
        return to_status(grpc.StatusCode.CANCELLED, exc.message, exc.reason, exc)
    if isinstance(exc, TrainerError):
        return to_status(status_code(exc), exc.message, exc.reason, exc)
    torch = sys.modules.get("torch")  # loaded wherever a torch error can have been raised
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return to_status(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the device ran out of memory: {exc}".splitlines()[0], "DEVICE_OUT_OF_MEMORY")
    if isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc):
        # The CPU allocator's out-of-memory is a plain RuntimeError; its first line says how much.
        return to_status(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the server ran out of memory: {exc}".splitlines()[0], "OUT_OF_MEMORY")
    ref = uuid.uuid4().hex[:12]
    log.exception("%s failed with an unexpected error (ref %s)", method, ref)
    return to_status(grpc.StatusCode.INTERNAL, f"internal error in {method} (ref {ref}; see the server log)", "INTERNAL")
