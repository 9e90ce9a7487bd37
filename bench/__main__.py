"""``python -m bench``: the side-by-side benchmark of the training service (issue 5).

Starts the server (and the raw gRPC floor) in a subprocess on loopback, runs every section against
local PyTorch or the floor in the same run, and prints one table. Each figure is a median over
repetitions after warm-up; the ratio column is the median of per-repetition ratios, which is robust
to the machine's load drifting during the run. See docs/benchmarks.md for the latest figures.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from bench import rpc_peer
from bench.measure import SideBySide, cpu_model, load_average, median, percentile, rss_bytes, stop_child, timed
from bench.raw import MIB, RawClient
from remote_trainer.client import Session, TrainerClient, TrainerError
from remote_trainer.engine.models import build_model, head_of, new_head

SECTIONS = ("step", "grads", "upload", "concurrency", "memory", "rpc")
# Run only when asked for (--sections ...,ray): starts a second server with a Ray of its own.
OPTIONAL_SECTIONS = ("ray",)
CASES = ("full", "frozen", "client-loss", "train-step", "client-loss-2rt", "full-grad-norm")
TUTORIAL_LR, TUTORIAL_MOMENTUM = 1e-2, 0.9


@dataclass
class Row:
    """One line of the table."""

    section: str
    case: str
    ours: str
    reference: str
    ratio: str
    target: str
    note: str = ""


@dataclass
class Server:
    """The benchmark's server subprocess."""

    process: subprocess.Popen[str]
    target: str
    raw_target: str
    raw_aio_target: str
    pid: int

    def rss(self) -> int:
        return rss_bytes(self.pid)


@contextmanager
def start_server(
    device: str, max_sessions: int, chunk_bytes: int = 0, threads: int = 0, backend: str = "local", reuse_buffers_bytes: int = 0,
    pin_memory: bool = False,
) -> Iterator[Server]:
    """Runs ``python -m bench.serve`` and yields its addresses; stops it by closing its stdin."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "bench.serve", "--device", device, "--max-sessions", str(max_sessions)]
    if chunk_bytes:
        cmd += ["--chunk-bytes", str(chunk_bytes)]
    if threads:
        cmd += ["--threads", str(threads)]
    if backend != "local":
        cmd += ["--backend", backend]
    if reuse_buffers_bytes:
        cmd += ["--reuse-buffers-bytes", str(reuse_buffers_bytes)]
    if pin_memory:
        cmd += ["--pin-memory", "1"]
    process = subprocess.Popen(cmd, cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"the benchmark server did not start (exit code {process.wait()})")
        info = json.loads(line)
        yield Server(process, f"127.0.0.1:{info['trainer_port']}", f"127.0.0.1:{info['raw_port']}",
                     f"127.0.0.1:{info['raw_aio_port']}", int(info["pid"]))
    finally:
        stop_child(process, timeout=30)


@dataclass
class Floors:
    """The raw floor's two servers: ``sync`` (a threaded grpc server) and ``aio`` (grpc.aio, the
    trainer server's own stack); timings come from either (they share the recorder)."""

    sync: RawClient
    aio: RawClient

    def timings(self) -> dict[str, list[float]]:
        return self.sync.timings()


def client_options() -> list[tuple[str, Any]]:
    """The SDK's message limits, for the raw floor's channel."""
    return [("grpc.max_send_message_length", 512 * MIB), ("grpc.max_receive_message_length", 512 * MIB)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fmt_s(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1000:.1f} ms" if seconds >= 0.01 else f"{seconds * 1000:.2f} ms"


def fmt_rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e6:.0f} MB/s"


def parse_shape(text: str) -> tuple[int, int, int, int]:
    dims = tuple(int(d) for d in text.lower().replace(",", "x").split("x"))
    if len(dims) != 4:
        raise argparse.ArgumentTypeError(f"a shape is NxCxHxW, got {text!r}")
    return dims


# -- 1. training step overhead ---------------------------------------------------------------------


class LocalStep:
    """The identical step in local PyTorch: forward, the tutorial's loss, backward, SGD step."""

    def __init__(self, case: str, device: torch.device) -> None:
        model, _ = build_model("random", 0, 0)
        if case == "frozen":
            for p in model.parameters():
                p.requires_grad_(False)
            model.fc = new_head(head_of(model).in_features, 10, 0)
        self.model = model.to(device).train()
        self.device = device
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=TUTORIAL_LR, momentum=TUTORIAL_MOMENTUM)
        self.logits: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        prediction = self.model(x.to(self.device))
        loss = (prediction - labels.to(self.device)).sum()
        loss.backward()
        self.optimizer.step()
        self.logits = prediction.detach()
        sync(self.device)


