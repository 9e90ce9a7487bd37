"""Section ``link`` (only when asked for; root and ``ip``): the server and the client in two network
namespaces joined by an emulated link of each ``--links`` rate and round-trip time (bench/link.py:
netem on a veth pair where the kernel has it, else a user-space forwarder between two TUN devices).
A server of its own runs in namespace A (``ip netns exec A python -m bench.serve``), the measuring
client in B (``python -m bench.link_client``). Each figure stands against the link's own limit:
bytes / bandwidth + round trips, from the link's nominal figures; the link's calibration rows (a TCP
ping-pong, a bulk TCP receive) say what it really carries. Ratio: ours / the limit (1.0 = the
link's speed); for a TrainStep, its rest (all but the server's torch time of that step) / the
limit of its request's bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bench.launch import Context, start_server
from bench.link import ADDRESS_A, Link, LinkSpec, open_link, unavailable
from bench.rows import BYTES, RELATIVE, Figure, Layout, Row, rate, ratio, seconds
from bench.steps import shape_name

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROUND_TRIP = Layout("{ours}", "nominal {reference}", "TCP one-byte ping-pong; link made by {kind}", ratio="{ratio:.2f}x")
BULK = Layout("{ours} = {ours_rate}", "{reference} (bytes / {nominal_rate} + 1 RTT)", "raw TCP receive; the link carries "
              "{carried:.2f} of its nominal rate")
EMPTY_CALL = Layout("{ours}", "1 RTT {reference}", "raw aio unary over the link {raw}")
STEP = Layout("{ours}: torch {torch} + rest {rest}", "torch + {reference} (bytes / bandwidth + 1 RTT)",
              "request {request}; the rest is all but the server's torch time; raw aio unary of the input {raw}; "
              "logits agree with local PyTorch to {logits_agree}", ratio="{ratio:.2f}")
STEP_UINT8 = Layout("{ours}: torch {torch} + rest {rest}", "torch + {reference} (bytes / bandwidth + 1 RTT)",
                    "request {request}; raw aio unary {raw}; saves {saves} of rest a step against fp32 (the link's limit: "
                    "{limit_saves}); torch includes ToTensor+Normalize", ratio="{ratio:.2f}")
GRADIENTS = Layout("{ours} = {ours_rate}", "{reference} (bytes / bandwidth + 1 RTT)", "raw aio 1 MiB stream over the link "
                   "{raw} = {raw_rate}")
GRADIENTS_FP16 = Layout("{ours} = {ours_rate}", "{reference} (bytes / bandwidth + 1 RTT)", "raw aio 1 MiB stream over the link "
                        "{raw} = {raw_rate}; saves {saves} against float32 (the link's limit: {limit_saves}); values agree with "
                        "float32 to {fp16_agree}")


def run(ctx: Context) -> list[Row]:
    why = unavailable()
    if why:
        raise RuntimeError(why)
    args = ctx.args
    rows: list[Row] = []
    for spec in args.links:
        with open_link(spec, args.link_kind) as link, \
                start_server(args.device, 4, args.chunk_bytes, args.threads, host=ADDRESS_A,
                             prefix=tuple(link.exec_in(link.ns_a))) as server, _peer(link) as peer:
            out = _measure(ctx, link, server.target, server.raw_aio_target, peer)
        rows += _rows(ctx, link.spec, link.kind, link.how, out)
    return rows


@contextmanager
def _peer(link: Link) -> Iterator[str]:
    """The calibration peer in namespace A; yields its HOST:PORT."""
    process = subprocess.Popen([*link.exec_in(link.ns_a), sys.executable, "-m", "bench.link", "peer", "--host", ADDRESS_A],
                               cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"the link's calibration peer did not start (exit code {process.wait()})")
        yield f"{ADDRESS_A}:{json.loads(line)['port']}"
    finally:
        try:
            process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _measure(ctx: Context, link: Link, target: str, raw: str, peer: str) -> dict[str, Any]:
    """Runs the client in namespace B and returns what it measured."""
    args = ctx.args
    cmd = [*link.exec_in(link.ns_b), sys.executable, "-m", "bench.link_client", "--target", target, "--raw", raw, "--peer", peer,
           "--shape", shape_name(args.link_shape), "--step-reps", str(args.link_step_reps), "--transfer-reps", str(args.transfer_reps),
           "--pings", str(args.link_pings), "--bulk-bytes", str(args.link_bulk_bytes), "--threads", str(args.threads)]
    client = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if client.returncode != 0:
        raise RuntimeError(f"the link client failed (exit code {client.returncode}): {client.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(client.stdout.strip().splitlines()[-1])
    return result


def _rows(ctx: Context, spec: LinkSpec, kind: str, how: str, m: dict[str, Any]) -> list[Row]:
    name = f"{spec.name} ({kind})"
    nominal_rtt, bulk = spec.rtt_s, m["bulk_bytes"]
    rows = [
        Row("link", f"{name}: round trip", {"ours": seconds(m["rtt"]), "reference": seconds(nominal_rtt)},
            m["rtt"] / nominal_rtt, ROUND_TRIP, words={"kind": how}),
        Row("link", f"{name}: bulk TCP {bulk / 1e6:.0f} MB",
            {"ours": seconds(m["bulk"]), "ours_rate": rate(bulk, m["bulk"]), "reference": seconds(spec.limit(bulk)),
             "nominal_rate": Figure(spec.rate_bps / 8, "B/s"), "carried": ratio(bulk * 8 / m["bulk"] / spec.rate_bps)},
            m["bulk"] / spec.limit(bulk), BULK),
        Row("link", f"{name}: empty call DescribeSession",
            {"ours": seconds(m["empty"]), "reference": seconds(nominal_rtt), "raw": seconds(m["empty_raw"])},
            m["empty"] / nominal_rtt, EMPTY_CALL),
    ]
    shape = shape_name(ctx.args.link_shape)
    for dtype, layout in (("fp32", STEP), ("uint8", STEP_UINT8)):
        transfer = spec.limit(m[f"request_{dtype}"])
        figures = {"ours": seconds(m[f"step_{dtype}"]), "reference": seconds(transfer), "torch": seconds(m[f"step_{dtype}_torch"]),
                   "rest": seconds(m[f"step_{dtype}_rest"]), "raw": seconds(m[f"step_{dtype}_raw"]),
                   "request": Figure(m[f"request_{dtype}"], BYTES), "logits_agree": Figure(m["logits_agree"], RELATIVE)}
        if dtype == "uint8":
            figures |= {"saves": seconds(m["step_saves"]),
                        "limit_saves": seconds(spec.limit(m["request_fp32"]) - spec.limit(m["request_uint8"]))}
        rows.append(Row("link", f"{name}: TrainStep {dtype} {shape}", figures, m[f"step_{dtype}_rest"] / transfer, layout))
    for dtype, label in (("fp32", "float32"), ("fp16", "float16")):
        nbytes = m[f"grads_{dtype}_bytes"]
        figures = {"ours": seconds(m[f"grads_{dtype}"]), "ours_rate": rate(nbytes, m[f"grads_{dtype}"]),
                   "reference": seconds(spec.limit(nbytes)), "raw": seconds(m[f"grads_{dtype}_raw"]),
                   "raw_rate": rate(nbytes, m[f"grads_{dtype}_raw"])}
        if dtype == "fp16":
            figures |= {"saves": seconds(m["grads_saves"]),
                        "limit_saves": seconds(spec.limit(m["grads_fp32_bytes"]) - spec.limit(nbytes)),
                        "fp16_agree": Figure(m["fp16_agree"], RELATIVE)}
        rows.append(Row("link", f"{name}: GetGradients {label} ({nbytes / 1e6:.1f} MB)", figures,
                        m[f"grads_{dtype}"] / spec.limit(nbytes), GRADIENTS_FP16 if dtype == "fp16" else GRADIENTS))
    return rows

