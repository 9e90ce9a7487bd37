"""The autograd graph of a forward (``Session.graph()``) as Graphviz DOT, and as an image.

Drawn like the tutorial's picture of the DAG: arrows point the way the forward pass ran, from the
leaf parameters (blue) through the backward functions to the logits (green). Frozen parameters are
not in the graph at all (the tutorial's "exclusion from the DAG"); a grey note lists them.

``to_dot`` needs nothing but the standard library; ``render`` runs Graphviz's ``dot`` program,
where it is installed (``apt-get install graphviz``, ``brew install graphviz``).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from remote_trainer.client.types import Graph

# Output formats `render` picks from the file name's suffix.
FORMATS = ("png", "svg", "pdf", "jpg", "gif")


class GraphvizNotFoundError(RuntimeError):
    """Graphviz's ``dot`` program is not installed (or not on PATH)."""


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(graph: Graph, *, name: str = "autograd", max_excluded: int = 8, rankdir: str = "TB") -> str:
    """The graph as Graphviz DOT text.

    Backward functions are boxes, leaf parameters (AccumulateGrad nodes) light blue, the logits
    green. ``max_excluded`` caps how many frozen parameter names the grey note lists (0: no note).
    ``rankdir`` "TB" puts the leaves on top, "LR" on the left.
    """
    lines = [
        f"digraph {_quote(name)} {{",
        f"  graph [rankdir={rankdir}, fontname=Helvetica, fontsize=12, nodesep=0.25, ranksep=0.3,"
        f" label={_quote(f'autograd graph of forward {graph.forward_id}: {len(graph.nodes)} nodes, {len(graph.leaf_parameters)} leaf parameters')}, labelloc=t];",
        "  node [shape=box, style=\"rounded,filled\", fillcolor=\"#f5f5f5\", color=\"#888888\", fontname=Helvetica, fontsize=10, height=0.3];",
        "  edge [color=\"#555555\", arrowsize=0.6];",
    ]
    for node in graph.nodes:
        if node.parameter:
            attrs = f"label={_quote(node.parameter)}, fillcolor=\"#a8d4ff\", color=\"#3b7fc4\", tooltip={_quote(node.function)}"
        else:
            attrs = f"label={_quote(node.function)}"
        lines.append(f"  n{node.id} [{attrs}];")
    lines.append('  logits [label="logits", shape=ellipse, fillcolor="#b8e6b8", color="#3c9a3c"];')
    lines.append(f"  n{graph.root_id} -> logits;")
    # Edges run from the output towards the leaves (the way backward walks); draw them the way
    # the forward pass ran, as the tutorial's picture does.
    for src, dst in graph.edges:
        lines.append(f"  n{dst} -> n{src};")
    if graph.excluded_parameters and max_excluded > 0:
        shown = graph.excluded_parameters[:max_excluded]
        more = len(graph.excluded_parameters) - len(shown)
        text = "\n".join(
            [f"frozen: excluded from the DAG ({len(graph.excluded_parameters)})", *shown] + ([f"... and {more} more"] if more else [])
        )
        lines.append(
            f"  excluded [label={_quote(text)}, shape=note, style=\"filled,dashed\", fillcolor=\"#eeeeee\", color=\"#999999\", fontcolor=\"#666666\"];"
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def dot_available() -> bool:
    """Whether Graphviz's ``dot`` program is on PATH."""
    return shutil.which("dot") is not None


def render(graph: Graph | str, path: str | Path, *, fmt: str | None = None, timeout: float = 120.0) -> Path:
    """Draws the graph (a ``Graph`` or DOT text) into an image file with Graphviz's ``dot``.

    The format comes from ``fmt`` or the file's suffix (png, svg, pdf, jpg, gif). Raises
    ``GraphvizNotFoundError`` when ``dot`` is not installed.
    """
    out = Path(path)
    fmt = (fmt or out.suffix.lstrip(".") or "png").lower()
    if fmt not in FORMATS:
        raise ValueError(f"image format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    dot = shutil.which("dot")
    if dot is None:
        raise GraphvizNotFoundError("Graphviz's dot program is not installed: apt-get install graphviz (or write DOT with to_dot)")
    text = graph if isinstance(graph, str) else to_dot(graph)
    done = subprocess.run(
        [dot, f"-T{fmt}", "-o", str(out)], input=text.encode(), capture_output=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"dot failed (exit {done.returncode}): {done.stderr.decode(errors='replace').strip()}")
    return out
