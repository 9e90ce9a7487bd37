"""Section ``upload``: a Forward of an ``--upload-shape`` batch (eval mode, no_grad,
statistics-only output, so the reply is small) against a raw unary upload of the same bytes to the
raw floor in a process of its own (``python -m bench.raw``: the faster of its sync and aio variants
in this run, named in the row; the same floor inside the trainer's process is in the note), for
fp32 images and, side by side in the same repetitions, for the same images as uint8 on a session
with the ImageNet input transform (a quarter of the bytes; ``ToTensor()`` + ``Normalize()`` run on
the server after the upload). Forward's time splits into the model (the server's
``engine.forward``, which includes the transform) and the rest; ratio: the floor's upload time / rest."""

from __future__ import annotations

import numpy as np
import torch
from torchvision import transforms

from bench.launch import Context
from bench.measure import SideBySide, median
from bench.rows import BYTES, RELATIVE, Figure, Layout, Row, rate, ratio, seconds
from bench.steps import shape_name
from remote_trainer.client import Session, TrainerClient, core
from remote_trainer.contract.names import IMAGENET_MEAN, IMAGENET_STD
from remote_trainer.engine.models import build_model

UPLOAD = Layout("{ours}: model {model} + rest {rest} = {rest_rate}", "standalone raw {floor} unary {reference} = {reference_rate}",
                "server decode+checks {decode}; standalone {other} {alone_other}; in the trainer's process: raw aio unary "
                "{raw_aio} (ratio {ratio_to_raw_aio:.2f}), raw sync {raw_sync} (ratio {ratio_to_raw_sync:.2f}); "
                "raw aio 1 MiB client stream {raw_stream_rate}; local forward {local}")
UPLOAD_UINT8 = Layout("{ours}: model {model} + rest {rest} = {rest_rate}", "standalone raw {floor} unary {reference} = {reference_rate}",
                      "request {request_bytes:,.0f} B on the wire against fp32's {fp32_request_bytes:,.0f} B; rest {rest_vs_fp32:.2f}x "
                      "fp32's; server decode+checks {decode}; model includes ToTensor+Normalize on the device; "
                      "logits agree with local ToTensor+Normalize to {logits_agree}")


