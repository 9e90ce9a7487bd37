"""Tensors as plain data for a process boundary: numpy arrays plus the torch dtype's name.

An engine in another process (a Ray actor) takes and returns the engine's own dataclasses; ``pack``
replaces every torch tensor in them (however nested in dataclasses, lists, tuples and dicts) with a
``PortableArray`` and ``unpack`` puts the tensors back. numpy arrays travel through Ray's object
store without a copy on reading (the reader gets a read-only view of shared memory), and
``torch.from_numpy`` wraps such a view again without copying. bfloat16, which numpy lacks, travels
as its raw 16-bit patterns.

``seal`` and ``unseal`` are ``pack`` and ``unpack`` for a Ray call's request and answer: a value that
holds no array is pickled here, into bytes, which Ray carries as they are (its own serialiser costs
a small call about 0.1-0.2 ms more, measured); one with arrays goes to Ray as packed, so that they
cross through its object store without a copy.
"""

from __future__ import annotations

import dataclasses
import pickle
import warnings
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt
import torch

# Views of read-only shared memory are only ever read (the engine copies before it writes); torch
# warns about wrapping them, so that one warning is silenced here, as in server/convert.py.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

# torch dtypes numpy cannot hold, sent as integers of the same width.
_BITS_AS = {torch.bfloat16: torch.int16}


@dataclass(frozen=True)
class PortableArray:
    """A CPU tensor as a numpy array of its values (or raw bits) and the name of its torch dtype."""

    array: npt.NDArray[Any]
    dtype: str  # "float32", "bfloat16", ...


def _pack_tensor(tensor: torch.Tensor) -> PortableArray:
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    name = str(t.dtype).removeprefix("torch.")
    if t.dtype in _BITS_AS:
        t = t.view(_BITS_AS[t.dtype])
    return PortableArray(t.contiguous().numpy(), name)


def _unpack_array(item: PortableArray) -> torch.Tensor:
    dtype = getattr(torch, item.dtype)
    tensor = torch.from_numpy(item.array)
    return tensor.view(dtype) if dtype in _BITS_AS else tensor


def pack(value: Any) -> Any:
    """``value`` with every torch tensor replaced by a ``PortableArray``."""
    if isinstance(value, torch.Tensor):
        return _pack_tensor(value)
    return _walk(value, pack)


def unpack(value: Any) -> Any:
    """``value`` with every ``PortableArray`` turned back into a CPU torch tensor (no copy)."""
    if isinstance(value, PortableArray):
        return _unpack_array(value)
    return _walk(value, unpack)


def _walk(value: Any, fn: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: fn(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return dataclasses.replace(value, **changes)
    if isinstance(value, list):
        return [fn(v) for v in value]
    if isinstance(value, tuple):
        return tuple(fn(v) for v in value)
    if isinstance(value, dict):
        return {k: fn(v) for k, v in value.items()}
    return value


def seal(value: Any) -> Any:
    """``pack(value)``, pickled into bytes when it holds no array (what ``unseal`` reads)."""
    packed = pack(value)
    arrays: list[pickle.PickleBuffer] = []
    data = pickle.dumps(packed, protocol=5, buffer_callback=arrays.append)  # arrays stay out of the bytes
    return packed if arrays else data


def unseal(value: Any) -> Any:
    """``unpack`` of what ``seal`` made."""
    return unpack(pickle.loads(value) if isinstance(value, bytes) else value)
