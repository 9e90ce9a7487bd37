"""The SDK's results: small dataclasses holding numpy arrays, never protobuf messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from remote_trainer.contract.names import IMAGENET_MEAN, IMAGENET_STD, AutocastName, MemoryFormatName, OptimizerName

FloatArray = npt.NDArray[np.floating]


@dataclass(frozen=True)
class Stats:
    """Summary of a tensor as the server holds it (float32 arithmetic on its device)."""

    norm: float
    min: float
    max: float
    mean: float
    non_finite_count: int
    num_elements: int


@dataclass(frozen=True)
class ForwardResult:
    """The logits of a forward, and its id for Backward. ``logits`` is None when only stats were asked for."""

    forward_id: int
    logits: FloatArray | None
    stats: Stats


@dataclass(frozen=True)
class BackwardResult:
    """What a backward did: the loss (when the server computed it), gradients present, their norm."""

    forward_id: int
    loss: float | None
    parameters_with_grad: int
    grad_norm: float | None  # None when not asked for (grad_norm=False)
    step_count: int = 0  # when the backward also stepped: the session's step count after it
    parameters_updated: int = 0  # when the backward also stepped: parameters the step updated


@dataclass(frozen=True)
class TrainStepResult:
    """What one training step did: its forward, loss, logits statistics (and logits when asked), step count."""

    forward_id: int
    loss: float
    stats: Stats
    step_count: int
    parameters_updated: int
    grad_norm: float | None
    logits: FloatArray | None


@dataclass(frozen=True)
class NamedTensor:
    """A parameter's gradient or value.

    ``present`` False means the parameter has no .grad (frozen, or no backward yet); ``array`` is
    None then, and also when only statistics were asked for.
    """

    name: str
    shape: tuple[int, ...]
    present: bool
    stats: Stats | None
    array: FloatArray | None


@dataclass(frozen=True)
class ParameterInfo:
    """One parameter of the model."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    requires_grad: bool
    has_grad: bool
    num_elements: int


@dataclass(frozen=True)
class ParameterList:
    """All parameters in model order, with counts."""

    parameters: list[ParameterInfo]
    trainable_count: int
    frozen_count: int
    trainable_elements: int
    total_elements: int

    def __getitem__(self, name: str) -> ParameterInfo:
        for p in self.parameters:
            if p.name == name:
                return p
        raise KeyError(name)


@dataclass(frozen=True)
class Optimizer:
    """A torch.optim optimizer: kind "sgd", "adam" or "adamw"; None fields take torch's defaults."""

    kind: OptimizerName = "sgd"
    lr: float | None = None
    momentum: float | None = None
    dampening: float | None = None
    weight_decay: float | None = None
    nesterov: bool | None = None
    beta1: float | None = None
    beta2: float | None = None
    eps: float | None = None
    amsgrad: bool | None = None


@dataclass(frozen=True)
class InputTransform:
    """What a session does to uint8 images (N, 3, H, W) on the server, before the model: torchvision's
    ``ToTensor()`` (``x / 255``) then, when ``mean`` is given, ``Normalize(mean, std)``. Empty
    ``mean`` and ``std``: the scaling alone. ``InputTransform.imagenet()`` (or the name "imagenet"
    where a transform is taken) has ImageNet's constants."""

    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @classmethod
    def imagenet(cls) -> InputTransform:
        """``Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))``, what torchvision's
        ImageNet weights expect."""
        return cls(IMAGENET_MEAN, IMAGENET_STD)


@dataclass(frozen=True)
class SessionInfo:
    """What a session holds."""

    session_id: str
    model: str
    weights: str
    device: str
    num_classes: int
    optimizer: Optimizer
    step_count: int
    pending_forward_id: int
    trainable_parameters: int
    frozen_parameters: int
    is_default: bool
    # What its forwards run under: "off", "bf16" or "fp16" autocast, and "contiguous" or
    # "channels_last" weights and inputs (its own choice at creation, or the server's).
    autocast: AutocastName = "off"
    memory_format: MemoryFormatName = "contiguous"
    # The number the session expects on its next numbered call (0: the server does not number calls).
    next_operation: int = 0
    # The identity of that numbering: a session made anew under the same id numbers under another.
    operation_epoch: str = ""
    # What the session does to uint8 inputs (None: nothing, and it refuses them).
    input_transform: InputTransform | None = None


