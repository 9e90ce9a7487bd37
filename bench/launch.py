"""What every section runs against: the benchmark's server subprocess (``python -m bench.serve``),
the raw gRPC floors it serves beside the trainer, the same floors each served by a process of its
own (``python -m bench.raw``), and the ``Context`` a section is given."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from bench.measure import rss_bytes, stop_child
from bench.raw import MIB, RawClient


@dataclass
class Server:
    """The benchmark's server subprocess."""

    process: subprocess.Popen[str]
    target: str
    raw_target: str
    raw_aio_target: str
    pid: int

    def rss(self) -> int:
        return rss_bytes(self.pid)


@contextmanager
def start_server(
    device: str, max_sessions: int, chunk_bytes: int = 0, threads: int = 0, backend: str = "local", reuse_buffers_bytes: int = 0,
    pin_memory: bool = False, host: str = "127.0.0.1", prefix: tuple[str, ...] = (),
) -> Iterator[Server]:
    """Runs ``python -m bench.serve`` (after ``prefix``: ``ip netns exec NS`` runs it in a network
    namespace, listening on ``host``) and yields its addresses; stops it by closing its stdin."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [*prefix, sys.executable, "-m", "bench.serve", "--device", device, "--max-sessions", str(max_sessions), "--host", host]
    if chunk_bytes:
        cmd += ["--chunk-bytes", str(chunk_bytes)]
    if threads:
        cmd += ["--threads", str(threads)]
    if backend != "local":
        cmd += ["--backend", backend]
    if reuse_buffers_bytes:
        cmd += ["--reuse-buffers-bytes", str(reuse_buffers_bytes)]
    if pin_memory:
        cmd += ["--pin-memory", "1"]
    process = subprocess.Popen(cmd, cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"the benchmark server did not start (exit code {process.wait()})")
        info = json.loads(line)
        yield Server(process, f"{host}:{info['trainer_port']}", f"{host}:{info['raw_port']}",
                     f"{host}:{info['raw_aio_port']}", int(info["pid"]))
    finally:
        stop_child(process, timeout=30)


@dataclass
class Standalone:
    """The raw floor's two servers each in a process of its own (``python -m bench.raw``), as a
    user's own raw gRPC server would run: no trainer, no torch."""

    sync_target: str
    aio_target: str
    pids: dict[str, int]


@contextmanager
def start_standalone_floors(max_message_bytes: int = 256 * MIB) -> Iterator[Standalone]:
    """Runs ``python -m bench.raw --server sync`` and ``--server aio`` (the trainer server's message
    limit, 256 MiB by default) and yields their addresses; stops them by closing their stdin."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    processes: dict[str, subprocess.Popen[str]] = {}
    try:
        targets = {}
        for kind in ("sync", "aio"):
            processes[kind] = process = subprocess.Popen(
                [sys.executable, "-m", "bench.raw", "--server", kind, "--max-message-bytes", str(max_message_bytes)],
                cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert process.stdout is not None
            line = process.stdout.readline()
            if not line:
                raise RuntimeError(f"the standalone {kind} floor did not start (exit code {process.wait()})")
            info = json.loads(line)
            if info["torch"]:
                raise RuntimeError("the standalone floor imported torch: it must stay a plain gRPC server")
            targets[kind] = f"127.0.0.1:{info['port']}"
        yield Standalone(targets["sync"], targets["aio"], {kind: p.pid for kind, p in processes.items()})
    finally:
        for process in processes.values():
            stop_child(process, timeout=30)


@dataclass
class Floors:
    """The raw floor's servers: ``sync`` (a threaded grpc server) and ``aio`` (grpc.aio, the trainer
    server's own stack) in the trainer server's process, and ``alone_sync`` and ``alone_aio``, the
    same each in a process of its own (``Standalone``); timings come from the in-process ones (they
    share the server's recorder)."""

    sync: RawClient
    aio: RawClient
    alone_sync: RawClient
    alone_aio: RawClient

    def timings(self) -> dict[str, list[float]]:
        return self.sync.timings()

    def close(self) -> None:
        for client in (self.sync, self.aio, self.alone_sync, self.alone_aio):
            client.close()


@contextmanager
def open_floors(server: Server, standalone: Standalone) -> Iterator[Floors]:
    """Clients of the server's two raw floors and of the standalone ones, with the SDK's message limits."""
    options: list[tuple[str, Any]] = [("grpc.max_send_message_length", 512 * MIB), ("grpc.max_receive_message_length", 512 * MIB)]
    floors = Floors(*(RawClient(target, options) for target in (server.raw_target, server.raw_aio_target,
                                                                  standalone.sync_target, standalone.aio_target)))
    try:
        yield floors
    finally:
        floors.close()


@dataclass
class Context:
    """What a section gets: the command's arguments, the server, its floors; and where it records
    the exit code of a child process of its own (``children``, written to the JSON)."""

    args: argparse.Namespace
    server: Server
    floors: Floors
    children: dict[str, dict[str, int | None]] = field(default_factory=dict)
