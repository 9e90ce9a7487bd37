"""The server and its sessions: health, info, sessions (list, create, close), reset, and how a
session trains: its optimizer, frozen parameters and head (optimizer, freeze, replace-head)."""

from __future__ import annotations

import argparse
import dataclasses

from remote_trainer.client.cli.output import (PROG, info_json, optimizer_text, optimizer_values, print_json, shape_text, table,
                                              transform_text)
from remote_trainer.client.client import Session, TrainerClient
from remote_trainer.client.types import Optimizer


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
        ("input transform", transform_text(info.input_transform)),
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
                                        autocast=args.autocast, memory_format=args.memory_format,
                                        input_transform=args.input_transform)
        info = created.info()
        if args.json:
            print_json(info_json(info))
        else:
            print(f"created session {info.session_id}: {info.model}, weights {info.weights}, {info.num_classes} classes, "
                  f"autocast {info.autocast}, {info.memory_format}, input transform {transform_text(info.input_transform)}")
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
