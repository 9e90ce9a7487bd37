"""Tensor streams of trainer.v1: named tensors cut into ``TensorChunk`` pieces, and put back together.

GetGradients and GetParameters answer with a stream of chunks, each tensor's in order: its first
chunk carries the tensor's shape, data type, size and statistics, every chunk a slice of its raw
bytes (``codec``'s layout), and its last chunk says so. The server writes the chunks straight into
responses in wire form (``wire.chunk_pieces``), the SDK reads them back (``wire.split_chunk_response``)
and assembles them here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from remote_trainer.contract import wire
from remote_trainer.contract.codec import CodecError, bf16_bits_to_float32, raw_dtype
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb


def encode_chunk_wire(
    name: str,
    raw: bytes | memoryview | wire.Source | None,
    shape: Iterable[int],
    data_type: int,
    stats: pb.TensorStats | None,
    chunk_bytes: int,
    packed: bool = False,
) -> list[wire.Pieces]:
    """One named tensor as GetGradients/GetParameters responses in wire form, one chunk of at most
    ``chunk_bytes`` of data each, not yet joined: each response's pieces view ``raw`` (the tensor's
    memory), copied once when they are joined (``wire.Pieces.join``, ``wire.Packer``); or, for a
    ``wire.Source``, written there by it (a cast straight into the response).

    ``raw`` None means the tensor is absent (a parameter with no .grad): one chunk says so.
    ``raw`` empty bytes (stats only, or a tensor with no elements) gives one chunk with metadata.
    ``packed`` puts each chunk in the response's ``chunks`` field, ready for a ``wire.Packer``.
    """
    if raw is None:
        absent = pb.TensorChunk(name=name, data_type=data_type, present=False, last=True)  # type: ignore[arg-type]
        absent.shape.extend(shape)
        return [wire.chunk_pieces(absent, memoryview(b""), packed)]
    out = []
    view = raw if isinstance(raw, wire.Source) else memoryview(raw).cast("B")
    total = view.nbytes
    offset = 0
    first = True
    while first or offset < total:
        end = min(offset + chunk_bytes, total)
        chunk = pb.TensorChunk(name=name, offset=offset, last=end >= total)
        if first:
            chunk.shape.extend(shape)
            chunk.data_type = data_type  # type: ignore[assignment]
            chunk.present = True
            chunk.total_bytes = total
            if stats is not None:
                chunk.stats.CopyFrom(stats)
        data = view.slice(offset, end) if isinstance(view, wire.Source) else view[offset:end]
        out.append(wire.chunk_pieces(chunk, data, packed))
        offset = end
        first = False
    return out


@dataclass
class AssembledTensor:
    """One named tensor put together from its chunks."""

    name: str
    shape: tuple[int, ...]
    data_type: int
    present: bool
    stats: pb.TensorStats | None
    array: npt.NDArray[np.generic] | None


def assemble_split_chunks(
    chunks: Iterable[tuple[pb.TensorChunk, bytes | memoryview]], with_data: bool = True
) -> Iterator[AssembledTensor]:
    """Puts a stream of chunks back together, yielding each tensor when its last chunk arrives.

    Each chunk's data comes beside it (``wire.split_chunk_response``): each tensor's bytes are
    written straight into one array allocated for it from its first chunk. ``with_data`` False is
    for a stats-only stream: tensors come with ``array`` None.
    """
    current: pb.TensorChunk | None = None
    buffer = np.empty(0, np.uint8)
    received = 0
    for chunk, data in chunks:
        if current is None or chunk.offset == 0 and chunk.name != current.name:
            current = chunk
            buffer = np.empty(chunk.total_bytes, np.uint8)
            received = 0
        elif chunk.name != current.name:
            raise CodecError(f"chunk of {chunk.name!r} arrived inside {current.name!r}", "CHUNK_ORDER")
        if chunk.offset != received or received + len(data) > len(buffer):
            raise CodecError(f"chunk of {chunk.name!r} at offset {chunk.offset} is out of order", "CHUNK_ORDER")
        buffer[received : received + len(data)] = np.frombuffer(data, np.uint8)
        received += len(data)
        if not chunk.last:
            continue
        head = current
        current = None
        stats = head.stats if head.HasField("stats") else None
        shape = tuple(int(d) for d in head.shape)
        array: npt.NDArray[np.generic] | None = None
        if head.present and with_data:
            if received != head.total_bytes:
                raise CodecError(f"tensor {head.name!r} ended after {received} of {head.total_bytes} bytes", "CHUNK_ORDER")
            dtype = raw_dtype(head.data_type)
            array = buffer.view(dtype).reshape(shape)
            if head.data_type == pb.DATA_TYPE_BFLOAT16:
                array = bf16_bits_to_float32(array)  # type: ignore[arg-type]
        yield AssembledTensor(head.name, shape, head.data_type, head.present, stats, array)
    if current is not None:  # a stream that stops inside a tensor must not look like a shorter answer
        raise CodecError(
            f"the stream ended inside tensor {current.name!r} after {received} of {current.total_bytes} bytes", "STREAM_TRUNCATED"
        )
