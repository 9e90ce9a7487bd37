"""The benchmark runs end to end (``python -m bench --quick``): a smoke test, never a timing assertion.

It proves every section still works against the current server and SDK; the figures themselves are
in docs/benchmarks.md, measured by hand on a quiet machine.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import SECTIONS

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_benchmark_prints_every_section(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--threads", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| section | case |" in run.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {r["section"] for r in rows} >= set(SECTIONS)
    # Remote and local PyTorch computed the same logits (the step section checks every repetition).
    for row in rows:
        if row["section"] == "step" and not row["case"].startswith("empty call"):
            agreement = float(row["note"].rsplit("logits agree to ", 1)[1])
            assert agreement < 1e-4, row
    # torch.distributed.rpc beside us: the empty call, the one-call and the separate-call step at the
    # quick size, both gradient fetches; the same logits and gradients as local PyTorch and ours,
    # and the peer process shut down cleanly.
    rpc_rows = [r for r in rows if r["section"] == "rpc"]
    assert len(rpc_rows) == 5, rpc_rows
    for row in rpc_rows[1:3]:
        assert float(row["note"].rsplit("logits agree to ", 1)[1]) < 1e-4, row
    for row in rpc_rows[3:]:
        assert "same bytes" in row["note"] and float(row["note"].rsplit("values agree to ", 1)[1]) < 1e-4, row
    assert re.search(r"# rpc peer \(pid \d+\) exited with code 0", run.stderr), run.stderr[-3000:]
    # No client with a session of its own failed. (On one shared session, clients refuse each
    # other's steps by the session's rules; the benchmark counts those refusals and reports any
    # other error, which this smoke test does not judge.)
    for row in rows:
        if row["section"] == "concurrency" and "own sessions" in row["case"]:
            assert "errors 0" in row["note"], row


@pytest.mark.slow
@pytest.mark.ray
def test_quick_benchmark_ray_section(tmp_path: Path) -> None:
    """The optional ray section (a second server with a one-node Ray of its own) runs and cleans up."""
    out = tmp_path / "rows.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--threads", "1", "--sections", "ray", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["section"] for r in rows] == ["ray"] * 3, rows
