"""RemoteModel: the tutorial's own torch code against a real server, compared with local PyTorch."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

from remote_trainer.client import FailedPreconditionError, NotFoundError, Session, TrainerClient
from remote_trainer.client.remote import SGD, RemoteModel, RemoteParameter
from tests.conftest import assert_equal_to_local


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def assert_grads_match(model: RemoteModel, local: nn.Module) -> None:
    remote = model.session.gradients()
    for name, param in local.named_parameters():
        if param.grad is None:
            assert not remote[name].present, name
        else:
            assert_equal_to_local(remote[name].array, param.grad)


def assert_params_match(model: RemoteModel, local: nn.Module) -> None:
    remote = model.fetch_state_dict()
    for name, value in local.state_dict().items():
        assert_equal_to_local(remote[name].numpy(), value)


def test_tutorial_training_step_with_a_local_loss_matches_local(session: Session, local: nn.Module) -> None:
    model = RemoteModel(session)
    data, labels = rand(1, 3, 64, 64, seed=1), rand(1, 1000, seed=2)

    prediction = model(data)                          # forward pass on the server
    assert prediction.requires_grad and prediction.shape == (1, 1000)
    loss = (prediction - labels).sum()                # computed here
    loss.backward()                                   # backward pass: through the server
    optim = model.sgd(lr=1e-2, momentum=0.9)
    optim.step()                                      # gradient descent on the server

    local_prediction = local(data)
    assert_equal_to_local(prediction.detach().numpy(), local_prediction)
    local_loss = (local_prediction - labels).sum()
    local_loss.backward()
    assert loss.item() == pytest.approx(local_loss.item(), rel=1e-5)
    assert model.last_backward is not None and model.last_backward.parameters_with_grad == 62
    assert_grads_match(model, local)
    # The handle fetches .grad on demand; d(loss)/d(fc.bias) is 1 for every class, as the tutorial's
    # `9*a**2 == a.grad` checks hold exactly.
    fc_bias_grad = model.fc.bias.grad
    assert fc_bias_grad is not None and torch.equal(fc_bias_grad, torch.ones(1000))
    fc_weight_grad = model.fc.weight.grad
    assert fc_weight_grad is not None
    assert_equal_to_local(fc_weight_grad.numpy(), local.fc.weight.grad)  # type: ignore[arg-type]

    torch.optim.SGD(local.parameters(), lr=1e-2, momentum=0.9).step()
    assert_params_match(model, local)
    assert_equal_to_local(model.layer1[0].conv1.weight.data.numpy(), local.layer1[0].conv1.weight)  # type: ignore[index]


def test_any_loss_backpropagates_into_the_server_and_gradients_accumulate(session: Session, local: nn.Module) -> None:
    model = RemoteModel(session)
    data, targets = rand(2, 3, 64, 64, seed=3), torch.tensor([3, 917])
    for _ in range(2):  # two backward passes accumulate in .grad, as locally
        out = model(data)
        (F.cross_entropy(out, targets) + 0.01 * out.pow(2).mean()).backward()
        local_out = local(data)
        (F.cross_entropy(local_out, targets) + 0.01 * local_out.pow(2).mean()).backward()
    assert_grads_match(model, local)

    model.zero_grad()
    assert model.fc.weight.grad is None


def test_freezing_by_requires_grad_and_a_new_head_finetune_like_the_tutorial(session: Session, local: nn.Module) -> None:
    model = RemoteModel(session)
    for param in model.parameters():                  # for param in model.parameters(): param.requires_grad = False
        param.requires_grad = False
    assert not model.layer4[1].conv2.weight.requires_grad
    model.replace_head(10, seed=7)                    # model.fc = nn.Linear(512, 10)
    optimizer = SGD(model.parameters(), lr=1e-2, momentum=0.9)

    for param in local.parameters():
        param.requires_grad = False
    torch.manual_seed(7)
    local.fc = nn.Linear(512, 10)
    local_optimizer = torch.optim.SGD(local.parameters(), lr=1e-2, momentum=0.9)

    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    assert model.fc.weight.shape == (10, 512)
    data, targets = rand(4, 3, 64, 64, seed=4), torch.tensor([0, 1, 2, 9])
    for step in range(2):
        optimizer.zero_grad()
        prediction = model(data)
        graph = model.graph()                         # the DAG of this forward: only the head is in it
        assert graph.leaf_parameters == ["fc.weight", "fc.bias"]
        assert len(graph.excluded_parameters) == 60
        F.cross_entropy(prediction, targets).backward()
        optimizer.step()

        local_optimizer.zero_grad()
        F.cross_entropy(local(data), targets).backward()
        local_optimizer.step()
    assert_grads_match(model, local)                  # frozen parameters have no .grad
    assert_params_match(model, local)


def test_no_grad_and_eval_mode(session: Session, local: nn.Module) -> None:
    model = RemoteModel(session)
    data = rand(1, 3, 64, 64, seed=5)
    model.eval()
    local.eval()
    with torch.no_grad():
        prediction = model(data)
        expected = local(data)
    assert not prediction.requires_grad
    assert_equal_to_local(prediction.numpy(), expected)
    assert_params_match(model, local)                 # eval mode left the BatchNorm statistics alone
    with pytest.raises(FailedPreconditionError) as exc:  # no graph was kept on the server either
        session.backward(output_gradient=torch.ones(1, 1000))
    assert exc.value.reason == "NO_GRAPH"

    model.train()
    out = model(data)
    assert out.requires_grad
    out.sum().backward()
    assert model.fc.bias.grad is not None


def test_a_stale_prediction_cannot_backpropagate_into_a_newer_forward(session: Session) -> None:
    model = RemoteModel(session)
    first = model(rand(1, 3, 64, 64, seed=6))
    model(rand(1, 3, 64, 64, seed=7))
    with pytest.raises(FailedPreconditionError) as exc:
        first.sum().backward()
    assert exc.value.reason == "STALE_FORWARD"


def test_handles_and_mistakes(session: Session) -> None:
    model = RemoteModel(session)
    fc = model.fc
    assert [name for name, _ in fc.named_parameters()] == ["weight", "bias"]
    assert isinstance(model.layer2[0].downsample[0].weight, RemoteParameter)
    with pytest.raises(AttributeError):
        model.classifier
    with pytest.raises(TypeError, match="replace_head"):
        model.fc = nn.Linear(512, 10)
    with pytest.raises(ValueError, match="every parameter"):
        SGD(model.fc.parameters(), lr=0.1)
    model.requires_grad_(False)
    assert model.info().trainable_parameters == 0
    model.layer4.requires_grad_(True)
    assert model.info().trainable_parameters == 15


def test_create_owns_and_closes_its_session(target: str) -> None:
    with RemoteModel.create(target, "random", seed=3, num_classes=10) as model:
        info = model.info()
        assert (info.weights, info.num_classes, info.is_default) == ("random(seed=3)", 10, False)
        session_id = model.session.session_id
    with RemoteModel(target) as default:
        assert default.info().is_default
    with TrainerClient(target) as client, pytest.raises(NotFoundError):
        client.session(session_id).info()


class RpcLog(logging.Handler):
    """The server's one log line per call (``rpc=NAME session=... status=...``), counted by RPC name."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.calls: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("rpc="):
            self.calls.append(message.split()[0].removeprefix("rpc="))

    def count(self, name: str) -> int:
        return self.calls.count(name)


