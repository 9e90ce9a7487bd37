"""The checkpoint quota (``--max-checkpoint-bytes``) and DeleteCheckpoint, through real servers.

A quota bounds the bytes of one owner's checkpoint folder (a token's own folder; the whole folder
without tokens): a save past it is refused RESOURCE_EXHAUSTED ``CHECKPOINT_QUOTA`` and leaves no file
behind, the file it replaces counts as freed, automatic checkpoints count and one past the quota
never fails its step, and DeleteCheckpoint gives the bytes back. Filler files stand for other
checkpoints where a test needs the folder at a given size (the quota counts every file's size).
"""

from __future__ import annotations

import logging
import resource
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from remote_trainer.client import Session, TrainerClient, TrainerError, core
from remote_trainer.client.errors import NotFoundError
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb
from remote_trainer.engine import checkpoints
from remote_trainer.server.app import TrainerServer, create_server
from remote_trainer.server.settings import Settings
from tests.conftest import rand
from tests.grpc_proxy import Proxy
from tests.test_server_process import start, stop

TOKENS = "alice:tok-alice,bob:tok-bob"
QUOTA = 100_000_000  # two fresh resnet18 checkpoints (46.8 MB each) fit, three do not


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def quota_server(folder: Path) -> Iterator[TrainerServer]:
    running = create_server(Settings(port=0, weights="random", checkpoint_dir=str(folder), tokens=TOKENS,
                                     max_checkpoint_bytes=QUOTA))
    yield running
    running.stop(None).wait()


def connect(server: TrainerServer, token: str) -> TrainerClient:
    return TrainerClient(f"localhost:{server.port}", token=token, timeout=120)


def expect_error(call: object, code: grpc.StatusCode, reason: str) -> TrainerError:
    assert callable(call)
    with pytest.raises(TrainerError) as err:
        call()
    assert (err.value.code, err.value.reason) == (code, reason), err.value
    return err.value


def filler(path: Path, size: int) -> None:
    """A file of ``size`` bytes (sparse: it takes no disk) standing for other checkpoints."""
    with open(path, "wb") as f:
        f.truncate(size)


def names(folder: Path) -> list[str]:
    """Every file in the folder, hidden ones (temporaries) included."""
    return sorted(p.name for p in folder.iterdir())


def test_a_save_past_the_quota_is_refused_leaving_nothing_and_an_overwrite_frees_its_file(
    quota_server: TrainerServer, folder: Path
) -> None:
    with connect(quota_server, "tok-alice") as alice, connect(quota_server, "tok-bob") as bob:
        mine = alice.session()
        mine.save_checkpoint("a.ckpt")
        own = folder / "alice"
        size = (own / "a.ckpt").stat().st_size
        least = checkpoints.least_bytes(torch.load(own / "a.ckpt", weights_only=True))
        assert 0 < least < size  # the tensors, and torch.save's framing around them
        # Room for a second copy between the least it can be and its real size: the save is refused
        # only once its temporary file is written, which then goes.
        room = least + (size - least) // 2
        filler(own / "filler.bin", QUOTA - size - room)
        err = expect_error(lambda: mine.save_checkpoint("b.ckpt"), grpc.StatusCode.RESOURCE_EXHAUSTED, "CHECKPOINT_QUOTA")
        used = QUOTA - room
        assert f"saving 'b.ckpt' ({size:,} bytes)" in err.message and f"quota of {QUOTA:,} ({used:,} used now)" in err.message
        assert "DeleteCheckpoint" in err.message and str(folder) not in err.message
        assert err.metadata == {"used_bytes": str(used), "quota_bytes": str(QUOTA), "size_bytes": str(size)}
        assert names(own) == ["a.ckpt", "filler.bin"]  # no b.ckpt, no temporary file
        # Replacing a.ckpt frees its bytes: the same save under its own name fits.
        mine.save_checkpoint("a.ckpt")
        assert names(own) == ["a.ckpt", "filler.bin"]
        # Another owner's folder is not this one's quota.
        theirs = bob.session()
        theirs.save_checkpoint("a.ckpt")
        theirs.save_checkpoint("b.ckpt")
        assert names(folder / "bob") == ["a.ckpt", "b.ckpt"]
        # DeleteCheckpoint gives the bytes back.
        assert alice.delete_checkpoint("filler.bin") == QUOTA - size - room
        mine.save_checkpoint("b.ckpt")
        assert names(own) == ["a.ckpt", "b.ckpt"]
        for client in (alice, bob):
            for name in ("a.ckpt", "b.ckpt"):
                client.delete_checkpoint(name)


