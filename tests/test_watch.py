"""WatchSession: a session's events pushed as they happen, through real servers and real channels.

Proven here: each step's event carries the step count, loss and gradient norm the SDK's call
returned (the losses those of local PyTorch on the same weights and inputs), with the learning rate,
the iteration's time and samples a second; freezes and new heads, checkpoints written (by a call and
automatically) and loaded, resets; a watcher that joins late gets the latest events; two watchers
(one per SDK face) get the same events; a watcher that never reads never slows or blocks training
and is told how many events it missed; only the session's owner may watch it (NOT_FOUND as for
DescribeSession); watchers are bounded per session and in all, and hold no worker thread; a watch
ends with the session's end (closed, expired) and at once when the server stops; the real
``trainer-client watch`` in a pseudo-terminal shows each step's loss as the SDK got it, within a
second; and docs/watch.md's grpcurl recipe runs as written.

The tests that train through ``client`` and reach the server at ``target`` run on the Ray backend too
(tests/test_ray_own.py); those that need a server of their own say why not in tests/test_ray_backend.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import queue
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from remote_trainer.client import (
    CheckpointEvent, EndEvent, FreezeEvent, HeadEvent, ResetEvent, SessionEvent, StepEvent, TrainerClient,
)
from remote_trainer.client.aio import AsyncTrainerClient
from remote_trainer.client.errors import (
    InvalidArgumentError, NotFoundError, ResourceExhaustedError, UnauthenticatedError,
)
from remote_trainer.contract import codec
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb
from remote_trainer.server.app import TrainerServer, create_server
from remote_trainer.server.settings import Settings
from tests.conftest import WEIGHTS_NAME, rand
from tests.server_events import FakeClock
from tests.test_grpcurl import grpcurl_path, json_messages

ROOT = Path(__file__).resolve().parent.parent
CLI = Path(sys.executable).with_name("trainer-client")
WATCH_SECONDS = 300.0  # no watch here outlives this, whatever fails
# A watch that must be refused at once: were it let in, it would end after this long with no event.
REFUSED_SECONDS = 10.0
# A client that takes in little of a stream it does not read: HTTP/2 windows of 1 KiB, never grown.
SMALL_WINDOWS = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]


class Reader:
    """A watch read on a thread of its own: its events in a queue as they come, then None when the
    iteration ends (or the exception it raised)."""

    def __init__(self, events: Iterator[SessionEvent]) -> None:
        self._queue: queue.Queue[SessionEvent | BaseException | None] = queue.Queue()
        threading.Thread(target=self._read, args=(events,), daemon=True).start()

    def _read(self, events: Iterator[SessionEvent]) -> None:
        try:
            for event in events:
                self._queue.put(event)
        except BaseException as exc:
            self._queue.put(exc)
        else:
            self._queue.put(None)

    def next(self, timeout: float = 60) -> SessionEvent:
        item = self._queue.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise item
        assert item is not None, "the watch ended"
        return item

    def rest(self, timeout: float = 60) -> list[SessionEvent]:
        """Every event until the watch ends."""
        events = []
        while (item := self._queue.get(timeout=timeout)) is not None:
            if isinstance(item, BaseException):
                raise item
            events.append(item)
        return events


def step_of(event: SessionEvent) -> StepEvent:
    assert event.kind == "step" and isinstance(event.detail, StepEvent), event
    return event.detail


def assert_ended(events: list[SessionEvent], reason: str) -> None:
    assert events and events[-1].kind == "end" and events[-1].detail == EndEvent(reason), events[-1:]  # type: ignore[arg-type]


def trained(events: list[SessionEvent]) -> list[SessionEvent]:
    """The events less the automatic checkpoints of a server with --checkpoint-every (the Ray cluster's)."""
    return [e for e in events if not (isinstance(e.detail, CheckpointEvent) and e.detail.automatic)]


def assert_follows(events: list[SessionEvent]) -> None:
    """Live events, numbered one after another, none missed."""
    assert [e.sequence for e in events] == list(range(events[0].sequence, events[0].sequence + len(events)))
    assert not any(e.missed or e.recent for e in events)


def test_each_step_arrives_with_the_numbers_its_call_returned(client: TrainerClient, local: nn.Module) -> None:
    """A training loop through every way to step (TrainStep; Forward then Backward with step;
    Forward, Backward, Step), a freeze, a new head and a new optimizer: each step's event has
    the step count, loss and gradient norm the call returned (the losses local PyTorch's), the
    learning rate, and samples a second from its iteration's time; the close ends the watch."""
    x = [rand(2, 3, 64, 64, seed=i) for i in range(5)]
    classes, targets = np.array([3, 997]), [rand(2, 1000, seed=10 + i) for i in range(5)]
    with client.create_session(WEIGHTS_NAME) as session:
        first = session.train_step(x[0], "cross_entropy", classes, grad_norm=True)
        reader = Reader(session.watch(recent=1, timeout=WATCH_SECONDS))
        joined = reader.next()  # the watch is in place: what follows comes live
        assert joined.recent and joined.missed == 0 and step_of(joined).step_count == 1
        second = session.train_step(x[1], "cross_entropy", classes, grad_norm=True)
        session.forward(x[2])
        third = session.backward("sum", targets[2], step=True)
        session.forward(x[3])
        fourth = session.backward("mse", targets[3])
        assert session.step() == 4
        frozen = session.freeze("layer1")
        session.replace_head(10, seed=1)
        replaced = session.configure_optimizer(lr=0.05)
        fifth = session.train_step(x[4], "cross_entropy", np.array([3, 9]), grad_norm=True)  # the head has 10 classes
    events = reader.rest()
    assert_follows(events)
    events = trained(events)

    # The same loop in local PyTorch (SGD lr 0.01, momentum 0.9; Backward adds to the .grad a TrainStep left).
    optimizer = torch.optim.SGD(local.parameters(), lr=1e-2, momentum=0.9)
    local.train()
    optimizer.zero_grad()
    losses = [F.cross_entropy(local(torch.from_numpy(x[0])), torch.from_numpy(classes))]
    losses[0].backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(F.cross_entropy(local(torch.from_numpy(x[1])), torch.from_numpy(classes)))
    losses[1].backward()
    optimizer.step()
    losses.append((local(torch.from_numpy(x[2])) - torch.from_numpy(targets[2])).sum())
    losses[2].backward()
    optimizer.step()
    losses.append(F.mse_loss(local(torch.from_numpy(x[3])), torch.from_numpy(targets[3])))
    losses[3].backward()
    optimizer.step()

    assert [e.kind for e in events] == ["step", "step", "step", "freeze", "head", "optimizer", "step", "end"]
    steps = [step_of(e) for e in [joined, *events[:3], events[6]]]
    results = [(1, first.loss, first.grad_norm), (2, second.loss, second.grad_norm), (3, third.loss, third.grad_norm),
               (4, fourth.loss, fourth.grad_norm), (5, fifth.loss, fifth.grad_norm)]
    assert [(s.step_count, s.loss, s.grad_norm) for s in steps] == results  # what the calls returned, exactly
    for step, expected in zip(steps, losses):
        assert step.loss == pytest.approx(expected.item(), rel=1e-5)
    assert [s.learning_rate for s in steps] == [0.01, 0.01, 0.01, 0.01, 0.05]
    for step in steps:
        assert step.samples == 2 and step.seconds > 0
        assert step.samples_per_second == pytest.approx(2 / step.seconds)
    assert events[3].detail == FreezeEvent(["layer1"], False, len(frozen.changed), len(frozen.trainable), frozen.frozen_count)
    assert events[4].detail == HeadEvent(10)
    assert events[5].detail == replaced and replaced.lr == 0.05
    assert_ended(events, "session_closed")


def test_a_repeated_call_is_answered_and_told_to_watchers_once(client: TrainerClient, local: nn.Module) -> None:
    """Each numbered call that watchers hear of (TrainStep; Forward then Backward with step; Step;
    FreezeLayers, ReplaceHead, ConfigureOptimizer; ZeroGrad, which they do not), sent twice with
    the same operation number, as the SDK's retry after a lost answer does: the repeat is answered
    from the session's record with the first answer, and the watch gets one event per call, not two."""
    x, classes = rand(2, 3, 32, 32), np.array([4, 8])
    stub = client.stub
    with client.create_session(WEIGHTS_NAME) as session:
        session.step()  # no gradients yet: changes no weight
        reader = Reader(session.watch(recent=1, timeout=WATCH_SECONDS))
        assert step_of(reader.next()).step_count == 1  # in place
        number = session.info().next_operation

        def twice(method: Any, request: Any) -> Any:
            """``request`` as operation ``number`` (the next), sent twice: the same answer both times."""
            nonlocal number
            request.operation.number = number
            number += 1
            first = client.call(method, request)
            assert client.call(method, request) == first
            return first

        def tensor(array: np.ndarray) -> pb.TensorInput:
            return pb.TensorInput(tensor=codec.encode(array))

        sid = session.session_id
        cross_entropy = pb.Loss(function=pb.LOSS_FUNCTION_CROSS_ENTROPY, labels=tensor(classes))
        stepped = twice(stub.TrainStep, pb.TrainStepRequest(session_id=sid, input=tensor(x), loss=cross_entropy))
        forward = twice(stub.Forward, pb.ForwardRequest(session_id=sid, input=tensor(x)))
        twice(stub.Backward, pb.BackwardRequest(session_id=sid, forward_id=forward.forward_id, loss=cross_entropy, step=True))
        twice(stub.Step, pb.StepRequest(session_id=sid))
        frozen = twice(stub.FreezeLayers, pb.FreezeLayersRequest(session_id=sid, patterns=["layer1"]))
        twice(stub.ReplaceHead, pb.ReplaceHeadRequest(session_id=sid, num_classes=10, seed=1))
        twice(stub.ConfigureOptimizer, pb.ConfigureOptimizerRequest(session_id=sid, optimizer=pb.OptimizerConfig(
            kind=pb.OPTIMIZER_KIND_SGD, lr=0.05)))
        twice(stub.ZeroGrad, pb.ZeroGradRequest(session_id=sid))
        assert session.info().step_count == 4  # each step ran once
    events = reader.rest()
    assert_follows(events)  # before the Ray cluster's automatic checkpoints are left out: they are numbered too
    events = trained(events)
    assert [e.kind for e in events] == ["step", "step", "step", "freeze", "head", "optimizer", "end"]
    assert [step_of(e).step_count for e in events[:3]] == [2, 3, 4]
    assert step_of(events[0]).loss == stepped.loss
    assert events[3].detail == FreezeEvent(["layer1"], False, len(frozen.changed), len(frozen.trainable), frozen.frozen_count)
    assert len(frozen.changed) > 0  # the first FreezeLayers froze them; its repeat's answer says the same
    local.train()
    expected = F.cross_entropy(local(torch.from_numpy(x)), torch.from_numpy(classes))
    assert stepped.loss == pytest.approx(expected.item(), rel=1e-5)


def test_a_late_watcher_sees_where_the_run_is(client: TrainerClient) -> None:
    """A watch begun after 20 steps first gets the latest 16 (``recent``; fewer when asked, none
    with 0), marked recent, then the next step as it happens; more than 16 is refused."""
    x, classes = rand(1, 3, 64, 64), np.array([5])
    with client.create_session(WEIGHTS_NAME) as session:
        losses = [session.train_step(x, "cross_entropy", classes).loss for _ in range(20)]
        readers = {recent: Reader(session.watch(recent=recent, timeout=WATCH_SECONDS)) for recent in (None, 3)}
        latest = {recent: [reader.next() for _ in range(16 if recent is None else 3)] for recent, reader in readers.items()}
        zero = Reader(session.watch(recent=0, timeout=WATCH_SECONDS))
        with pytest.raises(InvalidArgumentError) as refused:
            next(iter(session.watch(recent=17)))
        assert refused.value.reason == "BAD_RECENT"
        # The zero watcher is in place once the server has it: a step then reaches it live.
        live = session.train_step(x, "cross_entropy", classes).loss
    for recent, events in latest.items():
        assert all(e.recent and not e.missed for e in events)
        steps = [step_of(e) for e in trained(events)]
        first = 20 - len(steps) + 1
        assert [(s.step_count, s.loss) for s in steps] == list(zip(range(first, 21), losses[first - 1:]))
        rest = trained(readers[recent].rest())
        assert (step_of(rest[0]).step_count, step_of(rest[0]).loss, rest[0].recent) == (21, live, False)
        assert_ended(rest, "session_closed")
    rest = trained(zero.rest())
    assert [e.kind for e in rest] in (["step", "end"], ["end"])  # the step, when the watch was in place before it
    assert_ended(rest, "session_closed")


def test_two_watchers_one_per_sdk_face_get_the_same_events(client: TrainerClient, target: str) -> None:
    x, classes = rand(2, 3, 32, 32), np.array([1, 2])
    with client.create_session(WEIGHTS_NAME) as session:
        session.train_step(x, "cross_entropy", classes)
        in_place = threading.Event()
        seen: list[SessionEvent] = []

        async def watch() -> None:
            async with AsyncTrainerClient(target) as aclient:
                async for event in aclient.session(session.session_id).watch(recent=1, timeout=WATCH_SECONDS):
                    seen.append(event)
                    in_place.set()

        watcher = threading.Thread(target=asyncio.run, args=(watch(),))
        watcher.start()
        reader = Reader(session.watch(recent=1, timeout=WATCH_SECONDS))
        first = reader.next()
        assert in_place.wait(60)
        results = [session.train_step(x, "cross_entropy", classes, grad_norm=True) for _ in range(3)]
    events = [first, *reader.rest()]
    watcher.join(60)
    assert seen == events
    events = trained(events)
    assert [(step_of(e).step_count, step_of(e).loss, step_of(e).grad_norm) for e in events[1:4]] == \
        [(r.step_count, r.loss, r.grad_norm) for r in results]
    assert_ended(events, "session_closed")


def test_a_watcher_that_never_reads_never_slows_training_and_is_told_what_it_missed(client: TrainerClient, target: str) -> None:
    """A watcher whose client takes in little and reads nothing: training goes on, every call
    answered; the events past its buffer (watch_buffer_events) and the HTTP/2 windows are dropped,
    and when it reads at last the next event says how many it missed, none lost unsaid."""
    calls = 2 * Settings().watch_buffer_events + 300
    with TrainerClient(target, options=SMALL_WINDOWS) as slow:
        with client.create_session(WEIGHTS_NAME) as session:
            session.step()
            events = iter(slow.session(session.session_id).watch(recent=1, timeout=WATCH_SECONDS))
            assert step_of(next(events)).step_count == 1  # in place; from here it reads nothing
            for count in range(2, calls + 2):
                assert session.step(timeout=30) == count  # never held up by the watcher (30 s would fail it)
        rest = list(events)
    assert_ended(rest, "session_closed")
    steps = [step_of(e).step_count for e in rest[:-1]]
    assert steps == sorted(steps) and steps[-1] == calls + 1  # the newest kept, the oldest dropped
    assert sum(e.missed for e in rest) + len(steps) == calls  # every step either came or was counted missed
    assert any(e.missed for e in rest), "the buffer never overflowed: the test did not test"
    gaps = [(e.missed, step_of(e).step_count - before) for e, before in zip(rest[1:-1], steps)]
    assert all(missed == jump - 1 for missed, jump in gaps)  # each count is the gap just before its event


# -- a server of their own: tokens, limits, checkpoints, expiry, stopping ---------------------------------

TOKENS = {"alice": "tok-alice", "bob": "tok-bob"}
MAX_WATCHERS, PER_SESSION, CHECKPOINT_EVERY, IDLE_SECONDS = 3, 2, 2, 600.0


@pytest.fixture(scope="module")
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="module")
def watch_server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory, clock: FakeClock) -> Iterator[TrainerServer]:
    """Tokens, a checkpoint directory (automatic every 2 steps), watcher limits of 3 and 2 a session,
    one worker thread, and the store's clock moved by the test."""
    settings = Settings(
        port=0, weights=str(data_dir / WEIGHTS_NAME), data_dir=str(data_dir),
        tokens=",".join(f"{name}:{token}" for name, token in TOKENS.items()),
        checkpoint_dir=str(tmp_path_factory.mktemp("checkpoints")), checkpoint_every=CHECKPOINT_EVERY,
        max_watchers=MAX_WATCHERS, max_watchers_per_session=PER_SESSION, max_workers=1, session_idle_seconds=IDLE_SECONDS,
    )
    running = create_server(settings, clock=clock)
    yield running
    running.stop(None).wait()


