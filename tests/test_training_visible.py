"""Training you can see: TensorBoard event files written by the server (read back with TensorBoard's
own reader) and the gradient-flow picture (PNG content checked), both against local PyTorch."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from remote_trainer.client import Session, TrainerClient
from remote_trainer.server.app import TrainerServer, create_server
from remote_trainer.server.settings import Settings
from tests.conftest import WEIGHTS_NAME, rand

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
matplotlib_image = pytest.importorskip("matplotlib.image")

CLI = Path(sys.executable).with_name("trainer-client")


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tensorboard")


@pytest.fixture(scope="module")
def board_server(data_dir: Path, board: Path) -> Iterator[TrainerServer]:
    running = create_server(Settings(port=0, weights="random", data_dir=str(data_dir), tensorboard_dir=str(board),
                                     tensorboard_histograms_every=2))
    yield running
    running.stop(None).wait()


def test_tensorboard_scalars_and_histograms_read_back_equal_the_training(
    board_server: TrainerServer, board: Path, local: nn.Module
) -> None:
    with TrainerClient(f"localhost:{board_server.port}") as client:
        session = client.create_session(WEIGHTS_NAME, optimizer=None)
        session.configure_optimizer(kind="sgd", lr=0.05, momentum=0.9)
        optim = torch.optim.SGD(local.parameters(), lr=0.05, momentum=0.9)
        losses, norms = [], []
        for i in range(2):
            x, y = rand(2, 3, 32, 32, seed=i), rand(2, 1000, seed=10 + i)
            session.zero_grad()
            session.forward(x, stats_only=True)
            result = session.backward("sum", y)
            losses.append(result.loss)
            norms.append(result.grad_norm)
            if i == 1:
                fc_grad = session.gradients("fc.weight")["fc.weight"].array
            session.step()
            optim.zero_grad()
            (local(torch.from_numpy(x)) - torch.from_numpy(y)).sum().backward()
            optim.step()
        session_id = session.session_id
        session.close()  # closes (and flushes) its event file

    events = event_accumulator.EventAccumulator(str(board / session_id), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"loss", "grad_norm", "lr", "step_seconds"} <= set(tags["scalars"])
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [0, 1]
    assert [e.value for e in loss] == pytest.approx(losses, rel=1e-6)
    assert [e.value for e in events.Scalars("grad_norm")] == pytest.approx(norms, rel=1e-6)
    assert [(e.step, e.value) for e in events.Scalars("lr")] == [(1, pytest.approx(0.05)), (2, pytest.approx(0.05))]
    assert all(e.value > 0 for e in events.Scalars("step_seconds"))
    # Histograms at step 2 only (every 2 steps), of every parameter; fc.weight's is the gradient of the second backward.
    assert len([t for t in tags["histograms"] if t.startswith("grad/")]) == 62
    (histogram,) = events.Histograms("grad/fc.weight")
    assert histogram.step == 2
    assert fc_grad is not None
    assert histogram.histogram_value.num == fc_grad.size
    assert histogram.histogram_value.sum == pytest.approx(float(fc_grad.astype(np.float64).sum()), rel=1e-4, abs=1e-3)
    assert histogram.histogram_value.max == pytest.approx(float(fc_grad.max()), rel=1e-6)
    assert local.fc.weight.grad is not None
    np.testing.assert_allclose(fc_grad, local.fc.weight.grad.numpy(), rtol=1e-5, atol=1e-5)


def bar_pixels(png: Path, color: str) -> int:
    """How many pixels of the PNG have exactly the bars' colour."""
    image = matplotlib_image.imread(str(png))[:, :, :3]
    rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)]) / 255
    return int(np.all(np.abs(image - rgb) < 1 / 255, axis=2).sum())