class RemoteStep:
    """The same step through the server. ``full``/``frozen``: Forward, Backward (server loss), Step;
    ``client-loss``: Forward, Backward (client gradient), Step; ``train-step``: one TrainStep call;
    ``client-loss-2rt``: Forward, then Backward (client gradient) that also steps. Each Backward
    asks for no gradient norm (``grad_norm=False``), since the local step computes none either;
    ``full-grad-norm`` is ``full`` with Backward's default, the norm computed and returned."""

    def __init__(self, session: Session, case: str) -> None:
        self.session = session
        self.case = case
        self.grad_norm = case == "full-grad-norm"
        if case == "frozen":
            session.freeze("*")
            session.replace_head(10, seed=0)
        self.logits: np.ndarray | None = None

    def __call__(self, x: np.ndarray, labels: np.ndarray) -> None:
        if self.case == "train-step":
            # The local step has no zero_grad (gradients accumulate, as in the tutorial): nor has this.
            self.logits = self.session.train_step(x, "sum", labels, zero_grad=False, return_logits=True).logits
            return
        logits = self.session.forward(x).logits
        if self.case == "client-loss-2rt":
            prediction = torch.from_numpy(np.array(logits)).requires_grad_()
            (prediction - torch.from_numpy(labels)).sum().backward()  # type: ignore[no-untyped-call]
            assert prediction.grad is not None
            self.session.backward(output_gradient=prediction.grad.numpy(), step=True, grad_norm=False)
            self.logits = logits
            return
        if self.case == "client-loss":
            # The remote-nn.Module path: the client computes the loss and sends d(loss)/d(logits).
            prediction = torch.from_numpy(np.array(logits)).requires_grad_()
            (prediction - torch.from_numpy(labels)).sum().backward()  # type: ignore[no-untyped-call]
            assert prediction.grad is not None
            self.session.backward(output_gradient=prediction.grad.numpy(), grad_norm=False)
        else:
            self.session.backward("sum", labels, grad_norm=self.grad_norm)
        self.session.step()
        self.logits = logits


def bench_step(args: argparse.Namespace, server: Server, raw: Floors, rows: list[Row]) -> None:
    device = torch.device(args.device)
    # An empty call on each side, for scale: what one round trip costs.
    with TrainerClient(server.target, timeout=600) as client:
        s = SideBySide(["ours", "raw-aio", "raw"])
        default = client.session()
        s.run({"ours": lambda: default.info(), "raw-aio": raw.aio.ping, "raw": raw.sync.ping}, reps=200, warmup=20)
        rows.append(Row("step", "empty call: DescribeSession vs raw aio unary", fmt_s(s.median("ours")), fmt_s(s.median("raw-aio")),
                        f"{s.paired_ratio('ours', 'raw-aio'):.2f}", "",
                        f"one round trip on loopback; raw sync-server unary {fmt_s(s.median('raw'))}"))
        for shape in args.sizes:
            classes = 10
            for case in args.cases:
                classes = 10 if case == "frozen" else 1000
                rng = np.random.default_rng(0)
                x = rng.random(shape, dtype=np.float32)
                labels = rng.random((shape[0], classes), dtype=np.float32)
                xt, lt = torch.from_numpy(x), torch.from_numpy(labels)
                local = LocalStep(case, device)
                with client.create_session("random", seed=0) as session:
                    remote = RemoteStep(session, case)
                    def both() -> None:
                        remote(x, labels)
                        local(xt, lt)

                    first = timed(both)
                    worst = _difference(remote.logits, local.logits)
                    reps = max(args.min_reps, min(args.reps, int(args.seconds_per_case / max(first, 1e-3))))
                    raw.timings()
                    sbs = SideBySide(["remote", "local"])
                    check: list[float] = []

                    def remote_step() -> None:
                        remote(x, labels)

                    def local_step() -> None:
                        local(xt, lt)

                    sbs.run({"remote": remote_step, "local": local_step}, reps=reps, warmup=max(0, args.warmup - 1))
                    check.append(_difference(remote.logits, local.logits))
                    engine = raw.timings()
                    worst = max([worst, *check])
                torch_time = _engine_step_time(engine, args.warmup - 1 + reps)
                remote_med, local_med = sbs.median("remote"), sbs.median("local")
                small = "<= 1.03" if case == "train-step" else "<= 1.08" if case in ("full", "frozen", "client-loss") else ""
                target = small if shape == (1, 3, 64, 64) else "<= 1.02" if shape == (32, 3, 224, 224) else ""
                name = "x".join(map(str, shape))
                rows.append(Row(
                    "step", f"{case} {name}", fmt_s(remote_med), fmt_s(local_med),
                    f"{sbs.paired_ratio('remote', 'local'):.3f}", target,
                    f"reps {reps}; server torch {fmt_s(torch_time)}, rest {fmt_s(remote_med - torch_time)}; "
                    f"logits agree to {worst:.1e}",
                ))


