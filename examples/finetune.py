"""Finetuning a remote resnet18 on a small synthetic data set: freeze, a new 10-class head, train.

The tutorial's finetuning recipe, through ``RemoteModel``: every parameter frozen, ``model.fc``
replaced by a new ``nn.Linear(512, 10)`` on the server, then a few hundred SGD steps with the loss
(cross-entropy) computed here and backpropagated into the server. The data set is made here, nothing
is downloaded: each class is a striped pattern with its own orientation, stripe width and colour,
under noise, so it is learnable but not trivial. The loss falls and the held-out accuracy rises.

    python examples/finetune.py --target localhost:50051 --steps 300

Exits 0 when the loss fell and the accuracy rose, 1 otherwise.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F

from remote_trainer.client.cli import ProgressBar
from remote_trainer.client.remote import SGD, RemoteModel

NUM_CLASSES = 10


def make_dataset(n: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (n, 3, size, size) in [0, 1] and their class labels (n,)."""
    labels = torch.randint(NUM_CLASSES, (n,), generator=generator)
    coords = torch.arange(size, dtype=torch.float32) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    angle = labels.float() * math.pi / NUM_CLASSES                      # orientation, per class
    period = 0.12 + 0.05 * (labels % 3).float()                         # stripe width, per class
    phase = torch.rand(n, generator=generator) * 2 * math.pi            # random shift, per image
    along = xx[None] * torch.cos(angle)[:, None, None] + yy[None] * torch.sin(angle)[:, None, None]
    stripes = 0.5 + 0.5 * torch.sin(2 * math.pi * along / period[:, None, None] + phase[:, None, None])
    hue = torch.rand(NUM_CLASSES, 3, generator=torch.Generator().manual_seed(7))  # a colour per class
    images = stripes[:, None] * hue[labels][:, :, None, None]
    images = images + 0.15 * torch.randn(images.shape, generator=generator)
    return images.clamp(0, 1), labels


def accuracy(model: RemoteModel, images: torch.Tensor, labels: torch.Tensor, batch: int) -> float:
    """Share of correct predictions, under ``torch.no_grad()`` (the server keeps no graph).

    The model stays in training mode, so BatchNorm normalises with the statistics of each batch, as
    it did while the head learned: the backbone's weights are random (no ImageNet weights offline),
    and its running statistics are not those of a trained network. With ImageNet weights,
    ``model.eval()`` here is the usual choice.
    """
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            correct += int((model(images[i : i + batch]).argmax(1) == labels[i : i + batch]).sum())
    return correct / len(images)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="localhost:50051", help="server address (default: localhost:50051)")
    parser.add_argument("--weights", default="random", help="'random', 'imagenet' or a file in the server's data dir")
    parser.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    parser.add_argument("--batch", type=int, default=32, help="images per step (default: 32)")
    parser.add_argument("--size", type=int, default=64, help="image height and width, >= 32 (default: 64)")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default: 0.01)")
    parser.add_argument("--train-size", type=int, default=1024, help="training images (default: 1024)")
    parser.add_argument("--test-size", type=int, default=256, help="held-out images (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data set (default: 0)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="draw a progress bar on stderr (default: when stderr is a terminal)")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(args.seed)
    train_x, train_y = make_dataset(args.train_size, args.size, generator)
    test_x, test_y = make_dataset(args.test_size, args.size, generator)

    with RemoteModel.create(args.target, args.weights) as model:
        # Freeze all the parameters in the network
        for param in model.parameters():
            param.requires_grad = False
        model.replace_head(NUM_CLASSES)  # model.fc = nn.Linear(512, 10), made on the server
        optimizer = SGD(model.parameters(), lr=args.lr, momentum=0.9)
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        print(f"finetuning {', '.join(trainable)} of a {model.info().weights} resnet18 at {args.target}; "
              f"{args.train_size} training and {args.test_size} held-out {args.size}x{args.size} images, {NUM_CLASSES} classes")

        accuracy_before = accuracy(model, test_x, test_y, 128)
        show_bar = args.progress if args.progress is not None else sys.stderr.isatty()
        bar = ProgressBar(args.steps, sys.stderr) if show_bar else None
        losses: list[float] = []
        started = time.monotonic()
        order = torch.randperm(args.train_size, generator=generator)
        for step in range(args.steps):
            start = (step * args.batch) % args.train_size
            if start + args.batch > args.train_size:
                order = torch.randperm(args.train_size, generator=generator)
            index = order[start : start + args.batch] if start + args.batch <= args.train_size else order[: args.batch]

            optimizer.zero_grad()
            loss = F.cross_entropy(model(train_x[index]), train_y[index])  # logits from the server, loss here
            loss.backward()                                                 # into the server's Backward
            optimizer.step()
            losses.append(loss.item())
            if bar is not None:
                bar.update(step + 1, f"loss {sum(losses[-10:]) / len(losses[-10:]):.3f}")
            elif (step + 1) % max(1, args.steps // 10) == 0:
                print(f"step {step + 1:>4}/{args.steps}  loss {sum(losses[-10:]) / len(losses[-10:]):.4f}", flush=True)
        if bar is not None:
            bar.close()
        accuracy_after = accuracy(model, test_x, test_y, 128)

    window = max(1, min(10, len(losses) // 4))
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(f"{args.steps} steps in {time.monotonic() - started:.1f} s")
    print(f"loss: {first:.4f} -> {last:.4f} (mean of the first and last {window} steps)")
    print(f"held-out accuracy: {accuracy_before:.1%} -> {accuracy_after:.1%}")
    return 0 if last < first and accuracy_after > accuracy_before else 1


if __name__ == "__main__":
    sys.exit(main())
