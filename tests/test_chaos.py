"""Chaos: training loops through a connection that fails end exactly as the same loops without faults.

A seeded, bounded fault-injecting proxy (tests/faults.py) sits between the SDK and a real server and
cuts requests midway, drops answers the server already sent, resets connections and delays frames.
The loops below have no try/except: the SDK retries what failed in transit, with the same operation
numbers, and the server answers a repeat without running it again. Each loop ends with weights,
BatchNorm buffers, optimizer state (momentum) and step count **bit-identical** to the same loop run
on a direct connection, read from both sessions' checkpoints. The faults injected are printed; a run
with too few of any kind fails (the proof would be empty). ``CHAOS_SEED`` picks another plan.

Then the server is SIGKILLed mid-loop and restarted: the loop resumes from the automatic checkpoint
(``session.resume()``) and ends bit-identical to a loop that never stopped.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from remote_trainer.client import Session, TrainerClient, TrainerError
from remote_trainer.client.aio import AsyncSession, AsyncTrainerClient
from remote_trainer.client.remote import RemoteModel
from remote_trainer.server.app import TrainerServer, create_server
from remote_trainer.server.settings import Settings
from tests.conftest import WEIGHTS_NAME, rand
from tests.faults import CUT_REQUEST, DELAY, DROP_RESPONSE, RESET, FaultPlan, FaultyProxy
from tests.test_server_process import free_port, start

SEED = int(os.environ.get("CHAOS_SEED", "7"))
STEPS = 12
BATCHES = [(rand(2, 3, 64, 64, seed=100 + i), np.array([i % 10, (3 * i + 1) % 10])) for i in range(STEPS)]
# Per frame a fault can hit; bounded per kind so every loop ends. A step is 4-5 calls of ~5-15 frames.
PLAN = dict(probability={CUT_REQUEST: 0.15, DROP_RESPONSE: 0.06, RESET: 0.03, DELAY: 0.1},
            max_faults={CUT_REQUEST: 4, DROP_RESPONSE: 4, RESET: 4, DELAY: 8}, max_delay=0.05)
AT_LEAST = {CUT_REQUEST: 2, DROP_RESPONSE: 2, RESET: 2}


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chaos-checkpoints")


@pytest.fixture(scope="module")
def chaos_server(data_dir: Path, checkpoint_dir: Path) -> Iterator[TrainerServer]:
    running = create_server(Settings(port=0, weights=str(data_dir / WEIGHTS_NAME), data_dir=str(data_dir),
                                     checkpoint_dir=str(checkpoint_dir)))
    yield running
    running.stop(None).wait()


@pytest.fixture
def proxy(chaos_server: TrainerServer, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest) -> Iterator[FaultyProxy]:
    with FaultyProxy(chaos_server.port, FaultPlan(seed=SEED, **PLAN)) as running:  # type: ignore[arg-type]
        yield running
        with capsys.disabled():
            print(f"\n{request.node.name} (seed {SEED}): {running.summary()}")
    for kind, least in AT_LEAST.items():
        assert running.counts[kind] >= least, f"too few {kind} faults for a proof: {running.summary()}"


def _state(checkpoint_dir: Path, session: Session) -> dict[str, Any]:
    """What a checkpoint of the session holds: weights and buffers, optimizer state, step count."""
    name = f"chaos-{session.session_id}.ckpt"
    session.save_checkpoint(name)
    state = torch.load(checkpoint_dir / name, weights_only=True)
    return {key: state[key] for key in ("model", "optimizer_state", "step_count", "frozen", "num_classes")}


def _assert_identical(a: Any, b: Any, path: str = "") -> None:
    """Bit for bit: every tensor equal, every number and name the same."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            _assert_identical(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _loop(session: Session) -> None:
    """The tutorial's four calls a step, and TrainStep every third step; no try/except."""
    for i, (x, labels) in enumerate(BATCHES):
        if i % 3 == 2:
            session.train_step(x, "cross_entropy", labels)
            continue
        session.zero_grad()
        session.forward(x)
        session.backward("cross_entropy", labels)
        session.step()


async def _async_loop(session: AsyncSession) -> None:
    for i, (x, labels) in enumerate(BATCHES):
        if i % 3 == 2:
            await session.train_step(x, "cross_entropy", labels)
            continue
        await session.zero_grad()
        await session.forward(x)
        await session.backward("cross_entropy", labels)
        await session.step()


def _remote_model_loop(model: RemoteModel) -> None:
    optimizer = model.sgd(lr=0.01, momentum=0.9)
    for x, labels in BATCHES:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(labels))
        loss.backward()
        optimizer.step()


