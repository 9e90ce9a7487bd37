"""``trainer-client``: the training server from a shell.

Sessions, training steps and runs, gradients, freezing, heads, the optimizer, checkpoints,
predictions, the autograd graph. Needs only the SDK's dependencies (no torch). Every command works on
the server's default session unless ``--session`` names another; output is tables for people, or
JSON with ``--json``. A failed call prints one line, ``trainer-client: error: ...``, and exits with
status 1 (2 for a bad command line).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt

from remote_trainer.client import graphviz, plots
from remote_trainer.client.client import Session, TrainerClient
from remote_trainer.client.errors import TrainerError
from remote_trainer.client.types import Optimizer, SessionInfo
from remote_trainer.contract.names import AUTOCAST_MODES, MEMORY_FORMATS

PROG = "trainer-client"
DEFAULT_TARGET = "localhost:50051"


class ProgressBar:
    """A one-line progress bar, redrawn in place: ``[#######-------]  7/15  0.4 s/step``."""

    def __init__(self, total: int, stream: TextIO, width: int = 30) -> None:
        self.total = max(total, 1)
        self.stream = stream
        self.width = width
        self.start = time.monotonic()

    def update(self, done: int, note: str = "") -> None:
        filled = self.width * done // self.total
        rate = (time.monotonic() - self.start) / max(done, 1)
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r[{bar}] {done:>{len(str(self.total))}}/{self.total}  {rate:.2f} s/step  {note}")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


# -- commands ------------------------------------------------------------------------------------


def cmd_health(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    status = client.health(args.service)
    if args.json:
        _print_json({"status": status})
    else:
        print(status)
    return 0 if status == "SERVING" else 1


def cmd_info(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    info = session.info()
    params = session.list_parameters()
    if args.json:
        data = _info_json(info)
        data["parameter_counts"] = {
            "tensors": len(params.parameters), "elements": params.total_elements, "trainable_tensors": params.trainable_count,
            "trainable_elements": params.trainable_elements, "frozen_tensors": params.frozen_count,
        }
        if args.parameters:
            data["parameters"] = [
                {"name": p.name, "shape": list(p.shape), "requires_grad": p.requires_grad, "has_grad": p.has_grad}
                for p in params.parameters
            ]
        _print_json(data)
        return 0
    opt = info.optimizer
    opt_values = ", ".join(
        f"{k}={getattr(opt, k)}"
        for k in (("lr", "momentum", "dampening", "weight_decay", "nesterov") if opt.kind == "sgd"
                  else ("lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad"))
    )
    rows = [
        ("server", client.target),
        ("session", f"{info.session_id}{' (default)' if info.is_default else ''}"),
        ("model", info.model),
        ("weights", info.weights),
        ("device", info.device),
        ("fast paths", f"autocast {info.autocast}, {info.memory_format}"),
        ("classes", str(info.num_classes)),
        ("optimizer", f"{opt.kind}({opt_values})"),
        ("steps", str(info.step_count)),
        ("pending forward", str(info.pending_forward_id or "none")),
        ("parameters", f"{len(params.parameters)} tensors, {params.total_elements:,} elements"),
        ("trainable", f"{params.trainable_count} tensors, {params.trainable_elements:,} elements"),
        ("frozen", f"{params.frozen_count} tensors"),
    ]
    for key, value in rows:
        print(f"{key + ':':<17}{value}")
    if args.parameters:
        print()
        width = max(len(p.name) for p in params.parameters)
        print(f"{'name':<{width}}  {'shape':<14} {'trainable':<10} grad")
        for p in params.parameters:
            print(f"{p.name:<{width}}  {_shape(p.shape):<14} {'yes' if p.requires_grad else 'frozen':<10} {'yes' if p.has_grad else '-'}")
    return 0


def _load(path: str, what: str) -> npt.NDArray[Any]:
    try:
        return np.load(path, allow_pickle=False)  # type: ignore[no-any-return]
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {what} {path}: {_one_line(str(exc))}") from exc


def cmd_step(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    if args.steps < 1 or args.batch < 1:
        raise ValueError("--steps and --batch must be at least 1")
    classes = session.info().num_classes
    rng = np.random.default_rng(args.seed)
    data = _load(args.data, "--data") if args.data else None
    labels = _load(args.labels, "--labels") if args.labels else None
    if (data is None) != (labels is None):
        raise ValueError("give both --data and --labels, or neither (then both are generated)")
    if data is not None and labels is not None and len(data) != len(labels):
        raise ValueError(f"--data has {len(data)} samples but --labels has {len(labels)}")

    def batch(i: int) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        if data is not None and labels is not None:
            index = np.arange(i * args.batch, (i + 1) * args.batch) % len(data)
            return data[index], labels[index]
        x = rng.random((args.batch, 3, args.size, args.size), dtype=np.float32)
        if args.loss == "cross_entropy":
            return x, rng.integers(0, classes, args.batch)
        return x, rng.random((args.batch, classes), dtype=np.float32)

    show_bar = args.progress if args.progress is not None else sys.stderr.isatty()
    bar = ProgressBar(args.steps, sys.stderr) if show_bar else None
    width = len(str(args.steps))
    records: list[dict[str, Any]] = []
    try:
        for i in range(args.steps):
            x, y = batch(i)
            started = time.monotonic()
            session.zero_grad()
            session.forward(x, stats_only=True)
            result = session.backward(args.loss, y)
            count = session.step()
            loss = result.loss if result.loss is not None else float("nan")
            if args.json:
                records.append({"step": i + 1, "loss": loss, "grad_norm": result.grad_norm,
                                "seconds": time.monotonic() - started, "step_count": count})
                continue
            line = f"step {i + 1:>{width}}/{args.steps}  loss {loss:.6f}  grad_norm {result.grad_norm:.4g}  ({time.monotonic() - started:.2f} s, step_count {count})"
            if bar is not None:
                bar.stream.write("\r\033[K")
            print(line, flush=True)
            if bar is not None:
                bar.update(i + 1, f"loss {loss:.4f}")
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        _print_json(records)
    return 0


def cmd_grads(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    grads = session.gradients(*args.patterns, stats_only=args.save is None)
    if args.plot is not None:
        plots.plot_gradient_flow(grads, args.plot)
    if args.save is not None:
        arrays = {name: g.array for name, g in grads.items() if g.array is not None}
        np.savez(args.save, **arrays)  # type: ignore[arg-type]
    if args.json:
        _print_json({name: {"shape": list(g.shape), "present": g.present,
                            "stats": dataclasses.asdict(g.stats) if g.stats is not None else None} for name, g in grads.items()})
        return 0
    width = max([len(n) for n in grads] + [4])
    print(f"{'name':<{width}}  {'shape':<14} {'norm':>11} {'min':>11} {'max':>11} {'mean':>11}")
    for name, g in grads.items():
        if not g.present or g.stats is None:
            print(f"{name:<{width}}  {_shape(g.shape):<14} {'no grad':>11}")
            continue
        s = g.stats
        flag = f"  ({s.non_finite_count} non-finite)" if s.non_finite_count else ""
        print(f"{name:<{width}}  {_shape(g.shape):<14} {_fmt(s.norm):>11} {_fmt(s.min):>11} {_fmt(s.max):>11} {_fmt(s.mean):>11}{flag}")
    present = sum(1 for g in grads.values() if g.present)
    print(f"{present} of {len(grads)} parameters have a gradient")
    if args.save is not None:
        print(f"saved {len(arrays)} gradients to {args.save}")
    if args.plot is not None:
        print(f"wrote the gradient-flow picture to {args.plot}")
    return 0


def cmd_freeze(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    result = session.unfreeze(*args.patterns) if args.unfreeze else session.freeze(*args.patterns)
    if args.json:
        _print_json(dataclasses.asdict(result))
        return 0
    verb = "unfroze" if args.unfreeze else "froze"
    print(f"{verb} {len(result.changed)} parameters; {len(result.trainable)} trainable, {result.frozen_count} frozen")
    if len(result.trainable) <= 10:
        print("trainable: " + (", ".join(result.trainable) or "none"))
    return 0


def cmd_replace_head(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    info = session.replace_head(args.num_classes, seed=args.seed)
    if args.json:
        _print_json(_info_json(info))
        return 0
    print(f"fc = Linear(512, {info.num_classes}) (seed {args.seed}); {info.trainable_parameters} trainable, "
          f"{info.frozen_parameters} frozen parameters; optimizer rebuilt")
    return 0


def cmd_graph(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    if not args.pending:
        x = np.random.default_rng(args.seed).random((args.batch, 3, args.size, args.size), dtype=np.float32)
        session.forward(x, eval_mode=True, stats_only=True)
    graph = session.graph()
    dot = graphviz.to_dot(graph)
    if args.json:
        if args.dot and args.dot != "-":
            Path(args.dot).write_text(dot)
        if args.image:
            graphviz.render(dot, args.image)
        _print_json({"forward_id": graph.forward_id, "nodes": len(graph.nodes), "edges": len(graph.edges),
                     "functions": dict(Counter(n.function for n in graph.nodes if not n.parameter)),
                     "leaf_parameters": graph.leaf_parameters, "excluded_parameters": graph.excluded_parameters})
        return 0
    if args.dot == "-":
        sys.stdout.write(dot)
    else:
        functions = Counter(n.function for n in graph.nodes if not n.parameter)
        print(f"forward {graph.forward_id}: {len(graph.nodes)} nodes, {len(graph.edges)} edges; "
              f"{len(graph.leaf_parameters)} leaf parameters, {len(graph.excluded_parameters)} excluded (frozen)")
        print("functions: " + ", ".join(f"{name} x{count}" for name, count in functions.most_common()))
        if args.dot:
            Path(args.dot).write_text(dot)
            print(f"wrote DOT to {args.dot}")
    if args.image:
        graphviz.render(dot, args.image)
        print(f"wrote {args.image}", file=sys.stderr if args.dot == "-" else sys.stdout)
    return 0


# -- output for people (tables) and for scripts (--json) -------------------------------------------


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> None:
    """Prints rows under headers, each column as wide as its widest cell; ``right`` columns right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for row in cells:
        line = "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        print(line.rstrip())


def _optimizer_values(opt: Optimizer) -> dict[str, Any]:
    """The values that the optimizer's kind uses, in torch's order."""
    keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov") if opt.kind == "sgd" else \
        ("lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad")
    return {k: getattr(opt, k) for k in keys}


def _optimizer_text(opt: Optimizer) -> str:
    return f"{opt.kind}(" + ", ".join(f"{k}={v}" for k, v in _optimizer_values(opt).items()) + ")"


def _info_json(info: SessionInfo) -> dict[str, Any]:
    data = dataclasses.asdict(info)
    data["optimizer"] = {"kind": info.optimizer.kind, **_optimizer_values(info.optimizer)}
    return data


# -- sessions, reset, optimizer, zero-grad, checkpoints ------------------------------------------


def cmd_sessions(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    action = args.action or "list"
    if action == "list":
        infos = client.list_sessions()
        if args.json:
            _print_json([_info_json(i) for i in infos])
            return 0
        _table(
            ("id", "weights", "classes", "steps", "trainable", "frozen", "optimizer"),
            [(i.session_id, i.weights, i.num_classes, i.step_count,
              i.trainable_parameters, i.frozen_parameters, _optimizer_text(i.optimizer)) for i in infos],
            right=(2, 3, 4, 5),
        )
        return 0
    if action == "create":
        created = client.create_session(args.weights, num_classes=args.num_classes, seed=args.seed,
                                        autocast=args.autocast, memory_format=args.memory_format)
        info = created.info()
        if args.json:
            _print_json(_info_json(info))
        else:
            print(f"created session {info.session_id}: {info.model}, weights {info.weights}, {info.num_classes} classes, "
                  f"autocast {info.autocast}, {info.memory_format}")
            print(f"use it with: {PROG} --session {info.session_id} COMMAND")
        return 0
    if not args.ids:
        raise ValueError("sessions close: give the id(s) of the session(s) to close")
    for sid in args.ids:
        client.session(sid).close()
        if not args.json:
            print(f"closed session {sid}")
    if args.json:
        _print_json({"closed": args.ids})
    return 0


def cmd_reset(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    info = session.reset()
    if args.json:
        _print_json(_info_json(info))
    else:
        print(f"session {info.session_id} reset to how the server started it: {info.model}, weights {info.weights}, "
              f"{info.num_classes} classes, step {info.step_count}, {info.trainable_parameters} trainable parameters, "
              f"{_optimizer_text(info.optimizer)}")
    return 0


_OPTIMIZER_FLAGS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "beta1", "beta2", "eps", "amsgrad")


def cmd_optimizer(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    current = session.info().optimizer
    if args.action == "set":
        given = {k: getattr(args, k) for k in _OPTIMIZER_FLAGS if getattr(args, k) is not None}
        kind = args.kind or current.kind
        # The same kind keeps the values not given; another kind starts from torch's defaults.
        base = _optimizer_values(current) if kind == current.kind else {}
        base.update(given, kind=kind)
        current = session.configure_optimizer(Optimizer(**base))
    data = {"kind": current.kind, **_optimizer_values(current)}
    if args.json:
        _print_json(data)
    else:
        if args.action == "set":
            print("optimizer replaced (its state, such as momentum buffers, starts anew):")
        for key, value in data.items():
            print(f"{key + ':':<14}{value}")
    return 0


def cmd_zero_grad(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    cleared = session.zero_grad(set_to_none=not args.to_zeros)
    if args.json:
        _print_json({"parameters_cleared": cleared, "set_to_none": not args.to_zeros})
    else:
        print(f"cleared the .grad of {cleared} parameters ({'set to zeros' if args.to_zeros else 'set to None'})")
    return 0


def cmd_checkpoint(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    if args.action == "list":
        files = client.list_checkpoints()
        if args.json:
            _print_json([dataclasses.asdict(f) for f in files])
        elif not files:
            print("no checkpoints (or the server has no --checkpoint-dir)")
        else:
            _table(("name", "bytes", "written (UTC)"),
                   [(f.name, f"{f.size_bytes:,}", time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(f.modified_unix_seconds)))
                    for f in files], right=(1,))
        return 0
    if not args.name:
        raise ValueError(f"checkpoint {args.action}: give the checkpoint's NAME")
    if args.action == "save":
        steps = session.save_checkpoint(args.name)
        if args.json:
            _print_json({"name": args.name, "step_count": steps})
        else:
            print(f"saved checkpoint {args.name} at step {steps}")
        return 0
    info = session.load_checkpoint(args.name)
    if args.json:
        _print_json(_info_json(info))
    else:
        print(f"loaded checkpoint {args.name}: step {info.step_count}, {info.num_classes} classes, "
              f"{info.trainable_parameters} trainable, {info.frozen_parameters} frozen, {_optimizer_text(info.optimizer)}")
    return 0


# -- predict and train ---------------------------------------------------------------------------


def _softmax(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


def cmd_predict(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    if args.top < 1:
        raise ValueError("--top must be at least 1")
    if args.data:
        x = _load(args.data, "--data").astype(np.float32, copy=False)
    else:
        x = np.random.default_rng(args.seed).random((args.batch, 3, args.size, args.size), dtype=np.float32)
    result = session.forward(x, eval_mode=True, no_grad=True)
    assert result.logits is not None
    probabilities = _softmax(result.logits)
    k = min(args.top, probabilities.shape[1])
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    if args.json:
        _print_json([
            [{"class": int(c), "probability": float(probabilities[i, c]), "logit": float(result.logits[i, c])} for c in row]
            for i, row in enumerate(top)
        ])
        return 0
    rows = [(i, rank + 1, int(c), f"{probabilities[i, c]:.4f}", _fmt(float(result.logits[i, c])))
            for i, row in enumerate(top) for rank, c in enumerate(row)]
    _table(("image", "rank", "class", "probability", "logit"), rows, right=(0, 1, 2, 3, 4))
    return 0


def _load_npz(path: str) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive or "y" not in archive:
                raise ValueError(f"{path} must hold arrays 'x' (images) and 'y' (labels); it has {sorted(archive.files)}")
            return archive["x"], archive["y"]
    except OSError as exc:
        raise ValueError(f"cannot read --data {path}: {_one_line(str(exc))}") from exc


def cmd_train(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    if args.steps < 1 or args.batch < 1:
        raise ValueError("--steps and --batch must be at least 1")
    classes = session.info().num_classes
    rng = np.random.default_rng(args.seed)
    data = _load_npz(args.data) if args.data else None
    if data is not None and len(data[0]) != len(data[1]):
        raise ValueError(f"{args.data}: 'x' has {len(data[0])} samples but 'y' has {len(data[1])}")

    def batch(i: int) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        if data is not None:
            index = np.arange(i * args.batch, (i + 1) * args.batch) % len(data[0])
            return data[0][index].astype(np.float32, copy=False), data[1][index]
        x = rng.random((args.batch, 3, args.size, args.size), dtype=np.float32)
        if args.loss == "cross_entropy":
            return x, rng.integers(0, classes, args.batch)
        return x, rng.random((args.batch, classes), dtype=np.float32)

    show_bar = args.progress if args.progress is not None else sys.stderr.isatty()
    bar = ProgressBar(args.steps, sys.stderr) if show_bar else None
    width = len(str(args.steps))
    records: list[dict[str, Any]] = []
    started_all = time.monotonic()
    try:
        for i in range(args.steps):
            x, y = batch(i)
            started = time.monotonic()
            session.zero_grad()
            session.forward(x, stats_only=True)
            result = session.backward(args.loss, y)
            count = session.step()
            seconds = time.monotonic() - started
            loss = result.loss if result.loss is not None else float("nan")
            records.append({"step": i + 1, "loss": loss, "grad_norm": result.grad_norm, "seconds": seconds, "step_count": count})
            if not args.json:
                if bar is not None:
                    bar.stream.write("\r\033[K")
                print(f"step {i + 1:>{width}}/{args.steps}  loss {loss:.6f}  grad_norm {result.grad_norm:.4g}  ({seconds:.2f} s)",
                      flush=True)
            if bar is not None:
                bar.update(i + 1, f"loss {loss:.4f}")
    finally:
        if bar is not None:
            bar.close()
    losses = [r["loss"] for r in records]
    summary = {
        "steps": len(records), "first_loss": losses[0], "last_loss": losses[-1], "min_loss": min(losses),
        "mean_grad_norm": statistics.fmean(r["grad_norm"] for r in records),
        "median_step_seconds": statistics.median(r["seconds"] for r in records),
        "total_seconds": time.monotonic() - started_all, "step_count": records[-1]["step_count"],
    }
    if args.json:
        _print_json({"steps": records, "summary": summary})
        return 0
    print()
    _table(("summary", ""), [
        ("steps", summary["steps"]),
        ("loss", f"{_fmt(summary['first_loss'])} -> {_fmt(summary['last_loss'])} (min {_fmt(summary['min_loss'])})"),
        ("mean grad norm", _fmt(summary["mean_grad_norm"])),
        ("time", f"{summary['total_seconds']:.2f} s ({summary['median_step_seconds']:.2f} s/step median)"),
        ("session steps", summary["step_count"]),
    ])
    return 0


def _add_new_commands(sub: Any) -> None:
    """The parsers of sessions, reset, optimizer, zero-grad, checkpoint, predict and train."""
    p = sub.add_parser("sessions", help="list, create or close sessions",
                       description="List the sessions this token may use (the default one and its own), create one, or close some.")
    p.add_argument("action", nargs="?", choices=("list", "create", "close"), help="default: list")
    p.add_argument("ids", nargs="*", metavar="ID", help="for close: the sessions to close")
    p.add_argument("--weights", default="random",
                   help="for create: 'random' (seeded), 'imagenet' or a weights file in the server's --data-dir (default: random)")
    p.add_argument("--num-classes", type=int, default=0, help="for create: classes of the head (default: the weights' own)")
    p.add_argument("--seed", type=int, default=0, help="for create: seed of random weights and of a new head (default: 0)")
    p.add_argument("--autocast", choices=AUTOCAST_MODES,
                   help="for create: run the session's forwards under torch.autocast in this type (default: the server's --autocast)")
    p.add_argument("--memory-format", choices=MEMORY_FORMATS,
                   help="for create: memory format of the session's weights and inputs (default: the server's --memory-format)")
    p.set_defaults(run=cmd_sessions)

    p = sub.add_parser("reset", help="put the default session back as the server started it",
                       description="Restore the default session's weights, BatchNorm buffers, head, optimizer (and its state), "
                                   "step count and frozen set as the server started it; gradients and the pending forward go.")
    p.set_defaults(run=cmd_reset)

    p = sub.add_parser("optimizer", help="show, or set, the optimizer (kind, lr, momentum, ...)",
                       description="Show the session's optimizer, or replace it with 'set' (its state starts anew). With the "
                                   "same kind, values not given stay as they are; another --kind starts from torch's defaults.")
    p.add_argument("action", nargs="?", choices=("show", "set"), default="show", help="default: show")
    p.add_argument("--kind", choices=("sgd", "adam", "adamw"))
    for flag in ("lr", "momentum", "dampening", "weight_decay", "beta1", "beta2", "eps"):
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, type=float)
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None, help="sgd")
    p.add_argument("--amsgrad", action=argparse.BooleanOptionalAction, default=None, help="adam, adamw")
    p.set_defaults(run=cmd_optimizer)

    p = sub.add_parser("zero-grad", help="clear every parameter's .grad (optimizer.zero_grad())",
                       description="Clear every parameter's .grad: set to None (PyTorch's default), or to zeros with --to-zeros.")
    p.add_argument("--to-zeros", action="store_true", help="zero the tensors instead of setting .grad to None")
    p.set_defaults(run=cmd_zero_grad)

    p = sub.add_parser("checkpoint", help="save, load or list checkpoints in the server's --checkpoint-dir",
                       description="Save the session (weights, buffers, head, frozen set, optimizer and its state, steps) to a "
                                   "checkpoint, load one into it, or list those this token may load.")
    p.add_argument("action", choices=("save", "load", "list"))
    p.add_argument("name", nargs="?", metavar="NAME", help="file name in the checkpoint directory, such as run.ckpt")
    p.set_defaults(run=cmd_checkpoint)

    p = sub.add_parser("predict", help="class predictions of an eval-mode forward, top-k with probabilities",
                       description="Run an eval-mode forward with no graph (BatchNorm statistics untouched; it replaces the "
                                   "pending forward) of generated images or an .npy file, and show the top classes by softmax.")
    p.add_argument("--data", metavar="X.npy", help="images, float32 (N, 3, H, W) (default: uniform random, like torch.rand)")
    p.add_argument("--top", type=int, default=5, help="classes per image (default: 5)")
    p.add_argument("--batch", type=int, default=1, help="generated images (default: 1)")
    p.add_argument("--size", type=int, default=64, help="height and width of generated images (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated images (default: 0)")
    p.set_defaults(run=cmd_predict)

    p = sub.add_parser("train", help="N training steps with a progress bar, the loss of each, and a summary",
                       description="Train: zero_grad, forward, backward from a server-side loss, optimizer step, N times, on "
                                   "generated data or an .npz file holding 'x' (float32 images, N x 3 x H x W) and 'y' (labels: "
                                   "int class indices for cross_entropy, float (N, classes) otherwise); batches cycle through it.")
    p.add_argument("-n", "--steps", type=int, default=10, help="number of steps (default: 10)")
    p.add_argument("--data", metavar="D.npz", help="training data: arrays 'x' and 'y'")
    p.add_argument("--loss", choices=("sum", "cross_entropy", "mse"), default="cross_entropy", help="(default: cross_entropy)")
    p.add_argument("--batch", type=int, default=8, help="images per step (default: 8)")
    p.add_argument("--size", type=int, default=64, help="height and width of generated images (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated data (default: 0)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="draw a progress bar on stderr (default: when stderr is a terminal)")
    p.set_defaults(run=cmd_train)


# -- the parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Drive a remote-trainer server (a resnet18 trained one step at a time) from the shell.",
        epilog=f"examples:\n  {PROG} health\n  {PROG} info --parameters\n  {PROG} step -n 10 --loss cross_entropy\n"
               f"  {PROG} grads fc --save grads.npz\n  {PROG} freeze '*' && {PROG} freeze --unfreeze fc\n"
               f"  {PROG} replace-head 10\n  {PROG} graph --dot graph.dot --image graph.png\n"
               f"  {PROG} sessions create --seed 1\n  {PROG} --session ID train -n 100 --data d.npz\n"
               f"  {PROG} optimizer set --kind adam --lr 1e-3\n  {PROG} checkpoint save run.ckpt\n"
               f"  {PROG} predict --data x.npy --top 5\n  {PROG} grads --plot flow.png\n  {PROG} --json sessions\n"
               f"  {PROG} reset",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", default=os.environ.get("TRAINER_TARGET", DEFAULT_TARGET),
                        help=f"server address (default: $TRAINER_TARGET or {DEFAULT_TARGET})")
    parser.add_argument("--session", default="", metavar="ID", help="session id (default: the server's default session)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS", help="deadline of each call (default: 120)")
    parser.add_argument("--token", default=os.environ.get("TRAINER_TOKEN"),
                        help="bearer token for a server that requires one (default: $TRAINER_TOKEN)")
    parser.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    parser.add_argument("--ca-cert", metavar="PEM", help="CA certificate that signed the server's (implies --tls)")
    parser.add_argument("--client-cert", metavar="PEM", help="client certificate, for mutual TLS (implies --tls)")
    parser.add_argument("--client-key", metavar="PEM", help="client private key, for mutual TLS")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts instead of tables")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("health", help="the server's health status (exit 0 when SERVING)",
                       description="Print the server's gRPC health status; exit 0 when it is SERVING, 1 otherwise.")
    p.add_argument("--service", default="", help="a service name to check (default: the whole server)")
    p.set_defaults(run=cmd_health)

    p = sub.add_parser("info", help="model, weights, device, optimizer and parameter counts",
                       description="Describe the session: model, weights, device, classes, optimizer, steps, parameters.")
    p.add_argument("--parameters", action="store_true", help="also list every parameter with shape and flags")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("step", help="N training steps on generated or .npy data, printing the loss of each",
                       description="Run training steps: zero_grad, forward, backward from a server-side loss, optimizer step. "
                                   "Data is uniform random (like torch.rand) unless --data and --labels name .npy files.")
    p.add_argument("-n", "--steps", type=int, default=1, help="number of steps (default: 1)")
    p.add_argument("--loss", choices=("sum", "cross_entropy", "mse"), default="sum",
                   help="sum: the tutorial's (prediction - labels).sum(); cross_entropy: class-index labels; mse (default: sum)")
    p.add_argument("--batch", type=int, default=2, help="images per step (default: 2)")
    p.add_argument("--size", type=int, default=64, help="height and width of generated images (default: 64)")
    p.add_argument("--data", metavar="X.npy", help="input images, float32 (N, 3, H, W); batches cycle through them")
    p.add_argument("--labels", metavar="Y.npy", help="labels: int class indices (N,) for cross_entropy, float (N, classes) otherwise")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated data (default: 0)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="draw a progress bar on stderr (default: when stderr is a terminal)")
    p.set_defaults(run=cmd_step)

    p = sub.add_parser("grads", help="a table of gradient statistics; --save writes them to .npz",
                       description="Show norm, min, max and mean of each parameter's .grad (all, or those matching PATTERNs).")
    p.add_argument("patterns", nargs="*", metavar="PATTERN", help="'fc', 'layer4.*', 'fc.weight', ... (default: every parameter)")
    p.add_argument("--save", metavar="FILE.npz", help="also fetch the gradients and save them with numpy.savez")
    p.add_argument("--plot", metavar="FILE.png",
                   help="draw the gradient flow (norm and max |grad| per parameter, log scale) into FILE (needs matplotlib)")
    p.set_defaults(run=cmd_grads)

    p = sub.add_parser("freeze", help="freeze (or --unfreeze) parameters by name pattern",
                       description="Set requires_grad = False (or True with --unfreeze) on parameters matching the patterns: "
                                   "a glob ('layer4.*', '*') or a module name ('layer1', 'fc').")
    p.add_argument("patterns", nargs="+", metavar="PATTERN")
    p.add_argument("--unfreeze", action="store_true", help="set requires_grad = True instead")
    p.set_defaults(run=cmd_freeze)

    p = sub.add_parser("replace-head", help="model.fc = nn.Linear(512, N), as in the tutorial's finetuning",
                       description="Replace the classifier with a new, trainable nn.Linear(512, NUM_CLASSES); "
                                   "the optimizer is rebuilt over the new parameters.")
    p.add_argument("num_classes", type=int, metavar="NUM_CLASSES")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed before the new layer is made (default: 0)")
    p.set_defaults(run=cmd_replace_head)

    p = sub.add_parser("graph", help="the autograd graph of a forward: summary, DOT, image",
                       description="Run an eval-mode forward of generated data (BatchNorm statistics untouched; it replaces the "
                                   "pending forward) and show its autograd graph. --pending shows the pending forward's instead.")
    p.add_argument("--dot", metavar="FILE", help="write Graphviz DOT to FILE ('-' for stdout)")
    p.add_argument("--image", metavar="FILE", help="draw it with Graphviz's dot into FILE (.png, .svg, .pdf)")
    p.add_argument("--pending", action="store_true", help="use the session's pending forward instead of a new one")
    p.add_argument("--batch", type=int, default=1, help="images in the forward (default: 1)")
    p.add_argument("--size", type=int, default=64, help="height and width of the images (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated images (default: 0)")
    p.set_defaults(run=cmd_graph)
    _add_new_commands(sub)
    for command in sub.choices.values():  # --json after the command works too
        command.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON instead of tables")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns the exit status (0 ok, 1 failed, 2 bad command line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        def pem(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        with TrainerClient(
            args.target, timeout=args.timeout, token=args.token, tls=args.tls,
            ca_cert=pem(args.ca_cert), client_cert=pem(args.client_cert), client_key=pem(args.client_key),
        ) as client:
            status: int = args.run(client, client.session(args.session), args)
            return status
    except TrainerError as exc:
        message = str(exc)
    except (OSError, ValueError, RuntimeError) as exc:
        message = str(exc) or type(exc).__name__
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