def connect(server: TrainerServer, who: str | None) -> TrainerClient:
    return TrainerClient(f"localhost:{server.port}", timeout=120, token=TOKENS[who] if who else None)


def test_only_the_sessions_owner_may_watch_it(watch_server: TrainerServer) -> None:
    """Bob cannot watch Alice's session: NOT_FOUND, word for word what DescribeSession tells him;
    no token: UNAUTHENTICATED. The default session anyone may watch (a reset shows)."""
    with connect(watch_server, "alice") as alice, connect(watch_server, "bob") as bob, connect(watch_server, None) as nobody:
        with alice.create_session(WEIGHTS_NAME) as mine:
            theirs = bob.session(mine.session_id)
            with pytest.raises(NotFoundError) as described:
                theirs.info()
            with pytest.raises(NotFoundError) as watched:
                next(iter(theirs.watch(timeout=REFUSED_SECONDS)))
            assert (watched.value.reason, watched.value.message) == (described.value.reason, described.value.message)
            assert watched.value.reason == "SESSION_NOT_FOUND"
            with pytest.raises(NotFoundError):
                next(iter(alice.session("f" * 32).watch(timeout=REFUSED_SECONDS)))
            with pytest.raises(UnauthenticatedError):
                next(iter(nobody.session(mine.session_id).watch(timeout=REFUSED_SECONDS)))
            alice.session().step()
            default = Reader(bob.session().watch(recent=1, timeout=5))  # ends by itself: the default session never closes
            assert step_of(default.next()).step_count == 1  # in place
            alice.session().reset()
            assert [e.detail for e in default.rest()] == [ResetEvent()]


