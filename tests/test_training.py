"""The autograd tutorial step by step through a real server, each result compared with local PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from remote_trainer.client import FailedPreconditionError, InvalidArgumentError, Optimizer, Session, TrainerClient
from tests.conftest import WEIGHTS_NAME, assert_equal_to_local, rand


def grads_of(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in model.named_parameters()}


def assert_grads_equal(session: Session, local: nn.Module) -> None:
    remote = session.gradients()
    assert list(remote) == [n for n, _ in local.named_parameters()]
    for name, grad in grads_of(local).items():
        if grad is None:
            assert not remote[name].present, name
            assert remote[name].array is None
        else:
            assert remote[name].present, name
            assert_equal_to_local(remote[name].array, grad)


def assert_params_equal(session: Session, local: nn.Module, include_buffers: bool = False) -> None:
    remote = session.parameters(include_buffers=include_buffers)
    expected = dict(local.named_parameters())
    if include_buffers:
        expected.update(local.named_buffers())
    assert set(remote) == set(expected)
    for name, value in expected.items():
        assert_equal_to_local(remote[name].array, value)


def test_forward_logits_and_batchnorm_statistics_match_local(session: Session, local: nn.Module) -> None:
    data = rand(2, 3, 64, 64)
    result = session.forward(data)
    local.train()
    expected = local(torch.from_numpy(data))
    assert_equal_to_local(result.logits, expected)
    assert result.stats.num_elements == 2000
    assert result.stats.norm == pytest.approx(float(expected.detach().norm()), rel=1e-5)
    # A training-mode forward updates BatchNorm running statistics, as locally.
    assert_params_equal(session, local, include_buffers=True)


def test_tutorial_training_step_matches_local(session: Session, local: nn.Module) -> None:
    """prediction = model(data); loss = (prediction - labels).sum(); loss.backward(); optim.step()."""
    data, labels = rand(1, 3, 64, 64, seed=1), rand(1, 1000, seed=2)
    optim = torch.optim.SGD(local.parameters(), lr=1e-2, momentum=0.9)

    session.forward(data)
    result = session.backward("sum", labels)

    prediction = local(torch.from_numpy(data))
    loss = (prediction - torch.from_numpy(labels)).sum()
    loss.backward()
    assert result.loss == pytest.approx(loss.item(), rel=1e-5)
    assert result.parameters_with_grad == 62
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in local.parameters()]))
    assert result.grad_norm == pytest.approx(float(total), rel=1e-5)
    assert_grads_equal(session, local)

    assert session.step() == 1
    optim.step()
    assert_params_equal(session, local)


def test_several_sgd_momentum_steps_match_local(session: Session, local: nn.Module) -> None:
    optim = torch.optim.SGD(local.parameters(), lr=1e-2, momentum=0.9)
    for i in range(3):
        data, labels = rand(2, 3, 64, 64, seed=10 + i), rand(2, 1000, seed=20 + i)
        session.zero_grad()
        session.forward(data)
        session.backward("sum", labels)
        assert session.step() == i + 1
        optim.zero_grad()
        (local(torch.from_numpy(data)) - torch.from_numpy(labels)).sum().backward()
        optim.step()
    assert_params_equal(session, local, include_buffers=True)
    assert session.info().step_count == 3


@pytest.mark.parametrize(
    ("optimizer", "make"),
    [
        (Optimizer("sgd", lr=0.05, momentum=0.5, dampening=0.1, weight_decay=1e-3),
         lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5, dampening=0.1, weight_decay=1e-3)),
        (Optimizer("sgd", lr=0.05, momentum=0.9, nesterov=True), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True)),
        (Optimizer("adam", lr=1e-3), lambda p: torch.optim.Adam(p, lr=1e-3)),
        (Optimizer("adamw", lr=1e-3, beta1=0.8, weight_decay=0.1), lambda p: torch.optim.AdamW(p, lr=1e-3, betas=(0.8, 0.999), weight_decay=0.1)),
    ],
    ids=["sgd-dampening-decay", "sgd-nesterov", "adam", "adamw"],
)
def test_optimizers_match_torch_optim(session: Session, local: nn.Module, optimizer: Optimizer, make) -> None:  # type: ignore[no-untyped-def]
    session.configure_optimizer(optimizer)
    optim = make(local.parameters())
    for i in range(2):
        data, labels = rand(2, 3, 32, 32, seed=30 + i), rand(2, 1000, seed=40 + i)
        session.zero_grad()
        session.forward(data)
        session.backward("mse", labels)
        session.step()
        optim.zero_grad()
        F.mse_loss(local(torch.from_numpy(data)), torch.from_numpy(labels)).backward()
        optim.step()
    assert_params_equal(session, local)


def test_finetuning_frozen_model_with_new_head(session: Session, local: nn.Module) -> None:
    """Freeze everything, model.fc = nn.Linear(512, 10): only fc gets gradients, only fc changes."""
    before = session.parameters()
    frozen = session.freeze("*")
    assert frozen.trainable == [] and frozen.frozen_count == 62
    info = session.replace_head(10, seed=5)
    assert info.num_classes == 10 and info.trainable_parameters == 2 and info.frozen_parameters == 60

    for p in local.parameters():
        p.requires_grad = False
    torch.manual_seed(5)
    local.fc = nn.Linear(512, 10)
    optim = torch.optim.SGD(local.parameters(), lr=1e-2, momentum=0.9)

    data, labels = rand(2, 3, 64, 64, seed=3), np.array([3, 7])
    session.forward(data)
    result = session.backward("cross_entropy", labels)
    loss = F.cross_entropy(local(torch.from_numpy(data)), torch.from_numpy(labels))
    loss.backward()
    assert result.loss == pytest.approx(loss.item(), rel=1e-5)
    assert result.parameters_with_grad == 2
    assert_grads_equal(session, local)

    session.step()
    optim.step()
    after = session.parameters()
    assert_params_equal(session, local)
    moved = [n for n in after if not np.array_equal(after[n].array, before[n].array)]
    assert moved == ["fc.weight", "fc.bias"]  # only the new head moved
    assert after["fc.weight"].shape == (10, 512)


def test_backward_from_client_output_gradient(session: Session, local: nn.Module) -> None:
    """Q.backward(gradient=external_grad): the client's own loss, its gradient sent to the server."""
    data = rand(2, 3, 64, 64, seed=4)
    prediction = session.forward(data).logits
    assert prediction is not None
    external = rand(2, 1000, seed=5) - 0.5
    result = session.backward(output_gradient=external)
    assert result.loss is None and result.parameters_with_grad == 62
    local(torch.from_numpy(data)).backward(gradient=torch.from_numpy(external))
    assert_grads_equal(session, local)


