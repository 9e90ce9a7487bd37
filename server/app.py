"""Building and running the gRPC server: TrainerService, health and reflection on one port."""

from __future__ import annotations

import functools
import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from types import FrameType

import grpc
from torch import nn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.engine import Limits, OptimizerSpec, SessionEngine
from server.models import build_model, resolve_device
from server.servicer import TrainerServicer
from server.sessions import SessionStore
from server.settings import Settings
from trainer.v1 import trainer_pb2, trainer_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name


@dataclass
class TrainerServer:
    """A started server: the grpc server, the port it listens on, its health service and sessions."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    store: SessionStore

    def stop(self, grace: float | None) -> threading.Event:
        """Reports NOT_SERVING, refuses new calls and lets in-flight ones finish within ``grace`` seconds."""
        self.health.enter_graceful_shutdown()
        return self.server.stop(grace)


def create_server(settings: Settings) -> TrainerServer:
    """Builds the default session from the settings, binds the port and starts serving.

    Port 0 binds a free port; the returned ``TrainerServer.port`` says which.
    """
    device = resolve_device(settings.device)
    limits = Limits(max_input_elements=settings.max_input_elements, max_batch=settings.max_batch)
    model, source = build_model(settings.weights, settings.num_classes, settings.seed, trusted_path=True)
    default = SessionEngine(model, device, source, OptimizerSpec.tutorial(), limits, settings.seed)
    store = SessionStore(default, settings.max_sessions)
    factory = functools.partial(_client_model, data_dir=settings.data_dir)
    servicer = TrainerServicer(store, factory, device, limits, settings.chunk_bytes)

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.max_workers, thread_name_prefix="rpc"),
        options=[
            # Batches and parameter tensors are far over gRPC's 4 MiB default.
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            # Never share the port with another process (Linux would otherwise allow two servers on it).
            ("grpc.so_reuseport", 0),
            # Ping idle clients every 5 minutes so dead connections are noticed; allow client pings
            # every 10 s without calls in flight.
            ("grpc.keepalive_time_ms", 300_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
    )
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    host = f"[{settings.host}]" if ":" in settings.host and not settings.host.startswith("[") else settings.host
    port = server.add_insecure_port(f"{host}:{settings.port}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("listening on %s:%d (device %s, weights %s)", settings.host, port, device, source)
    return TrainerServer(server, port, health_servicer, store)


def _client_model(weights: str, num_classes: int, seed: int, *, data_dir: str) -> tuple[nn.Module, str]:
    """Models for CreateSession: files only from the data directory."""
    return build_model(weights or "random", num_classes, seed, data_dir=data_dir)


def serve(settings: Settings) -> None:
    """Runs the server until SIGTERM or SIGINT, then shuts down gracefully."""
    running = create_server(settings)
    stopped = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s: shutting down (grace %.1fs)", signal.Signals(signum).name, settings.grace_seconds)
        running.stop(settings.grace_seconds).wait()
        stopped.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    running.server.wait_for_termination()
    stopped.wait()
    log.info("stopped")
