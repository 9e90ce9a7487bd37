"""Where a session's tensors live and how its model runs there, and a device running out of memory.

``Placement`` is a session's device with its settings (autocast, memory format, pinned host memory,
the input transform): it moves tensors there and back and runs the model there. ``device_memory`` turns
``torch.OutOfMemoryError`` into the domain error ``DEVICE_OUT_OF_MEMORY``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Concatenate, ParamSpec, TypeVar

import torch
from torch import nn

from remote_trainer.engine.errors import FailedPrecondition, ResourceExhausted, invalid
from remote_trainer.engine.memory import release_cached_device_memory
from remote_trainer.engine.transforms import InputTransform

# The --autocast settings and the types torch.autocast runs them in (None: off).
AUTOCAST_TYPES: dict[str, torch.dtype | None] = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}

S = TypeVar("S")
P = ParamSpec("P")
R = TypeVar("R")


def device_memory(method: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R]:
    """Reports a device running out of memory as the domain error ``DEVICE_OUT_OF_MEMORY`` (so it
    reaches the caller as RESOURCE_EXHAUSTED from any process), after giving the cached blocks back."""

    @functools.wraps(method)
    def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except torch.OutOfMemoryError as exc:
            release_cached_device_memory()
            raise ResourceExhausted(
                f"the device ran out of memory: {exc}".splitlines()[0], "DEVICE_OUT_OF_MEMORY"
            ) from None

    return wrapper


@dataclass(frozen=True)
class Placement:
    """A session's device and how its model runs there. ``autocast`` ("off", "bf16", "fp16") runs
    forwards under ``torch.autocast`` on the device, as a local mixed-precision loop does (logits come
    back as float32); ``channels_last`` keeps the weights and inputs in that memory format;
    ``pin_memory`` (CUDA only) moves inputs, labels and output gradients to the device from
    page-locked host memory with non-blocking copies, and brings gradients and parameters back
    through page-locked buffers with one synchronisation. ``input_transform`` turns uint8 inputs
    into the model's float32 input on the device, after the upload (engine/transforms.py)."""

    device: torch.device
    autocast: str = "off"
    channels_last: bool = False
    pin_memory: bool = False
    input_transform: InputTransform | None = None

    def validate(self) -> None:
        """Refuses an unknown autocast, pinned memory without CUDA, and a bad input transform."""
        if self.input_transform is not None:
            self.input_transform.validate()
        if self.autocast not in AUTOCAST_TYPES:
            raise invalid("autocast", f"autocast must be one of {sorted(AUTOCAST_TYPES)}, got {self.autocast!r}", "BAD_AUTOCAST")
        if self.pin_memory and self.device.type != "cuda":
            raise FailedPrecondition(
                f"pin-memory needs a CUDA device (page-locked host buffers only speed up copies to and from "
                f"an accelerator), and this session's device is {self.device}: start the server without --pin-memory",
                "PIN_MEMORY_NEEDS_CUDA",
            )

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast_context(self) -> torch.autocast:
        """``torch.autocast`` on the device in the session's type (disabled when off)."""
        dtype = AUTOCAST_TYPES[self.autocast]
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def place(self, module: nn.Module) -> nn.Module:
        """``module`` on the device, in the memory format."""
        return module.to(self.device).to(memory_format=self.memory_format)

    def to_device(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A host tensor on the device; with pinned memory through a page-locked copy of it (the
        first copy of the request's bytes: the decoded tensor is a view of them), which the device
        reads asynchronously (torch keeps the pinned block until the copy is done)."""
        if self.pin_memory and t.device.type == "cpu":
            t = t.pin_memory()
        return t.to(self.device, dtype, non_blocking=True)

    def run(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``model(x)`` on the device, in the memory format, under the autocast; uint8 images are
        uploaded as they are and turned into the model's input there (``input_transform``, which
        ``inputs.check_input`` made sure the session has)."""
        if x.dtype == torch.uint8 and self.input_transform is not None:
            x = self.input_transform.apply(self.to_device(x)).contiguous(memory_format=self.memory_format)
        elif self.pin_memory:  # copied as it is, then rearranged on the device
            x = self.to_device(x).contiguous(memory_format=self.memory_format)
        else:
            x = x.to(self.device, non_blocking=True, memory_format=self.memory_format)
        with self.autocast_context():
            out: torch.Tensor = model(x)
        return out

    def synchronize(self) -> None:
        """Waits for the device's queued work (nothing to wait for off CUDA)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def warm_up(self, scratch: nn.Module) -> None:
        """One forward and backward of a small batch through ``scratch`` (a copy of a model), so that
        cold kernels and the allocator are paid for before the first client call."""
        with self.autocast_context():
            out = scratch(torch.zeros(2, 3, 64, 64, device=self.device).to(memory_format=self.memory_format))
        out.float().sum().backward()
        self.synchronize()

    def stage(self, values: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Device tensors copied into page-locked host tensors (floating ones in ``dtype``), all
        copies queued without waiting, then one synchronisation: what a snapshot sends with pinned
        memory, instead of one blocking copy per tensor."""
        staged = {}
        for name, value in values.items():
            host = torch.empty(value.shape, dtype=dtype if value.is_floating_point() else value.dtype, pin_memory=True)
            staged[name] = host.copy_(value, non_blocking=True)
        torch.cuda.synchronize(self.device)
        return staged
