"""Section ``ray`` (only when asked for): the same step and gradient fetch on a session held by a
Ray actor (a one-node Ray started by a second server) side by side with a session of the local
backend and with local PyTorch. Ratio: ray / local backend."""

from __future__ import annotations

import numpy as np
import torch

from bench.launch import Context, start_server
from bench.measure import SideBySide, timed
from bench.rows import BYTES, Figure, Layout, Row, count, rate, ratio, seconds
from bench.steps import LocalStep, RemoteStep, repetitions, shape_name, step_inputs
from remote_trainer.client import TrainerClient

EMPTY_CALL = Layout("{ours}", "{reference}", "one actor call adds {hop}")
STEP = Layout("{ours}", "local backend {reference}; PyTorch {pytorch}",
              "reps {reps}; ray / PyTorch {ray_vs_pytorch:.3f}; the hop adds {hop} a step (3 actor calls, input {input} "
              "through the object store)", ratio="{ratio:.3f}")
GRADIENTS = Layout("{ours} = {ours_rate}", "local backend {reference} = {reference_rate}",
                   "the hop adds {hop} (gradients copied into the object store once, read by the front-end without a copy)")


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
                         "hop": seconds(s.median("ray") - s.median("local"))},
                        s.paired_ratio("ray", "local"), EMPTY_CALL))
        with client.create_session("random", seed=0) as on_local:
            for shape in args.ray_sizes:
                x, labels = step_inputs(shape)
                ray_step, local_step, torch_step = RemoteStep(on_ray, "full"), RemoteStep(on_local, "full"), LocalStep("full", torch.device(args.device))
                xt, lt = torch.from_numpy(x), torch.from_numpy(labels)
                first = timed(lambda: ray_step(x, labels))
                reps = repetitions(args, first, calls=3)
                sbs = SideBySide(["ray", "local", "pytorch"])
                sbs.run({"ray": lambda: ray_step(x, labels), "local": lambda: local_step(x, labels),
                         "pytorch": lambda: torch_step(xt, lt)}, reps=reps, warmup=max(0, args.warmup - 1))
                rows.append(Row(
                    "ray", f"step full {shape_name(shape)}: ray / local backend",
                    {"ours": seconds(sbs.median("ray")), "reference": seconds(sbs.median("local")),
                     "pytorch": seconds(sbs.median("pytorch")), "reps": count(reps),
                     "ray_vs_pytorch": ratio(sbs.paired_ratio("ray", "pytorch")),
                     "hop": seconds(sbs.median("ray") - sbs.median("local")), "input": Figure(x.nbytes, BYTES)},
                    sbs.paired_ratio("ray", "local"), STEP,
                ))
            for session in (on_ray, on_local):  # gradients to fetch
                session.forward(np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32))
                session.backward("sum", np.ones((2, 1000), np.float32))
            nbytes = on_local.list_parameters().total_elements * 4
            sbs = SideBySide(["ray", "local"])
            sbs.run({"ray": lambda: on_ray.gradients(), "local": lambda: on_local.gradients()}, reps=args.transfer_reps, warmup=2)
            rows.append(Row(
                "ray", f"GetGradients all float32 ({nbytes / 1e6:.1f} MB): ray / local backend",
                {"ours": seconds(sbs.median("ray")), "ours_rate": rate(nbytes, sbs.median("ray")),
                 "reference": seconds(sbs.median("local")), "reference_rate": rate(nbytes, sbs.median("local")),
                 "hop": seconds(sbs.median("ray") - sbs.median("local"))},
                sbs.paired_ratio("ray", "local"), GRADIENTS,
            ))
    return rows
