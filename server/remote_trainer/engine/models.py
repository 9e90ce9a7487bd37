"""Building resnet18 models: random (seeded), from a weights file, or ImageNet from the hub cache.

Nothing here downloads: ImageNet weights are read from the local torch hub cache, and when they are
missing the error says which file to put where. Files load with ``torch.load(weights_only=True)`` or
safetensors, so nothing from a file is unpickled into code.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from remote_trainer.engine.errors import FailedPrecondition, InvalidArgument, NotFound, invalid
from remote_trainer.engine.limits import MAX_CLASSES
from remote_trainer.engine.patterns import match_patterns
from remote_trainer.engine.results import FreezeResult
from remote_trainer.engine.transforms import InputTransform

# Seeded construction uses the global CPU generator (nn.Linear and resnet18 take no generator);
# this lock keeps two threads from seeding it at the same time.
_RNG_LOCK = threading.Lock()



@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Runs the block as after ``torch.manual_seed(seed)``, leaving the global RNG as it was."""
    with _RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def imagenet_weights_path() -> Path:
    """Where torchvision keeps ResNet18_Weights.DEFAULT in the torch hub cache ($TORCH_HOME/hub)."""
    filename: str = os.path.basename(ResNet18_Weights.DEFAULT.url)
    return Path(str(torch.hub.get_dir())) / "checkpoints" / filename


def random_model(num_classes: int, seed: int) -> nn.Module:
    """resnet18 initialised as ``torch.manual_seed(seed); resnet18(num_classes=num_classes)``."""
    with seeded(seed):
        model: nn.Module = resnet18(weights=None, num_classes=num_classes)
    return model


def new_head(in_features: int, num_classes: int, seed: int) -> nn.Linear:
    """A classifier head as ``torch.manual_seed(seed); nn.Linear(in_features, num_classes)``."""
    with seeded(seed):
        return nn.Linear(in_features, num_classes)


def set_mode(model: nn.Module, train: bool) -> None:
    """``model.train(train)``, skipped when the model is in that mode already: ``train()`` walks every
    module (~0.1 ms for resnet18 a forward), and the engine only ever sets the mode of the whole
    model, so the root's flag is every module's."""
    if model.training != train:
        model.train(train)


def head_of(model: nn.Module) -> nn.Linear:
    """The classifier head ``model.fc`` (an nn.Linear in every model this server builds)."""
    head = model.fc
    if not isinstance(head, nn.Linear):
        raise TypeError(f"model.fc is a {type(head).__name__}, not an nn.Linear")
    return head


def set_trainable(model: nn.Module, patterns: list[str], trainable: bool) -> FreezeResult:
    """Sets requires_grad to ``trainable`` on the parameters matching ``patterns`` (at least one)."""
    params = dict(model.named_parameters())
    if not patterns:
        raise invalid("patterns", "give at least one pattern ('*' for every parameter)", "NO_PATTERNS")
    names = match_patterns(list(params), patterns)
    changed = [n for n in names if params[n].requires_grad != trainable]
    for n in names:
        params[n].requires_grad_(trainable)
    now_trainable = [n for n, p in params.items() if p.requires_grad]
    return FreezeResult(changed, now_trainable, len(params) - len(now_trainable))


