"""PyTorch's "A gentle introduction to torch.autograd", run against a training server.

The tutorial's own code, with one line changed: the model is ``RemoteModel(...)`` instead of
``resnet18(weights=...)``. Forward, backward and the optimizer step run on the server; the loss is
computed here. Each section prints the tutorial's kind of check (``9*a**2 == a.grad``), comparing
the remote gradients with what they must be, and with local PyTorch (when torchvision is installed)
on the same weights.

    trainer-server &                                   # or docker compose up
    python examples/autograd_tutorial.py --target localhost:50051

Exits 0 when every check holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from remote_trainer.client.graphviz import to_dot
from remote_trainer.client.remote import SGD, RemoteModel

results: list[bool] = []


def check(label: str, ok: bool | torch.Tensor) -> None:
    """Prints a check the way the tutorial does (``print(9*a**2 == a.grad)``) and remembers it."""
    passed = bool(ok.all()) if isinstance(ok, torch.Tensor) else bool(ok)
    results.append(passed)
    print(f"  {label}: {passed}")


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(b.abs().max())))


def local_twin(model: RemoteModel) -> nn.Module | None:
    """A local resnet18 with the server's current weights and statistics, or None without torchvision."""
    try:
        from torchvision.models import resnet18
    except ImportError:
        print("  (torchvision is not installed here: the comparisons with local PyTorch are skipped)")
        return None
    local = resnet18(num_classes=model.info().num_classes)
    local.load_state_dict(model.fetch_state_dict())
    return local


def usage_in_pytorch(model: RemoteModel) -> None:
    print("\n== 2. Usage in PyTorch: one training step")
    torch.manual_seed(0)
    data = torch.rand(1, 3, 64, 64)
    labels = torch.rand(1, 1000)
    local = local_twin(model)  # before the forward: a training-mode forward updates BatchNorm statistics

    prediction = model(data)  # forward pass
    loss = (prediction - labels).sum()
    loss.backward()  # backward pass
    print(f"  loss = {loss.item():.4f}; prediction {tuple(prediction.shape)}, grad_fn {type(prediction.grad_fn).__name__}")

    # d(loss)/d(logits) is 1 everywhere, so the head's bias gradient is exactly 1.
    check("model.fc.bias.grad == 1", model.fc.bias.grad == torch.ones(1000))
    grads_before = {name: g.array for name, g in model.session.gradients().items()}

    optim = model.sgd(lr=1e-2, momentum=0.9)  # optim = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    bias, bias_grad = model.fc.bias.data, model.fc.bias.grad
    optim.step()  # gradient descent
    assert bias_grad is not None
    check("fc.bias after step == fc.bias - lr * fc.bias.grad", close(model.fc.bias.data, bias - 1e-2 * bias_grad))

    if local is not None:
        local_prediction = local(data)
        check("remote prediction == local prediction", close(prediction.detach(), local_prediction.detach()))
        (local_prediction - labels).sum().backward()
        check("remote .grad == local .grad, for all 62 parameters",
              all(close(torch.from_numpy(grads_before[n].copy()), p.grad) for n, p in local.named_parameters()  # type: ignore[union-attr,arg-type]
                  if p.grad is not None) and len(grads_before) == 62)
        torch.optim.SGD(local.parameters(), lr=1e-2, momentum=0.9).step()
        remote = model.fetch_state_dict()
        check("remote weights == local weights after optim.step()",
              all(close(remote[n], v) for n, v in local.state_dict().items()))


def differentiation(model: RemoteModel) -> None:
    print("\n== 3. Differentiation in autograd")
    a = torch.tensor([2.0, 3.0], requires_grad=True)
    b = torch.tensor([6.0, 4.0], requires_grad=True)
    Q = 3 * a**3 - b**2
    external_grad = torch.tensor([1.0, 1.0])
    Q.backward(gradient=external_grad)
    check("9*a**2 == a.grad (local)", 9 * a**2 == a.grad)
    check("-2*b == b.grad (local)", -2 * b == b.grad)

    # The same with the remote model: Q is a vector (the logits), so backward needs a gradient.
    model.zero_grad()
    data = torch.rand(2, 3, 64, 64)
    Q = model(data)
    external_grad = torch.rand(Q.shape)
    Q.backward(gradient=external_grad)  # goes to the server as BackwardRequest.output_gradient
    fc_bias_grad = model.fc.bias.grad
    assert fc_bias_grad is not None
    check("external_grad.sum(0) == model.fc.bias.grad (remote)", close(fc_bias_grad, external_grad.sum(0)))


