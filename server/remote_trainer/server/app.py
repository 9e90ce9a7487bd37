"""Building and running the gRPC server: TrainerService, health and reflection on one port."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from remote_trainer.engine import checkpoints
from remote_trainer.engine.budget import UNLIMITED, MemoryBudget, default_total_bytes
from remote_trainer.engine.errors import FailedPrecondition
from remote_trainer.server.auth import AuthInterceptor, TokenAuth
from remote_trainer.engine.limits import Limits
from remote_trainer.engine.memory import reuse_freed_buffers
from remote_trainer.engine.optimizer import OptimizerSpec
from remote_trainer.engine.session import SessionEngine
from remote_trainer.server import convert, receive, reflection
from remote_trainer.server.events import Observers
from remote_trainer.server.metrics import Metrics
from remote_trainer.engine.models import ModelSpec, resolve_device
from remote_trainer.server.rpc import Undecodable, rpc_kind
from remote_trainer.server.servicer import ServicerOptions, TrainerServicer
from remote_trainer.server.sessions import DEFAULT_SESSION_ID, Sessions, SessionStore
from remote_trainer.server.settings import Settings
from remote_trainer.server.shared_memory import SharedMemory
from remote_trainer.server.signals import StopSignals
from remote_trainer.server.tensorboard import TrainingLog
from remote_trainer.server.watch import SessionEvents
from remote_trainer.contract import wire
from remote_trainer.contract.trainer.v1 import trainer_pb2

log = logging.getLogger(__name__)

SERVICE = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"]
SERVICE_NAME = SERVICE.full_name


@dataclass
class TrainerServer:
    """A started server: the asyncio grpc server (on its own event-loop thread), its port, health
    service, sessions, metrics and TensorBoard log."""

    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    store: Sessions
    metrics: Metrics
    servicer: TrainerServicer
    loop: asyncio.AbstractEventLoop
    metrics_port: int | None = None
    training_log: TrainingLog | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)
    _stopped: threading.Event = field(default_factory=threading.Event)
    housekeeping: threading.Thread | None = None  # expiry (and, with Ray, the cluster's housekeeping)

    def enter_graceful_shutdown(self) -> None:
        """Reports NOT_SERVING on the health service (what SIGTERM does first)."""
        asyncio.run_coroutine_threadsafe(self.health.enter_graceful_shutdown(), self.loop).result()

    def stop(self, grace: float | None) -> threading.Event:
        """Reports NOT_SERVING, refuses new calls and lets in-flight ones finish within ``grace`` seconds;
        the returned event is set once the server has stopped."""
        if not self._stopping.is_set():
            self._stopping.set()
            asyncio.run_coroutine_threadsafe(self._stop(grace), self.loop)
        return self._stopped

    async def _stop(self, grace: float | None) -> None:
        try:
            await self.health.enter_graceful_shutdown()
            self.servicer.watchers.close()  # every watch ends now (its last event says why), not after the grace
            await self.server.stop(grace)
        finally:
            self.metrics.close()
            _close(self.servicer, self.training_log)
            self.loop.call_soon(self.loop.stop)
            self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the server has stopped (True), or for at most ``timeout`` seconds (False)."""
        return self._stopped.wait(timeout)


