#!/usr/bin/env python
"""Soak run: N clients drive a training server for D minutes with a random mix of calls.

Each client is a thread with its own channel and session. It trains (forward of a small batch,
backward with a random loss, step), fetches gradients and parameters (in full or statistics only),
reads the session and its graph, cancels calls (a gradient stream after its first chunk, a forward
right after sending it), sends calls with a deadline too short to meet, and sends bad requests. Every
call's outcome is checked against what that kind of call may answer: a training step must succeed, a
bad request must get its client-error code, a cancelled call CANCELLED (or OK when it finished first).

The server is started here (``python -m remote_trainer.server --port 0 --weights random``) unless ``--target`` names
one; its resident memory (VmRSS) is sampled through the run when its pid is known. At the end it
prints calls by kind and status, p50/p99 latency by kind and RSS over time, and exits non-zero when
a call got an answer it should not have, the server stopped serving, or RSS after the run (sessions
closed) is more than ``--max-growth-mib`` above RSS after the warm-up.

    .venv/bin/python scripts/soak.py --clients 16 --minutes 30
    .venv/bin/python scripts/soak.py --target localhost:50051 --server-pid 1234 --minutes 5
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from remote_trainer.client import Session, TrainerClient, TrainerError
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb  # noqa: E402

MIB = 1024 * 1024
OK = "OK"
CLIENT_ERRORS = {"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED"}


def rss_of(pid: int) -> int | None:
    """VmRSS of a process in bytes, or None when it cannot be read."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) * 1024 if found else None


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str, list[str]]:
    """Starts ``python -m remote_trainer.server`` on a free port; returns the process, its target and its log tail."""
    command = [sys.executable, "-m", "remote_trainer.server", "--port", "0", "--weights", "random",
               "--max-sessions", str(args.clients + 4), *args.server_arg]
    proc = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    stderr = proc.stderr
    log: list[str] = []
    port: list[int] = []
    ready = threading.Event()

    def drain() -> None:
        for line in stderr:
            if "status=OK" not in line:  # keep the unusual lines only; the per-call lines are many
                log.append(line)
                del log[:-200]
            if not port:
                found = re.search(r"listening on \S+:(\d+)", line)
                if found:
                    port.append(int(found.group(1)))
                    ready.set()
        ready.set()

    threading.Thread(target=drain, name="server-stderr", daemon=True).start()
    if not ready.wait(300) or not port:
        proc.kill()
        sys.exit("server did not start:\n" + "".join(log))
    return proc, f"localhost:{port[0]}", log


