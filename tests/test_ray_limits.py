"""The Ray backend's limits on a small real cluster: deadlines, abandoned calls, expiry, SIGTERM.

A head with no CPUs and one worker node with room for two sessions (the custom resource
``session_slot``: the default session and one more), on 127.0.0.1; two front-ends started as users
start them. Front-end B (started by the tests that need it) expires idle sessions and pending graphs
after ``EXPIRY`` seconds and has a short SIGTERM grace.

Proven here: a CreateSession that finds no room answers RESOURCE_EXHAUSTED NO_RESOURCES_FOR_SESSION
within its own deadline, saying what is free; a Forward abandoned after it ran keeps nothing (no
pending forward, BatchNorm statistics as they were); a Step whose deadline passed while it waited
behind another front-end's call is not taken; expiry leaves a session busy with another front-end's
call alone (and the graph of a forward that just ended); SIGTERM stops a front-end within its grace
while its call waits on an actor that does not answer; ``--memory-budget-bytes`` holds for the whole
cluster as on the local backend, for a new session and for a session's new head or checkpoint
(one test body for both backends each, in tests/test_hardening.py). The local
backend's twins of the abandoned calls: tests/test_aio.py and tests/test_reliability.py.
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep Ray on 127.0.0.1 (read when ray is imported)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from remote_trainer.client import Session, TrainerClient, TrainerError  # noqa: E402
from tests.conftest import WEIGHTS_NAME, rand  # noqa: E402
from tests.test_hardening import (  # noqa: E402
    ONE_MORE_SESSION, check_a_budget_for_one_session, check_a_session_counts_as_a_fresh_one_of_its_shape,
)
from tests.test_server_process import ROOT, start, stop  # noqa: E402

cluster_utils = pytest.importorskip("ray.cluster_utils")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NODE = dict(node_ip_address="127.0.0.1", object_store_memory=200 * 2**20, include_dashboard=False, num_gpus=0)
SESSION_CPUS = torch.get_num_threads()
EXPIRY = 1.5  # front-end B's --session-idle-seconds and --pending-graph-seconds
# A training-mode forward that takes the session's actor well over EXPIRY seconds (and over the
# 1 s deadlines below) on a 2-core machine.
LONGER = (64, 3, 224, 224)  # ~1.8 s on an idle 2-core machine: well past a 1 s deadline once it runs


class FrontEnd:
    """A trainer-server process on the cluster, whose log lines a test can wait for."""

    def __init__(self, args: list[str]) -> None:
        self._lines: list[str] = []
        self._said = threading.Condition()
        self.process, self.port, _ = start(*args, on_line=self._heard)

    def _heard(self, line: str) -> None:
        with self._said:
            self._lines.append(line)
            self._said.notify_all()

    def wait_for(self, pattern: str, timeout: float = 120) -> str:
        """The first log line (from now on) that matches ``pattern``."""
        with self._said:
            seen = len(self._lines)
            found: list[str] = []

            def matched() -> bool:
                found.extend(line for line in self._lines[seen:] if re.search(pattern, line))
                return bool(found)

            assert self._said.wait_for(matched, timeout), f"no log line matching {pattern!r}"
            return found[0]

    def lines(self) -> list[str]:
        with self._said:
            return list(self._lines)

    def connect(self) -> TrainerClient:
        return TrainerClient(f"localhost:{self.port}", timeout=120)

    def stop(self) -> None:
        stop(self.process)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    ray_cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={**NODE, "num_cpus": 0})
    try:
        ray_cluster.add_node(**NODE, num_cpus=2 * SESSION_CPUS, resources={"session_slot": 2})
        ray_cluster.wait_for_nodes()
        yield ray_cluster
    finally:
        ray_cluster.shutdown()


def front_end_args(cluster: Any, data_dir: Path, *extra: str) -> list[str]:
    return [
        "--backend", "ray", "--ray-address", cluster.address, "--ray-namespace", "ray-limits-test", "--log-level", "DEBUG",
        "--weights", str(data_dir / WEIGHTS_NAME), "--data-dir", str(data_dir),
        "--ray-num-cpus", str(SESSION_CPUS), "--ray-resources", "session_slot=1", "--ray-timeout", "120", *extra,
    ]


@pytest.fixture(scope="module")
def a(cluster: Any, data_dir: Path) -> Iterator[FrontEnd]:
    front_end = FrontEnd(front_end_args(cluster, data_dir))
    yield front_end
    front_end.stop()


@pytest.fixture(scope="module")
def b(cluster: Any, data_dir: Path, a: FrontEnd) -> Iterator[FrontEnd]:
    """The second front-end, with expiry on: started after the tests that keep a session idle."""
    front_end = FrontEnd(front_end_args(cluster, data_dir, "--session-idle-seconds", str(EXPIRY),
                                        "--pending-graph-seconds", str(EXPIRY), "--grace-seconds", "1"))
    yield front_end
    front_end.stop()


def expect(code: grpc.StatusCode, call: Any, *args: Any, **kwargs: Any) -> TrainerError:
    with pytest.raises(TrainerError) as err:
        call(*args, **kwargs)
    assert err.value.code == code, err.value
    return err.value


def test_a_create_without_room_is_refused_within_its_deadline(a: FrontEnd) -> None:
    """The node holds the default session and one more: a second create answers before its 5 s
    deadline (not after --ray-timeout), naming what it asks for and what is free."""
    with a.connect() as client, client.create_session(WEIGHTS_NAME):
        started = time.monotonic()
        err = expect(grpc.StatusCode.RESOURCE_EXHAUSTED, client.create_session, WEIGHTS_NAME, timeout=5)
        assert time.monotonic() - started < 5
        assert err.reason == "NO_RESOURCES_FOR_SESSION", err
        assert "session_slot 1" in err.message and "session_slot 0" in err.message, err.message
        assert err.metadata.get("free_session_slot") == "0"
    with a.connect() as client:  # the refused create left nothing behind: there is room again
        client.create_session(WEIGHTS_NAME).close()


def test_a_forward_abandoned_after_it_ran_changes_nothing(a: FrontEnd) -> None:
    with a.connect() as client, client.create_session(WEIGHTS_NAME) as session:
        before = session.parameters(include_buffers=True)
        expect(grpc.StatusCode.DEADLINE_EXCEEDED, session.forward, rand(*LONGER), stats_only=True, timeout=1)
        info = session.info()  # runs once the abandoned forward is done: the actor runs one call at a time
        assert (info.pending_forward_id, info.step_count) == (0, 0)
        after = session.parameters(include_buffers=True)
        for name in before:  # BatchNorm's running statistics included
            np.testing.assert_array_equal(after[name].array, before[name].array, err_msg=name)
        assert session.forward(rand(2, 3, 32, 32)).forward_id == 1  # the abandoned one was not counted


def long_forward(front_end: FrontEnd, session: Session) -> tuple[threading.Thread, list[Any]]:
    """A long training forward on ``session`` through ``front_end``, running once this returns."""
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(session.forward(rand(*LONGER), stats_only=True)))
    thread.start()
    front_end.wait_for(f"rpc=Forward session={session.session_id} running")
    return thread, results


def test_expiry_spares_a_session_busy_with_another_front_ends_call(a: FrontEnd, b: FrontEnd) -> None:
    """B expires sessions idle EXPIRY s and graphs unused EXPIRY s; a forward through A lasting
    longer neither loses its session midway nor its graph when it ends."""
    with a.connect() as client, client.create_session(WEIGHTS_NAME) as session:
        thread, results = long_forward(a, session)
        thread.join(120)
        assert results, "the forward failed (its session expired while it ran?)"
        session.backward("sum", rand(LONGER[0], 1000))  # its graph was kept
        assert session.step() == 1


def session_actors(cluster: Any) -> list[int]:
    """The pids of the session actors' processes on the cluster's worker node (children of its raylet)."""
    (worker,) = [node for node in cluster.list_all_nodes() if not node.head]
    raylet = worker.all_processes["raylet"][0].process.pid
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                title = (entry / "cmdline").read_bytes().decode(errors="replace")
            except (OSError, IndexError, ValueError):
                continue
            if parent == raylet and "SessionActor" in title:
                found.append(int(entry.name))
    return found


def test_sigterm_stops_a_front_end_within_its_grace_while_a_call_waits_on_an_actor(
    cluster: Any, a: FrontEnd, b: FrontEnd
) -> None:
    """Runs last: it stops B. The session actors are stopped (SIGSTOP), so B's call never gets an
    answer; B, told SIGTERM with a 1 s grace, still exits within seconds, not --ray-timeout."""
    with a.connect() as client, client.create_session(WEIGHTS_NAME) as session:
        actors = session_actors(cluster)
        assert actors
        for pid in actors:
            os.kill(pid, signal.SIGSTOP)
        try:
            with b.connect() as client_b:
                failed: list[TrainerError] = []

                def ask() -> None:
                    try:
                        client_b.session(session.session_id).info(timeout=60)
                    except TrainerError as exc:  # whatever the stopping server answered
                        failed.append(exc)

                threading.Thread(target=ask, daemon=True).start()
                b.wait_for(f"rpc=DescribeSession session={session.session_id} running")
                stopped = time.monotonic()
                b.process.send_signal(signal.SIGTERM)
                assert b.process.wait(timeout=30) == 0, "".join(b.lines()[-30:])
                assert time.monotonic() - stopped < 6
        finally:
            for pid in actors:
                os.kill(pid, signal.SIGCONT)
        assert session.info().step_count == 0  # the session goes on


@pytest.fixture(scope="module")
def budgeted(cluster: Any, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FrontEnd, list[str]]]:
    """A front-end of a namespace of its own with ``--memory-budget-bytes ONE_MORE_SESSION`` (its
    sessions reserve no CPU nor slot, so they fit beside A's), and its arguments, the budget last.
    Started by the budget tests, which run after B is stopped: once it ran, a create on A was
    refused for want of 0.25 CPU (a CI run; not seen when run alone)."""
    args = front_end_args(cluster, data_dir, "--ray-namespace", "ray-budget-test", "--ray-num-cpus", "0",
                          "--ray-resources", "", "--checkpoint-dir", str(tmp_path_factory.mktemp("checkpoints")),
                          "--memory-budget-bytes", str(ONE_MORE_SESSION))
    front_end = FrontEnd(args)
    yield front_end, args
    front_end.stop()


def test_the_memory_budget_holds_for_the_whole_cluster(budgeted: tuple[FrontEnd, list[str]]) -> None:
    """The local backend's budget test (tests/test_hardening.py), on Ray: the second session is
    refused with the local backend's reason and message, and closing the first makes room. The
    budget is the registry's: a front-end started with another one refuses to start."""
    front_end, args = budgeted
    with front_end.connect() as client:
        check_a_budget_for_one_session(client)
    other = subprocess.run([sys.executable, "-m", "remote_trainer.server", "--port", "0", *args[:-1], "0"],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert other.returncode == 2, other.stderr[-2000:]
    assert f"the Ray namespace 'ray-budget-test' already has memory-budget-bytes={ONE_MORE_SESSION}" in other.stderr


def test_a_new_head_or_checkpoint_is_counted_by_the_registry(budgeted: tuple[FrontEnd, list[str]]) -> None:
    """The local backend's test of ReplaceHead and LoadCheckpoint against the budget
    (tests/test_hardening.py), on Ray: each session's actor checks a new model state against the
    whole cluster's budget and the registry recounts it."""
    front_end, _ = budgeted
    with front_end.connect() as client:
        check_a_session_counts_as_a_fresh_one_of_its_shape(client)