def test_watchers_are_bounded_and_hold_no_worker(watch_server: TrainerServer) -> None:
    """Two watchers a session and three in all, past which RESOURCE_EXHAUSTED says which limit; the
    server's one worker thread still trains while three watches wait."""
    with connect(watch_server, "alice") as alice:  # the channel outlives the watches: closing it would cancel them
        a, b = alice.create_session(WEIGHTS_NAME), alice.create_session(WEIGHTS_NAME)
        a.step()
        b.step()
        on_a = [Reader(a.watch(recent=1, timeout=WATCH_SECONDS)) for _ in range(PER_SESSION)]
        for reader in on_a:
            assert step_of(reader.next()).step_count == 1  # each in place
        with pytest.raises(ResourceExhaustedError) as per_session:
            next(iter(a.watch(timeout=REFUSED_SECONDS)))
        assert per_session.value.reason == "TOO_MANY_SESSION_WATCHERS" and "max_watchers_per_session=2" in per_session.value.message
        on_b = Reader(b.watch(recent=1, timeout=WATCH_SECONDS))
        assert step_of(on_b.next()).step_count == 1
        with pytest.raises(ResourceExhaustedError) as in_all:
            next(iter(b.watch(timeout=REFUSED_SECONDS)))
        assert in_all.value.reason == "TOO_MANY_WATCHERS" and "max_watchers=3" in in_all.value.message
        result = a.train_step(rand(1, 3, 64, 64), "cross_entropy", np.array([7]), timeout=60)  # the one worker is free
        b.close()
        a.close()
        for reader in on_a:
            events = reader.rest()
            assert step_of(events[0]).loss == result.loss
            assert_ended(events, "session_closed")
        assert_ended(on_b.rest(), "session_closed")
    assert watch_server.servicer.watchers.watching() == 0  # each gone before its stream's status was sent


