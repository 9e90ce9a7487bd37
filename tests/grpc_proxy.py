"""A real gRPC hop between the SDK and a server, for the retry tests: it forwards every call as
bytes, records what the SDK sent, and injects the faults a test asks for.

Faults, per method, used up in order: ``"refuse"`` answers UNAVAILABLE without forwarding (the
server never sees the call); ``"drop_answer"`` forwards the call, lets the server run it, then
answers UNAVAILABLE instead of the server's answer (the answer lost on the way back);
``"cut_stream"`` forwards a stream's first message and then fails it UNAVAILABLE. ``injected``
counts the faults made, so that a run with none cannot pass as a fault test.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

SERVICE = "/trainer.v1.TrainerService/"
STREAMS = ("GetGradients", "GetParameters")
SIZES = [("grpc.max_send_message_length", 512 * 1024 * 1024), ("grpc.max_receive_message_length", 512 * 1024 * 1024)]


class Proxy(grpc.GenericRpcHandler):
    """Listens on ``port`` (0: a free one) and forwards to ``upstream``."""

    def __init__(self, upstream: str, port: int = 0) -> None:
        self.requests: list[tuple[str, bytes]] = []  # (method name, request bytes) in the order they came
        self.faults: dict[str, list[str]] = {}
        self.injected = 0
        self._lock = threading.Lock()
        self._channel = grpc.insecure_channel(upstream, options=SIZES)
        self._server = grpc.server(futures.ThreadPoolExecutor(16), handlers=[self], options=SIZES)
        self.port = self._server.add_insecure_port(f"localhost:{port}")
        self._server.start()

    @property
    def target(self) -> str:
        return f"localhost:{self.port}"

    def stop(self) -> None:
        self._server.stop(None).wait()
        self._channel.close()

    def sent(self, method: str) -> list[bytes]:
        """The requests of ``method`` (a name such as "Forward") that came, in order."""
        with self._lock:
            return [data for name, data in self.requests if name == method]

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        path = details.method  # type: ignore[attr-defined]
        if not path.startswith(SERVICE):
            return None
        name = path[len(SERVICE):]
        if name in STREAMS:
            return grpc.unary_stream_rpc_method_handler(lambda request, context: self._stream(name, request, context))
        return grpc.unary_unary_rpc_method_handler(lambda request, context: self._unary(name, request, context))

    def _fault(self, name: str, request: bytes) -> str:
        with self._lock:
            self.requests.append((name, request))
            pending = self.faults.get(name)
            fault = pending.pop(0) if pending else ""
            self.injected += bool(fault)
            return fault

    def _unary(self, name: str, request: bytes, context: grpc.ServicerContext) -> Any:
        fault = self._fault(name, request)
        if fault == "refuse":
            context.abort(grpc.StatusCode.UNAVAILABLE, "the proxy refused the call")
        try:
            answer = self._channel.unary_unary(SERVICE + name)(request, timeout=context.time_remaining(), wait_for_ready=True)
        except grpc.RpcError as exc:
            self._relay(exc, context)
        if fault == "drop_answer":
            context.abort(grpc.StatusCode.UNAVAILABLE, "the proxy dropped the server's answer")
        return answer

    def _stream(self, name: str, request: bytes, context: grpc.ServicerContext) -> Iterator[Any]:
        fault = self._fault(name, request)
        try:
            for sent, answer in enumerate(self._channel.unary_stream(SERVICE + name)(request, timeout=context.time_remaining(), wait_for_ready=True)):
                if fault == "cut_stream" and sent == 1:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "the proxy cut the stream")
                yield answer
        except grpc.RpcError as exc:
            self._relay(exc, context)

    @staticmethod
    def _relay(error: grpc.RpcError, context: grpc.ServicerContext) -> None:
        """Answers with the server's error, its details (ErrorInfo) included."""
        call: Any = error
        context.set_trailing_metadata(call.trailing_metadata() or ())
        context.abort(call.code(), call.details())
