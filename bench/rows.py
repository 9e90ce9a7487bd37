"""A row of the benchmark's table: numbers with units, and how people read them.

A section measures and returns ``Row`` objects; the harness prints them as a Markdown table and
writes them as JSON (``--json``). A row's figures are floats with a unit (seconds, bytes a second,
MiB...), named; its ``ratio`` is the one figure the table compares against the reference (which
way round is said by each section). The table's text cells are templates over those figures
(``"{ours} = {ours_rate}"``): a figure formats itself by its unit, or by a format spec given in the
template (``"{rpc_vs_local:.3f}"``). So the JSON carries the numbers and a reader of it never parses
the text.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Units and how a figure in each reads when the template gives no format spec.
SECONDS, MILLISECONDS, BYTES_PER_S, BYTES, MIB, STEPS_PER_S, COUNT, RELATIVE, RATIO = (
    "s", "ms", "B/s", "B", "MiB", "steps/s", "count", "relative", "ratio")


def fmt_s(seconds: float) -> str:
    """``1.23 s``, ``87.0 ms``, ``0.98 ms``, or ``-`` when unmeasured."""
    if math.isnan(seconds):
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1000:.1f} ms" if seconds >= 0.01 else f"{seconds * 1000:.2f} ms"


_DEFAULT_FORMAT: dict[str, Callable[[float], str]] = {
    SECONDS: fmt_s,
    MILLISECONDS: lambda v: f"{v:.0f} ms",
    BYTES_PER_S: lambda v: f"{v / 1e6:.0f} MB/s",
    BYTES: lambda v: f"{v / 1e6:.1f} MB",
    MIB: lambda v: f"{v:.0f} MiB",
    STEPS_PER_S: lambda v: f"{v:.1f} steps/s",
    COUNT: lambda v: f"{v:.0f}",
    RELATIVE: lambda v: f"{v:.1e}",
    RATIO: lambda v: f"{v:.2f}",
}


@dataclass(frozen=True)
class Figure:
    """One measured number and its unit (one of the constants above)."""

    value: float
    unit: str

    def __format__(self, spec: str) -> str:
        return format(self.value, spec) if spec else _DEFAULT_FORMAT[self.unit](self.value)


def seconds(value: float) -> Figure:
    return Figure(value, SECONDS)


def rate(nbytes: int, duration: float) -> Figure:
    """Bytes a second that moving ``nbytes`` in ``duration`` seconds makes."""
    return Figure(nbytes / duration, BYTES_PER_S)


def count(value: float) -> Figure:
    return Figure(float(value), COUNT)


def ratio(value: float) -> Figure:
    return Figure(value, RATIO)


@dataclass(frozen=True)
class Layout:
    """The text cells of a row, as ``str.format`` templates over its figures, ``words`` and
    ``ratio`` (the ratio column may show another figure, or none: ``"-"`` when ``ratio`` is None)."""

    ours: str
    reference: str
    note: str = ""
    ratio: str = "{ratio:.2f}"


@dataclass(frozen=True)
class Row:
    """One line of the table: ``ratio`` compares ``ours`` with the reference (``None``: no ratio);
    ``target`` is the ratio the issue asked for, for people; ``words`` are the few facts that are
    not numbers (the first error a client saw)."""

    section: str
    case: str
    figures: dict[str, Figure]
    ratio: float | None
    layout: Layout
    target: str = ""
    words: dict[str, str] = field(default_factory=dict)

    def cells(self) -> dict[str, str]:
        """The text of each column of the table."""
        names: dict[str, Any] = {**self.figures, **self.words}
        if self.ratio is not None:
            names["ratio"] = Figure(self.ratio, RATIO)
        # A ratio column that shows the ratio shows "-" when there is none.
        absent = self.ratio is None and "{ratio" in self.layout.ratio
        ratio_text = "-" if absent else self.layout.ratio.format_map(names)
        return {"section": self.section, "case": self.case, "ours": self.layout.ours.format_map(names),
                "reference": self.layout.reference.format_map(names), "ratio": ratio_text,
                "target": self.target, "note": self.layout.note.format_map(names)}

    def as_json(self) -> dict[str, Any]:
        """The row for ``--json``: the numbers (not-a-number as null), and the cells as printed."""
        return {
            "section": self.section, "case": self.case, "ratio": _finite(self.ratio), "target": self.target,
            "figures": {name: {"value": _finite(f.value), "unit": f.unit} for name, f in self.figures.items()},
            "words": dict(self.words), "text": {c: t for c, t in self.cells().items() if c in ("ours", "reference", "ratio", "note")},
        }


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)
