"""``trainer-client``: the training server from a shell.

Sessions, training steps and runs, gradients, freezing, heads, the optimizer, checkpoints,
predictions, the autograd graph, and a live view of a session's training (``watch``). Needs only the SDK's dependencies (no torch). Every command works on
the server's default session unless ``--session`` names another; output is tables for people, or
JSON with ``--json``. A command first waits for the server at most ``--connect-timeout`` seconds (5),
so a wrong address is told at once; then each call has ``--timeout`` (120), retries included. A failed call prints one line, ``trainer-client: error: ...``, and exits with
status 1 (2 for a bad command line); a reader that stops reading (``| head``) ends it quietly, status 0.

This module holds the command line (the global flags and every command's flags, in the order
``--help`` lists them) and ``main``; the commands live by group in ``sessions``, ``training``,
``inspect``, ``checkpoints`` and ``watch``, what they print in ``output``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from remote_trainer.client.cli.checkpoints import cmd_checkpoint
from remote_trainer.client.cli.inspect import cmd_grads, cmd_graph, cmd_predict
from remote_trainer.client.cli.output import PROG, ProgressBar, print_error
from remote_trainer.client.cli.sessions import cmd_freeze, cmd_health, cmd_info, cmd_optimizer, cmd_replace_head, cmd_reset, cmd_sessions
from remote_trainer.client.cli.training import cmd_step, cmd_train, cmd_zero_grad
from remote_trainer.client.cli.watch import cmd_watch
from remote_trainer.client.client import TrainerClient
from remote_trainer.client.errors import TrainerError
from remote_trainer.contract.names import AUTOCAST_MODES, INPUT_TRANSFORMS, MEMORY_FORMATS

__all__ = ["DEFAULT_TARGET", "PROG", "ProgressBar", "build_parser", "main"]

DEFAULT_TARGET = "localhost:50051"
# Seconds a command waits for the server to answer at all before it says there is none (--connect-timeout).
CONNECT_TIMEOUT = 5.0

_LOSSES = ("sum", "cross_entropy", "mse")


def _add_loop_flags(p: argparse.ArgumentParser) -> None:
    """The flags that ``step`` and ``train`` share, after their own."""
    p.add_argument("--seed", type=int, default=0, help="seed of the generated data (default: 0)")
    p.add_argument("--uint8", action="store_true",
                   help="generate uint8 images (0-255, a quarter of float32's bytes) instead of float32 in [0, 1): for a "
                        "session made with an input transform (sessions create --input-transform)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="draw a progress bar on stderr (default: when stderr is a terminal)")


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
               f"  {PROG} reset\n  {PROG} watch",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", default=os.environ.get("TRAINER_TARGET", DEFAULT_TARGET),
                        help=f"server address (default: $TRAINER_TARGET or {DEFAULT_TARGET})")
    parser.add_argument("--session", default="", metavar="ID", help="session id (default: the server's default session)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS", help="deadline of each call (default: 120)")
    parser.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT, metavar="SECONDS",
                        help="how long to wait for the server before the command (its health check): none answering by "
                             f"then is UNAVAILABLE, no server at TARGET (default: {CONNECT_TIMEOUT:g}); once it answered, a "
                             "dropped connection is waited for and the call retried within --timeout")
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
    p.add_argument("--loss", choices=_LOSSES, default="sum",
                   help="sum: the tutorial's (prediction - labels).sum(); cross_entropy: class-index labels; mse (default: sum)")
    p.add_argument("--batch", type=int, default=2, help="images per step (default: 2)")
    p.add_argument("--size", type=int, default=64, help="height and width of generated images (default: 64)")
    p.add_argument("--data", metavar="X.npy",
                   help="input images (N, 3, H, W), float32 or uint8 (for a session with an input transform); batches cycle "
                        "through them")
    p.add_argument("--labels", metavar="Y.npy", help="labels: int class indices (N,) for cross_entropy, float (N, classes) otherwise")
    _add_loop_flags(p)
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
    p.add_argument("--input-transform", choices=INPUT_TRANSFORMS,
                   help="for create: let the session take uint8 images and turn them into the model's input on the server: "
                        "imagenet is ToTensor() then Normalize(ImageNet's mean and std), scale is ToTensor() alone "
                        "(default: none, uint8 images refused)")
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

    p = sub.add_parser("checkpoint", help="save, load, list or delete checkpoints in the server's --checkpoint-dir",
                       description="Save the session (weights, buffers, head, frozen set, optimizer and its state, steps) to a "
                                   "checkpoint, load one into it, list those this token may load, or delete one "
                                   "(freeing its bytes of the server's --max-checkpoint-bytes quota).")
    p.add_argument("action", choices=("save", "load", "list", "delete"))
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
                                   "generated data or an .npz file holding 'x' (images, N x 3 x H x W: float32, or uint8 for a session made "
                                   "with an input transform) and 'y' (labels: "
                                   "int class indices for cross_entropy, float (N, classes) otherwise); batches cycle through it.")
    p.add_argument("-n", "--steps", type=int, default=10, help="number of steps (default: 10)")
    p.add_argument("--data", metavar="D.npz", help="training data: arrays 'x' and 'y'")
    p.add_argument("--loss", choices=_LOSSES, default="cross_entropy", help="(default: cross_entropy)")
    p.add_argument("--batch", type=int, default=8, help="images per step (default: 8)")
    p.add_argument("--size", type=int, default=64, help="height and width of generated images (default: 64)")
    _add_loop_flags(p)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("watch", help="a live view of a session's training, pushed by the server as it happens",
                       description="Show a session's events as they happen (WatchSession): each optimizer step with its loss, "
                                   "gradient norm, learning rate and samples/s, freezes, head changes, checkpoints, and its end, "
                                   "after its latest events. On a terminal a live view (the latest step and a sparkline of the loss "
                                   "redrawn in place); otherwise a line an event; --json: one JSON object an event. Ends when the "
                                   "session ends, the server stops, --duration passes, or Ctrl-C.")
    p.add_argument("watched", nargs="?", metavar="SESSION", help="session id (default: --session, else the default session)")
    p.add_argument("--recent", type=int, metavar="N", help="latest events to show first, 0..16 (default: 16)")
    p.add_argument("--duration", type=float, metavar="SECONDS", help="stop watching after this long (default: until the session ends)")
    p.set_defaults(run=cmd_watch)

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
            # A wrong address is told within the connect budget, not after --timeout: the health check
            # waits for the connection that long (UNAVAILABLE SERVER_UNREACHABLE when none came).
            client.health(timeout=args.connect_timeout)
            status: int = args.run(client, client.session(args.session), args)
        sys.stdout.flush()  # here, not at exit, so that a reader who left (| head) is met below
        return status
    except TrainerError as exc:
        message = str(exc)
        if exc.code is grpc.StatusCode.UNAUTHENTICATED:
            message += (" (the token given by --token or $TRAINER_TOKEN was refused: is it one the server was started with?)"
                        if args.token else " (this server wants a token: pass --token TOKEN, or set TRAINER_TOKEN)")
    except BrokenPipeError:
        return reader_gone()
    except (OSError, ValueError, RuntimeError) as exc:
        message = str(exc) or type(exc).__name__
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print_error(message)
    return 1


def reader_gone() -> int:
    """What a command does when whoever read its output stopped (``trainer-client info | head -3``):
    it stops too, quietly, with status 0, as ``head`` asked for no more. What is left in stdout's
    buffer is dropped: Python's flush at exit would raise BrokenPipeError again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 0
