"""``trainer-client``: the training server from a shell.

Sessions, training steps and runs, gradients, freezing, heads, the optimizer, checkpoints,
predictions, the autograd graph. Needs only the SDK's dependencies (no torch). Every command works on
the server's default session unless ``--session`` names another; output is tables for people, or
JSON with ``--json``. A failed call prints one line, ``trainer-client: error: ...``, and exits with
status 1 (2 for a bad command line).

This module holds the command line (the global flags, each command's parser in the order ``--help``
lists them) and ``main``; the commands live by group in ``sessions``, ``training``, ``inspect`` and
``checkpoints``, what they print in ``output``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from remote_trainer.client.cli import checkpoints, inspect, sessions, training
from remote_trainer.client.cli.output import PROG, ProgressBar, print_error
from remote_trainer.client.client import TrainerClient
from remote_trainer.client.errors import TrainerError

__all__ = ["DEFAULT_TARGET", "PROG", "ProgressBar", "build_parser", "main"]

DEFAULT_TARGET = "localhost:50051"

_COMMANDS = ("health", "info", "step", "grads", "freeze", "replace-head", "graph",
             "sessions", "reset", "optimizer", "zero-grad", "checkpoint", "predict", "train")
"""Every command, in the order ``--help`` lists them."""

_PARSERS = {**sessions.PARSERS, **training.PARSERS, **inspect.PARSERS, **checkpoints.PARSERS}


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
    for name in _COMMANDS:
        _PARSERS[name](sub)
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
    print_error(message)
    return 1
