"""Shared memory with a server on this host: the session's region, and the calls that go through it.

``Session.use_shared_memory()`` (or ``create_session(shared_memory=True)``) asks the server for a
region (``OpenSharedMemory``, with the client's token: only who may use the session gets it),
redeems the single-use ticket it answers on the server's local socket for the region's file
descriptor (``SharedRegion.fetch``) and maps it. From then on the session's ``forward`` and
``train_step`` write their input into the region, and ``gradients`` and ``parameters`` read the
tensors the server wrote there, instead of sending the bytes in gRPC messages; what they return is
a copy, never a view of the region (which the next call overwrites). docs/shared-memory.md says
what the server must allow and what each side guarantees.

As in ``core``, the functions that build calls do no I/O; ``SharedRegion.fetch`` is the one place
that talks to the socket.
"""

from __future__ import annotations

import mmap
import os
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from remote_trainer.client import core
from remote_trainer.client.errors import FailedPreconditionError
from remote_trainer.client.types import ForwardResult, NamedTensor, TrainStepResult
from remote_trainer.contract import codec, wire
from remote_trainer.contract.names import LossName, TransferDataType
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb

# A region's size unless told: all of resnet18's float32 gradients or parameters and buffers (46.8 MB),
# or a float32 batch of 64 at 3 x 224 x 224 (38.5 MB).
DEFAULT_BYTES = 64 * core.MIB
FETCH_SECONDS = 5.0  # the most the socket exchange may take
KEPT_BUFFERS = 2  # answer buffers a region keeps for reuse


@dataclass(frozen=True)
class Grant:
    """What OpenSharedMemory answered: where and with what to fetch the region."""

    ticket: str
    socket_address: str
    size_bytes: int
    region: str  # the region's id, named by the calls that use it


class SharedRegion:
    """The client's mapping of a session's region."""

    def __init__(self, mapping: mmap.mmap, size: int, region: str, views: bool = False) -> None:
        self.map = mapping
        self.size = size
        self.id = region
        self.views = views  # read() answers read-only views of the region instead of a copy
        # The buffers of the last answers' copies: one that no array views any more is written
        # again (warm pages, no page faults), so a loop that keeps only its latest answer copies
        # into memory already mapped; two, so that the answer being replaced may still be alive.
        self._buffers: list[npt.NDArray[np.uint8]] = []

    @classmethod
    def fetch(cls, grant: Grant, views: bool = False) -> SharedRegion:
        """Redeems the grant's ticket on the server's socket and maps the region it answers with."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
                connection.settimeout(FETCH_SECONDS)
                connection.connect("\0" + grant.socket_address)
                connection.sendall(grant.ticket.encode("ascii"))
                answer, fds, _, _ = socket.recv_fds(connection, 16, 1)
        except OSError as exc:
            raise FailedPreconditionError(
                f"cannot reach the server's shared-memory socket ({exc}): shared memory works only for a client on the "
                "server's host, in its network namespace", "SHARED_MEMORY_UNAVAILABLE") from exc
        if answer != b"OK" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise FailedPreconditionError("the server refused the shared-memory ticket (used, expired or unknown)",
                                          "SHARED_MEMORY_UNAVAILABLE")
        try:
            return cls(mmap.mmap(fds[0], grant.size_bytes), grant.size_bytes, grant.region, views)
        finally:
            os.close(fds[0])

    def close(self) -> None:
        """Unmaps the region on this side (the server unmaps its own when the session closes); with
        views still alive, once the last of them goes."""
        try:
            self.map.close()
        except BufferError:
            pass

    def fits(self, x: Any) -> bool:
        """Whether the input batch ``x`` fits in the region (else it goes in the message)."""
        return core.images(x).nbytes <= self.size

    def write(self, x: Any, target: pb.SharedTensor) -> None:
        """Copies the input batch ``x`` (as ``core.images`` sends it) to the region's start, and
        describes it in ``target``."""
        arr = np.ascontiguousarray(core.images(x))
        if arr.size:
            np.frombuffer(self.map, dtype=arr.dtype, count=arr.size).reshape(arr.shape)[...] = arr
        target.offset = 0
        target.region = self.id
        target.shape[:] = arr.shape
        target.data_type = pb.DATA_TYPE_UINT8 if arr.dtype == np.uint8 else pb.DATA_TYPE_FLOAT32

    def answer(self) -> npt.NDArray[np.uint8] | None:
        """Where an answer's tensors are copied as their chunks arrive (``take``): the region's size
        of private memory (None with ``views``: nothing is copied)."""
        return None if self.views else self._buffer()

    def take(self, chunks: list[pb.TensorChunk], answer: npt.NDArray[np.uint8] | None) -> None:
        """Copies the bytes of the tensors the chunks describe (one response's: the server sends
        them as it writes them) into ``answer``, at their offsets, in one piece."""
        start, end = self._span(chunks)
        if answer is not None and end > start:
            answer[start:end] = np.frombuffer(self.map, np.uint8, end - start, start)

    def read(self, chunks: list[pb.TensorChunk], answer: npt.NDArray[np.uint8] | None) -> list[npt.NDArray[Any] | None]:
        """The tensors the chunks describe (at shared_memory_offset, total_bytes each; None for an
        absent one): views of ``answer``, the private copy ``take`` made, never of the region. With
        ``views`` (``answer`` None), read-only views of the region itself (no copy), good until the
        session's next call through the region overwrites them."""
        _, end = self._span(chunks)
        if answer is None:
            source = np.frombuffer(self.map, np.uint8, end)
            source.flags.writeable = False
        else:
            source = answer[:end]
        out: list[npt.NDArray[Any] | None] = []
        for chunk in chunks:
            if not chunk.present:
                out.append(None)
                continue
            header = pb.Tensor(shape=chunk.shape, data_type=chunk.data_type)
            out.append(codec.decode(header, source[chunk.shared_memory_offset:chunk.shared_memory_offset + chunk.total_bytes].data))
        return out

    def _span(self, chunks: list[pb.TensorChunk]) -> tuple[int, int]:
        """Where the present tensors the chunks describe lie in the region: from, to (0, 0 for none)."""
        present = [c for c in chunks if c.present]
        if not present:
            return 0, 0
        start = min(c.shared_memory_offset for c in present)
        end = max(c.shared_memory_offset + c.total_bytes for c in present)
        if end > self.size or start < 0:
            raise ValueError(f"the server described tensors outside the region ({start} to {end} of {self.size} bytes)")
        return start, end

    def _buffer(self) -> npt.NDArray[np.uint8]:
        """The region's size of memory to copy an answer into: a kept buffer nothing else refers to
        any more (no array of an earlier answer views it), else a new one, kept for later."""
        for buffer in self._buffers:
            # Referred to by the list, this loop and getrefcount's argument only: free.
            if sys.getrefcount(buffer) <= 3:
                return buffer
        fresh = np.empty(self.size, np.uint8)  # pages are taken only where answers are written
        self._buffers = [*self._buffers[-(KEPT_BUFFERS - 1):], fresh]
        return fresh


