"""The fast-path settings (autocast, channels_last) against the same fast path in local PyTorch.

On this CPU-only machine the checks run torch's CPU autocast and CPU channels_last kernels; the
GPU figures are bench/gpu_check.sh's. Each server runs with one setting; local PyTorch does the
same computation with the same weights and inputs, and a float32 run shows the setting took effect.
"""

from __future__ import annotations

import asyncio
import copy
import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from torchvision.models import resnet18

from remote_trainer.client import Session, TrainerClient, TrainerError, cli
from remote_trainer.client.aio import AsyncTrainerClient
from remote_trainer.server.app import TrainerServer, create_server
from remote_trainer.server.settings import Settings, parse_settings
from tests.conftest import WEIGHTS_NAME, rand

ROOT = Path(__file__).resolve().parent.parent

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Each fast path a session may run on (autocast, memory format); tests/test_ray_backend.py runs each on Ray too.
FAST_PATHS = [("bf16", "contiguous"), ("fp16", "contiguous"), ("off", "channels_last")]


@contextlib.contextmanager
def serving(data_dir: Path, **options: object) -> Iterator[tuple[TrainerClient, TrainerServer]]:
    running = create_server(Settings(port=0, weights=str(data_dir / WEIGHTS_NAME), data_dir=str(data_dir), **options))  # type: ignore[arg-type]
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


@pytest.mark.parametrize(("autocast", "memory_format"), FAST_PATHS)
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
        "autocast": "bf16", "channels_last": False, "cudnn_benchmark": False, "pin_memory": False}


# -- per session: CreateSession's autocast and memory_format ----------------------------------------


