"""Shared fixtures: weight files made here, a real server on a free port, and local reference models.

Every numeric test compares the server with the same computation in local PyTorch, with the same
weights file and inputs.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models import resnet18

from remote_trainer.client import Session, TrainerClient
from remote_trainer.server.app import TrainerServer, create_server
from remote_trainer.server.settings import Settings

WEIGHTS_NAME = "resnet18-test.pt"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's data directory, holding a resnet18 state_dict with non-trivial BatchNorm statistics."""
    root = tmp_path_factory.mktemp("data")
    torch.manual_seed(1234)
    model = resnet18()
    with torch.no_grad():  # give BatchNorm non-default affine values and running statistics
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), root / WEIGHTS_NAME)
    return root


@pytest.fixture(scope="session")
def state_dict(data_dir: Path) -> dict[str, torch.Tensor]:
    """The test weights, as local PyTorch loads them."""
    return torch.load(data_dir / WEIGHTS_NAME, weights_only=True)


@pytest.fixture(scope="session")
def server(data_dir: Path) -> Iterator[TrainerServer]:
    """A real server on a free port, its default session on the test weights."""
    running = create_server(
        Settings(port=0, weights=str(data_dir / WEIGHTS_NAME), data_dir=str(data_dir), max_sessions=12)
    )
    yield running
    running.stop(None).wait()


@pytest.fixture(scope="session")
def target(server: TrainerServer) -> str:
    return f"localhost:{server.port}"


@pytest.fixture
def client(target: str) -> Iterator[TrainerClient]:
    with TrainerClient(target, timeout=120) as c:
        yield c


@pytest.fixture
def session(client: TrainerClient) -> Iterator[Session]:
    """A fresh session on the test weights, with the tutorial's SGD(lr=0.01, momentum=0.9); closed afterwards."""
    with client.create_session(WEIGHTS_NAME) as s:
        yield s


@pytest.fixture
def local(state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A local resnet18 with the same weights as a fresh session."""
    model = resnet18()
    model.load_state_dict(copy.deepcopy(state_dict))
    return model


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    """A float32 array of uniform [0, 1) numbers."""
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def assert_equal_to_local(remote: np.ndarray | None, local: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """The server's array equals local PyTorch's tensor within the tests' tolerance.

    Server and test run the same kernels in one process, so results agree to the last bit in
    practice; the tolerance only leaves room for a different reduction order (thread scheduling).
    """
    assert remote is not None
    expected = local.detach().cpu().numpy()
    assert remote.shape == expected.shape
    np.testing.assert_allclose(remote, expected, rtol=rtol, atol=atol * max(1.0, float(np.abs(expected).max(initial=0))))
