"""The Ray backend on a real multi-node Ray cluster on this machine, through real gRPC front-ends.

A head and two worker nodes (``ray.cluster_utils.Cluster``: separate raylets, object stores and
worker processes, all on 127.0.0.1, with fast health checks), and two front-ends started as users
start them (``python -m remote_trainer.server --backend ray --ray-address ...``). Sessions ask for
the custom resource ``session_slot``, which only the worker nodes have.

Proven here: the local backend's fidelity tests pass on Ray (every test of FIDELITY_MODULES that can
run against a session, each fast path included; those that cannot say why in NOT_ON_RAY, and those
that need a bare address run on the server's own Ray, tests/test_ray_own.py); sessions spread over
the nodes; a session made through one front-end is trained through the other, and survives a
front-end restart; ownership and the session limits hold across front-ends; a killed node makes its
sessions UNAVAILABLE SESSION_LOST within seconds (naming the last checkpoint), and ends their
watches saying so, while the others go on; and a session restored from that checkpoint on the
surviving node continues bit-identically.
Select with ``-m ray``. The front-end's proxy alone, without a cluster: tests/test_ray_proxy.py.
"""

from __future__ import annotations

import os

# Ray must not rewrite 127.0.0.1 to this host's routable address (it reads this when imported);
# the front-end processes inherit it. Set before anything imports ray.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import inspect  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from types import ModuleType  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from remote_trainer.client import InputTransform, Session, TrainerClient, TrainerError  # noqa: E402
from remote_trainer.contract import codec  # noqa: E402
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb  # noqa: E402
from tests import test_aio as aio  # noqa: E402
from tests import test_concurrency as concurrency  # noqa: E402
from tests import test_fast_paths as fast_paths  # noqa: E402
from tests import test_images as images  # noqa: E402
from tests import test_remote_model as remote_model  # noqa: E402
from tests import test_train_step as train_steps  # noqa: E402
from tests import test_training as training  # noqa: E402
from tests import test_training_visible as training_visible  # noqa: E402
from tests import test_transfer as transfer  # noqa: E402
from tests import test_watch as watch  # noqa: E402
from tests import test_weights as weights  # noqa: E402
from tests.conftest import WEIGHTS_NAME, assert_equal_to_local, rand  # noqa: E402
from tests.test_server_process import start, stop  # noqa: E402

cluster_utils = pytest.importorskip("ray.cluster_utils")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NODE = dict(node_ip_address="127.0.0.1", object_store_memory=200 * 2**20, include_dashboard=False, num_gpus=0)
# Nodes are declared dead after 5 missed health checks, 1 s apart (Ray's default takes about 15 s;
# fewer misses would let a node that a loaded machine starves for 3 s be declared dead).
FAST_HEALTH_CHECKS = {
    "health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000, "health_check_failure_threshold": 5,
}
TOKENS = "alice:tok-alice,bob:tok-bob,carol:tok-carol,dave:tok-dave,erin:tok-erin"
MAX_SESSIONS, MAX_PER_TOKEN, CHECKPOINT_EVERY = 6, 2, 2
CHECKPOINT_QUOTA = 2 * 2**30  # per token: far above what the other tests save
# Ray gives an actor as many torch threads as CPUs it reserves (OMP_NUM_THREADS); the sessions get
# as many as this process uses, so both sum in the same order and agree as closely as on the local
# backend (one thread against two differs by 1e-4 in conv gradients).
SESSION_CPUS = torch.get_num_threads()


