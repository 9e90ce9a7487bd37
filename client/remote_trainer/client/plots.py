"""Gradient flow: a bar chart of each parameter's gradient norm and largest |grad|.

What people look at to spot vanishing or exploding gradients: one pair of bars per parameter, in
model order (input side on the left), on a log scale. Parameters without a gradient (frozen, or no
backward yet) get no bars and a grey label. Built from the statistics the server sends with
``GetGradients(stats_only=True)``, so no tensor travels.

Needs matplotlib, the SDK's optional ``plot`` extra (``pip install './client[plot]'``);
``import remote_trainer.client.plots`` works without it, ``plot_gradient_flow`` says what to install.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remote_trainer.client.types import NamedTensor

NORM_COLOR = "#1f77b4"
MAX_COLOR = "#ff7f0e"


class MatplotlibNotFoundError(RuntimeError):
    """matplotlib is not installed: ``pip install matplotlib``."""


@dataclass(frozen=True)
class GradientFlow:
    """What the picture shows: per parameter, in model order, its gradient's norm and max |grad|
    (None for a parameter without a gradient)."""

    names: list[str]
    norms: list[float | None]
    max_abs: list[float | None]


def gradient_flow(grads: dict[str, NamedTensor]) -> GradientFlow:
    """Norms and max |grad| from ``Session.gradients(...)`` (statistics are enough)."""
    names: list[str] = []
    norms: list[float | None] = []
    max_abs: list[float | None] = []
    for name, g in grads.items():
        names.append(name)
        if g.present and g.stats is not None:
            norms.append(g.stats.norm)
            max_abs.append(max(abs(g.stats.min), abs(g.stats.max)))
        else:
            norms.append(None)
            max_abs.append(None)
    return GradientFlow(names, norms, max_abs)


def plot_gradient_flow(source: Any, path: str | Path, *patterns: str, title: str = "gradient flow") -> GradientFlow:
    """Writes the gradient-flow bar chart of ``source`` to ``path`` (.png, .svg, .pdf) and returns its numbers.

    ``source`` is a ``Session`` (its gradients are fetched, statistics only; ``patterns`` as in
    ``Session.gradients``) or the dict that ``Session.gradients`` returned.
    """
    try:
        from matplotlib.figure import Figure  # drawn without pyplot: the caller's backend (a notebook's) is left alone
    except ImportError as exc:
        raise MatplotlibNotFoundError(
            "the gradient-flow picture needs matplotlib: pip install matplotlib (the SDK's plot extra)"
        ) from exc
    grads = source if isinstance(source, dict) else source.gradients(*patterns, stats_only=True)
    flow = gradient_flow(grads)
    n = len(flow.names)
    positions = list(range(n))
    figure = Figure(figsize=(max(8.0, 0.22 * n + 2), 5.5), layout="constrained")
    axes = figure.add_subplot()
    tiny = 1e-30  # a zero gradient still shows on the log scale, as a sliver
    axes.bar([p - 0.2 for p in positions], [max(v or 0.0, tiny) if v is not None else 0.0 for v in flow.norms],
             width=0.4, color=NORM_COLOR, label="gradient norm")
    axes.bar([p + 0.2 for p in positions], [max(v or 0.0, tiny) if v is not None else 0.0 for v in flow.max_abs],
             width=0.4, color=MAX_COLOR, label="max |grad|")
    present = [v for v in flow.norms + flow.max_abs if v]
    if present:
        axes.set_yscale("log")
        axes.set_ylim(min(present) / 2, max(present) * 2)
    axes.set_xticks(positions, flow.names, rotation=90, fontsize=7)
    for label, norm in zip(axes.get_xticklabels(), flow.norms):
        if norm is None:
            label.set_color("#999999")
    axes.set_xlim(-0.6, n - 0.4)
    axes.set_ylabel("gradient (log scale)")
    with_grad = sum(1 for v in flow.norms if v is not None)
    axes.set_title(f"{title}: {with_grad} of {n} parameters have a gradient (grey: none)")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(loc="upper right")
    figure.savefig(path, dpi=100)  # a Figure of its own, no pyplot: nothing to close, no backend switched
    return flow
