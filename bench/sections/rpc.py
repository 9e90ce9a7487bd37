"""Section ``rpc``: our service against torch.distributed.rpc doing the same work on a peer process
(bench/rpc_peer.py: rank 1 of a two-process RPC group whose rank 0 is this benchmark, TCP on
loopback), and against local PyTorch: an empty call, the step as one call and as separate calls at
every ``--sizes`` shape, and the fetch of all gradients. Ratio: ours / rpc."""

from __future__ import annotations

import mmap
import sys
from typing import Any

import numpy as np
import torch

from bench import rpc_peer
from bench.launch import Context
from bench.measure import SideBySide, median
from bench.rows import BYTES, RELATIVE, Figure, Layout, Row, count, rate, ratio, seconds
from bench.steps import LocalStep, RemoteStep, difference, measure_steps, shape_name, step_inputs
from remote_trainer.client import Session, TrainerClient

EMPTY_CALL = Layout("{ours}", "{reference}", "one round trip on loopback (rpc: TensorPipe uv transport, basic channel; "
                    "torch threads on the peer: {peer_threads})")
STEP = Layout("{ours}", "rpc {reference}; PyTorch {local}",
              "reps {reps}; rpc / PyTorch {rpc_vs_local:.3f}, ours / PyTorch {ours_vs_local:.3f}; logits agree to {logits_agree}",
              ratio="{ratio:.3f}")
GRADIENTS = Layout("{ours} = {ours_rate}", "rpc {reference} = {reference_rate}", "{tensors} tensors, same bytes; values agree to {values_agree}")
SHARED = Layout("{ours} = {ours_rate}", "rpc {reference} = {reference_rate}",
                "{what}; values agree with the gRPC path to {values_agree}")
STEP_CASES = (("train-step", "TrainStep vs rpc one-call step"), ("full", "Forward/Backward/Step vs rpc forward/backward/step calls"))


class RpcStep:
    """The same step on the torch.distributed.rpc peer, on a fresh model: ``train-step`` one call
    (forward, loss, backward, step); ``full`` three calls (forward keeping the graph, backward with
    the labels, step), as our Forward/Backward/Step."""

    def __init__(self, peer: rpc_peer.Peer, case: str, device: str) -> None:
        self.peer = peer
        self.case = case
        peer.reset(device)
        self.logits: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        if self.case == "train-step":
            self.logits = self.peer.train_step(x, labels)
            return
        self.logits = self.peer.forward(x)
        self.peer.backward(labels)
        self.peer.step()


def run(ctx: Context) -> list[Row]:
    args = ctx.args
    device = torch.device(args.device)
    rows: list[Row] = []
    with rpc_peer.connect(args.threads) as peer, TrainerClient(ctx.server.target, timeout=600) as client:
        peer_threads = peer.reset(args.device)
        s = SideBySide(["ours", "rpc"])
        default = client.session()
        s.run({"ours": lambda: default.info(), "rpc": peer.empty}, reps=200, warmup=20)
        rows.append(Row("rpc", "empty call: DescribeSession vs rpc_sync of an empty function",
                        {"ours": seconds(s.median("ours")), "reference": seconds(s.median("rpc")), "peer_threads": count(peer_threads)},
                        s.paired_ratio("ours", "rpc"), EMPTY_CALL))
        for shape in args.sizes:
            x, labels = step_inputs(shape)
            xt, lt = torch.from_numpy(x), torch.from_numpy(labels)
            for case, title in STEP_CASES:
                local = LocalStep("full", device)
                theirs = RpcStep(peer, case, args.device)
                with client.create_session("random", seed=0) as session:
                    ours = RemoteStep(session, case)
                    sbs, reps, worst = measure_steps(
                        args, {"ours": lambda: ours(x, labels), "rpc": lambda: theirs(xt, lt), "local": lambda: local(xt, lt)},
                        lambda: _agreement(ours, theirs, local))
                rows.append(Row(
                    "rpc", f"{title} {shape_name(shape)}",
                    {"ours": seconds(sbs.median("ours")), "reference": seconds(sbs.median("rpc")), "local": seconds(sbs.median("local")),
                     "reps": count(reps), "rpc_vs_local": ratio(sbs.paired_ratio("rpc", "local")),
                     "ours_vs_local": ratio(sbs.paired_ratio("ours", "local")), "logits_agree": Figure(worst, RELATIVE)},
                    sbs.paired_ratio("ours", "rpc"), STEP,
                ))
        rows += _gradients(ctx, client, peer)
        rows += _through_shared_memory(ctx, client, peer)
    print(f"# rpc peer (pid {peer.pid}) exited with code {peer.returncode}", file=sys.stderr, flush=True)
    ctx.children["rpc peer"] = {"pid": peer.pid, "returncode": peer.returncode}
    return rows


