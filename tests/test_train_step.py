"""One round trip per training step: TrainStep, and Backward that also steps, against local PyTorch.

Every number is compared with the same loop run locally on the same weights and inputs, and the
one-call step with the separate Forward/Backward/Step/ZeroGrad calls, which it must equal bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from remote_trainer.client import FailedPreconditionError, InvalidArgumentError, Session, TrainerClient
from remote_trainer.client.remote import RemoteModel
from remote_trainer.contract import wire
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb
from tests.conftest import WEIGHTS_NAME, assert_equal_to_local, rand
from tests.test_errors import assert_same_state, state_of


def labels_for(loss: str, seed: int) -> np.ndarray:
    if loss == "cross_entropy":
        return np.random.default_rng(seed).integers(0, 1000, size=2)
    return rand(2, 1000, seed=seed)


def local_loss(loss: str, prediction: torch.Tensor, labels: np.ndarray) -> torch.Tensor:
    if loss == "cross_entropy":
        return F.cross_entropy(prediction, torch.from_numpy(labels))
    return (prediction - torch.from_numpy(labels)).sum()


def assert_state_equal_to_local(session: Session, local: nn.Module) -> None:
    remote = session.parameters(include_buffers=True)
    expected = dict(local.named_parameters())
    expected.update(local.named_buffers())
    for name, value in expected.items():
        assert_equal_to_local(remote[name].array, value)
    grads = session.gradients()
    for name, p in local.named_parameters():
        assert grads[name].present == (p.grad is not None), name
        if p.grad is not None:
            assert_equal_to_local(grads[name].array, p.grad)


@pytest.mark.parametrize("loss", ["cross_entropy", "sum"])
def test_train_steps_match_a_local_training_loop(session: Session, local: nn.Module, loss: str) -> None:
    """zero_grad; prediction = model(x); loss.backward(); step: three times, SGD with momentum."""
    optim = torch.optim.SGD(local.parameters(), lr=1e-2, momentum=0.9)
    local.train()
    for i in range(3):
        data, labels = rand(2, 3, 64, 64, seed=30 + i), labels_for(loss, 40 + i)
        result = session.train_step(data, loss, labels, grad_norm=True, return_logits=True)

        optim.zero_grad()
        prediction = local(torch.from_numpy(data))
        value = local_loss(loss, prediction, labels)
        value.backward()
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in local.parameters()]))
        optim.step()

        assert result.step_count == i + 1
        assert result.parameters_updated == 62
        assert result.loss == pytest.approx(value.item(), rel=1e-5)
        assert_equal_to_local(result.logits, prediction)
        assert result.stats.norm == pytest.approx(float(prediction.detach().norm()), rel=1e-5)
        assert result.grad_norm == pytest.approx(float(norm), rel=1e-5)
    # The gradients stay after the step, as locally; the graph was freed by the backward.
    assert_state_equal_to_local(session, local)
    assert session.info().pending_forward_id == 0


def test_train_step_equals_the_separate_calls_bit_for_bit(client: TrainerClient) -> None:
    with client.create_session(WEIGHTS_NAME) as separate, client.create_session(WEIGHTS_NAME) as fused:
        for i in range(3):
            data, labels = rand(2, 3, 64, 64, seed=50 + i), labels_for("cross_entropy", 60 + i)
            separate.zero_grad()
            forward = separate.forward(data)
            backward = separate.backward("cross_entropy", labels)
            count = separate.step()
            result = fused.train_step(data, "cross_entropy", labels, return_logits=True)
            assert result.loss == backward.loss
            assert result.step_count == count
            np.testing.assert_array_equal(result.logits, forward.logits)
            assert result.stats == forward.stats
        a, b = state_of(separate), state_of(fused)
        # The same state but for the id (and, on Ray, the node: tests/test_ray_backend.py runs this too).
        a.info = dataclasses.replace(a.info, session_id=b.info.session_id, device=b.info.device)
        assert_same_state(a, b)


def test_train_step_without_zero_grad_accumulates_as_locally(session: Session, local: nn.Module) -> None:
    optim = torch.optim.SGD(local.parameters(), lr=1e-2, momentum=0.9)
    for i in range(2):
        data, labels = rand(2, 3, 64, 64, seed=70 + i), rand(2, 1000, seed=80 + i)
        result = session.train_step(data, "mse", labels, zero_grad=False)
        F.mse_loss(local(torch.from_numpy(data)), torch.from_numpy(labels)).backward()
        optim.step()
        assert result.grad_norm is None and result.logits is None  # not asked for
    assert_state_equal_to_local(session, local)


def test_backward_that_steps_and_zeroes_matches_local(session: Session, local: nn.Module) -> None:
    """A client-side loss in two round trips: Forward, then Backward(output_gradient, step, zero)."""
    optim = torch.optim.SGD(local.parameters(), lr=1e-2, momentum=0.9)
    for i in range(3):
        data = rand(2, 3, 64, 64, seed=90 + i)
        logits = torch.from_numpy(session.forward(data).logits).requires_grad_()
        (logits ** 2).mean().backward()
        result = session.backward(output_gradient=logits.grad.numpy(), step=True, zero_grad_after_step=True)

        optim.zero_grad()
        prediction = local(torch.from_numpy(data))
        (prediction ** 2).mean().backward()
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in local.parameters()]))
        optim.step()
        assert (result.step_count, result.parameters_updated) == (i + 1, 62)
        assert result.grad_norm == pytest.approx(float(norm), rel=1e-5)
    optim.zero_grad()  # the server cleared the gradients right after its step
    assert_state_equal_to_local(session, local)


def test_backward_that_steps_keeps_the_gradients_unless_asked(session: Session, local: nn.Module) -> None:
    optim = torch.optim.SGD(local.parameters(), lr=1e-2, momentum=0.9)
    data, labels = rand(2, 3, 64, 64, seed=3), rand(2, 1000, seed=4)
    session.forward(data)
    assert session.backward("sum", labels, step=True).step_count == 1
    (local(torch.from_numpy(data)) - torch.from_numpy(labels)).sum().backward()
    optim.step()
    assert_state_equal_to_local(session, local)


def test_backward_without_grad_norm_leaves_only_the_norm_out(session: Session, local: nn.Module) -> None:
    """grad_norm=False: the same gradients and step as locally, and no norm in the answer (unset on
    the wire, None in the SDK); the next Backward that asks gets the norm of the accumulated .grad."""
    optim = torch.optim.SGD(local.parameters(), lr=1e-2, momentum=0.9)
    data, labels = rand(2, 3, 64, 64, seed=7), rand(2, 1000, seed=8)
    session.forward(data)
    skipped = session.backward("sum", labels, grad_norm=False, step=True)
    (local(torch.from_numpy(data)) - torch.from_numpy(labels)).sum().backward()
    optim.step()
    assert skipped.grad_norm is None and skipped.step_count == 1 and skipped.parameters_with_grad == 62
    assert skipped.loss is not None
    assert_state_equal_to_local(session, local)
    session.forward(data)
    asked = session.backward("sum", labels)
    (local(torch.from_numpy(data)) - torch.from_numpy(labels)).sum().backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in local.parameters() if p.grad is not None]))
    assert asked.grad_norm == pytest.approx(float(norm), rel=1e-5)


class CallCounter:
    """Counts the unary calls a client makes, by method, by wrapping its ``call``."""

    def __init__(self, client: TrainerClient, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        original = client.call

        def call(method: Any, request: Any, *, timeout: float | None = None) -> Any:
            message = request.message if isinstance(request, wire.SplicedRequest) else request
            self.calls.append(type(message).__name__.removesuffix("Request"))
            return original(method, request, timeout=timeout)

        monkeypatch.setattr(client, "call", call)


def test_remote_model_steps_in_two_round_trips_with_local_numbers(
    client: TrainerClient, session: Session, local: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = RemoteModel(session)
    optim = model.sgd(lr=1e-2, momentum=0.9, step_on_backward=True)
    local_optim = torch.optim.SGD(local.parameters(), lr=1e-2, momentum=0.9)
    counter = CallCounter(client, monkeypatch)
    for i in range(3):
        data, labels = torch.from_numpy(rand(2, 3, 64, 64, seed=100 + i)), torch.from_numpy(rand(2, 1000, seed=110 + i))
        counter.calls.clear()
        optim.zero_grad()
        loss = (model(data) - labels).sum()
        loss.backward()
        assert optim.step() == i + 1
        # The first zero_grad is sent (nothing cleared yet); after that a step is two calls.
        assert counter.calls == (["ZeroGrad"] if i == 0 else []) + ["Forward", "Backward"]

        local_optim.zero_grad()
        (local(data) - labels).sum().backward()
        local_optim.step()
    local_optim.zero_grad()
    assert_state_equal_to_local(session, local)


BAD_TRAIN_STEPS: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("labels of the wrong shape", {"loss": "sum", "labels": rand(2, 10)}, InvalidArgumentError, "BAD_LABEL_SHAPE"),
    ("class index out of range", {"loss": "cross_entropy", "labels": np.array([1, 1000])}, InvalidArgumentError,
     "CLASS_INDEX_OUT_OF_RANGE"),
    ("NaN labels", {"loss": "mse", "labels": np.full((2, 1000), np.nan, np.float32)}, InvalidArgumentError, "NON_FINITE_VALUES"),
    ("NaN input", {"x": np.full((2, 3, 64, 64), np.nan, np.float32)}, InvalidArgumentError, "NON_FINITE_VALUES"),
    ("one channel", {"x": rand(2, 1, 64, 64)}, InvalidArgumentError, "BAD_INPUT_SHAPE"),
    ("one 32x32 image", {"x": rand(1, 3, 32, 32), "labels": rand(1, 1000)}, InvalidArgumentError, "BATCH_TOO_SMALL_FOR_TRAINING"),
]


@pytest.mark.parametrize(("fields", "error", "reason"), [c[1:] for c in BAD_TRAIN_STEPS], ids=[c[0] for c in BAD_TRAIN_STEPS])
def test_a_bad_train_step_is_refused_before_anything_changes(
    session: Session, fields: dict[str, Any], error: type[Exception], reason: str
) -> None:
    session.forward(rand(2, 3, 64, 64))
    session.backward("sum", rand(2, 1000), retain_graph=True)  # gradients, and a pending graph, to keep
    before = state_of(session)
    call = {"x": rand(2, 3, 64, 64), "loss": "sum", "labels": rand(2, 1000)} | fields
    with pytest.raises(error) as err:
        session.train_step(call["x"], call["loss"], call["labels"])
    assert err.value.reason == reason  # type: ignore[attr-defined]
    assert_same_state(before, state_of(session))
    assert session.backward("sum", rand(2, 1000)).parameters_with_grad == 62  # the graph is intact


def test_raw_train_step_refusals(session: Session, client: TrainerClient) -> None:
    before = state_of(session)
    request = pb.TrainStepRequest(session_id=session.session_id)
    request.input.generate.shape[:] = [2, 3, 32, 32]
    request.input.generate.distribution = pb.DISTRIBUTION_UNIFORM
    with pytest.raises(InvalidArgumentError) as err:
        client.call(client.stub.TrainStep, request)
    assert err.value.reason == "UNKNOWN_LOSS"
    request.loss.function = pb.LOSS_FUNCTION_SUM_DIFFERENCE
    with pytest.raises(InvalidArgumentError) as err:
        client.call(client.stub.TrainStep, request)
    assert err.value.reason == "MISSING_TENSOR"
    session.freeze("*")
    frozen = state_of(session)
    with pytest.raises(FailedPreconditionError) as precondition:
        session.train_step(rand(2, 3, 32, 32), "sum", rand(2, 1000))
    assert precondition.value.reason == "NO_TRAINABLE_PARAMETERS"
    assert_same_state(frozen, state_of(session))
    assert before.values.keys() == frozen.values.keys()


def test_zero_grad_after_step_needs_step(session: Session) -> None:
    session.forward(rand(2, 3, 64, 64))
    before = state_of(session)
    with pytest.raises(InvalidArgumentError) as err:
        session.backward("sum", rand(2, 1000), zero_grad_after_step=True)
    assert err.value.reason == "ZERO_GRAD_WITHOUT_STEP"
    assert_same_state(before, state_of(session))
