"""The examples run as a user runs them, against a real server: the tutorial's checks hold, finetuning learns."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )


def test_autograd_tutorial_checks_all_hold(target: str, tmp_path: Path) -> None:
    done = run_example("autograd_tutorial.py", "--target", target, "--dot", str(tmp_path / "resnet18.dot"))
    assert done.returncode == 0, done.stdout + done.stderr
    checks = [c for c in re.findall(r"^  (.+): (True|False)$", done.stdout, re.M) if not c[0].startswith("Does")]
    assert len(checks) == 17 and all(ok == "True" for _, ok in checks), done.stdout
    for label in ("model.fc.bias.grad == 1", "remote .grad == local .grad, for all 62 parameters", "9*a**2 == a.grad (local)",
                  "the DAG's leaves are fc.weight and fc.bias only", "under torch.no_grad() the output does not require grad"):
        assert (label, "True") in checks, label
    assert "17 of 17 checks hold" in done.stdout
    assert (tmp_path / "resnet18.dot").read_text().count("AccumulateGrad") == 62


def test_finetune_loss_falls_and_accuracy_rises(target: str) -> None:
    done = run_example("finetune.py", "--target", target, "--steps", "30", "--size", "32", "--train-size", "256",
                       "--test-size", "128", "--progress")
    assert done.returncode == 0, done.stdout + done.stderr
    loss = re.search(r"^loss: ([\d.]+) -> ([\d.]+) ", done.stdout, re.M)
    accuracy = re.search(r"^held-out accuracy: ([\d.]+)% -> ([\d.]+)%$", done.stdout, re.M)
    assert loss and accuracy, done.stdout
    first, last = float(loss[1]), float(loss[2])
    before, after = float(accuracy[1]), float(accuracy[2])
    assert last < 0.5 * first, done.stdout
    assert after >= 60 and after > before + 30, done.stdout
    assert "30/30" in done.stderr  # the progress bar


def test_overlap_runs_the_same_training_sync_and_async(target: str) -> None:
    done = run_example("overlap.py", "--target", target, "--sessions", "2", "--steps", "2", "--batch", "2", "--size", "32")
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^sync SDK, one session after another: +[\d.]+ s", done.stdout, re.M), done.stdout
    assert re.search(r"^async SDK, all sessions from one loop: +[\d.]+ s", done.stdout, re.M), done.stdout
    assert "losses of the two runs identical: True" in done.stdout
