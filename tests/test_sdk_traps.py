"""No traps for a new user of the SDK: an uncaught error reads as ours, not gRPC's internals; no server
at an address says so and what to check; ``configure_optimizer("adam")`` works; a batch too large to
send is refused before it is sent; nothing exported shadows asyncio's ``CancelledError``; the
gradient-flow picture leaves the caller's matplotlib alone."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

import remote_trainer.client
from remote_trainer.client import (
    Cancelled, NotFoundError, ResourceExhaustedError, Session, TrainerClient, TrainerError,
    UnavailableError, errors,
)
from remote_trainer.client.aio import AsyncTrainerClient
from remote_trainer.client.core import MIB
from tests.conftest import WEIGHTS_NAME

ROOT = Path(__file__).resolve().parent.parent


def test_an_uncaught_error_prints_ours_with_no_grpc_traceback_above_it(target: str) -> None:
    script = f"from remote_trainer.client import TrainerClient\nTrainerClient({target!r}).session().freeze('layer9')\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        "remote_trainer.client.errors.NotFoundError: NOT_FOUND: no parameter or module named 'layer9' [PARAMETER_NOT_FOUND]")
    assert "The above exception" not in done.stderr and "During handling" not in done.stderr  # one traceback: ours
    assert "_InactiveRpcError" not in done.stderr and "grpc/_channel.py" not in done.stderr, done.stderr


def test_grpcs_own_error_stays_reachable(session: Session) -> None:
    with pytest.raises(NotFoundError) as caught:
        session.freeze("layer9")
    error = caught.value
    assert error.__cause__ is None and error.__suppress_context__
    assert isinstance(error.rpc_error, grpc.RpcError) and error.rpc_error.code() is grpc.StatusCode.NOT_FOUND


async def _async_freeze(target: str, session_id: str) -> TrainerError:
    async with AsyncTrainerClient(target) as client:
        try:
            await client.session(session_id).freeze("layer9")
        except TrainerError as error:
            return error
    raise AssertionError("the freeze was not refused")


def test_the_asyncio_face_raises_the_same_way(target: str, session: Session) -> None:
    error = asyncio.run(_async_freeze(target, session.session_id))
    assert isinstance(error, NotFoundError) and error.__cause__ is None and error.__suppress_context__
    assert isinstance(error.rpc_error, grpc.RpcError)


@pytest.fixture
def nobody() -> Iterator[str]:
    """An address where no server listens: a port held by a socket that does not listen (refused)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{held.getsockname()[1]}"


def test_no_server_at_the_address_says_so_and_what_to_check(nobody: str) -> None:
    port = nobody.rpartition(":")[2]
    with TrainerClient(nobody, retry=None) as fail_fast, TrainerClient(nobody, timeout=1.0) as waiting:
        for client in (fail_fast, waiting):  # refused at once; or waited for a connection its whole deadline
            with pytest.raises(UnavailableError) as caught:
                client.session().info()
            error = caught.value
            assert error.reason == "SERVER_UNREACHABLE"
            assert f"no server at {nobody} answered" in error.message
            assert f"is it running? (`trainer-server --port {port}` starts one there" in error.message
            assert error.__cause__ is None and error.__suppress_context__


def test_configure_optimizer_takes_a_kind_name(target: str, session: Session) -> None:
    configured = session.configure_optimizer("adam", lr=1e-3, beta1=0.8)
    assert (configured.kind, configured.lr, configured.beta1, configured.beta2) == ("adam", 1e-3, 0.8, 0.999)
    assert session.info().optimizer.kind == "adam"
    assert session.configure_optimizer(kind="sgd", lr=0.1).kind == "sgd"  # as before
    with pytest.raises(ValueError, match="optimizer kind must be one of"):
        session.configure_optimizer("adagrad")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="give the kind once"):
        session.configure_optimizer("adam", kind="sgd")

    async def twin() -> str:
        async with AsyncTrainerClient(target) as client:
            return (await client.session(session.session_id).configure_optimizer("adamw", lr=1e-3)).kind

    assert asyncio.run(twin()) == "adamw"


def test_a_batch_too_large_to_send_is_refused_before_it_is_sent(target: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="remote_trainer.server.status")
    with TrainerClient(target, max_message_bytes=MIB) as client, client.create_session(WEIGHTS_NAME) as session:
        before = len(caplog.records)
        x = np.zeros((2, 3, 256, 256), np.float32)  # 1.5 MiB
        for call in (lambda: session.forward(x), lambda: session.train_step(x, "cross_entropy", [1, 2])):
            with pytest.raises(ResourceExhaustedError) as caught:
                call()
            assert caught.value.reason == "REQUEST_TOO_LARGE"
            assert "an input of shape [2, 3, 256, 256] (float32) is 1.5 MiB, over the 1.0 MiB this client sends" in caught.value.message
        assert not [r for r in caplog.records[before:] if r.getMessage().startswith("rpc=")]  # nothing reached the server
        session.forward(x[:1])  # 0.75 MiB goes, and the session's numbering is as if nothing had happened


def test_nothing_exported_is_called_cancelled_error() -> None:
    """CANCELLED is ``Cancelled`` (google-api-core's name): ``from remote_trainer.client import *``
    in asyncio code leaves ``asyncio.CancelledError`` what ``except CancelledError`` catches."""
    for module in (remote_trainer.client, errors):
        assert not [name for name in dir(module) if name.endswith("CancelledError")], module
    namespace: dict[str, object] = {}
    exec("from asyncio import CancelledError\nfrom remote_trainer.client import *", namespace)  # noqa: S102
    assert namespace["CancelledError"] is asyncio.CancelledError
    assert issubclass(Cancelled, TrainerError) and not issubclass(Cancelled, asyncio.CancelledError)


def test_the_gradient_flow_picture_leaves_the_callers_matplotlib_alone(tmp_path: Path) -> None:
    """Drawn on a ``Figure`` of its own: a notebook's backend is not switched, pyplot not imported."""
    script = textwrap.dedent(f"""
        import sys
        import matplotlib
        matplotlib.use("svg")  # the caller's choice
        from remote_trainer.client.plots import plot_gradient_flow
        from remote_trainer.client.types import NamedTensor, Stats
        grads = {{"fc.weight": NamedTensor("fc.weight", (10, 512), True, Stats(1.5, -0.2, 0.3, 0.0, 0, 5120), None),
                  "fc.bias": NamedTensor("fc.bias", (10,), False, None, None)}}
        flow = plot_gradient_flow(grads, {str(tmp_path / "flow.png")!r})
        print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules, flow.norms)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split(maxsplit=2) == ["svg", "False", "[1.5, None]\n"]
    assert (tmp_path / "flow.png").read_bytes().startswith(b"\x89PNG")
