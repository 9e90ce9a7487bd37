"""The autograd graph of a forward, walked from the logits' ``grad_fn`` to the parameters' AccumulateGrad."""

from __future__ import annotations

from typing import Any

from remote_trainer.engine.results import Graph, GraphNode


def autograd_graph(forward_id: int, root: Any, names: dict[int, str]) -> Graph:
    """Every backward function reachable from ``root`` (a ``grad_fn``) and the edges between them.

    ``names`` maps ``id(parameter)`` to its name, in model order: an AccumulateGrad node of a
    parameter is labelled with it, and parameters never reached are the ones excluded from the DAG.
    """
    ids: dict[object, int] = {root: 0}
    nodes = [GraphNode(0, type(root).__name__)]
    edges: list[tuple[int, int]] = []
    leaves: set[str] = set()
    todo = [root]
    while todo:
        fn = todo.pop()
        for nxt, _ in fn.next_functions:
            if nxt is None:
                continue
            if nxt not in ids:
                ids[nxt] = len(nodes)
                variable = getattr(nxt, "variable", None)
                param = names.get(id(variable), "") if variable is not None else ""
                if param:
                    leaves.add(param)
                nodes.append(GraphNode(ids[nxt], type(nxt).__name__, param))
                todo.append(nxt)
            edges.append((ids[fn], ids[nxt]))
    order = list(names.values())
    return Graph(forward_id, 0, nodes, edges, [n for n in order if n in leaves], [n for n in order if n not in leaves])
