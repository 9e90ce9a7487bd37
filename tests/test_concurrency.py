"""Sessions used from several threads: isolated from each other, serialised within one."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from remote_trainer.client import DeadlineExceededError, Session, TrainerClient
from remote_trainer.server.app import TrainerServer, create_server
from remote_trainer.server.settings import Settings
from tests.conftest import WEIGHTS_NAME, assert_equal_to_local, rand


def run_threads(*targets: Callable[[], None]) -> None:
    errors: list[BaseException] = []

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # collected and re-raised in the test thread
                errors.append(exc)
        return run

    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors


def test_two_sessions_from_two_threads_stay_isolated(client: TrainerClient, local: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    with client.create_session(WEIGHTS_NAME) as a, client.create_session(WEIGHTS_NAME) as b:
        run_isolation(a, b, local, state_dict)


def run_isolation(a: Session, b: Session, local: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    data = {"a": [rand(2, 3, 32, 32, seed=i) for i in range(3)], "b": [rand(2, 3, 32, 32, seed=100 + i) for i in range(3)]}
    labels = rand(2, 1000, seed=7)

    def train(session_name: str) -> Callable[[], None]:
        session = a if session_name == "a" else b

        def run() -> None:
            for x in data[session_name]:
                session.zero_grad()
                session.forward(x)
                session.backward("sum", labels)
                session.step()
        return run

    run_threads(train("a"), train("b"))

    for name, session in (("a", a), ("b", b)):
        model = resnet18()
        model.load_state_dict(state_dict)
        optim = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
        for x in data[name]:
            optim.zero_grad()
            (model(torch.from_numpy(x)) - torch.from_numpy(labels)).sum().backward()
            optim.step()
        remote = session.parameters("fc", "conv1")
        for pname in remote:
            assert_equal_to_local(remote[pname].array, dict(model.named_parameters())[pname])


def test_concurrent_calls_on_one_session_are_serialised(client: TrainerClient, local: nn.Module) -> None:
    """Eight threads run Backward through one retained graph while others read the gradients.

    Serialised calls mean every Backward adds exactly one copy of the gradient, and every read sees
    a whole number of them: never a tensor caught half-way through an accumulation.
    """
    with client.create_session(WEIGHTS_NAME) as session:
        run_serialised(session, local)


def run_serialised(session: Session, local: nn.Module) -> None:
    x, labels = rand(2, 3, 32, 32), rand(2, 1000)
    session.forward(x)
    (local(torch.from_numpy(x)) - torch.from_numpy(labels)).sum().backward()
    single = local.fc.weight.grad.numpy()  # type: ignore[union-attr]
    reads: list[np.ndarray] = []

    def backward() -> None:
        session.backward("sum", labels, retain_graph=True)

    def read() -> None:
        for _ in range(3):
            g = session.gradients("fc.weight")["fc.weight"]
            if g.present:
                reads.append(g.array)  # type: ignore[arg-type]

    with ThreadPoolExecutor(max_workers=12) as pool:
        futures = [pool.submit(backward) for _ in range(8)] + [pool.submit(read) for _ in range(4)]
        for f in futures:
            f.result(timeout=600)

    assert reads, "the readers saw gradients"
    final = session.gradients("fc.weight")["fc.weight"].array
    np.testing.assert_allclose(final, 8 * single, rtol=1e-5, atol=1e-5)
    for seen in reads:
        # Each read is k * single for one whole k in 1..8 (sums of equal terms round alike).
        k = round(float(np.abs(seen).sum() / np.abs(single).sum()))
        assert 1 <= k <= 8
        np.testing.assert_allclose(seen, k * single, rtol=1e-5, atol=1e-5)
    with ThreadPoolExecutor(max_workers=4) as pool:
        step_counts = sorted(pool.map(lambda _: session.step(), range(4)))
    assert step_counts == [1, 2, 3, 4]


class OverlapDetector:
    """Wraps calls so that each, once inside, waits up to ``linger`` seconds for another to come in: two
    calls that may run at once then certainly do (and are counted), while serialised ones never meet."""

    def __init__(self, linger: float = 0.3) -> None:
        self.linger = linger
        self.inside = 0
        self.most_inside = 0
        self.entered: Counter[str] = Counter()  # by the name given to wrap(): proof the wrapped path was taken
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)

    def enter(self) -> None:
        with self._arrived:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            self._arrived.notify_all()
            self._arrived.wait_for(lambda: self.inside > 1, timeout=self.linger)

    def leave(self) -> None:
        with self._lock:
            self.inside -= 1

    def wrap(self, fn: Callable[..., object], name: str = "") -> Callable[..., object]:
        def wrapped(*args: object, **kwargs: object) -> object:
            self.entered[name] += 1
            self.enter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.leave()
        return wrapped


def test_no_two_calls_run_at_once_on_one_session(client: TrainerClient, server: TrainerServer) -> None:
    """Through the server: the session's engine is entered by one call at a time (the dispatcher's
    per-session turn). Removing that turn makes this fail every time, not by chance. Each RPC's
    own engine method is instrumented (GetGradients streams through ``encode_gradients``), and the
    test checks that every call went through its instrumented method, so a path that changes
    cannot leave a call unwatched."""
    with client.create_session(WEIGHTS_NAME) as session:
        engine = server.store.get(session.session_id)
        detector = OverlapDetector()
        paths = {"Backward": "backward", "GetGradients": "encode_gradients", "DescribeSession": "describe", "ZeroGrad": "zero_grad"}
        for name in paths.values():
            setattr(engine, name, detector.wrap(getattr(engine, name), name))
        session.forward(rand(2, 3, 32, 32))
        labels = rand(2, 1000)
        with ThreadPoolExecutor(max_workers=8) as pool:
            calls = [lambda: session.backward("sum", labels, retain_graph=True), lambda: session.gradients("fc.bias"),
                     session.info, session.zero_grad] * 2
            for f in [pool.submit(c) for c in calls]:
                f.result(timeout=600)
        assert detector.entered == {name: 2 for name in paths.values()}, detector.entered
        assert detector.most_inside == 1


def test_the_engine_runs_one_call_at_a_time(local: nn.Module) -> None:
    """Without the server: SessionEngine's own lock serialises threads (a forward hook that waits for
    company finds none)."""
    from remote_trainer.engine.limits import Limits
    from remote_trainer.engine.optimizer import OptimizerSpec
    from remote_trainer.engine.session import SessionEngine

    engine = SessionEngine(local, torch.device("cpu"), "test", OptimizerSpec.tutorial(), Limits())
    detector = OverlapDetector()
    local.register_forward_pre_hook(lambda module, args: detector.enter())
    local.register_forward_hook(lambda module, args, out: detector.leave())
    x = torch.from_numpy(rand(2, 3, 32, 32))
    with ThreadPoolExecutor(max_workers=4) as pool:
        for f in [pool.submit(engine.forward, x) for _ in range(4)]:
            f.result(timeout=600)
    assert detector.most_inside == 1


def test_an_empty_call_on_a_free_session_needs_no_worker_and_a_busy_one_keeps_its_turn(data_dir: Path) -> None:
    """DescribeSession on a session with no call running or waiting is answered on the event loop
    (``@at_once``, server/rpc.py): it answers while the server's one worker thread is held. On a
    session whose turn is held it waits for that turn, as every call does."""
    running = create_server(Settings(port=0, weights=str(data_dir / WEIGHTS_NAME), data_dir=str(data_dir), max_workers=1))
    release, held = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        release.wait(60)

    try:
        with TrainerClient(f"localhost:{running.port}", timeout=60) as client:
            # The one worker held by work on no session: the free default session still answers.
            worker = asyncio.run_coroutine_threadsafe(running.servicer.run(None, hold), running.loop)
            assert held.wait(60)
            assert client.session().info(timeout=10).step_count == 0
            release.set()
            worker.result(60)
            # The default session's turn held: its DescribeSession waits behind it.
            release.clear()
            held.clear()
            turn = asyncio.run_coroutine_threadsafe(running.servicer.run("", hold), running.loop)
            assert held.wait(60)
            with pytest.raises(DeadlineExceededError):
                client.session().info(timeout=1)
            release.set()
            turn.result(60)
            assert client.session().info(timeout=10).step_count == 0
    finally:
        release.set()
        running.stop(None).wait()
