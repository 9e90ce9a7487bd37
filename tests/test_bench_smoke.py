"""The benchmark runs end to end (``python -m bench --quick``): a smoke test, never a timing assertion.

It proves every section still works against the current server and SDK; the figures themselves are
in docs/benchmarks.md, measured by hand on a quiet machine. It reads the rows ``--json`` writes:
numbers with units, never the printed text.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.harness import SECTIONS
from bench.link import unavailable
from bench.rows import MIB, Figure, Layout, Row, seconds

ROOT = Path(__file__).resolve().parent.parent


def figure(row: dict[str, Any], name: str) -> float:
    """A row's figure ``name``, as a number."""
    value = row["figures"][name]["value"]
    assert isinstance(value, float), row
    return value


def test_a_row_formats_its_figures_for_people_and_carries_them_as_numbers() -> None:
    row = Row("grads", "GetGradients", {"ours": seconds(0.0812), "ours_rate": Figure(576e6, "B/s"), "worst": Figure(float("nan"), "s")},
              0.4412, Layout("{ours} = {ours_rate}", "{worst}", "ratio {ratio:.3f}"), target=">= 0.80")
    assert row.cells() == {"section": "grads", "case": "GetGradients", "ours": "81.2 ms = 576 MB/s", "reference": "-",
                           "ratio": "0.44", "target": ">= 0.80", "note": "ratio 0.441"}
    doc = json.loads(json.dumps(row.as_json(), allow_nan=False))  # valid JSON: not-a-number is null
    assert doc["ratio"] == 0.4412 and doc["figures"]["ours"] == {"value": 0.0812, "unit": "s"}
    assert doc["figures"]["worst"] == {"value": None, "unit": "s"}
    # No ratio: "-" where the column shows it, or another figure instead.
    assert Row("c", "x", {}, None, Layout("", "")).cells()["ratio"] == "-"
    growth = Row("m", "cycles", {"growth": Figure(36.4, MIB)}, None, Layout("", "", ratio="{growth:+.0f} MiB"))
    assert growth.cells()["ratio"] == "+36 MiB" and growth.as_json()["ratio"] is None


