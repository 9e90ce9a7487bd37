"""Python SDK of the training service: ``TrainerClient``, ``Session``, results, errors (with their
``Reason``: docs/errors.md) and ``RetryPolicy``.

Needs grpcio, protobuf and numpy only; torch tensors are accepted as inputs when torch is installed
(``remote_trainer.client.remote.RemoteModel``, the server's model as an ``nn.Module``, needs torch).
"""

from remote_trainer.client.client import Session, TrainerClient
from remote_trainer.client.errors import (
    AbortedError,
    AlreadyExistsError,
    Cancelled,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    TrainerError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
)
from remote_trainer.client.retry import RetryPolicy
from remote_trainer.client.types import (
    BackwardResult,
    CheckpointEvent,
    CheckpointFile,
    EndEvent,
    ForwardResult,
    FreezeEvent,
    FreezeResult,
    Graph,
    HeadEvent,
    InputTransform,
    NamedTensor,
    Optimizer,
    ParameterInfo,
    ParameterList,
    ResetEvent,
    SessionEvent,
    SessionInfo,
    Stats,
    StepEvent,
    TrainStepResult,
)
from remote_trainer.contract.reasons import Reason

__all__ = [
    "AbortedError", "AlreadyExistsError", "BackwardResult", "Cancelled", "CheckpointEvent", "CheckpointFile", "DataLossError",
    "DeadlineExceededError", "EndEvent", "FailedPreconditionError", "FieldViolation", "ForwardResult", "FreezeEvent", "FreezeResult",
    "Graph", "HeadEvent", "InputTransform", "InternalError", "InvalidArgumentError", "NamedTensor", "NotFoundError", "Optimizer",
    "OutOfRangeError", "ParameterInfo", "ParameterList", "PermissionDeniedError", "Reason", "ResetEvent", "ResourceExhaustedError",
    "RetryPolicy", "Session", "SessionEvent", "SessionInfo", "Stats", "StepEvent", "TrainerClient", "TrainerError",
    "TrainStepResult", "UnauthenticatedError", "UnavailableError",
    "UnimplementedError", "UnknownError",
]
