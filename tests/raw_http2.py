"""A raw HTTP/2 client for the tests that speak to the server below gRPC: calls whose request is
declared large and then sent only in part, as an attacker (or a client that hangs mid-upload) would.

Built on the ``h2`` protocol library over a plain socket: it keeps the flow-control windows as the
server grants them, so it sends exactly what the server lets it send and never more, and it records
per stream what the server granted and how the stream ended. Its reader thread answers the server's
SETTINGS and PINGs, so the connection stays healthy while the calls go silent.
"""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass, field
from types import TracebackType

import h2.config
import h2.connection
import h2.events
import h2.settings


@dataclass
class RawStream:
    """One call: what was sent, and how (whether) the server ended it."""

    stream_id: int
    declared: int  # the request's length in its gRPC message prefix
    sent: int = 0  # body bytes sent, prefix included
    headers: dict[str, str] = field(default_factory=dict)  # response headers and trailers together
    reset: int | None = None  # the RST_STREAM error code, when the server reset it
    ended: threading.Event = field(default_factory=threading.Event)

    @property
    def grpc_status(self) -> str | None:
        return self.headers.get("grpc-status")


class RawHttp2:
    """One HTTP/2 connection to ``127.0.0.1:port``."""

    def __init__(self, port: int) -> None:
        self._sock = socket.create_connection(("127.0.0.1", port))
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self._lock = threading.Condition()
        self.streams: dict[int, RawStream] = {}
        self.closed = threading.Event()
        with self._lock:
            self._conn.initiate_connection()
            self._flush()
        self._reader = threading.Thread(target=self._read, name="raw-http2", daemon=True)
        self._reader.start()

    def __enter__(self) -> RawHttp2:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def open(self, method: str, declared: int, metadata: tuple[tuple[str, str], ...] = ()) -> RawStream:
        """Opens a call to ``method`` (``/package.Service/Method``) whose request will be ``declared``
        bytes long; nothing of the request is sent yet."""
        with self._lock:
            stream_id = self._conn.get_next_available_stream_id()
            headers = [
                (":method", "POST"), (":scheme", "http"), (":path", method), (":authority", "localhost"),
                ("content-type", "application/grpc"), ("te", "trailers"), *metadata,
            ]
            self._conn.send_headers(stream_id, headers)
            self._flush()
            stream = self.streams[stream_id] = RawStream(stream_id, declared)
        return stream

    def send(self, stream: RawStream, up_to: int, wait: float = 0.0) -> int:
        """Sends the call's request (the 5-byte gRPC prefix, then zero bytes) until ``up_to`` bytes of
        it are sent or the server's windows are spent; with ``wait``, waits up to that long for the
        server to open them further. Returns the bytes sent so far."""
        body = min(up_to, 5 + stream.declared)
        with self._lock:
            while stream.sent < body and not stream.ended.is_set() and not self.closed.is_set():
                window = min(self._conn.local_flow_control_window(stream.stream_id), self._conn.max_outbound_frame_size)
                if window <= 0:
                    if not wait or not self._lock.wait(wait):
                        break
                    continue
                chunk = min(window, body - stream.sent)
                data = bytearray(chunk)
                if stream.sent < 5:  # the prefix: not compressed, then the length
                    prefix = b"\x00" + struct.pack(">I", stream.declared)
                    head = prefix[stream.sent:stream.sent + chunk]
                    data[:len(head)] = head
                end = stream.sent + chunk == 5 + stream.declared
                self._conn.send_data(stream.stream_id, bytes(data), end_stream=end)
                stream.sent += chunk
                self._flush()
        return stream.sent

    def close(self) -> None:
        self.closed.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._reader.join(timeout=10)

    def _flush(self) -> None:
        data = self._conn.data_to_send()
        if data:
            self._sock.sendall(data)

    def _read(self) -> None:
        try:
            while not self.closed.is_set():
                data = self._sock.recv(1 << 16)
                if not data:
                    break
                with self._lock:
                    for event in self._conn.receive_data(data):
                        self._handle(event)
                    self._flush()
                    self._lock.notify_all()
        except OSError:
            pass
        finally:
            self.closed.set()
            with self._lock:
                for stream in self.streams.values():
                    stream.ended.set()
                self._lock.notify_all()

    def _handle(self, event: h2.events.Event) -> None:
        stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)) and stream:
            stream.headers.update((str(k), str(v)) for k, v in event.headers)
        elif isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
            self._conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamReset) and stream:
            stream.reset = event.error_code
            stream.ended.set()
        if isinstance(event, h2.events.StreamEnded) and stream:
            stream.ended.set()
        if isinstance(event, h2.events.ConnectionTerminated):
            self.closed.set()
