"""Shared memory with a server on this host: the session's region, and the calls that go through it.

``Session.use_shared_memory()`` (or ``create_session(shared_memory=True)``) asks the server for a
region (``OpenSharedMemory``, with the client's token: only who may use the session gets it),
redeems the single-use ticket it answers on the server's local socket for the region's file
descriptor (``SharedRegion.fetch``) and maps it. From then on the session's ``forward`` and
``train_step`` write their input into the region, and ``gradients`` and ``parameters`` read the
tensors the server wrote there, instead of sending the bytes in gRPC messages. The region is cut in
``AREAS`` equal areas: the first for inputs, the others for answers. What ``gradients`` and
``parameters`` return are (writable) views of an answer area, which no later call writes while
any of them is alive: each request names the area the server must write, and the SDK names only
one that no live array lies in (``SharedRegion.claim``), else the call goes through gRPC messages.
docs/shared-memory.md says what the server must allow and what each side guarantees.

As in ``core``, the functions that build calls do no I/O; ``SharedRegion.fetch`` is the one place
that talks to the socket.
"""

from __future__ import annotations

import mmap
import os
import socket
import time
import weakref
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

# A region is cut in this many equal areas: the first for inputs, the others for answers (so an
# answer held while the next one comes needs no copy; with every answer area held, gRPC messages).
AREAS = 3
ALIGN = 64  # areas start at multiples of this many bytes (as the server requires)
# A region's size unless told: three areas of 48 MiB, each room for all of resnet18's float32
# gradients or parameters and buffers (46.8 MB) or a float32 batch of 64 at 3 x 224 x 224 (38.5 MB).
DEFAULT_BYTES = AREAS * 48 * core.MIB
FETCH_SECONDS = 5.0  # the most the socket exchange may take


@dataclass(frozen=True)
class Grant:
    """What OpenSharedMemory answered: where and with what to fetch the region."""

    ticket: str
    socket_address: str
    size_bytes: int
    region: str  # the region's id, named by the calls that use it


class SharedRegion:
    """The client's mapping of a session's region, and which of its answer areas answers still use."""

    def __init__(self, mapping: mmap.mmap, size: int, region: str) -> None:
        self.map = mapping
        self.size = size
        self.id = region
        self.area_bytes = size // AREAS // ALIGN * ALIGN
        # The answer areas (1 to AREAS - 1) that arrays of an answer still lie in: each answer's
        # arrays are views of one base array over its area, whose finalizer frees the area when
        # the last of them goes. Added to and read under the session handle's lock; freed by the
        # garbage collector from any thread (set.add and discard are atomic).
        self._held: set[int] = set()

    @classmethod
    def fetch(cls, grant: Grant) -> SharedRegion:
        """Redeems the grant's ticket on the server's socket and maps the region it answers with."""
        until = time.monotonic() + FETCH_SECONDS
        pause = 0.01
        while True:
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
                    connection.settimeout(max(0.01, until - time.monotonic()))
                    connection.connect("\0" + grant.socket_address)
                    connection.sendall(grant.ticket.encode("ascii"))
                    answer, fds, _, _ = socket.recv_fds(connection, 16, 1, socket.MSG_CMSG_CLOEXEC)
            except (ConnectionResetError, BrokenPipeError):  # closed before it read the ticket: as below
                answer, fds = b"", []
            except OSError as exc:
                raise FailedPreconditionError(
                    f"cannot reach the server's shared-memory socket ({exc}): shared memory works only for a client on the "
                    "server's host, in its network namespace", "SHARED_MEMORY_UNAVAILABLE") from exc
            if answer or fds:
                break
            # Closed without an answer: the server was serving too many connections (its ticket was
            # not read, so it is still good). Again, a little later, until FETCH_SECONDS have passed.
            if time.monotonic() + pause > until:
                raise FailedPreconditionError(
                    f"the server's shared-memory socket was busy for {FETCH_SECONDS:g} s (too many connections at "
                    "once, perhaps another user's): try again", "SHARED_MEMORY_UNAVAILABLE")
            time.sleep(pause)
            pause = min(0.2, pause * 2)
        if answer != b"OK" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise FailedPreconditionError("the server refused the shared-memory ticket (used, expired or unknown)",
                                          "SHARED_MEMORY_UNAVAILABLE")
        try:
            return cls(mmap.mmap(fds[0], grant.size_bytes), grant.size_bytes, grant.region)
        finally:
            os.close(fds[0])

    def close(self) -> None:
        """Unmaps the region on this side (the server unmaps its own when the session closes); with
        answers still alive, once the last of them goes."""
        try:
            self.map.close()
        except BufferError:
            pass

    def fits(self, x: Any) -> bool:
        """Whether the input batch ``x`` fits in the input area (else it goes in the message)."""
        return core.images(x).nbytes <= self.area_bytes

    def write(self, x: Any, target: pb.SharedTensor) -> None:
        """Copies the input batch ``x`` (as ``core.images`` sends it) to the input area (the
        region's start), and describes it in ``target``."""
        arr = np.ascontiguousarray(core.images(x))
        if arr.size:
            np.frombuffer(self.map, dtype=arr.dtype, count=arr.size).reshape(arr.shape)[...] = arr
        target.offset = 0
        target.region = self.id
        target.shape[:] = arr.shape
        target.data_type = pb.DATA_TYPE_UINT8 if arr.dtype == np.uint8 else pb.DATA_TYPE_FLOAT32

    def claim(self) -> int | None:
        """An answer area no live array lies in (None: all are held, or too small to be of use)."""
        if self.area_bytes == 0:
            return None
        return next((area for area in range(1, AREAS) if area not in self._held), None)

    def read(self, area: int, chunks: list[pb.TensorChunk]) -> list[npt.NDArray[Any] | None]:
        """The tensors the chunks describe (at shared_memory_offset, total_bytes each; None for an
        absent one), as views of the answer ``area`` the server wrote them in: writable, and held
        (no later request names the area) until the last of them goes."""
        start = area * self.area_bytes
        base = np.frombuffer(self.map, np.uint8, self.area_bytes, start)
        out: list[npt.NDArray[Any] | None] = []
        for chunk in chunks:
            if not chunk.present:
                out.append(None)
                continue
            offset = chunk.shared_memory_offset - start
            if offset < 0 or offset + chunk.total_bytes > self.area_bytes:
                raise ValueError(f"the server described a tensor outside the answer area ({chunk.total_bytes} bytes at "
                                 f"{chunk.shared_memory_offset}, the area is {self.area_bytes} bytes at {start})")
            array: npt.NDArray[Any] = np.ndarray(tuple(chunk.shape), codec.raw_dtype(chunk.data_type), base, offset)
            if array.nbytes != chunk.total_bytes:
                raise ValueError(f"{chunk.name}: {chunk.total_bytes} bytes described for shape {list(chunk.shape)}")
            out.append(codec.bf16_bits_to_float32(array) if chunk.data_type == pb.DATA_TYPE_BFLOAT16 else array)
        self._held.add(area)
        weakref.finalize(base, self._held.discard, area)
        return out

    def request_area(self, area: int) -> tuple[int, int]:
        """The request's shared_memory_area_offset and _bytes for answer ``area``."""
        return area * self.area_bytes, self.area_bytes


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