def test_checkpoints_and_expiry_end_to_end(watch_server: TrainerServer, clock: FakeClock) -> None:
    """A checkpoint written by a call and one written automatically (every 2 steps), one loaded (the
    steps after it at the checkpoint's learning rate, not the one set since), then the session
    expires: its watch ends saying so."""
    with connect(watch_server, "alice") as alice:
        session = alice.create_session(WEIGHTS_NAME)
        session.step()
        reader = Reader(session.watch(recent=1, timeout=WATCH_SECONDS))
        reader.next()
        saved = session.save_checkpoint("watched.ckpt")
        session.configure_optimizer(lr=0.2)
        session.step()  # step 2: the automatic checkpoint
        loaded = session.load_checkpoint("watched.ckpt")  # step 1 again, and lr 0.01
        session.step()
        clock.now += IDLE_SECONDS + 1
        watch_server.servicer.forget_sessions(watch_server.store.expire_idle())
        events = reader.rest()
    assert [e.kind for e in events] == ["checkpoint_saved", "optimizer", "step", "checkpoint_saved", "checkpoint_loaded",
                                        "step", "checkpoint_saved", "end"]
    assert [(step_of(e).step_count, step_of(e).learning_rate) for e in events if e.kind == "step"] == [(2, 0.2), (2, 0.01)]
    written, _, _, automatic, back, _, _, _ = [e.detail for e in events]
    assert isinstance(written, CheckpointEvent) and (written.name, written.step_count, written.automatic) == ("watched.ckpt", saved, False)
    assert written.size_bytes > 40_000_000
    assert isinstance(automatic, CheckpointEvent) and automatic.automatic
    assert (automatic.name, automatic.step_count) == (f"auto-{session.session_id}.ckpt", CHECKPOINT_EVERY)
    assert back == CheckpointEvent("watched.ckpt", loaded.step_count, 0, False) and loaded.step_count == 1
    assert_ended(events, "session_expired")