def _agreement(ours: RemoteStep, theirs: RpcStep, local: LocalStep) -> float:
    """The larger difference of our and the rpc peer's logits from local PyTorch's."""
    rpc_logits = theirs.logits.numpy() if theirs.logits is not None else None
    return max(difference(ours.logits, local.logits), difference(rpc_logits, local.logits))


def _gradients(ctx: Context, client: TrainerClient, peer: rpc_peer.Peer) -> list[Row]:
    """All gradients in float32, ours (with and without statistics) against the rpc peer's, after
    one identical forward and backward on the same weights."""
    x, labels = step_inputs((2, 3, 64, 64))
    with client.create_session("random", seed=0) as session:
        peer.reset(ctx.args.device)
        session.forward(x)
        session.backward("sum", labels)
        peer.forward(torch.from_numpy(x))
        peer.backward(torch.from_numpy(labels))
        got: dict[str, Any] = {}

        def ours() -> None:
            got["ours"] = session.gradients()

        def ours_no_stats() -> None:
            got["ours"] = session.gradients(stats=False)

        def theirs() -> None:
            got["rpc"] = peer.gradients()

        sbs = SideBySide(["ours", "ours-no-stats", "rpc"])
        sbs.run({"ours": ours, "ours-no-stats": ours_no_stats, "rpc": theirs}, reps=ctx.args.transfer_reps, warmup=2)
    ours_arrays = [t.array for t in got["ours"].values() if t.array is not None]
    rpc_arrays = [g.numpy() for g in got["rpc"]]
    nbytes = sum(a.nbytes for a in ours_arrays)
    if nbytes != sum(a.nbytes for a in rpc_arrays) or [a.shape for a in ours_arrays] != [a.shape for a in rpc_arrays]:
        raise AssertionError(f"gradients differ in size: ours {nbytes} bytes, rpc {sum(a.nbytes for a in rpc_arrays)}")
    worst = max(float(np.abs(a - b).max()) / max(1.0, float(np.abs(b).max())) for a, b in zip(ours_arrays, rpc_arrays))
    rows = []
    for case, name in (("ours", "GetGradients all float32"), ("ours-no-stats", "GetGradients all float32, stats=False")):
        rows.append(Row(
            "rpc", f"{name} vs rpc fetch of all .grad ({nbytes / 1e6:.1f} MB)",
            {"ours": seconds(sbs.median(case)), "ours_rate": rate(nbytes, sbs.median(case)), "reference": seconds(sbs.median("rpc")),
             "reference_rate": rate(nbytes, sbs.median("rpc")), "tensors": count(len(rpc_arrays)), "bytes": Figure(nbytes, BYTES),
             "values_agree": Figure(worst, RELATIVE)},
            sbs.paired_ratio(case, "rpc"), GRADIENTS,
        ))
    return rows


