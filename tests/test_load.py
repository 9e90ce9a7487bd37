"""Load: 16 clients train at once against one server process, with no errors, no deadlock and flat memory.

Each client is a thread with its own ``TrainerClient`` and session, doing small training steps
(forward of a 2x3x32x32 batch, backward, step) and, at random, a gradient fetch (``fc`` in full, or
statistics of every parameter). The server runs as a real process (``python -m remote_trainer.server``), so its
memory is measured alone, from ``/proc/PID/status``.

Steps per client: ``LOAD_STEPS`` a round (default 10). The issue asks for 100; on the shared 2-core
CI machine 16 clients x 100 steps took 343 s and 365 s a round (12 minutes for the two rounds), too
long for every CI run. The default keeps all 16 clients, every kind of call and the memory check,
and ``LOAD_STEPS=100 .venv/bin/python -m pytest tests/test_load.py -s`` runs the full count (``-s``
prints the times and RSS figures).
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from remote_trainer.client import TrainerClient
from tests.conftest import rand

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = 16
STEPS = int(os.environ.get("LOAD_STEPS", "10"))
MIB = 1024 * 1024
# How much RSS a second round, identical to the first, may add. The first round pays for everything
# that is made once (16 sessions' weights, gradients and momentum, about 140 MiB each, the autograd
# and allocator caches, gRPC's buffers); glibc keeps much of that freed memory mapped after the
# sessions close, so RSS after round one is the baseline, not the size before it. Round two reuses
# that memory; what a leak would add is far larger than the margin: one session never freed is
# ~140 MiB, one autograd graph kept per step is ~3 MiB x 16 clients x STEPS. The margin leaves room
# for allocator fragmentation across 16 threads' arenas, which varies with scheduling: up to 81 MiB
# was seen on a loaded 2-core machine, so the margin sits between that and one leaked session.
GROWTH_MARGIN = 120 * MIB


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    port: int
    log: deque[str] = field(default_factory=lambda: deque(maxlen=200))

    def rss(self) -> int:
        """Resident set size of the server process, in bytes (VmRSS)."""
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        found = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
        assert found, text
        return int(found.group(1)) * 1024


def start_server(*args: str, startup_timeout: float = 180) -> ServerProcess:
    """``python -m remote_trainer.server`` on a free port; the port comes from its 'listening on HOST:PORT' log line.

    A thread drains its stderr (so the pipe never fills), keeping the last lines for failure messages.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "remote_trainer.server", "--port", "0", *args],
        cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    assert proc.stderr is not None
    stderr = proc.stderr
    found: list[int] = []
    ready = threading.Event()
    server = ServerProcess(proc, 0)

    def drain() -> None:
        for line in stderr:
            server.log.append(line)
            if not found:
                match = re.search(r"listening on \S+:(\d+)", line)
                if match:
                    found.append(int(match.group(1)))
                    ready.set()
        ready.set()  # the process ended

    threading.Thread(target=drain, name="server-stderr", daemon=True).start()
    if not ready.wait(startup_timeout) or not found:
        proc.kill()
        proc.wait()
        raise AssertionError("server did not start:\n" + "".join(server.log))
    server.port = found[0]
    return server


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    running = start_server("--weights", "random", "--max-sessions", "20")
    yield running
    running.proc.terminate()
    try:
        running.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        running.proc.kill()
        running.proc.wait()


@dataclass
class Round:
    """What one round of CLIENTS x STEPS did."""

    steps: int = 0
    fetches: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


def client_run(target: str, index: int, steps: int, result: Round, start: threading.Barrier) -> None:
    """One client: its own channel and session, ``steps`` training steps, random gradient fetches."""
    rng = random.Random(index)
    done = fetches = 0
    try:
        with TrainerClient(target, timeout=300) as client, client.create_session(seed=index) as session:
            start.wait(timeout=300)
            for step in range(steps):
                x = rand(2, 3, 32, 32, seed=index * 1000 + step)
                session.forward(x, stats_only=True)
                if rng.random() < 0.5:
                    session.backward("sum", rand(2, 1000, seed=step))
                else:
                    session.backward("cross_entropy", np.array([step % 1000, index], np.int64))
                session.step()
                done += 1
                draw = rng.random()
                if draw < 0.2:
                    grads = session.gradients("fc")
                    assert grads["fc.weight"].array is not None and grads["fc.weight"].array.shape == (1000, 512)
                    fetches += 1
                elif draw < 0.4:
                    stats = session.gradients(stats_only=True)
                    assert len(stats) == 62 and all(t.present for t in stats.values())
                    fetches += 1
            assert session.info().step_count == steps
    except Exception as exc:  # collected, so that one failure does not hide the others
        with result.lock:
            result.errors.append(f"client {index}: {type(exc).__name__}: {exc}")
    finally:
        with result.lock:
            result.steps += done
            result.fetches += fetches


def run_round(target: str, steps: int, join_timeout: float) -> Round:
    """CLIENTS threads at once; fails if one has not finished within ``join_timeout`` seconds."""
    result = Round()
    start = threading.Barrier(CLIENTS)  # every session exists before the first step
    threads = [
        threading.Thread(target=client_run, args=(target, i, steps, result, start), name=f"load-{i}", daemon=True)
        for i in range(CLIENTS)
    ]
    began = time.monotonic()
    for t in threads:
        t.start()
    deadline = began + join_timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"clients still running after {join_timeout:.0f} s (deadlock?): {stuck}"
    result.seconds = time.monotonic() - began
    return result


def test_sixteen_clients_train_at_once_and_memory_stays_flat(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    target = f"localhost:{server.port}"
    # Generous: a step takes well under a second of CPU; the machine may be busy with other work.
    join_timeout = 600 + 60 * STEPS
    rss_start = server.rss()

    warm = run_round(target, STEPS, join_timeout)
    assert not warm.errors, "\n".join(warm.errors) + "\n--- server log:\n" + "".join(server.log)
    rss_warm = server.rss()

    measured = run_round(target, STEPS, join_timeout)
    assert not measured.errors, "\n".join(measured.errors) + "\n--- server log:\n" + "".join(server.log)
    rss_after = server.rss()

    assert warm.steps == measured.steps == CLIENTS * STEPS
    with TrainerClient(target, timeout=60) as client:
        assert client.health() == "SERVING"
        # Every session was closed: all 19 non-default slots are free again.
        sessions = [client.create_session() for _ in range(19)]
        for s in sessions:
            s.close()
    with capsys.disabled():
        print(
            f"\nload: {CLIENTS} clients x {STEPS} steps, two rounds of {warm.seconds:.0f} s and {measured.seconds:.0f} s; "
            f"gradient fetches {warm.fetches} + {measured.fetches}; server RSS at start {rss_start / MIB:.0f} MiB, "
            f"after round 1 {rss_warm / MIB:.0f} MiB, after round 2 {rss_after / MIB:.0f} MiB"
        )
    assert rss_after - rss_warm <= GROWTH_MARGIN, (
        f"server RSS grew by {(rss_after - rss_warm) / MIB:.0f} MiB in a second identical round "
        f"({rss_warm / MIB:.0f} -> {rss_after / MIB:.0f} MiB; margin {GROWTH_MARGIN / MIB:.0f} MiB)"
    )