def computational_graph(model: RemoteModel, dot_path: str | None) -> None:
    print("\n== 5. Computational graph")
    prediction = model(torch.rand(1, 3, 64, 64))
    graph = model.graph()  # the DAG of this forward, read from the server (backward would free it)
    functions = {n.function for n in graph.nodes}
    root = next(n.function for n in graph.nodes if n.id == graph.root_id)
    print(f"  {len(graph.nodes)} nodes, {len(graph.edges)} edges; root {root}; {len(graph.leaf_parameters)} leaves")
    check("the root is the head's AddmmBackward0", root == "AddmmBackward0")
    check("every parameter is a leaf of the DAG", len(graph.leaf_parameters) == 62 and not graph.excluded_parameters)
    check("ConvolutionBackward0 and NativeBatchNormBackward0 are in it",
          {"ConvolutionBackward0", "NativeBatchNormBackward0"} <= functions)
    if dot_path:
        with open(dot_path, "w") as f:
            f.write(to_dot(graph))
        print(f"  wrote {dot_path} (draw it with: dot -Tpng {dot_path} -o graph.png)")
    del prediction


def exclusion_from_the_dag(model: RemoteModel) -> None:
    print("\n== 6. Exclusion from the DAG: finetuning")
    x = torch.rand(5, 5)
    y = torch.rand(5, 5)
    z = torch.rand((5, 5), requires_grad=True)
    print(f"  Does `a` require gradients?: {(x + y).requires_grad}")
    print(f"  Does `b` require gradients?: {(x + z).requires_grad}")

    # Freeze all the parameters in the network
    for param in model.parameters():
        param.requires_grad = False
    # model.fc = nn.Linear(512, 10): the new head is made on the server
    model.replace_head(10)
    # Optimize only the classifier
    optimizer = SGD(model.parameters(), lr=1e-2, momentum=0.9)

    layer4_before = model.layer4[1].conv2.weight.data
    fc_before = model.fc.weight.data
    optimizer.zero_grad()  # frozen parameters still hold the .grad of earlier steps: clear them, or SGD moves them
    prediction = model(torch.rand(4, 3, 64, 64))
    graph = model.graph()
    check("the DAG's leaves are fc.weight and fc.bias only", graph.leaf_parameters == ["fc.weight", "fc.bias"])
    check("the 60 frozen parameters are excluded from it", len(graph.excluded_parameters) == 60)
    nn.functional.cross_entropy(prediction, torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    check("only model.fc has requires_grad", trainable == ["fc.weight", "fc.bias"])
    check("the step changed fc.weight", not torch.equal(model.fc.weight.data, fc_before))
    check("the step left layer4 alone", torch.equal(model.layer4[1].conv2.weight.data, layer4_before))

    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64))
    check("under torch.no_grad() the output does not require grad", not out.requires_grad)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="localhost:50051", help="server address (default: localhost:50051)")
    parser.add_argument("--weights", default="random", help="'random', 'imagenet' or a file in the server's data dir")
    parser.add_argument("--dot", metavar="FILE", help="write the resnet18 autograd graph as Graphviz DOT")
    args = parser.parse_args()

    # The one changed line: model = resnet18(weights=ResNet18_Weights.DEFAULT)
    with RemoteModel.create(args.target, args.weights) as model:
        info = model.info()
        print(f"a {info.model} ({info.weights}) on {info.device} at {args.target}, session {info.session_id}")
        usage_in_pytorch(model)
        differentiation(model)
        computational_graph(model, args.dot)
        exclusion_from_the_dag(model)
    print(f"\n{sum(results)} of {len(results)} checks hold")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
