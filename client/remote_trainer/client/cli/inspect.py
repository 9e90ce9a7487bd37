"""Looking into the model: gradient statistics (``grads``), the autograd graph of a forward
(``graph``), and class predictions of an eval-mode forward (``predict``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import numpy.typing as npt

from remote_trainer.client import graphviz, plots
from remote_trainer.client.cli.output import fmt, print_json, shape_text, table
from remote_trainer.client.cli.training import load_npy
from remote_trainer.client.client import Session, TrainerClient


def cmd_grads(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    grads = session.gradients(*args.patterns, stats_only=args.save is None)
    if args.plot is not None:
        plots.plot_gradient_flow(grads, args.plot)
    if args.save is not None:
        arrays = {name: g.array for name, g in grads.items() if g.array is not None}
        np.savez(args.save, **arrays)  # type: ignore[arg-type]
    if args.json:
        print_json({name: {"shape": list(g.shape), "present": g.present,
                           "stats": dataclasses.asdict(g.stats) if g.stats is not None else None} for name, g in grads.items()})
        return 0
    width = max([len(n) for n in grads] + [4])
    print(f"{'name':<{width}}  {'shape':<14} {'norm':>11} {'min':>11} {'max':>11} {'mean':>11}")
    for name, g in grads.items():
        if not g.present or g.stats is None:
            print(f"{name:<{width}}  {shape_text(g.shape):<14} {'no grad':>11}")
            continue
        s = g.stats
        flag = f"  ({s.non_finite_count} non-finite)" if s.non_finite_count else ""
        print(f"{name:<{width}}  {shape_text(g.shape):<14} {fmt(s.norm):>11} {fmt(s.min):>11} {fmt(s.max):>11} {fmt(s.mean):>11}{flag}")
    present = sum(1 for g in grads.values() if g.present)
    print(f"{present} of {len(grads)} parameters have a gradient")
    if args.save is not None:
        print(f"saved {len(arrays)} gradients to {args.save}")
    if args.plot is not None:
        print(f"wrote the gradient-flow picture to {args.plot}")
    return 0


def cmd_graph(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    if not args.pending:
        x = np.random.default_rng(args.seed).random((args.batch, 3, args.size, args.size), dtype=np.float32)
        session.forward(x, eval_mode=True, stats_only=True)
    graph = session.graph()
    dot = graphviz.to_dot(graph)
    if args.json:
        if args.dot and args.dot != "-":
            Path(args.dot).write_text(dot)
        if args.image:
            graphviz.render(dot, args.image)
        print_json({"forward_id": graph.forward_id, "nodes": len(graph.nodes), "edges": len(graph.edges),
                    "functions": dict(Counter(n.function for n in graph.nodes if not n.parameter)),
                    "leaf_parameters": graph.leaf_parameters, "excluded_parameters": graph.excluded_parameters})
        return 0
    if args.dot == "-":
        sys.stdout.write(dot)
    else:
        functions = Counter(n.function for n in graph.nodes if not n.parameter)
        print(f"forward {graph.forward_id}: {len(graph.nodes)} nodes, {len(graph.edges)} edges; "
              f"{len(graph.leaf_parameters)} leaf parameters, {len(graph.excluded_parameters)} excluded (frozen)")
        print("functions: " + ", ".join(f"{name} x{count}" for name, count in functions.most_common()))
        if args.dot:
            Path(args.dot).write_text(dot)
            print(f"wrote DOT to {args.dot}")
    if args.image:
        graphviz.render(dot, args.image)
        print(f"wrote {args.image}", file=sys.stderr if args.dot == "-" else sys.stdout)
    return 0


def _softmax(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


def cmd_predict(client: TrainerClient, session: Session, args: argparse.Namespace) -> int:
    if args.top < 1:
        raise ValueError("--top must be at least 1")
    if args.data:
        x = load_npy(args.data, "--data").astype(np.float32, copy=False)
    else:
        x = np.random.default_rng(args.seed).random((args.batch, 3, args.size, args.size), dtype=np.float32)
    result = session.forward(x, eval_mode=True, no_grad=True)
    assert result.logits is not None
    probabilities = _softmax(result.logits)
    k = min(args.top, probabilities.shape[1])
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    if args.json:
        print_json([
            [{"class": int(c), "probability": float(probabilities[i, c]), "logit": float(result.logits[i, c])} for c in row]
            for i, row in enumerate(top)
        ])
        return 0
    rows = [(i, rank + 1, int(c), f"{probabilities[i, c]:.4f}", fmt(float(result.logits[i, c])))
            for i, row in enumerate(top) for rank, c in enumerate(row)]
    table(("image", "rank", "class", "probability", "logit"), rows, right=(0, 1, 2, 3, 4))
    return 0
