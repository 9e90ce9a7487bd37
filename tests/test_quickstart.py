"""The first minutes of a new user: start-up errors in one clear line, a warmed-up server whose
default session is exactly what the weights file holds, and reflection that carries the proto's comments."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from remote_trainer.client import TrainerClient
from remote_trainer.server.app import create_server
from remote_trainer.server.settings import Settings
from tests.conftest import WEIGHTS_NAME

ROOT = Path(__file__).resolve().parent.parent


def start_server(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m remote_trainer.server ARGS`, expected to refuse to start."""
    return subprocess.run([sys.executable, "-m", "remote_trainer.server", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def our_lines(stderr: str) -> list[str]:
    """The server's own log lines (gRPC's C core may add one of its own, starting with 'E')."""
    return [line for line in stderr.splitlines() if " remote_trainer." in line]


def test_a_busy_port_is_one_line_naming_the_cause_and_the_fix() -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = start_server("--port", str(port), "--weights", "random")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in our_lines(result.stderr) if " ERROR " in line]
    assert len(errors) == 1
    assert f"port {port} on 127.0.0.1 is already in use" in errors[0]
    assert "--port 0 picks a free one" in errors[0]


def test_an_unreadable_weights_file_is_one_line_saying_what_it_must_hold(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(range(256)) * 4)
    result = start_server("--port", "0", "--weights", str(bad))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    (line,) = our_lines(result.stderr)
    assert "cannot read weights file 'bad.pt': torch.load(weights_only=True) failed" in line
    assert "must hold a resnet18 state_dict: torch.save(model.state_dict(), 'name.pt')" in line


def test_warm_up_runs_before_serving_and_leaves_the_default_session_as_the_weights_file_holds(
    data_dir: Path, state_dict: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="remote_trainer")
    running = create_server(Settings(port=0, weights=str(data_dir / WEIGHTS_NAME)))
    try:  # the engine warms up (a scratch copy of its model), then the app reports listening and SERVING
        messages = [r.getMessage() for r in caplog.records if r.name in ("remote_trainer.server.app", "remote_trainer.engine.session")]
        warmed = next(i for i, m in enumerate(messages) if m.startswith("warmed up in"))
        listening = next(i for i, m in enumerate(messages) if m.startswith("listening on"))
        assert warmed < listening
        with TrainerClient(f"localhost:{running.port}", timeout=60) as client:
            assert client.health() == "SERVING"
            model = client.session()
            info = model.info()
            assert (info.step_count, info.pending_forward_id) == (0, 0)
            assert not any(p.has_grad for p in model.list_parameters().parameters)
            # Weights and BatchNorm buffers (running statistics, num_batches_tracked) bit-identical to the file.
            values = model.parameters(include_buffers=True)
            assert set(values) == set(state_dict)
            for name, expected in state_dict.items():
                np.testing.assert_array_equal(values[name].array, expected.numpy(), err_msg=name)  # type: ignore[attr-defined]
    finally:
        running.stop(None).wait()


def test_tensorboard_dir_without_the_tensorboard_package_is_one_line(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['tensorboard'] = None\n"  # as on a server installed without the extra
        "from remote_trainer.server.__main__ import main\n"
        f"sys.exit(main(['--port', '0', '--weights', 'random', '--tensorboard-dir', {str(tmp_path)!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = our_lines(result.stderr)
    assert "cannot start: --tensorboard-dir needs the tensorboard package: pip install tensorboard" in line


def test_a_refused_flag_is_one_line_with_a_pointer_to_help_not_the_usage_text(tmp_path: Path) -> None:
    missing = tmp_path / "ckpt"
    for args, reason in (
        (["--checkpoint-dir", str(missing)], f"checkpoint-dir '{missing}' is not a directory (make it first: mkdir -p {missing})"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ):
        result = start_server(*args)
        assert result.returncode == 2
        assert result.stderr == f"trainer-server: error: {reason} (trainer-server --help lists every flag)\n"


def test_the_checkpoint_folder_and_files_readmes_examples_write_are_ignored_by_git() -> None:
    for path in ("ckpt/run.ckpt", "runs/default/events.out", "grads.npz", "gradient-flow.png", "graph.dot", "finetune.png"):
        done = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False)
        assert done.returncode == 0, f"{path} is not ignored by git"
    done = subprocess.run(["git", "check-ignore", "-q", "docs/gradient-flow.png"], cwd=ROOT, check=False)
    assert done.returncode == 1  # README's own picture, a file of the repository


@pytest.fixture
def setup_copy(tmp_path: Path) -> Path:
    """A copy of what scripts/setup.sh reads, with .venv already set up for both PyTorch builds (each
    stamp saying which build it is), so that a run only chooses and reports: it installs nothing."""
    for name in ("scripts/setup.sh", "pyproject.toml", "protos/pyproject.toml", "server/pyproject.toml", "client/pyproject.toml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    digest = subprocess.run("cat pyproject.toml ./*/pyproject.toml | sha1sum | cut -c1-12", shell=True, cwd=tmp_path,
                            capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / ".venv").mkdir()
    (tmp_path / f".venv/.installed-server-cpu-{digest}").write_text("CPU-only torch\n")
    (tmp_path / f".venv/.installed-server-{digest}").write_text("torch from PyPI\n")
    (tmp_path / "bin").mkdir()
    return tmp_path


def run_setup(copy: Path, *args: str) -> str:
    """scripts/setup.sh ARGS in ``copy``, with only ``copy/bin`` and the system's folders on the PATH."""
    done = subprocess.run(["bash", "scripts/setup.sh", *args], cwd=copy, capture_output=True, text=True, timeout=60,
                          env={"PATH": f"{copy / 'bin'}:/usr/bin:/bin"}, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(Path("/proc/driver/nvidia").exists() or Path("/usr/bin/nvidia-smi").exists(), reason="this host has an NVIDIA driver")
def test_setup_chooses_the_cpu_build_of_pytorch_on_a_host_without_an_nvidia_gpu_and_says_so(setup_copy: Path) -> None:
    out = run_setup(setup_copy)
    assert out.startswith("setup: no NVIDIA GPU here (no nvidia-smi, no /proc/driver/nvidia): the CPU-only build of PyTorch "
                          "(--cuda for the CUDA one)\n")
    assert out.endswith("setup: .venv is up to date (server, CPU-only torch)\n")
    assert run_setup(setup_copy, "--cuda") == "setup: .venv is up to date (server, torch from PyPI)\n"
    assert run_setup(setup_copy, "--cpu") == "setup: .venv is up to date (server, CPU-only torch)\n"
    nvidia_smi = setup_copy / "bin/nvidia-smi"  # a driver's tool on the PATH: the CUDA build
    nvidia_smi.write_text("#!/bin/sh\nexit 0\n")
    nvidia_smi.chmod(0o755)
    out = run_setup(setup_copy)
    assert out.startswith("setup: an NVIDIA GPU driver is here: the CUDA build of PyTorch (--cpu for the CPU-only one)\n")
    assert out.endswith("setup: .venv is up to date (server, torch from PyPI)\n")
