"""Reliability II: no client can stall, starve or bloat the service, and no failed call leaves a trace.

Each test drives a real server through real channels and fails when the guard it names is removed.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from remote_trainer.client import Session, TrainerClient, TrainerError
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb
from remote_trainer.engine.limits import MAX_CLASSES, MAX_PATTERN_LENGTH, MAX_PATTERNS
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