@dataclass
class RayCluster:
    cluster: Any
    workers: dict[str, Any]  # name -> ray node

    def node_of(self, device: str) -> str:
        """The worker name of the node in a session's device string ("cpu @ ray node <id>")."""
        found = re.fullmatch(r"cpu @ ray node ([0-9a-f]+)", device)
        assert found, device
        names = [name for name, node in self.workers.items() if node.node_id == found.group(1)]
        assert names, f"session on node {found.group(1)}, not on a worker node"
        return names[0]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    cluster = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={**NODE, "num_cpus": 0, "_system_config": FAST_HEALTH_CHECKS},
    )
    try:
        # Logical CPUs (Ray does not enforce them): room for four sessions per node.
        workers = {name: cluster.add_node(**NODE, num_cpus=4 * SESSION_CPUS, resources={"session_slot": 4})
                   for name in ("node_a", "node_b")}
        cluster.wait_for_nodes()
        yield RayCluster(cluster, workers)
    finally:
        cluster.shutdown()  # workers, then the head: every process it started


class FrontEnd:
    """A trainer-server process on the cluster; ``restart`` starts it again with the same flags."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.process, self.port, self.log = start(*args)

    def connect(self, token: str) -> TrainerClient:
        return TrainerClient(f"localhost:{self.port}", token=token, timeout=120)  # CreateSession starts an actor

    def stop(self) -> None:
        stop(self.process)

    def restart(self) -> None:
        self.stop()
        self.process, self.port, self.log = start(*self.args)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint folder: one directory that every node sees (here, one machine's disk)."""
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def front_ends(ray_cluster: RayCluster, data_dir: Path, checkpoint_dir: Path) -> Iterator[tuple[FrontEnd, FrontEnd]]:
    args = [
        "--backend", "ray", "--ray-address", ray_cluster.cluster.address, "--ray-namespace", "ray-backend-test",
        "--weights", str(data_dir / WEIGHTS_NAME), "--data-dir", str(data_dir),
        "--checkpoint-dir", str(checkpoint_dir), "--checkpoint-every", str(CHECKPOINT_EVERY),
        "--max-checkpoint-bytes", str(CHECKPOINT_QUOTA),
        "--tokens", TOKENS, "--max-sessions", str(MAX_SESSIONS), "--max-sessions-per-token", str(MAX_PER_TOKEN),
        "--ray-num-cpus", str(SESSION_CPUS), "--ray-resources", "session_slot=1", "--ray-timeout", "120",
    ]
    first = FrontEnd(args)
    try:
        second = FrontEnd(args)
        try:
            yield first, second
        finally:
            second.stop()
    finally:
        first.stop()


def expect_error(call: Callable[[], object], code: grpc.StatusCode, reason: str) -> TrainerError:
    with pytest.raises(TrainerError) as err:
        call()
    assert (err.value.code, err.value.reason) == (code, reason), err.value
    return err.value


# -- numbers: the same as local PyTorch ----------------------------------------------------------


@pytest.fixture(scope="class")
def ray_owner(front_ends: tuple[FrontEnd, FrontEnd]) -> Iterator[TrainerClient]:
    """The client of ``ray_session``'s owner."""
    with front_ends[0].connect("tok-alice") as client:
        yield client


@pytest.fixture(scope="class")
def ray_session(ray_owner: TrainerClient) -> Iterator[Session]:
    """One session held by a Ray actor, with its fresh state saved as checkpoint "fresh"; and
    "fresh-imagenet", the fresh state of a session made with the ImageNet input transform."""
    with ray_owner.create_session(WEIGHTS_NAME) as session:
        assert session.save_checkpoint("fresh") == 0
        with ray_owner.create_session(WEIGHTS_NAME, input_transform="imagenet") as transformed:
            transformed.save_checkpoint("fresh-imagenet")
        yield session


