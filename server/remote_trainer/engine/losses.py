"""The loss side of Backward and TrainStep: the labels and output gradients they accept (checked
before anything changes), the losses, and backpropagating from a forward's logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from remote_trainer.contract.names import LossName
from remote_trainer.engine.device import Placement
from remote_trainer.engine.errors import invalid
from remote_trainer.engine.tensors import require_finite, require_float32

# The types class indices may come in (the SDK sends the narrowest that holds them); the loss takes
# them as int64.
CLASS_INDEX_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)


def backpropagate(
    logits: torch.Tensor, loss: LossName | None, labels: torch.Tensor | None, output_gradient: torch.Tensor | None,
    retain_graph: bool, placement: Placement, head_note: str,
) -> float | None:
    """Backpropagates from ``loss(logits, labels)``, returning the loss, or with
    ``logits.backward(gradient=output_gradient)``, returning None; exactly one of the two is given.
    ``head_note`` is said after a shape error (what ReplaceHead changed)."""
    if loss is not None and output_gradient is None:
        return float(backward_from_loss(loss, logits, labels, placement, head_note, retain_graph))
    if output_gradient is not None and loss is None:
        require_float32(output_gradient, "output_gradient")
        if tuple(output_gradient.shape) != tuple(logits.shape):
            raise invalid(
                "output_gradient",
                f"output_gradient must have the logits' shape {list(logits.shape)}, got {list(output_gradient.shape)}" + head_note,
                "BAD_OUTPUT_GRADIENT_SHAPE",
            )
        require_finite(output_gradient, "output_gradient")
        gradient = placement.to_device(output_gradient, logits.dtype)  # the logits' own type under autocast
        logits.backward(gradient=gradient, retain_graph=retain_graph)  # type: ignore[no-untyped-call]
        return None
    raise invalid("source", "give exactly one of loss or output_gradient", "NO_BACKWARD_SOURCE")


def backward_from_loss(
    loss: LossName, logits: torch.Tensor, labels: torch.Tensor | None, placement: Placement, head_note: str,
    retain_graph: bool = False,
) -> torch.Tensor:
    """``loss(logits, labels).backward()``; returns the loss, detached (on the device: reading it waits for it)."""
    root = compute_loss(loss, logits, labels, placement, head_note)
    root.backward(retain_graph=retain_graph)  # type: ignore[no-untyped-call]
    return root.detach()


def check_labels(loss: LossName, labels: torch.Tensor | None, logits_shape: tuple[int, ...], head_note: str) -> torch.Tensor:
    """Refuses labels that ``loss`` cannot compare with logits of ``logits_shape``; ``head_note`` is
    said after a shape error (what ReplaceHead changed)."""
    if labels is None:
        raise invalid("loss.labels", f"loss {loss} needs labels", "MISSING_LABELS")
    if loss == "cross_entropy":
        if labels.dtype not in CLASS_INDEX_DTYPES:
            raise invalid("loss.labels", "cross_entropy labels must be integer class indices (uint8, int16, int32 or int64), "
                          f"got {str(labels.dtype).removeprefix('torch.')}", "WRONG_DTYPE")
        if tuple(labels.shape) != (logits_shape[0],):
            raise invalid("loss.labels", f"cross_entropy labels must have shape [{logits_shape[0]}], got {list(labels.shape)}", "BAD_LABEL_SHAPE")
        classes = logits_shape[1]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise invalid("loss.labels", f"class indices must be in [0, {classes}), got {labels.tolist()}{head_note}",
                          "CLASS_INDEX_OUT_OF_RANGE")
        return labels
    require_float32(labels, "loss.labels")
    if tuple(labels.shape) != logits_shape:
        raise invalid("loss.labels", f"{loss} labels must have the logits' shape {list(logits_shape)}, got {list(labels.shape)}"
                      + head_note, "BAD_LABEL_SHAPE")
    require_finite(labels, "loss.labels")
    return labels


def compute_loss(loss: LossName, logits: torch.Tensor, labels: torch.Tensor | None, placement: Placement, head_note: str) -> torch.Tensor:
    """``loss(logits, labels)`` on the logits' device, once ``check_labels`` accepts the labels."""
    labels = check_labels(loss, labels, tuple(logits.shape), head_note)
    if loss == "cross_entropy":
        return F.cross_entropy(logits, placement.to_device(labels, torch.int64))  # widened from the type they came in
    target = placement.to_device(labels)
    if loss == "sum":
        return (logits - target).sum()
    return F.mse_loss(logits, target)

