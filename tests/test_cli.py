"""trainer-client against a real server: each command, its output, and one-line errors with exit status 1."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from remote_trainer.client import Session
from remote_trainer.client.cli import main
from remote_trainer.client.graphviz import dot_available
from tests.conftest import assert_equal_to_local, rand

CLI = Path(sys.executable).with_name("trainer-client")


def run(capsys: pytest.CaptureFixture[str], target: str, session: Session | None, *args: str) -> tuple[int, str, str]:
    argv = ["--target", target, *(["--session", session.session_id] if session else []), *args]
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def test_health_and_info(capsys: pytest.CaptureFixture[str], target: str, session: Session) -> None:
    assert run(capsys, target, None, "health") == (0, "SERVING\n", "")
    status, out, _ = run(capsys, target, session, "info", "--parameters")
    assert status == 0
    assert re.search(r"^model: +resnet18$", out, re.M)
    assert re.search(r"^parameters: +62 tensors, 11,689,512 elements$", out, re.M)
    assert re.search(r"^optimizer: +sgd\(lr=0.01, momentum=0.9,", out, re.M)
    assert re.search(r"^layer4\.1\.conv2\.weight +512x512x3x3 +yes +-$", out, re.M)


def rpcs(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The RPCs the server logged (its one line per call, ``rpc=NAME ...``), in order."""
    return [r.getMessage().split()[0].removeprefix("rpc=") for r in caplog.records if r.getMessage().startswith("rpc=")]


