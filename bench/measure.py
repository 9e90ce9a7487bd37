"""Small timing helpers: medians, percentiles, side-by-side repetitions, the machine's load."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def percentile(xs: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of ``xs``."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))
    return s[k]


def timed(fn: Callable[[], object]) -> float:
    """Seconds ``fn()`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass
class SideBySide:
    """Durations of several contenders, run in turn within each repetition (order alternating)."""

    names: list[str]
    times: dict[str, list[float]] = field(default_factory=dict)

    def run(self, fns: dict[str, Callable[[], object]], reps: int, warmup: int) -> None:
        for _ in range(warmup):
            for name in self.names:
                fns[name]()
        for rep in range(reps):
            order = self.names if rep % 2 == 0 else list(reversed(self.names))
            for name in order:
                self.times.setdefault(name, []).append(timed(fns[name]))

    def median(self, name: str) -> float:
        return median(self.times.get(name, []))

    def paired_ratio(self, a: str, b: str) -> float:
        """Median over repetitions of time(a) / time(b): robust to load that drifts during the run."""
        return median([x / y for x, y in zip(self.times[a], self.times[b])])

    def paired_difference(self, a: str, b: str) -> float:
        """Median over repetitions of time(a) - time(b), in seconds: what ``a`` adds to ``b``."""
        return median([x - y for x, y in zip(self.times[a], self.times[b])])


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def stop_child(process: subprocess.Popen[str], timeout: float) -> None:
    """Ends a bench child process the way it expects (its stdin closed), waits for it, and kills it
    if it has not exited within ``timeout`` seconds."""
    if process.stdin is not None:
        process.stdin.close()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