def _difference(remote: np.ndarray | None, local: torch.Tensor | None) -> float:
    """Largest difference between remote and local logits, relative to the logits' scale."""
    if remote is None or local is None:
        return float("nan")
    expected = local.cpu().numpy()
    return float(np.abs(remote - expected).max() / max(1.0, float(np.abs(expected).max())))


def _engine_step_time(engine: dict[str, list[float]], count: int) -> float:
    """Median over the measured steps of the server's torch time (forward + backward + step, or
    train_step; a Backward that also steps counts in backward)."""
    parts = [engine[f"engine.{m}"][-count:] for m in ("forward", "backward", "step", "train_step") if engine.get(f"engine.{m}")]
    if not parts:
        return float("nan")
    n = min(len(p) for p in parts)
    if n == 0:
        return float("nan")
    return median([sum(p[-i] for p in parts) for i in range(1, n + 1)])


# -- 2. gradient fetch -----------------------------------------------------------------------------


def bench_grads(args: argparse.Namespace, server: Server, raw: Floors, rows: list[Row]) -> None:
    with TrainerClient(server.target, timeout=600) as client, client.create_session("random", seed=0) as session:
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

            sbs = SideBySide(["ours", "ours-no-stats", "raw-aio", "raw", "copy"])
            sbs.run({"ours": ours, "ours-no-stats": ours_no_stats, "raw-aio": functools.partial(raw.aio.download, nbytes, MIB),
                     "raw": functools.partial(raw.sync.download, nbytes, MIB), "copy": lambda: np.copyto(dest, source)},
                    reps=args.transfer_reps, warmup=2)
            assert sum(t.array.nbytes for t in got["grads"].values() if t.array is not None) == fp32_bytes * size // 4
            rows.append(Row(
                "grads", f"GetGradients all {dtype} ({nbytes / 1e6:.1f} MB)",
                f"{fmt_s(sbs.median('ours'))} = {fmt_rate(nbytes, sbs.median('ours'))}",
                f"raw aio 1 MiB stream {fmt_s(sbs.median('raw-aio'))} = {fmt_rate(nbytes, sbs.median('raw-aio'))}",
                f"{sbs.paired_ratio('raw-aio', 'ours'):.2f}", ">= 0.80",
                f"raw sync-server stream {fmt_s(sbs.median('raw'))} = {fmt_rate(nbytes, sbs.median('raw'))} "
                f"(ratio {sbs.paired_ratio('raw', 'ours'):.2f}); "
                f"memory copy {fmt_s(sbs.median('copy'))} = {fmt_rate(nbytes, sbs.median('copy'))}",
            ))
            rows.append(Row(
                "grads", f"GetGradients all {dtype}, stats=False ({nbytes / 1e6:.1f} MB)",
                f"{fmt_s(sbs.median('ours-no-stats'))} = {fmt_rate(nbytes, sbs.median('ours-no-stats'))}",
                f"raw aio 1 MiB stream {fmt_s(sbs.median('raw-aio'))}",
                f"{sbs.paired_ratio('raw-aio', 'ours-no-stats'):.2f}", ">= 0.80",
                f"ratio to the raw sync-server stream {sbs.paired_ratio('raw', 'ours-no-stats'):.2f}",
            ))
        _bench_stats_only(args, session, rows)


def _bench_stats_only(args: argparse.Namespace, session: Session, rows: list[Row]) -> None:
    """Statistics-only GetGradients against one fused local pass over gradients of the same sizes."""
    local, _ = build_model("random", 0, 0)
    local.train()
    local(torch.rand(2, 3, 64, 64)).sum().backward()
    grads = [p.grad for p in local.parameters() if p.grad is not None]
    nbytes = sum(g.numel() * 4 for g in grads)

    def fused() -> None:
        torch.stack(torch._foreach_norm(grads)).tolist()

    def naive() -> None:  # norm, min, max, mean, one reduction and one host sync each, tensor by tensor
        for g in grads:
            [float(g.norm()), float(g.min()), float(g.max()), float(g.mean())]

    sbs = SideBySide(["ours", "fused", "naive"])
    sbs.run({"ours": lambda: session.gradients(stats_only=True), "fused": fused, "naive": naive},
            reps=args.transfer_reps, warmup=2)
    rows.append(Row(
        "grads", f"statistics-only GetGradients ({nbytes / 1e6:.1f} MB of gradients)", fmt_s(sbs.median("ours")),
        f"one local fused pass (torch._foreach_norm) {fmt_s(sbs.median('fused'))}",
        f"{sbs.paired_ratio('ours', 'fused'):.1f}x", "<= 3x",
        f"local norm/min/max/mean tensor by tensor {fmt_s(sbs.median('naive'))}",
    ))


