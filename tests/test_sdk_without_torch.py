"""The SDK on a thin client: a subprocess where importing torch or torchvision fails."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from tests.conftest import WEIGHTS_NAME

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import sys

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision"):
                raise ImportError(f"{name} is not installed on this thin client")
            return None

    sys.meta_path.insert(0, NoTorch())
    try:
        import torch
    except ImportError:
        pass
    else:
        raise SystemExit("torch imported despite the block")

    import numpy as np
    from remote_trainer.client import TrainerClient, TrainerError

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
            np.savez(out, data=data, labels=labels, logits=logits, fc_grad=grads["fc.weight"].array,
                     fc_after=s.parameters("fc.weight")["fc.weight"].array, loss=result.loss)
    assert "torch" not in sys.modules and "torchvision" not in sys.modules
    print("ok", reason)
    """
)


def test_sdk_works_without_torch(target: str, local: torch.nn.Module, tmp_path: Path) -> None:
    out = tmp_path / "result.npz"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, target, WEIGHTS_NAME, str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
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