def run(ctx: Context) -> list[Row]:
    args, raw = ctx.args, ctx.floors
    shape = args.upload_shape
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    data, pixel_data = x.tobytes(), pixels.tobytes()
    local, _ = build_model("random", 0, 0)
    local.eval()
    xt = torch.from_numpy(x)
    with TrainerClient(ctx.server.target, timeout=600) as client, client.create_session("random", seed=0) as session, \
            client.create_session("random", seed=0, input_transform="imagenet") as images:

        def ours() -> None:
            session.forward(x, eval_mode=True, no_grad=True, stats_only=True)

        def ours_uint8() -> None:
            images.forward(pixels, eval_mode=True, no_grad=True, stats_only=True)

        def local_forward() -> None:
            with torch.no_grad():
                local(xt)

        raw.timings()
        # "ours" and "ours-uint8" are the only Forwards, next to each other in either order.
        sbs = SideBySide(["ours", "ours-uint8", "local", "alone-sync", "alone-aio", "alone-sync-uint8", "alone-aio-uint8",
                          "raw-aio", "raw", "raw-stream"])
        sbs.run({"ours": ours, "ours-uint8": ours_uint8, "local": local_forward,
                 "alone-sync": lambda: raw.alone_sync.upload(data), "alone-aio": lambda: raw.alone_aio.upload(data),
                 "alone-sync-uint8": lambda: raw.alone_sync.upload(pixel_data),
                 "alone-aio-uint8": lambda: raw.alone_aio.upload(pixel_data), "raw-aio": lambda: raw.aio.upload(data),
                 "raw": lambda: raw.sync.upload(data), "raw-stream": lambda: raw.aio.upload_stream(data)},
                reps=args.upload_reps, warmup=1)
        timings = raw.timings()
        agree = _uint8_logits_agreement(images, pixels, local)
        request_bytes = {name: len(core.forward(s.session_id, batch, True, True, True).request.serialize())
                         for name, s, batch in (("fp32", session, x), ("uint8", images, pixels))}
    n = args.upload_reps
    engine = _by_contender(timings.get("engine.forward", [])[-2 * n:], n)
    handler = _by_contender(timings.get("handler.Forward", [])[-2 * n:], n)
    floor = min(("sync", "aio"), key=lambda kind: sbs.median(f"alone-{kind}"))  # the faster standalone floor, for fp32
    other = "aio" if floor == "sync" else "sync"
    words = {"floor": floor, "other": other}
    rows = []
    for name, nbytes, reference in (("ours", len(data), f"alone-{floor}"), ("ours-uint8", len(pixel_data), f"alone-{floor}-uint8")):
        walls = sbs.times[name]
        transport = [w - e for w, e in zip(walls, engine[name])]
        figures = {"ours": seconds(median(walls)), "model": seconds(median(engine[name])), "rest": seconds(median(transport)),
                   "rest_rate": rate(nbytes, median(transport)), "reference": seconds(sbs.median(reference)),
                   "reference_rate": rate(nbytes, sbs.median(reference)),
                   "decode": seconds(median([h - e for h, e in zip(handler[name], engine[name])]))}
        rows.append((name, nbytes, figures, median([r / t for r, t in zip(sbs.times[reference], transport)])))
    (_, nbytes, fp32, fp32_ratio), (_, pixel_bytes, uint8, uint8_ratio) = rows
    def ratio_to(contender: str) -> float:
        """The in-process floor ``contender``'s upload time / our rest, per repetition, median."""
        return median([r / (w - e) for r, w, e in zip(sbs.times[contender], sbs.times["ours"], engine["ours"])])

    fp32 |= {"raw_sync": seconds(sbs.median("raw")), "ratio_to_raw_sync": ratio(ratio_to("raw")),
             "raw_aio": seconds(sbs.median("raw-aio")), "ratio_to_raw_aio": ratio(ratio_to("raw-aio")),
             "alone_other": seconds(sbs.median(f"alone-{other}")),
             "raw_stream_rate": rate(nbytes, sbs.median("raw-stream")), "local": seconds(sbs.median("local"))}
    uint8 |= {"request_bytes": Figure(request_bytes["uint8"], BYTES), "fp32_request_bytes": Figure(request_bytes["fp32"], BYTES),
              "rest_vs_fp32": ratio(uint8["rest"].value / fp32["rest"].value), "logits_agree": Figure(agree, RELATIVE)}
    return [
        Row("upload", f"Forward {shape_name(shape)} fp32 ({nbytes / 1e6:.1f} MB), eval no_grad", fp32, fp32_ratio, UPLOAD,
            target=">= 0.80", words=words),
        Row("upload", f"Forward {shape_name(shape)} uint8 + imagenet transform ({pixel_bytes / 1e6:.1f} MB), eval no_grad",
            uint8, uint8_ratio, UPLOAD_UINT8, words=words),
    ]


def _by_contender(values: list[float], reps: int) -> dict[str, list[float]]:
    """The server's timings of the two Forwards of each repetition, by contender: SideBySide runs
    "ours" first in even repetitions and "ours-uint8" first in odd ones."""
    pairs = [values[2 * i : 2 * i + 2] for i in range(min(reps, len(values) // 2))]
    return {"ours": [p[i % 2] for i, p in enumerate(pairs)], "ours-uint8": [p[1 - i % 2] for i, p in enumerate(pairs)]}


def _uint8_logits_agreement(session: Session, pixels: np.ndarray, local: torch.nn.Module) -> float:
    """The largest difference, relative to the largest logit, between the uint8 session's logits and
    local PyTorch's on ``ToTensor()`` + ``Normalize(ImageNet)`` of the same images (first 2)."""
    batch = pixels[:2]
    logits = session.forward(batch, eval_mode=True, no_grad=True).logits
    prepare = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    with torch.no_grad():
        expected = local(torch.stack([prepare(image.transpose(1, 2, 0)) for image in batch])).numpy()
    return float(np.abs(logits - expected).max() / max(1e-12, float(np.abs(expected).max())))
