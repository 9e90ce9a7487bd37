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
    CheckpointFile,
    ForwardResult,
    FreezeResult,
    Graph,
    InputTransform,
    NamedTensor,
    Optimizer,
    ParameterInfo,
    ParameterList,
    SessionInfo,
    Stats,
    TrainStepResult,
)
from remote_trainer.contract.reasons import Reason

__all__ = [
    "AbortedError", "AlreadyExistsError", "BackwardResult", "Cancelled", "CheckpointFile", "DataLossError",
    "DeadlineExceededError", "FailedPreconditionError", "FieldViolation", "ForwardResult", "FreezeResult", "Graph", "InputTransform",
    "InternalError", "InvalidArgumentError", "NamedTensor", "NotFoundError", "Optimizer", "OutOfRangeError", "ParameterInfo",
    "ParameterList", "PermissionDeniedError", "Reason", "ResourceExhaustedError", "RetryPolicy", "Session", "SessionInfo", "Stats",
    "TrainerClient", "TrainerError", "TrainStepResult", "UnauthenticatedError", "UnavailableError",
    "UnimplementedError", "UnknownError",
]