# The local backend's fidelity tests, each run on Ray too: those that ask for a session, a client, or
# the address of a server (target; on the server's own Ray, tests/test_ray_own.py), unless NOT_ON_RAY
# says why not. A new test in these modules runs on Ray by itself, or fails collection until it is
# placed. test_fast_paths.py's step on each fast path: test_a_session_on_a_fast_path_... below.
FIDELITY_MODULES = [training, train_steps, transfer, weights, remote_model, concurrency, aio, training_visible, watch]
# What these tests may ask for, on a cluster front-end (its clients carry a token) ...
ON_THE_CLUSTER = {"session", "client", "local", "state_dict", "data_dir", "monkeypatch", "tmp_path"}
# ... and on the server's own Ray, which has no tokens (clients made from the bare address).
ON_OWN_RAY = ON_THE_CLUSTER | {"target"}
NOT_ON_RAY = {
    "test_tensorboard_scalars_and_histograms_read_back_equal_the_training":
        "reads the event files of a local server started with --tensorboard-dir (board_server); the "
        "front-end writes them from the same results on both backends",
    "test_a_train_step_shows_in_tensorboard_as_a_forward_backward_and_step": "as above (board_server)",
    "test_an_observer_that_fails_never_fails_the_call_nor_silences_the_others":
        "the front-end's observers in this process, no session",
    "test_no_two_calls_run_at_once_on_one_session":
        "hooks the model of a local server's session in this process; on Ray the actor runs one call at a "
        "time (test_concurrent_calls_on_one_session_are_serialised runs here)",
    "test_the_engine_runs_one_call_at_a_time": "the engine alone, in this process, no server",
    "test_a_call_cancelled_while_it_runs_is_logged_cancelled_and_changes_nothing":
        "holds a local session's model in this process; the Ray twin: tests/test_ray_limits.py "
        "(a Forward abandoned after it ran changes nothing)",
    "test_a_stream_sends_its_first_tensors_while_later_ones_are_encoded":
        "patches the encoder of a local server's session in this process (on Ray it runs in the actor)",
    "test_a_stream_whose_client_left_stops_encoding_at_the_next_tensor": "the front-end's sender alone, no session",
    "test_no_data_dir_means_no_client_named_files": "starts a local server of its own (no --data-dir)",
    "test_imagenet_weights_from_the_hub_cache": "the engine's loader with a patched hub cache, in this process",
    "test_bad_weights_flag_fails_at_startup": "a local server that must not start",
    "test_the_tutorials_freeze_loop_sends_one_call_and_reading_requires_grad_sends_none":
        "counts the calls in the log of a server in this process (rpc_log); the SDK sends the same calls "
        "whatever the backend",
    "test_attribute_access_makes_no_call":
        "counts the calls in the log of a server in this process (rpc_log); the SDK sends the same calls "
        "whatever the backend",
    "test_backward_with_create_graph_is_refused_before_anything_is_sent":
        "counts the calls in the log of a server in this process (rpc_log); the SDK refuses it before any call",
    "test_only_the_sessions_owner_may_watch_it": "a local server of its own with tokens (watch_server); ownership "
                                                 "is the store's, checked as for DescribeSession on both backends",
    "test_watchers_are_bounded_and_hold_no_worker": "a local server of its own with small limits (watch_server); the "
                                                    "limits and the hub are the front-end's on both backends",
    "test_checkpoints_and_expiry_end_to_end": "moves the clock of a local server's store (watch_server)",
    "test_a_repeated_load_or_reset_is_told_to_watchers_once":
        "a local server of its own with a checkpoint folder and its default session (watch_server); the repeats "
        "of the other numbered calls run on Ray (test_a_repeated_call_is_answered_and_told_to_watchers_once)",
    "test_a_stopping_server_ends_every_watch_at_once": "starts and stops a local server of its own",
    "test_the_grpcurl_recipe_of_the_docs_runs_as_written": "starts a fresh local server, as the docs' recipe expects",
}


def local_tests(module: ModuleType) -> list[Callable[..., None]]:
    return [value for name, value in vars(module).items() if name.startswith("test_") and inspect.isfunction(value)]


