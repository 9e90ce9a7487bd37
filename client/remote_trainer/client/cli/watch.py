"""Watching a session from the shell: ``watch``, its events as the server pushes them (``Session.watch``).

On a terminal, a live view: a line for each event other than a step, scrolling, under two lines
redrawn in place at every step (the step with its loss, gradient norm, learning rate and
throughput; a sparkline of the losses so far). Otherwise a line an event, or with ``--json`` one
JSON object an event (JSON lines), for scripts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from remote_trainer.client.cli.output import fmt, optimizer_text
from remote_trainer.client.client import Session, TrainerClient
from remote_trainer.client.types import CheckpointEvent, EndEvent, FreezeEvent, HeadEvent, Optimizer, SessionEvent, StepEvent

BARS = "▁▂▃▄▅▆▇█"
ASCII_BARS = "_.-:=+*#"  # where the terminal cannot print the block characters
SPARK_WIDTH = 60  # losses in the sparkline, at most (the latest ones)


def sparkline(values: Sequence[float], bars: str = BARS) -> str:
    """One character per value, its height the value's place between the smallest and the largest."""
    if not values:
        return ""
    low, high = min(values), max(values)
    span = high - low
    top = len(bars) - 1
    return "".join(bars[round((v - low) / span * top) if span > 0 else top // 2] for v in values)


def step_text(step: StepEvent) -> str:
    """A step in one line: ``step 42  loss 1.23456  grad_norm 3.2  lr 0.01  812 samples/s  0.039 s``."""
    parts = [f"step {step.step_count}"]
    if step.loss is not None:
        parts.append(f"loss {fmt(step.loss)}")
    if step.grad_norm is not None:
        parts.append(f"grad_norm {step.grad_norm:.4g}")
    parts.append(f"lr {step.learning_rate:g}")
    if step.seconds > 0:
        parts.append(f"{step.samples_per_second:.1f} samples/s  {step.seconds:.3f} s")
    return "  ".join(parts)


def event_text(event: SessionEvent) -> str:
    """Any event in one line (a step as ``step_text``); ``(recent)`` for one sent when the watch began."""
    detail = event.detail
    if isinstance(detail, StepEvent):
        text = step_text(detail)
    elif isinstance(detail, FreezeEvent):
        verb = "unfreeze" if detail.unfreeze else "freeze"
        text = (f"{verb} {' '.join(detail.patterns)}: {detail.changed_count} changed, {detail.trainable_count} trainable, "
                f"{detail.frozen_count} frozen")
    elif isinstance(detail, HeadEvent):
        text = f"new head: {detail.num_classes} classes"
    elif isinstance(detail, Optimizer):
        text = "new optimizer: " + optimizer_text(detail)
    elif isinstance(detail, CheckpointEvent):
        if event.kind == "checkpoint_saved":
            text = (f"checkpoint {'written (automatic)' if detail.automatic else 'written'}: {detail.name} at step "
                    f"{detail.step_count} ({detail.size_bytes} bytes)")
        else:
            text = f"checkpoint loaded: {detail.name}, at step {detail.step_count}"
    elif isinstance(detail, EndEvent):
        text = "end: " + detail.reason.replace("_", " ")
    else:
        text = event.kind.replace("_", " ")
    return text + ("  (recent)" if event.recent else "")


def missed_text(event: SessionEvent) -> str:
    return f"... {event.missed} events missed (read too slowly)"


def event_json(event: SessionEvent) -> dict[str, Any]:
    data = dataclasses.asdict(event)
    detail = data.pop("detail")
    data[event.kind] = detail if detail is not None else {}
    return data


class LiveView:
    """A session's watch drawn on a terminal: the events other than steps as lines that scroll,
    under two lines redrawn in place at every step: the latest step, and a sparkline of the losses."""

    def __init__(self, stream: TextIO, session_id: str) -> None:
        self.stream = stream
        self.session = session_id or "default"
        self.losses: deque[float] = deque(maxlen=SPARK_WIDTH)
        self.latest: StepEvent | None = None
        self.drawn = 0  # lines of the part redrawn in place now on the screen
        encoding = getattr(stream, "encoding", None) or "ascii"
        try:
            BARS.encode(encoding)
            self.bars = BARS
        except (UnicodeEncodeError, LookupError):
            self.bars = ASCII_BARS
        self.draw([f"watching session {self.session} (Ctrl-C stops)"])

    def show(self, event: SessionEvent) -> None:
        lines = [missed_text(event)] if event.missed else []
        if isinstance(event.detail, StepEvent):
            self.latest = event.detail
            if event.detail.loss is not None:
                self.losses.append(event.detail.loss)
            if event.recent:
                lines.append(event_text(event))
        else:
            lines.append(event_text(event))
        self.draw(lines)

    def draw(self, lines: Iterable[str]) -> None:
        """Prints ``lines`` above the part redrawn in place, then redraws it."""
        width = max(20, shutil.get_terminal_size((100, 24)).columns - 1)  # never wrap: the line count must hold
        out = [f"\x1b[{self.drawn}F\x1b[J"] if self.drawn else []
        out += [line[:width] + "\n" for line in lines]
        footer = self.footer()
        out += [line[:width] + "\n" for line in footer]
        self.drawn = len(footer)
        self.stream.write("".join(out))
        self.stream.flush()

    def footer(self) -> list[str]:
        if self.latest is None:
            return ["waiting for the first step..."]
        losses = list(self.losses)
        spark = sparkline(losses, self.bars)
        trend = f"  {fmt(losses[0])} -> {fmt(losses[-1])} (min {fmt(min(losses))}, last {len(losses)})" if losses else ""
        return [step_text(self.latest), f"loss {spark}{trend}"]


def cmd_watch(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    if args.recent is not None and not 0 <= args.recent <= 16:
        raise ValueError("--recent must be within 0..16")
    if args.duration is not None and args.duration <= 0:
        raise ValueError("--duration must be positive")
    if args.watched:
        session = client.session(args.watched)
    live = LiveView(sys.stdout, session.session_id) if not args.json and sys.stdout.isatty() else None
    started = time.monotonic()
    for event in session.watch(recent=args.recent, timeout=args.duration):
        if args.json:
            print(json.dumps(event_json(event)), flush=True)
        elif live is not None:
            live.show(event)
        else:
            if event.missed:
                print(missed_text(event))
            print(event_text(event), flush=True)
    if live is not None:
        print(f"watched for {time.monotonic() - started:.1f} s")
    return 0
