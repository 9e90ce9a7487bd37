"""The client side of the bench's ``link`` section, run in the client's network namespace
(``ip netns exec B python -m bench.link_client ...``): measures over the emulated link and prints
one JSON object of medians (seconds) and sizes (bytes) on stdout, which the section turns into rows.

What it measures, each side by side with its reference in the same repetitions:
- the link itself: a one-byte TCP ping-pong (the round trip) and a bulk TCP receive of
  ``--bulk-bytes`` from the calibration peer (``python -m bench.link peer``);
- an empty call (DescribeSession) and the raw aio unary beside it;
- TrainStep of a ``--shape`` batch sent as float32 and as uint8 (a session with the ImageNet input
  transform), cross-entropy on class indices, with a raw aio unary upload of the same bytes; the
  server's torch time of each step from the raw floor's timings; the first step's logits checked
  against local PyTorch on the same weights and inputs;
- GetGradients of every parameter as float32 and float16, with the raw aio 1 MiB stream of the same
  bytes.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from typing import Any

import numpy as np
import torch
from torchvision import transforms

from bench.measure import SideBySide, median
from bench.raw import MIB, RawClient
from remote_trainer.client import TrainerClient, core
from remote_trainer.contract.names import IMAGENET_MEAN, IMAGENET_STD
from remote_trainer.engine.models import build_model


def round_trips(peer: tuple[str, int], reps: int) -> list[float]:
    """One-byte TCP ping-pongs with the calibration peer, each timed."""
    with socket.create_connection(peer) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(b"ping\n")
        times = []
        for _ in range(reps + 5):
            start = time.perf_counter()
            conn.sendall(b"x")
            if conn.recv(1) != b"x":
                raise RuntimeError("the calibration peer closed the ping-pong")
            times.append(time.perf_counter() - start)
    return times[5:]


def bulk_receive(peer: tuple[str, int], nbytes: int) -> float:
    """Seconds from asking the peer for ``nbytes`` (on a connection already open) to the last byte."""
    with socket.create_connection(peer) as conn:
        buffer = bytearray(1 << 20)
        start = time.perf_counter()
        conn.sendall(f"send {nbytes}\n".encode())
        left = nbytes
        while left > 0:
            got = conn.recv_into(buffer)
            if not got:
                raise RuntimeError(f"the calibration peer closed with {left} bytes to go")
            left -= got
        return time.perf_counter() - start


def by_order(values: list[float], reps: int, names: tuple[str, str]) -> dict[str, list[float]]:
    """The server's timings of the two calls of each of the last ``reps`` repetitions, by contender:
    SideBySide runs ``names[0]`` first in even repetitions and ``names[1]`` first in odd ones."""
    values = values[-2 * reps :]
    pairs = [values[2 * i : 2 * i + 2] for i in range(len(values) // 2)]
    return {names[0]: [p[i % 2] for i, p in enumerate(pairs)], names[1]: [p[1 - i % 2] for i, p in enumerate(pairs)]}


def logits_difference(remote: np.ndarray | None, local: torch.Tensor) -> float:
    assert remote is not None
    expected = local.detach().numpy()
    return float(np.abs(remote - expected).max() / max(1.0, float(np.abs(expected).max())))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    host, port = args.peer.rsplit(":", 1)
    peer = (host, int(port))
    out["rtt"] = median(round_trips(peer, args.pings))
    bulk = [bulk_receive(peer, args.bulk_bytes) for _ in range(args.transfer_reps + 1)][1:]
    out["bulk_bytes"], out["bulk"] = args.bulk_bytes, median(bulk)

    options = [("grpc.max_send_message_length", 512 * MIB), ("grpc.max_receive_message_length", 512 * MIB)]
    raw = RawClient(args.raw, options)
    try:
        with TrainerClient(args.target, timeout=600) as client:
            default = client.session()
            s = SideBySide(["ours", "raw"])
            s.run({"ours": default.info, "raw": raw.ping}, reps=args.pings, warmup=5)
            out["empty"], out["empty_raw"] = s.median("ours"), s.median("raw")
            out.update(_steps(args, client, raw))
    finally:
        raw.close()
    return out


def _steps(args: argparse.Namespace, client: TrainerClient, raw: RawClient) -> dict[str, Any]:
    shape = tuple(int(d) for d in args.shape.split("x"))
    rng = np.random.default_rng(0)
    x = rng.random(shape, dtype=np.float32)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    labels = rng.integers(0, 1000, shape[0])
    out: dict[str, Any] = {}
    with client.create_session("random", seed=0) as fp32, \
            client.create_session("random", seed=0, input_transform="imagenet") as uint8:
        # The first step of each (untimed): its logits against local PyTorch on the same weights.
        local, _ = build_model("random", 0, 0)
        local.train()
        normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        with torch.no_grad():
            want_fp32 = local(torch.from_numpy(x))
            want_uint8 = local(normalize(torch.from_numpy(pixels).float() / 255))
        out["logits_agree"] = max(
            logits_difference(fp32.train_step(x, "cross_entropy", labels, return_logits=True).logits, want_fp32),
            logits_difference(uint8.train_step(pixels, "cross_entropy", labels, return_logits=True).logits, want_uint8))
        out["request_fp32"], out["request_uint8"] = (
            len(core.train_step(s.session_id, batch, "cross_entropy", labels, True, False, False, client.max_message_bytes)
                .request.serialize()) for s, batch in ((fp32, x), (uint8, pixels)))
        data, pixel_data = x.tobytes(), pixels.tobytes()
        raw.timings()
        s = SideBySide(["fp32", "uint8", "raw-fp32", "raw-uint8"])
        s.run({"fp32": lambda: fp32.train_step(x, "cross_entropy", labels),
               "uint8": lambda: uint8.train_step(pixels, "cross_entropy", labels),
               "raw-fp32": lambda: raw.upload(data), "raw-uint8": lambda: raw.upload(pixel_data)},
              reps=args.step_reps, warmup=1)
        torch_times = by_order(raw.timings().get("engine.train_step", []), args.step_reps, ("fp32", "uint8"))
        for name in ("fp32", "uint8"):
            out[f"step_{name}"], out[f"step_{name}_raw"] = s.median(name), s.median(f"raw-{name}")
            out[f"step_{name}_torch"] = median(torch_times[name])
        # What uint8 saves of the transfer: the rest (wall minus the server's torch time) of fp32 less uint8's.
        rests = {name: [w - t for w, t in zip(s.times[name], torch_times[name])] for name in ("fp32", "uint8")}
        for name in ("fp32", "uint8"):
            out[f"step_{name}_rest"] = median(rests[name])
        out["step_saves"] = median([a - b for a, b in zip(rests["fp32"], rests["uint8"])])
        # The gradients the last step left, as float32 and float16.
        got: dict[str, Any] = {}
        grads = {dtype: fp32.gradients(dtype=dtype) for dtype in ("float32", "float16")}
        arrays = {dtype: {n: t.array for n, t in g.items() if t.array is not None} for dtype, g in grads.items()}
        sizes = {dtype: sum(a.nbytes for a in by_name.values()) for dtype, by_name in arrays.items()}
        worst = max(float(np.abs(arrays["float16"][n].astype(np.float32) - a).max()) / max(1e-12, float(np.abs(a).max()))
                    for n, a in arrays["float32"].items())
        g = SideBySide(["fp32", "fp16", "raw-fp32", "raw-fp16"])
        g.run({"fp32": lambda: got.update(a=fp32.gradients(dtype="float32")), "fp16": lambda: got.update(b=fp32.gradients(dtype="float16")),
               "raw-fp32": lambda: raw.download(sizes["float32"], MIB), "raw-fp16": lambda: raw.download(sizes["float16"], MIB)},
              reps=args.transfer_reps, warmup=1)
        for name, dtype in (("fp32", "float32"), ("fp16", "float16")):
            out[f"grads_{name}"], out[f"grads_{name}_raw"], out[f"grads_{name}_bytes"] = g.median(name), g.median(f"raw-{name}"), sizes[dtype]
        out["grads_saves"] = median([a - b for a, b in zip(g.times["fp32"], g.times["fp16"])])
        out["fp16_agree"] = worst
    return out


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.link_client")
    p.add_argument("--target", required=True, help="the trainer server, HOST:PORT")
    p.add_argument("--raw", required=True, help="the raw aio floor, HOST:PORT")
    p.add_argument("--peer", required=True, help="the calibration peer, HOST:PORT")
    p.add_argument("--shape", default="32x3x224x224")
    p.add_argument("--step-reps", type=int, default=5)
    p.add_argument("--transfer-reps", type=int, default=10)
    p.add_argument("--pings", type=int, default=100)
    p.add_argument("--bulk-bytes", type=int, default=50_000_000)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(measure(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
