"""Handles on the parts of a ``RemoteModel``: ``model.fc.weight`` (``RemoteParameter``) and
``model.layer4`` (``RemoteModule``). Reading a parameter's ``.grad`` or ``.data`` fetches it; setting
``requires_grad`` freezes or unfreezes it on the server. Needs torch, as ``remote`` does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from remote_trainer.client.types import Stats

if TYPE_CHECKING:
    from remote_trainer.client.remote import RemoteModel


def to_tensor(array: Any) -> torch.Tensor:
    """A writable torch tensor copied from a (possibly read-only) numpy array."""
    return torch.from_numpy(np.array(array, copy=True))


class RemoteParameter:
    """A handle on one parameter of the server's model; reading ``.grad`` or ``.data`` fetches it.

    ``param.requires_grad = False`` freezes it on the server (``FreezeLayers``), ``True`` unfreezes.
    """

    def __init__(self, model: RemoteModel, name: str) -> None:
        self.model = model
        self.name = name

    @property
    def shape(self) -> torch.Size:
        """The parameter's shape (as of the last ``ListParameters``; a new head refreshes it)."""
        return torch.Size(self.model._parameter_list()[self.name].shape)

    def size(self) -> torch.Size:
        return self.shape

    def numel(self) -> int:
        return int(self.shape.numel())

    def dim(self) -> int:
        return len(self.shape)

    @property
    def data(self) -> torch.Tensor:
        """The parameter's current value, fetched from the server (a copy)."""
        value = self.model.session.parameters(self.name, stats=False)[self.name].array
        assert value is not None  # a parameter always has a value
        return to_tensor(value)

    def detach(self) -> torch.Tensor:
        """Same as ``.data``: the value, fetched."""
        return self.data

    @property
    def grad(self) -> torch.Tensor | None:
        """The parameter's ``.grad`` on the server (a copy), or None when it has none."""
        value = self.model.session.gradients(self.name, stats=False)[self.name]
        return to_tensor(value.array) if value.present else None

    @property
    def grad_stats(self) -> Stats | None:
        """Statistics of ``.grad`` (norm, min, max, mean), without transferring it; None without a grad."""
        value = self.model.session.gradients(self.name, stats_only=True)[self.name]
        return value.stats if value.present else None

    @property
    def requires_grad(self) -> bool:
        """Whether autograd computes a gradient for it on the server, as this model knows it (no call:
        what the server last said, with the changes not yet sent)."""
        return self.model._requires_grad_of(self.name)

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        self.requires_grad_(value)

    def requires_grad_(self, requires_grad: bool = True) -> RemoteParameter:
        """Freezes (False) or unfreezes (True) this parameter on the server: the change is sent with
        the others made since, in one FreezeLayers call, before the model's next call to the server."""
        self.model._defer_requires_grad(self.name, requires_grad)
        return self

    def __repr__(self) -> str:
        return f"RemoteParameter({self.name!r}, shape={tuple(self.shape)})"


class RemoteModule:
    """A handle on a submodule of the server's model, by name prefix: ``model.layer4``, ``model.layer1[0]``."""

    def __init__(self, model: RemoteModel, prefix: str) -> None:
        self._model = model
        self._prefix = prefix

    @property
    def name(self) -> str:
        return self._prefix

    def __getattr__(self, name: str) -> RemoteModule | RemoteParameter:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._model._handle(f"{self._prefix}.{name}")

    def __getitem__(self, index: int) -> RemoteModule | RemoteParameter:
        return self._model._handle(f"{self._prefix}.{index}")

    def named_parameters(self) -> Iterator[tuple[str, RemoteParameter]]:
        """(name relative to this module, handle) of every parameter under it, in model order."""
        start = len(self._prefix) + 1
        for name in self._model._names():
            if name.startswith(self._prefix + "."):
                yield name[start:], RemoteParameter(self._model, name)

    def parameters(self) -> Iterator[RemoteParameter]:
        return (p for _, p in self.named_parameters())

    def requires_grad_(self, requires_grad: bool = True) -> RemoteModule:
        """Freezes (False) or unfreezes (True) every parameter under this module, in one call."""
        self._model._set_requires_grad([self._prefix], requires_grad)
        return self

    def __repr__(self) -> str:
        return f"RemoteModule({self._prefix!r})"
