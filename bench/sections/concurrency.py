"""Section ``concurrency``: 1, 2, 4, 8 (``--clients``) client threads, each with its own channel
and its own session, doing steps for ``--concurrency-seconds``: aggregate steps a second (ratio to
one client), p50/p99 step latency, errors. Then ``--shared-clients`` clients on one shared session,
which refuse each other's steps by the session's rules (counted, not errors)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from bench.launch import Context
from bench.measure import percentile
from bench.rows import STEPS_PER_S, Figure, Layout, Row, count, seconds
from bench.steps import shape_name
from remote_trainer.client import TrainerClient, TrainerError

# What a client on a shared session may be refused when another client's call came between its own.
SHARED_SESSION_REFUSALS = ("STALE_FORWARD", "GRAPH_FREED", "NO_PENDING_FORWARD", "PARAMETERS_CHANGED")
OWN = "p50 {p50}, p99 {p99}, {steps} steps, errors {errors}"
SHARED = ("p50 {p50}, p99 {p99}; {refused} steps refused because another client's Forward replaced theirs or a Step "
          "changed the weights under it (STALE_FORWARD, GRAPH_FREED, PARAMETERS_CHANGED); errors {errors}")


@dataclass
class Outcome:
    """What ``n`` clients did in the time given."""

    rate: float
    latencies: list[float]
    errors: list[str] = field(default_factory=list)
    refused: int = 0

    def figures(self, base: float | None) -> dict[str, Figure]:
        return {"ours": Figure(self.rate, STEPS_PER_S), "reference": Figure(base or float("nan"), STEPS_PER_S),
                "p50": seconds(percentile(self.latencies, 50)), "p99": seconds(percentile(self.latencies, 99)),
                "steps": count(len(self.latencies)), "errors": count(len(self.errors)), "refused": count(self.refused)}

    def layout(self, note: str) -> Layout:
        return Layout("{ours}", "1 client {reference:.1f} steps/s", note + (" ({first_error})" if self.errors else ""))

    def words(self) -> dict[str, str]:
        return {"first_error": self.errors[0]} if self.errors else {}


def run(ctx: Context) -> list[Row]:
    args = ctx.args
    shape = args.concurrency_shape
    name = shape_name(shape)
    rows: list[Row] = []
    base = None
    for n in args.clients:
        r = clients_run(ctx.server.target, n, args.concurrency_seconds, shape, None)
        base = base or r.rate
        rows.append(Row("concurrency", f"{n} client(s), own sessions, {name}", r.figures(base),
                        r.rate / base if base else None, r.layout(OWN), target=">= 0.90" if n == 8 else "", words=r.words()))
    n = args.shared_clients
    r = clients_run(ctx.server.target, n, args.concurrency_seconds, shape, "default")
    rows.append(Row("concurrency", f"{n} clients, one shared session, {name}", r.figures(base),
                    r.rate / base if base else None, r.layout(SHARED), words=r.words()))
    return rows


def clients_run(target: str, n: int, seconds: float, shape: tuple[int, ...], shared: str | None) -> Outcome:
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
                            if shared and exc.reason in SHARED_SESSION_REFUSALS:
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
    return Outcome(len(flat) / elapsed, flat, errors, sum(conflicts))