def open_region(session_id: str, size_bytes: int) -> core.Call[Grant]:
    request = pb.OpenSharedMemoryRequest(session_id=session_id, size_bytes=size_bytes)
    return core.Call(core._path("OpenSharedMemory"), request,
                     lambda r: Grant(r.ticket, r.socket_address, int(r.size_bytes), r.region))


def forward(session_id: str, region: SharedRegion, x: Any, eval_mode: bool, no_grad: bool,
            stats_only: bool) -> core.Call[ForwardResult]:
    """``core.forward`` with the input in the region (written now: hold the region until the call ends)."""
    request = pb.ForwardRequest(
        session_id=session_id, eval_mode=eval_mode, no_grad=no_grad,
        output_format=pb.OUTPUT_FORMAT_STATS_ONLY if stats_only else pb.OUTPUT_FORMAT_RAW,
    )
    region.write(x, request.input.shared_memory)
    return core.Call(core._path("Forward"), _unspliced(request), core.forward_result)


def train_step(session_id: str, region: SharedRegion, x: Any, loss: LossName, labels: Any, zero_grad: bool,
               grad_norm: bool, return_logits: bool) -> core.Call[TrainStepResult]:
    """``core.train_step`` with the input in the region."""
    request = pb.TrainStepRequest(session_id=session_id, zero_grad=zero_grad, return_grad_norm=grad_norm,
                                  return_logits=return_logits)
    core._fill_loss(request.loss, loss, labels)
    region.write(x, request.input.shared_memory)
    return core.Call(core._path("TrainStep"), _unspliced(request), core.train_step_result)


def _unspliced(request: pb.ForwardRequest | pb.TrainStepRequest) -> wire.SplicedRequest:
    """The request as the channel's Forward and TrainStep send it, with no bytes beside it."""
    return wire.SplicedRequest(request, (), memoryview(b""))


def _read_all(region: SharedRegion, with_data: bool) -> Any:
    def parse(responses: Iterable[core.ChunkResponse]) -> dict[str, NamedTensor]:
        # Each response's tensors are copied out as it arrives, while the server writes the next ones.
        answer = region.answer() if with_data else None
        chunks: list[pb.TensorChunk] = []
        for response in responses:
            got = [chunk for chunk, _ in response]
            if with_data:
                region.take(got, answer)
            chunks += got
        arrays = region.read(chunks, answer) if with_data else [None] * len(chunks)
        return {chunk.name: NamedTensor(chunk.name, tuple(chunk.shape), chunk.present,
                                        core.stats(chunk.stats) if chunk.HasField("stats") else None, array)
                for chunk, array in zip(chunks, arrays)}
    return parse


def gradients(session_id: str, region: SharedRegion, patterns: Iterable[str], stats_only: bool, dtype: TransferDataType,
              with_stats: bool) -> core.StreamCall[dict[str, NamedTensor]]:
    """``core.gradients`` with the elements in the region (read when the stream ends: hold the region until then)."""
    request = pb.GetGradientsRequest(session_id=session_id, patterns=list(patterns), stats_only=stats_only,
                                     transfer_data_type=core._transfer_type(dtype), skip_stats=not with_stats,
                                     shared_memory_region=region.id)
    return core.StreamCall(core._path("GetGradients"), request, _read_all(region, not stats_only))


def parameters(session_id: str, region: SharedRegion, patterns: Iterable[str], stats_only: bool, dtype: TransferDataType,
               include_buffers: bool, with_stats: bool) -> core.StreamCall[dict[str, NamedTensor]]:
    """``core.parameters`` with the elements in the region."""
    request = pb.GetParametersRequest(session_id=session_id, patterns=list(patterns), stats_only=stats_only,
                                      transfer_data_type=core._transfer_type(dtype), include_buffers=include_buffers,
                                      skip_stats=not with_stats, shared_memory_region=region.id)
    return core.StreamCall(core._path("GetParameters"), request, _read_all(region, not stats_only))


def gone() -> FailedPreconditionError:
    """The refusal of a call through a region that another thread dropped meanwhile (the session closed)."""
    return FailedPreconditionError("the session's shared-memory region was dropped during the call (closed?)",
                                   "SHARED_MEMORY_UNAVAILABLE")


def size_of(size: bool | int) -> int:
    """The region size ``create_session(shared_memory=...)`` asks for: True, the default; a number, itself."""
    return DEFAULT_BYTES if size is True else int(size)