class Recorder:
    """Outcomes of every call: status by kind, latencies, and the unexpected ones."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.statuses: Counter[tuple[str, str]] = Counter()
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.unexpected: list[str] = []

    def record(self, kind: str, status: str, seconds: float, allowed: set[str]) -> None:
        with self.lock:
            self.statuses[(kind, status)] += 1
            self.latencies[kind].append(seconds)
            if status not in allowed:
                self.unexpected.append(f"{kind}: {status}")


def status_name(exc: BaseException) -> str:
    if isinstance(exc, TrainerError):
        return exc.code.name
    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        return exc.code().name
    return f"exception {type(exc).__name__}: {exc}"


def batch(rng: np.random.Generator) -> np.ndarray:
    return rng.random((2, 3, 32, 32), dtype=np.float32)


def bad_requests(session_id: str) -> list[tuple[str, Callable[[TrainerClient], Any]]]:
    """Requests the server must refuse with a client-error code."""
    def forward(c: TrainerClient, tensor_input: pb.TensorInput) -> Any:
        return c.call(c.stub.Forward, pb.ForwardRequest(session_id=session_id, input=tensor_input))

    one_channel = pb.Tensor(shape=[2, 1, 32, 32], data_type=pb.DATA_TYPE_FLOAT32, raw_data=bytes(2 * 32 * 32 * 4))
    short_bytes = pb.Tensor(shape=[2, 3, 32, 32], data_type=pb.DATA_TYPE_FLOAT32, raw_data=bytes(10))
    too_large = pb.TensorGenerator(shape=[10**6, 3, 224, 224], distribution=pb.DISTRIBUTION_ONES)
    return [
        ("bad:shape", lambda c: forward(c, pb.TensorInput(tensor=one_channel))),
        ("bad:bytes", lambda c: forward(c, pb.TensorInput(tensor=short_bytes))),
        ("bad:too-large", lambda c: forward(c, pb.TensorInput(generate=too_large))),
        ("bad:loss", lambda c: c.call(c.stub.Backward, pb.BackwardRequest(
            session_id=session_id, loss=pb.Loss(function=9)))),  # type: ignore[arg-type]
        ("bad:optimizer", lambda c: c.call(c.stub.ConfigureOptimizer, pb.ConfigureOptimizerRequest(
            session_id=session_id, optimizer=pb.OptimizerConfig(lr=float("nan"))))),
        ("bad:pattern", lambda c: c.call(c.stub.FreezeLayers, pb.FreezeLayersRequest(session_id=session_id, patterns=["layer9.*"]))),
        ("bad:session", lambda c: c.call(c.stub.Step, pb.StepRequest(session_id="no-such-session"))),
    ]


def worker(index: int, target: str, deadline: float, recorder: Recorder, stop: threading.Event, timeout: float) -> None:
    rng = random.Random(index)
    nrng = np.random.default_rng(index)

    def timed(kind: str, allowed: set[str], fn: Callable[[], Any]) -> None:
        start = time.perf_counter()
        try:
            result = fn()
            status = result if isinstance(result, str) else OK  # a cancel says whether it took
        except (TrainerError, grpc.RpcError) as exc:
            status = status_name(exc)
        except Exception as exc:  # a broken assertion in a check, or the SDK: unexpected either way
            status = f"exception {type(exc).__name__}: {exc}"
        recorder.record(kind, status, time.perf_counter() - start, allowed)

    def train(session: Session) -> None:
        session.forward(batch(nrng), stats_only=True)
        if rng.random() < 0.5:
            session.backward("sum", nrng.random((2, 1000), dtype=np.float32))
        else:
            session.backward("cross_entropy", nrng.integers(0, 1000, 2))
        session.step()

    def cancel_stream(client: TrainerClient, session: Session) -> str:
        call = client.stub.GetGradients(pb.GetGradientsRequest(session_id=session.session_id), timeout=timeout)
        for _ in call:  # the first chunk, then walk away
            call.cancel()  # type: ignore[no-untyped-call]
            break
        try:
            for _ in call:
                pass
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise
            return "CANCELLED"
        return OK

    def cancel_forward(client: TrainerClient, session: Session) -> str:
        request = pb.ForwardRequest(session_id=session.session_id, output_format=pb.OUTPUT_FORMAT_STATS_ONLY)
        request.input.generate.CopyFrom(pb.TensorGenerator(shape=[2, 3, 32, 32], distribution=pb.DISTRIBUTION_UNIFORM, seed=index))
        future = client.stub.Forward.future(request, timeout=timeout)
        future.cancel()  # type: ignore[no-untyped-call]
        try:
            future.result()
        except grpc.FutureCancelledError:
            return "CANCELLED"
        return OK

    try:
        with TrainerClient(target, timeout=timeout) as client, client.create_session(seed=index) as session:
            bad = bad_requests(session.session_id)
            while time.monotonic() < deadline and not stop.is_set():
                roll = rng.random()
                if roll < 0.45:
                    timed("train-step", {OK}, lambda: train(session))
                elif roll < 0.55:
                    timed("gradients:fc", {OK, "FAILED_PRECONDITION"}, lambda: session.gradients("fc"))
                elif roll < 0.62:
                    timed("gradients:stats", {OK}, lambda: session.gradients(stats_only=True))
                elif roll < 0.67:
                    timed("parameters:all", {OK}, lambda: session.parameters(dtype="bfloat16"))
                elif roll < 0.72:
                    timed("describe", {OK}, session.info)
                elif roll < 0.75:
                    timed("graph", {OK, "FAILED_PRECONDITION"}, session.graph)
                elif roll < 0.80:
                    timed("cancel:stream", {OK, "CANCELLED"}, lambda: cancel_stream(client, session))
                elif roll < 0.84:
                    timed("cancel:forward", {OK, "CANCELLED"}, lambda: cancel_forward(client, session))
                elif roll < 0.88:
                    timed("deadline", {OK, "DEADLINE_EXCEEDED"}, lambda: session.gradients(timeout=0.001))
                else:
                    kind, call = rng.choice(bad)
                    timed(kind, CLIENT_ERRORS, lambda: call(client))
    except Exception as exc:  # session setup or teardown failed
        recorder.record("session", status_name(exc), 0.0, {OK})


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients, each with its own session (default 8)")
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to run (default 10)")
    parser.add_argument("--target", default="", help="host:port of a running server (default: start one here)")
    parser.add_argument("--server-pid", type=int, default=0, help="pid of the --target server, to sample its memory")
    parser.add_argument("--server-arg", action="append", default=[], help="extra flag for the server started here, as --server-arg=--max-batch=8 (repeatable)")
    parser.add_argument("--max-growth-mib", type=float, default=256.0,
                        help="most RSS growth allowed from the end of the warm-up to the end of the run (default 256)")
    parser.add_argument("--sample-seconds", type=float, default=30.0, help="how often to sample RSS and print progress")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline of each call in seconds (default 300)")
    args = parser.parse_args(argv)

    proc = None
    log: list[str] = []
    if args.target:
        target, pid = args.target, args.server_pid or None
    else:
        proc, target, log = start_server(args)
        pid = proc.pid
    print(f"soak: {args.clients} clients for {args.minutes:g} min against {target}" + (f" (server pid {pid})" if pid else ""))

    recorder = Recorder()
    stop = threading.Event()
    began = time.monotonic()
    deadline = began + args.minutes * 60
    threads = [
        threading.Thread(target=worker, args=(i, target, deadline, recorder, stop, args.timeout), name=f"soak-{i}", daemon=True)
        for i in range(args.clients)
    ]
    for t in threads:
        t.start()
    samples: list[tuple[float, int]] = []
    warm_rss: int | None = None
    try:
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(args.sample_seconds / len(threads))
            elapsed = time.monotonic() - began
            rss = rss_of(pid) if pid else None
            if rss is not None and (not samples or elapsed - samples[-1][0] >= args.sample_seconds):
                samples.append((elapsed, rss))
                # The warm-up ends after a fifth of the run: every session exists and has stepped.
                if warm_rss is None and elapsed >= args.minutes * 60 / 5:
                    warm_rss = rss
                with recorder.lock:
                    calls = sum(recorder.statuses.values())
                print(f"  {elapsed:7.0f} s  calls {calls:7d}  RSS {rss / MIB:8.0f} MiB", flush=True)
            if elapsed > args.minutes * 60 + args.timeout + 60:
                stop.set()
                print("clients did not finish in time (deadlock?)")
                recorder.unexpected.append("clients did not finish")
                break
    except KeyboardInterrupt:
        stop.set()
        print("interrupted")

    # Every session is closed by now; let the server settle, then the last sample and health.
    time.sleep(2)
    final_rss = rss_of(pid) if pid else None
    if final_rss is not None:
        samples.append((time.monotonic() - began, final_rss))
    try:
        with TrainerClient(target, timeout=30) as client:
            health = client.health()
    except TrainerError as exc:
        health = str(exc)

    print("\ncalls by kind and status:")
    for (kind, status), count in sorted(recorder.statuses.items()):
        print(f"  {kind:18s} {status:22s} {count:8d}")
    print("\nlatency by kind (seconds):")
    print(f"  {'kind':18s} {'calls':>8s} {'p50':>9s} {'p99':>9s}")
    for kind, values in sorted(recorder.latencies.items()):
        print(f"  {kind:18s} {len(values):8d} {percentile(values, 0.5):9.3f} {percentile(values, 0.99):9.3f}")
    if samples:
        print("\nserver RSS over time:")
        for elapsed, rss in samples:
            print(f"  {elapsed:7.0f} s  {rss / MIB:8.0f} MiB")

    failures = []
    if recorder.unexpected:
        kinds = Counter(recorder.unexpected)
        failures.append(f"{len(recorder.unexpected)} unexpected answers: " + ", ".join(f"{k} x{n}" for k, n in kinds.most_common(10)))
    if health != "SERVING":
        failures.append(f"health after the run: {health}")
    if warm_rss is not None and final_rss is not None:
        growth = (final_rss - warm_rss) / MIB
        print(f"\nRSS after warm-up {warm_rss / MIB:.0f} MiB, after the run {final_rss / MIB:.0f} MiB ({growth:+.0f} MiB)")
        if growth > args.max_growth_mib:
            failures.append(f"RSS grew {growth:.0f} MiB, over --max-growth-mib {args.max_growth_mib:g}")
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        if proc.returncode not in (0, -15):
            failures.append(f"server exited with {proc.returncode}")
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        if log:
            print("server log (last unusual lines):\n" + "".join(log[-30:]))
        return 1
    print("\nOK")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