def uint8_images_with_an_input_transform(session: Session, local: nn.Module) -> None:
    """The transform CreateSession gave a session reached its actor (its checkpoint holds it), and
    LoadCheckpoint puts it on this one, in another actor; uint8 images and uint8 class indices then
    cross the process boundary and train as local ToTensor() + Normalize() does."""
    images.expect_error(lambda: session.forward(images.images(2)), "INPUT_TRANSFORM_MISSING")
    assert session.load_checkpoint("fresh-imagenet").input_transform == InputTransform.imagenet()
    images.check_uint8_training_matches_local(session, local)


def fixtures_of(test: Callable[..., None]) -> set[str]:
    """The fixtures ``test`` asks for (its parameters less those of its own parametrize)."""
    own = {name.strip() for mark in getattr(test, "pytestmark", []) if mark.name == "parametrize"
           for name in (mark.args[0].split(",") if isinstance(mark.args[0], str) else mark.args[0])}
    return set(inspect.signature(test).parameters) - own


def cases(test: Callable[..., None]) -> list[Any]:
    """``test`` as cases of ``run_local_test``: one per case of its own parametrize (the local ids;
    several parametrize marks: every combination)."""
    name = test.__name__.removeprefix("test_")
    marks = [mark for mark in getattr(test, "pytestmark", []) if mark.name == "parametrize"]
    found = [pytest.param(test, {}, id=name)]
    for mark in marks:
        names = [n.strip() for n in mark.args[0].split(",")] if isinstance(mark.args[0], str) else list(mark.args[0])
        ids = mark.kwargs.get("ids")
        found = [
            pytest.param(test, {**case.values[1], **dict(zip(names, value if len(names) > 1 else (value,)))},
                         id=f"{case.id}[{ids[index] if ids else index}]")
            for case in found for index, value in enumerate(mark.args[1])
        ]
    return found


def ray_cases(where: str) -> list[Any]:
    """The cases of FIDELITY_MODULES that run on the cluster (``where`` "cluster") or on the server's
    own Ray ("own": those that need a bare address)."""
    found = []
    for module in FIDELITY_MODULES:
        for test in local_tests(module):
            needs = fixtures_of(test)
            if test.__name__ in NOT_ON_RAY:
                continue
            if not needs <= ON_OWN_RAY:
                raise AssertionError(f"{module.__name__}.{test.__name__} asks for {sorted(needs - ON_OWN_RAY)}: "
                                     "make it run on Ray, or say in NOT_ON_RAY (tests/test_ray_backend.py) why it cannot")
            if (where == "own") == ("target" in needs):
                found.extend(cases(test))
    return found


def run_local_test(test: Callable[..., None], parameters: dict[str, Any], fixtures: dict[str, Any]) -> None:
    """Runs a local test with the fixtures it asks for, taken from ``fixtures`` (the Ray ones)."""
    test(**{name: fixtures[name] for name in fixtures_of(test)}, **parameters)


@pytest.fixture(scope="class")
def ray_client(front_ends: tuple[FrontEnd, FrontEnd]) -> Iterator[TrainerClient]:
    """The client of the local tests that make their own sessions (another token than ``ray_session``'s,
    whose limit of two they may use)."""
    with front_ends[0].connect("tok-bob") as client:
        yield client


