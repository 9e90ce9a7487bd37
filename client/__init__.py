"""Python SDK of the training service: ``TrainerClient``, ``Session``, results and errors.

Needs grpcio, protobuf and numpy only; torch tensors are accepted as inputs when torch is installed.
"""

from client.client import Session, TrainerClient
from client.errors import (
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    TrainerError,
    UnauthenticatedError,
    UnavailableError,
)
from client.types import (
    BackwardResult,
    ForwardResult,
    FreezeResult,
    Graph,
    NamedTensor,
    Optimizer,
    ParameterInfo,
    ParameterList,
    SessionInfo,
    Stats,
)

__all__ = [
    "BackwardResult", "FailedPreconditionError", "ForwardResult", "FreezeResult", "Graph", "InternalError",
    "InvalidArgumentError", "NamedTensor", "NotFoundError", "Optimizer", "ParameterInfo", "ParameterList",
    "ResourceExhaustedError", "Session", "SessionInfo", "Stats", "TrainerClient", "TrainerError",
    "UnauthenticatedError", "UnavailableError",
]