@pytest.mark.slow
def test_quick_benchmark_prints_every_section(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--threads", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| section | case |" in run.stdout
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert {r["section"] for r in rows} >= set(SECTIONS)
    for row in rows:
        assert row["ratio"] is None or isinstance(row["ratio"], float), row
        assert all(math.isfinite(f["value"]) for f in row["figures"].values() if f["value"] is not None), row
    # Remote and local PyTorch computed the same logits (the step section checks every repetition).
    step_rows = [r for r in rows if r["section"] == "step"]
    assert len(step_rows) == 8, step_rows  # the empty call, the numbered call and six cases at the quick size
    for row in step_rows[2:]:
        assert figure(row, "logits_agree") < 1e-4, row
    # The empty call against issue 21's target: what it adds to the raw aio unary, in the same run.
    assert step_rows[0]["target"] == "<= +0.30 ms" and figure(step_rows[0], "added") > 0, step_rows[0]
    # The upload of fp32 images and, beside it, of the same images as uint8 (a quarter of the bytes on
    # the wire), normalised on the server as local ToTensor() + Normalize() does.
    fp32_upload, uint8_upload = [r for r in rows if r["section"] == "upload"]
    assert "fp32" in fp32_upload["case"] and "uint8" in uint8_upload["case"], (fp32_upload, uint8_upload)
    assert figure(uint8_upload, "request_bytes") < 0.3 * figure(uint8_upload, "fp32_request_bytes"), uint8_upload
    assert figure(uint8_upload, "logits_agree") < 1e-4, uint8_upload
    # The gradient and upload rows compare with the raw floor served by a process of its own (the
    # faster of its sync and aio variants, named in the row); the in-process floors are in the note.
    floored = [r for r in rows if r["section"] in ("grads", "upload") and "statistics-only" not in r["case"]]
    assert len(floored) == 6, floored
    for row in floored:
        assert row["words"]["floor"] in ("sync", "aio") and row["text"]["reference"].startswith("standalone"), row
    # torch.distributed.rpc beside us: the empty call, the one-call and the separate-call step at the
    # quick size, both gradient fetches; the same logits and gradients as local PyTorch and ours,
    # and the peer process shut down cleanly.
    # Then the same through shared memory (docs/shared-memory.md): gradients with and without
    # statistics, parameters, and a Forward's upload, equal to the gRPC path.
    rpc_rows = [r for r in rows if r["section"] == "rpc"]
    assert len(rpc_rows) == 9, rpc_rows
    for row in rpc_rows[1:3]:
        assert figure(row, "logits_agree") < 1e-4, row
    for row in rpc_rows[3:5]:
        assert figure(row, "tensors") == 62 and figure(row, "bytes") > 0 and figure(row, "values_agree") < 1e-4, row
    for row in rpc_rows[5:]:
        assert "shared memory" in row["case"] and figure(row, "bytes") > 0 and figure(row, "values_agree") == 0, row
    assert doc["children"]["rpc peer"]["returncode"] == 0, run.stderr[-3000:]
    # No client with a session of its own failed. (On one shared session, clients refuse each
    # other's steps by the session's rules; the benchmark counts those refusals and reports any
    # other error, which this smoke test does not judge.)
    own = [r for r in rows if r["section"] == "concurrency" and "own sessions" in r["case"]]
    assert own and all(figure(r, "errors") == 0 for r in own), own


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
    assert [r["section"] for r in rows] == ["ray"] * 4, rows  # the empty call, the step, the input's trip, the gradients
    # Each hop beside what the issue allows it: one copy of the payload, timed in the same run, and 1 ms a call.
    assert all(figure(r, "copy") > 0 for r in rows[1:]) and all(math.isfinite(figure(r, "hop")) for r in rows if "hop" in r["figures"]), rows


@pytest.mark.slow
def test_quick_benchmark_link_section(tmp_path: Path) -> None:
    """The optional link section: a server in one network namespace, the client in another, joined by
    an emulated 1 Gbit/s, 2 ms link; the link delays and shapes as it claims, the uint8 and float16
    paths carry fewer bytes over it, and nothing the section made is left behind."""
    why = unavailable()
    if why:
        pytest.skip(why)
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    # What a killed run leaves behind (SIGKILL runs no clean-up): a namespace named for its pid, gone.
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = f"rtlink{dead.pid}a"
    subprocess.run(["ip", "netns", "add", orphan], check=True)
    out = tmp_path / "rows.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--threads", "1", "--sections", "link", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {r["case"].split(": ", 1)[1]: r for r in json.loads(out.read_text())["rows"]}
    assert [r["section"] for r in rows.values()] == ["link"] * 7, rows
    # The link delays by its round trip (never less) and carries no more than its rate.
    rtt, bulk = rows["round trip"], rows["bulk TCP 5 MB"]
    assert 2e-3 <= figure(rtt, "ours") < 20e-3, rtt
    assert figure(bulk, "carried") <= 1.05, bulk
    assert figure(rows["empty call DescribeSession"], "ours") >= 2e-3, rows
    # The same logits as local PyTorch on both input paths; a quarter of the bytes as uint8.
    fp32_step, uint8_step = rows["TrainStep fp32 2x3x64x64"], rows["TrainStep uint8 2x3x64x64"]
    assert figure(fp32_step, "logits_agree") < 1e-4, fp32_step
    assert figure(uint8_step, "request") < 0.3 * figure(fp32_step, "request"), uint8_step
    # Gradients as float16: half the bytes of float32, the same values to float16's precision, and
    # neither faster than the link allows.
    fp32_grads, fp16_grads = rows["GetGradients float32 (46.8 MB)"], rows["GetGradients float16 (23.4 MB)"]
    assert figure(fp16_grads, "fp16_agree") < 1e-2, fp16_grads
    for row in (fp32_grads, fp16_grads):
        assert row["ratio"] >= 0.95, row
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert after == before, (before, after)  # the orphan removed, nothing of this run's left