# -- 3. input upload -------------------------------------------------------------------------------


def bench_upload(args: argparse.Namespace, server: Server, raw: Floors, rows: list[Row]) -> None:
    shape = args.upload_shape
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    data = x.tobytes()
    local, _ = build_model("random", 0, 0)
    local.eval()
    xt = torch.from_numpy(x)
    with TrainerClient(server.target, timeout=600) as client, client.create_session("random", seed=0) as session:

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
    decode = median([h - e for h, e in zip(handler, engine)])
    nbytes = len(data)
    ratio = median([r / t for r, t in zip(sbs.times["raw-aio"], transport)])
    ratio_sync = median([r / t for r, t in zip(sbs.times["raw"], transport)])
    name = "x".join(map(str, shape))
    rows.append(Row(
        "upload", f"Forward {name} fp32 ({nbytes / 1e6:.1f} MB), eval no_grad",
        f"{fmt_s(median(walls))}: model {fmt_s(median(engine))} + rest {fmt_s(median(transport))} = {fmt_rate(nbytes, median(transport))}",
        f"raw aio unary {fmt_s(sbs.median('raw-aio'))} = {fmt_rate(nbytes, sbs.median('raw-aio'))}",
        f"{ratio:.2f}", ">= 0.80",
        f"server decode+checks {fmt_s(decode)}; raw sync-server unary {fmt_s(sbs.median('raw'))} (ratio {ratio_sync:.2f}); "
        f"raw aio 1 MiB client stream {fmt_rate(nbytes, sbs.median('raw-stream'))}; "
        f"local forward {fmt_s(sbs.median('local'))}",
    ))


# -- 4. concurrency --------------------------------------------------------------------------------


def _clients_run(target: str, n: int, seconds: float, shape: tuple[int, ...], shared: str | None) -> dict[str, Any]:
    """``n`` client threads, each with its own channel and (unless ``shared``) its own session, doing steps."""
    latencies: list[list[float]] = [[] for _ in range(n)]
    errors: list[str] = []
    conflicts = [0] * n
    ready = threading.Barrier(n + 1)
    stop_at = [0.0]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    labels = np.ones((shape[0], 1000), np.float32)

    def worker(i: int) -> None:
        try:
            options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own
            with TrainerClient(target, timeout=600, options=options) as client:
                session = client.session(shared) if shared else client.create_session("random", seed=i)
                try:
                    if not shared:  # warm-up (on a shared session another client's forward could intervene)
                        session.forward(x)
                        session.backward("sum", labels)
                        session.step()
                    ready.wait()
                    while time.perf_counter() < stop_at[0]:
                        start = time.perf_counter()
                        try:
                            fid = session.forward(x, stats_only=True).forward_id
                            session.backward("sum", labels, forward_id=fid)
                            session.step()
                        except TrainerError as exc:
                            if shared and exc.reason in ("STALE_FORWARD", "GRAPH_FREED", "NO_PENDING_FORWARD", "PARAMETERS_CHANGED"):
                                conflicts[i] += 1  # another client's forward replaced ours: the session's rule
                                continue
                            raise
                        latencies[i].append(time.perf_counter() - start)
                finally:
                    if not shared:
                        session.close()
        except BaseException as exc:  # noqa: BLE001 - reported in the table
            errors.append(f"{type(exc).__name__}: {exc}")
            if not ready.broken:
                ready.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    try:
        stop_at[0] = time.perf_counter() + 3600
        ready.wait()
        start = time.perf_counter()
        stop_at[0] = start + seconds
    except threading.BrokenBarrierError:
        start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    flat = [x for per in latencies for x in per]
    return {"steps": len(flat), "rate": len(flat) / elapsed, "p50": percentile(flat, 50), "p99": percentile(flat, 99),
            "errors": errors, "conflicts": sum(conflicts)}


