"""The raw gRPC floor: a plain generic handler with no model and no protobuf, only bytes.

It runs in two places. In the benchmark's server process beside the trainer server, with the same
message-size options (``bench.serve``), where it also hands out the server-side timings recorded
there: that measures what the trainer adds over the same stack in the same process. And on its own,
as a user's own raw gRPC server would run it: ``python -m bench.raw --server sync|aio`` serves it
from a process of its own that imports neither torch nor the trainer, prints one JSON line with its
port and pid, and serves until its standard input closes. The standalone floor is the honest one
(the in-process one shares a process, its GIL and its allocator with the trainer server); the
benchmark starts both variants beside the trainer server (``bench.launch``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

SERVICE = "bench.v1.Raw"
MIB = 1024 * 1024


class RawFloor:
    """Handlers of ``bench.v1.Raw``: empty call, download stream, unary and streamed upload, timings."""

    def __init__(self, take_timings: Callable[[], dict[str, list[float]]]) -> None:
        self._take_timings = take_timings
        self._lock = threading.Lock()
        self._chunks: dict[tuple[int, int], list[bytes]] = {}

    def _chunked(self, total: int, chunk: int) -> list[bytes]:
        # The bytes exist before the call, as a tensor does: the floor pays for sending only.
        with self._lock:
            if (total, chunk) not in self._chunks:
                data = bytes(bytearray(range(256)) * (total // 256 + 1))[:total]
                self._chunks[(total, chunk)] = [data[i : i + chunk] for i in range(0, total, chunk)]
            return self._chunks[(total, chunk)]

    def ping(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return b""

    def download(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        spec = json.loads(request)
        yield from self._chunked(int(spec["total"]), int(spec["chunk"]))

    def upload(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return str(len(request)).encode()

    def upload_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return str(sum(len(r) for r in requests)).encode()

    def timings(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return json.dumps(self._take_timings()).encode()

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        """The generic handler; no serializers, so requests and responses are plain bytes."""
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Ping": grpc.unary_unary_rpc_method_handler(self.ping),
                "Download": grpc.unary_stream_rpc_method_handler(self.download),
                "Upload": grpc.unary_unary_rpc_method_handler(self.upload),
                "UploadStream": grpc.stream_unary_rpc_method_handler(self.upload_stream),
                "Timings": grpc.unary_unary_rpc_method_handler(self.timings),
            },
        )


class AioRawFloor:
    """The same floor served by ``grpc.aio``, as the trainer server is: async handlers on an event
    loop, bytes in and out, no protobuf. Comparing with it measures what the trainer adds over the
    server stack it runs on; the threaded floor above is what a sync gRPC server would do."""

    def __init__(self, floor: RawFloor) -> None:
        self._floor = floor

    async def ping(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return b""

    async def download(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        spec = json.loads(request)
        for chunk in self._floor._chunked(int(spec["total"]), int(spec["chunk"])):
            yield chunk

    async def upload(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return str(len(request)).encode()

    async def upload_stream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        total = 0
        async for r in requests:
            total += len(r)
        return str(total).encode()

    async def timings(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return json.dumps(self._floor._take_timings()).encode()

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Ping": grpc.unary_unary_rpc_method_handler(self.ping),
                "Download": grpc.unary_stream_rpc_method_handler(self.download),
                "Upload": grpc.unary_unary_rpc_method_handler(self.upload),
                "UploadStream": grpc.stream_unary_rpc_method_handler(self.upload_stream),
                "Timings": grpc.unary_unary_rpc_method_handler(self.timings),
            },
        )


def start_aio_floor(floor: RawFloor, options: list[tuple[str, Any]], host: str = "127.0.0.1") -> tuple[int, Callable[[], None]]:
    """Serves ``AioRawFloor`` on a free port of ``host`` from an event loop of its own (a daemon thread,
    as the trainer server runs); returns the port and a function that stops it."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="raw-aio", daemon=True).start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers((AioRawFloor(floor).handler(),))
        port = server.add_insecure_port(f"{host}:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result()

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result()
        loop.call_soon_threadsafe(loop.stop)

    return port, stop


class RawClient:
    """The floor's client side: what a minimal client of the same bytes would do."""

    def __init__(self, target: str, options: list[tuple[str, Any]]) -> None:
        self._channel = grpc.insecure_channel(target, options=options)
        self._ping = self._channel.unary_unary(f"/{SERVICE}/Ping", request_serializer=None, response_deserializer=None)
        self._download = self._channel.unary_stream(f"/{SERVICE}/Download", request_serializer=None, response_deserializer=None)
        self._upload = self._channel.unary_unary(f"/{SERVICE}/Upload", request_serializer=None, response_deserializer=None)
        self._upload_stream = self._channel.stream_unary(f"/{SERVICE}/UploadStream", request_serializer=None, response_deserializer=None)
        self._timings = self._channel.unary_unary(f"/{SERVICE}/Timings", request_serializer=None, response_deserializer=None)

    def close(self) -> None:
        self._channel.close()

    def ping(self) -> None:
        self._ping(b"", timeout=30)

    def download(self, total: int, chunk: int = MIB) -> int:
        """Receives ``total`` bytes in ``chunk``-byte messages; keeps them (no further copy)."""
        parts = list(self._download(json.dumps({"total": total, "chunk": chunk}).encode(), timeout=120))
        return sum(len(p) for p in parts)

    def upload(self, data: bytes) -> int:
        """Sends ``data`` as one unary message, as Forward sends its batch."""
        return int(self._upload(data, timeout=120))

    def upload_stream(self, data: bytes, chunk: int = MIB) -> int:
        """Sends ``data`` as a client stream of ``chunk``-byte messages."""
        view = memoryview(data)
        return int(self._upload_stream((view[i : i + chunk].tobytes() for i in range(0, len(data), chunk)), timeout=120))

    def timings(self) -> dict[str, list[float]]:
        """Server-side durations recorded since the last call (and clears them)."""
        return dict(json.loads(self._timings(b"", timeout=30)))


def serve_standalone(kind: str, max_message_bytes: int) -> None:
    """Serves the floor (``sync``: a threaded grpc server; ``aio``: grpc.aio on this process's event
    loop) on a free loopback port until standard input closes; prints its port once it serves."""
    floor = RawFloor(lambda: {})  # no timings recorded here: Timings answers an empty record
    options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.max_send_message_length", max_message_bytes), ("grpc.so_reuseport", 0)]

    def announce(port: int) -> None:
        print(json.dumps({"port": port, "pid": os.getpid(), "torch": "torch" in sys.modules}), flush=True)

    if kind == "sync":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=options)
        server.add_generic_rpc_handlers((floor.handler(),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        announce(port)
        sys.stdin.read()
        server.stop(None)
        return

    async def serve() -> None:
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers((AioRawFloor(floor).handler(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        announce(port)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await server.stop(None)

    asyncio.run(serve())


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.raw", description="the raw gRPC floor, in a process of its own")
    parser.add_argument("--server", choices=("sync", "aio"), required=True)
    parser.add_argument("--max-message-bytes", type=int, default=256 * MIB, help="the trainer server's message-size limit")
    args = parser.parse_args()
    serve_standalone(args.server, args.max_message_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
