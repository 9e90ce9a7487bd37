"""Where weights come from: seeded random, a state_dict or safetensors file, ImageNet from the hub cache."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import resnet18

from remote_trainer.client import TrainerClient, TrainerError
from remote_trainer.server.app import create_server
from remote_trainer.engine.errors import FailedPrecondition, InvalidArgument
from remote_trainer.engine.models import build_model, imagenet_weights_path
from remote_trainer.server.settings import Settings
from tests.conftest import assert_equal_to_local, rand


def logits_of(model: torch.nn.Module, x: np.ndarray) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(x))


def test_random_weights_are_seeded_like_torch_manual_seed(client: TrainerClient) -> None:
    torch.manual_seed(3)
    local = resnet18(num_classes=20)
    x = rand(1, 3, 32, 32)
    with client.create_session("random", seed=3, num_classes=20) as s:
        assert s.info().weights == "random(seed=3)"
        assert_equal_to_local(s.forward(x, eval_mode=True).logits, logits_of(local, x))


def test_safetensors_and_torch_save_files(client: TrainerClient, data_dir: Path, state_dict: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(data_dir / "same.safetensors"))
    local = resnet18()
    local.load_state_dict(state_dict)
    x = rand(1, 3, 32, 32, seed=2)
    with client.create_session("same.safetensors") as s:
        assert s.info().weights == "same.safetensors"
        assert_equal_to_local(s.forward(x, eval_mode=True).logits, logits_of(local, x))


def test_weights_file_with_another_head_size(client: TrainerClient, data_dir: Path) -> None:
    torch.manual_seed(8)
    small = resnet18(num_classes=7)
    torch.save(small.state_dict(), data_dir / "seven.pt")
    x = rand(1, 3, 32, 32, seed=3)
    with client.create_session("seven.pt") as s:
        info = s.info()
        assert info.num_classes == 7
        assert_equal_to_local(s.forward(x, eval_mode=True).logits, logits_of(small, x))
    with client.create_session("seven.pt", num_classes=3, seed=4) as s:  # a new seeded head in place of the file's
        torch.manual_seed(4)
        small.fc = torch.nn.Linear(512, 3)
        assert_equal_to_local(s.forward(x, eval_mode=True).logits, logits_of(small, x))


def test_pickled_code_is_refused(client: TrainerClient, data_dir: Path) -> None:
    torch.save({"fc.weight": torch.zeros(2, 2), "payload": os.system}, data_dir / "evil.pt")
    with pytest.raises(TrainerError) as err:
        client.create_session("evil.pt")
    assert (err.value.code, err.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "WEIGHTS_UNREADABLE")


def test_mismatched_state_dict_is_refused(client: TrainerClient, data_dir: Path) -> None:
    torch.save({"fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}, data_dir / "partial.pt")
    with pytest.raises(TrainerError) as err:
        client.create_session("partial.pt")
    assert (err.value.code, err.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "WEIGHTS_MISMATCH")
    assert "Missing key" in err.value.message


def test_symlink_out_of_the_data_dir_is_refused(client: TrainerClient, data_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.pt"
    torch.save(resnet18().state_dict(), outside)
    link = data_dir / f"link-{tmp_path.name}.pt"  # the data folder is shared (this test runs on Ray too)
    link.symlink_to(outside)
    with pytest.raises(TrainerError) as err:
        client.create_session(link.name)
    assert (err.value.code, err.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "PATH_OUTSIDE_DATA_DIR")


def test_no_data_dir_means_no_client_named_files(tmp_path: Path) -> None:
    running = create_server(Settings(port=0, weights="random"))
    try:
        with TrainerClient(f"localhost:{running.port}") as client, pytest.raises(TrainerError) as err:
            client.create_session("anything.pt")
        assert (err.value.code, err.value.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_DATA_DIR")
    finally:
        running.stop(None).wait()


def test_imagenet_weights_from_the_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = imagenet_weights_path()
    assert path == tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"

    with pytest.raises(FailedPrecondition) as err:
        build_model("imagenet", 0, 0)
    # Where it belongs, as $TORCH_HOME/hub/...: clients are never shown server paths.
    assert "$TORCH_HOME/hub/checkpoints/resnet18-f37072fd.pth" in err.value.message
    assert str(tmp_path) not in err.value.message
    assert build_model("auto", 0, 0)[1] == "random(seed=0)"  # auto falls back to random weights

    torch.manual_seed(11)  # a stand-in for the real file, saved the way torchvision's checkpoint is
    fake = resnet18()
    path.parent.mkdir(parents=True)
    torch.save(fake.state_dict(), path)
    running = create_server(Settings(port=0, weights="auto"))  # auto finds them in the cache
    x = rand(1, 3, 32, 32, seed=5)
    try:
        with TrainerClient(f"localhost:{running.port}") as client:
            assert client.session().info().weights == "imagenet"
            assert_equal_to_local(client.session().forward(x, eval_mode=True).logits, logits_of(fake, x))
            with client.create_session("imagenet", num_classes=10, seed=2) as s:  # the finetuning start
                assert s.info().num_classes == 10
    finally:
        running.stop(None).wait()


def test_bad_weights_flag_fails_at_startup(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InvalidArgument):
        build_model(str(tmp_path / "junk.pt"), 0, 0, trusted_path=True)