def _read_all(region: SharedRegion, area: int | None) -> Any:
    def parse(responses: Iterable[core.ChunkResponse]) -> dict[str, NamedTensor]:
        chunks = [chunk for response in responses for chunk, _ in response]
        arrays = region.read(area, chunks) if area is not None else [None] * len(chunks)
        return {chunk.name: NamedTensor(chunk.name, tuple(chunk.shape), chunk.present,
                                        core.stats(chunk.stats) if chunk.HasField("stats") else None, array)
                for chunk, array in zip(chunks, arrays)}
    return parse


def gradients(session_id: str, region: SharedRegion, patterns: Iterable[str], stats_only: bool, dtype: TransferDataType,
              with_stats: bool) -> core.StreamCall[dict[str, NamedTensor]]:
    """``core.gradients`` with the elements in a free answer area of the region (read when the
    stream ends: hold the region until then); with none free, ``core.gradients`` itself."""
    area = None if stats_only else region.claim()
    if area is None and not stats_only:
        return core.gradients(session_id, patterns, stats_only, dtype, with_stats)
    request = pb.GetGradientsRequest(session_id=session_id, patterns=list(patterns), stats_only=stats_only,
                                     transfer_data_type=core._transfer_type(dtype), skip_stats=not with_stats,
                                     shared_memory_region=region.id)
    if area is not None:
        request.shared_memory_area_offset, request.shared_memory_area_bytes = region.request_area(area)
    return core.StreamCall(core._path("GetGradients"), request, _read_all(region, area))


def parameters(session_id: str, region: SharedRegion, patterns: Iterable[str], stats_only: bool, dtype: TransferDataType,
               include_buffers: bool, with_stats: bool) -> core.StreamCall[dict[str, NamedTensor]]:
    """``core.parameters`` with the elements in a free answer area of the region, as ``gradients``."""
    area = None if stats_only else region.claim()
    if area is None and not stats_only:
        return core.parameters(session_id, patterns, stats_only, dtype, include_buffers, with_stats)
    request = pb.GetParametersRequest(session_id=session_id, patterns=list(patterns), stats_only=stats_only,
                                      transfer_data_type=core._transfer_type(dtype), include_buffers=include_buffers,
                                      skip_stats=not with_stats, shared_memory_region=region.id)
    if area is not None:
        request.shared_memory_area_offset, request.shared_memory_area_bytes = region.request_area(area)
    return core.StreamCall(core._path("GetParameters"), request, _read_all(region, area))


def gone() -> FailedPreconditionError:
    """The refusal of a call through a region that another thread dropped meanwhile (the session closed)."""
    return FailedPreconditionError("the session's shared-memory region was dropped during the call (closed?)",
                                   "SHARED_MEMORY_UNAVAILABLE")


def size_of(size: bool | int) -> int:
    """The region size ``create_session(shared_memory=...)`` asks for: True, the default; a number, itself."""
    return DEFAULT_BYTES if size is True else int(size)

