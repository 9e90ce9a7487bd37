"""``SessionState``: what a checkpoint holds, typed, and the plain dictionary a checkpoint file stores.

The file is ``torch.save`` of ``to_dict()`` (tensors and plain data only, so ``torch.load`` reads it
with ``weights_only=True``); ``from_dict`` reads one back, checking every field's type.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from remote_trainer.engine.errors import TrainerError
from remote_trainer.engine.models import head_of, new_head
from remote_trainer.engine.optimizer import OptimizerSpec
from remote_trainer.engine.tensors import to_cpu
from remote_trainer.engine.transforms import InputTransform

CHECKPOINT_FORMAT = "trainer.v1/session-checkpoint/1"

V = TypeVar("V")


@dataclass(frozen=True)
class SessionState:
    """Everything needed to go on bit-identically: weights and buffers (on the CPU), head size, frozen
    set, optimizer settings and state (momentum buffers), step count, and the input transform (what
    uint8 inputs become). Gradients are not kept."""

    weights: str | None  # where the weights came from; None: not said (the session keeps its own)
    num_classes: int
    model: dict[str, torch.Tensor]
    frozen: list[str]
    optimizer_spec: OptimizerSpec
    optimizer_state: dict[str, Any]  # torch.optim's state_dict, tensors on the CPU
    step_count: int
    # The session's record of numbered operations (engine/ledger.py, plain data); None in files
    # written before operations were numbered.
    operations: dict[str, Any] | None = None
    # What uint8 inputs become before the model; None: nothing (and in files written before input
    # transforms existed, whose sessions had none).
    input_transform: InputTransform | None = None

    @classmethod
    def capture(
        cls, model: nn.Module, weights: str, spec: OptimizerSpec, optimizer: torch.optim.Optimizer, step_count: int,
        operations: dict[str, Any] | None = None, input_transform: InputTransform | None = None,
    ) -> SessionState:
        """A copy of the state of ``model`` and ``optimizer``, on the CPU."""
        return cls(
            weights=weights,
            num_classes=head_of(model).out_features,
            model={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
            frozen=[n for n, p in model.named_parameters() if not p.requires_grad],
            optimizer_spec=spec,
            optimizer_state={k: to_cpu(v) for k, v in optimizer.state_dict().items()},
            step_count=step_count,
            operations=operations,
            input_transform=input_transform,
        )

    def build(self, template: nn.Module, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
        """A copy of ``template`` (left as it is) in this state on ``device``, with its optimizer."""
        model = copy.deepcopy(template)
        if head_of(model).out_features != self.num_classes:
            model.fc = new_head(head_of(model).in_features, self.num_classes, 0)  # overwritten by the checkpoint
        model.load_state_dict(self.model, strict=True)
        model = model.to(device)
        frozen = set(self.frozen)
        for name, p in model.named_parameters():
            p.requires_grad_(name not in frozen)
            p.grad = None
        optimizer = self.optimizer_spec.build(model.parameters())
        optimizer.load_state_dict(self.optimizer_state)
        return model, optimizer

    def to_dict(self) -> dict[str, object]:
        """The plain dictionary a checkpoint file holds."""
        return {
            "format": CHECKPOINT_FORMAT,
            "weights": self.weights,
            "num_classes": self.num_classes,
            "model": self.model,
            "frozen": self.frozen,
            "optimizer_spec": asdict(self.optimizer_spec),
            "optimizer_state": self.optimizer_state,
            "step_count": self.step_count,
            **({"operations": self.operations} if self.operations is not None else {}),
            **({"input_transform": asdict(self.input_transform)} if self.input_transform is not None else {}),
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, object]) -> SessionState:
        """The state a checkpoint file's dictionary holds. A missing field raises KeyError, a field of
        the wrong type TypeError, a value out of range ValueError (a bad optimizer value: the error
        ``OptimizerSpec.validate`` raises); the tensors and names inside ``model`` and ``frozen`` are
        checked by ``build``, as the model takes them."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"unknown checkpoint format {state.get('format')!r}")
        spec_fields = _typed(state, "optimizer_spec", dict, "a mapping")
        spec = OptimizerSpec(**spec_fields)
        spec.validate()
        num_classes = _int(state, "num_classes")
        model = _typed(state, "model", dict, "a state dict")
        frozen = state["frozen"]
        if not isinstance(frozen, Iterable):
            raise TypeError(f"frozen must be a list of parameter names, got {type(frozen).__name__}")
        step_count = _int(state, "step_count")
        operations = _typed(state, "operations", dict, "an operation record") if "operations" in state else None
        transform = None
        if "input_transform" in state:
            fields = _typed(state, "input_transform", dict, "a mapping")
            transform = InputTransform(tuple(float(m) for m in fields["mean"]), tuple(float(s) for s in fields["std"]))
            try:
                transform.validate()
            except TrainerError as exc:
                raise ValueError(str(exc)) from exc
        return cls(
            weights=str(state["weights"]) if "weights" in state else None,
            num_classes=num_classes,
            model=model,
            frozen=list(frozen),
            optimizer_spec=spec,
            optimizer_state=_typed(state, "optimizer_state", dict, "an optimizer state dict"),
            step_count=step_count,
            operations=operations,
            input_transform=transform,
        )


def _typed(state: Mapping[str, object], key: str, kind: type[V], what: str) -> V:
    """``state[key]``, refused with a TypeError unless it is a ``kind``."""
    value = state[key]
    if not isinstance(value, kind):
        raise TypeError(f"{key} must be {what}, got {type(value).__name__}")
    return value


def _int(state: Mapping[str, object], key: str) -> int:
    """``int(state[key])``: a number, or a string of one."""
    value = state[key]
    if not isinstance(value, (int, float, str, torch.Tensor)):
        raise TypeError(f"{key} must be a number, got {type(value).__name__}")
    return int(value)