def create_server(settings: Settings, clock: Callable[[], float] = time.monotonic) -> TrainerServer:
    """Builds the default session from the settings, binds the port and starts serving.

    The server is grpc.aio on an event loop of its own (a daemon thread): waiting for a request
    message, for a busy session or for a slow reader holds no thread, and the torch work runs on
    ``max_workers`` worker threads. Port 0 binds a free port; the returned ``TrainerServer.port``
    says which. ``clock`` is the session store's (tests move it instead of sleeping). Temporary files
    of checkpoint saves killed midway are removed first.
    """
    if settings.reuse_buffers_bytes and not reuse_freed_buffers(settings.reuse_buffers_bytes):
        log.info("reuse_buffers_bytes ignored: the C library is not glibc")
    limits = Limits(max_input_elements=settings.max_input_elements, max_batch=settings.max_batch)
    if settings.checkpoint_dir:
        freed = checkpoints.remove_stale_temporaries(settings.checkpoint_dir)
        if freed:
            log.info("removed %d bytes of temporary files left by unfinished checkpoint saves", freed)
    store, budget = session_store(settings, limits, clock)
    default_session = store.get(DEFAULT_SESSION_ID)
    default = default_session.describe()
    auth = TokenAuth.load(settings.tokens, settings.tokens_file)
    metrics = Metrics(store.__len__)
    training_log = TrainingLog(settings.tensorboard_dir, settings.tensorboard_histograms_every) if settings.tensorboard_dir else None
    watchers = SessionEvents(settings.max_watchers, settings.max_watchers_per_session, settings.watch_buffer_events)
    observer = Observers(metrics, watchers, *([] if training_log is None else [training_log]))
    shared_memory = SharedMemory(settings.max_shared_memory_bytes) if settings.allow_shared_memory else None
    servicer = TrainerServicer(store, limits, servicer_options(settings), auth, observer, watchers, budget, shared_memory)

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="grpc-aio", daemon=True).start()
    try:
        server, health_servicer, port = asyncio.run_coroutine_threadsafe(_start(settings, servicer, metrics, auth), loop).result()
    except BaseException:
        _close(servicer, training_log)
        loop.call_soon_threadsafe(loop.stop)
        raise
    try:
        # Bound (so a busy port is told at once), but NOT_SERVING until the first call will be as fast as the next.
        default_session.warm_up()
        asyncio.run_coroutine_threadsafe(_serving(health_servicer), loop).result()
    except BaseException:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result()
        _close(servicer, training_log)
        loop.call_soon_threadsafe(loop.stop)
        raise
    metrics_port = metrics.serve(settings.host, settings.metrics_port) if settings.metrics_port >= 0 else None
    running = TrainerServer(server, port, health_servicer, store, metrics, servicer, loop, metrics_port, training_log)
    if settings.session_idle_seconds or settings.pending_graph_seconds or settings.backend == "ray":
        # With Ray also the cluster's housekeeping: abandoned reservations and their actors.
        running.housekeeping = threading.Thread(target=_expire_sessions, args=(running,), name="session-expiry", daemon=True)
        running.housekeeping.start()
    log.info(
        "listening on %s:%d (%s backend, device %s, weights %s, %s, %s)", settings.host, port, settings.backend,
        default.device, default.weights,
        "TLS" + (" with client certificates" if settings.tls_client_ca else "") if settings.tls_cert else "plaintext",
        "tokens required" if auth else "no authentication",
    )
    return running


def servicer_options(settings: Settings) -> ServicerOptions:
    """What of the settings the servicer works with."""
    return ServicerOptions(
        model=ModelSpec(device=settings.device, data_dir=settings.data_dir, **settings.run_options()),
        chunk_bytes=settings.chunk_bytes,
        max_message_bytes=settings.max_message_bytes,
        max_workers=settings.max_workers,
        stream_write_timeout=settings.stream_write_timeout_seconds,
        max_stream_bytes=settings.max_stream_bytes,
        checkpoint_dir=settings.checkpoint_dir,
        checkpoint_every=settings.checkpoint_every,
        keep_auto_checkpoints=settings.keep_auto_checkpoints,
        max_checkpoint_bytes=settings.max_checkpoint_bytes,
        order_wait=settings.operation_order_wait_seconds,
    )


def _close(servicer: TrainerServicer, training_log: TrainingLog | None) -> None:
    """Stops the worker threads once their current work is done, then closes the TensorBoard files."""
    servicer.close()
    if training_log is not None:
        training_log.close()


