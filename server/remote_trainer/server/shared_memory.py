"""Shared memory for clients on the server's host: one region a session, handed over as a file descriptor.

A region is an anonymous memory file (``memfd_create``): it has no name in any filesystem, so no
one can guess or open it, and it lives only while some process maps it or holds its descriptor (a
server killed with SIGKILL leaves nothing behind, in ``/dev/shm`` or elsewhere). It is sealed at its
size (``F_SEAL_GROW``, ``F_SEAL_SHRINK``), so a client can neither take more memory through it nor
shrink it under the server's mapping. ``OpenSharedMemory`` (which only the session's owner may call,
as every call on a session, and never on the default session, which every caller may use) makes the
region, counted in the memory budget until the session ends (a replaced region too: its client may
still map it), and answers a ticket: 256 random bits, good once and for ``TICKET_SECONDS``. The
client sends the ticket on the server's Unix-domain socket, named at random in the Linux abstract
namespace (again nothing in a filesystem, gone with the process), and gets the descriptor back (``SCM_RIGHTS``); a wrong, used or expired ticket gets ``NO`` and nothing.

Through the region travel Forward and TrainStep inputs (``SharedTensor``; read from the region
during the call, and copied out when it begins by a Forward that keeps its graph for Backward:
``convert.input_tensor``'s ``borrow``) and GetGradients and GetParameters elements (written by the
server at ``ALIGN``-ed offsets within the area the request names, described by the chunks of the
stream's one response: ``TensorWriter``). What a call wrote is good until a later call names the
same area (the client names only areas no answer it still holds lies in). The server unmaps the
region when the session closes or expires, or the server stops; the client unmaps its own mapping.
"""

from __future__ import annotations

import fcntl
import logging
import math
import mmap
import os
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from remote_trainer.contract import codec
from remote_trainer.engine.errors import FailedPrecondition, ResourceExhausted, invalid
from remote_trainer.engine.results import NamedTensor
from remote_trainer.server import convert
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb

log = logging.getLogger(__name__)

TICKET_SECONDS = 10.0  # how long a ticket may wait to be redeemed
REDEEM_SECONDS = 2.0  # how long a connection to the ticket socket may take to send its ticket
MAX_REDEEMING = 16  # connections to the ticket socket served at once (more are closed at once)
MAX_REDEEMING_PER_USER = 4  # of which one user (the peer's uid, SO_PEERCRED) may hold at most this many
ALIGN = 64  # tensors written by the server start at multiples of this many bytes
TICKET_BYTES = 32  # 256 random bits, sent as 64 hex digits


def unavailable(why: str) -> FailedPrecondition:
    """SHARED_MEMORY_UNAVAILABLE: the server does not allow shared memory, or the session has none."""
    return FailedPrecondition(why, "SHARED_MEMORY_UNAVAILABLE")


def on_default_session() -> FailedPrecondition:
    """SHARED_MEMORY_DEFAULT_SESSION: the default session gets no region (every caller may use it, so any
    caller could replace a region there)."""
    return FailedPrecondition("the default session, which every caller may use, gets no shared-memory region (any "
                              "caller could replace it): create a session of your own and open the region there",
                              "SHARED_MEMORY_DEFAULT_SESSION")