def test_gradients_accumulate_over_two_backwards(session: Session, local: nn.Module) -> None:
    first, second = rand(2, 3, 64, 64, seed=6), rand(2, 3, 64, 64, seed=7)
    labels = rand(2, 1000, seed=8)
    for data in (first, second):
        session.forward(data)
        session.backward("sum", labels)
        (local(torch.from_numpy(data)) - torch.from_numpy(labels)).sum().backward()
    assert_grads_equal(session, local)


def test_retain_graph_allows_a_second_backward(session: Session, local: nn.Module) -> None:
    data, labels = rand(2, 3, 64, 64, seed=9), rand(2, 1000, seed=10)
    forward_id = session.forward(data).forward_id
    session.backward("sum", labels, retain_graph=True, forward_id=forward_id)
    session.backward("mse", labels, forward_id=forward_id)
    prediction = local(torch.from_numpy(data))
    (prediction - torch.from_numpy(labels)).sum().backward(retain_graph=True)
    F.mse_loss(prediction, torch.from_numpy(labels)).backward()
    assert_grads_equal(session, local)
    with pytest.raises(FailedPreconditionError) as err:
        session.backward("sum", labels)
    assert err.value.reason == "GRAPH_FREED"


def test_eval_mode_forward_leaves_batchnorm_and_grads_untouched(session: Session, local: nn.Module) -> None:
    data = rand(1, 3, 64, 64, seed=11)
    session.forward(rand(2, 3, 64, 64, seed=12))
    session.backward("sum", rand(2, 1000, seed=13))
    local(torch.from_numpy(rand(2, 3, 64, 64, seed=12)))  # the same training-mode BatchNorm update
    before_params = session.parameters(include_buffers=True)
    before_grads = session.gradients()

    result = session.forward(data, eval_mode=True)
    local.eval()
    with torch.no_grad():
        expected = local(torch.from_numpy(data))
    assert_equal_to_local(result.logits, expected)

    after_params = session.parameters(include_buffers=True)
    after_grads = session.gradients()
    for name in before_params:
        np.testing.assert_array_equal(after_params[name].array, before_params[name].array, err_msg=name)
    for name in before_grads:
        np.testing.assert_array_equal(after_grads[name].array, before_grads[name].array, err_msg=name)