def test_step_on_npy_data_prints_the_loss_of_each_step_as_local_pytorch(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, target: str, session: Session, local: nn.Module,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.INFO, logger="remote_trainer.server.status")
    rng = np.random.default_rng(0)
    x, y = rng.random((4, 3, 32, 32), dtype=np.float32), rng.random((4, 1000), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    status, out, err = run(capsys, target, session, "step", "-n", "3", "--batch", "2",
                           "--data", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"), "--progress")
    assert status == 0
    lines = out.splitlines()
    assert [line.split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert "3/3" in err and "#" * 30 in err  # the progress bar, full at the end
    assert rpcs(caplog) == ["DescribeSession"] + ["TrainStep"] * 3  # one call a step
    optim = torch.optim.SGD(local.parameters(), lr=1e-2, momentum=0.9)
    for i, line in enumerate(lines):
        index = np.arange(i * 2, i * 2 + 2) % 4
        optim.zero_grad()
        loss = (local(torch.from_numpy(x[index])) - torch.from_numpy(y[index])).sum()
        loss.backward()
        optim.step()
        assert float(line.split()[3]) == pytest.approx(loss.item(), rel=1e-5, abs=1e-4)
    assert session.info().step_count == 3


def test_step_on_generated_data_with_cross_entropy(capsys: pytest.CaptureFixture[str], target: str, session: Session) -> None:
    status, out, err = run(capsys, target, session, "step", "-n", "2", "--loss", "cross_entropy", "--size", "32")
    assert status == 0 and err == ""
    assert len(out.splitlines()) == 2 and all(0 < float(line.split()[3]) < 20 for line in out.splitlines())


def test_freeze_replace_head_grads_and_save(
    capsys: pytest.CaptureFixture[str], target: str, session: Session, local: nn.Module, tmp_path: Path
) -> None:
    assert run(capsys, target, session, "replace-head", "10", "--seed", "3")[0] == 0
    status, out, _ = run(capsys, target, session, "freeze", "*")
    assert status == 0 and out.startswith("froze 62 parameters; 0 trainable, 62 frozen")
    status, out, _ = run(capsys, target, session, "freeze", "--unfreeze", "fc")
    assert status == 0 and "trainable: fc.weight, fc.bias" in out
    info = session.info()
    assert (info.num_classes, info.trainable_parameters) == (10, 2)

    rng = np.random.default_rng(1)
    x, y = rng.random((2, 3, 32, 32), dtype=np.float32), rng.random((2, 10), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    assert run(capsys, target, session, "step", "--batch", "2", "--data", str(tmp_path / "x.npy"),
               "--labels", str(tmp_path / "y.npy"))[0] == 0
    status, out, _ = run(capsys, target, session, "grads", "fc", "layer4.1.bn2.bias", "--save", str(tmp_path / "g.npz"))
    assert status == 0
    assert re.search(r"^fc\.weight +10x512 +\d", out, re.M)
    assert re.search(r"^layer4\.1\.bn2\.bias +512 +no grad$", out, re.M)
    assert "2 of 3 parameters have a gradient" in out
    saved = np.load(tmp_path / "g.npz")
    assert sorted(saved.files) == ["fc.bias", "fc.weight"]
    # The same finetuning step in local PyTorch: frozen backbone, seeded 10-class head, the tutorial's loss.
    local.requires_grad_(False)
    torch.manual_seed(3)
    local.fc = nn.Linear(512, 10)
    (local(torch.from_numpy(x)) - torch.from_numpy(y)).sum().backward()
    assert_equal_to_local(saved["fc.weight"], local.fc.weight.grad)  # type: ignore[arg-type]
    assert_equal_to_local(saved["fc.bias"], local.fc.bias.grad)  # type: ignore[arg-type]


def test_graph_summary_dot_and_image(capsys: pytest.CaptureFixture[str], target: str, session: Session, tmp_path: Path) -> None:
    status, out, _ = run(capsys, target, session, "graph", "--dot", str(tmp_path / "g.dot"))
    assert status == 0
    assert re.search(r"^forward 1: \d+ nodes, \d+ edges; 62 leaf parameters, 0 excluded \(frozen\)$", out, re.M)
    assert "ConvolutionBackward0 x20" in out
    dot = (tmp_path / "g.dot").read_text()
    assert dot.startswith('digraph "autograd"')
    names = [p.name for p in session.list_parameters().parameters]
    assert len(names) == 62 and all(f'label="{name}", fillcolor="#a8d4ff"' in dot for name in names)  # every leaf, in blue
    # BatchNorm statistics were left alone (an eval-mode forward), and the graph is the pending forward's.
    status, out, _ = run(capsys, target, session, "graph", "--pending", "--dot", "-")
    assert status == 0 and out.startswith('digraph "autograd"')


def test_graph_image(capsys: pytest.CaptureFixture[str], target: str, session: Session, tmp_path: Path) -> None:
    if not dot_available():
        pytest.skip("Graphviz's dot is not installed, so no image can be drawn")
    session.forward(rand(2, 3, 32, 32))
    status, out, _ = run(capsys, target, session, "graph", "--pending", "--image", str(tmp_path / "g.png"))
    assert status == 0
    assert (tmp_path / "g.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--session", "no-such-session", "info"], "trainer-client: error: NOT_FOUND: "),
        (["grads", "no_such_layer"], "trainer-client: error: NOT_FOUND: no parameter or module named 'no_such_layer' [PARAMETER_NOT_FOUND]"),
        (["replace-head", "0"], "trainer-client: error: INVALID_ARGUMENT: num_classes must be in 1..100000, got 0 [BAD_NUM_CLASSES]"),
        (["step", "--data", "/no/such.npy", "--labels", "/no/such.npy"], "trainer-client: error: cannot read --data /no/such.npy: "),
        (["step", "--size", "0"], "trainer-client: error: INVALID_ARGUMENT: input images must be at least 1x1 (resnet18's 7x7 conv1 with padding 3), got 0x0 [IMAGE_TOO_SMALL]"),
    ],
)
def test_failures_exit_1_with_one_line(
    capsys: pytest.CaptureFixture[str], target: str, session: Session, args: list[str], expected: str
) -> None:
    status = main(["--target", target, *([] if "--session" in args else ["--session", session.session_id]), *args])
    out, err = capsys.readouterr()
    assert status == 1 and out == ""
    assert err.startswith(expected) and err.count("\n") == 1, err


def test_entry_point_help_and_unreachable_server() -> None:
    done = subprocess.run([str(CLI), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0
    commands = ("health", "info", "step", "grads", "freeze", "replace-head", "graph",
                "sessions", "reset", "optimizer", "zero-grad", "checkpoint", "predict", "train", "watch")
    listed = re.findall(r"^    (\S+) ", done.stdout, re.M)
    assert tuple(listed) == commands  # every command, in this order
    module = subprocess.run([sys.executable, "-m", "remote_trainer.client.cli", "--help"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert (module.returncode, module.stdout) == (0, done.stdout)
    done = subprocess.run([str(CLI), "step", "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and "--loss {sum,cross_entropy,mse}" in done.stdout

    done = subprocess.run([str(CLI), "--target", "127.0.0.1:1", "--timeout", "5", "health"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("trainer-client: error: UNAVAILABLE: no server at 127.0.0.1:1 answered within 5 s") \
        and done.stderr.count("\n") == 1
    assert "is it running? (`trainer-server --port 1` starts one there" in done.stderr

    done = subprocess.run([str(CLI), "no-such-command"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "invalid choice" in done.stderr


def test_a_port_nothing_listens_on_is_told_within_the_connect_budget() -> None:
    """The real CLI with its default deadline (120 s a call) pointed at a port where nothing listens:
    it waits for the server only --connect-timeout (5 s), then says there is none and exits 1."""
    with socket.socket() as held:  # bound and never listening: connections are refused, and no one else takes it
        held.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{held.getsockname()[1]}"
        process = subprocess.Popen([str(CLI), "--target", target, "info"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        try:
            out, err = process.communicate(timeout=60)  # its exit; far less than the calls' 120 s
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise
    assert process.returncode == 1 and out == ""
    assert err.startswith(f"trainer-client: error: UNAVAILABLE: no server at {target} answered within 5 s") \
        and err.count("\n") == 1, err
    assert "--connect-timeout SECONDS" in subprocess.run([str(CLI), "--help"], capture_output=True, text=True,
                                                         timeout=60, check=True).stdout


@pytest.mark.parametrize("args", [["info"], ["step", "-n", "2", "--batch", "2", "--size", "32"]])
def test_a_reader_that_stops_reading_ends_the_command_quietly(target: str, session: Session, args: list[str]) -> None:
    """``trainer-client info | head -3``: once the reader has gone, the command stops, with status 0
    and not a word (no "[Errno 32] Broken pipe", no "Exception ignored")."""
    read, write = os.pipe()
    os.close(read)  # the reader has gone before the first line is written
    try:
        done = subprocess.run([str(CLI), "--target", target, "--session", session.session_id, *args], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120, check=False)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (0, "")


def test_a_batch_too_large_to_send_is_refused_before_it_is_made(target: str, session: Session) -> None:
    """100000 images of 3x64x64 float32 are 4.6 GiB: refused at once from the shape, never generated
    (the command runs with 3 GiB of address space)."""
    command = f"ulimit -v 3000000; exec {CLI} --target {target} --session {session.session_id} step --batch 100000"
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, check=False)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.startswith("trainer-client: error: RESOURCE_EXHAUSTED: an input of shape [100000, 3, 64, 64] (float32) "
                                  "is 4,687.5 MiB, over the 512.0 MiB this client sends in one message"), done.stderr
    assert done.stderr.rstrip().endswith("send smaller batches [REQUEST_TOO_LARGE]") and done.stderr.count("\n") == 1
