"""The rest of trainer-client, run as the console script against a real server: sessions,
optimizer, zero-grad, checkpoints, predict, reset and train; tables for people and --json for
scripts, the numbers compared with local PyTorch; and docs/cli.md's command-line walk-through, run as
written, printing what the page shows (README's one command-line example is the walk-through's start)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torchvision import transforms

from remote_trainer.client import TrainerClient
from remote_trainer.client.cli import PROG
from remote_trainer.server.app import TrainerServer, create_server
from remote_trainer.server.settings import Settings
from tests.conftest import WEIGHTS_NAME
from tests.shown_output import assert_shown

CLI = Path(sys.executable).with_name("trainer-client")
ROOT = Path(__file__).resolve().parent.parent
README_TARGET = "localhost:50051"
# A console block of docs/cli.md: ``$ COMMAND`` lines, each followed by what it prints.
CLI_PAGE = ROOT / "docs" / "cli.md"
CONSOLE_BLOCK = re.compile(r"<!-- cli: ([\w-]+) -->\n```console\n(.*?)```", re.S)


@pytest.fixture(scope="module")
def cli_server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainerServer]:
    """A server with a checkpoint directory; its default session on the test weights."""
    running = create_server(Settings(
        port=0, weights=str(data_dir / WEIGHTS_NAME), data_dir=str(data_dir),
        checkpoint_dir=str(tmp_path_factory.mktemp("checkpoints")), max_sessions=8,
    ))
    yield running
    running.stop(None).wait()


@pytest.fixture
def cli(cli_server: TrainerServer) -> Iterator[Any]:
    """Runs `trainer-client --target ... ARGS` as a subprocess: (exit status, stdout, stderr)."""
    target = f"localhost:{cli_server.port}"

    def run(*args: str) -> tuple[int, str, str]:
        done = subprocess.run([str(CLI), "--target", target, *args], capture_output=True, text=True, timeout=300, check=False)
        return done.returncode, done.stdout, done.stderr

    yield run


def as_json(result: tuple[int, str, str]) -> Any:
    status, out, err = result
    assert status == 0, err
    return json.loads(out)


def new_session(cli: Any) -> str:
    session_id: str = as_json(cli("--json", "sessions", "create", "--weights", WEIGHTS_NAME))["session_id"]
    return session_id


def test_sessions_create_list_close(cli: Any) -> None:
    created = as_json(cli("--json", "sessions", "create", "--weights", WEIGHTS_NAME, "--num-classes", "10", "--seed", "2"))
    sid = created["session_id"]
    assert (created["num_classes"], created["is_default"], created["weights"]) == (10, False, WEIGHTS_NAME)
    listed = as_json(cli("--json", "sessions"))
    assert listed[0]["session_id"] == "default" and listed[0]["is_default"]
    assert sid in [s["session_id"] for s in listed]
    status, out, _ = cli("sessions", "list")
    assert status == 0
    assert re.match(r"^id +weights +classes +steps +trainable +frozen +optimizer$", out.splitlines()[0])
    assert re.search(rf"^{sid} +{WEIGHTS_NAME} +10 +0 +62 +0 +sgd\(lr=0.01, momentum=0.9,", out, re.M)
    assert cli("sessions", "close", sid) == (0, f"closed session {sid}\n", "")
    assert sid not in [s["session_id"] for s in as_json(cli("--json", "sessions"))]


def test_optimizer_set_then_train_on_npz_equals_local_adam(
    cli: Any, local: nn.Module, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sid = new_session(cli)
    shown = as_json(cli("--json", "--session", sid, "optimizer"))
    assert shown == {"kind": "sgd", "lr": 0.01, "momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}
    status, out, _ = cli("--session", sid, "optimizer", "set", "--kind", "adam", "--lr", "0.001", "--weight-decay", "0.01")
    assert status == 0 and "kind:         adam" in out and "lr:           0.001" in out
    # Same kind: the values not given stay.
    assert as_json(cli("--json", "--session", sid, "optimizer", "set", "--beta1", "0.8"))["weight_decay"] == 0.01

    rng = np.random.default_rng(0)
    x, y = rng.random((6, 3, 32, 32), dtype=np.float32), rng.integers(0, 1000, 6)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    caplog.set_level(logging.INFO, logger="remote_trainer.server.status")
    status, out, err = cli("--session", sid, "train", "-n", "3", "--batch", "3", "--data", str(tmp_path / "d.npz"), "--progress")
    assert status == 0, err
    calls = [r.getMessage().split()[0] for r in caplog.records if r.getMessage().startswith("rpc=")]
    assert calls == ["rpc=DescribeSession"] + ["rpc=TrainStep"] * 3  # one call a step
    assert "#" * 30 in err and "3/3" in err  # the progress bar, full at the end
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["1/3", "2/3", "3/3"]
    optim = torch.optim.Adam(local.parameters(), lr=1e-3, betas=(0.8, 0.999), weight_decay=0.01)
    for i, line in enumerate(steps):
        index = np.arange(i * 3, i * 3 + 3) % 6
        optim.zero_grad()
        loss = nn.functional.cross_entropy(local(torch.from_numpy(x[index])), torch.from_numpy(y[index]))
        loss.backward()
        optim.step()
        assert float(line.split()[3]) == pytest.approx(loss.item(), rel=1e-5, abs=1e-5)
    assert re.search(r"^steps +3$", out, re.M)
    assert re.search(r"^loss +\S+ -> \S+ \(min \S+\)$", out, re.M)
    assert re.search(r"^session steps +3$", out, re.M)

    record = as_json(cli("--json", "--session", sid, "train", "-n", "1", "--batch", "2", "--size", "32", "--loss", "mse"))
    assert record["summary"]["steps"] == 1 and record["summary"]["step_count"] == 4 and record["steps"][0]["loss"] > 0
    cli("sessions", "close", sid)


def test_zero_grad_and_checkpoints_save_list_load_delete(cli: Any, cli_server: TrainerServer) -> None:
    sid = new_session(cli)
    with TrainerClient(f"localhost:{cli_server.port}") as client:
        session = client.session(sid)
        assert cli("--session", sid, "train", "-n", "2", "--batch", "2", "--size", "32")[0] == 0
        assert all(p.has_grad for p in session.list_parameters().parameters)
        assert cli("--session", sid, "zero-grad", "--to-zeros") == (
            0, "cleared the .grad of 62 parameters (set to zeros)\n", "")
        assert session.gradients("fc.bias")["fc.bias"].stats.norm == 0.0  # type: ignore[union-attr]
        assert as_json(cli("--json", "--session", sid, "zero-grad")) == {"parameters_cleared": 62, "set_to_none": True}
        assert not any(p.has_grad for p in session.list_parameters().parameters)

        assert cli("--session", sid, "checkpoint", "save", "two.ckpt") == (0, "saved checkpoint two.ckpt at step 2\n", "")
        before = session.parameters("fc.weight")["fc.weight"].array
        cli("--session", sid, "train", "-n", "1", "--batch", "2", "--size", "32")
        files = as_json(cli("--json", "checkpoint", "list"))
        assert [f["name"] for f in files] == ["two.ckpt"]
        assert files[0]["size_bytes"] == (Path(cli_server.servicer._checkpoint_dir) / "two.ckpt").stat().st_size
        status, out, _ = cli("checkpoint", "list")
        assert status == 0 and re.search(r"^two\.ckpt +[\d,]+ +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$", out, re.M)
        status, out, _ = cli("--session", sid, "checkpoint", "load", "two.ckpt")
        assert status == 0 and out.startswith("loaded checkpoint two.ckpt: step 2, 1000 classes")
        np.testing.assert_array_equal(session.parameters("fc.weight")["fc.weight"].array, before)
        size = files[0]["size_bytes"]
        assert cli("checkpoint", "delete", "two.ckpt") == (0, f"deleted checkpoint two.ckpt ({size:,} bytes)\n", "")
        assert as_json(cli("--json", "checkpoint", "list")) == []
        status, _, err = cli("checkpoint", "delete", "two.ckpt")
        assert status == 1 and "NOT_FOUND: no checkpoint 'two.ckpt' [CHECKPOINT_NOT_FOUND]" in err
    cli("sessions", "close", sid)


def test_predict_top_k_equals_local_softmax(cli: Any, local: nn.Module, tmp_path: Path) -> None:
    sid = new_session(cli)
    x = np.random.default_rng(4).random((2, 3, 48, 48), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    predicted = as_json(cli("--json", "--session", sid, "predict", "--data", str(tmp_path / "x.npy"), "--top", "3"))
    local.eval()
    with torch.no_grad():
        probabilities = torch.softmax(local(torch.from_numpy(x)).double(), dim=1)
    top = torch.topk(probabilities, 3, dim=1)
    for image, row in enumerate(predicted):
        assert [p["class"] for p in row] == top.indices[image].tolist()
        assert [p["probability"] for p in row] == pytest.approx(top.values[image].tolist(), rel=1e-4)
    status, out, _ = cli("--session", sid, "predict", "--data", str(tmp_path / "x.npy"), "--top", "2")
    lines = out.splitlines()
    assert status == 0 and re.match(r"^image +rank +class +probability +logit$", lines[0]) and len(lines) == 5
    assert lines[1].split()[:3] == ["0", "1", str(top.indices[0, 0].item())]
    cli("sessions", "close", sid)


def test_reset_from_the_shell_and_its_refusal_for_other_sessions(cli: Any) -> None:
    assert cli("replace-head", "10")[0] == 0
    assert cli("freeze", "layer1")[0] == 0
    status, out, _ = cli("reset")
    assert status == 0
    assert out.startswith("session default reset to how the server started it: resnet18, weights resnet18-test.pt, 1000 classes, "
                          "step 0, 62 trainable parameters, sgd(lr=0.01, momentum=0.9")
    sid = new_session(cli)
    status, out, err = cli("--session", sid, "reset")
    assert (status, out) == (1, "")
    assert err.startswith("trainer-client: error: FAILED_PRECONDITION: only the default session can be reset") and err.count("\n") == 1
    assert "[RESET_NOT_AVAILABLE]" in err
    cli("sessions", "close", sid)


def test_json_of_the_older_commands(cli: Any) -> None:
    assert as_json(cli("--json", "health")) == {"status": "SERVING"}
    assert as_json(cli("health", "--json")) == {"status": "SERVING"}  # after the command too
    info = as_json(cli("--json", "info"))
    assert info["model"] == "resnet18" and info["parameter_counts"]["tensors"] == 62
    sid = new_session(cli)
    assert as_json(cli("--json", "--session", sid, "freeze", "*"))["frozen_count"] == 62
    assert as_json(cli("--json", "--session", sid, "replace-head", "10"))["num_classes"] == 10
    cli("sessions", "close", sid)


def test_a_session_for_uint8_images_trained_from_the_shell_equals_local(cli: Any, local: nn.Module) -> None:
    """``sessions create --input-transform imagenet`` then ``step --uint8``: generated uint8 images
    (a quarter of float32's bytes), normalised on the server as torchvision's ToTensor() and
    Normalize() do; the losses equal local PyTorch's on the same images."""
    created = as_json(cli("--json", "sessions", "create", "--weights", WEIGHTS_NAME, "--input-transform", "imagenet"))
    sid = created["session_id"]
    assert created["input_transform"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    status, out, err = cli("--session", sid, "info")
    assert status == 0 and re.search(r"^input transform: +uint8 images / 255, normalised .* \(imagenet\)$", out, re.M), out
    records = as_json(cli("--json", "--session", sid, "step", "-n", "2", "--uint8", "--loss", "cross_entropy", "--batch", "2",
                          "--size", "32", "--seed", "4"))
    rng = np.random.default_rng(4)  # the generator of `step`: images, then labels, a step at a time
    prepare = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    optim = torch.optim.SGD(local.parameters(), lr=1e-2, momentum=0.9)
    for record in records:
        x, y = rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8), rng.integers(0, 1000, 2)
        optim.zero_grad()
        loss = nn.functional.cross_entropy(local(torch.stack([prepare(image.transpose(1, 2, 0)) for image in x])), torch.from_numpy(y))
        loss.backward()
        optim.step()
        assert record["loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-5)
    status, _, err = cli("step", "--uint8")  # the default session has no transform
    assert status == 1 and "INPUT_TRANSFORM_MISSING" in err
    cli("sessions", "close", sid)


# -- docs/cli.md's walk-through -----------------------------------------------------------------------


def readme_console_blocks() -> list[tuple[str, list[tuple[str, str]]]]:
    """(name, [(command, shown output), ...]) of each marked console block of docs/cli.md, in order."""
    blocks = []
    for name, body in CONSOLE_BLOCK.findall(CLI_PAGE.read_text()):
        steps: list[tuple[str, list[str]]] = []
        for line in body.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            else:
                steps[-1][1].append(line)
        blocks.append((name, [(command, "\n".join(lines)) for command, lines in steps]))
    return blocks


@pytest.fixture(scope="module")
def readme_cli_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainerServer]:
    """A fresh server as docs/cli.md's walk-through starts it, `trainer-server --checkpoint-dir ckpt`:
    random weights (seed 0), on the CPU (the page shows a CPU's numbers)."""
    running = create_server(Settings(port=0, weights="random", seed=0, device="cpu",
                                     checkpoint_dir=str(tmp_path_factory.mktemp("ckpt"))))
    yield running
    running.stop(None).wait()


def test_readmes_command_line_example_is_the_start_of_the_walk_through() -> None:
    """README shows the first commands of docs/cli.md's walk block, output included; the walk-through
    run below checks them."""
    found = re.search(r"<!-- example from docs/cli.md -->\n```console\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert found, "README has no console block marked 'example from docs/cli.md'"
    walk = re.search(r"<!-- cli: walk -->\n```console\n(.*?)```", CLI_PAGE.read_text(), re.S)
    assert walk and walk[1].startswith(found[1]), f"README's command-line example is not the start of docs/cli.md's walk block:\n{found[1]}"


def test_cli_page_walk_through_prints_what_the_page_shows(readme_cli_server: TrainerServer, tmp_path: Path) -> None:
    """Every ``$`` line of docs/cli.md's marked console blocks, run with bash as written (the server's
    address in $TRAINER_TARGET, ``$SID`` the id ``sessions create`` printed), in order, prints what
    the page shows under it, line by line (session ids, times and dates aside); a command the page
    shows failing fails (status 1), the others succeed."""
    blocks = readme_console_blocks()
    assert [name for name, _ in blocks] == ["walk", "sessions"]
    port = readme_cli_server.port
    env = {k: v for k, v in os.environ.items() if k not in ("TRAINER_TOKEN", "TRAINER_TARGET")}
    env.update(PATH=os.pathsep.join([str(CLI.parent), env.get("PATH", "")]), TRAINER_TARGET=f"localhost:{port}")
    for name, steps in blocks:
        for command, shown in steps:
            done = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=tmp_path, env=env, capture_output=True,
                                  text=True, timeout=300, stdin=subprocess.DEVNULL, check=False)
            printed = (done.stdout + done.stderr).replace(f"localhost:{port}", README_TARGET)
            failing = f"{PROG}: error:" in shown
            assert done.returncode == (1 if failing else 0), f"docs/cli.md's {command!r} ended with {done.returncode}:\n{printed}"
            assert_shown("console", shown, printed, f"docs/cli.md's {name} block, {command!r}")
            if created := re.match(r"created session ([0-9a-f]{32})", done.stdout):
                env["SID"] = created[1]