class Region:
    """One session's region: the sealed memory file and the server's mapping of it."""

    def __init__(self, size: int) -> None:
        fd = os.memfd_create("trainer-shared-memory", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self.map: mmap.mmap = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd  # -1 once closed
        self.size = size
        self.id = secrets.token_hex(8)  # named by the calls that use it: a replaced region is refused

    def close(self) -> None:
        """Closes the descriptor and unmaps the region (a call still holding a view of it keeps the
        mapping until that view goes)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            self.map.close()
        except BufferError:  # a call's view of it is still alive: unmapped when the last one goes
            log.debug("shared-memory region closed while a call still views it")

    def input(self, msg: pb.SharedTensor, field: str) -> tuple[pb.Tensor, memoryview]:
        """The header and bytes of a ``SharedTensor`` (a view of the region: the caller copies)."""
        header = pb.Tensor(shape=msg.shape, data_type=msg.data_type)
        try:
            size = math.prod(codec.check_shape(msg.shape)) * codec.raw_dtype(msg.data_type).itemsize
        except codec.CodecError as exc:
            raise invalid(f"{field}.shared_memory", f"{field}: {exc}", exc.reason) from exc
        if msg.offset < 0 or msg.offset + size > self.size:
            raise invalid(f"{field}.shared_memory.offset", f"{field}: {size} bytes at offset {msg.offset} do not lie inside "
                          f"the session's shared-memory region of {self.size} bytes", "BAD_SHARED_TENSOR")
        return header, memoryview(self.map)[msg.offset : msg.offset + size]

    def area(self, offset: int, size: int) -> tuple[int, int]:
        """Where a GetGradients/GetParameters answer may be written: the request's
        ``shared_memory_area_offset`` and ``_bytes`` (0: to the region's end) as from, to; refused
        (BAD_SHARED_TENSOR) unless inside the region and ``ALIGN``-ed."""
        end = self.size if size == 0 else offset + size
        if offset < 0 or size < 0 or offset % ALIGN or offset >= self.size or end > self.size:
            raise invalid("shared_memory_area_offset", f"the answer area of {size} bytes at offset {offset} does not lie "
                          f"inside the session's shared-memory region of {self.size} bytes at a multiple of {ALIGN}",
                          "BAD_SHARED_TENSOR")
        return offset, end


class TensorWriter:
    """The ``encode`` of GetGradients/GetParameters through a region: each tensor's elements are
    copied to the next ``ALIGN``-ed offset of the request's area and described by a chunk without
    data, all in one response, sent by ``finish`` (the client reads the tensors where they lie, so
    nothing is gained by sending some earlier: one message costs less than several). Past the
    area's end nothing more is written but the bytes are still counted, so ``finish`` can say how
    many were needed."""

    def __init__(self, region: Region, area: tuple[int, int], emit: Callable[[pb.GetGradientsResponse], None]) -> None:
        self._region = region
        self._start, self._limit = area  # the request's area (``Region.area``): nothing outside it is written
        self._emit = emit
        self._response = pb.GetGradientsResponse()  # GetParametersResponse has the same fields
        self.end = self._start  # where the tensors written so far end

    def __call__(self, item: NamedTensor) -> None:
        chunk = self._response.chunks.add(name=item.name, shape=item.shape, present=item.present, last=True)
        if item.stats is not None:
            chunk.stats.CopyFrom(convert.stats_message(item.stats))
        t = item.tensor
        if not item.present:
            chunk.data_type = pb.DATA_TYPE_FLOAT32
            return
        if t is None:  # statistics only
            return
        nbytes = t.numel() * t.element_size()
        offset = -(-self.end // ALIGN) * ALIGN
        chunk.data_type = convert.TORCH_TO_WIRE[t.dtype]  # type: ignore[assignment]
        chunk.total_bytes = nbytes
        chunk.shared_memory_offset = offset
        self.end = offset + nbytes
        if self.end > self._limit:
            return
        if nbytes:
            # Bytes to bytes: numpy's copy of contiguous bytes is one memcpy (about twice as fast
            # as torch's elementwise copy_ on one thread), with the GIL released.
            target = np.frombuffer(self._region.map, np.uint8, nbytes, offset)
            np.copyto(target, t.reshape(-1).view(torch.uint8).numpy())
            del target

    def finish(self) -> None:
        """Sends the response; refuses (SHARED_MEMORY_TOO_SMALL) when the tensors did not fit."""
        if self.end > self._limit:
            needed, limit = self.end - self._start, self._limit - self._start
            raise ResourceExhausted(
                f"the tensors need {needed} bytes of shared memory, and the answer area has {limit}: "
                "open a larger region (OpenSharedMemory) or ask for fewer tensors",
                "SHARED_MEMORY_TOO_SMALL", metadata={"needed_bytes": str(needed), "limit": str(limit)},
            )
        self._emit(self._response)


@dataclass
class _Ticket:
    region: Region
    expires: float


class SharedMemory:
    """The sessions' regions, their tickets, and the socket on which tickets are redeemed."""

    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()  # the tables, and a descriptor while it is sent
        self._regions: dict[str, Region] = {}
        self._tickets: dict[str, _Ticket] = {}
        self._redeeming = threading.BoundedSemaphore(MAX_REDEEMING)
        self._redeeming_by_user: dict[int, int] = {}  # connections being served, by the peer's uid
        self.address = "remote-trainer-" + secrets.token_hex(16)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._listener.bind("\0" + self.address)  # the abstract namespace: no file anywhere
        self._listener.listen(MAX_REDEEMING)
        self._closed = False
        threading.Thread(target=self._accept, name="shared-memory-tickets", daemon=True).start()

    def check_size(self, size: int) -> None:
        """Refuses a region of ``size`` bytes: below 1 (BAD_SHARED_TENSOR), over the limit (SHARED_MEMORY_TOO_LARGE)."""
        if size < 1:
            raise invalid("size_bytes", f"size_bytes must be at least 1, got {size}", "BAD_SHARED_TENSOR")
        if size > self.max_bytes:
            raise ResourceExhausted(
                f"a shared-memory region of {size} bytes is over the limit max_shared_memory_bytes={self.max_bytes}",
                "SHARED_MEMORY_TOO_LARGE", metadata={"limit": str(self.max_bytes)},
            )

    def open(self, session_id: str, size: int) -> tuple[str, Region]:
        """A new region of ``size`` bytes for the session (replacing the one it had) and its ticket."""
        self.check_size(size)
        region = Region(size)
        ticket = secrets.token_hex(TICKET_BYTES)
        now = self._clock()
        with self._lock:
            old = self._regions.pop(session_id, None)
            self._regions[session_id] = region
            for key in [k for k, t in self._tickets.items() if t.expires <= now or t.region is old]:
                del self._tickets[key]
            self._tickets[ticket] = _Ticket(region, now + TICKET_SECONDS)
            if old is not None:
                old.close()
        log.info("session %s: shared-memory region of %d bytes opened", session_id, size)
        return ticket, region

    def region(self, session_id: str, region_id: str) -> Region:
        """The session's region of id ``region_id``; SHARED_MEMORY_UNAVAILABLE when it has none, or another."""
        with self._lock:
            region = self._regions.get(session_id)
        if region is None:
            raise unavailable(f"session {session_id!r} has no shared-memory region: call OpenSharedMemory first")
        if region.id != region_id:
            raise unavailable(f"shared-memory region {region_id!r} is not session {session_id!r}'s (replaced by a later "
                              "OpenSharedMemory?): use the session's current region")
        return region

    def close(self, session_id: str) -> None:
        """Unmaps the session's region, if it has one (the session closed or expired)."""
        with self._lock:
            region = self._regions.pop(session_id, None)
            if region is None:
                return
            for key in [k for k, t in self._tickets.items() if t.region is region]:
                del self._tickets[key]
            region.close()
        log.info("session %s: shared-memory region closed", session_id)

    def close_all(self) -> None:
        """Stops taking tickets and unmaps every region (the server stops)."""
        with self._lock:
            self._closed = True
            regions = list(self._regions.values())
            self._regions.clear()
            self._tickets.clear()
            for region in regions:
                region.close()
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return  # closed
            # Anyone on the host may connect (the name is listed in /proc/net/unix): one user holds at
            # most MAX_REDEEMING_PER_USER of the slots, each for at most REDEEM_SECONDS in all, so a
            # user who connects and stalls cannot keep the others' tickets from being redeemed.
            try:
                _, uid, _ = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            except OSError:
                connection.close()  # gone already
                continue
            with self._lock:
                taken = self._redeeming_by_user.get(uid, 0)
                if taken >= MAX_REDEEMING_PER_USER or not self._redeeming.acquire(blocking=False):
                    connection.close()  # too many at once: the client tries again
                    continue
                self._redeeming_by_user[uid] = taken + 1
            threading.Thread(target=self._redeem, args=(connection, uid), name="shared-memory-ticket", daemon=True).start()

    def _redeem(self, connection: socket.socket, uid: int) -> None:
        """Reads one ticket within REDEEM_SECONDS of the connection; answers OK with the region's
        descriptor, or NO."""
        try:
            with connection:
                until = time.monotonic() + REDEEM_SECONDS  # for the whole ticket, not each piece of it
                received = b""
                while len(received) < 2 * TICKET_BYTES:
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    connection.settimeout(left)
                    piece = connection.recv(2 * TICKET_BYTES - len(received))
                    if not piece:
                        break
                    received += piece
                ticket = received.decode("ascii", "replace")
                now = self._clock()
                with self._lock:  # so that the descriptor cannot be closed (and its number reused) while sent
                    found = None if self._closed else self._tickets.pop(ticket, None)
                    if found is not None and found.expires > now and found.region.fd >= 0:
                        socket.send_fds(connection, [b"OK"], [found.region.fd])
                        return
                connection.sendall(b"NO")
        except OSError as exc:
            log.debug("shared-memory ticket connection failed: %s", exc)
        finally:
            with self._lock:
                self._redeeming_by_user[uid] -= 1
                if not self._redeeming_by_user[uid]:
                    del self._redeeming_by_user[uid]
            self._redeeming.release()
