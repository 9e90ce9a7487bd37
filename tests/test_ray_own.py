"""The Ray backend as a new user starts it: ``trainer-server --backend ray`` with no address, so the
server starts a one-node Ray of its own on this machine (2 cores in CI).

Proven here: the server sizes each session's CPU share so that its own Ray holds ``--max-sessions``
sessions, the default one included, as the local backend does (one more is refused
TOO_MANY_SESSIONS at once, not left waiting for a CPU); two sessions trained at once from two
threads each equal local PyTorch (test_concurrency.py's body); and the local fidelity tests that need
a server's bare address (the asyncio SDK's, RemoteModel.create, the gradient-flow picture through the
CLI) pass here. The other fidelity tests run on a multi-node cluster: tests/test_ray_backend.py.
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray is imported (see test_ray_backend.py)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from remote_trainer.client import TrainerClient, TrainerError  # noqa: E402
from tests.conftest import WEIGHTS_NAME, rand  # noqa: E402
from tests.test_concurrency import run_isolation  # noqa: E402
from tests.test_ray_backend import fixtures_of, ray_cases, run_local_test  # noqa: E402
from tests.test_server_process import ServerLog, start, stop  # noqa: E402

pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# The default session and two more: two sessions trained at once, and no room for a third.
MAX_SESSIONS = 3


@pytest.fixture(scope="module")
def own(data_dir: Path) -> Iterator[tuple[str, ServerLog]]:
    """A server on a Ray of its own (no --ray-address): its address and its log."""
    process, port, log = start("--backend", "ray", "--weights", str(data_dir / WEIGHTS_NAME), "--data-dir", str(data_dir),
                               "--max-sessions", str(MAX_SESSIONS))
    try:
        yield f"localhost:{port}", log
    finally:
        stop(process)


def test_its_own_ray_holds_max_sessions_the_default_included_and_trains_two_at_once(
    own: tuple[str, ServerLog], local: nn.Module, state_dict: dict[str, torch.Tensor]
) -> None:
    target, _ = own
    with TrainerClient(target, timeout=120) as client, client.create_session(WEIGHTS_NAME) as a, \
            client.create_session(WEIGHTS_NAME) as b:
        with pytest.raises(TrainerError) as err:  # the session limit, as on the local backend: not a wait for a CPU
            client.create_session(WEIGHTS_NAME, timeout=30)
        assert (err.value.code, err.value.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_SESSIONS"), err.value
        run_isolation(a, b, local, state_dict)


@pytest.mark.parametrize(("test", "parameters"), ray_cases("own"))
def test_a_local_test_that_needs_an_address(
    own: tuple[str, ServerLog], local: nn.Module, state_dict: dict[str, torch.Tensor], data_dir: Path,
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, test: Callable[..., None], parameters: dict[str, Any],
) -> None:
    target, _ = own
    with TrainerClient(target, timeout=120) as client:
        fixtures: dict[str, Any] = {"target": target, "client": client, "local": local, "state_dict": state_dict,
                                    "data_dir": data_dir, "monkeypatch": monkeypatch, "tmp_path": tmp_path}
        if "session" not in fixtures_of(test):
            run_local_test(test, parameters, fixtures)
            return
        with client.create_session(WEIGHTS_NAME) as session:
            run_local_test(test, parameters, {**fixtures, "session": session})


def test_an_input_through_the_object_store_trains_bit_identically(own: tuple[str, ServerLog], local: nn.Module) -> None:
    """An input over Ray's limit for arguments carried in the task message (100 KiB): Ray puts it into
    the object store (one copy) and the actor computes on a read-only view of that memory; logits,
    the loss and every gradient are local PyTorch's to the last bit (the server's own Ray computes
    with its threads). The other fidelity tests send smaller inputs, carried in the message."""
    data, labels = rand(8, 3, 64, 64, seed=3), rand(8, 1000, seed=4)
    assert data.nbytes > 100 * 1024
    with TrainerClient(own[0], timeout=120) as client, client.create_session(WEIGHTS_NAME) as session:
        logits = session.forward(data).logits
        result = session.backward("sum", labels)
        gradients = session.gradients()
    prediction = local(torch.from_numpy(data))
    loss = (prediction - torch.from_numpy(labels)).sum()
    loss.backward()
    np.testing.assert_array_equal(logits, prediction.detach().numpy())
    assert result.loss == loss.item()
    for name, parameter in local.named_parameters():
        np.testing.assert_array_equal(gradients[name].array, parameter.grad.numpy(), err_msg=name)