def test_no_grad_forward_keeps_no_graph(session: Session, local: nn.Module) -> None:
    data = rand(1, 3, 64, 64, seed=14)
    result = session.forward(data, eval_mode=True, no_grad=True)
    local.eval()
    with torch.no_grad():
        assert_equal_to_local(result.logits, local(torch.from_numpy(data)))
    assert session.info().pending_forward_id == 0
    with pytest.raises(FailedPreconditionError) as err:
        session.backward("sum", rand(1, 1000))
    assert err.value.reason == "NO_GRAPH"
    assert all(not g.present for g in session.gradients().values())
    buffers = session.parameters("bn1", include_buffers=True)
    assert_equal_to_local(buffers["bn1.running_mean"].array, local.bn1.running_mean)


def test_zero_grad_to_none_and_to_zeros(session: Session) -> None:
    session.forward(rand(2, 3, 32, 32))
    session.backward("sum", rand(2, 1000))
    assert session.zero_grad(set_to_none=False) == 62
    grads = session.gradients()
    assert all(g.present and not g.array.any() for g in grads.values())  # type: ignore[union-attr]
    assert session.zero_grad() == 62
    assert all(not g.present for g in session.gradients().values())
    assert session.list_parameters().parameters[0].has_grad is False


def test_gradient_transfer_in_half_precision(session: Session, local: nn.Module) -> None:
    data, labels = rand(2, 3, 32, 32, seed=15), rand(2, 1000, seed=16)
    session.forward(data)
    session.backward("sum", labels)
    (local(torch.from_numpy(data)) - torch.from_numpy(labels)).sum().backward()
    for dtype, torch_dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        remote = session.gradients("fc", "layer4.1.conv2.weight", dtype=dtype)
        assert list(remote) == ["layer4.1.conv2.weight", "fc.weight", "fc.bias"]
        for name, item in remote.items():
            expected = dict(local.named_parameters())[name].grad.to(torch_dtype).float()  # type: ignore[union-attr]
            # Rounding the same float32 values: equal up to a one-ulp difference where float32 sums differ.
            assert_equal_to_local(item.array.astype(np.float32), expected, rtol=1e-2 if dtype == "bfloat16" else 1e-3)  # type: ignore[union-attr]
            # The norm in float64 here: the server sums float32 squares slice by slice, closer to the truth than one float32 sum.
            assert item.stats is not None and item.stats.norm == pytest.approx(float(dict(local.named_parameters())[name].grad.double().norm()), rel=1e-5)  # type: ignore[union-attr]


def test_gradient_statistics_only(session: Session, local: nn.Module) -> None:
    data, labels = rand(2, 3, 32, 32, seed=17), rand(2, 1000, seed=18)
    session.forward(data)
    session.backward("sum", labels)
    (local(torch.from_numpy(data)) - torch.from_numpy(labels)).sum().backward()
    stats = session.gradients("fc.weight", stats_only=True)["fc.weight"]
    grad = local.fc.weight.grad
    assert stats.array is None and stats.present and stats.stats is not None
    assert stats.stats.norm == pytest.approx(float(grad.norm()), rel=1e-5)
    assert stats.stats.min == pytest.approx(float(grad.min()), rel=1e-6)
    assert stats.stats.max == pytest.approx(float(grad.max()), rel=1e-6)
    assert stats.stats.mean == pytest.approx(float(grad.mean()), rel=1e-4, abs=1e-7)
    assert stats.stats.non_finite_count == 0 and stats.stats.num_elements == 512000


def test_list_parameters_counts(session: Session, local: nn.Module) -> None:
    listing = session.list_parameters()
    assert [p.name for p in listing.parameters] == [n for n, _ in local.named_parameters()]
    assert listing["fc.weight"].shape == (1000, 512) and listing["fc.weight"].dtype == "float32"
    assert listing.trainable_count == 62 and listing.frozen_count == 0
    assert listing.total_elements == sum(p.numel() for p in local.parameters())
    session.freeze("layer1", "conv1.weight")
    listing = session.list_parameters()
    assert listing.frozen_count == 1 + 12
    assert not listing["layer1.0.conv1.weight"].requires_grad and listing["layer2.0.conv1.weight"].requires_grad
    session.unfreeze("layer1.*")
    assert session.list_parameters().frozen_count == 1


def test_frozen_layers_get_no_gradient_and_do_not_move(session: Session, local: nn.Module) -> None:
    result = session.freeze("layer4.*", "bn1")
    assert "layer4.1.bn2.bias" in result.changed and "bn1.weight" in result.changed
    for name, p in local.named_parameters():
        if name.startswith(("layer4.", "bn1.")):
            p.requires_grad = False
    data, labels = rand(2, 3, 64, 64, seed=19), rand(2, 1000, seed=20)
    session.forward(data)
    session.backward("sum", labels)
    (local(torch.from_numpy(data)) - torch.from_numpy(labels)).sum().backward()
    assert_grads_equal(session, local)
    session.step()
    torch.optim.SGD(local.parameters(), lr=1e-2, momentum=0.9).step()
    assert_params_equal(session, local)


