"""Reliability II: no client can stall, starve or bloat the service, and no failed call leaves a trace.

Each test drives a real server through real channels and fails when the guard it names is removed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from remote_trainer.engine import checkpoints
from remote_trainer.engine.budget import head_bytes, model_bytes
from remote_trainer.engine.models import ModelSpec
from remote_trainer.engine.optimizer import OptimizerSpec
from remote_trainer.engine.session import SessionEngine
from remote_trainer.client import Session, TrainerClient, TrainerError, core
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb
from remote_trainer.engine.limits import MAX_CLASSES, MAX_PATTERN_LENGTH, MAX_PATTERNS
from remote_trainer.server.app import create_server
from remote_trainer.server.settings import Settings, parse_settings
from tests.conftest import rand
from tests.server_events import FakeClock, blocking_forward, waiting_for


def test_pattern_lists_are_bounded_and_refused_before_matching(client: TrainerClient, session: Session) -> None:
    """400,000 "*" patterns (a 1.2 MB request) held a session for ~50 s; now refused at once, the
    session free for the next call."""
    session.forward(rand(2, 3, 32, 32))
    session.backward("sum", rand(2, 1000))
    many = ["*"] * 400_000
    for call in (
        lambda: session.gradients(*many),
        lambda: session.parameters(*many),
        lambda: session.freeze(*many),
    ):
        with pytest.raises(TrainerError) as err:
            call()
        assert (err.value.code, err.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "TOO_MANY_PATTERNS")
        assert str(MAX_PATTERNS) in err.value.message
    with pytest.raises(TrainerError) as err:
        session.gradients("layer1" + "*" * MAX_PATTERN_LENGTH)
    assert (err.value.code, err.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "PATTERN_TOO_LONG")
    # At the limit, repeated patterns are matched once: the answer is the same as for one pattern.
    assert list(session.gradients(*["fc.*"] * MAX_PATTERNS)) == ["fc.weight", "fc.bias"]
    assert session.info().trainable_parameters == 62  # nothing was frozen


def test_settings_that_yield_no_token_or_an_empty_one_refuse_to_start(tmp_path: Path) -> None:
    """Fails closed: before, each of these started a server with no authentication (or with the empty
    bearer token valid)."""
    empty, comments = tmp_path / "empty.tokens", tmp_path / "comments.tokens"
    empty.write_text("")
    comments.write_text("# alice:secret\n\n")
    cases: list[tuple[dict[str, str], str]] = [
        ({"TRAINER_TOKENS": " "}, "no token given"),
        ({"TRAINER_TOKENS": ","}, "no token given"),
        ({"TRAINER_TOKENS_FILE": str(empty)}, "no token given"),
        ({"TRAINER_TOKENS_FILE": str(comments)}, "no token given"),
        ({"TRAINER_TOKENS": "alice:"}, "the token of 'alice' is empty"),
        ({"TRAINER_TOKENS": "bob:b0b,alice:"}, "the token of 'alice' is empty"),
    ]
    for env, said in cases:
        with pytest.raises(SystemExit):
            parse_settings([], env)
        with pytest.raises(ValueError, match=said):  # create_server (no flag parsing) refuses too
            create_server(Settings(port=0, weights="random", tokens=env.get("TRAINER_TOKENS", ""),
                                   tokens_file=env.get("TRAINER_TOKENS_FILE", "")))
    # As users start it: exit status 2 and one line saying why, before anything listens.
    proc = subprocess.run(
        [sys.executable, "-m", "remote_trainer.server", "--port", "0", "--weights", "random"],
        env={**os.environ, "TRAINER_TOKENS": "alice:"}, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["trainer-server: error: the token of 'alice' is empty (trainer-server --help lists every flag)"]
    assert "listening" not in proc.stderr


CHECKPOINT_NAME_CASES = [
    ("a\0b.ckpt", "BAD_FILE_NAME"),
    ("x" * 256, "FILE_NAME_TOO_LONG"),
    (".", "BAD_CHECKPOINT_NAME"),
    ("./", "BAD_CHECKPOINT_NAME"),
    ("~/x.ckpt", "BAD_CHECKPOINT_NAME"),
    ("missing/x.ckpt", "BAD_CHECKPOINT_NAME"),
    ("sub", "BAD_CHECKPOINT_NAME"),
]


def test_checkpoint_names_that_cannot_be_a_file_are_refused_and_nothing_is_written_outside(tmp_path: Path) -> None:
    """Each was INTERNAL before, and SaveCheckpoint(".") wrote its temporary file into the folder's parent.
    DeleteCheckpoint takes names by the same rules."""
    folder = tmp_path / "checkpoints"
    (folder / "sub").mkdir(parents=True)
    running = create_server(Settings(port=0, weights="random", checkpoint_dir=str(folder)))
    try:
        with TrainerClient(f"localhost:{running.port}") as client:
            s = client.session()
            for name, reason in CHECKPOINT_NAME_CASES:
                for call in (s.save_checkpoint, s.load_checkpoint, client.delete_checkpoint):
                    with pytest.raises(TrainerError) as err:
                        call(name)
                    assert (err.value.code, err.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason), (name, call)
                    assert str(tmp_path) not in err.value.message
            longest = "x" * 250 + ".ckpt"  # 255 bytes: a legal name, whose temporary name must fit too
            assert s.save_checkpoint(longest) == 0
            assert s.save_checkpoint("sub/x.ckpt") == 0
            assert s.load_checkpoint(longest).step_count == 0
    finally:
        running.stop(None).wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]  # nothing beside the folder
    assert sorted(p.name for p in folder.iterdir()) == sorted(["sub", "x" * 250 + ".ckpt"])  # no temporaries
    assert [p.name for p in (folder / "sub").iterdir()] == ["x.ckpt"]


def test_a_full_disk_is_resource_exhausted_and_leaves_no_temporary(tmp_path: Path) -> None:
    """A server whose files may not grow past 1 MiB (RLIMIT_FSIZE: the kernel's own EFBIG, as a full
    disk gives ENOSPC): the 45 MB checkpoint fails as RESOURCE_EXHAUSTED, not INTERNAL."""
    import resource
    import signal

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the server
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    proc = subprocess.Popen(
        [sys.executable, "-m", "remote_trainer.server", "--port", "0", "--weights", "random",
         "--checkpoint-dir", str(tmp_path)],
        stderr=subprocess.PIPE, text=True, preexec_fn=small_files,
    )
    try:
        assert proc.stderr is not None
        port = next(int(m.group(1)) for line in proc.stderr if (m := re.search(r"listening on \S+:(\d+)", line)))
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        with TrainerClient(f"localhost:{port}") as client:
            with pytest.raises(TrainerError) as err:
                client.session().save_checkpoint("big.ckpt")
            assert (err.value.code, err.value.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "DISK_FULL")
            assert str(tmp_path) not in err.value.message
            assert client.session().info().step_count == 0  # still serving
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder, so no permission error can be made")
def test_a_folder_the_server_may_not_write_is_unavailable(tmp_path: Path) -> None:
    running = create_server(Settings(port=0, weights="random", checkpoint_dir=str(tmp_path)))
    tmp_path.chmod(0o500)
    try:
        with TrainerClient(f"localhost:{running.port}") as client, pytest.raises(TrainerError) as err:
            client.session().save_checkpoint("x.ckpt")
        assert (err.value.code, err.value.reason) == (grpc.StatusCode.UNAVAILABLE, "CHECKPOINT_DIR_NOT_WRITABLE")
        assert str(tmp_path) not in err.value.message
    finally:
        tmp_path.chmod(0o700)
        running.stop(None).wait()


def test_cpu_out_of_memory_is_resource_exhausted() -> None:
    """The CPU allocator's out-of-memory is a plain RuntimeError (made here for real), which the error
    map turned into INTERNAL."""
    import torch

    from remote_trainer.server.status import status_for as _status_for

    with pytest.raises(RuntimeError) as caught:
        torch.empty(1 << 60)
    status = _status_for(caught.value, "Forward")
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status.details.startswith("the server ran out of memory")


def test_the_sdk_refuses_casts_that_change_values_and_truncated_streams(client: TrainerClient, session: Session) -> None:
    """Float labels [1.7, 2.9] were sent as [1, 2], NaN as INT64_MIN; a stream cut inside a tensor
    returned a dict without it."""
    first = session.forward(rand(2, 3, 32, 32))
    for labels, said in (([1.7, 2.9], "not whole numbers"), ([float("nan"), 1.0], "NaN or infinite"),
                         ([2.0**63, 0.0], "outside the range")):
        with pytest.raises(ValueError, match=said):
            session.backward("cross_entropy", labels)
    # Nothing reached the server: the pending forward is still there and unused.
    assert session.backward("cross_entropy", [1.0, 2.0]).forward_id == first.forward_id  # whole floats are fine
    # A real stream of parameters (chunks just under 4 MiB: the 9.4 MB weight spans three), cut inside that weight.
    weight = "layer4.1.conv2.weight"
    request = pb.GetParametersRequest(session_id=session.session_id, patterns=[weight, "fc.bias"])
    messages = [r.chunk for r in client.stub.GetParameters(request, timeout=60)]
    assert [(m.name, m.last) for m in messages] == [(weight, False), (weight, False), (weight, True), ("fc.bias", True)]
    whole = core.named_tensors([(m, m.data) for m in messages], True)
    assert list(whole) == [weight, "fc.bias"]
    cut = [m for m in messages if m.name == weight][:-1]  # the stream ends before the weight's last chunk
    with pytest.raises(ValueError, match=f"ended inside tensor '{weight}'"):
        core.named_tensors([(m, m.data) for m in cut], True)


def test_a_session_whose_create_failed_for_the_client_is_dropped() -> None:
    """10 creates with a 20 ms deadline kept 7 sessions no one knew of, until every create was
    RESOURCE_EXHAUSTED. The build is held here until the client has seen DEADLINE_EXCEEDED."""
    running = create_server(Settings(port=0, weights="random", max_sessions=2, metrics_port=0))
    release = threading.Event()
    build = running.store._factory  # type: ignore[attr-defined]  # the local store's engine factory

    def slow_build(model: ModelSpec, optimizer: OptimizerSpec) -> SessionEngine:
        assert release.wait(120)
        return build(model, optimizer)  # type: ignore[no-any-return]

    running.store._factory = slow_build  # type: ignore[attr-defined]
    try:
        with TrainerClient(f"localhost:{running.port}") as client:
            for _ in range(3):  # more than max_sessions allows, were they kept
                release.clear()
                with waiting_for("rpc=CreateSession session=- status=", "remote_trainer.server.status") as finished:
                    with pytest.raises(TrainerError) as err:
                        client.create_session(timeout=3)  # long enough to reach the server on a loaded machine
                    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
                    release.set()
                    assert finished.seen.wait(120)
                assert "status=DEADLINE_EXCEEDED" in finished.messages[0]  # the real outcome, logged
                assert len(running.store) == 1  # only the default session
            running.store._factory = build  # type: ignore[attr-defined]
            with client.create_session() as kept:  # the limit is free for a create that succeeds
                assert kept.info().step_count == 0
        text = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10).read().decode()
        assert 'trainer_requests_total{code="DEADLINE_EXCEEDED",method="CreateSession"} 3.0' in text
    finally:
        release.set()
        running.stop(None).wait()


def test_a_forward_past_its_deadline_changes_nothing() -> None:
    """The forward runs past the client's deadline (held by a hook until the client has seen
    DEADLINE_EXCEEDED); its BatchNorm statistics are put back and the earlier pending forward stays."""
    running = create_server(Settings(port=0, weights="random"))
    try:
        with TrainerClient(f"localhost:{running.port}") as client:
            s = client.session()
            first = s.forward(rand(2, 3, 32, 32, seed=1))
            before = s.parameters(include_buffers=True)
            entered, release, remove = blocking_forward(running.store.get("")._model, until_abandoned=True)
            with waiting_for("rpc=Forward session=- status=", "remote_trainer.server.status") as finished:
                with pytest.raises(TrainerError) as err:
                    s.forward(rand(4, 3, 32, 32, seed=2), timeout=3)
                assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
                assert entered.is_set()  # it did start running
                remove()
                release.set()
                assert finished.seen.wait(120)
            assert "status=DEADLINE_EXCEEDED" in finished.messages[0]
            after = s.parameters(include_buffers=True)
            for name in before:
                np.testing.assert_array_equal(after[name].array, before[name].array, err_msg=name)
            assert s.info().pending_forward_id == first.forward_id
            assert s.backward("sum", rand(2, 1000)).forward_id == first.forward_id
    finally:
        running.stop(None).wait()


def test_a_retried_step_is_taken_once(session: Session) -> None:
    session.forward(rand(2, 3, 32, 32))
    session.backward("sum", rand(2, 1000))
    assert session.step(expected_step_count=0) == 1
    once = session.parameters("fc")
    assert session.step(expected_step_count=0) == 1  # the retry of a step whose answer was lost: no second step
    again = session.parameters("fc")
    for name in once:
        np.testing.assert_array_equal(again[name].array, once[name].array, err_msg=name)
    with pytest.raises(TrainerError) as err:
        session.step(expected_step_count=5)
    assert (err.value.code, err.value.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "STEP_COUNT_MISMATCH")
    assert session.step(expected_step_count=1) == 2
    assert session.step() == 3  # without it, every call steps


def test_a_session_with_a_call_running_is_not_idle() -> None:
    """A Forward longer than the idle limit: the session stays (it was closed mid-call before)."""
    clock = FakeClock()
    running = create_server(Settings(port=0, weights="random", session_idle_seconds=3600), clock=clock)
    try:
        with TrainerClient(f"localhost:{running.port}") as client:
            s = client.create_session()
            entered, release, remove = blocking_forward(running.store.get(s.session_id)._model)
            with waiting_for(f"rpc=Forward session={s.session_id} running", "remote_trainer.server.status") as started:
                result: dict[str, object] = {}
                worker = threading.Thread(target=lambda: result.update(f=s.forward(rand(2, 3, 32, 32))))
                worker.start()
                assert started.seen.wait(120) and entered.wait(120)
            clock.now += 36_000  # ten idle limits pass while the call runs
            running.store.expire_idle(running.servicer.busy)  # what the expiry thread does
            assert len(running.store) == 2
            remove()
            release.set()
            worker.join(120)
            assert "f" in result
            assert s.info().pending_forward_id == 1
            clock.now += 3601  # idle from here on: now it expires
            running.store.expire_idle(running.servicer.busy)
            with pytest.raises(TrainerError) as err:
                s.info()
            assert err.value.reason == "SESSION_EXPIRED"
    finally:
        release.set()
        running.stop(None).wait()


def test_a_starting_server_leaves_other_writers_temporaries_alone(tmp_path: Path) -> None:
    """The checkpoint folder is shared (front-ends, Ray nodes): a starting server removes only the
    temporary files that are certainly stale, never a live save's (whose rename would then fail)."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    live = checkpoints.temporary_path(tmp_path / "a.ckpt")  # a save of this (live) process, under way
    dead = checkpoints.temporary_path(tmp_path / "b.ckpt", int(ended.stdout))  # its writer has ended
    elsewhere = tmp_path / ".fedcba9876543210.1@other-host~1.tmp"  # another host's, being written
    for path in (live, dead, elsewhere):
        path.write_bytes(b"half a checkpoint")
    running = create_server(Settings(port=0, weights="random", checkpoint_dir=str(tmp_path)))
    running.stop(None).wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, elsewhere.name])


