"""Images sent as images: uint8 batches with a session's input transform (torchvision's ToTensor()
then Normalize(mean, std), run on the server after the upload), and class indices in the narrowest
integer type, through a real server; every number against local torchvision and PyTorch."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from torch import nn
from PIL import Image
from torchvision import transforms
from torchvision.models import resnet18
from torchvision.transforms.functional import pil_to_tensor

from remote_trainer.client import InputTransform, Session, TrainerClient, TrainerError
from remote_trainer.client import core
from remote_trainer.client.remote import RemoteModel
from remote_trainer.contract import codec
from remote_trainer.contract.names import IMAGENET_MEAN, IMAGENET_STD
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb
from remote_trainer.server.app import TrainerServer, create_server
from remote_trainer.server.settings import Settings
from tests.conftest import WEIGHTS_NAME, assert_equal_to_local
from tests.test_training import assert_params_equal

INVALID = grpc.StatusCode.INVALID_ARGUMENT
ROOT = Path(__file__).resolve().parent.parent


def images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """A batch of uint8 images (N, 3, size, size), pixels 0-255, as a decoder gives them."""
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def local_input(batch: np.ndarray, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> torch.Tensor:
    """What local torchvision makes of the images: ToTensor() on each (H, W, C) image, then
    Normalize(mean, std) (none when ``mean`` is empty)."""
    steps: list[object] = [transforms.ToTensor()] + ([transforms.Normalize(mean, std)] if mean else [])
    pipeline = transforms.Compose(steps)
    return torch.stack([pipeline(image.transpose(1, 2, 0)) for image in batch])


def expect_error(call: object, reason: str, code: grpc.StatusCode = INVALID) -> TrainerError:
    with pytest.raises(TrainerError) as err:
        call()  # type: ignore[operator]
    assert (err.value.code, err.value.reason) == (code, reason), err.value
    return err.value


@pytest.fixture
def image_session(client: TrainerClient) -> Iterator[Session]:
    """A fresh session on the test weights that takes uint8 images, normalised as for ImageNet."""
    with client.create_session(WEIGHTS_NAME, input_transform="imagenet") as s:
        yield s


def test_uint8_forward_equals_local_to_tensor_and_normalize(image_session: Session, client: TrainerClient, local: nn.Module) -> None:
    """Logits (and so BatchNorm's running statistics) of a uint8 batch equal local PyTorch on
    torchvision's ToTensor() + Normalize() of the same images; and a float session sent that locally
    normalised batch answers the same, so the server's normalised input is local's."""
    assert image_session.info().input_transform == InputTransform.imagenet()
    batch = images(2, 40)
    expected = local(local_input(batch))
    assert_equal_to_local(image_session.forward(batch).logits, expected)
    with client.create_session(WEIGHTS_NAME) as plain:
        assert plain.info().input_transform is None
        assert_equal_to_local(plain.forward(local_input(batch).numpy()).logits, expected)
    assert_params_equal(image_session, local, include_buffers=True)


def test_uint8_training_matches_local(image_session: Session, local: nn.Module) -> None:
    """uint8 images on a session with the ImageNet transform: TrainSteps (class indices below 256,
    sent as uint8) and a separate Forward, Backward, Step equal the local loop on ToTensor() +
    Normalize() of the same images. Also one of tests/test_ray_backend.py's checks."""
    check_uint8_training_matches_local(image_session, local)


def check_uint8_training_matches_local(session: Session, local: nn.Module) -> None:
    optim = torch.optim.SGD(local.parameters(), lr=1e-2, momentum=0.9)
    rng = np.random.default_rng(5)
    for step in range(3):
        batch, labels = images(4, 32, seed=step), rng.integers(0, 200, 4)
        result = session.train_step(batch, "cross_entropy", labels, grad_norm=True)
        optim.zero_grad()
        loss = nn.functional.cross_entropy(local(local_input(batch)), torch.from_numpy(labels))
        loss.backward()
        optim.step()
        assert result.loss == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
    batch, labels = images(2, 48, seed=9), np.array([3, 250])
    session.zero_grad()
    session.forward(batch)
    back = session.backward("cross_entropy", labels)
    session.step()
    optim.zero_grad()
    loss = nn.functional.cross_entropy(local(local_input(batch)), torch.from_numpy(labels))
    loss.backward()
    optim.step()
    assert back.loss == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
    assert_params_equal(session, local, include_buffers=True)


@pytest.mark.parametrize("transform", [InputTransform(), InputTransform((0.5, 0.25, 0.125), (0.5, 2.0, 0.3))],
                         ids=["scale-only", "own-constants"])
def test_other_transforms_equal_local_torchvision(client: TrainerClient, local: nn.Module, transform: InputTransform) -> None:
    """The scaling alone (ToTensor()) and constants of one's own, in an eval-mode forward."""
    batch = images(3, 33, seed=4)
    with client.create_session(WEIGHTS_NAME, input_transform=transform) as session:
        assert session.info().input_transform == transform
        logits = session.forward(batch, eval_mode=True).logits
    assert_equal_to_local(logits, local.eval()(local_input(batch, transform.mean, transform.std)))


def decoded(png: bytes) -> torch.Tensor:
    """A PNG file decoded as a torch data pipeline does: PIL, then ``pil_to_tensor`` (uint8, C x H x W)."""
    return pil_to_tensor(Image.open(io.BytesIO(png)).convert("RGB"))


def png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0)).save(out, format="PNG")
    return out.getvalue()


