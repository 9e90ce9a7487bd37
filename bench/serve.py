"""The benchmark's server process: the trainer server and the raw floor, each on a free loopback port.

``python -m bench.serve [--device cpu|cuda] [--max-sessions N] [--host ADDRESS]`` prints one JSON line with both ports
and its pid, then serves until its standard input closes. The engine's forward/backward/step and the
servicer's Forward/Backward/Step are wrapped with timers, so the benchmark can split a remote call
into the torch work and the rest (transport, encoding, decoding); the raw floor's ``Timings`` call
hands the durations out.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any, TypeVar

import grpc

from bench.raw import RawFloor, start_aio_floor
from remote_trainer.server.app import create_server, freeze_startup_objects
from remote_trainer.engine.session import SessionEngine
from remote_trainer.server.servicer import TrainerServicer
from remote_trainer.server.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])

_timings: dict[str, list[float]] = {}
_timings_lock = threading.Lock()


def _record(name: str, start: float) -> None:
    elapsed = time.perf_counter() - start
    with _timings_lock:
        _timings.setdefault(name, []).append(elapsed)


def _timed(name: str, fn: F) -> F:
    if inspect.iscoroutinefunction(fn):  # the servicer's handlers, served by the asyncio server

        @functools.wraps(fn)
        async def handler(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                _record(name, start)

        return handler  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _record(name, start)

    return wrapper  # type: ignore[return-value]


def take_timings() -> dict[str, list[float]]:
    """The durations recorded since the last call, by name; clears them."""
    global _timings
    with _timings_lock:
        taken, _timings = _timings, {}
    return taken


def install_timers() -> None:
    """Wraps the engine's and the servicer's step methods (before the server registers them)."""
    for name in ("forward", "backward", "step", "train_step"):
        setattr(SessionEngine, name, _timed(f"engine.{name}", getattr(SessionEngine, name)))
    for name in ("Forward", "Backward", "Step", "TrainStep"):
        setattr(TrainerServicer, name, _timed(f"handler.{name}", getattr(TrainerServicer, name)))


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    """The raw floor's options: the trainer server's message-size limits."""
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-sessions", type=int, default=16)
    parser.add_argument("--chunk-bytes", type=int, default=0, help="0: the server's default")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--backend", default="local", help="local, or ray: sessions in actors of a Ray started here")
    parser.add_argument("--reuse-buffers-bytes", type=int, default=0, help="the server's setting (0: its default, off)")
    parser.add_argument("--pin-memory", type=int, default=0, help="the server's setting (1: pinned host buffers; CUDA only)")
    parser.add_argument("--host", default="127.0.0.1", help="the address the trainer server and the raw floors listen on")
    args = parser.parse_args()
    if args.backend == "ray":  # before anything imports ray: keep the local Ray on 127.0.0.1
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    # The server logs one line per call at INFO, as in production; here to a file nobody reads.
    log_file = os.path.join(tempfile.gettempdir(), f"bench-server-{os.getpid()}.log")
    logging.basicConfig(level=logging.INFO, filename=log_file, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    install_timers()
    extra: dict[str, Any] = {"chunk_bytes": args.chunk_bytes} if args.chunk_bytes else {}
    if args.backend == "ray":
        # As many torch threads in the session actor as here (Ray sets OMP_NUM_THREADS to its CPUs).
        import torch

        extra.update(backend="ray", ray_num_cpus=float(torch.get_num_threads()))
        if args.device.startswith("cuda"):  # each actor its share of the GPU (the server sizes it to max-sessions)
            extra["ray_num_gpus"] = 1.0
    if args.reuse_buffers_bytes:
        extra["reuse_buffers_bytes"] = args.reuse_buffers_bytes
    if args.pin_memory:
        extra["pin_memory"] = args.pin_memory
    if args.backend == "local":  # the rpc section's rows through shared memory (docs/shared-memory.md)
        extra["allow_shared_memory"] = 1
    settings = Settings(host=args.host, port=0, weights="random", seed=0, device=args.device, max_sessions=args.max_sessions, **extra)
    trainer = create_server(settings)
    freeze_startup_objects()  # as trainer-server does

    floor = RawFloor(take_timings)
    raw_server = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.max_workers), options=server_options(settings))
    raw_server.add_generic_rpc_handlers((floor.handler(),))
    raw_port = raw_server.add_insecure_port(f"{args.host}:0")
    raw_server.start()
    raw_aio_port, stop_aio_floor = start_aio_floor(floor, server_options(settings), args.host)

    print(json.dumps({"trainer_port": trainer.port, "raw_port": raw_port, "raw_aio_port": raw_aio_port,
                      "pid": os.getpid(), "log": log_file}), flush=True)
    sys.stdin.read()  # until the benchmark closes our standard input (or exits)
    stop_aio_floor()
    raw_server.stop(None)
    trainer.stop(None).wait()
    os.unlink(log_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