def test_safe_defaults_reclaim_sessions_graphs_checkpoints_and_temporaries(tmp_path: Path) -> None:
    defaults = Settings()
    assert (defaults.session_idle_seconds, defaults.pending_graph_seconds, defaults.keep_auto_checkpoints) == (3600, 600, 3)
    # Temporaries of saves killed midway (in the folder and in a token's folder) go at start.
    (tmp_path / "alice").mkdir()
    for stale in (tmp_path / ".0123456789abcdef.tmp", tmp_path / "alice" / ".run.ckpt.x1y2.tmp"):
        stale.write_bytes(b"half a checkpoint")
        os.utime(stale, (0, os.stat(stale).st_mtime - 2 * checkpoints.STALE_TEMPORARY_SECONDS))  # untouched for long
    (tmp_path / "keep.ckpt").write_bytes(b"not ours to remove")
    clock = FakeClock()
    running = create_server(Settings(port=0, weights="random", checkpoint_dir=str(tmp_path), checkpoint_every=1), clock=clock)
    try:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["alice", "keep.ckpt"]
        assert list((tmp_path / "alice").iterdir()) == []
        with TrainerClient(f"localhost:{running.port}") as client:
            sessions = [client.create_session() for _ in range(5)]
            for s in sessions:  # each checkpoints itself at its first step
                s.forward(rand(2, 3, 32, 32))
                s.backward("sum", rand(2, 1000))
                s.step()
            kept = sorted(p.name for p in tmp_path.glob("auto-*.ckpt"))
            assert kept == sorted(f"auto-{s.session_id}.ckpt" for s in sessions[-3:])  # the newest 3
            # A pending graph unused for pending_graph_seconds is dropped (the session itself stays).
            s = sessions[0]
            s.forward(rand(2, 3, 32, 32))
            clock.now += 601
            running.store.expire_idle(running.servicer.busy)  # what the expiry thread does
            assert len(running.store) == 6
            with pytest.raises(TrainerError) as err:
                s.backward("sum", rand(2, 1000))
            assert (err.value.code, err.value.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "GRAPH_EXPIRED")
            clock.now += 3601
            running.store.expire_idle(running.servicer.busy)
            assert len(running.store) == 1  # the default session never expires
    finally:
        running.stop(None).wait()


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_is_refused_before_it_is_allocated() -> None:
    """A session budget of 600 MB (the server runs in this process, so its RSS is this process's)."""
    from remote_trainer.engine.memory import release_freed_memory

    running = create_server(Settings(port=0, weights="random", session_memory_bytes=600 * 2**20))
    try:
        with TrainerClient(f"localhost:{running.port}") as client:
            s = client.session()
            with pytest.raises(TrainerError) as err:
                client.create_session(num_classes=MAX_CLASSES + 1)
            assert (err.value.code, err.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "BAD_NUM_CLASSES")
            release_freed_memory()
            before = rss_bytes()
            refused = [
                # resnet18 with 100,000 classes keeps ~1.0 GB (weights, gradients, optimizer state)
                lambda: client.create_session(num_classes=MAX_CLASSES),
                lambda: s.replace_head(MAX_CLASSES),
                # 64 images of 224x224 keep ~1.5 GB of activations until Backward
                lambda: s.forward(np.zeros((64, 3, 224, 224), np.float32), stats_only=True),
            ]
            for call in refused:
                with pytest.raises(TrainerError) as err:
                    call()
                assert (err.value.code, err.value.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SESSION_MEMORY_BUDGET")
                assert f"session_memory_bytes={600 * 2**20}" in err.value.message
                assert err.value.metadata["limit"] == str(600 * 2**20)
            release_freed_memory()
            grown = rss_bytes() - before
            # Nothing big was allocated: the refused calls would have taken 1.0-1.5 GB each; what grew is
            # the 38 MB request's copies on both sides (client and server share this process).
            assert grown < 400 * 2**20, grown
            assert len(running.store) == 1 and s.info().num_classes == 1000
            # 50,000 classes fit (~590 MB with the rest); a full snapshot of them then would not.
            assert s.replace_head(50_000).num_classes == 50_000
            with pytest.raises(TrainerError) as err:
                s.parameters()
            assert err.value.reason == "SESSION_MEMORY_BUDGET"
            assert list(s.parameters("conv1")) == ["conv1.weight"]  # a small one does
    finally:
        running.stop(None).wait()
    server_wide = create_server(Settings(port=0, weights="random", memory_budget_bytes=300 * 2**20))
    try:
        with TrainerClient(f"localhost:{server_wide.port}") as client, pytest.raises(TrainerError) as err:
            client.create_session()  # the default session's ~190 MB and another's do not fit in 300 MB
        assert (err.value.code, err.value.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_MEMORY_BUDGET")
        assert len(server_wide.store) == 1
    finally:
        server_wide.stop(None).wait()


# A budget that holds the default session and one more (resnet18 with 1000 classes each), not a third.
ONE_MORE_SESSION = model_bytes(1000) * 5 // 2


def check_a_budget_for_one_session(client: TrainerClient) -> None:
    """The body both backends run (tests/test_ray_limits.py on a Ray cluster), on a server started
    with ``--memory-budget-bytes ONE_MORE_SESSION``: the second session is refused before anything is
    built, saying what is held and free; what is left free bounds the first session's calls; closing
    it makes room at once."""
    needed = model_bytes(1000)
    first = client.create_session()
    with pytest.raises(TrainerError) as err:
        client.create_session()
    assert (err.value.code, err.value.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_MEMORY_BUDGET")
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    assert err.value.message == (
        f"a new session would need about {gib(needed)} more, and the server's sessions hold about {gib(2 * needed)} "
        f"({gib(ONE_MORE_SESSION - 2 * needed)} free): over the limit memory_budget_bytes={ONE_MORE_SESSION} "
        f"({gib(ONE_MORE_SESSION)})"
    ), err.value.message
    assert err.value.metadata == {"limit": str(ONE_MORE_SESSION), "needed_bytes": str(needed), "held_bytes": str(2 * needed)}
    assert [info.session_id for info in client.list_sessions()] == ["default", first.session_id]  # nothing half-made
    # What the budget leaves free (~90 MB) bounds the session's calls too (on Ray, in its actor):
    # a forward keeping ~126 MB of activations is refused before it runs.
    with pytest.raises(TrainerError) as err:
        first.forward(np.zeros((16, 3, 128, 128), np.float32), stats_only=True)
    assert (err.value.code, err.value.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_MEMORY_BUDGET"), err.value
    first.forward(rand(2, 3, 32, 32))  # used, then closed: its memory is given back at once
    first.backward("sum", rand(2, 1000))
    first.step()
    first.close()
    client.create_session().close()


def test_a_server_wide_budget_for_one_more_session() -> None:
    running = create_server(Settings(port=0, weights="random", memory_budget_bytes=ONE_MORE_SESSION))
    try:
        with TrainerClient(f"localhost:{running.port}", timeout=120) as client:
            check_a_budget_for_one_session(client)
    finally:
        running.stop(None).wait()


def check_a_session_counts_as_a_fresh_one_of_its_shape(client: TrainerClient) -> None:
    """The body both backends run (tests/test_ray_limits.py on a Ray cluster), on a server started
    with ``--memory-budget-bytes ONE_MORE_SESSION`` and a checkpoint folder: ReplaceHead and
    LoadCheckpoint are checked against all sessions' memory and leave the session counted as a fresh
    session of its new shape would be; one over the budget is refused, saying what all the sessions
    hold, and changes nothing; closing the session frees what it was last counted."""
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    m = model_bytes(1000)

    def held() -> int:
        """What the server counts its sessions as holding, as a create that cannot fit (~1 GB) says."""
        with pytest.raises(TrainerError) as err:
            client.create_session(num_classes=MAX_CLASSES)
        assert (err.value.code, err.value.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_MEMORY_BUDGET"), err.value
        return int(err.value.metadata["held_bytes"])

    def refused(call: Any, what: str, needed: int, holding: int) -> None:
        with pytest.raises(TrainerError) as err:
            call()
        assert (err.value.code, err.value.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_MEMORY_BUDGET"), err.value
        assert err.value.message == (
            f"{what} would need about {gib(needed)} more, and the server's sessions hold about {gib(holding)} "
            f"({gib(ONE_MORE_SESSION - holding)} free): over the limit memory_budget_bytes={ONE_MORE_SESSION} "
            f"({gib(ONE_MORE_SESSION)})"
        ), err.value.message
        said = {key: err.value.metadata.get(key) for key in ("limit", "needed_bytes", "held_bytes")}  # and next_operation
        assert said == {"limit": str(ONE_MORE_SESSION), "needed_bytes": str(needed), "held_bytes": str(holding)}

    assert held() == m  # the default session
    with client.create_session() as first:
        assert held() == 2 * m
        # ~90 MB are free: a head of 20,000 classes (~160 MB beside the old one) is refused, nothing changed.
        refused(lambda: first.replace_head(20_000), "a head of 20000 classes", head_bytes(20_000), 2 * m)
        assert first.info().num_classes == 1000 and held() == 2 * m
        assert first.replace_head(10).num_classes == 10
        assert held() == m + model_bytes(10)  # as a fresh session of 10 classes
        first.save_checkpoint("ten")
        # A checkpoint's model is built beside the session's: no room for one.
        refused(lambda: first.load_checkpoint("ten"), "loading a checkpoint", model_bytes(10), m + model_bytes(10))
        assert first.info().num_classes == 10 and held() == m + model_bytes(10)
    assert held() == m  # closed: what it was last counted is free
    default = client.session()  # it has room to load the checkpoint: counted as 10 classes, then as it started
    assert default.load_checkpoint("ten").num_classes == 10
    assert held() == model_bytes(10)
    assert default.reset().num_classes == 1000
    assert held() == m


def test_a_new_head_or_checkpoint_is_counted_as_a_fresh_session_of_its_shape(tmp_path: Path) -> None:
    running = create_server(Settings(port=0, weights="random", memory_budget_bytes=ONE_MORE_SESSION,
                                     checkpoint_dir=str(tmp_path)))
    try:
        with TrainerClient(f"localhost:{running.port}", timeout=120) as client:
            check_a_session_counts_as_a_fresh_one_of_its_shape(client)
    finally:
        running.stop(None).wait()


def test_an_empty_configure_optimizer_is_refused_and_an_empty_create_means_the_default(client: TrainerClient, session: Session) -> None:
    """An empty ConfigureOptimizer silently meant SGD(lr=0.001, momentum=0), unlike a new session's
    SGD(lr=0.01, momentum=0.9)."""
    for request in (pb.ConfigureOptimizerRequest(session_id=session.session_id),
                    pb.ConfigureOptimizerRequest(session_id=session.session_id, optimizer=pb.OptimizerConfig())):
        with pytest.raises(grpc.RpcError) as err:
            client.stub.ConfigureOptimizer(request, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "NO_OPTIMIZER" in str(err.value.trailing_metadata())
    assert (session.info().optimizer.lr, session.info().optimizer.momentum) == (0.01, 0.9)  # unchanged
    response = client.stub.CreateSession(pb.CreateSessionRequest(optimizer=pb.OptimizerConfig()), timeout=120)
    with client.session(response.session.session_id) as empty:
        assert (empty.info().optimizer.lr, empty.info().optimizer.momentum) == (0.01, 0.9)
