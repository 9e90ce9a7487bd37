"""Section ``grads``: GetGradients of every parameter (float32 and float16, with and without
statistics) against the raw floor streaming the same bytes in 1 MiB messages from a process of its
own, as a user's own raw gRPC server would (``python -m bench.raw``: the faster of its sync and aio
variants in this run is "the floor", and the row names it); the same floor served inside the
trainer server's process and a memory copy are in the note. Ratio: floor / ours (1.0 = transport
speed). Then statistics-only GetGradients against one fused local pass over gradients of the same
sizes (norm, min, max and sum of each, one host synchronisation for all); ratio: ours / fused."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from bench.launch import Context
from bench.measure import SideBySide
from bench.raw import MIB
from bench.rows import Layout, Row, ratio, rate, seconds
from remote_trainer.client import Session, TrainerClient
from remote_trainer.engine.models import build_model

WITH_STATS = Layout("{ours} = {ours_rate}", "standalone raw {floor} server, 1 MiB stream {reference} = {reference_rate}",
                    "standalone {other} {alone_other}; in the trainer's process: raw aio {raw_aio} (ratio {ratio_to_raw_aio:.2f}), "
                    "raw sync {raw_sync} (ratio {ratio_to_raw_sync:.2f}); memory copy {copy} = {copy_rate}")
NO_STATS = Layout("{ours} = {ours_rate}", "standalone raw {floor} server {reference}",
                  "in the trainer's process: ratio to raw aio {ratio_to_raw_aio:.2f}, to raw sync {ratio_to_raw_sync:.2f}")
STATS_ONLY = Layout("{ours}", "one local fused pass (norm, min, max, sum; one sync) {reference}",
                    "local norm/min/max/mean tensor by tensor {naive}; torch._foreach_norm alone {norm_only}", ratio="{ratio:.1f}x")
# The standalone floors, by the name a row gives the faster one.
STANDALONE = {"sync": "alone-sync", "aio": "alone-aio"}


def run(ctx: Context) -> list[Row]:
    args, raw = ctx.args, ctx.floors
    rows: list[Row] = []
    with TrainerClient(ctx.server.target, timeout=600) as client, client.create_session("random", seed=0) as session:
        x = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
        session.forward(x)
        session.backward("sum", np.ones((2, 1000), np.float32))
        params = session.list_parameters()
        fp32_bytes = params.total_elements * 4
        for dtype, size in (("float32", 4), ("float16", 2)):
            nbytes = params.total_elements * size
            source = np.ones(nbytes, np.uint8)
            dest = np.empty_like(source)
            got: dict[str, Any] = {}

            def ours(dtype: str = dtype) -> None:
                got["grads"] = session.gradients(dtype=dtype)

            def ours_no_stats(dtype: str = dtype) -> None:
                got["grads"] = session.gradients(dtype=dtype, stats=False)

            sbs = SideBySide(["ours", "ours-no-stats", "alone-sync", "alone-aio", "raw-aio", "raw", "copy"])
            sbs.run({"ours": ours, "ours-no-stats": ours_no_stats,
                     "alone-sync": functools.partial(raw.alone_sync.download, nbytes, MIB),
                     "alone-aio": functools.partial(raw.alone_aio.download, nbytes, MIB),
                     "raw-aio": functools.partial(raw.aio.download, nbytes, MIB),
                     "raw": functools.partial(raw.sync.download, nbytes, MIB), "copy": lambda: np.copyto(dest, source)},
                    reps=args.transfer_reps, warmup=2)
            assert sum(t.array.nbytes for t in got["grads"].values() if t.array is not None) == fp32_bytes * size // 4
            floor = min(STANDALONE, key=lambda kind: sbs.median(STANDALONE[kind]))
            other = "aio" if floor == "sync" else "sync"

            def timing(name: str, contender: str) -> dict[str, Any]:
                return {name: seconds(sbs.median(contender)), f"{name}_rate": rate(nbytes, sbs.median(contender))}

            def against(contender: str) -> dict[str, Any]:
                """Ours (``contender``) against the in-process floors."""
                return {"ratio_to_raw_aio": ratio(sbs.paired_ratio("raw-aio", contender)),
                        "ratio_to_raw_sync": ratio(sbs.paired_ratio("raw", contender))}

            floors = {**timing("reference", STANDALONE[floor]), "alone_other": seconds(sbs.median(STANDALONE[other])),
                      "raw_aio": seconds(sbs.median("raw-aio")), "raw_sync": seconds(sbs.median("raw"))}
            words = {"floor": floor, "other": other}
            rows.append(Row(
                "grads", f"GetGradients all {dtype} ({nbytes / 1e6:.1f} MB)",
                {**timing("ours", "ours"), **floors, **timing("copy", "copy"), **against("ours")},
                sbs.paired_ratio(STANDALONE[floor], "ours"), WITH_STATS, target=">= 0.80", words=words,
            ))
            rows.append(Row(
                "grads", f"GetGradients all {dtype}, stats=False ({nbytes / 1e6:.1f} MB)",
                {**timing("ours", "ours-no-stats"), **floors, **against("ours-no-stats")},
                sbs.paired_ratio(STANDALONE[floor], "ours-no-stats"), NO_STATS, target=">= 0.80", words=words,
            ))
        rows.append(_stats_only(ctx, session))
    return rows


def _stats_only(ctx: Context, session: Session) -> Row:
    """Statistics-only GetGradients against one fused local pass over gradients of the same sizes."""
    local, _ = build_model("random", 0, 0)
    local.train()
    local(torch.rand(2, 3, 64, 64)).sum().backward()
    grads = [p.grad for p in local.parameters() if p.grad is not None]
    nbytes = sum(g.numel() * 4 for g in grads)

    # All four figures of each gradient and one host synchronisation for all: torch has no kernel
    # computing them in one read, so vector_norm, aminmax and sum (as fast here as any local
    # combination tried: _foreach_norm + aminmax + sum, or slice-wise as the server does).
    def fused() -> None:
        torch.stack([torch.stack([torch.linalg.vector_norm(g), *torch.aminmax(g), g.sum()]) for g in grads]).tolist()

    def naive() -> None:  # norm, min, max, mean, one reduction and one host sync each, tensor by tensor
        for g in grads:
            [float(g.norm()), float(g.min()), float(g.max()), float(g.mean())]

    def norm_only() -> None:  # the reference before issue 21: the norms alone, one multi-tensor kernel
        torch.stack(torch._foreach_norm(grads)).tolist()

    sbs = SideBySide(["ours", "fused", "naive", "norm-only"])
    sbs.run({"ours": lambda: session.gradients(stats_only=True), "fused": fused, "naive": naive, "norm-only": norm_only},
            reps=ctx.args.transfer_reps, warmup=2)
    return Row(
        "grads", f"statistics-only GetGradients ({nbytes / 1e6:.1f} MB of gradients)",
        {"ours": seconds(sbs.median("ours")), "reference": seconds(sbs.median("fused")), "naive": seconds(sbs.median("naive")),
         "norm_only": seconds(sbs.median("norm-only"))},
        sbs.paired_ratio("ours", "fused"), STATS_ONLY, target="<= 3x",
    )
