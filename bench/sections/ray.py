"""Section ``ray`` (only when asked for): the same step and gradient fetch on a session held by a
Ray actor (a one-node Ray started by a second server) side by side with a session of the local
backend and with local PyTorch. Ratio: ray / local backend; the hop (ray less local backend) is
set against what the issue allows it, one copy of the payload (``np.copyto`` into memory already
mapped, timed in the same repetitions) and 1 ms a call: "hop / allowed" <= 1 meets it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from bench.launch import Context, start_server
from bench.measure import SideBySide, timed
from bench.rows import BYTES, Figure, Layout, Row, count, rate, ratio, seconds
from bench.steps import LocalStep, RemoteStep, repetitions, shape_name, step_inputs
from remote_trainer.client import Session, TrainerClient, TrainerError

# The hop a call may add: one copy of its payload and this much.
PER_CALL = 1e-3
EMPTY_CALL = Layout("{ours}", "{reference}", "one actor call adds {hop}; hop / allowed {hop_vs_allowed:.2f} (allowed {allowed})")
STEP = Layout("{ours}", "local backend {reference}; PyTorch {pytorch}",
              "reps {reps}; ray / PyTorch {ray_vs_pytorch:.3f}; the hop adds {hop} a step (3 actor calls, input {input} "
              "through the object store); hop / allowed {hop_vs_allowed:.2f} (one copy {copy} + 3 x 1 ms)", ratio="{ratio:.3f}")
INPUT = Layout("hop {ours}", "allowed {reference}",
               "ray {ray}, local backend {local}: a Forward the engine refuses at once (rank 5), so the call is the input's trip "
               "alone; one copy {copy} + 1 ms", ratio="{ratio:.2f}")
GRADIENTS = Layout("{ours} = {ours_rate}", "local backend {reference} = {reference_rate}",
                   "the hop adds {hop}; hop / allowed {hop_vs_allowed:.2f} (one copy {copy} + 1 ms; gradients copied into the "
                   "object store once, read by the front-end without a copy)")


def copying(nbytes: int) -> Callable[[], object]:
    """One copy of ``nbytes`` into memory already mapped (the allowance's "one copy of the payload")."""
    source, target = np.ones(nbytes // 4, np.float32), np.zeros(nbytes // 4, np.float32)
    return lambda: np.copyto(target, source)


def refused(session: Session, x: np.ndarray) -> None:
    """A Forward of ``x`` (rank 5) that the engine refuses at once: the input's trip and nothing else."""
    try:
        session.forward(x)
    except TrainerError as exc:
        if exc.reason != "BAD_INPUT_SHAPE":
            raise
        return
    raise AssertionError("the engine took a rank-5 input")


def hop_figures(hop: float, copy: float, calls: int) -> dict[str, Figure]:
    allowed = copy + calls * PER_CALL
    return {"hop": seconds(hop), "copy": seconds(copy), "allowed": seconds(allowed), "hop_vs_allowed": ratio(hop / allowed)}


def run(ctx: Context) -> list[Row]:
    args = ctx.args
    rows: list[Row] = []
    with start_server(args.device, 4, args.chunk_bytes, args.threads, backend="ray") as ray_server, \
            TrainerClient(ctx.server.target, timeout=600) as client, TrainerClient(ray_server.target, timeout=600) as ray_client:
        # The Ray server's default session: one actor reserving as many CPUs as torch has threads
        # here, which is all a small machine has (a second session would wait for CPUs).
        on_ray = ray_client.session()
        s = SideBySide(["ray", "local"])
        s.run({"ray": on_ray.info, "local": client.session().info}, reps=args.transfer_reps * 10, warmup=5)
        rows.append(Row("ray", "empty call: DescribeSession, ray vs local backend",
                        {"ours": seconds(s.median("ray")), "reference": seconds(s.median("local")),
                         **hop_figures(s.median("ray") - s.median("local"), 0.0, 1)},
                        s.paired_ratio("ray", "local"), EMPTY_CALL, target="hop <= 1 ms"))
        with client.create_session("random", seed=0) as on_local:
            for shape in args.ray_sizes:
                x, labels = step_inputs(shape)
                ray_step, local_step, torch_step = RemoteStep(on_ray, "full"), RemoteStep(on_local, "full"), LocalStep("full", torch.device(args.device))
                xt, lt = torch.from_numpy(x), torch.from_numpy(labels)
                first = timed(lambda: ray_step(x, labels))
                reps = repetitions(args, first, calls=3)
                sbs = SideBySide(["ray", "local", "pytorch", "copy"])
                sbs.run({"ray": lambda: ray_step(x, labels), "local": lambda: local_step(x, labels),
                         "pytorch": lambda: torch_step(xt, lt), "copy": copying(x.nbytes)}, reps=reps, warmup=max(0, args.warmup - 1))
                rows.append(Row(
                    "ray", f"step full {shape_name(shape)}: ray / local backend",
                    {"ours": seconds(sbs.median("ray")), "reference": seconds(sbs.median("local")),
                     "pytorch": seconds(sbs.median("pytorch")), "reps": count(reps),
                     "ray_vs_pytorch": ratio(sbs.paired_ratio("ray", "pytorch")), "input": Figure(x.nbytes, BYTES),
                     **hop_figures(sbs.median("ray") - sbs.median("local"), sbs.median("copy"), 3)},
                    sbs.paired_ratio("ray", "local"), STEP, target="hop <= copy + 3 ms",
                ))
            # The input's trip alone, at the largest step size: no model run to hide it in.
            x5 = step_inputs(max(args.ray_sizes, key=lambda shape: shape[0] * shape[2] * shape[3]))[0][None]
            sbs = SideBySide(["ray", "local", "copy"])
            sbs.run({"ray": lambda: refused(on_ray, x5), "local": lambda: refused(on_local, x5), "copy": copying(x5.nbytes)},
                    reps=args.transfer_reps * 2, warmup=2)
            hop = hop_figures(sbs.median("ray") - sbs.median("local"), sbs.median("copy"), 1)
            rows.append(Row(
                "ray", f"the input's trip: Forward of {x5.nbytes / 1e6:.1f} MB refused by the engine, ray less local backend",
                {"ours": hop["hop"], "reference": hop["allowed"], "ray": seconds(sbs.median("ray")),
                 "local": seconds(sbs.median("local")), "copy": hop["copy"]},
                hop["hop_vs_allowed"].value, INPUT, target="<= 1.00",
            ))
            for session in (on_ray, on_local):  # gradients to fetch
                session.forward(np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32))
                session.backward("sum", np.ones((2, 1000), np.float32))
            nbytes = on_local.list_parameters().total_elements * 4
            sbs = SideBySide(["ray", "local", "copy"])
            sbs.run({"ray": lambda: on_ray.gradients(), "local": lambda: on_local.gradients(), "copy": copying(nbytes)},
                    reps=args.transfer_reps, warmup=2)
            rows.append(Row(
                "ray", f"GetGradients all float32 ({nbytes / 1e6:.1f} MB): ray / local backend",
                {"ours": seconds(sbs.median("ray")), "ours_rate": rate(nbytes, sbs.median("ray")),
                 "reference": seconds(sbs.median("local")), "reference_rate": rate(nbytes, sbs.median("local")),
                 **hop_figures(sbs.median("ray") - sbs.median("local"), sbs.median("copy"), 1)},
                sbs.paired_ratio("ray", "local"), GRADIENTS, target="hop <= copy + 1 ms",
            ))
    return rows