def test_a_repeated_load_or_reset_is_told_to_watchers_once(watch_server: TrainerServer) -> None:
    """LoadCheckpoint and ResetSession (the default session's), each sent twice with the same
    operation number: the repeat is answered with the first answer and watchers hear of it once.
    The calls of test_a_repeated_call_is_answered_and_told_to_watchers_once that need a checkpoint
    directory and the default session."""
    with connect(watch_server, "alice") as alice:
        def twice(method: Any, request: Any, number: int) -> Any:
            request.operation.number = number
            first = alice.call(method, request)
            assert alice.call(method, request) == first
            return first

        with alice.create_session(WEIGHTS_NAME) as session:
            session.step()
            reader = Reader(session.watch(recent=1, timeout=WATCH_SECONDS))
            reader.next()  # in place
            session.save_checkpoint("repeated.ckpt")
            session.step()  # step 2, and its automatic checkpoint
            loaded = twice(alice.stub.LoadCheckpoint, pb.LoadCheckpointRequest(session_id=session.session_id, name="repeated.ckpt"),
                           session.info().next_operation)
            assert loaded.session.step_count == session.info().step_count == 1
        events = reader.rest()
        assert [e.kind for e in events] == ["checkpoint_saved", "step", "checkpoint_saved", "checkpoint_loaded", "end"]
        assert events[3].detail == CheckpointEvent("repeated.ckpt", 1, 0, False)

        default = alice.session()
        default.step()
        watch = Reader(default.watch(recent=1, timeout=WATCH_SECONDS))
        watch.next()  # in place
        number = default.info().next_operation
        twice(alice.stub.ResetSession, pb.ResetSessionRequest(), number)
        # Then a step, numbered after the reset (this client's SDK numbers the session no more: the
        # stub's calls took numbers it does not know of).
        alice.call(alice.stub.Step, pb.StepRequest(operation=pb.Operation(number=number + 1)))
        assert watch.next().detail == ResetEvent()
        assert step_of(watch.next()).step_count == 1  # the step came next: no second reset between