def test_decoded_torch_images_through_remote_model(client: TrainerClient, local: nn.Module) -> None:
    """torch uint8 tensors as a decoder gives them (PNG files through PIL and ``pil_to_tensor``),
    stacked NCHW, through ``RemoteModel`` made with input_transform="imagenet": logits and the head's
    gradients equal local."""
    source = images(2, 36, seed=2)
    batch = torch.stack([decoded(png(image)) for image in source])
    assert batch.dtype == torch.uint8 and torch.equal(batch, torch.from_numpy(source))
    labels = torch.tensor([1, 7])
    with RemoteModel.create(client, WEIGHTS_NAME, input_transform="imagenet") as model:
        logits = model(batch)
        nn.functional.cross_entropy(logits, labels).backward()
        expected = local(local_input(source))
        nn.functional.cross_entropy(expected, labels).backward()
        assert_equal_to_local(logits.detach().numpy(), expected)
        assert local.fc.weight.grad is not None
        assert_equal_to_local(model.fc.weight.grad.numpy(), local.fc.weight.grad)


def test_what_is_refused_and_why(client: TrainerClient, session: Session) -> None:
    """uint8 images need a transform; an NHWC batch is not guessed at (BAD_INPUT_SHAPE: send NCHW);
    a transform that does not fit the model's 3 channels, or has a std not > 0, or a value not
    finite, is refused at CreateSession and makes no session."""
    expect_error(lambda: session.forward(images(2)), "INPUT_TRANSFORM_MISSING")
    expect_error(lambda: session.train_step(images(2), "cross_entropy", [1, 2]), "INPUT_TRANSFORM_MISSING")
    assert session.info().step_count == 0 and session.info().pending_forward_id == 0
    with client.create_session(WEIGHTS_NAME, input_transform="imagenet") as image_session:
        err = expect_error(lambda: image_session.forward(images(2).transpose(0, 2, 3, 1)), "BAD_INPUT_SHAPE")
        assert "3 channels" in err.message
    before = len(client.list_sessions())
    for bad in [InputTransform((0.5, 0.5), (0.2, 0.2)), InputTransform((0.5,) * 3, ()), InputTransform((0.5,) * 3, (0.2, 0.0, 0.2)),
                InputTransform((0.5, float("nan"), 0.5), (0.2,) * 3), InputTransform((0.5,) * 3, (0.2, -1.0, float("inf")))]:
        err = expect_error(lambda: client.create_session(WEIGHTS_NAME, input_transform=bad), "BAD_INPUT_TRANSFORM")
        assert err.violations and err.violations[0].field.startswith("input_transform")
    assert len(client.list_sessions()) == before
    with pytest.raises(ValueError, match="imagenet"):
        client.create_session(WEIGHTS_NAME, input_transform="cifar")  # type: ignore[arg-type]


