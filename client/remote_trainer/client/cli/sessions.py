"""The server and its sessions: health, info, sessions (list, create, close), reset, and how a
session trains: its optimizer, frozen parameters and head (optimizer, freeze, replace-head)."""

from __future__ import annotations

import argparse
import dataclasses

from remote_trainer.client.cli.output import PROG, info_json, optimizer_text, optimizer_values, print_json, shape_text, table
from remote_trainer.client.client import Session, TrainerClient
from remote_trainer.client.types import Optimizer
from remote_trainer.contract.names import AUTOCAST_MODES, MEMORY_FORMATS


def cmd_health(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    status = client.health(args.service)
    if args.json:
        print_json({"status": status})
    else:
        print(status)
    return 0 if status == "SERVING" else 1


def cmd_info(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    info = session.info()
    params = session.list_parameters()
    if args.json:
        data = info_json(info)
        data["parameter_counts"] = {
            "tensors": len(params.parameters), "elements": params.total_elements, "trainable_tensors": params.trainable_count,
            "trainable_elements": params.trainable_elements, "frozen_tensors": params.frozen_count,
        }
        if args.parameters:
            data["parameters"] = [
                {"name": p.name, "shape": list(p.shape), "requires_grad": p.requires_grad, "has_grad": p.has_grad}
                for p in params.parameters
            ]
        print_json(data)
        return 0
    rows = [
        ("server", client.target),
        ("session", f"{info.session_id}{' (default)' if info.is_default else ''}"),
        ("model", info.model),
        ("weights", info.weights),
        ("device", info.device),
        ("fast paths", f"autocast {info.autocast}, {info.memory_format}"),
        ("classes", str(info.num_classes)),
        ("optimizer", optimizer_text(info.optimizer)),
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
            print(f"{p.name:<{width}}  {shape_text(p.shape):<14} {'yes' if p.requires_grad else 'frozen':<10} {'yes' if p.has_grad else '-'}")
    return 0


def cmd_sessions(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    action = args.action or "list"
    if action == "list":
        infos = client.list_sessions()
        if args.json:
            print_json([info_json(i) for i in infos])
            return 0
        table(
            ("id", "weights", "classes", "steps", "trainable", "frozen", "optimizer"),
            [(i.session_id, i.weights, i.num_classes, i.step_count,
              i.trainable_parameters, i.frozen_parameters, optimizer_text(i.optimizer)) for i in infos],
            right=(2, 3, 4, 5),
        )
        return 0
    if action == "create":
        created = client.create_session(args.weights, num_classes=args.num_classes, seed=args.seed,
                                        autocast=args.autocast, memory_format=args.memory_format)
        info = created.info()
        if args.json:
            print_json(info_json(info))
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
        print_json({"closed": args.ids})
    return 0


def cmd_reset(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    info = session.reset()
    if args.json:
        print_json(info_json(info))
    else:
        print(f"session {info.session_id} reset to how the server started it: {info.model}, weights {info.weights}, "
              f"{info.num_classes} classes, step {info.step_count}, {info.trainable_parameters} trainable parameters, "
              f"{optimizer_text(info.optimizer)}")
    return 0


_OPTIMIZER_FLAGS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "beta1", "beta2", "eps", "amsgrad")


def cmd_optimizer(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    current = session.info().optimizer
    if args.action == "set":
        given = {k: getattr(args, k) for k in _OPTIMIZER_FLAGS if getattr(args, k) is not None}
        kind = args.kind or current.kind
        # The same kind keeps the values not given; another kind starts from torch's defaults.
        base = optimizer_values(current) if kind == current.kind else {}
        base.update(given, kind=kind)
        current = session.configure_optimizer(Optimizer(**base))
    data = {"kind": current.kind, **optimizer_values(current)}
    if args.json:
        print_json(data)
    else:
        if args.action == "set":
            print("optimizer replaced (its state, such as momentum buffers, starts anew):")
        for key, value in data.items():
            print(f"{key + ':':<14}{value}")
    return 0


def cmd_freeze(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    result = session.unfreeze(*args.patterns) if args.unfreeze else session.freeze(*args.patterns)
    if args.json:
        print_json(dataclasses.asdict(result))
        return 0
    verb = "unfroze" if args.unfreeze else "froze"
    print(f"{verb} {len(result.changed)} parameters; {len(result.trainable)} trainable, {result.frozen_count} frozen")
    if len(result.trainable) <= 10:
        print("trainable: " + (", ".join(result.trainable) or "none"))
    return 0


def cmd_replace_head(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    info = session.replace_head(args.num_classes, seed=args.seed)
    if args.json:
        print_json(info_json(info))
        return 0
    print(f"fc = Linear(512, {info.num_classes}) (seed {args.seed}); {info.trainable_parameters} trainable, "
          f"{info.frozen_parameters} frozen parameters; optimizer rebuilt")
    return 0


# -- their command lines -------------------------------------------------------------------------


def _add_health(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("health", help="the server's health status (exit 0 when SERVING)",
                       description="Print the server's gRPC health status; exit 0 when it is SERVING, 1 otherwise.")
    p.add_argument("--service", default="", help="a service name to check (default: the whole server)")
    p.set_defaults(run=cmd_health)


def _add_info(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("info", help="model, weights, device, optimizer and parameter counts",
                       description="Describe the session: model, weights, device, classes, optimizer, steps, parameters.")
    p.add_argument("--parameters", action="store_true", help="also list every parameter with shape and flags")
    p.set_defaults(run=cmd_info)


def _add_sessions(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


def _add_reset(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("reset", help="put the default session back as the server started it",
                       description="Restore the default session's weights, BatchNorm buffers, head, optimizer (and its state), "
                                   "step count and frozen set as the server started it; gradients and the pending forward go.")
    p.set_defaults(run=cmd_reset)


def _add_optimizer(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


def _add_freeze(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("freeze", help="freeze (or --unfreeze) parameters by name pattern",
                       description="Set requires_grad = False (or True with --unfreeze) on parameters matching the patterns: "
                                   "a glob ('layer4.*', '*') or a module name ('layer1', 'fc').")
    p.add_argument("patterns", nargs="+", metavar="PATTERN")
    p.add_argument("--unfreeze", action="store_true", help="set requires_grad = True instead")
    p.set_defaults(run=cmd_freeze)


def _add_replace_head(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("replace-head", help="model.fc = nn.Linear(512, N), as in the tutorial's finetuning",
                       description="Replace the classifier with a new, trainable nn.Linear(512, NUM_CLASSES); "
                                   "the optimizer is rebuilt over the new parameters.")
    p.add_argument("num_classes", type=int, metavar="NUM_CLASSES")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed before the new layer is made (default: 0)")
    p.set_defaults(run=cmd_replace_head)


PARSERS = {
    "health": _add_health, "info": _add_info, "sessions": _add_sessions, "reset": _add_reset,
    "optimizer": _add_optimizer, "freeze": _add_freeze, "replace-head": _add_replace_head,
}
"""Each command of this module and the function that adds its parser."""