def test_gradient_flow_picture_from_the_sdk_and_the_cli(target: str, session: Session, local: nn.Module, tmp_path: Path) -> None:
    from remote_trainer.client.plots import MAX_COLOR, NORM_COLOR, plot_gradient_flow

    session.freeze("layer1")  # frozen parameters: no gradient, no bars
    x, y = rand(2, 3, 32, 32), rand(2, 1000, seed=1)
    session.forward(x)
    session.backward("sum", y)
    flow = plot_gradient_flow(session, tmp_path / "flow.png")
    local.layer1.requires_grad_(False)
    (local(torch.from_numpy(x)) - torch.from_numpy(y)).sum().backward()
    expected = dict(local.named_parameters())
    assert flow.names == list(expected)
    for name, norm, max_abs in zip(flow.names, flow.norms, flow.max_abs):
        grad = expected[name].grad
        if grad is None:
            assert name.startswith("layer1.") and norm is None and max_abs is None
        else:
            assert norm == pytest.approx(float(grad.norm()), rel=1e-4)
            assert max_abs == pytest.approx(float(grad.abs().max()), rel=1e-5)
    png = (tmp_path / "flow.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    height, width = matplotlib_image.imread(str(tmp_path / "flow.png")).shape[:2]
    assert width > height > 300
    assert bar_pixels(tmp_path / "flow.png", NORM_COLOR) > 500 and bar_pixels(tmp_path / "flow.png", MAX_COLOR) > 500

    done = subprocess.run([str(CLI), "--target", target, "--session", session.session_id, "grads", "fc", "--plot",
                           str(tmp_path / "fc.png")], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert f"wrote the gradient-flow picture to {tmp_path / 'fc.png'}" in done.stdout
    assert (tmp_path / "fc.png").read_bytes().startswith(b"\x89PNG")
    # Two parameters, two pairs of bars: fewer bar pixels than the 44 pairs above, but some of each colour.
    assert bar_pixels(tmp_path / "fc.png", NORM_COLOR) > 500 and bar_pixels(tmp_path / "fc.png", MAX_COLOR) > 500


def test_a_train_step_shows_in_tensorboard_as_a_forward_backward_and_step(
    board_server: TrainerServer, board: Path, local: nn.Module
) -> None:
    """TrainStep (the SDK's train_step, the CLI's step and train) is one call for a whole iteration:
    its loss and gradient norm are written at the step count it started from, lr and step_seconds at
    the one it ended at, as for separate calls, and equal to local PyTorch."""
    with TrainerClient(f"localhost:{board_server.port}") as client:
        session = client.create_session(WEIGHTS_NAME, optimizer=None)
        session.configure_optimizer(kind="sgd", lr=0.05, momentum=0.9)
        optim = torch.optim.SGD(local.parameters(), lr=0.05, momentum=0.9)
        results, local_losses = [], []
        for i in range(2):
            x, y = rand(2, 3, 32, 32, seed=i), rand(2, 1000, seed=10 + i)
            results.append(session.train_step(x, "sum", y, grad_norm=True))
            optim.zero_grad()
            loss = (local(torch.from_numpy(x)) - torch.from_numpy(y)).sum()
            loss.backward()
            local_losses.append(loss.item())
            optim.step()
        session_id = session.session_id
        session.close()

    events = event_accumulator.EventAccumulator(str(board / session_id), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [
        (0, pytest.approx(results[0].loss, rel=1e-6)), (1, pytest.approx(results[1].loss, rel=1e-6))]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(local_losses, rel=1e-5)
    assert [(e.step, e.value) for e in events.Scalars("grad_norm")] == [
        (0, pytest.approx(results[0].grad_norm, rel=1e-6)), (1, pytest.approx(results[1].grad_norm, rel=1e-6))]
    assert [(e.step, e.value) for e in events.Scalars("lr")] == [(1, pytest.approx(0.05)), (2, pytest.approx(0.05))]
    assert [e.step for e in events.Scalars("step_seconds")] == [1, 2]
    assert all(e.value > 0 for e in events.Scalars("step_seconds"))


def test_an_observer_that_fails_never_fails_the_call_nor_silences_the_others(caplog: pytest.LogCaptureFixture) -> None:
    """The server hands every event to ``Observers`` (metrics, TensorBoard): one that raises (a full
    disk under the event files, say) is logged and passed over, so the call it watched keeps its
    status and the observers after it still hear of the event."""
    from remote_trainer.server.events import CallObserver, Observers

    heard: list[tuple[str, object]] = []

    class Failing(CallObserver):
        def call_finished(self, method: str, session_id: str | None, code: str, seconds: float, reason: str = "") -> None:
            raise OSError("no space left on device")

        def backwarded(self, session_id: str, session: Any, loss: float | None, grad_norm: float | None,
                       step_count: int | None = None) -> None:
            raise OSError("no space left on device")

    class Listening(CallObserver):
        def call_finished(self, method: str, session_id: str | None, code: str, seconds: float, reason: str = "") -> None:
            heard.append(("call_finished", code))

        def backwarded(self, session_id: str, session: Any, loss: float | None, grad_norm: float | None,
                       step_count: int | None = None) -> None:
            heard.append(("backwarded", loss))

    observers = Observers(Failing(), Listening())
    observers.call_finished("Step", "s", "OK", 0.1)
    observers.backwarded("s", None, 1.5, None, 3)
    assert heard == [("call_finished", "OK"), ("backwarded", 1.5)]
    failures = [r for r in caplog.records if r.name == "remote_trainer.server.events"]
    assert [r.getMessage() for r in failures] == ["observer Failing failed on call_finished", "observer Failing failed on backwarded"]