WEIGHTS_FILE_HELP = (
    "a weights file must hold a resnet18 state_dict: torch.save(model.state_dict(), 'name.pt') "
    "(read with torch.load(weights_only=True)) or safetensors.torch.save_file(model.state_dict(), 'name.safetensors')"
)


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a .safetensors file or a torch.save file (loaded with weights_only=True)."""
    if not path.is_file():
        raise NotFound(f"weights file {path.name!r} does not exist", "WEIGHTS_NOT_FOUND")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is the caller's problem, reported as such
        reader = "safetensors.torch.load_file" if path.suffix == ".safetensors" else "torch.load(weights_only=True)"
        raise invalid("weights", f"cannot read weights file {path.name!r}: {reader} failed ({type(exc).__name__}); "
                      f"{WEIGHTS_FILE_HELP}", "WEIGHTS_UNREADABLE") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise invalid("weights", f"weights file {path.name!r} does not hold a state_dict of tensors; {WEIGHTS_FILE_HELP}",
                      "WEIGHTS_UNREADABLE")
    return state


def model_from_state_dict(state: dict[str, torch.Tensor], num_classes: int, seed: int, source: str) -> nn.Module:
    """resnet18 with ``state`` loaded strictly; a different ``num_classes`` gets a new seeded head."""
    fc = state.get("fc.weight")
    if fc is None or fc.dim() != 2:
        raise invalid("weights", f"{source} is not a resnet18 state_dict (no 2-D fc.weight)", "WEIGHTS_MISMATCH")
    with seeded(0):  # its random init is overwritten, but must not draw from the shared generator unlocked
        model: nn.Module = resnet18(weights=None, num_classes=int(fc.shape[0]))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise invalid("weights", f"{source} does not fit resnet18: {exc}", "WEIGHTS_MISMATCH") from exc
    if num_classes and num_classes != fc.shape[0]:
        model.fc = new_head(head_of(model).in_features, num_classes, seed)
    return model


def imagenet_model(num_classes: int, seed: int) -> nn.Module:
    """resnet18 with ResNet18_Weights.DEFAULT read from the local torch hub cache."""
    path = imagenet_weights_path()
    if not path.is_file():
        raise FailedPrecondition(
            f"ImageNet weights are not in the server's torch hub cache: download {ResNet18_Weights.DEFAULT.url} "
            f"and put it at $TORCH_HOME/hub/checkpoints/{path.name} (nothing is downloaded by the server)",
            "IMAGENET_WEIGHTS_MISSING",
            metadata={"url": ResNet18_Weights.DEFAULT.url},
        )
    return model_from_state_dict(load_state_dict_file(path), num_classes, seed, "imagenet")


# The longest file name (in bytes) of the common Linux file systems (ext4, xfs, btrfs, tmpfs).
MAX_NAME_BYTES = 255


def resolve_inside(name: str, directory: str, field_name: str) -> Path:
    """A client-named file inside ``directory``: no absolute paths, no "..", no symlinks out, no NUL
    byte, no part longer than a file name can be."""
    if "\0" in name:
        raise invalid(field_name, "a file name cannot hold a NUL byte", "BAD_FILE_NAME")
    if any(len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES for part in name.split("/")):
        raise invalid(field_name, f"each part of a file name may be at most {MAX_NAME_BYTES} bytes long", "FILE_NAME_TOO_LONG")
    root = Path(directory).resolve()
    candidate = Path(name)
    if not name or candidate.is_absolute() or ".." in candidate.parts:
        raise invalid(field_name, f"{name!r} must be a relative name inside the server's directory", "PATH_OUTSIDE_DATA_DIR")
    resolved = (root / candidate).resolve()
    if not resolved.is_relative_to(root):
        raise invalid(field_name, f"{name!r} leads outside the server's directory", "PATH_OUTSIDE_DATA_DIR")
    return resolved


def resolve_in_data_dir(name: str, data_dir: str) -> Path:
    """A client-named weights file inside the server's data directory."""
    if not data_dir:
        raise FailedPrecondition(
            "this server has no data directory (--data-dir), so clients cannot name weight files",
            "NO_DATA_DIR",
        )
    return resolve_inside(name, data_dir, "weights")


def build_model(weights: str, num_classes: int, seed: int, *, data_dir: str = "", trusted_path: bool = False) -> tuple[nn.Module, str]:
    """A resnet18 and a description of where its weights came from.

    ``weights`` is "random", "imagenet", "auto" (imagenet when cached, else random) or a file: a path
    anywhere when ``trusted_path`` (the operator's flag), else a name inside ``data_dir`` (a client's request).
    """
    if num_classes < 0 or num_classes > MAX_CLASSES:
        raise invalid("num_classes", f"num_classes must be in 0..{MAX_CLASSES}, got {num_classes}", "BAD_NUM_CLASSES")
    if weights == "auto":
        weights = "imagenet" if imagenet_weights_path().is_file() else "random"
    if weights in ("", "random"):
        return random_model(num_classes or 1000, seed), f"random(seed={seed})"
    if weights == "imagenet":
        return imagenet_model(num_classes, seed), "imagenet"
    path = Path(weights) if trusted_path else resolve_in_data_dir(weights, data_dir)
    return model_from_state_dict(load_state_dict_file(path), num_classes, seed, f"weights file {path.name!r}"), path.name


def resolve_device(name: str) -> torch.device:
    """The torch device for a --device value; "auto" is cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InvalidArgument(f"unknown device {name!r}: {exc}", "BAD_DEVICE") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("device cuda was asked for, but CUDA is not available", "BAD_DEVICE")
    return device


@dataclass(frozen=True)
class ModelSpec:
    """What a session's model is made from, as plain data: the engine builds the model itself from
    this, wherever it runs (this process, or a Ray actor on another node), so no built module ever
    crosses a process boundary.

    ``weights`` as ``build_model`` takes it; ``device`` as ``resolve_device`` takes it, resolved
    where the engine runs ("auto" is that process's GPU when it has one). ``trusted_path`` lets
    ``weights`` be any path (the operator's own setting, for the default session); otherwise a
    weights file must be a name inside ``data_dir`` (what a client may ask for).
    """

    weights: str = "random"
    num_classes: int = 0
    seed: int = 0
    device: str = "auto"
    data_dir: str = ""
    trusted_path: bool = False
    # How the model runs: forwards under torch.autocast ("off", "bf16" or "fp16") and weights and
    # inputs in channels_last memory format (the session's choice, else the server's settings);
    # cuDNN autotuning (torch.backends.cudnn.benchmark, for the whole process; CUDA only) and
    # tensors to and from the device through page-locked host buffers (CUDA only): the server's.
    autocast: str = "off"
    channels_last: bool = False
    cudnn_benchmark: bool = False
    pin_memory: bool = False
    # What the session does to uint8 inputs on the device (the session's choice; None: nothing, and
    # they are refused).
    input_transform: InputTransform | None = None

    def build(self) -> tuple[nn.Module, str, torch.device]:
        """The model, where its weights came from, and its device."""
        device = resolve_device(self.device)
        if self.cudnn_benchmark and device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        model, source = build_model(
            self.weights, self.num_classes, self.seed, data_dir=self.data_dir, trusted_path=self.trusted_path
        )
        return model, source, device