@pytest.mark.parametrize(("classes", "wire_type"), [(10, pb.DATA_TYPE_UINT8), (1000, pb.DATA_TYPE_INT16)])
def test_class_indices_are_sent_narrow_and_every_integer_type_gives_the_same_loss(
    session: Session, client: TrainerClient, local: nn.Module, classes: int, wire_type: int
) -> None:
    """The SDK sends class indices in the narrowest type that holds them (2 bytes or 1 an index
    instead of 8); the server widens them for the loss, and an old client's int64 (or int32) labels
    give the same loss, equal to local PyTorch's."""
    labels = np.array([classes - 1, 0, classes // 2])
    call = core.train_step(session.session_id, images(3), "cross_entropy", labels, True, False, False)
    assert call.request.message.loss.labels.tensor.data_type == wire_type
    x = np.random.default_rng(3).random((3, 3, 32, 32), dtype=np.float32)
    if classes != 1000:
        session.replace_head(classes, seed=1)
        torch.manual_seed(1)
        local.fc = nn.Linear(512, classes)
    session.forward(x)
    expected = nn.functional.cross_entropy(local(torch.from_numpy(x)), torch.from_numpy(labels)).item()
    sdk = session.backward("cross_entropy", labels, retain_graph=True).loss
    assert sdk == pytest.approx(expected, rel=1e-5)
    for dtype in (np.int64, np.int32, np.int16, np.uint8):
        if np.iinfo(dtype).max < classes - 1:
            continue
        request = pb.BackwardRequest(session_id=session.session_id, retain_graph=True, loss=pb.Loss(
            function=pb.LOSS_FUNCTION_CROSS_ENTROPY, labels=pb.TensorInput(tensor=codec.encode(labels.astype(dtype)))))
        assert client.call(client.stub.Backward, request).loss == sdk, dtype


@pytest.fixture(scope="module")
def checkpoint_server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainerServer]:
    """A server with a checkpoint directory; its default session on the test weights, no transform."""
    running = create_server(Settings(port=0, weights=str(data_dir / WEIGHTS_NAME), data_dir=str(data_dir),
                                     checkpoint_dir=str(tmp_path_factory.mktemp("checkpoints"))))
    yield running
    running.stop(None).wait()


def test_the_transform_travels_with_the_session(checkpoint_server: TrainerServer) -> None:
    """DescribeSession and ListSessions show it; a checkpoint carries it (LoadCheckpoint puts it on
    the session loaded, a new session resumed from it has it); ResetSession takes the default session
    back to none, as the server started it."""
    batch = images(2, 32, seed=6)
    with TrainerClient(f"localhost:{checkpoint_server.port}", timeout=120) as client:
        with client.create_session(WEIGHTS_NAME, input_transform="imagenet") as source:
            listed = {i.session_id: i.input_transform for i in client.list_sessions()}
            assert listed == {"default": None, source.session_id: InputTransform.imagenet()}
            source.save_checkpoint("images.ckpt")
            expected = source.forward(batch, eval_mode=True).logits
        default = client.session()
        expect_error(lambda: default.forward(batch, eval_mode=True), "INPUT_TRANSFORM_MISSING")
        assert default.load_checkpoint("images.ckpt").input_transform == InputTransform.imagenet()
        assert default.info().input_transform == InputTransform.imagenet()
        np.testing.assert_array_equal(default.forward(batch, eval_mode=True).logits, expected)
        assert default.reset().input_transform is None
        expect_error(lambda: default.forward(batch, eval_mode=True), "INPUT_TRANSFORM_MISSING")
        resumed = client.call(client.stub.CreateSession, pb.CreateSessionRequest(resume_from="images.ckpt")).session
        assert (list(resumed.input_transform.mean), list(resumed.input_transform.std)) == (list(IMAGENET_MEAN), list(IMAGENET_STD))
        with client.session(resumed.session_id) as again:
            np.testing.assert_array_equal(again.forward(batch, eval_mode=True).logits, expected)


def test_configuration_page_images_example_runs_verbatim(target: str) -> None:
    """docs/configuration.md's example, run as it is written: the transform described, and the step's loss equal to
    local PyTorch's on ToTensor() + Normalize() of the same images (the session's weights: random, seed 0)."""
    found = re.search(r"<!-- images: sdk -->\n```python\n(.*?)```", (ROOT / "docs" / "configuration.md").read_text(), re.S)
    assert found, "docs/configuration.md has no block marked images: sdk"
    done = subprocess.run([sys.executable, "-c", found.group(1).replace("localhost:50051", target)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    described, loss = done.stdout.splitlines()
    assert described == "InputTransform(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))"
    torch.manual_seed(0)
    model = resnet18()
    batch = np.random.default_rng(0).integers(0, 256, (4, 3, 64, 64), dtype=np.uint8)
    expected = nn.functional.cross_entropy(model(local_input(batch)), torch.tensor([3, 7, 1, 0]))
    assert float(loss) == pytest.approx(expected.item(), rel=1e-5)