class TestNumbersMatchLocalPyTorch:
    @pytest.mark.parametrize(("test", "parameters"), ray_cases("cluster"))
    def test_on_the_ray_backend(
        self, ray_session: Session, ray_owner: TrainerClient, ray_client: TrainerClient, local: nn.Module,
        state_dict: dict[str, torch.Tensor],
        data_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, test: Callable[..., None], parameters: dict[str, Any],
    ) -> None:
        """Each local fidelity test, on a session in a Ray actor on a worker node (or on sessions it
        makes itself). The session starts each from its fresh state (LoadCheckpoint "fresh", which
        also proves the restore exact: any difference from a fresh session would fail the comparison)."""
        info = ray_session.load_checkpoint("fresh")
        assert info.step_count == 0 and info.num_classes == 1000 and info.pending_forward_id == 0
        # A test given a session and a client expects the session's own client (it calls it by hand).
        client = ray_owner if "session" in fixtures_of(test) else ray_client
        run_local_test(test, parameters, {"session": ray_session, "client": client, "local": local, "state_dict": state_dict,
                                          "data_dir": data_dir, "monkeypatch": monkeypatch, "tmp_path": tmp_path})

    def test_uint8_images_with_an_input_transform(self, ray_session: Session, local: nn.Module) -> None:
        ray_session.load_checkpoint("fresh")
        uint8_images_with_an_input_transform(ray_session, local)

    def test_errors_cross_the_process_boundary_whole(self, ray_session: Session) -> None:
        """A domain error raised in the actor reaches the client with its code, reason and field."""
        ray_session.load_checkpoint("fresh")
        err = expect_error(lambda: ray_session.forward(rand(2, 4, 32, 32)), grpc.StatusCode.INVALID_ARGUMENT, "BAD_INPUT_SHAPE")
        assert [v.field for v in err.violations] == ["input"]
        expect_error(lambda: ray_session.backward("sum", rand(2, 1000)), grpc.StatusCode.FAILED_PRECONDITION, "NO_PENDING_FORWARD")
        expect_error(lambda: ray_session.load_checkpoint("nope"), grpc.StatusCode.NOT_FOUND, "CHECKPOINT_NOT_FOUND")


def test_list_sessions_and_reset_on_the_ray_backend(front_ends: tuple[FrontEnd, FrontEnd]) -> None:
    """ListSessions reads the cluster's registry (any front-end), ResetSession reaches the default actor."""
    a, b = front_ends
    with a.connect("tok-carol") as carol_a, b.connect("tok-carol") as carol_b:
        with carol_a.create_session(WEIGHTS_NAME) as mine:
            listed = [info.session_id for info in carol_b.list_sessions()]
            assert listed == ["default", mine.session_id]
        default = carol_b.session()
        default.forward(rand(2, 3, 32, 32))
        default.backward("sum", rand(2, 1000))
        default.step()
        info = carol_a.session().reset()
        assert (info.step_count, info.pending_forward_id, info.num_classes) == (0, 0, 1000)


def test_the_checkpoint_quota_and_delete_on_the_ray_backend(front_ends: tuple[FrontEnd, FrontEnd], checkpoint_dir: Path) -> None:
    """The session's actor checks the owner's quota where it writes (refused before writing: the
    tensors alone do not fit); DeleteCheckpoint through either front-end frees the room."""
    a, b = front_ends
    own = checkpoint_dir / "erin"
    own.mkdir()
    room = 10_000_000  # less than a checkpoint's tensors (46.8 MB)
    with open(own / "filler.bin", "wb") as f:
        f.truncate(CHECKPOINT_QUOTA - room)  # sparse: takes no disk, counts its size
    with a.connect("tok-erin") as erin_a, b.connect("tok-erin") as erin_b, erin_a.create_session(WEIGHTS_NAME) as session:
        err = expect_error(lambda: session.save_checkpoint("x.ckpt"), grpc.StatusCode.RESOURCE_EXHAUSTED, "CHECKPOINT_QUOTA")
        assert err.metadata["used_bytes"] == str(CHECKPOINT_QUOTA - room)
        assert sorted(p.name for p in own.iterdir()) == ["filler.bin"]  # no temporary file
        assert erin_b.delete_checkpoint("filler.bin") == CHECKPOINT_QUOTA - room
        assert session.save_checkpoint("x.ckpt") == 0
        assert [f.name for f in erin_b.list_checkpoints()] == ["x.ckpt"]
        size = (own / "x.ckpt").stat().st_size
        assert erin_a.delete_checkpoint("x.ckpt") == size
        expect_error(lambda: erin_b.delete_checkpoint("x.ckpt"), grpc.StatusCode.NOT_FOUND, "CHECKPOINT_NOT_FOUND")
        assert list(own.iterdir()) == []


