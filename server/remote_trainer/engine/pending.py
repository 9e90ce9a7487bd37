"""A session's pending forward: the last forward's logits while its graph lives, or why Backward
cannot use it; and running a forward that leaves the model as it was when it is not kept."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from remote_trainer.engine.errors import FailedPrecondition
from remote_trainer.engine.models import set_mode


@dataclass
class Pending:
    """The last forward: its logits while its graph lives, or why Backward cannot use it."""

    forward_id: int
    logits: torch.Tensor | None
    unusable_because: str = ""
    reason: str = ""
    graph_bytes: int = 0  # the estimate of what its graph keeps (engine/budget.py)

    @classmethod
    def of_forward(cls, forward_id: int, logits: torch.Tensor, no_grad: bool, graph_bytes: int) -> Pending:
        """What a Forward leaves pending: its logits with their graph, or why it kept none."""
        if no_grad:
            return cls(forward_id, None, f"forward {forward_id} ran with no_grad: no graph was kept", "NO_GRAPH")
        if not logits.requires_grad:
            return cls(forward_id, None, f"forward {forward_id} has no graph: every parameter is frozen", "NO_TRAINABLE_PARAMETERS")
        return cls(forward_id, logits, graph_bytes=graph_bytes)

    def free(self, because: str, reason: str) -> None:
        """Drops the logits (and so the graph); Backward then says ``because``."""
        self.logits = None
        self.unusable_because = because
        self.reason = reason

    @property
    def kept_bytes(self) -> int:
        """What the graph keeps while it lives (for the memory budget); 0 once it is gone."""
        return self.graph_bytes if self.logits is not None else 0

    @property
    def kept_id(self) -> int:
        """The forward id while its graph lives, else 0 (what a session description shows)."""
        return self.forward_id if self.logits is not None else 0


def require_graph(pending: Pending | None, forward_id: int = 0) -> tuple[Pending, torch.Tensor]:
    """The pending forward and the logits Backward starts from: refuses when there is no pending
    forward, when ``forward_id`` (0: any) is not the pending one, and when its graph is gone."""
    if pending is None:
        raise FailedPrecondition("no pending forward: call Forward first", "NO_PENDING_FORWARD")
    if forward_id and forward_id != pending.forward_id:
        raise FailedPrecondition(
            f"forward {forward_id} is not the pending forward (that is {pending.forward_id})", "STALE_FORWARD",
            metadata={"pending_forward_id": str(pending.forward_id)},
        )
    if pending.logits is None:
        raise FailedPrecondition(pending.unusable_because, pending.reason)
    return pending, pending.logits


@contextlib.contextmanager
def revertible(model: nn.Module, train: bool, copy_buffers: bool) -> Iterator[None]:
    """Runs the block with ``model`` in train mode ``train``; when the block raises, puts the mode
    back and, with ``copy_buffers``, the buffers: the block then runs on copies of them, which
    replace them only when it ends normally (a train-mode forward updates BatchNorm's running
    statistics in place)."""
    originals = _swap_in_buffer_copies(model) if copy_buffers else []
    was_training = model.training
    set_mode(model, train)
    try:
        yield
    except BaseException:
        for module, name, buffer in originals:
            module._buffers[name] = buffer
        set_mode(model, was_training)
        raise


def _swap_in_buffer_copies(model: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """Puts a copy in place of every buffer; returns the originals to put back."""
    originals = []
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                originals.append((module, name, buffer))
                module._buffers[name] = buffer.clone()
    return originals
