"""The optimizer of a session as plain data: kind and values, validated as torch.optim would, built on demand."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from torch import nn

from remote_trainer.contract.names import OptimizerName
from remote_trainer.engine.errors import invalid

_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@dataclass(frozen=True)
class OptimizerSpec:
    """A torch.optim optimizer with every value filled in (torch's defaults for unset ones)."""

    kind: OptimizerName = "sgd"
    lr: float = 1e-3
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    amsgrad: bool = False

    @staticmethod
    def tutorial() -> OptimizerSpec:
        """The tutorial's ``optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)``."""
        return OptimizerSpec(kind="sgd", lr=1e-2, momentum=0.9)

    @staticmethod
    def with_defaults(kind: OptimizerName, **given: float | bool) -> OptimizerSpec:
        """The spec of ``kind`` with torch's defaults for whatever is not given."""
        base = OptimizerSpec(kind=kind, lr=1e-3, weight_decay=0.01 if kind == "adamw" else 0.0)
        return replace(base, **given)  # type: ignore[arg-type]

    def validate(self) -> None:
        """Refuses values torch.optim would refuse, with the field named."""
        checks: list[tuple[str, float, bool, str]] = [
            ("lr", self.lr, self.lr >= 0, "must be finite and >= 0"),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0, "must be finite and >= 0"),
            ("eps", self.eps, self.eps >= 0, "must be finite and >= 0"),
        ]
        if self.kind == "sgd":
            checks.append(("momentum", self.momentum, self.momentum >= 0, "must be finite and >= 0"))
            checks.append(("dampening", self.dampening, True, "must be finite"))
        else:
            checks.append(("beta1", self.beta1, 0 <= self.beta1 < 1, "must be in [0, 1)"))
            checks.append(("beta2", self.beta2, 0 <= self.beta2 < 1, "must be in [0, 1)"))
        for name, value, ok, rule in checks:
            # torch's kernels take these as float32 scalars (add_(grad, alpha=-lr)): a larger value
            # would make every later step fail, so "finite" means finite in float32.
            if not math.isfinite(value) or abs(value) > _FLOAT32_MAX or not ok:
                raise invalid(f"optimizer.{name}", f"optimizer {name} {rule}, got {value}", "BAD_OPTIMIZER_VALUE")
        if self.kind == "sgd" and self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise invalid("optimizer.nesterov", "nesterov momentum needs momentum > 0 and dampening 0", "BAD_OPTIMIZER_VALUE")

    def build(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """The torch optimizer over ``params``."""
        if self.kind == "sgd":
            return torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, dampening=self.dampening,
                weight_decay=self.weight_decay, nesterov=self.nesterov,
            )
        cls = torch.optim.Adam if self.kind == "adam" else torch.optim.AdamW
        return cls(
            params, lr=self.lr, betas=(self.beta1, self.beta2), eps=self.eps,
            weight_decay=self.weight_decay, amsgrad=self.amsgrad,
        )
