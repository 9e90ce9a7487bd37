"""What the commands print: tables for people, JSON for scripts (``--json``), a progress bar on
stderr, and the one line a failed command ends with."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from remote_trainer.client.types import InputTransform, Optimizer, SessionInfo

PROG = "trainer-client"


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


def one_line(text: str) -> str:
    return " ".join(text.split())


def print_error(message: str) -> None:
    """The one line of a failed command, on stderr: ``trainer-client: error: ...``."""
    print(f"{PROG}: error: {one_line(message)}", file=sys.stderr)


def fmt(value: float) -> str:
    return f"{value:.6g}"


def shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> None:
    """Prints rows under headers, each column as wide as its widest cell; ``right`` columns right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for row in cells:
        line = "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        print(line.rstrip())


def optimizer_values(opt: Optimizer) -> dict[str, Any]:
    """The values that the optimizer's kind uses, in torch's order."""
    keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov") if opt.kind == "sgd" else \
        ("lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad")
    return {k: getattr(opt, k) for k in keys}


def optimizer_text(opt: Optimizer) -> str:
    return f"{opt.kind}(" + ", ".join(f"{k}={v}" for k, v in optimizer_values(opt).items()) + ")"


def transform_text(transform: InputTransform | None) -> str:
    """What a session does to uint8 images, in a few words."""
    if transform is None:
        return "none (uint8 images refused)"
    if not transform.mean:
        return "uint8 images / 255 (scale)"
    name = " (imagenet)" if transform == InputTransform.imagenet() else ""
    return f"uint8 images / 255, normalised with mean {list(transform.mean)} std {list(transform.std)}{name}"


def info_json(info: SessionInfo) -> dict[str, Any]:
    data = dataclasses.asdict(info)
    data["optimizer"] = {"kind": info.optimizer.kind, **optimizer_values(info.optimizer)}
    return data
