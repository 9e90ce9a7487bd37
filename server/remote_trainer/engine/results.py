"""What the engine returns: small frozen dataclasses of plain values (tensors on the CPU)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from remote_trainer.engine.optimizer import OptimizerSpec
from remote_trainer.engine.transforms import InputTransform


@dataclass(frozen=True)
class Stats:
    """Summary of a tensor, computed in float32 on its device."""

    norm: float
    min: float
    max: float
    mean: float
    non_finite_count: int
    num_elements: int


@dataclass(frozen=True)
class ForwardResult:
    """What Forward made: its id and the logits (detached, on the CPU)."""

    forward_id: int
    logits: torch.Tensor
    stats: Stats
    replayed: bool = False  # the answer of an operation that ran before (engine/ledger.py), not run again


@dataclass(frozen=True)
class BackwardResult:
    """What Backward did."""

    forward_id: int
    loss: float | None
    parameters_with_grad: int
    grad_norm: float | None  # None when not asked for
    step_count: int = 0  # with a step in the same call: the step count after it
    parameters_updated: int = 0  # with a step in the same call: how many parameters it updated
    replayed: bool = False  # the answer of an operation that ran before (engine/ledger.py), not run again


@dataclass(frozen=True)
class StepResult:
    """What Step did: the step count after it and how many parameters it updated."""

    step_count: int
    parameters_updated: int
    replayed: bool = False  # the answer of an operation that ran before (engine/ledger.py), not run again


@dataclass(frozen=True)
class TrainStepResult:
    """What one whole training step (zero-grad, forward, loss, backward, step) did."""

    forward_id: int
    loss: float
    logits: torch.Tensor
    stats: Stats
    step_count: int
    parameters_updated: int
    grad_norm: float | None
    replayed: bool = False  # the answer of an operation that ran before (engine/ledger.py), not run again


@dataclass(frozen=True)
class ParameterInfo:
    """One parameter as ListParameters shows it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool
    has_grad: bool


@dataclass(frozen=True)
class NamedTensor:
    """A snapshot of one parameter's value or gradient, ready to send; ``tensor`` None when absent
    or when only statistics were asked for."""

    name: str
    shape: tuple[int, ...]
    tensor: torch.Tensor | None
    stats: Stats | None  # None when absent, or when statistics were not asked for
    present: bool = True  # False: a parameter with no .grad


@dataclass(frozen=True)
class FreezeResult:
    """What FreezeLayers changed and what is trainable afterwards."""

    changed: list[str]
    trainable: list[str]
    frozen_count: int
    replayed: bool = False  # the answer of an operation that ran before (engine/ledger.py), not run again


@dataclass(frozen=True)
class GraphNode:
    """A node of the autograd graph: a backward function, or AccumulateGrad of a parameter."""

    id: int
    function: str
    parameter: str = ""


@dataclass(frozen=True)
class Graph:
    """The autograd graph of a pending forward."""

    forward_id: int
    root_id: int
    nodes: list[GraphNode]
    edges: list[tuple[int, int]]
    leaf_parameters: list[str]
    excluded_parameters: list[str]


@dataclass(frozen=True)
class SessionDescription:
    """What a session holds."""

    model: str
    weights: str
    device: str
    num_classes: int
    optimizer: OptimizerSpec
    step_count: int
    pending_forward_id: int
    trainable_parameters: int
    frozen_parameters: int
    # The fast paths the session runs with (names.AUTOCAST_MODES, names.MEMORY_FORMATS).
    autocast: str = "off"
    memory_format: str = "contiguous"
    next_operation: int = 1  # the number the session expects on its next numbered call (engine/ledger.py)
    operation_epoch: str = ""  # the identity of that numbering
    input_transform: InputTransform | None = None  # what uint8 inputs become before the model (None: refused)
    # As the answer of a numbered call (ReplaceHead, ConfigureOptimizer, LoadCheckpoint, ResetSession):
    # the answer of an operation that ran before (engine/ledger.py), not run again.
    replayed: bool = False


@dataclass(frozen=True)
class CheckpointInfo:
    """What SaveCheckpoint wrote: the session's step count and the file's size."""

    step_count: int
    size_bytes: int
