"""Prometheus metrics of one server: calls by method and status, latency, sessions, bytes, device memory."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from wsgiref.simple_server import WSGIServer

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from remote_trainer.server.events import CallObserver

log = logging.getLogger(__name__)


class Metrics(CallObserver):
    """The server's metrics, in a registry of its own (so several servers in one process stay apart);
    finished calls come as the servicer's events, message bytes from the method handlers (app.py)."""

    def __init__(self, sessions_open: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self._httpd: WSGIServer | None = None
        self._requests = Counter(
            "trainer_requests", "RPCs handled, by method and status code", ["method", "code"], registry=self.registry
        )
        self._latency = Histogram(
            "trainer_request_duration_seconds", "RPC handling time, by method", ["method"], registry=self.registry,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self._received = Counter("trainer_received_bytes", "Request bytes received, by method", ["method"], registry=self.registry)
        self._sent = Counter("trainer_sent_bytes", "Response bytes sent, by method", ["method"], registry=self.registry)
        Gauge("trainer_sessions_open", "Sessions open, the default one included", registry=self.registry).set_function(
            lambda: float(sessions_open())
        )
        # Each metric's child per label values, found once: ``labels()`` takes a lock and builds keys
        # on every call, and this is on every call's path.
        self._finished: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._bytes: dict[tuple[bool, str], Any] = {}
        if torch.cuda.is_available():
            Gauge("trainer_device_memory_bytes", "CUDA memory allocated by tensors", registry=self.registry).set_function(
                lambda: float(torch.cuda.memory_allocated())
            )

    def call_finished(self, method: str, session_id: str | None, code: str, seconds: float, reason: str = "") -> None:
        """Counts one finished call."""
        children = self._finished.get((method, code))
        if children is None:
            children = self._finished[(method, code)] = (self._requests.labels(method, code), self._latency.labels(method))
        requests, latency = children
        requests.inc()
        latency.observe(seconds)

    def received(self, method: str, size: int) -> None:
        """Counts the bytes of one request message."""
        self._count_bytes(False, method, size)

    def sent(self, method: str, size: int) -> None:
        """Counts the bytes of one response message."""
        self._count_bytes(True, method, size)

    def _count_bytes(self, sent: bool, method: str, size: int) -> None:
        child = self._bytes.get((sent, method))
        if child is None:
            child = self._bytes[(sent, method)] = (self._sent if sent else self._received).labels(method)
        child.inc(size)

    def serve(self, host: str, port: int) -> int:
        """Serves /metrics over HTTP; returns the port (a free one when ``port`` is 0)."""
        httpd, _ = start_http_server(port, addr=host, registry=self.registry)
        self._httpd = httpd
        bound = int(httpd.server_port)
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        """Stops serving /metrics."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
