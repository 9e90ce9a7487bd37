"""Many sessions from one event loop with the asyncio SDK: one session's upload overlaps another's compute.

A small hyperparameter sweep: K sessions, each training S steps on its own data (zero_grad, forward,
backward from a cross-entropy loss, step). First one session after the other with the sync SDK
(each call waits for the server before the next is sent), then all at once from one event loop with
``AsyncTrainerClient``: while the server computes one session's step, the next session's batch is
already on its way, and the server runs sessions on separate worker threads. Both runs do the same
work with the same seeds, so their losses are identical: only the wall time differs.

    python examples/overlap.py --target localhost:50051 --sessions 4 --steps 5

Prints both times and the gain; exits 1 if the losses of the two runs differ.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import numpy as np

from remote_trainer.client import TrainerClient
from remote_trainer.client.aio import AsyncTrainerClient


def batch(session: int, step: int, size: int, n: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """The data of one step of one session: uniform images and class labels, seeded by both."""
    rng = np.random.default_rng([session, step])
    return rng.random((n, 3, size, size), dtype=np.float32), rng.integers(0, 1000, n)


def sequential(args: argparse.Namespace) -> list[list[float]]:
    """Every session in turn with the sync SDK."""
    losses = []
    with TrainerClient(args.target, timeout=600) as client:
        for k in range(args.sessions):
            with client.create_session("random", seed=0) as session:
                mine = []
                for s in range(args.steps):
                    x, y = batch(k, s, args.size, args.batch)
                    session.zero_grad()
                    session.forward(x, stats_only=True)
                    mine.append(session.backward("cross_entropy", y).loss or 0.0)
                    session.step()
                losses.append(mine)
    return losses


async def concurrent(args: argparse.Namespace) -> list[list[float]]:
    """All sessions at once from one event loop with the asyncio SDK."""
    async with AsyncTrainerClient(args.target, timeout=600) as client:

        async def train(k: int) -> list[float]:
            async with await client.create_session("random", seed=0) as session:
                mine = []
                for s in range(args.steps):
                    x, y = batch(k, s, args.size, args.batch)
                    await session.zero_grad()
                    await session.forward(x, stats_only=True)
                    mine.append((await session.backward("cross_entropy", y)).loss or 0.0)
                    await session.step()
                return mine

        return list(await asyncio.gather(*(train(k) for k in range(args.sessions))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="localhost:50051")
    parser.add_argument("--sessions", type=int, default=4, help="sessions trained at once (default: 4)")
    parser.add_argument("--steps", type=int, default=5, help="steps per session (default: 5)")
    parser.add_argument("--batch", type=int, default=8, help="images per step (default: 8)")
    parser.add_argument("--size", type=int, default=64, help="image height and width (default: 64)")
    args = parser.parse_args()
    steps = args.sessions * args.steps
    print(f"{args.sessions} sessions x {args.steps} steps, batch {args.batch}x3x{args.size}x{args.size}, server {args.target}")

    started = time.perf_counter()
    one_by_one = sequential(args)
    seq_seconds = time.perf_counter() - started
    print(f"sync SDK, one session after another:   {seq_seconds:7.2f} s  ({steps / seq_seconds:.2f} steps/s)")

    started = time.perf_counter()
    together = asyncio.run(concurrent(args))
    async_seconds = time.perf_counter() - started
    print(f"async SDK, all sessions from one loop:  {async_seconds:7.2f} s  ({steps / async_seconds:.2f} steps/s)")
    print(f"gain: {seq_seconds / async_seconds:.2f}x less wall time")
    same = one_by_one == together
    print(f"losses of the two runs identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