async def _start(
    settings: Settings, servicer: TrainerServicer, metrics: Metrics, auth: TokenAuth | None
) -> tuple[grpc.aio.Server, health_aio.HealthServicer, int]:
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(auth)] if auth else [],
        options=[
            # Batches and parameter tensors are far over gRPC's 4 MiB default.
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            # Never share the port with another process (Linux would otherwise allow two servers on it).
            ("grpc.so_reuseport", 0),
            # Ping clients every 60 s so dead connections are noticed; allow the SDK's keepalive
            # pings (every 10 s, with or without calls in flight: a dead link is noticed in seconds)
            # and any client's down to one every 5 s.
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # A call waiting for its request holds no thread here, but it holds a stream: at most 256
            # at once per connection, and every connection is closed after an hour (GOAWAY; clients
            # reconnect by themselves), its calls given 5 minutes to finish, so none lingers forever.
            ("grpc.max_concurrent_streams", 256),
            ("grpc.max_connection_age_ms", 3_600_000),
            ("grpc.max_connection_age_grace_ms", 300_000),
            # What a call's stream may carry before the server reads its request (server/receive.py);
            # the window is opened to the request's length when it does. BDP probing would otherwise
            # grow this first window to megabytes per stream.
            ("grpc.http2.lookahead_bytes", receive.STREAM_WINDOW_BYTES),
            ("grpc.http2.bdp_probe", 0),
        ],
    )
    slots, per_caller = receive.slots_for(settings.max_receiving_bytes, settings.max_message_bytes)
    receiving = Receiving(receive.ReceiveGate(slots, per_caller), settings.request_receive_seconds, _caller_key(auth))
    server.add_generic_rpc_handlers((_counted_handlers(servicer, metrics, receiving),))
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable((SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server)
    host = f"[{settings.host}]" if ":" in settings.host and not settings.host.startswith("[") else settings.host
    try:
        port = server.add_secure_port(f"{host}:{settings.port}", _tls(settings)) if settings.tls_cert else \
            server.add_insecure_port(f"{host}:{settings.port}")
    except RuntimeError as exc:
        raise _bind_error(settings.host, settings.port) from exc
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    return server, health_servicer, port


async def _serving(health_servicer: health_aio.HealthServicer) -> None:
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


def _bind_error(host: str, port: int) -> FailedPrecondition:
    """Why the server could not listen on host:port, and what to do about it, in one line."""
    try:
        with socket.create_server((host.strip("[]"), port)):
            cause = "gRPC could not bind it"
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return FailedPrecondition(
                f"port {port} on {host} is already in use (another trainer-server still running?): stop that "
                "process, or start on another port with --port N (--port 0 picks a free one)",
                "PORT_IN_USE",
            )
        cause = exc.strerror or str(exc)
    return FailedPrecondition(
        f"cannot listen on {host}:{port}: {cause}; check --host (an address of this machine) and --port "
        "(--port 0 picks a free one)",
        "CANNOT_LISTEN",
    )


def _tls(settings: Settings) -> grpc.ServerCredentials:
    """Server TLS credentials; with a client CA, clients must present a certificate it signed."""
    ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


@dataclass(frozen=True)
class Receiving:
    """How requests are let in (server/receive.py): the gate, the time limit, and whose call it is."""

    gate: receive.ReceiveGate
    seconds: float
    caller: Callable[[grpc.aio.ServicerContext[Any, Any]], str]


def _caller_key(auth: TokenAuth | None) -> Callable[[grpc.aio.ServicerContext[Any, Any]], str]:
    """Whose requests share a caller's receiving slots: the token's, or the connection's without tokens."""
    if auth is None:
        return lambda context: context.peer()
    return lambda context: auth.identify(tuple(context.invocation_metadata() or ())) or ""


def _counted_handlers(servicer: TrainerServicer, metrics: Metrics, receiving: Receiving) -> grpc.GenericRpcHandler[Any, Any]:
    """TrainerService's method handlers, one per method of the service descriptor, each of the call
    shape the descriptor states on the wire, its one request read in turn (``receive.one_request``), counting the bytes of every message as it is parsed or serialised
    (the sizes come free there), and handing bytes that do not parse to the servicer as
    ``Undecodable`` (refused as INVALID_ARGUMENT).

    Refuses to start (``RuntimeError``) when the servicer leaves an RPC unimplemented or serves it
    with a decorator of another call shape, so a new RPC cannot be registered wrongly or forgotten.
    """
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in SERVICE.methods:
        kind = rpc_kind(method.client_streaming, method.server_streaming)
        implementation = getattr(servicer, method.name, None)
        served = getattr(implementation, "rpc_kind", None)
        if served != kind:
            raise RuntimeError(
                f"{SERVICE_NAME}/{method.name} is a {kind} RPC but the servicer "
                + ("does not implement it" if served is None else f"serves it as {served}")
            )
        request_class = message_factory.GetMessageClass(method.input_type)

        def deserialize(data: bytes, cls: Any = request_class, name: str = method.name) -> Any:
            metrics.received(name, len(data))
            try:
                return cls.FromString(data)
            except DecodeError as exc:
                return Undecodable(cls.DESCRIPTOR.full_name, str(exc))

        def deserialize_input(data: bytes, cls: Any = request_class, name: str = method.name) -> Any:
            # Forward and TrainStep: the batch's bytes stay where they arrived (convert.LargeInput).
            metrics.received(name, len(data))
            try:
                rest, raw = wire.cut_field(data, *convert.INPUT_PATHS[name])
                return convert.LargeInput(cls.FromString(rest), raw)
            except (ValueError, DecodeError):
                pass  # a layout the cut does not read: protobuf's parser decides
            try:
                return convert.LargeInput(cls.FromString(data), None)
            except DecodeError as exc:
                return Undecodable(cls.DESCRIPTOR.full_name, str(exc))

        def serialize(message: Any, name: str = method.name) -> bytes:
            # Tensor streams hand over messages already in wire form (wire.Serialized).
            data: bytes = message.data if isinstance(message, wire.Serialized) else message.SerializeToString()
            metrics.sent(name, len(data))
            return data

        # Every method takes one request: served as a client-streaming handler that reads it itself.
        served_as = rpc_kind(True, method.server_streaming)
        handlers[method.name] = _HANDLER_FACTORIES[served_as](
            receive.one_request(served_method(implementation), receiving.gate, receiving.seconds, receiving.caller),
            request_deserializer=deserialize_input if method.name in convert.INPUT_PATHS else deserialize,
            response_serializer=serialize,
        )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def served_method(implementation: object) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    """A servicer method checked above to be served by ``@unary`` or ``@streaming`` (server/rpc.py)."""
    assert callable(implementation)
    return implementation


_HANDLER_FACTORIES: dict[str, Any] = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def _expire_sessions(running: TrainerServer) -> None:
    """Closes idle sessions and drops unused pending graphs, checking four times per period (at most
    every 30 s); sessions with a call running or waiting are never idle."""
    interval = min([p / 4 for p in (running.store.idle_seconds, running.store.pending_seconds) if p] + [30.0])
    while not running._stopping.wait(interval):
        running.servicer.forget_sessions(running.store.expire_idle(running.servicer.busy))


def session_store(
    settings: Settings, limits: Limits, clock: Callable[[], float] = time.monotonic
) -> tuple[Sessions, MemoryBudget]:
    """The sessions of the configured backend, the default session built (or, with Ray, found) from
    the operator's settings (its weights may be any path), and the memory budget the servicer checks
    before it has a session built: this process's, shared by its sessions (local backend); with Ray
    none here: the registry checks the cluster's budget when a session is reserved, and each
    session's actor keeps a budget of its own process (docs/deployment.md)."""
    default_model = ModelSpec(
        settings.weights, settings.num_classes, settings.seed, settings.device, settings.data_dir, trusted_path=True,
        **settings.run_options(),
    )
    if settings.backend == "ray":
        if not settings.ray_address:
            # A Ray of this server's own: keep it on loopback (Ray reads this when imported; without
            # it Ray binds some ports on the host's routable address).
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        from remote_trainer.server.ray_backend.store import RaySessionStore  # imports ray: only with this backend

        return RaySessionStore.connect(settings, default_model, limits), UNLIMITED
    budget = MemoryBudget(
        settings.memory_budget_bytes or default_total_bytes(resolve_device(settings.device)), settings.session_memory_bytes
    )
    default = SessionEngine.from_spec(default_model, OptimizerSpec.tutorial(), limits, budget, keep_initial_state=True)
    store = SessionStore(
        default,
        lambda model, optimizer: SessionEngine.from_spec(model, optimizer, limits, budget),
        settings.max_sessions,
        settings.max_sessions_per_token,
        settings.session_idle_seconds,
        clock,
        settings.pending_graph_seconds,
    )
    return store, budget


def freeze_startup_objects() -> None:
    """Moves every object alive now (torch's, numpy's and gRPC's modules, the default session's
    model, the server itself: about 350,000, all kept for the process's life) out of the cyclic
    garbage collector's reach (``gc.freeze``), once the server is up. A full collection otherwise
    walks them all: 90-130 ms on one core, a pause in whatever call it lands on (docs/benchmarks.md,
    issue 21 item 3); after this, collections see only objects made later. Objects are still freed
    by reference counting; a cycle among the frozen ones would stay, so this is for a server's own
    process (``serve``, ``bench.serve``), not one that builds and drops servers (tests)."""
    gc.freeze()
    log.debug("%d objects made at start-up frozen for the garbage collector", gc.get_freeze_count())


def serve(settings: Settings, signals: StopSignals | None = None) -> None:
    """Runs the server until SIGTERM or SIGINT, then shuts down gracefully. ``signals`` were
    installed before start-up (``trainer-server`` does so first): one received meanwhile stops the
    server as soon as it is up."""
    signals = signals or StopSignals().install()
    running = create_server(settings)
    freeze_startup_objects()
    signals.serving(lambda: running.stop(settings.grace_seconds), settings.grace_seconds)
    # The kernel may hand a signal to any of the process's threads (gRPC's, torch's); Python then
    # runs the handler in the main thread the next time that thread runs Python code. So the main
    # thread wakes now and then to let it: asleep until the server stops, it never would.
    while not running.wait(timeout=0.2):
        pass
    if running.housekeeping is not None:
        # Not cut off midway by the interpreter's exit: with Ray, a call into a shut-down Ray worker
        # ends the process with status 1 ("the core worker has already been shutdown").
        running.housekeeping.join(timeout=settings.grace_seconds + 5)
    log.info("stopped")