@pytest.fixture
def rpc_log() -> Iterator[RpcLog]:
    logger = logging.getLogger("remote_trainer.server.status")
    handler, level = RpcLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_the_tutorials_freeze_loop_sends_one_call_and_reading_requires_grad_sends_none(
    session: Session, local: nn.Module, rpc_log: RpcLog
) -> None:
    model = RemoteModel(session)
    for param in model.parameters():                  # the tutorial's loop: 62 assignments ...
        param.requires_grad = False
    assert all(not p.requires_grad for p in model.parameters())
    assert rpc_log.count("FreezeLayers") == 0         # ... sent with the next call,
    assert rpc_log.calls == ["ListParameters"]        # and reading requires_grad costs nothing
    model.replace_head(10, seed=7)
    assert rpc_log.count("FreezeLayers") == 1         # as one FreezeLayers, before the ReplaceHead
    assert rpc_log.calls.index("FreezeLayers") < rpc_log.calls.index("ReplaceHead")
    assert session.info().frozen_parameters == 60
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]

    # Changed and changed back before any call: nothing to send.
    model.layer4[1].conv2.weight.requires_grad = True
    model.layer4[1].conv2.weight.requires_grad = False
    # Unfreezing layer4 and freezing the head: one FreezeLayers each way, sent before the forward.
    for name, param in model.named_parameters():
        if name.startswith("layer4."):
            param.requires_grad = True
    model.fc.bias.requires_grad = False
    before = len(rpc_log.calls)
    data, targets = rand(2, 3, 32, 32, seed=1), torch.tensor([1, 8])
    F.cross_entropy(model(data), targets).backward()
    assert rpc_log.calls[before:] == ["FreezeLayers", "FreezeLayers", "Forward", "Backward"]

    # The same in local PyTorch: the gradients land where the freezing says.
    local.requires_grad_(False)
    torch.manual_seed(7)
    local.fc = nn.Linear(512, 10)
    local.layer4.requires_grad_(True)
    local.fc.bias.requires_grad_(False)
    F.cross_entropy(local(data), targets).backward()
    assert_grads_match(model, local)