def bench_concurrency(args: argparse.Namespace, server: Server, raw: Floors, rows: list[Row]) -> None:
    shape = args.concurrency_shape
    name = "x".join(map(str, shape))
    base = None
    for n in args.clients:
        r = _clients_run(server.target, n, args.concurrency_seconds, shape, None)
        base = base or r["rate"]
        rows.append(Row(
            "concurrency", f"{n} client(s), own sessions, {name}", f"{r['rate']:.1f} steps/s",
            f"1 client {base:.1f} steps/s", f"{r['rate'] / base:.2f}", ">= 0.90" if n == 8 else "",
            f"p50 {fmt_s(r['p50'])}, p99 {fmt_s(r['p99'])}, {r['steps']} steps, errors {len(r['errors'])}"
            + (f" ({r['errors'][0]})" if r["errors"] else ""),
        ))
    n = args.shared_clients
    r = _clients_run(server.target, n, args.concurrency_seconds, shape, "default")
    rows.append(Row(
        "concurrency", f"{n} clients, one shared session, {name}", f"{r['rate']:.1f} steps/s",
        f"1 client {base:.1f} steps/s", f"{r['rate'] / base:.2f}" if base else "-", "",
        f"p50 {fmt_s(r['p50'])}, p99 {fmt_s(r['p99'])}; {r['conflicts']} steps refused because another client's "
        f"Forward replaced theirs or a Step changed the weights under it (STALE_FORWARD, GRAPH_FREED, PARAMETERS_CHANGED); errors {len(r['errors'])}"
        + (f" ({r['errors'][0]})" if r["errors"] else ""),
    ))


# -- 5. memory -------------------------------------------------------------------------------------


