"""The Ray backend when its own parts die: the registry, a front-end mid-CreateSession, the default
session, every front-end of a session. A one-node Ray cluster of its own (``ray.cluster_utils``, on
127.0.0.1), real front-end processes, and this test process joined to the cluster as a driver, to
kill actors as a fault would (``ray.kill``) and to see which actors are left.

Proven here: a killed registry restarts with its table (sessions reachable, limits held); a session
whose front-ends are all gone ends itself; an actor whose front-end died before committing it is
killed by the next front-end's housekeeping; a lost default session comes back fresh for the call
that needs it, and a lost session is listed as lost; a front-end that a token-authenticated cluster
refuses stops at once, saying why; a server with no ``--ray-address`` starts a Ray of its own even
while this cluster is the machine's latest and named by ``RAY_ADDRESS``. Select with ``-m ray``.
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray is imported (see test_ray_backend.py)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import re  # noqa: E402
import select  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from remote_trainer.engine import portable  # noqa: E402
from remote_trainer.client import TrainerClient, TrainerError  # noqa: E402
from tests.test_ray_backend import NODE, expect_error  # noqa: E402
from remote_trainer.server.settings import LOCAL_RAY_NAMESPACE  # noqa: E402
from tests.test_server_process import ROOT, start, stop  # noqa: E402

cluster_utils = pytest.importorskip("ray.cluster_utils")
ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NAMESPACE = "registry-test"
TOKENS = "alice:tok-alice,bob:tok-bob,carol:tok-carol"


class Watched:
    """A front-end process whose log lines a test can wait for."""

    def __init__(self, address: str, *extra: str, on_line: Any = None) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._on_line = on_line

        def seen(line: str) -> None:
            if self._on_line is not None:
                self._on_line(line)
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

        self.process, self.port, _ = start(
            "--backend", "ray", "--ray-address", address, "--ray-namespace", NAMESPACE, "--weights", "random",
            "--tokens", TOKENS, *extra, on_line=seen,
        )

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        compiled = re.compile(pattern)

        def first() -> re.Match[str] | None:
            return next((m for m in map(compiled.search, self.lines) if m), None)

        with self._changed:
            found = self._changed.wait_for(first, timeout)
        assert found, f"no log line {pattern!r} within {timeout} s: {self.lines[-5:]}"
        return found

    def connect(self, token: str) -> TrainerClient:
        return TrainerClient(f"localhost:{self.port}", token=token, timeout=120)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={**NODE, "num_cpus": 8})
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def front_end(cluster: Any) -> Iterator[Watched]:
    """The deployment's long-lived front-end: no idle expiry (so what expires, expires by itself);
    its housekeeping runs every second (pending graphs of 4 s)."""
    watched = Watched(cluster.address, "--max-sessions", "3", "--max-sessions-per-token", "1", "--pending-graph-seconds", "4")
    try:
        yield watched
    finally:
        watched.kill()


def actor(session_id: str) -> Any:
    return ray.get_actor(f"session-{session_id}", namespace=NAMESPACE)


def pid_of(handle: Any) -> int:
    """The process id of an actor's worker (all on this machine)."""
    pid: int = ray.get(handle.__ray_call__.remote(lambda self: os.getpid()))
    return pid


def wait_for_exit(pid: int, timeout: float = 60) -> None:
    """Waits (on the process, no polling) until the actor's worker process has ended."""
    fd = os.pidfd_open(pid)
    try:
        assert select.select([fd], [], [], timeout)[0], f"actor process {pid} still runs after {timeout} s"
    finally:
        os.close(fd)