def remote_step(session: Session, data: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The same step as ``local_step`` on a server session: its logits and every gradient."""
    logits = session.forward(data).logits
    session.backward("sum", labels)
    grads = {name: g.array for name, g in session.gradients().items() if g.array is not None}
    assert logits is not None and logits.dtype == np.float32
    return logits, grads


def assert_fast_path_equal(remote: tuple[np.ndarray, dict[str, np.ndarray]],
                           expected: tuple[torch.Tensor, dict[str, torch.Tensor]]) -> None:
    """Equal to local PyTorch on the same fast path: the server runs the same kernels in this
    process, so to the last bits in practice; the tolerance (as above) allows another reduction order."""
    logits, grads = remote
    np.testing.assert_allclose(logits, expected[0].numpy(), rtol=1e-5, atol=1e-5)
    assert set(grads) == set(expected[1])
    for name, grad in expected[1].items():
        np.testing.assert_allclose(grads[name], grad.float().numpy(), rtol=1e-4, atol=1e-4 * float(grad.abs().max()), err_msg=name)


def assert_bit_identical(remote: tuple[np.ndarray, dict[str, np.ndarray]],
                         expected: tuple[torch.Tensor, dict[str, torch.Tensor]]) -> None:
    logits, grads = remote
    np.testing.assert_array_equal(logits, expected[0].numpy())
    assert set(grads) == set(expected[1])
    for name, grad in expected[1].items():
        np.testing.assert_array_equal(grads[name], grad.numpy(), err_msg=name)


def test_sessions_choose_their_own_fast_path_on_one_server(data_dir: Path, state_dict: dict[str, torch.Tensor]) -> None:
    data, labels = rand(2, 3, 64, 64, seed=7), rand(2, 1000, seed=8)
    float32 = local_step(state_dict, data, labels, None, False)
    with serving(data_dir) as (client, running):  # the server's default: off, contiguous
        with client.create_session(WEIGHTS_NAME, autocast="bf16") as bf16, \
                client.create_session(WEIGHTS_NAME, memory_format="channels_last") as nhwc, \
                client.create_session(WEIGHTS_NAME) as plain:
            assert (bf16.info().autocast, bf16.info().memory_format) == ("bf16", "contiguous")
            assert (nhwc.info().autocast, nhwc.info().memory_format) == ("off", "channels_last")
            assert (plain.info().autocast, plain.info().memory_format) == ("off", "contiguous")
            assert (client.session().info().autocast, client.session().info().memory_format) == ("off", "contiguous")
            # channels_last changes no number on this CPU (its kernels agree to ~5e-6): see the layout.
            conv1 = running.store.get(nhwc.session_id)._model.conv1.weight  # type: ignore[attr-defined]
            assert conv1.is_contiguous(memory_format=torch.channels_last) and not conv1.is_contiguous()

            bf16_step = remote_step(bf16, data, labels)
            assert_fast_path_equal(bf16_step, local_step(state_dict, data, labels, torch.bfloat16, False))
            assert float(np.abs(bf16_step[0] - float32[0].numpy()).max()) > 1e-4  # autocast took effect
            assert_fast_path_equal(remote_step(nhwc, data, labels), local_step(state_dict, data, labels, None, True))
            # The session that chose nothing runs plain float32, untouched by its neighbours' choices.
            assert_bit_identical(remote_step(plain, data, labels), float32)


def test_a_session_may_turn_the_servers_autocast_off(data_dir: Path, state_dict: dict[str, torch.Tensor]) -> None:
    data, labels = rand(2, 3, 64, 64, seed=9), rand(2, 1000, seed=10)
    with serving(data_dir, autocast="fp16", memory_format="channels_last") as (client, _):
        assert (client.session().info().autocast, client.session().info().memory_format) == ("fp16", "channels_last")
        with client.create_session(WEIGHTS_NAME) as inherits, \
                client.create_session(WEIGHTS_NAME, autocast="off", memory_format="contiguous") as plain:
            assert (inherits.info().autocast, inherits.info().memory_format) == ("fp16", "channels_last")
            assert (plain.info().autocast, plain.info().memory_format) == ("off", "contiguous")
            assert_bit_identical(remote_step(plain, data, labels), local_step(state_dict, data, labels, None, False))
            assert_fast_path_equal(remote_step(inherits, data, labels),
                                   local_step(state_dict, data, labels, torch.float16, True))


def test_unknown_fast_path_choices_are_refused_with_a_reason(client: TrainerClient) -> None:
    before = len(client.list_sessions())
    for kwargs, reason, field in (({"autocast": "fp8"}, "BAD_AUTOCAST", "autocast"),
                                  ({"memory_format": "nhwc"}, "BAD_MEMORY_FORMAT", "memory_format")):
        with pytest.raises(TrainerError) as err:
            client.create_session(WEIGHTS_NAME, **kwargs)  # type: ignore[arg-type]
        assert (err.value.code, err.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason)
        assert field in err.value.message and "or empty (the server's)" in err.value.message
    assert len(client.list_sessions()) == before  # nothing was made; the server goes on serving
    with client.create_session(WEIGHTS_NAME, autocast="bf16", memory_format="channels_last") as s:
        assert (s.info().autocast, s.info().memory_format) == ("bf16", "channels_last")


def test_the_async_client_chooses_a_fast_path(target: str) -> None:
    async def main() -> None:
        async with AsyncTrainerClient(target) as client, \
                await client.create_session(WEIGHTS_NAME, autocast="bf16", memory_format="channels_last") as session:
            info = await session.info()
            assert (info.autocast, info.memory_format) == ("bf16", "channels_last")

    asyncio.run(main())


def test_cli_creates_a_session_with_a_fast_path_and_shows_it(capsys: pytest.CaptureFixture[str], target: str) -> None:
    status = cli.main(["--target", target, "--json", "sessions", "create", "--weights", WEIGHTS_NAME,
                       "--autocast", "bf16", "--memory-format", "channels_last"])
    created = json.loads(capsys.readouterr().out)
    assert status == 0 and (created["autocast"], created["memory_format"]) == ("bf16", "channels_last")
    try:
        assert cli.main(["--target", target, "--session", created["session_id"], "info"]) == 0
        assert re.search(r"^fast paths: +autocast bf16, channels_last$", capsys.readouterr().out, re.M)
        with pytest.raises(SystemExit):  # argparse knows the choices
            cli.main(["--target", target, "sessions", "create", "--autocast", "fp8"])
        assert "invalid choice: 'fp8'" in capsys.readouterr().err
    finally:
        assert cli.main(["--target", target, "sessions", "close", created["session_id"]]) == 0


# -- pinned host memory: CUDA only -------------------------------------------------------------------


def test_pin_memory_is_refused_on_a_cpu_device(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--pin-memory", "1", "--device", "cpu"], environ={})
    assert "pin-memory needs a CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_settings(["--backend", "ray"], environ={"TRAINER_PIN_MEMORY": "1"})  # auto, and actors reserve no GPU
    assert "pin-memory needs a CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_settings(["--pin-memory", "2"], environ={})
    assert parse_settings(["--pin-memory", "1", "--device", "cuda"], environ={}).run_options()["pin_memory"] is True


def test_a_server_with_pin_memory_on_this_cpu_does_not_start() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device auto is CUDA, where pin-memory is allowed")
    # --device auto resolves to the CPU only once torch is imported: the default session's engine refuses.
    done = subprocess.run([sys.executable, "-m", "remote_trainer.server", "--port", "0", "--weights", "random",
                           "--pin-memory", "1"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert re.search(r"cannot start: pin-memory needs a CUDA device .* this session's device is cpu", done.stderr), done.stderr


# -- docs/configuration.md's examples, run verbatim ------------------------------------------------------


def page_block(marker: str) -> str:
    found = re.search(rf"<!-- fast-paths: {marker} -->\n```\w+\n(.*?)```", (ROOT / "docs" / "configuration.md").read_text(), re.S)
    assert found, f"docs/configuration.md has no block marked fast-paths: {marker}"
    return found.group(1)


def test_configuration_page_fast_path_examples_run_verbatim(server: TrainerServer, client: TrainerClient) -> None:
    port = f"localhost:{server.port}"
    done = subprocess.run([sys.executable, "-c", page_block("sdk").replace("localhost:50051", port)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "bf16 channels_last"
    float(done.stdout.splitlines()[1])  # the loss
    grpcurl = Path(sys.executable).with_name("grpcurl")
    command = page_block("grpcurl").strip()
    assert command.startswith("grpcurl ")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", command.replace("localhost:50051", port)], cwd=ROOT,
                          env={**os.environ, "PATH": f"{grpcurl.parent}{os.pathsep}{os.environ.get('PATH', '')}"},
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    session = json.loads(done.stdout)["session"]
    assert (session["autocast"], session["memory_format"]) == ("bf16", "channels_last")
    client.session(session["session_id"]).close()