def bench_memory(args: argparse.Namespace, server: Server, raw: Floors, rows: list[Row]) -> None:
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    labels = np.ones((1, 1000), np.float32)
    mb = 1024 * 1024

    def step(session: Session) -> None:
        session.forward(x)
        session.backward("sum", labels)
        session.step()
        session.forward(x)  # and one retained graph, as a session mid-step holds

    with TrainerClient(server.target, timeout=600) as client:
        step(client.session())
        one = server.rss()
        sessions = [client.create_session("random", seed=i) for i in range(7)]
        for s in sessions:
            step(s)
        eight = server.rss()
        for s in sessions:
            s.close()
        time.sleep(0.5)
        after = server.rss()
        per = (eight - one) / 7
        rows.append(Row(
            "memory", "server RSS: 1 session / 8 sessions / after closing 7", f"{one / mb:.0f} / {eight / mb:.0f} / {after / mb:.0f} MiB",
            "model+grads+momentum 134 MiB", f"{per / (134 * mb):.2f}", "closing gives it back",
            f"{per / mb:.0f} MiB per session; {(after - one) / mb:+.0f} MiB left after closing",
        ))
        if args.cycles:
            marks: list[tuple[int, int]] = []
            start = time.perf_counter()
            for i in range(1, args.cycles + 1):
                with client.create_session("random", seed=i) as s:
                    step(s)
                if i in (1, max(1, args.cycles // 10), args.cycles // 2, args.cycles):
                    marks.append((i, server.rss()))
            elapsed = time.perf_counter() - start
            first = marks[0][1]
            growth = marks[-1][1] - marks[min(1, len(marks) - 1)][1]
            rows.append(Row(
                "memory", f"{args.cycles} create/step/close cycles", f"RSS {' '.join(f'@{i}:{r / mb:.0f}' for i, r in marks)} MiB",
                f"after 1 cycle {first / mb:.0f} MiB", f"{growth / mb:+.0f} MiB", "no growth",
                f"growth from cycle {marks[min(1, len(marks) - 1)][0]} to {args.cycles}; {elapsed / args.cycles * 1000:.0f} ms a cycle",
            ))


# -- 6. the Ray hop -------------------------------------------------------------------------------


def bench_ray(args: argparse.Namespace, server: Server, raw: RawClient, rows: list[Row]) -> None:
    """The same step and gradient fetch on a session held by a Ray actor (a one-node Ray started by
    a second server) side by side with a session of the local backend and with local PyTorch."""
    with start_server(args.device, 4, args.chunk_bytes, args.threads, backend="ray") as ray_server, \
            TrainerClient(server.target, timeout=600) as client, TrainerClient(ray_server.target, timeout=600) as ray_client:
        # The Ray server's default session: one actor reserving as many CPUs as torch has threads
        # here, which is all a small machine has (a second session would wait for CPUs).
        on_ray = ray_client.session()
        s = SideBySide(["ray", "local"])
        s.run({"ray": on_ray.info, "local": client.session().info}, reps=args.transfer_reps * 10, warmup=5)
        rows.append(Row("ray", "empty call: DescribeSession, ray vs local backend", fmt_s(s.median("ray")),
                        fmt_s(s.median("local")), f"{s.paired_ratio('ray', 'local'):.2f}", "",
                        f"one actor call adds {fmt_s(s.median('ray') - s.median('local'))}"))
        with client.create_session("random", seed=0) as on_local:
            for shape in args.ray_sizes:
                rng = np.random.default_rng(0)
                x, labels = rng.random(shape, dtype=np.float32), rng.random((shape[0], 1000), dtype=np.float32)
                ray_step, local_step, torch_step = RemoteStep(on_ray, "full"), RemoteStep(on_local, "full"), LocalStep("full", torch.device(args.device))
                xt, lt = torch.from_numpy(x), torch.from_numpy(labels)
                first = timed(lambda: ray_step(x, labels))
                reps = max(args.min_reps, min(args.reps, int(args.seconds_per_case / 3 / max(first, 1e-3))))
                sbs = SideBySide(["ray", "local", "pytorch"])
                sbs.run({"ray": lambda: ray_step(x, labels), "local": lambda: local_step(x, labels),
                         "pytorch": lambda: torch_step(xt, lt)}, reps=reps, warmup=max(0, args.warmup - 1))
                name = "x".join(map(str, shape))
                extra = sbs.median("ray") - sbs.median("local")
                rows.append(Row(
                    "ray", f"step full {name}: ray / local backend", fmt_s(sbs.median("ray")),
                    f"local backend {fmt_s(sbs.median('local'))}; PyTorch {fmt_s(sbs.median('pytorch'))}",
                    f"{sbs.paired_ratio('ray', 'local'):.3f}", "",
                    f"reps {reps}; ray / PyTorch {sbs.paired_ratio('ray', 'pytorch'):.3f}; the hop adds {fmt_s(extra)} "
                    f"a step (3 actor calls, input {x.nbytes / 1e6:.1f} MB through the object store)",
                ))
            for session in (on_ray, on_local):  # gradients to fetch
                session.forward(np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32))
                session.backward("sum", np.ones((2, 1000), np.float32))
            nbytes = on_local.list_parameters().total_elements * 4
            sbs = SideBySide(["ray", "local"])
            sbs.run({"ray": lambda: on_ray.gradients(), "local": lambda: on_local.gradients()}, reps=args.transfer_reps, warmup=2)
            rows.append(Row(
                "ray", f"GetGradients all float32 ({nbytes / 1e6:.1f} MB): ray / local backend",
                f"{fmt_s(sbs.median('ray'))} = {fmt_rate(nbytes, sbs.median('ray'))}",
                f"local backend {fmt_s(sbs.median('local'))} = {fmt_rate(nbytes, sbs.median('local'))}",
                f"{sbs.paired_ratio('ray', 'local'):.2f}", "",
                f"the hop adds {fmt_s(sbs.median('ray') - sbs.median('local'))} (gradients copied into the object store once, "
                "read by the front-end without a copy)",
            ))


# -- 7. torch.distributed.rpc: the peer a user would pick instead ----------------------------------


class RpcStep:
    """The same step on the torch.distributed.rpc peer (bench/rpc_peer.py, TCP on loopback), on a
    fresh model: ``train-step`` one call (forward, loss, backward, step); ``full`` three calls
    (forward keeping the graph, backward with the labels, step), as our Forward/Backward/Step."""

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


def bench_rpc(args: argparse.Namespace, server: Server, raw: Floors, rows: list[Row]) -> None:
    """Our service against torch.distributed.rpc doing the same work on a peer process (rank 1 of a
    two-process RPC group whose rank 0 is this benchmark), and against local PyTorch."""
    device = torch.device(args.device)
    with rpc_peer.connect(args.threads) as peer, TrainerClient(server.target, timeout=600) as client:
        peer_threads = peer.reset(args.device)
        s = SideBySide(["ours", "rpc"])
        default = client.session()
        s.run({"ours": lambda: default.info(), "rpc": peer.empty}, reps=200, warmup=20)
        rows.append(Row("rpc", "empty call: DescribeSession vs rpc_sync of an empty function", fmt_s(s.median("ours")),
                        fmt_s(s.median("rpc")), f"{s.paired_ratio('ours', 'rpc'):.2f}", "",
                        f"one round trip on loopback (rpc: TensorPipe uv transport, basic channel; torch threads on the "
                        f"peer: {peer_threads})"))
        for shape in args.sizes:
            rng = np.random.default_rng(0)
            x = rng.random(shape, dtype=np.float32)
            labels = rng.random((shape[0], 1000), dtype=np.float32)
            xt, lt = torch.from_numpy(x), torch.from_numpy(labels)
            name = "x".join(map(str, shape))
            for case, title in (("train-step", "TrainStep vs rpc one-call step"),
                                ("full", "Forward/Backward/Step vs rpc forward/backward/step calls")):
                local = LocalStep("full", device)
                theirs = RpcStep(peer, case, args.device)
                with client.create_session("random", seed=0) as session:
                    ours = RemoteStep(session, case)

                    def ours_step() -> None:
                        ours(x, labels)

                    def rpc_step() -> None:
                        theirs(xt, lt)

                    def local_step() -> None:
                        local(xt, lt)

                    def all_three() -> None:
                        ours_step()
                        rpc_step()
                        local_step()

                    first = timed(all_three)
                    worst = _agreement(ours, theirs, local)
                    reps = max(args.min_reps, min(args.reps, int(args.seconds_per_case / max(first, 1e-3))))
                    sbs = SideBySide(["ours", "rpc", "local"])
                    sbs.run({"ours": ours_step, "rpc": rpc_step, "local": local_step}, reps=reps,
                            warmup=max(0, args.warmup - 1))
                    worst = max(worst, _agreement(ours, theirs, local))
                rows.append(Row(
                    "rpc", f"{title} {name}", fmt_s(sbs.median("ours")),
                    f"rpc {fmt_s(sbs.median('rpc'))}; PyTorch {fmt_s(sbs.median('local'))}",
                    f"{sbs.paired_ratio('ours', 'rpc'):.3f}", "",
                    f"reps {reps}; rpc / PyTorch {sbs.paired_ratio('rpc', 'local'):.3f}, ours / PyTorch "
                    f"{sbs.paired_ratio('ours', 'local'):.3f}; logits agree to {worst:.1e}",
                ))
        _bench_rpc_gradients(args, client, peer, rows)
    print(f"# rpc peer (pid {peer.pid}) exited with code {peer.returncode}", file=sys.stderr, flush=True)


def _agreement(ours: RemoteStep, theirs: RpcStep, local: LocalStep) -> float:
    """The larger difference of our and the rpc peer's logits from local PyTorch's."""
    rpc_logits = theirs.logits.numpy() if theirs.logits is not None else None
    return max(_difference(ours.logits, local.logits), _difference(rpc_logits, local.logits))


def _bench_rpc_gradients(args: argparse.Namespace, client: TrainerClient, peer: rpc_peer.Peer, rows: list[Row]) -> None:
    """All gradients in float32, ours (with and without statistics) against the rpc peer's, after
    one identical forward and backward on the same weights."""
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, 64, 64), dtype=np.float32)
    labels = rng.random((2, 1000), dtype=np.float32)
    with client.create_session("random", seed=0) as session:
        peer.reset(args.device)
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
        sbs.run({"ours": ours, "ours-no-stats": ours_no_stats, "rpc": theirs}, reps=args.transfer_reps, warmup=2)
    ours_arrays = [t.array for t in got["ours"].values() if t.array is not None]
    rpc_arrays = [g.numpy() for g in got["rpc"]]
    nbytes = sum(a.nbytes for a in ours_arrays)
    if nbytes != sum(a.nbytes for a in rpc_arrays) or [a.shape for a in ours_arrays] != [a.shape for a in rpc_arrays]:
        raise AssertionError(f"gradients differ in size: ours {nbytes} bytes, rpc {sum(a.nbytes for a in rpc_arrays)}")
    worst = max(float(np.abs(a - b).max()) / max(1.0, float(np.abs(b).max())) for a, b in zip(ours_arrays, rpc_arrays))
    for case, name in (("ours", "GetGradients all float32"), ("ours-no-stats", "GetGradients all float32, stats=False")):
        rows.append(Row(
            "rpc", f"{name} vs rpc fetch of all .grad ({nbytes / 1e6:.1f} MB)",
            f"{fmt_s(sbs.median(case))} = {fmt_rate(nbytes, sbs.median(case))}",
            f"rpc {fmt_s(sbs.median('rpc'))} = {fmt_rate(nbytes, sbs.median('rpc'))}",
            f"{sbs.paired_ratio(case, 'rpc'):.2f}", "",
            f"{len(rpc_arrays)} tensors, same bytes; values agree to {worst:.1e}",
        ))