def test_a_save_that_certainly_does_not_fit_writes_nothing(tmp_path: Path) -> None:
    """The tensors alone pass a 1 MB quota: refused before anything is written. The server may not
    write a file past 1 MiB (RLIMIT_FSIZE), so a save that wrote first would fail DISK_FULL instead.
    Without tokens the quota is the whole folder's."""

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    process, port, _ = start("--weights", "random", "--checkpoint-dir", str(tmp_path), "--max-checkpoint-bytes", "1000000",
                             preexec_fn=small_files)
    try:
        with TrainerClient(f"localhost:{port}", timeout=120) as client:
            err = expect_error(lambda: client.session().save_checkpoint("big.ckpt"), grpc.StatusCode.RESOURCE_EXHAUSTED,
                               "CHECKPOINT_QUOTA")
            assert "saving 'big.ckpt' (at least " in err.message and "over the quota of 1,000,000 (0 used now)" in err.message
    finally:
        stop(process)
    assert names(tmp_path) == []


def test_delete_own_missing_other_owners_and_repeated(quota_server: TrainerServer, folder: Path) -> None:
    with connect(quota_server, "tok-alice") as alice, connect(quota_server, "tok-bob") as bob:
        alice.session().save_checkpoint("mine.ckpt")
        path = folder / "alice" / "mine.ckpt"
        size = path.stat().st_size
        # Bob names it in his own folder, where there is none; he cannot reach alice's.
        expect_error(lambda: bob.delete_checkpoint("mine.ckpt"), grpc.StatusCode.NOT_FOUND, "CHECKPOINT_NOT_FOUND")
        expect_error(lambda: bob.delete_checkpoint("../alice/mine.ckpt"), grpc.StatusCode.INVALID_ARGUMENT,
                     "PATH_OUTSIDE_DATA_DIR")
        assert path.is_file()
        # A repeat with the same client_token (a retry whose answer was lost) is answered as the first.
        request = pb.DeleteCheckpointRequest(name="mine.ckpt", client_token="delete-1")
        for _ in range(2):
            assert alice.call(alice.stub.DeleteCheckpoint, request) == pb.DeleteCheckpointResponse(name="mine.ckpt",
                                                                                                     size_bytes=size)
        assert not path.exists() and alice.list_checkpoints() == []
        # A new delete of it: there is none.
        err = expect_error(lambda: alice.delete_checkpoint("mine.ckpt"), grpc.StatusCode.NOT_FOUND, "CHECKPOINT_NOT_FOUND")
        assert err.message == "no checkpoint 'mine.ckpt'"


