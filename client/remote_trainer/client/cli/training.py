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

from remote_trainer.client import core
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


def _generated(args: argparse.Namespace, classes: int, max_message_bytes: int) -> Batches:
    """Uniform random images (like torch.rand; with ``--uint8``, uint8 pixels 0-255) and labels for
    ``args.loss``, seeded by ``args.seed``. A batch too large to send is refused here, before any is made."""
    rng = np.random.default_rng(args.seed)
    shape = (args.batch, 3, args.size, args.size)
    core.check_input_bytes(shape, np.uint8 if args.uint8 else np.float32, max_message_bytes)

    def batch(i: int) -> Batch:
        x = rng.integers(0, 256, shape, dtype=np.uint8) if args.uint8 else rng.random(shape, dtype=np.float32)
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
    batches = _cycling(data, labels, args.batch) if data is not None and labels is not None else _generated(args, classes, client.max_message_bytes)
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
    if data is not None:  # uint8 images are sent as they are (for a session with an input transform)
        images = data[0] if data[0].dtype == np.uint8 else data[0].astype(np.float32, copy=False)
        batches = _cycling(images, data[1], args.batch)
    else:
        batches = _generated(args, classes, client.max_message_bytes)
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