def _through_shared_memory(ctx: Context, client: TrainerClient, peer: rpc_peer.Peer) -> list[Row]:
    """The co-located fast path (docs/shared-memory.md) against the rpc peer, side by side: all
    gradients (with statistics, and without: rpc sends none) and all parameters, float32, answered
    as views of an answer area of the session's region (no copy; each answer dropped once timed, so
    the next names the area again), against the rpc fetch of all .grad (the same bytes); then a Forward's upload of an ``--upload-shape`` batch
    written into the region (eval, no_grad, statistics only; its time less the server's model
    time), against an rpc call that sends the peer the same tensor."""
    x, labels = step_inputs((2, 3, 64, 64))
    with client.create_session("random", seed=0, shared_memory=True) as session:
        peer.reset(ctx.args.device)
        session.forward(x)  # the same gradients in the session and on the peer
        session.backward("sum", labels)
        peer.forward(torch.from_numpy(x))
        peer.backward(torch.from_numpy(labels))
        fetches = {
            "gradients": lambda: session.gradients(), "gradients-no-stats": lambda: session.gradients(stats=False),
            "parameters": lambda: session.parameters(), "rpc": peer.gradients,
        }
        sbs = SideBySide(list(fetches))
        # Each answer is dropped once timed, as by a loop that keeps only its latest: its answer
        # area is free again for the next; the rpc peer's answer is freed the same way.
        sbs.run(fetches, reps=ctx.args.transfer_reps, warmup=1)
        rpc_grads = peer.gradients()
        grpc = client.session(session.session_id)  # a handle without the region: the gRPC path
        sent = {"gradients": grpc.gradients(), "parameters": grpc.parameters()}
        agree: dict[str, float] = {}
        for name, fetch in fetches.items():  # one answer at a time, each compared with the gRPC path's
            if name == "rpc":
                continue
            got = fetch()
            same = sent["parameters" if name == "parameters" else "gradients"]
            if not all(isinstance(t.array, np.ndarray) and isinstance(t.array.base, np.ndarray)
                       and isinstance(getattr(t.array.base.base, "obj", None), mmap.mmap) for t in got.values()):
                raise AssertionError(f"{name}: the answer did not come through the region")
            agree[name] = max(float(np.abs(t.array - same[key].array).max()) for key, t in got.items())
            if name == "gradients" and [t.array.shape for t in got.values()] != [g.shape for g in rpc_grads]:
                raise AssertionError("the gradients through shared memory are not the rpc peer's shapes")
            del got
        upload_rows = _shared_memory_upload(ctx, session, peer)
    nbytes = sum(g.nbytes for g in rpc_grads)
    rows = []
    for case, title, what in (
        ("gradients", "GetGradients all float32 through shared memory (views, with statistics)",
         f"{len(rpc_grads)} tensors, same bytes"),
        ("gradients-no-stats", "GetGradients all float32 through shared memory (views, stats=False)",
         "rpc sends no statistics either"),
        ("parameters", "GetParameters all float32 through shared memory (views, with statistics)", "same bytes as the gradients"),
    ):
        rows.append(Row(
            "rpc", f"{title} vs rpc fetch of all .grad ({nbytes / 1e6:.1f} MB)",
            {"ours": seconds(sbs.median(case)), "ours_rate": rate(nbytes, sbs.median(case)), "reference": seconds(sbs.median("rpc")),
             "reference_rate": rate(nbytes, sbs.median("rpc")), "bytes": Figure(nbytes, BYTES),
             "values_agree": Figure(agree[case], RELATIVE)},
            sbs.paired_ratio(case, "rpc"), SHARED, target="<= 0.50", words={"what": what},
        ))
    return rows + upload_rows


def _shared_memory_upload(ctx: Context, session: Session, peer: rpc_peer.Peer) -> list[Row]:
    """A Forward's upload through the session's region against an rpc send of the same tensor."""
    batch = np.random.default_rng(0).random(ctx.args.upload_shape, dtype=np.float32)
    batch_t = torch.from_numpy(batch)
    plain = session._client.session(session.session_id)
    via_grpc = plain.forward(batch, eval_mode=True, no_grad=True).logits  # warms the model at the batch's shape too
    via_shm = session.forward(batch, eval_mode=True, no_grad=True).logits
    agree = float(np.abs(via_shm - via_grpc).max()) if via_shm is not None and via_grpc is not None else float("nan")
    ctx.floors.timings()  # from here, the server's model times are the shared-memory Forwards' only
    reps = ctx.args.upload_reps
    sbs = SideBySide(["upload", "rpc-upload"])
    sbs.run({"upload": lambda: session.forward(batch, eval_mode=True, no_grad=True, stats_only=True),
             "rpc-upload": lambda: peer.take(batch_t)}, reps=reps, warmup=1)
    model = ctx.floors.timings().get("engine.forward", [])[-reps:]
    rest = [w - m for w, m in zip(sbs.times["upload"], model)] if len(model) == reps else [float("nan")]
    return [Row(
        "rpc", f"Forward upload {shape_name(tuple(ctx.args.upload_shape))} fp32 through shared memory "
               f"({batch.nbytes / 1e6:.1f} MB) vs rpc send of the same tensor",
        {"ours": seconds(median(rest)), "ours_rate": rate(batch.nbytes, median(rest)), "reference": seconds(sbs.median("rpc-upload")),
         "reference_rate": rate(batch.nbytes, sbs.median("rpc-upload")), "bytes": Figure(batch.nbytes, BYTES),
         "values_agree": Figure(agree, RELATIVE)},
        median([r / t for r, t in zip(rest, sbs.times["rpc-upload"])]), SHARED, target="<= 0.50",
        words={"what": f"ours: a Forward's time less the server's model time ({median(model) * 1e3:.1f} ms); logits as via gRPC"},
    )]