def test_a_stopping_server_ends_every_watch_at_once() -> None:
    """Stopping with 60 s of grace: the watch gets its last event (server_stopping) and the server
    is down in far less than the grace (the watch did not hold it)."""
    running = create_server(Settings(port=0, weights="random"))
    with TrainerClient(f"localhost:{running.port}", timeout=60) as client:
        client.session().step()
        reader = Reader(client.session().watch(recent=1, timeout=WATCH_SECONDS))
        reader.next()
        started = time.monotonic()
        assert running.stop(60).wait(30)
        assert time.monotonic() - started < 30
        assert_ended(reader.rest(), "server_stopping")


# -- the command line and grpcurl ---------------------------------------------------------------------


class Terminal:
    """A command run in a pseudo-terminal (its stdout is a TTY), its output read as it comes."""

    def __init__(self, *args: str) -> None:
        master, slave = pty.openpty()
        self.process = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        self.master = master
        self.output = b""

    def read_until(self, pattern: str, timeout: float) -> re.Match[str] | None:
        """Reads until ``pattern`` shows in the output (decoded), or ``timeout`` seconds pass."""
        give_up = time.monotonic() + timeout
        while (found := re.search(pattern, self.output.decode(errors="replace"))) is None and time.monotonic() < give_up:
            ready, _, _ = select.select([self.master], [], [], max(0.0, give_up - time.monotonic()))
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # the command ended and its side of the terminal closed
                    break
                if not chunk:
                    break
                self.output += chunk
        return found

    def close(self) -> None:
        """Waits for the command to end (killed after 30 s)."""
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.master)


