"""What the gradient and parameter streams copy out of a session, under its lock.

A ``Selection`` is the tensors a request names (parameters, or their gradients, and buffers), in
model order; ``encode`` hands each one, with its statistics, to the caller's encoder. ``owned``
makes an item independent of the session (for results kept after the lock is released).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from remote_trainer.engine.device import Placement
from remote_trainer.engine.patterns import match_patterns
from remote_trainer.engine.results import NamedTensor
from remote_trainer.engine.tensors import tensors_stats

T = TypeVar("T")


def owned(item: NamedTensor) -> NamedTensor:
    """``item`` with a tensor of its own, so that later steps cannot change it."""
    if item.tensor is None:
        return item
    return NamedTensor(item.name, item.shape, item.tensor.clone(), item.stats, item.present)


@dataclass(frozen=True)
class Selection:
    """The tensors matching a request's patterns: every name in model order, the shape of what each
    names, and the values there are (a parameter without a .grad has none)."""

    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    values: dict[str, torch.Tensor]

    @classmethod
    def of(
        cls, model: nn.Module, patterns: list[str], pick: Callable[[torch.Tensor], torch.Tensor | None], include_buffers: bool
    ) -> Selection:
        """``pick`` of the parameters (and buffers) matching ``patterns`` (all when empty)."""
        tensors: dict[str, torch.Tensor] = dict(model.named_parameters())
        if include_buffers:
            tensors.update(model.named_buffers())
        names = match_patterns(list(tensors), patterns) if patterns else list(tensors)
        values = {name: v.detach() for name in names if (v := pick(tensors[name])) is not None}
        return cls(names, {name: tuple(tensors[name].shape) for name in names}, values)

    def copy_bytes(self, dtype: torch.dtype) -> int:
        """The size of the copies sent in ``dtype`` (floating tensors; others in their own type)."""
        return sum(v.numel() * (dtype.itemsize if v.is_floating_point() else v.element_size()) for v in self.values.values())

    def encode(
        self, encode: Callable[[NamedTensor], T], stats_only: bool, dtype: torch.dtype, with_stats: bool, placement: Placement,
        casts: bool = False,
    ) -> list[T]:
        """``encode`` of each tensor, in order: one that is absent as not present; with its data on
        the CPU in ``dtype`` unless ``stats_only`` (the tensor's own memory when it is there already:
        no copy; with ``casts``, a tensor on the CPU in its own type, which ``encode`` casts as it
        copies); with its statistics when ``with_stats``."""
        # When data goes out, on the CPU each tensor's statistics are taken right before it is
        # encoded, so that a caller sending as it encodes starts with the first tensors while
        # later ones are read; otherwise all at once (fewer calls, one synchronisation).
        values = self.values
        one_by_one = with_stats and not stats_only and placement.device.type == "cpu"
        all_stats = dict(zip(values, tensors_stats(list(values.values())))) if with_stats and not one_by_one else {}
        staged = placement.stage(values, dtype) if placement.pin_memory and not stats_only else None
        out = []
        for name in self.names:
            if name not in values:
                out.append(encode(NamedTensor(name, self.shapes[name], None, None, present=False)))
                continue
            value = values[name]
            stats = tensors_stats([value])[0] if one_by_one else all_stats.get(name)
            view = None
            if not stats_only:
                # On the CPU in the transfer type: a copy only when it is elsewhere or in another type.
                target = dtype if value.is_floating_point() else value.dtype
                if staged is not None:
                    view = staged[name]
                elif casts and value.device.type == "cpu":
                    view = value.contiguous()
                else:
                    view = value.to("cpu", target).contiguous()
            out.append(encode(NamedTensor(name, tuple(value.shape), view, stats)))
        return out
