"""A seeded, bounded, fault-injecting TCP proxy for chaos tests: ``FaultyProxy`` sits on a free
loopback port between a gRPC client and a real server and, following a ``FaultPlan``, cuts requests
midway, drops answers the server already sent, resets connections and delays frames (toxiproxy's
``slicer``, ``reset_peer`` and ``latency`` toxics, aimed at gRPC calls).

gRPC here is plaintext HTTP/2 (h2c). The proxy forwards bytes as they come and only tracks frame
boundaries in each direction (client to server: the 24-byte preface, then frames; server to client:
frames from the start). A frame is a 9-byte header (length: 3 bytes big-endian, type, flags, stream
id: 4 bytes, top bit reserved) and its payload. Faults are aimed at the frames of calls only (HEADERS
and DATA of a stream id > 0), never at SETTINGS, PING or WINDOW_UPDATE, whose timing varies from run
to run: so a plan draws the same numbers, and injects the same faults, for the same calls made one
after another. A unary answer's first HEADERS frame leaves the server once the call has run, so a
dropped one is a call the server ran and the client never heard of.

    with FaultyProxy(server.port, FaultPlan(seed=7, probability={"drop_response": 0.1})) as proxy:
        ... a client on proxy.address ...
    print(proxy.summary())  # faults: cut_request=0 drop_response=3 reset=0 delay=0

The proxy keeps nothing of the payload, only the counts.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType

import grpc

# Fault kinds, in the order ``summary`` prints them.
CUT_REQUEST = "cut_request"  # part of a request's DATA frame reaches the server, then both sides die
DROP_RESPONSE = "drop_response"  # an answer's HEADERS or DATA frame is not forwarded; both sides die
RESET = "reset"  # the connection dies (RST both ways) before a call's frame
DELAY = "delay"  # a call's frame is held up to max_delay seconds, then forwarded (nothing lost)
KINDS = (CUT_REQUEST, DROP_RESPONSE, RESET, DELAY)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADER_BYTES = 9
DATA, HEADERS = 0, 1
_HEADER = struct.Struct(">BHBBI")  # length as one high byte + two low bytes, type, flags, stream id


@dataclass(frozen=True)
class FaultPlan:
    """What a ``FaultyProxy`` injects.

    ``probability[kind]`` is the chance of that fault at each frame it can hit (a missing kind: never
    at random); ``max_faults`` bounds each kind over the proxy's life (an int for every kind, or per
    kind, missing kinds 0): a random fault happens only while the kind's count, armed faults
    included, is below it, so a loop through the proxy always ends. The first
    ``quiet_frames`` call frames (HEADERS and DATA, both directions) of every connection pass
    untouched, so each new connection's first call goes through (a unary call is 5: request
    HEADERS and DATA, answer HEADERS, DATA and trailing HEADERS). Each kind draws from its own
    ``random.Random`` seeded from ``seed`` and the kind's name, so adding one kind to a plan does not
    move the faults of another.
    """

    seed: int = 0
    probability: Mapping[str, float] = field(default_factory=dict)
    max_faults: int | Mapping[str, int] = 5
    quiet_frames: int = 5
    max_delay: float = 0.05

    def __post_init__(self) -> None:
        limits = self.max_faults if isinstance(self.max_faults, Mapping) else {}
        unknown = (set(self.probability) | set(limits)) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {KINDS}")

    def limit(self, kind: str) -> int:
        if isinstance(self.max_faults, Mapping):
            return self.max_faults.get(kind, 0)
        return self.max_faults


def disconnected(channel: grpc.Channel, timeout: float = 30) -> None:
    """Returns once ``channel`` has seen its connection die (its state left READY), so that its
    next call goes on a new connection. Right after a call failed from a fault, grpc may still send
    the next call on the dead connection and fail it too, unsent (UNAVAILABLE, "Stream removed
    (sendmsg: Broken pipe (32))"): for a raw channel with no retries, call this in between."""
    gone = threading.Event()

    def seen(state: grpc.ChannelConnectivity) -> None:
        if state != grpc.ChannelConnectivity.READY:
            gone.set()

    channel.subscribe(seen)
    try:
        if not gone.wait(timeout):
            raise TimeoutError(f"the channel stayed READY for {timeout} s")
    finally:
        channel.unsubscribe(seen)


class _Link:
    """One accepted client connection and its connection to the server."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.server: asyncio.StreamWriter | None = None
        self.call_frames = 0  # HEADERS and DATA frames of calls seen, both directions
        self.dead = False

    def abort(self, graceful_server: bool = False) -> None:
        """Both sides die at once: RST (SO_LINGER 0), or for the server after what was written to it
        (``graceful_server``: a cut request must reach the server in part) a plain close."""
        self.dead = True
        for writer in (self.client, self.server):
            if writer is None or writer.transport.is_closing():
                continue
            if writer is self.server and graceful_server:
                writer.close()
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()


class FaultyProxy:
    """A TCP proxy on 127.0.0.1 to ``127.0.0.1:target_port`` that injects the faults of ``plan``.

    Runs its own asyncio loop on a background thread, so sync tests use it too; ``with`` starts it
    and, on exit, closes every connection and joins the thread. ``counts`` holds the faults injected
    per kind (random and armed ones). ``pause()`` stops random faults until ``resume()``; ``arm(kind)``
    forces the next fault of a kind at the next frame it can hit, paused or not, in the quiet frames
    too, past the plan's bound.
    """

    def __init__(self, target_port: int, plan: FaultPlan | None = None) -> None:
        self.target_port = target_port
        self.plan = plan or FaultPlan()
        self.counts: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.connections = 0  # connections accepted so far
        self.port = 0
        self._rngs = {kind: random.Random(f"{self.plan.seed}:{kind}") for kind in KINDS}
        self._armed: dict[str, int] = dict.fromkeys(KINDS, 0)
        self._paused = False
        self._lock = threading.Lock()  # counts, armed and paused: read here, changed by tests too
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="faulty-proxy", daemon=True)
        self._listener: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- control, from any thread ------------------------------------------------------------------

    def pause(self) -> None:
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False

    @property
    def paused(self) -> bool:
        return self._paused

    def arm(self, kind: str, times: int = 1) -> None:
        """The next ``times`` frames that ``kind`` can hit get it, whatever the plan says."""
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {KINDS}")
        with self._lock:
            self._armed[kind] += times

    def armed(self, kind: str) -> int:
        """How many forced faults of ``kind`` have not happened yet."""
        return self._armed[kind]

    def summary(self) -> str:
        return "faults: " + " ".join(f"{kind}={self.counts[kind]}" for kind in KINDS)

    def total(self) -> int:
        return sum(self.counts.values())

    # -- life --------------------------------------------------------------------------------------

    def start(self) -> FaultyProxy:
        self._thread.start()
        try:
            self.port = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(30)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
        if not self._loop.is_closed() and not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> FaultyProxy:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    async def _listen(self) -> int:
        self._listener = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port: int = self._listener.sockets[0].getsockname()[1]
        return port

    async def _shutdown(self) -> None:
        if self._listener is not None:
            self._listener.close()
        for link in list(self._links):
            link.abort()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)
        if self._listener is not None:
            await self._listener.wait_closed()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        link = _Link(client_writer)
        self._links.add(link)
        current = asyncio.current_task()
        if current is not None:
            self._tasks.add(current)
            current.add_done_callback(self._tasks.discard)
        try:
            server_reader, link.server = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            link.abort()
            self._links.discard(link)
            return
        await asyncio.gather(
            self._pump(link, client_reader, link.server, to_server=True),
            self._pump(link, server_reader, client_writer, to_server=False),
        )
        for writer in (client_writer, link.server):
            writer.close()
        self._links.discard(link)

    # -- forwarding --------------------------------------------------------------------------------

    async def _pump(self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, to_server: bool) -> None:
        """Forwards one direction of ``link`` as bytes come, deciding each frame at its header."""
        through = len(PREFACE) if to_server else 0  # bytes to forward before the next frame header
        rest = b""  # the start of a frame header that came without the rest of it
        try:
            while not link.dead:
                data = await reader.read(1 << 16)
                if not data:
                    if not link.dead and writer.can_write_eof():
                        writer.write_eof()
                    return
                buf = rest + data if rest else data
                sent = pos = 0  # buf[:sent] is forwarded, buf[:pos] is decided
                while pos < len(buf) and not link.dead:
                    if through:
                        n = min(through, len(buf) - pos)
                        pos, through = pos + n, through - n
                        continue
                    if len(buf) - pos < HEADER_BYTES:
                        break
                    high, low, kind, _, stream = _HEADER.unpack_from(buf, pos)
                    length = high << 16 | low
                    fault = self._decide(link, to_server, kind, stream & 0x7FFFFFFF, length)
                    through = HEADER_BYTES + length
                    if fault is None:
                        continue
                    writer.write(buf[sent:pos])
                    sent = pos
                    await writer.drain()
                    if fault[0] == DELAY:
                        await asyncio.sleep(fault[1])
                    elif fault[0] == CUT_REQUEST:  # the header and part of the payload that came
                        writer.write(buf[pos : min(pos + HEADER_BYTES + int(fault[1] * length), len(buf))])
                        link.abort(graceful_server=True)
                    else:
                        link.abort()
                rest = buf[pos:]
                if pos > sent and not link.dead:
                    writer.write(buf[sent:pos])
                    await writer.drain()
        except (ConnectionError, OSError):
            link.abort()

    def _decide(self, link: _Link, to_server: bool, kind: int, stream: int, length: int) -> tuple[str, float] | None:
        """The fault for a frame, if any: (kind, a number in [0, 1) for where to cut or how long to wait)."""
        if stream == 0 or kind not in (DATA, HEADERS):
            return None
        link.call_frames += 1
        hits = [RESET]
        if to_server and kind == DATA and length > 0:
            hits.append(CUT_REQUEST)
        if not to_server:
            hits.append(DROP_RESPONSE)
        hits.append(DELAY)
        with self._lock:
            for fault in hits:
                rng = self._rngs[fault]
                if self._armed[fault]:
                    self._armed[fault] -= 1
                elif (
                    self._paused
                    or link.call_frames <= self.plan.quiet_frames
                    or self.counts[fault] >= self.plan.limit(fault)
                    or rng.random() >= self.plan.probability.get(fault, 0.0)
                ):
                    continue
                self.counts[fault] += 1
                share = rng.random()
                return fault, share * self.plan.max_delay if fault == DELAY else share
        return None
