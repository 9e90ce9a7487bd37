"""The SDK on a thin client: a fresh virtual environment where README's one command installed the
client (``pip install ./protos ./client``) and nothing else, so torch, the server and the engine are not
there to import; it trains against a real server and the numbers match local PyTorch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import WEIGHTS_NAME

ROOT = Path(__file__).resolve().parent.parent

# The thin client's environment: nothing of this interpreter's import path (PYTHONPATH) leaks into it.
THIN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}

SCRIPT = textwrap.dedent(
    """
    import importlib.util
    import sys

    for absent in ("torch", "torchvision", "remote_trainer.server", "remote_trainer.engine"):
        assert importlib.util.find_spec(absent) is None, f"{absent} is installed on the thin client"

    import numpy as np
    from remote_trainer.client import Reason, TrainerClient, TrainerError

    target, weights, out = sys.argv[1:4]
    with TrainerClient(target) as client:
        assert client.health() == "SERVING"
        with client.create_session(weights) as s:
            data = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
            labels = np.random.default_rng(1).random((2, 1000), dtype=np.float32)
            logits = s.forward(data).logits
            result = s.backward("sum", labels)
            s.step()
            grads = s.gradients("fc")
            try:
                s.backward("sum", labels)
            except TrainerError as exc:
                reason = exc.reason
                assert reason is Reason.GRAPH_FREED, repr(reason)
            np.savez(out, data=data, labels=labels, logits=logits, fc_grad=grads["fc.weight"].array,
                     fc_after=s.parameters("fc.weight")["fc.weight"].array, loss=result.loss)
    assert "torch" not in sys.modules and "torchvision" not in sys.modules
    print("ok", reason)
    """
)


@pytest.fixture(scope="module")
def thin_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a fresh venv holding what README's thin-client command installs (from PyPI and the
    repository's folders: grpcio, protobuf and numpy come from the registry, or pip's cache)."""
    venv = tmp_path_factory.mktemp("thin") / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    for folder in ("protos", "client"):  # installed from copies: setuptools leaves build/ beside the sources
        shutil.copytree(ROOT / folder, venv.parent / folder, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "./protos", "./client"],
        cwd=venv.parent, env=THIN_ENV, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return python


def test_sdk_works_without_torch(thin_client: Path, target: str, local: torch.nn.Module, tmp_path: Path) -> None:
    out = tmp_path / "result.npz"
    done = subprocess.run(
        [str(thin_client), "-c", SCRIPT, target, WEIGHTS_NAME, str(out)],
        cwd=tmp_path, env=THIN_ENV, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", "GRAPH_FREED"]

    got = np.load(out)
    prediction = local(torch.from_numpy(got["data"]))
    np.testing.assert_allclose(got["logits"], prediction.detach().numpy(), rtol=1e-5, atol=1e-5)
    loss = (prediction - torch.from_numpy(got["labels"])).sum()
    loss.backward()
    np.testing.assert_allclose(got["loss"], loss.item(), rtol=1e-5)
    np.testing.assert_allclose(got["fc_grad"], local.fc.weight.grad.numpy(), rtol=1e-5, atol=1e-6)  # type: ignore[union-attr]
    torch.optim.SGD(local.parameters(), lr=1e-2, momentum=0.9).step()
    np.testing.assert_allclose(got["fc_after"], local.fc.weight.detach().numpy(), rtol=1e-5, atol=1e-7)