def test_a_killed_registry_restarts_with_its_table(front_end: Watched) -> None:
    with front_end.connect("tok-alice") as alice, front_end.connect("tok-bob") as bob, front_end.connect("tok-carol") as carol:
        mine, theirs = alice.create_session(), bob.create_session()  # with the default session: 3, the limit
        ray.kill(ray.get_actor("session-registry", namespace=NAMESPACE), no_restart=False)
        # Calls that need the registry wait while it restarts, then find what it knew.
        assert [info.session_id for info in alice.list_sessions()] == ["default", mine.session_id]
        assert mine.info().step_count == 0
        expect_error(carol.create_session, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_SESSIONS")
        theirs.close()
        expect_error(alice.create_session, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_SESSIONS_FOR_TOKEN")
        carol.create_session().close()
        mine.close()


def test_a_lost_default_session_comes_back_and_a_lost_session_is_listed(front_end: Watched) -> None:
    with front_end.connect("tok-alice") as alice, front_end.connect("tok-bob") as bob:
        mine = alice.create_session()
        bob.session().forward(np.zeros((2, 3, 32, 32), np.float32))  # the default session has a pending forward
        for handle in (actor("default"), actor(mine.session_id)):
            pid = pid_of(handle)
            ray.kill(handle)
            wait_for_exit(pid)
        listed = {info.session_id: info for info in alice.list_sessions()}
        assert set(listed) == {"default", mine.session_id}
        assert listed[mine.session_id].device.startswith("lost"), listed[mine.session_id]
        assert listed["default"].pending_forward_id == 0 and "ray node" in listed["default"].device  # fresh
        # Lost again: the ResetSession that finds it lost makes it again (the SDK retries SESSION_RESTARTED).
        pid = pid_of(actor("default"))
        ray.kill(actor("default"))
        wait_for_exit(pid)
        assert alice.session().reset().step_count == 0
        expect_error(mine.info, grpc.StatusCode.UNAVAILABLE, "SESSION_LOST")
        mine.close()


def test_a_call_that_reaches_its_actor_after_its_deadline_is_not_run(front_end: Watched) -> None:
    """A Step that waited for its session's actor past its caller's deadline (behind another
    front-end's long call) must not be taken. The deadline crosses to the actor as plain data
    (wall-clock ``until``): sent here with one already passed, the Step is refused (Abandoned) and
    the step count stays; the same Step with time left runs. Once, a Step so late was taken."""
    with front_end.connect("tok-carol") as carol, carol.create_session() as session:
        session.forward(np.zeros((2, 3, 32, 32), np.float32))
        session.backward("sum", np.ones((2, 1000), np.float32))
        handle = actor(session.session_id)
        with pytest.raises(ray.exceptions.RayTaskError, match="was not run: its caller stopped waiting"):
            ray.get(handle.call.remote(portable.seal(("step", (), {}, time.time() - 1))))
        assert session.info().step_count == 0
        ray.get(handle.call.remote(portable.seal(("step", (), {}, time.time() + 60))))
        assert session.info().step_count == 1


def test_a_session_with_no_front_end_left_ends_itself(cluster: Any, front_end: Watched) -> None:
    """Its front-end (idle expiry 2 s) dies; the other one never expires sessions: the actor ends
    itself after 3 idle periods and tells the registry, so its owner hears "expired"."""
    short = Watched(cluster.address, "--session-idle-seconds", "2")
    with short.connect("tok-alice") as alice:
        session_id = alice.create_session().session_id
    short.kill()
    wait_for_exit(pid_of(actor(session_id)))
    with front_end.connect("tok-alice") as alice:
        expect_error(alice.session(session_id).info, grpc.StatusCode.NOT_FOUND, "SESSION_EXPIRED")


def test_an_actor_whose_front_end_died_creating_it_is_killed(cluster: Any, front_end: Watched) -> None:
    """The doomed front-end is killed once its new session's actor is up, while it builds the model:
    the reservation is never committed. Twice the front-end's ray-timeout after reserving, the other
    front-end's housekeeping drops the reservation and kills the actor, which would otherwise hold
    its CPU and process for good, unreachable."""
    reserved: list[str] = []
    seen = threading.Event()

    def on_line(line: str) -> None:
        found = re.search(r"session ([0-9a-f]{32}) reserved", line)
        if found and not seen.is_set():
            reserved.append(found.group(1))
            seen.set()

    doomed = Watched(cluster.address, "--ray-timeout", "10", on_line=on_line)
    with TrainerClient(f"localhost:{doomed.port}", token="tok-carol", timeout=10) as carol:
        creating = threading.Thread(target=lambda: pytest.raises(TrainerError, carol.create_session), daemon=True)
        creating.start()
        assert seen.wait(60)
        handle = actor(reserved[0])
        ray.get(handle.__ray_ready__.remote(), timeout=60)  # the actor is up; its model is being built
        doomed.kill()
        creating.join()
    front_end.wait_for(rf"session {reserved[0]} was never committed")
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(handle.__ray_ready__.remote(), timeout=60)


def test_a_server_without_an_address_never_joins_a_ray_already_on_the_machine(cluster: Any) -> None:
    """This cluster is the machine's latest Ray (``ray.cluster_utils`` wrote its address to Ray's temp
    dir, as ``ray start`` does) and RAY_ADDRESS names it (as a test's or a user's shell may): a server
    with no ``--ray-address`` still starts a one-node Ray of its own, so nothing of it is on this
    cluster. A bare ``ray.init()`` would join it, and the server's sessions would die with another
    test's cluster (the bench smoke's ray section failed so in full CI runs)."""
    process, port, _ = start("--backend", "ray", "--weights", "random", env={"RAY_ADDRESS": cluster.address})
    try:
        with TrainerClient(f"localhost:{port}", timeout=120) as client:
            device = client.session().info().device
        assert not any(node["NodeID"] in device for node in ray.nodes()), device
        with pytest.raises(ValueError):
            ray.get_actor("session-registry", namespace=LOCAL_RAY_NAMESPACE)
    finally:
        stop(process)


TOKEN_HEAD = """
import sys
from ray import cluster_utils
cluster = cluster_utils.Cluster(initialize_head=True, head_node_args=dict(
    node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=0, object_store_memory=100 * 2**20))
print(cluster.address, flush=True)
sys.stdin.read()  # until the test closes it
cluster.shutdown()
"""


def test_a_front_end_the_cluster_refuses_says_so_at_once() -> None:
    """A cluster with Ray's token authentication (its head started with RAY_AUTH_MODE=token and a
    token) and a front-end without the token: it stops at once with one line that says what to set,
    not after Ray's 20 s of retries and a traceback."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0123456789abcdef0123456789abcdef"}
    head = subprocess.Popen([sys.executable, "-c", TOKEN_HEAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert head.stdout is not None
        address = head.stdout.readline().strip()
        assert address, "the token-authenticated head did not start"
        without = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        started = time.monotonic()
        front_end = subprocess.run(
            [sys.executable, "-m", "remote_trainer.server", "--port", "0", "--backend", "ray", "--ray-address", address,
             "--ray-namespace", "refused", "--weights", "random"],
            capture_output=True, text=True, env=without, timeout=120, cwd=ROOT,
        )
        assert front_end.returncode == 2, front_end.stderr[-2000:]
        assert time.monotonic() - started < 15  # the process start and imports; no 20 s of retries
        # Past the start-up line every server logs (main's "starting"), one line of ours: the refusal.
        ours = [line for line in front_end.stderr.splitlines() if "remote_trainer" in line and " starting (" not in line]
        assert len(ours) == 1 and "uses token authentication" in ours[0] and "RAY_AUTH_MODE=token" in ours[0], ours
        assert "Traceback" not in front_end.stderr
    finally:
        assert head.stdin is not None
        head.stdin.close()
        head.wait(120)
