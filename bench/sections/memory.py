"""Section ``memory``: the server process's RSS with the default session after a step and a pending
forward, with 7 more sessions in the same state, and after closing those 7 (ratio: RSS a session /
resnet18's weights, gradients and momentum); then ``--cycles`` create/step/close cycles, RSS sampled
along the way (no ratio: the growth in MiB)."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from bench.launch import Context
from bench.rows import MIB, MILLISECONDS, Figure, Layout, Row, count
from remote_trainer.client import Session, TrainerClient

MB = 1024 * 1024
MODEL_STATE_MIB = 134  # resnet18's weights, gradients and momentum in float32
SESSIONS = Layout("{one:.0f} / {eight:.0f} / {after:.0f} MiB", "model+grads+momentum {reference}",
                  "{per_session} per session; {left:+.0f} MiB left after closing")


def run(ctx: Context) -> list[Row]:
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    labels = np.ones((1, 1000), np.float32)
    server = ctx.server

    def step(session: Session) -> None:
        session.forward(x)
        session.backward("sum", labels)
        session.step()
        session.forward(x)  # and one retained graph, as a session mid-step holds

    def rss() -> Figure:
        return Figure(server.rss() / MB, MIB)

    rows: list[Row] = []
    with TrainerClient(server.target, timeout=600) as client:
        step(client.session())
        one = rss()
        sessions = [client.create_session("random", seed=i) for i in range(7)]
        for s in sessions:
            step(s)
        eight = rss()
        for s in sessions:
            s.close()
        time.sleep(0.5)
        after = rss()
        per = (eight.value - one.value) / 7
        rows.append(Row(
            "memory", "server RSS: 1 session / 8 sessions / after closing 7",
            {"one": one, "eight": eight, "after": after, "reference": Figure(MODEL_STATE_MIB, MIB),
             "per_session": Figure(per, MIB), "left": Figure(after.value - one.value, MIB)},
            per / MODEL_STATE_MIB, SESSIONS, target="closing gives it back",
        ))
        if ctx.args.cycles:
            rows.append(_cycles(ctx.args.cycles, client, step, rss))
    return rows


def _cycles(cycles: int, client: TrainerClient, step: Callable[[Session], None], rss: Callable[[], Figure]) -> Row:
    """``cycles`` sessions created, stepped and closed one after the other; RSS after the first,
    a tenth, half and all of them."""
    marks: list[tuple[int, Figure]] = []
    start = time.perf_counter()
    for i in range(1, cycles + 1):
        with client.create_session("random", seed=i) as s:
            step(s)
        if i in (1, max(1, cycles // 10), cycles // 2, cycles):
            marks.append((i, rss()))
    elapsed = time.perf_counter() - start
    since = marks[min(1, len(marks) - 1)]
    figures = {f"rss_at_{i}": r for i, r in marks}
    figures |= {"reference": marks[0][1], "growth": Figure(marks[-1][1].value - since[1].value, MIB),
                "since_cycle": count(since[0]), "cycles": count(cycles), "per_cycle": Figure(elapsed / cycles * 1000, MILLISECONDS)}
    ours = "RSS " + " ".join(f"@{i}:{{rss_at_{i}:.0f}}" for i, _ in marks) + " MiB"
    return Row("memory", f"{cycles} create/step/close cycles", figures, None,
               Layout(ours, "after 1 cycle {reference}", "growth from cycle {since_cycle} to {cycles}; {per_cycle} a cycle",
                      ratio="{growth:+.0f} MiB"),
               target="no growth")
