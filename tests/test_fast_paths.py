"""The fast-path settings (autocast, channels_last) against the same fast path in local PyTorch.

On this CPU-only machine the checks run torch's CPU autocast and CPU channels_last kernels; the
GPU figures are bench/gpu_check.sh's. Each server runs with one setting; local PyTorch does the
same computation with the same weights and inputs, and a float32 run shows the setting took effect.
"""

from __future__ import annotations

import copy
import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models import resnet18

from remote_trainer.client import TrainerClient
from remote_trainer.server.app import TrainerServer, create_server
from remote_trainer.server.settings import Settings, parse_settings
from tests.conftest import WEIGHTS_NAME, rand

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def serving(data_dir: Path, **options: object) -> Iterator[tuple[TrainerClient, TrainerServer]]:
    running = create_server(Settings(port=0, weights=str(data_dir / WEIGHTS_NAME), **options))  # type: ignore[arg-type]
    try:
        with TrainerClient(f"localhost:{running.port}", timeout=120) as client:
            yield client, running
    finally:
        running.stop(None).wait()


def local_step(state_dict: dict[str, torch.Tensor], data: np.ndarray, labels: np.ndarray,
               autocast: torch.dtype | None, channels_last: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Local PyTorch: the model under autocast (loss outside, as a mixed-precision loop does)."""
    model = resnet18()
    model.load_state_dict(copy.deepcopy(state_dict))
    x = torch.from_numpy(data)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
        logits = model(x)
    (logits - torch.from_numpy(labels)).sum().backward()
    return logits.detach().float(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("autocast", "memory_format"), [("bf16", "contiguous"), ("fp16", "contiguous"), ("off", "channels_last")])
def test_a_step_on_a_fast_path_equals_local_pytorch_on_it(
    data_dir: Path, state_dict: dict[str, torch.Tensor], autocast: str, memory_format: str
) -> None:
    data, labels = rand(2, 3, 64, 64, seed=7), rand(2, 1000, seed=8)
    dtype = AUTOCAST.get(autocast)
    expected_logits, expected_grads = local_step(state_dict, data, labels, dtype, memory_format == "channels_last")
    float32_logits, _ = local_step(state_dict, data, labels, None, False)
    with serving(data_dir, autocast=autocast, memory_format=memory_format) as (client, running):
        # channels_last changes no number here (the CPU kernels agree to ~5e-6), so look at the weights.
        conv1 = running.store.get("")._model.conv1.weight  # type: ignore[attr-defined]
        assert conv1.is_contiguous(memory_format=torch.channels_last) == (memory_format == "channels_last")
        s = client.session()
        logits = s.forward(data).logits
        s.backward("sum", labels)
        grads = s.gradients()
    assert logits is not None and logits.dtype == np.float32
    # The server runs the same kernels as this process: equal to local PyTorch on the same fast path
    # (to the last bits in practice; the tolerance allows another reduction order) ...
    np.testing.assert_allclose(logits, expected_logits.numpy(), rtol=1e-5, atol=1e-5)
    for name, grad in expected_grads.items():
        np.testing.assert_allclose(grads[name].array, grad.float().numpy(), rtol=1e-4, atol=1e-4 * float(grad.abs().max()), err_msg=name)
    # ... and, with autocast, measurably not the float32 computation (the setting took effect).
    if dtype is not None:
        assert float(np.abs(logits - float32_logits.numpy()).max()) > 1e-4


def test_fast_path_settings_are_checked() -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--autocast", "fp8"], environ={})
    with pytest.raises(SystemExit):
        parse_settings(["--memory-format", "nhwc"], environ={})
    assert parse_settings([], environ={"TRAINER_AUTOCAST": "bf16"}).run_options() == {
        "autocast": "bf16", "channels_last": False, "cudnn_benchmark": False}
