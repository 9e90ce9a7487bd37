"""A session's input transform: uint8 images turned into the model's float32 input on the device.

Images travel as the bytes a decoder gives (uint8, a quarter of float32's size) and become the
model's input where it runs, after the upload, with torchvision's arithmetic:
``transforms.ToTensor()`` (``x.to(torch.float32).div(255)``) then ``transforms.Normalize(mean, std)``
(``x.sub_(mean).div_(std)`` with the constants as float32 ``(C, 1, 1)`` tensors), so the result is
the same, bit for bit, as those transforms run locally on the same device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from remote_trainer.contract.names import IMAGENET_MEAN, IMAGENET_STD
from remote_trainer.engine.errors import invalid

# resnet18's conv1 takes 3 channels (R, G, B): one mean and one std each.
INPUT_CHANNELS = 3


@dataclass(frozen=True)
class InputTransform:
    """``ToTensor()`` then, when ``mean`` is given, ``Normalize(mean, std)``: ``(x / 255 - mean[c]) /
    std[c]`` per channel. Empty ``mean`` and ``std``: the scaling alone."""

    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @classmethod
    def imagenet(cls) -> InputTransform:
        """The normalisation torchvision's ImageNet weights expect."""
        return cls(IMAGENET_MEAN, IMAGENET_STD)

    def validate(self) -> None:
        """Refuses constants that do not fit the model's 3 input channels, a std that is not > 0, and
        anything not finite (INVALID_ARGUMENT BAD_INPUT_TRANSFORM)."""
        if len(self.mean) != len(self.std) or len(self.mean) not in (0, INPUT_CHANNELS):
            raise invalid(
                "input_transform",
                f"input_transform needs {INPUT_CHANNELS} means and {INPUT_CHANNELS} stds (one per input channel of the "
                f"model), or neither (scaling by 1/255 alone); got {len(self.mean)} mean(s) and {len(self.std)} std(s)",
                "BAD_INPUT_TRANSFORM",
            )
        if not all(math.isfinite(m) for m in self.mean):
            raise invalid("input_transform.mean", f"input_transform.mean must be finite, got {list(self.mean)}", "BAD_INPUT_TRANSFORM")
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            raise invalid("input_transform.std", f"input_transform.std must be finite and > 0, got {list(self.std)}",
                          "BAD_INPUT_TRANSFORM")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The float32 model input of the uint8 images ``x`` (N, C, H, W), on ``x``'s device."""
        y = x.to(torch.float32).div(255)
        if self.mean:
            mean = torch.as_tensor(self.mean, dtype=y.dtype, device=y.device).view(-1, 1, 1)
            std = torch.as_tensor(self.std, dtype=y.dtype, device=y.device).view(-1, 1, 1)
            y = y.sub_(mean).div_(std)
        return y
