"""``Engine``: the methods the servicer calls on a session, whoever holds it.

``SessionEngine`` (this process) and the Ray backend's proxy (``server/ray_backend/proxy.py``, a session
held by a Ray actor anywhere in the cluster) both satisfy it, so the servicer and the session store
do not know which backend they have. Everything that crosses it is plain data: CPU torch tensors
(numpy arrays, when it crosses a process: ``engine/portable.py``), torch dtypes, the dataclasses of
``engine/results.py`` and ``OptimizerSpec``, strings (checkpoint paths), a checkpoint ``Quota``, and
the domain errors of ``engine/errors.py``, which pickle with their reason, violations and metadata. A device running out
of memory is raised as ``ResourceExhausted("DEVICE_OUT_OF_MEMORY")`` by the engine itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar


import torch

from remote_trainer.contract.names import LossName
from remote_trainer.engine.checkpoints import Quota
from remote_trainer.engine.errors import TrainerError
from remote_trainer.engine.operation import Operation
from remote_trainer.engine.optimizer import OptimizerSpec
from remote_trainer.engine.results import (
    BackwardResult,
    CheckpointInfo,
    ForwardResult,
    FreezeResult,
    Graph,
    NamedTensor,
    ParameterInfo,
    SessionDescription,
    StepResult,
    TrainStepResult,
)

T = TypeVar("T")


class Engine(Protocol):
    """One session's training state and the operations on it (see ``SessionEngine`` for each)."""

    def forward(
        self,
        x: torch.Tensor,
        eval_mode: bool = False,
        no_grad: bool = False,
        max_logits_elements: int | None = None,
        still_wanted: Callable[[], bool] | None = None,
        *,
        operation: Operation | None = None,
    ) -> ForwardResult: ...

    def backward(
        self,
        forward_id: int = 0,
        loss: LossName | None = None,
        labels: torch.Tensor | None = None,
        output_gradient: torch.Tensor | None = None,
        retain_graph: bool = False,
        step: bool = False,
        zero_grad_after_step: bool = False,
        grad_norm: bool = True,
        still_wanted: Callable[[], bool] | None = None,
        *,
        operation: Operation | None = None,
    ) -> BackwardResult: ...

    def train_step(
        self,
        x: torch.Tensor,
        loss: LossName,
        labels: torch.Tensor | None,
        zero_grad: bool = True,
        grad_norm: bool = False,
        max_logits_elements: int | None = None,
        still_wanted: Callable[[], bool] | None = None,
        *,
        operation: Operation | None = None,
    ) -> TrainStepResult: ...

    def step(
        self, expected_step_count: int | None = None, still_wanted: Callable[[], bool] | None = None,
        *, operation: Operation | None = None,
    ) -> StepResult: ...

    def drop_pending(self, why: str) -> bool: ...

    def zero_grad(self, set_to_none: bool = True, *, operation: Operation | None = None) -> int: ...

    def configure_optimizer(self, spec: OptimizerSpec, *, operation: Operation | None = None) -> SessionDescription: ...

    def freeze(self, patterns: list[str], unfreeze: bool = False, *, operation: Operation | None = None) -> FreezeResult: ...

    def replace_head(self, num_classes: int, seed: int, *, operation: Operation | None = None) -> SessionDescription: ...

    def parameters_info(self) -> list[ParameterInfo]: ...

    def gradients(
        self, patterns: list[str], stats_only: bool = False, dtype: torch.dtype = torch.float32, with_stats: bool = True
    ) -> list[NamedTensor]: ...

    def parameters(
        self,
        patterns: list[str],
        stats_only: bool = False,
        dtype: torch.dtype = torch.float32,
        include_buffers: bool = False,
        with_stats: bool = True,
    ) -> list[NamedTensor]: ...

    def encode_gradients(
        self, patterns: list[str], stats_only: bool, dtype: torch.dtype, encode: Callable[[NamedTensor], T],
        with_stats: bool = True, done: Callable[[], None] | None = None, casts: bool = False,
    ) -> list[T]: ...

    def encode_parameters(
        self, patterns: list[str], stats_only: bool, dtype: torch.dtype, include_buffers: bool, encode: Callable[[NamedTensor], T],
        with_stats: bool = True, done: Callable[[], None] | None = None, casts: bool = False,
    ) -> list[T]: ...

    def graph(self) -> Graph: ...

    def describe(self) -> SessionDescription: ...  # never waits for a running call (ListSessions)

    def save_checkpoint(self, path: str, quota: Quota | None = None) -> CheckpointInfo: ...

    def load_checkpoint(self, path: str, *, operation: Operation | None = None) -> SessionDescription: ...

    def resume(self, path: str) -> SessionDescription: ...

    def refuse(self, operation: Operation, error: TrainerError) -> TrainerError: ...

    def reset(self, *, operation: Operation | None = None) -> SessionDescription: ...

    def warm_up(self) -> None: ...