@pytest.mark.parametrize(("autocast", "memory_format"), fast_paths.FAST_PATHS)
def test_a_session_on_a_fast_path_on_the_ray_backend_equals_local_pytorch_on_it(
    front_ends: tuple[FrontEnd, FrontEnd], state_dict: dict[str, torch.Tensor], autocast: str, memory_format: str
) -> None:
    """test_fast_paths.py's step on each fast path, on Ray: CreateSession's autocast and memory format
    reach the session's actor (in its ModelSpec), its step equals local PyTorch on the same fast path
    with test_fast_paths.py's tolerance, and the other front-end describes the session with them."""
    data, labels = rand(2, 3, 64, 64, seed=7), rand(2, 1000, seed=8)
    a, b = front_ends
    with a.connect("tok-carol") as carol_a, b.connect("tok-carol") as carol_b, \
            carol_a.create_session(WEIGHTS_NAME, autocast=autocast, memory_format=memory_format) as session:
        info = carol_b.session(session.session_id).info()
        assert (info.autocast, info.memory_format) == (autocast, memory_format)
        assert (carol_b.session().info().autocast, carol_b.session().info().memory_format) == ("off", "contiguous")
        fast_paths.assert_fast_path_equal(
            fast_paths.remote_step(session, data, labels),
            fast_paths.local_step(state_dict, data, labels, fast_paths.AUTOCAST.get(autocast), memory_format == "channels_last"))


# -- sessions over nodes and front-ends ------------------------------------------------------------