def _reference(chaos_server: TrainerServer, checkpoint_dir: Path, train: Callable[[Session], None]) -> dict[str, Any]:
    with TrainerClient(f"localhost:{chaos_server.port}", timeout=120) as client, client.create_session(WEIGHTS_NAME) as session:
        train(session)
        return _state(checkpoint_dir, session)


def test_a_sync_loop_through_a_failing_connection_equals_the_unfaulted_loop(
    chaos_server: TrainerServer, checkpoint_dir: Path, proxy: FaultyProxy
) -> None:
    with TrainerClient(proxy.address, timeout=120) as client, client.create_session(WEIGHTS_NAME) as session:
        _loop(session)
        proxy.pause()
        faulted = _state(checkpoint_dir, session)
    assert faulted["step_count"] == STEPS
    _assert_identical(faulted, _reference(chaos_server, checkpoint_dir, _loop))


def test_an_asyncio_loop_through_a_failing_connection_equals_the_unfaulted_loop(
    chaos_server: TrainerServer, checkpoint_dir: Path, proxy: FaultyProxy
) -> None:
    async def run() -> str:
        async with AsyncTrainerClient(proxy.address, timeout=120) as client:
            session = await client.create_session(WEIGHTS_NAME)
            await _async_loop(session)
            return session.session_id

    session_id = asyncio.run(run())
    proxy.pause()
    with TrainerClient(f"localhost:{chaos_server.port}", timeout=120) as client, client.session(session_id) as session:
        faulted = _state(checkpoint_dir, session)
        session.close()
    assert faulted["step_count"] == STEPS
    _assert_identical(faulted, _reference(chaos_server, checkpoint_dir, _loop))


def test_a_remote_model_loop_through_a_failing_connection_equals_the_unfaulted_loop(
    chaos_server: TrainerServer, checkpoint_dir: Path, proxy: FaultyProxy
) -> None:
    def states(target: str) -> dict[str, Any]:
        with RemoteModel.create(target, weights=WEIGHTS_NAME) as model:
            _remote_model_loop(model)
            proxy.pause()
            return _state(checkpoint_dir, model.session)

    faulted = states(proxy.address)
    assert faulted["step_count"] == STEPS
    _assert_identical(faulted, states(f"localhost:{chaos_server.port}"))


# -- a server killed mid-loop ----------------------------------------------------------------------


def test_a_server_killed_mid_loop_and_restarted_resumes_bit_identical(data_dir: Path, tmp_path: Path) -> None:
    """The server is SIGKILLed the moment it has checkpointed step 6 (its answer may or may not have
    left) and restarted on the same port. The TrainStep in flight retries until the new server
    answers that it does not know the session; the loop, driven by the session's step count, resumes
    from the automatic checkpoint (every step) and ends as a loop that never stopped."""
    port = free_port()
    args = ["--port", str(port), "--weights", "random", "--data-dir", str(data_dir), "--checkpoint-dir", str(tmp_path),
            "--checkpoint-every", "1"]
    killed = threading.Event()
    processes: list[subprocess.Popen[str]] = []

    def kill_at_step_6(line: str) -> None:
        if f"at step {STEPS // 2}" in line and not killed.is_set():
            processes[0].send_signal(signal.SIGKILL)
            killed.set()

    def restart() -> None:
        assert killed.wait(300)
        processes[0].wait()
        processes.append(start(*args)[0])

    processes.append(start(*args, on_line=kill_at_step_6)[0])
    restarter = threading.Thread(target=restart, daemon=True)
    restarter.start()
    resumes = 0
    try:
        with TrainerClient(f"127.0.0.1:{port}", timeout=120) as client:
            session = client.create_session(WEIGHTS_NAME)
            while True:
                try:
                    if (done := session.info().step_count) == STEPS:
                        break
                    x, labels = BATCHES[done]
                    session.train_step(x, "cross_entropy", labels)
                except TrainerError as lost:  # the restarted server does not know the session
                    assert lost.reason == "SESSION_NOT_FOUND" and killed.is_set(), lost
                    resumed_at = session.resume().step_count
                    assert resumed_at in (done, done + 1)  # the checkpoint saw the step in flight, or not
                    resumes += 1
            resumed = _state(tmp_path, session)
            with client.create_session(WEIGHTS_NAME) as unbroken:
                for x, labels in BATCHES:
                    unbroken.train_step(x, "cross_entropy", labels)
                _assert_identical(resumed, _state(tmp_path, unbroken))
    finally:
        killed.set()
        restarter.join(120)
        for process in processes:
            process.kill()
            process.wait()
    assert resumes == 1