def test_the_cli_draws_each_step_live_in_a_terminal(client: TrainerClient, target: str) -> None:
    """``trainer-client watch SESSION`` in a pseudo-terminal: the live view shows each step's loss
    as the SDK got it, within a second of the call's answer, with samples a second and a sparkline;
    the close ends it (exit 0)."""
    x, classes = rand(2, 3, 32, 32), np.array([4, 2])
    with client.create_session(WEIGHTS_NAME) as session:
        first = session.train_step(x, "cross_entropy", classes, grad_norm=True)
        terminal = Terminal(str(CLI), "--target", target, "watch", session.session_id)
        try:
            assert terminal.read_until(r"step 1  loss \S+", 60), terminal.output  # the recent step: the watch is in place
            late = []
            for count in range(2, 6):
                result = session.train_step(x, "cross_entropy", classes, grad_norm=True)
                answered = time.monotonic()
                shown = terminal.read_until(rf"step {count}  loss (\S+)  grad_norm \S+  lr 0\.01  [\d.]+ samples/s", 30)
                late.append(time.monotonic() - answered)
                assert shown, terminal.output.decode(errors="replace")
                assert shown.group(1) == f"{result.loss:.6g}"  # the loss the SDK got
            assert max(late) < 1.0, late
        finally:
            session.close()
            ended = terminal.read_until(r"watched for [\d.]+ s", 30)
            terminal.close()
    text = terminal.output.decode()
    assert ended and terminal.process.returncode == 0, text
    assert f"step 1  loss {first.loss:.6g}" in text and "end: session closed" in text
    assert re.search(r"loss [▁▂▃▄▅▆▇█]{5}  ", text), text  # the sparkline of five losses
    assert "\x1b[2F\x1b[J" in text  # redrawn in place


def test_the_cli_prints_a_line_or_a_json_object_an_event_when_not_a_terminal(client: TrainerClient, target: str) -> None:
    with client.create_session(WEIGHTS_NAME) as session:
        result = session.train_step(rand(2, 3, 32, 32), "cross_entropy", np.array([4, 2]), grad_norm=True)
        session.freeze("fc")
        runs = {how: subprocess.Popen([str(CLI), "--target", target, *how, "watch", session.session_id, "--recent", "2"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for how in ((), ("--json",))}
        lines = {how: [run.stdout.readline() for _ in range(2)] for how, run in runs.items() if run.stdout is not None}
    for how, run in runs.items():
        out, err = run.communicate(timeout=60)
        assert run.returncode == 0, err
        lines[how].extend(out.splitlines(keepends=True))
    plain = lines[()]
    assert plain[0].startswith(f"step 1  loss {result.loss:.6g}  grad_norm ") and plain[0].rstrip().endswith("(recent)")
    assert plain[1:] == ["freeze fc: 2 changed, 60 trainable, 2 frozen  (recent)\n", "end: session closed\n"]
    events = [json.loads(line) for line in lines[("--json",)]]
    assert [e["kind"] for e in events] == ["step", "freeze", "end"]
    assert events[0]["step"]["loss"] == result.loss and events[0]["step"]["grad_norm"] == result.grad_norm
    assert events[2]["end"] == {"reason": "session_closed"}


GRPCURL_BLOCK = re.compile(r"<!-- grpcurl: watch -->\n```sh\n(.*?)```", re.S)


def test_the_grpcurl_recipe_of_the_docs_runs_as_written() -> None:
    """docs/watch.md's grpcurl block, run verbatim with the real grpcurl against a fresh server whose
    default session trained three steps: the three latest events, then grpcurl's own deadline."""
    (block,) = GRPCURL_BLOCK.findall((ROOT / "docs" / "watch.md").read_text())
    grpcurl = grpcurl_path()
    running = create_server(Settings(port=0, weights="random"))
    try:
        with TrainerClient(f"localhost:{running.port}", timeout=60) as client:
            losses = [client.session().train_step(rand(1, 3, 64, 64), "cross_entropy", np.array([9]), grad_norm=True)
                      for _ in range(3)]
        env = dict(os.environ, PATH=os.pathsep.join([str(Path(grpcurl).parent), os.environ.get("PATH", "")]))
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block.strip().replace("localhost:50051", f"localhost:{running.port}")],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)
    finally:
        running.stop(None).wait()
    events: list[dict[str, Any]] = json_messages(done.stdout)
    assert [(e["sequence"], e["step"]["step_count"], e["step"]["loss"], e["recent"]) for e in events] == \
        [(str(r.step_count), str(r.step_count), r.loss, True) for r in losses]
    assert done.returncode == 64 + 4 and "Code: DeadlineExceeded" in done.stderr, done.stderr  # -max-time: 64 + the status code
