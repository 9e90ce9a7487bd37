"""Checkpoints in the server's --checkpoint-dir: ``checkpoint save``, ``load``, ``list`` and ``delete``."""

from __future__ import annotations

import argparse
import dataclasses
import time

from remote_trainer.client.cli.output import info_json, optimizer_text, print_json, table
from remote_trainer.client.client import Session, TrainerClient


def cmd_checkpoint(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    if args.action == "list":
        files = client.list_checkpoints()
        if args.json:
            print_json([dataclasses.asdict(f) for f in files])
        elif not files:
            print("no checkpoints (or the server has no --checkpoint-dir)")
        else:
            table(("name", "bytes", "written (UTC)"),
                  [(f.name, f"{f.size_bytes:,}", time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(f.modified_unix_seconds)))
                   for f in files], right=(1,))
        return 0
    if not args.name:
        raise ValueError(f"checkpoint {args.action}: give the checkpoint's NAME")
    if args.action == "save":
        steps = session.save_checkpoint(args.name)
        if args.json:
            print_json({"name": args.name, "step_count": steps})
        else:
            print(f"saved checkpoint {args.name} at step {steps}")
        return 0
    if args.action == "delete":
        freed = client.delete_checkpoint(args.name)
        if args.json:
            print_json({"name": args.name, "size_bytes": freed})
        else:
            print(f"deleted checkpoint {args.name} ({freed:,} bytes)")
        return 0
    info = session.load_checkpoint(args.name)
    if args.json:
        print_json(info_json(info))
    else:
        print(f"loaded checkpoint {args.name}: step {info.step_count}, {info.num_classes} classes, "
              f"{info.trainable_parameters} trainable, {info.frozen_parameters} frozen, {optimizer_text(info.optimizer)}")
    return 0
