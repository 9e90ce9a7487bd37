"""``trainer-client``: the training server from a shell (health, info, step, grads, freeze, graph).

Needs only the SDK's dependencies (no torch). Every command works on the server's default session
unless ``--session`` names another. A failed call prints one line, ``trainer-client: error: ...``,
and exits with status 1 (2 for a bad command line).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt

from remote_trainer.client import graphviz
from remote_trainer.client.client import Session, TrainerClient
from remote_trainer.client.errors import TrainerError

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
    print(status)
    return 0 if status == "SERVING" else 1


def cmd_info(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    info = session.info()
    params = session.list_parameters()
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
    try:
        for i in range(args.steps):
            x, y = batch(i)
            started = time.monotonic()
            session.zero_grad()
            session.forward(x, stats_only=True)
            result = session.backward(args.loss, y)
            count = session.step()
            loss = result.loss if result.loss is not None else float("nan")
            line = f"step {i + 1:>{width}}/{args.steps}  loss {loss:.6f}  grad_norm {result.grad_norm:.4g}  ({time.monotonic() - started:.2f} s, step_count {count})"
            if bar is not None:
                bar.stream.write("\r\033[K")
            print(line, flush=True)
            if bar is not None:
                bar.update(i + 1, f"loss {loss:.4f}")
    finally:
        if bar is not None:
            bar.close()
    return 0


def cmd_grads(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    grads = session.gradients(*args.patterns, stats_only=args.save is None)
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
        arrays = {name: g.array for name, g in grads.items() if g.array is not None}
        np.savez(args.save, **arrays)  # type: ignore[arg-type]
        print(f"saved {len(arrays)} gradients to {args.save}")
    return 0


def cmd_freeze(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    result = session.unfreeze(*args.patterns) if args.unfreeze else session.freeze(*args.patterns)
    verb = "unfroze" if args.unfreeze else "froze"
    print(f"{verb} {len(result.changed)} parameters; {len(result.trainable)} trainable, {result.frozen_count} frozen")
    if len(result.trainable) <= 10:
        print("trainable: " + (", ".join(result.trainable) or "none"))
    return 0


def cmd_replace_head(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    info = session.replace_head(args.num_classes, seed=args.seed)
    print(f"fc = Linear(512, {info.num_classes}) (seed {args.seed}); {info.trainable_parameters} trainable, "
          f"{info.frozen_parameters} frozen parameters; optimizer rebuilt")
    return 0


def cmd_graph(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    if not args.pending:
        x = np.random.default_rng(args.seed).random((args.batch, 3, args.size, args.size), dtype=np.float32)
        session.forward(x, eval_mode=True, stats_only=True)
    graph = session.graph()
    dot = graphviz.to_dot(graph)
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


# -- the parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Drive a remote-trainer server (a resnet18 trained one step at a time) from the shell.",
        epilog=f"examples:\n  {PROG} health\n  {PROG} info --parameters\n  {PROG} step -n 10 --loss cross_entropy\n"
               f"  {PROG} grads fc --save grads.npz\n  {PROG} freeze '*' && {PROG} freeze --unfreeze fc\n"
               f"  {PROG} replace-head 10\n  {PROG} graph --dot graph.dot --image graph.png",
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
