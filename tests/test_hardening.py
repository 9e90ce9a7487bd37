"""Reliability II: no client can stall, starve or bloat the service, and no failed call leaves a trace.

Each test drives a real server through real channels and fails when the guard it names is removed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from remote_trainer.client import Session, TrainerClient, TrainerError
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb
from remote_trainer.engine.limits import MAX_CLASSES, MAX_PATTERN_LENGTH, MAX_PATTERNS
from remote_trainer.server.app import create_server
from remote_trainer.server.settings import Settings, parse_settings
from tests.conftest import rand


def test_pattern_lists_are_bounded_and_refused_before_matching(client: TrainerClient, session: Session) -> None:
    """400,000 "*" patterns (a 1.2 MB request) held a session for ~50 s; now refused at once, the
    session free for the next call."""
    session.forward(rand(2, 3, 32, 32))
    session.backward("sum", rand(2, 1000))
    many = ["*"] * 400_000
    for call in (
        lambda: session.gradients(*many),
        lambda: session.parameters(*many),
        lambda: session.freeze(*many),
    ):
        with pytest.raises(TrainerError) as err:
            call()
        assert (err.value.code, err.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "TOO_MANY_PATTERNS")
        assert str(MAX_PATTERNS) in err.value.message
    with pytest.raises(TrainerError) as err:
        session.gradients("layer1" + "*" * MAX_PATTERN_LENGTH)
    assert (err.value.code, err.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "PATTERN_TOO_LONG")
    # At the limit, repeated patterns are matched once: the answer is the same as for one pattern.
    assert list(session.gradients(*["fc.*"] * MAX_PATTERNS)) == ["fc.weight", "fc.bias"]
    assert session.info().trainable_parameters == 62  # nothing was frozen


def test_settings_that_yield_no_token_or_an_empty_one_refuse_to_start(tmp_path: Path) -> None:
    """Fails closed: before, each of these started a server with no authentication (or with the empty
    bearer token valid)."""
    empty, comments = tmp_path / "empty.tokens", tmp_path / "comments.tokens"
    empty.write_text("")
    comments.write_text("# alice:secret\n\n")
    cases: list[tuple[dict[str, str], str]] = [
        ({"TRAINER_TOKENS": " "}, "no token given"),
        ({"TRAINER_TOKENS": ","}, "no token given"),
        ({"TRAINER_TOKENS_FILE": str(empty)}, "no token given"),
        ({"TRAINER_TOKENS_FILE": str(comments)}, "no token given"),
        ({"TRAINER_TOKENS": "alice:"}, "the token of 'alice' is empty"),
        ({"TRAINER_TOKENS": "bob:b0b,alice:"}, "the token of 'alice' is empty"),
    ]
    for env, said in cases:
        with pytest.raises(SystemExit):
            parse_settings([], env)
        with pytest.raises(ValueError, match=said):  # create_server (no flag parsing) refuses too
            create_server(Settings(port=0, weights="random", tokens=env.get("TRAINER_TOKENS", ""),
                                   tokens_file=env.get("TRAINER_TOKENS_FILE", "")))
    # As users start it: exit status 2 and one line saying why, before anything listens.
    proc = subprocess.run(
        [sys.executable, "-m", "remote_trainer.server", "--port", "0", "--weights", "random"],
        env={**os.environ, "TRAINER_TOKENS": "alice:"}, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "trainer-server: error: the token of 'alice' is empty"
    assert "listening" not in proc.stderr
