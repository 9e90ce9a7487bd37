"""The input batches Forward and TrainStep accept, checked before anything runs or changes."""

from __future__ import annotations

import math

import torch

from remote_trainer.engine.errors import ResourceExhausted, invalid
from remote_trainer.engine.limits import Limits
from remote_trainer.engine.tensors import require_finite
from remote_trainer.engine.transforms import InputTransform


def check_input(x: torch.Tensor, eval_mode: bool, limits: Limits, transform: InputTransform | None = None) -> None:
    """Refuses an input batch resnet18 cannot run (in train mode unless ``eval_mode``), or one over
    ``limits``: float32 images, or uint8 ones when the session has an input ``transform``."""
    if x.dtype == torch.uint8:
        if transform is None:
            raise invalid("input", "input is uint8 (image bytes), but this session has no input_transform to turn them into "
                          "the model's float input: create the session with one (input_transform, e.g. \"imagenet\" in the "
                          "SDK and CLI), or send float32", "INPUT_TRANSFORM_MISSING")
    elif x.dtype != torch.float32:
        raise invalid("input", f"input must be float32 (or uint8 on a session with an input_transform), got "
                      f"{str(x.dtype).removeprefix('torch.')}", "WRONG_DTYPE")
    if x.dim() != 4:
        raise invalid("input", f"input must have shape (N, 3, H, W), got rank {x.dim()} shape {list(x.shape)}", "BAD_INPUT_SHAPE")
    n, c, h, w = x.shape
    if c != 3:
        raise invalid("input", f"input must have 3 channels (N, 3, H, W), got {c} in shape {list(x.shape)}", "BAD_INPUT_SHAPE")
    # What local PyTorch refuses, and nothing more: resnet18 pools adaptively, so any image of at
    # least 1x1 runs (conv1 is 7x7 with padding 3); an empty batch runs too.
    if h < 1 or w < 1:
        raise invalid("input", f"input images must be at least 1x1 (resnet18's 7x7 conv1 with padding 3), got {h}x{w}",
                      "IMAGE_TOO_SMALL")
    if n > limits.max_batch:
        raise ResourceExhausted(f"batch {n} is over the limit max_batch={limits.max_batch}", "BATCH_TOO_LARGE",
                                metadata={"limit": str(limits.max_batch)})
    # Each stage halves the image, rounding up (to ceil(h/32) at the last); train-mode BatchNorm
    # refuses exactly one value per channel (torch's _verify_batch_size), which the last stage
    # reaches first.
    if not eval_mode and n * math.ceil(h / 32) * math.ceil(w / 32) == 1:
        raise invalid(
            "input",
            f"a training-mode forward of 1 image of {h}x{w} leaves BatchNorm one value per channel "
            "in the last stage; send a batch of 2 or more, images larger than 32x32, or use eval_mode",
            "BATCH_TOO_SMALL_FOR_TRAINING",
        )
    require_finite(x, "input")


def check_logits_size(batch: int, classes: int, max_logits_elements: int | None) -> None:
    """Refuses a forward whose logits (batch x classes) would not fit in one response."""
    if max_logits_elements is not None and batch * classes > max_logits_elements:
        raise ResourceExhausted(
            f"the logits of {batch} image(s) x {classes} classes ({batch * classes} numbers) would not "
            f"fit in one response (at most {max_logits_elements} in this output format); send a smaller batch "
            "or ask for OUTPUT_FORMAT_STATS_ONLY",
            "RESPONSE_TOO_LARGE",
            metadata={"limit": str(max_logits_elements)},
        )
