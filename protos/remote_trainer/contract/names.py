"""The vocabulary that the SDK, the server and the engine share, by name: loss functions,
optimizers and their fields, the distributions of generated inputs, autocast dtypes, memory
formats and the input transforms' constants.

Plain Python with no generated code, so the engine can use these names without importing the wire.
``codec`` maps the losses, optimizers and distributions to their wire enums; autocast and memory
format travel as plain strings.
"""

from __future__ import annotations

from typing import Literal, get_args

# Server-side losses: "sum" is the tutorial's (prediction - labels).sum().
LossName = Literal["sum", "cross_entropy", "mse"]
OptimizerName = Literal["sgd", "adam", "adamw"]
# How the server generates an input it is not sent (zeros, ones, torch.rand, torch.randn, torch.randint).
Distribution = Literal["zeros", "ones", "uniform", "normal", "randint"]
# The OptimizerConfig fields that carry values (all optional: unset takes torch's default).
OptimizerField = Literal["lr", "momentum", "dampening", "weight_decay", "nesterov", "beta1", "beta2", "eps", "amsgrad"]
OPTIMIZER_FIELDS: tuple[OptimizerField, ...] = get_args(OptimizerField)
# GPU fast paths a session runs with: forwards under torch.autocast in this type ("off": float32),
# and the memory format of its weights and inputs.
AutocastName = Literal["off", "bf16", "fp16"]
MemoryFormatName = Literal["contiguous", "channels_last"]
AUTOCAST_MODES: tuple[AutocastName, ...] = get_args(AutocastName)
MEMORY_FORMATS: tuple[MemoryFormatName, ...] = get_args(MemoryFormatName)
# The dtypes gradients and parameters can travel in (GetGradients/GetParameters transfer_data_type).
TransferDataType = Literal["float32", "float16", "bfloat16"]
# The per-channel (R, G, B) mean and standard deviation of ImageNet that torchvision's pretrained
# models expect after ToTensor() (``transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)``): the
# constants of the "imagenet" input transform (InputTransform in the proto).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# The input transforms the SDK and the CLI name: "imagenet" (ToTensor() then Normalize with the
# constants above) and "scale" (ToTensor() alone: x / 255).
InputTransformName = Literal["imagenet", "scale"]
INPUT_TRANSFORMS: tuple[InputTransformName, ...] = get_args(InputTransformName)