def test_a_delete_retried_after_a_lost_answer_is_answered_as_the_first(tmp_path: Path) -> None:
    """The SDK's retry carries the first attempt's client_token: the server answers it with the bytes
    the first one freed, where a new delete would be NOT_FOUND. (Where the token is not remembered,
    a retry's CHECKPOINT_NOT_FOUND reads as deleted.)"""
    running = create_server(Settings(port=0, weights="random", checkpoint_dir=str(tmp_path)))
    proxy = Proxy(f"localhost:{running.port}")
    try:
        (tmp_path / "x.ckpt").write_bytes(b"12345")
        proxy.faults = {"DeleteCheckpoint": ["drop_answer"]}
        with TrainerClient(proxy.target, timeout=60) as client:
            assert client.delete_checkpoint("x.ckpt") == 5
        assert proxy.injected == 1 and not (tmp_path / "x.ckpt").exists()
        tokens = {pb.DeleteCheckpointRequest.FromString(data).client_token for data in proxy.sent("DeleteCheckpoint")}
        assert len(proxy.sent("DeleteCheckpoint")) == 2 and len(tokens) == 1 and "" not in tokens
    finally:
        proxy.stop()
        running.stop(None).wait()
    call = core.delete_checkpoint("x.ckpt")
    assert call.done_if is not None
    assert call.parse(call.done_if(NotFoundError("no checkpoint 'x.ckpt'", "CHECKPOINT_NOT_FOUND"))) == 0
    assert call.done_if(NotFoundError("no such session", "SESSION_NOT_FOUND")) is None


def test_delete_without_a_checkpoint_directory_says_so(client: TrainerClient) -> None:
    expect_error(lambda: client.delete_checkpoint("x.ckpt"), grpc.StatusCode.FAILED_PRECONDITION, "NO_CHECKPOINT_DIR")


def one_step(session: Session) -> int:
    return session.train_step(rand(2, 3, 32, 32), "sum", rand(2, 1000)).step_count


def test_automatic_checkpoints_count_and_one_past_the_quota_does_not_fail_its_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--checkpoint-every 1, --keep-auto-checkpoints 1: a new automatic checkpoint fits because the
    one it pushes out counts as freed; one past the quota is logged and skipped, its step answered."""
    quota = 250_000_000  # two checkpoints with momentum buffers (93.6 MB each) fit
    running = create_server(Settings(port=0, weights="random", checkpoint_dir=str(tmp_path), tokens=TOKENS,
                                     checkpoint_every=1, keep_auto_checkpoints=1, max_checkpoint_bytes=quota))
    own = tmp_path / "alice"
    try:
        with connect(running, "tok-alice") as alice, alice.create_session() as first, alice.create_session() as second:
            one_step(first)
            size = (own / f"auto-{first.session_id}.ckpt").stat().st_size
            filler(own / "filler.bin", quota - size - size // 2)  # room for half a checkpoint
            # The second session's checkpoint fits only with the first one's bytes counted as freed.
            one_step(second)
            assert names(own) == sorted([f"auto-{second.session_id}.ckpt", "filler.bin"])
            assert (own / f"auto-{second.session_id}.ckpt").stat().st_size == size
            # Now past the quota even with its own file freed: the step is done, the checkpoint not.
            filler(own / "filler.bin", quota - size // 2)
            with caplog.at_level(logging.WARNING, logger="remote_trainer.server.servicer"):
                assert one_step(second) == 2
            (warning,) = [r.getMessage() for r in caplog.records if "automatic checkpoint" in r.getMessage()]
            assert warning.startswith(f"automatic checkpoint auto-{second.session_id}.ckpt at step 2 not written: "
                                      f"checkpoint quota: saving 'auto-{second.session_id}.ckpt' (at least ")
            assert f"over the quota of {quota:,} ({quota - size // 2 + size:,} used now)" in warning
            assert names(own) == sorted([f"auto-{second.session_id}.ckpt", "filler.bin"])  # no temporary file
            assert torch.load(own / f"auto-{second.session_id}.ckpt", weights_only=True)["step_count"] == 1  # the last that fitted
            alice.delete_checkpoint("filler.bin")
            assert one_step(second) == 3
            written = torch.load(own / f"auto-{second.session_id}.ckpt", weights_only=True)
            assert written["step_count"] == 3
            np.testing.assert_array_equal(written["model"]["fc.bias"].numpy(), second.parameters("fc.bias")["fc.bias"].array)
    finally:
        running.stop(None).wait()
