"""The torch work without gRPC: the session engine against local PyTorch, and its refusals."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torchvision import transforms
from torchvision.models import resnet18

from remote_trainer.contract.names import IMAGENET_MEAN, IMAGENET_STD

from remote_trainer.engine.patterns import match_patterns
from remote_trainer.engine.limits import Limits
from remote_trainer.engine.optimizer import OptimizerSpec
from remote_trainer.engine.session import SessionEngine
from remote_trainer.engine.state import SessionState
from remote_trainer.engine.transforms import InputTransform
from remote_trainer.engine.tensors import generate, tensor_stats, tensors_stats
from remote_trainer.engine.errors import InvalidArgument, NotFound

NAMES = ["conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer1.0.bn1.bias", "layer10.weight", "fc.weight", "fc.bias"]


def engine_and_local() -> tuple[SessionEngine, torch.nn.Module]:
    torch.manual_seed(0)
    model = resnet18(num_classes=10)
    local = copy.deepcopy(model)
    return SessionEngine(model, torch.device("cpu"), "test", OptimizerSpec.tutorial(), Limits()), local


def test_forward_backward_step_equal_local() -> None:
    engine, local = engine_and_local()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 9])
    result = engine.forward(x)
    back = engine.backward(loss="cross_entropy", labels=labels)
    engine.step()
    optim = torch.optim.SGD(local.parameters(), lr=1e-2, momentum=0.9)
    logits = local(x)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    optim.step()
    torch.testing.assert_close(result.logits, logits.detach(), rtol=1e-5, atol=1e-6)
    assert back.loss == pytest.approx(loss.item(), rel=1e-6)
    for got, want in zip(engine.parameters([]), local.parameters()):
        assert got.tensor is not None
        torch.testing.assert_close(got.tensor, want.detach(), rtol=1e-5, atol=1e-7)


def test_patterns_globs_and_module_prefixes() -> None:
    assert match_patterns(NAMES, ["layer1"]) == ["layer1.0.conv1.weight", "layer1.0.bn1.bias"]
    assert match_patterns(NAMES, ["layer1*"]) == ["layer1.0.conv1.weight", "layer1.0.bn1.bias", "layer10.weight"]
    assert match_patterns(NAMES, ["fc.*", "conv1.weight"]) == ["conv1.weight", "fc.weight", "fc.bias"]
    assert match_patterns(NAMES, ["*"]) == NAMES
    with pytest.raises(NotFound):
        match_patterns(NAMES, ["layer2"])
    with pytest.raises(InvalidArgument):
        match_patterns(NAMES, ["layer2.*"])


def test_stats_count_non_finite_values() -> None:
    stats = tensor_stats(torch.tensor([1.0, float("nan"), float("inf"), -2.0]))
    assert stats.non_finite_count == 2 and stats.num_elements == 4
    clean = tensor_stats(torch.tensor([3.0, -4.0]))
    assert (clean.norm, clean.min, clean.max, clean.mean, clean.non_finite_count) == (5.0, -4.0, 3.0, -0.5, 0)


def test_stats_of_many_tensors_at_once_equal_one_by_one() -> None:
    ts = [
        torch.randn(64, 3, 7, 7, generator=torch.Generator().manual_seed(1)),
        torch.tensor([1.0, float("nan"), float("inf"), -2.0]),
        torch.empty(0),
        torch.randn(1000, 512, generator=torch.Generator().manual_seed(2)).half(),
    ]
    ts.append(torch.randn(3_000_000, generator=torch.Generator().manual_seed(3)))  # many of the CPU path's slices
    late_nan = torch.ones(3_000_000)
    late_nan[-1] = float("nan")  # in the last slice: min and max are NaN, as over the whole tensor
    both_infinities = torch.zeros(3_000_000)
    both_infinities[0], both_infinities[-1] = float("inf"), float("-inf")  # slice sums +inf and -inf: mean NaN
    ts += [late_nan, both_infinities]
    many = tensors_stats(ts)
    for t, stats in zip(ts, many):
        one = tensor_stats(t)
        assert (stats.non_finite_count, stats.num_elements) == (one.non_finite_count, one.num_elements)
        assert [stats.min, stats.max] == pytest.approx([one.min, one.max], nan_ok=True)  # exact: no rounding
        # Norm and mean are float32 sums, summed in another order here (slice by slice): both are
        # compared with the float64 truth, to float32's accumulated rounding.
        truth = t.double()
        if t.numel() and bool(torch.isfinite(t).all()):
            assert stats.norm == pytest.approx(float(truth.norm()), rel=1e-5)
            assert stats.mean == pytest.approx(float(truth.mean()), abs=1e-7)
        else:
            assert [stats.norm, stats.mean] == pytest.approx([one.norm, one.mean], nan_ok=True)


def test_train_step_equals_the_separate_calls_and_refuses_before_changing() -> None:
    engine, local = engine_and_local()
    optim = torch.optim.SGD(local.parameters(), lr=1e-2, momentum=0.9)
    x, labels = torch.rand(2, 3, 64, 64), torch.tensor([3, 7])
    with pytest.raises(InvalidArgument):
        engine.train_step(x, "cross_entropy", torch.tensor([3, 1000]))
    assert engine.describe().step_count == 0 and engine.describe().pending_forward_id == 0
    result = engine.train_step(x, "cross_entropy", labels, grad_norm=True)
    optim.zero_grad()
    loss = torch.nn.functional.cross_entropy(local(x), labels)
    loss.backward()
    optim.step()
    assert (result.forward_id, result.step_count, result.parameters_updated) == (1, 1, 62)
    assert result.loss == loss.item()
    for (name, p), q in zip(local.named_parameters(), engine._model.parameters()):
        assert torch.equal(p, q), name


def test_generated_tensors_are_reproducible_with_torch_generator() -> None:
    expected = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(generate((1, 3, 64, 64), "uniform", 7), expected, rtol=0, atol=0)
    assert generate((4,), "randint", 1, high=10).dtype == torch.int64


def test_optimizer_defaults_follow_torch() -> None:
    assert OptimizerSpec.with_defaults("adamw").weight_decay == 0.01
    assert OptimizerSpec.with_defaults("sgd", lr=0.5).momentum == 0.0


def test_input_transform_equals_torchvision_to_tensor_and_normalize() -> None:
    """The server's arithmetic on uint8 images is torchvision's: ToTensor() on each HWC image, then
    Normalize(mean, std); within 1e-6 (in fact equal to the last bit)."""
    images = torch.randint(0, 256, (4, 3, 9, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    to_tensor, normalize = transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    expected = torch.stack([normalize(to_tensor(image.permute(1, 2, 0).numpy())) for image in images])
    got = InputTransform.imagenet().apply(images)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(InputTransform().apply(images), torch.stack([to_tensor(i.permute(1, 2, 0).numpy()) for i in images]),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("transform", [
    InputTransform((0.5, 0.5), (0.2, 0.2)), InputTransform((0.5,) * 4, (0.2,) * 4), InputTransform((0.5,) * 3, ()),
    InputTransform((0.5,) * 3, (0.2, 0.0, 0.2)), InputTransform((0.5,) * 3, (0.2, -0.1, 0.2)),
    InputTransform((0.5, math.nan, 0.5), (0.2,) * 3), InputTransform((0.5,) * 3, (0.2, math.inf, 0.2)),
])
def test_bad_input_transforms_are_refused(transform: InputTransform) -> None:
    with pytest.raises(InvalidArgument) as err:
        transform.validate()
    assert err.value.reason == "BAD_INPUT_TRANSFORM"


def test_uint8_images_need_an_input_transform_and_it_travels_in_checkpoints() -> None:
    engine, _ = engine_and_local()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(InvalidArgument) as err:
        engine.forward(images)
    assert err.value.reason == "INPUT_TRANSFORM_MISSING" and engine.describe().pending_forward_id == 0
    torch.manual_seed(0)
    with_transform = SessionEngine(resnet18(num_classes=10), torch.device("cpu"), "test", OptimizerSpec.tutorial(), Limits(),
                                   input_transform=InputTransform.imagenet())
    state = with_transform.checkpoint()
    assert state.input_transform == InputTransform.imagenet()
    assert SessionState.from_dict(state.to_dict()).input_transform == InputTransform.imagenet()
    engine.restore(SessionState.from_dict(state.to_dict()))
    assert engine.describe().input_transform == InputTransform.imagenet()
    expected = with_transform.forward(images, eval_mode=True).logits
    torch.testing.assert_close(engine.forward(images, eval_mode=True).logits, expected, rtol=0, atol=0)
    old_file = {k: v for k, v in state.to_dict().items() if k != "input_transform"}  # written before transforms existed
    assert SessionState.from_dict(old_file).input_transform is None
    with pytest.raises(ValueError, match="std must be finite and > 0"):
        SessionState.from_dict({**state.to_dict(), "input_transform": {"mean": [0.5] * 3, "std": [0.0] * 3}})


def test_streams_done_runs_after_the_last_tensor_while_the_lock_is_held() -> None:
    """``done`` of encode_gradients/encode_parameters comes after the last ``encode`` and before the
    session's lock is let go: a packed stream joins its last response there, from views of the
    session's own tensors, which a call waiting for the lock could otherwise change first."""
    engine, _ = engine_and_local()
    engine.forward(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    engine.backward(loss="cross_entropy", labels=torch.tensor([1, 9]))
    for encode in (
        lambda enc, done: engine.encode_gradients(["fc"], False, torch.float32, enc, done=done),
        lambda enc, done: engine.encode_parameters(["fc"], False, torch.float32, False, enc, done=done),
    ):
        seen: list[str] = []
        encode(lambda item: seen.append(item.name), lambda: seen.append(f"done, locked={engine._lock._lock.locked()}"))
        assert seen == ["fc.weight", "fc.bias", "done, locked=True"]
