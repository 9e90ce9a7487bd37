"""Training from the shell: ``step`` and ``train`` (one loop behind both: a ``TrainStep`` call a
step, the loss computed on the server), their data (generated, .npy or .npz), and ``zero-grad``."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from remote_trainer.client.cli.output import ProgressBar, fmt, one_line, print_json, table
from remote_trainer.client.client import Session, TrainerClient

Batch = tuple[npt.NDArray[Any], npt.NDArray[Any]]
Batches = Callable[[int], Batch]
"""The images and labels of step ``i`` (from 0)."""


def load_npy(path: str, what: str) -> npt.NDArray[Any]:
    try:
        return np.load(path, allow_pickle=False)  # type: ignore[no-any-return]
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {what} {path}: {one_line(str(exc))}") from exc


def _load_npz(path: str) -> Batch:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive or "y" not in archive:
                raise ValueError(f"{path} must hold arrays 'x' (images) and 'y' (labels); it has {sorted(archive.files)}")
            return archive["x"], archive["y"]
    except OSError as exc:
        raise ValueError(f"cannot read --data {path}: {one_line(str(exc))}") from exc


def _cycling(x: npt.NDArray[Any], y: npt.NDArray[Any], size: int) -> Batches:
    """Batches of ``size`` that cycle through ``x`` and ``y``."""
    def batch(i: int) -> Batch:
        index = np.arange(i * size, (i + 1) * size) % len(x)
        return x[index], y[index]
    return batch


def _generated(args: argparse.Namespace, classes: int) -> Batches:
    """Uniform random images (like torch.rand) and labels for ``args.loss``, seeded by ``args.seed``."""
    rng = np.random.default_rng(args.seed)

    def batch(i: int) -> Batch:
        x = rng.random((args.batch, 3, args.size, args.size), dtype=np.float32)
        if args.loss == "cross_entropy":
            return x, rng.integers(0, classes, args.batch)
        return x, rng.random((args.batch, classes), dtype=np.float32)
    return batch


def _train(session: Session, args: argparse.Namespace, batches: Batches, show_step_count: bool) -> list[dict[str, Any]]:
    """The training loop of ``step`` and ``train``: ``args.steps`` steps of ``args.loss``, each one
    ``TrainStep`` call (zero_grad, forward, backward, optimizer step on the server); prints a line a
    step unless ``--json``, draws the progress bar, and returns a record of each step."""
    show_bar = args.progress if args.progress is not None else sys.stderr.isatty()
    bar = ProgressBar(args.steps, sys.stderr) if show_bar else None
    width = len(str(args.steps))
    records: list[dict[str, Any]] = []
    try:
        for i in range(args.steps):
            x, y = batches(i)
            started = time.monotonic()
            result = session.train_step(x, args.loss, y, grad_norm=True)
            seconds = time.monotonic() - started
            grad_norm = result.grad_norm if result.grad_norm is not None else float("nan")
            records.append({"step": i + 1, "loss": result.loss, "grad_norm": grad_norm, "seconds": seconds,
                            "step_count": result.step_count})
            if not args.json:
                if bar is not None:
                    bar.stream.write("\r\033[K")
                count = f", step_count {result.step_count}" if show_step_count else ""
                print(f"step {i + 1:>{width}}/{args.steps}  loss {result.loss:.6f}  grad_norm {grad_norm:.4g}  ({seconds:.2f} s{count})",
                      flush=True)
            if bar is not None:
                bar.update(i + 1, f"loss {result.loss:.4f}")
    finally:
        if bar is not None:
            bar.close()
    return records


def cmd_step(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    if args.steps < 1 or args.batch < 1:
        raise ValueError("--steps and --batch must be at least 1")
    classes = session.info().num_classes
    data = load_npy(args.data, "--data") if args.data else None
    labels = load_npy(args.labels, "--labels") if args.labels else None
    if (data is None) != (labels is None):
        raise ValueError("give both --data and --labels, or neither (then both are generated)")
    if data is not None and labels is not None and len(data) != len(labels):
        raise ValueError(f"--data has {len(data)} samples but --labels has {len(labels)}")
    batches = _cycling(data, labels, args.batch) if data is not None and labels is not None else _generated(args, classes)
    records = _train(session, args, batches, show_step_count=True)
    if args.json:
        print_json(records)
    return 0


def cmd_train(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    if args.steps < 1 or args.batch < 1:
        raise ValueError("--steps and --batch must be at least 1")
    classes = session.info().num_classes
    data = _load_npz(args.data) if args.data else None
    if data is not None and len(data[0]) != len(data[1]):
        raise ValueError(f"{args.data}: 'x' has {len(data[0])} samples but 'y' has {len(data[1])}")
    batches = _cycling(data[0].astype(np.float32, copy=False), data[1], args.batch) if data is not None \
        else _generated(args, classes)
    started = time.monotonic()
    records = _train(session, args, batches, show_step_count=False)
    losses = [r["loss"] for r in records]
    summary = {
        "steps": len(records), "first_loss": losses[0], "last_loss": losses[-1], "min_loss": min(losses),
        "mean_grad_norm": statistics.fmean(r["grad_norm"] for r in records),
        "median_step_seconds": statistics.median(r["seconds"] for r in records),
        "total_seconds": time.monotonic() - started, "step_count": records[-1]["step_count"],
    }
    if args.json:
        print_json({"steps": records, "summary": summary})
        return 0
    print()
    table(("summary", ""), [
        ("steps", summary["steps"]),
        ("loss", f"{fmt(summary['first_loss'])} -> {fmt(summary['last_loss'])} (min {fmt(summary['min_loss'])})"),
        ("mean grad norm", fmt(summary["mean_grad_norm"])),
        ("time", f"{summary['total_seconds']:.2f} s ({summary['median_step_seconds']:.2f} s/step median)"),
        ("session steps", summary["step_count"]),
    ])
    return 0


def cmd_zero_grad(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    cleared = session.zero_grad(set_to_none=not args.to_zeros)
    if args.json:
        print_json({"parameters_cleared": cleared, "set_to_none": not args.to_zeros})
    else:
        print(f"cleared the .grad of {cleared} parameters ({'set to zeros' if args.to_zeros else 'set to None'})")
    return 0


# -- their command lines -------------------------------------------------------------------------

_LOSSES = ("sum", "cross_entropy", "mse")


def _add_loop_flags(p: argparse.ArgumentParser) -> None:
    """The flags that ``step`` and ``train`` share, after their own."""
    p.add_argument("--seed", type=int, default=0, help="seed of the generated data (default: 0)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="draw a progress bar on stderr (default: when stderr is a terminal)")


def _add_step(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("step", help="N training steps on generated or .npy data, printing the loss of each",
                       description="Run training steps: zero_grad, forward, backward from a server-side loss, optimizer step. "
                                   "Data is uniform random (like torch.rand) unless --data and --labels name .npy files.")
    p.add_argument("-n", "--steps", type=int, default=1, help="number of steps (default: 1)")
    p.add_argument("--loss", choices=_LOSSES, default="sum",
                   help="sum: the tutorial's (prediction - labels).sum(); cross_entropy: class-index labels; mse (default: sum)")
    p.add_argument("--batch", type=int, default=2, help="images per step (default: 2)")
    p.add_argument("--size", type=int, default=64, help="height and width of generated images (default: 64)")
    p.add_argument("--data", metavar="X.npy", help="input images, float32 (N, 3, H, W); batches cycle through them")
    p.add_argument("--labels", metavar="Y.npy", help="labels: int class indices (N,) for cross_entropy, float (N, classes) otherwise")
    _add_loop_flags(p)
    p.set_defaults(run=cmd_step)


def _add_train(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("train", help="N training steps with a progress bar, the loss of each, and a summary",
                       description="Train: zero_grad, forward, backward from a server-side loss, optimizer step, N times, on "
                                   "generated data or an .npz file holding 'x' (float32 images, N x 3 x H x W) and 'y' (labels: "
                                   "int class indices for cross_entropy, float (N, classes) otherwise); batches cycle through it.")
    p.add_argument("-n", "--steps", type=int, default=10, help="number of steps (default: 10)")
    p.add_argument("--data", metavar="D.npz", help="training data: arrays 'x' and 'y'")
    p.add_argument("--loss", choices=_LOSSES, default="cross_entropy", help="(default: cross_entropy)")
    p.add_argument("--batch", type=int, default=8, help="images per step (default: 8)")
    p.add_argument("--size", type=int, default=64, help="height and width of generated images (default: 64)")
    _add_loop_flags(p)
    p.set_defaults(run=cmd_train)


def _add_zero_grad(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("zero-grad", help="clear every parameter's .grad (optimizer.zero_grad())",
                       description="Clear every parameter's .grad: set to None (PyTorch's default), or to zeros with --to-zeros.")
    p.add_argument("--to-zeros", action="store_true", help="zero the tensors instead of setting .grad to None")
    p.set_defaults(run=cmd_zero_grad)


PARSERS = {"step": _add_step, "train": _add_train, "zero-grad": _add_zero_grad}
"""Each command of this module and the function that adds its parser."""