# -- no silent traps: what nn.Module does locally is done for real, or refused saying what does ----


def test_attribute_access_makes_no_call(session: Session, rpc_log: RpcLog) -> None:
    """The names are asked once, when the model is made; ``model.fc``, ``hasattr`` (true or false),
    ``getattr`` with a default, indexing and ``requires_grad`` then send nothing."""
    model = RemoteModel(session)
    assert rpc_log.calls == ["ListParameters"]
    assert hasattr(model, "fc") and hasattr(model, "layer4") and not hasattr(model, "classifier")
    assert getattr(model, "no_such_module", None) is None
    assert isinstance(model.layer1[0].conv1.weight, RemoteParameter)
    assert model.fc.weight.shape == (1000, 512) and model.fc.weight.requires_grad
    with pytest.raises(AttributeError, match="no parameter or module 'classifier'"):
        model.classifier
    assert rpc_log.calls == ["ListParameters"]


def test_state_dict_is_the_servers_weights_and_load_state_dict_says_what_loads_them(
    session: Session, local: nn.Module, tmp_path: Path
) -> None:
    model = RemoteModel(session)
    model(rand(2, 3, 32, 32, seed=8)).sum().backward()
    model.sgd(lr=0.1).step()                          # weights and BatchNorm statistics the server changed
    local(rand(2, 3, 32, 32, seed=8)).sum().backward()
    torch.optim.SGD(local.parameters(), lr=0.1).step()
    state = model.state_dict()
    assert list(state) == list(local.state_dict())   # every parameter and buffer, in nn.Module's order
    for name, value in local.state_dict().items():
        assert state[name].dtype == value.dtype, name
        assert_equal_to_local(state[name].numpy(), value)
    fresh = resnet18()
    fresh.load_state_dict(state)                      # a local model takes it as it is
    torch.save(model.state_dict(prefix="remote."), tmp_path / "w.pt")
    assert next(iter(torch.load(tmp_path / "w.pt", weights_only=True))) == "remote.conv1.weight"
    with pytest.raises(NotImplementedError, match=r"--data-dir.*RemoteModel\.create\(target, weights='name\.pt'\)"):
        model.load_state_dict(state)


def test_to_and_cuda_say_that_the_model_stays_on_the_server_and_casts_are_refused(session: Session) -> None:
    model = RemoteModel(session)
    for move in (lambda: model.to("cpu"), lambda: model.to(torch.device("cuda")), model.cuda, model.cpu,
                 lambda: model.to("cpu", torch.float32)):
        with pytest.warns(UserWarning, match="moves nothing: the model stays on the server"):
            assert move() is model
    assert model.float() is model and model.to(torch.float32) is model  # float32 it is: nothing to say
    for cast, hint in ((lambda: model.to(torch.float16), "autocast='fp16'"), (model.half, "autocast='fp16'"),
                       (model.bfloat16, "autocast='bf16'"), (model.double, "no other dtype")):
        with pytest.raises(TypeError, match=hint):
            cast()
    with pytest.raises(TypeError, match="memory_format='channels_last'"):
        model.to(memory_format=torch.channels_last)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")  # torch's own, about cycles
def test_backward_with_create_graph_is_refused_before_anything_is_sent(session: Session, rpc_log: RpcLog) -> None:
    """The logits are differentiable once (the backward runs on the server): a double backward or a
    gradient penalty (``create_graph=True``) fails loudly rather than giving gradients with no graph."""
    model = RemoteModel(session)
    loss = model(rand(2, 3, 32, 32, seed=9)).pow(2).sum()
    with pytest.raises(RuntimeError, match="differentiable once"):
        loss.backward(create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(model(rand(2, 3, 32, 32, seed=9)).sum(), model._anchor, create_graph=True)
    assert "Backward" not in rpc_log.calls
    assert not any(p.has_grad for p in session.list_parameters().parameters)


def test_create_takes_the_per_session_options_of_create_session(target: str) -> None:
    with RemoteModel.create(target, "random", autocast="bf16", memory_format="channels_last",
                            input_transform="imagenet") as model:
        info = model.info()
        assert (info.autocast, info.memory_format) == ("bf16", "channels_last")
        assert info.input_transform is not None and info.input_transform.mean == (0.485, 0.456, 0.406)