def test_sessions_spread_over_nodes_and_front_ends_share_them(ray_cluster: RayCluster, front_ends: tuple[FrontEnd, FrontEnd]) -> None:
    a, b = front_ends
    with a.connect("tok-alice") as alice_a, b.connect("tok-alice") as alice_b, a.connect("tok-bob") as bob_a:
        first, second = alice_a.create_session(WEIGHTS_NAME), bob_a.create_session(WEIGHTS_NAME)
        nodes = {ray_cluster.node_of(first.info().device), ray_cluster.node_of(second.info().device)}
        assert nodes == {"node_a", "node_b"}  # one session on each worker node

        # Made through front-end A, trained through front-end B, seen through A.
        via_b = alice_b.session(first.session_id)
        forward_id = via_b.forward(rand(2, 3, 32, 32)).forward_id
        assert first.info().pending_forward_id == forward_id
        via_b.backward("sum", rand(2, 1000), forward_id=forward_id)
        assert via_b.step() == 1
        assert first.info().step_count == 1

        # The default session is one actor, whichever front-end serves it.
        default_id = alice_a.session().forward(rand(2, 3, 32, 32)).forward_id
        assert alice_b.session().info().pending_forward_id == default_id
        assert alice_a.session().info().device == alice_b.session().info().device
        first.close()
        second.close()
        expect_error(via_b.info, grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")  # closed through A, gone for B


def test_ownership_and_limits_hold_across_front_ends(front_ends: tuple[FrontEnd, FrontEnd]) -> None:
    a, b = front_ends
    with a.connect("tok-carol") as carol_a, b.connect("tok-carol") as carol_b, \
            b.connect("tok-dave") as dave_b, a.connect("tok-dave") as dave_a:
        mine = carol_a.create_session()
        theirs = dave_b.session(mine.session_id)
        for call in (theirs.info, theirs.step, theirs.close):  # as if it did not exist, on either front-end
            expect_error(call, grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
        expect_error(dave_a.session(mine.session_id).info, grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")

        # Per token: carol's second session through B, her third refused through A.
        second = carol_b.create_session()
        expect_error(carol_a.create_session, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_SESSIONS_FOR_TOKEN")
        # A build that fails in the actor releases its reservation (and reports the actor's error).
        expect_error(lambda: dave_a.create_session("missing.pt"), grpc.StatusCode.NOT_FOUND, "WEIGHTS_NOT_FOUND")
        # In all: default + carol's 2 + dave's 2 + 1 = MAX_SESSIONS, then no more, whichever front-end.
        held = [dave_a.create_session(), dave_b.create_session()]
        with b.connect("tok-alice") as alice_b:
            held.append(alice_b.create_session())
            assert MAX_SESSIONS == 6
            with a.connect("tok-bob") as bob_a:
                expect_error(bob_a.create_session, grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_SESSIONS")
            for session in (mine, second, *held):
                session.close()
            alice_b.create_session().close()  # room again


def test_a_restarted_front_end_loses_nothing(front_ends: tuple[FrontEnd, FrontEnd]) -> None:
    a, b = front_ends
    with a.connect("tok-alice") as alice_a:
        session = alice_a.create_session(WEIGHTS_NAME)
        session.forward(rand(2, 3, 32, 32))
        session.backward("sum", rand(2, 1000))
        session.step()
        before = session.parameters("fc")
        b.restart()
        with b.connect("tok-alice") as alice_b:
            again = alice_b.session(session.session_id)
            assert again.info().step_count == 1
            after = again.parameters("fc")
            for name in before:
                np.testing.assert_array_equal(after[name].array, before[name].array)
            assert again.step() == 2
            with b.connect("tok-bob") as bob_b:  # the owner is kept with the session, not in a front-end
                expect_error(bob_b.session(session.session_id).info, grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
        session.close()


def test_a_repeat_through_another_front_end_is_answered_by_the_session_actor(front_ends: tuple[FrontEnd, FrontEnd]) -> None:
    """The record of numbered operations lives with the session, in its actor: a TrainStep whose
    answer was lost, retried through the other front-end, is answered there and not run again."""
    a, b = front_ends
    with a.connect("tok-alice") as alice_a, b.connect("tok-alice") as alice_b, alice_a.create_session(WEIGHTS_NAME) as s:
        number = s.info().next_operation
        request = pb.TrainStepRequest(
            session_id=s.session_id, input=pb.TensorInput(tensor=codec.encode(rand(2, 3, 32, 32))),
            loss=pb.Loss(function=pb.LOSS_FUNCTION_CROSS_ENTROPY, labels=pb.TensorInput(tensor=codec.encode(np.array([1, 2])))),
            operation=pb.Operation(number=number),
        )
        first = alice_a.call(alice_a.stub.TrainStep, request)
        assert alice_b.call(alice_b.stub.TrainStep, request) == first
        info = s.info()
        assert (info.step_count, info.next_operation) == (1, number + 1)


def test_front_ends_and_nodes_use_only_loopback(front_ends: tuple[FrontEnd, FrontEnd]) -> None:
    pids = {str(f.process.pid) for f in front_ends}
    lines = subprocess.run(["ss", "-tanp"], capture_output=True, text=True, check=True).stdout.splitlines()[1:]
    mine = [line for line in lines if any(f"pid={pid}," in line for pid in pids)]
    assert mine, "the front-ends hold sockets"
    for line in mine:
        local, peer = line.split()[3:5]
        assert local.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")), line
        assert peer.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:", "*", "0.0.0.0:")), line


# -- a node dies ----------------------------------------------------------------------------------


def test_a_killed_node_loses_only_its_sessions_and_recovery_is_bit_identical(
    ray_cluster: RayCluster, front_ends: tuple[FrontEnd, FrontEnd], local: nn.Module
) -> None:
    """Runs last: it removes a worker node from the cluster."""
    a, b = front_ends
    batches = [(rand(2, 3, 32, 32, seed=50 + i), rand(2, 1000, seed=60 + i)) for i in range(3)]

    def train(session: Session, data: np.ndarray, labels: np.ndarray) -> int:
        session.zero_grad()
        session.forward(data)
        session.backward("sum", labels)
        return session.step()

    with a.connect("tok-alice") as alice_a, b.connect("tok-alice") as alice_b, b.connect("tok-bob") as bob_b:
        doomed, other = alice_a.create_session(WEIGHTS_NAME), alice_a.create_session(WEIGHTS_NAME)
        doomed_node, other_node = ray_cluster.node_of(doomed.info().device), ray_cluster.node_of(other.info().device)
        assert doomed_node != other_node
        for data, labels in batches:  # steps 1 and 2; the checkpoint after step 2 (--checkpoint-every 2); step 3
            train(doomed, data, labels)
        checkpoint = f"auto-{doomed.session_id}.ckpt"
        after_three = doomed.parameters(include_buffers=True)
        train(other, *batches[0])
        watched = watch.Reader(doomed.watch(recent=1, timeout=watch.WATCH_SECONDS))  # on the front-end that trains it
        assert watch.step_of(watched.next()).step_count == 3  # in place

        ray_cluster.cluster.remove_node(ray_cluster.workers.pop(doomed_node), allow_graceful=False)  # SIGKILL
        killed = time.monotonic()
        seen = []
        while True:  # every call answers (no hang): OK while the killed worker lingers, then UNREACHABLE
            started = time.monotonic()  # until the node is declared dead, then LOST
            try:
                doomed.info()  # a read: a call that still got through changes nothing
                seen.append("OK")
            except TrainerError as exc:
                assert exc.code == grpc.StatusCode.UNAVAILABLE, exc
                seen.append(exc.reason)
                if exc.reason == "SESSION_LOST":
                    err = exc
                    break
                assert exc.reason == "SESSION_UNREACHABLE", seen
            assert time.monotonic() - started < 10
            assert time.monotonic() - killed < 30, seen[-5:]  # no hang: the node is declared dead in ~6 s
        assert time.monotonic() - killed < 30
        assert checkpoint in err.message and "step 2" in err.message
        assert err.metadata.get("checkpoint") == checkpoint
        watch.assert_ended(watched.rest(), "session_lost")  # its watch ended when this front-end met the loss
        # The other front-end, which never called it, says the same; a stranger still sees nothing.
        lost = expect_error(alice_b.session(doomed.session_id).info, grpc.StatusCode.UNAVAILABLE, "SESSION_LOST")
        assert checkpoint in lost.message
        expect_error(bob_b.session(doomed.session_id).info, grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")

        # The session on the surviving node goes on, through either front-end.
        assert train(alice_b.session(other.session_id), *batches[1]) == 2

        # Recovery: the same handle resumes from the checkpoint, on a new session on the surviving node,
        # numbering where the checkpoint was (4 numbered calls a step), and redoes step 3 exactly.
        lost_id = doomed.session_id
        resumed = doomed.resume()
        assert (resumed.step_count, resumed.next_operation) == (2, 9) and doomed.session_id != lost_id
        assert ray_cluster.node_of(resumed.device) == other_node
        assert train(doomed, *batches[2]) == 3
        redone = doomed.parameters(include_buffers=True)
        assert set(redone) == set(after_three)
        for name, item in after_three.items():
            np.testing.assert_array_equal(redone[name].array, item.array, err_msg=name)

        # And both equal local PyTorch's three steps (within the tolerance of every other test).
        optim = torch.optim.SGD(local.parameters(), lr=1e-2, momentum=0.9)
        for data, labels in batches:
            optim.zero_grad()
            (local(torch.from_numpy(data)) - torch.from_numpy(labels)).sum().backward()
            optim.step()
        for name, value in [*local.named_parameters(), *local.named_buffers()]:
            assert_equal_to_local(redone[name].array, value)
        doomed.close()
        lost = alice_a.session(lost_id)
        lost.close()  # a lost session can be closed (forgotten)
        expect_error(lost.info, grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
        other.close()
