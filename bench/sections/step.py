"""Section ``step``: a training step through the server against the identical step in local
PyTorch, for every ``--cases`` case at every ``--sizes`` shape; first an empty call against the raw
floors' unary, for scale. Ratio: ours / reference."""

from __future__ import annotations

import numpy as np
import torch

from bench.launch import Context
from bench.measure import SideBySide, median
from bench.rows import RELATIVE, Figure, Layout, Row, count, seconds
from bench.steps import LocalStep, RemoteStep, difference, measure_steps, shape_name, step_inputs
from remote_trainer.client import TrainerClient
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb

EMPTY_CALL = Layout("{ours}", "{reference}", "adds {added} (median of paired differences; target: at most 0.3 ms more); "
                    "one round trip on loopback; raw sync-server unary {raw_sync}")
# Issue 21: an empty call within 0.3 ms of the raw grpc.aio unary in the same run (a difference, not a ratio).
EMPTY_CALL_TARGET = "<= +0.30 ms"
NUMBERED = Layout("{ours}", "{reference}", "the SDK numbers it; the server orders it and records its answer (docs/reliability.md)")
STEP = Layout("{ours}", "{reference}", "reps {reps}; server torch {server_torch}, rest {rest}; logits agree to {logits_agree}",
              ratio="{ratio:.3f}")


def run(ctx: Context) -> list[Row]:
    args, raw = ctx.args, ctx.floors
    device = torch.device(args.device)
    rows: list[Row] = []
    with TrainerClient(ctx.server.target, timeout=600) as client:
        # An empty call on each side, for scale: what one round trip costs.
        s = SideBySide(["ours", "raw-aio", "raw"])
        default = client.session()
        s.run({"ours": lambda: default.info(), "raw-aio": raw.aio.ping, "raw": raw.sync.ping}, reps=200, warmup=20)
        rows.append(Row("step", "empty call: DescribeSession vs raw aio unary",
                        {"ours": seconds(s.median("ours")), "reference": seconds(s.median("raw-aio")),
                         "raw_sync": seconds(s.median("raw")), "added": seconds(s.paired_difference("ours", "raw-aio"))},
                        s.paired_ratio("ours", "raw-aio"), EMPTY_CALL, target=EMPTY_CALL_TARGET))
        # What exactly-once adds to a call: a ZeroGrad numbered by the SDK (ordered and recorded on
        # the server) against the same call unnumbered through the raw stub.
        z = SideBySide(["numbered", "unnumbered"])
        unnumbered = pb.ZeroGradRequest()
        z.run({"numbered": lambda: default.zero_grad(), "unnumbered": lambda: client.stub.ZeroGrad(unnumbered, timeout=60)},
              reps=200, warmup=20)
        rows.append(Row("step", "numbered call: ZeroGrad numbered (SDK) vs unnumbered (raw stub)",
                        {"ours": seconds(z.median("numbered")), "reference": seconds(z.median("unnumbered"))},
                        z.paired_ratio("numbered", "unnumbered"), NUMBERED))
        for shape in args.sizes:
            for case in args.cases:
                x, labels = step_inputs(shape, 10 if case == "frozen" else 1000)
                xt, lt = torch.from_numpy(x), torch.from_numpy(labels)
                local = LocalStep(case, device)
                with client.create_session("random", seed=0) as session:
                    remote = RemoteStep(session, case)
                    raw.timings()  # the server's torch times from here on
                    sbs, reps, worst = measure_steps(
                        args, {"remote": lambda: remote(x, labels), "local": lambda: local(xt, lt)},
                        lambda: difference(remote.logits, local.logits))
                    engine = raw.timings()
                torch_time = engine_step_time(engine, args.warmup - 1 + reps)
                remote_med = sbs.median("remote")
                rows.append(Row(
                    "step", f"{case} {shape_name(shape)}",
                    {"ours": seconds(remote_med), "reference": seconds(sbs.median("local")), "reps": count(reps),
                     "server_torch": seconds(torch_time), "rest": seconds(remote_med - torch_time),
                     "logits_agree": Figure(worst, RELATIVE)},
                    sbs.paired_ratio("remote", "local"), STEP, target=target(case, shape),
                ))
    return rows


def target(case: str, shape: tuple[int, ...]) -> str:
    """The ratio issue 5 asked for, at the two shapes it named (issue 21's for ``frozen`` at 1x3x64x64)."""
    if shape == (32, 3, 224, 224):
        return "<= 1.02"
    if shape != (1, 3, 64, 64):
        return ""
    if case == "frozen":
        return "<= 1.15"  # issue 21: separate cheap calls, where the calls' own cost shows most
    return "<= 1.03" if case == "train-step" else "<= 1.08" if case in ("full", "client-loss") else ""


def engine_step_time(engine: dict[str, list[float]], steps: int) -> float:
    """Median over the measured steps of the server's torch time (forward + backward + step, or
    train_step; a Backward that also steps counts in backward)."""
    parts = [engine[f"engine.{m}"][-steps:] for m in ("forward", "backward", "step", "train_step") if engine.get(f"engine.{m}")]
    if not parts:
        return float("nan")
    n = min(len(p) for p in parts)
    if n == 0:
        return float("nan")
    return median([sum(p[-i] for p in parts) for i in range(1, n + 1)])

