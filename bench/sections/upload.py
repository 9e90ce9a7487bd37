"""Section ``upload``: a Forward of an ``--upload-shape`` fp32 batch (eval mode, no_grad,
statistics-only output, so the reply is small) against a raw unary upload of the same bytes.
Forward's time splits into the model (the server's ``engine.forward``) and the rest; ratio: raw
aio upload time / rest."""

from __future__ import annotations

import numpy as np
import torch

from bench.launch import Context
from bench.measure import SideBySide, median
from bench.rows import Layout, Row, rate, ratio, seconds
from bench.steps import shape_name
from remote_trainer.client import TrainerClient
from remote_trainer.engine.models import build_model

UPLOAD = Layout("{ours}: model {model} + rest {rest} = {rest_rate}", "raw aio unary {reference} = {reference_rate}",
                "server decode+checks {decode}; raw sync-server unary {raw_sync} (ratio {ratio_to_raw_sync:.2f}); "
                "raw aio 1 MiB client stream {raw_stream_rate}; local forward {local}")


def run(ctx: Context) -> list[Row]:
    args, raw = ctx.args, ctx.floors
    shape = args.upload_shape
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    data = x.tobytes()
    local, _ = build_model("random", 0, 0)
    local.eval()
    xt = torch.from_numpy(x)
    with TrainerClient(ctx.server.target, timeout=600) as client, client.create_session("random", seed=0) as session:

        def ours() -> None:
            session.forward(x, eval_mode=True, no_grad=True, stats_only=True)

        def local_forward() -> None:
            with torch.no_grad():
                local(xt)

        raw.timings()
        sbs = SideBySide(["ours", "local", "raw-aio", "raw", "raw-stream"])
        sbs.run({"ours": ours, "local": local_forward, "raw-aio": lambda: raw.aio.upload(data), "raw": lambda: raw.sync.upload(data),
                 "raw-stream": lambda: raw.aio.upload_stream(data)}, reps=args.upload_reps, warmup=1)
        timings = raw.timings()
    n = args.upload_reps
    engine = timings.get("engine.forward", [])[-n:]
    handler = timings.get("handler.Forward", [])[-n:]
    walls = sbs.times["ours"]
    transport = [w - e for w, e in zip(walls, engine)]
    nbytes = len(data)
    return [Row(
        "upload", f"Forward {shape_name(shape)} fp32 ({nbytes / 1e6:.1f} MB), eval no_grad",
        {"ours": seconds(median(walls)), "model": seconds(median(engine)), "rest": seconds(median(transport)),
         "rest_rate": rate(nbytes, median(transport)), "reference": seconds(sbs.median("raw-aio")),
         "reference_rate": rate(nbytes, sbs.median("raw-aio")), "decode": seconds(median([h - e for h, e in zip(handler, engine)])),
         "raw_sync": seconds(sbs.median("raw")),
         "ratio_to_raw_sync": ratio(median([r / t for r, t in zip(sbs.times["raw"], transport)])),
         "raw_stream_rate": rate(nbytes, sbs.median("raw-stream")), "local": seconds(sbs.median("local"))},
        median([r / t for r, t in zip(sbs.times["raw-aio"], transport)]), UPLOAD, target=">= 0.80",
    )]