# -- the command -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS + OPTIONAL_SECTIONS)} (default: all but ray)")
    p.add_argument("--sizes", type=lambda s: [parse_shape(t) for t in s.split(",")],
                   default=[(1, 3, 64, 64), (8, 3, 224, 224), (32, 3, 224, 224)], help="step input shapes, NxCxHxW,...")
    p.add_argument("--ray-sizes", type=lambda s: [parse_shape(t) for t in s.split(",")],
                   default=[(1, 3, 64, 64), (32, 3, 224, 224)], help="step input shapes of the ray section")
    p.add_argument("--cases", type=lambda s: s.split(","), default=list(CASES), help=f"step cases, a subset of {','.join(CASES)}")
    p.add_argument("--reps", type=int, default=30, help="most measured repetitions of a step case")
    p.add_argument("--min-reps", type=int, default=5, help="fewest measured repetitions of a step case")
    p.add_argument("--seconds-per-case", type=float, default=20.0, help="time budget of a step case (sets the repetitions)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured repetitions first")
    p.add_argument("--transfer-reps", type=int, default=15, help="repetitions of the gradient and upload figures")
    p.add_argument("--upload-shape", type=parse_shape, default=(32, 3, 224, 224))
    p.add_argument("--upload-reps", type=int, default=8, help="repetitions of the upload figure (each runs the model)")
    p.add_argument("--clients", type=lambda s: [int(t) for t in s.split(",")], default=[1, 2, 4, 8])
    p.add_argument("--shared-clients", type=int, default=4)
    p.add_argument("--concurrency-shape", type=parse_shape, default=(1, 3, 64, 64))
    p.add_argument("--concurrency-seconds", type=float, default=10.0)
    p.add_argument("--cycles", type=int, default=1000, help="create/step/close cycles of the memory section (0: none)")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where the server and the local reference run")
    p.add_argument("--chunk-bytes", type=int, default=0, help="the server's stream chunk size (0: its default, 1 MiB)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads on both sides (0: torch's default, one per core)")
    p.add_argument("--reuse-buffers-bytes", type=int, default=0, help="the server's --reuse-buffers-bytes (0: its default, off)")
    p.add_argument("--pin-memory", action="store_true", help="the server with --pin-memory 1 (pinned host buffers; CUDA only)")
    p.add_argument("--json", default="", help="also write the rows to this file")
    p.add_argument("--quick", action="store_true", help="a tiny run that only proves every section works (CI smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.reps, args.min_reps, args.warmup, args.transfer_reps = [(2, 3, 64, 64)], 2, 2, 1, 2
        args.ray_sizes = [(2, 3, 64, 64)]
        args.upload_reps = 2
        args.upload_shape, args.clients, args.shared_clients = (2, 3, 64, 64), [1, 2], 2
        args.concurrency_seconds, args.cycles, args.seconds_per_case = 0.5, 3, 1.0
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = set(args.sections) - set(SECTIONS + OPTIONAL_SECTIONS) or set(args.cases) - set(CASES)
    if unknown:
        p.error(f"unknown section or case: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The benchmark runs in a worker thread, as the server runs each call: glibc gives the main
    # thread an arena that it trims back to the OS after every step, so torch in the main thread
    # page-faults its activations in again each time (measured here: 2x slower under load, 3-6x
    # the page faults), which would compare allocators, not the service.
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(_run(args)), name="bench")
    worker.start()
    worker.join()
    return result[0] if result else 1


def _run(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[Row] = []
    header = (f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__} "
              f"({torch.get_num_threads()} threads); device {args.device}{' (server --pin-memory 1)' if args.pin_memory else ''}; "
              f"load average before: {load_average()}")
    print(header, flush=True)
    max_sessions = max(16, max(args.clients, default=1) + 2)
    with start_server(args.device, max_sessions, args.chunk_bytes, args.threads, reuse_buffers_bytes=args.reuse_buffers_bytes,
                      pin_memory=args.pin_memory) as server:
        raw = Floors(RawClient(server.raw_target, client_options()), RawClient(server.raw_aio_target, client_options()))
        try:
            for section in SECTIONS + OPTIONAL_SECTIONS:
                if section in args.sections:
                    started = time.perf_counter()
                    runners: dict[str, Callable[..., None]] = {
                        "step": bench_step, "grads": bench_grads, "upload": bench_upload, "concurrency": bench_concurrency,
                        "memory": bench_memory, "rpc": bench_rpc, "ray": bench_ray}
                    runners[section](args, server, raw, rows)
                    print(f"# {section} done in {time.perf_counter() - started:.0f} s (load {load_average()})",
                          file=sys.stderr, flush=True)
        finally:
            raw.sync.close()
            raw.aio.close()
    print("| section | case | ours | reference | ratio | target | note |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r.section} | {r.case} | {r.ours} | {r.reference} | {r.ratio} | {r.target} | {r.note} |")
    print(f"# load average after: {load_average()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