def test_autograd_graph_of_a_forward(session: Session) -> None:
    session.freeze("layer1")
    session.forward(rand(2, 3, 32, 32))
    graph = session.graph()
    functions = {n.function for n in graph.nodes}
    assert {"AddmmBackward0", "ConvolutionBackward0", "AccumulateGrad"} <= functions
    assert graph.nodes[graph.root_id].function == "AddmmBackward0"
    assert "fc.weight" in graph.leaf_parameters and "conv1.weight" in graph.leaf_parameters
    assert len(graph.leaf_parameters) == 62 - 12
    assert graph.excluded_parameters == [n for n in graph.excluded_parameters if n.startswith("layer1.")]
    assert len(graph.excluded_parameters) == 12
    leaves = {n.parameter for n in graph.nodes if n.function == "AccumulateGrad"}
    assert leaves == set(graph.leaf_parameters)
    ids = {n.id for n in graph.nodes}
    assert all(a in ids and b in ids for a, b in graph.edges)


def test_generated_and_typed_inputs_match_torch(client: TrainerClient, local: nn.Module) -> None:
    """The grpcurl forms: a generated torch.rand input and hand-typed labels."""
    from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb

    stub = client.stub
    with client.create_session(WEIGHTS_NAME) as s:
        forward = stub.Forward(pb.ForwardRequest(
            session_id=s.session_id,
            input=pb.TensorInput(generate=pb.TensorGenerator(shape=[1, 3, 64, 64], distribution=pb.DISTRIBUTION_UNIFORM, seed=42)),
            eval_mode=True,
        ))
        data = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(42))
        local.eval()
        prediction = local(data)
        assert forward.WhichOneof("output") == "logits_values"
        assert list(forward.logits_values.shape) == [1, 1000]
        assert_equal_to_local(np.array(forward.logits_values.values, dtype=np.float32).reshape(1, 1000), prediction)
        labels = [0.0] * 1000
        labels[3] = 1.0
        backward = stub.Backward(pb.BackwardRequest(
            session_id=s.session_id,
            loss=pb.Loss(function=pb.LOSS_FUNCTION_SUM_DIFFERENCE, labels=pb.TensorInput(values=pb.TensorValues(shape=[1, 1000], values=labels))),
        ))
        loss = (prediction - torch.tensor([labels])).sum()
        assert backward.loss == pytest.approx(loss.item(), rel=1e-5)


# Both sides of the line local PyTorch draws for input sizes: resnet18 pools adaptively, so any image
# of at least 1x1 runs; a training-mode forward fails only where BatchNorm would see one value per
# channel (one image whose last stage is 1x1, i.e. at most 32x32).
ACCEPTED_SHAPES = [
    ((1, 3, 1, 1), True),      # eval: one pixel
    ((2, 3, 1, 1), False),     # train: two values per channel everywhere
    ((1, 3, 33, 1), False),    # train: the last stage is 2x1
    ((1, 3, 16, 40), False),
    ((0, 3, 64, 64), False),   # an empty batch
    ((3, 3, 7, 5), True),
]
REFUSED_SHAPES = [
    ((1, 3, 1, 1), False, "BATCH_TOO_SMALL_FOR_TRAINING"),
    ((1, 3, 32, 32), False, "BATCH_TOO_SMALL_FOR_TRAINING"),
    ((1, 3, 0, 5), True, "IMAGE_TOO_SMALL"),
    ((2, 3, 4, 0), False, "IMAGE_TOO_SMALL"),
]


@pytest.mark.parametrize(("shape", "eval_mode"), ACCEPTED_SHAPES)
def test_small_inputs_that_local_pytorch_runs_run_remotely(
    session: Session, local: nn.Module, shape: tuple[int, ...], eval_mode: bool
) -> None:
    data = rand(*shape)
    result = session.forward(data, eval_mode=eval_mode)
    local.train(not eval_mode)
    assert_equal_to_local(result.logits, local(torch.from_numpy(data)))
    assert_params_equal(session, local, include_buffers=True)  # BatchNorm statistics too


@pytest.mark.parametrize(("shape", "eval_mode", "reason"), REFUSED_SHAPES)
def test_small_inputs_that_local_pytorch_refuses_are_refused(
    session: Session, local: nn.Module, shape: tuple[int, ...], eval_mode: bool, reason: str
) -> None:
    data = rand(*shape)
    local.train(not eval_mode)
    with pytest.raises((ValueError, RuntimeError)):
        local(torch.from_numpy(data))
    with pytest.raises(InvalidArgumentError) as caught:
        session.forward(data, eval_mode=eval_mode)
    assert caught.value.reason == reason