@dataclass(frozen=True)
class FreezeResult:
    """What a freeze or unfreeze changed, and what is trainable afterwards."""

    changed: list[str]
    trainable: list[str]
    frozen_count: int


@dataclass(frozen=True)
class GraphNode:
    """A node of the autograd graph: a backward function, or AccumulateGrad of ``parameter``."""

    id: int
    function: str
    parameter: str = ""


@dataclass(frozen=True)
class Graph:
    """The autograd graph of the pending forward; edges run from output towards the leaves."""

    forward_id: int
    root_id: int
    nodes: list[GraphNode]
    edges: list[tuple[int, int]]
    leaf_parameters: list[str]
    excluded_parameters: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CheckpointFile:
    """A checkpoint in the server's checkpoint directory that this client may load."""

    name: str
    size_bytes: int
    modified_unix_seconds: float


# -- a watched session's events (``Session.watch``) ------------------------------------------------


@dataclass(frozen=True)
class StepEvent:
    """An optimizer step and the iteration it ended: the last backward's loss and gradient norm
    (None when it had none), the learning rate the step used, the iteration's wall time (from its
    first forward after the previous step; 0 without one), the samples of its forwards, and their rate."""

    step_count: int
    loss: float | None
    grad_norm: float | None
    learning_rate: float
    seconds: float
    samples: int
    samples_per_second: float


@dataclass(frozen=True)
class FreezeEvent:
    """A freeze (or ``unfreeze``) of the parameters matching ``patterns``: how many it changed, and
    how many are trainable and frozen afterwards."""

    patterns: list[str]
    unfreeze: bool
    changed_count: int
    trainable_count: int
    frozen_count: int


@dataclass(frozen=True)
class HeadEvent:
    """A new classifier head, ``nn.Linear(512, num_classes)``."""

    num_classes: int


@dataclass(frozen=True)
class CheckpointEvent:
    """A checkpoint written (``size_bytes``; ``automatic``: by the server's ``--checkpoint-every``) or loaded."""

    name: str
    step_count: int
    size_bytes: int
    automatic: bool


@dataclass(frozen=True)
class ResetEvent:
    """The default session put back as the server started it (step count 0)."""


WatchEndReason = Literal["session_closed", "session_expired", "session_lost", "server_stopping", "unknown"]


@dataclass(frozen=True)
class EndEvent:
    """The last event of a watch, and why: the session was closed, expired or lost, or the server stops."""

    reason: WatchEndReason


EventKind = Literal["step", "freeze", "head", "optimizer", "checkpoint_saved", "checkpoint_loaded", "reset", "end", "unknown"]


@dataclass(frozen=True)
class SessionEvent:
    """One event of a watched session: its ``kind`` and what it holds (``detail``: ``StepEvent``,
    ``FreezeEvent``, ``HeadEvent``, ``Optimizer`` (the new one), ``CheckpointEvent``, ``ResetEvent``
    or ``EndEvent``; None for a kind this SDK does not know).

    ``sequence`` numbers the session's events on the server (on the Ray backend: on the front-end
    the watch goes through), from 1; ``unix_seconds`` is when it happened; ``missed`` how many
    events this watcher lost just before this one, for reading more slowly than they came;
    ``recent`` marks the latest events sent when the watch began, not as they happened.
    """

    sequence: int
    unix_seconds: float
    missed: int
    recent: bool
    kind: EventKind
    detail: StepEvent | FreezeEvent | HeadEvent | Optimizer | CheckpointEvent | ResetEvent | EndEvent | None

    @property
    def step(self) -> StepEvent | None:
        """The step, for a ``step`` event."""
        return self.detail if isinstance(self.detail, StepEvent) else None
