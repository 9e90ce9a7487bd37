"""Tensor streams on the fast path (wire-form chunks, the SDK's own reader): values equal local
PyTorch in every transfer type, with or without statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from remote_trainer.client import InvalidArgumentError, Session
from tests.conftest import assert_equal_to_local, rand


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_gradients_and_parameters_equal_local_with_and_without_statistics(session: Session, local: nn.Module, dtype: str) -> None:
    data, labels = rand(2, 3, 64, 64, seed=5), rand(2, 1000, seed=6)
    session.forward(data)
    session.backward("sum", labels)
    (local(torch.from_numpy(data)) - torch.from_numpy(labels)).sum().backward()
    torch_dtype = getattr(torch, dtype)
    with_stats = session.gradients(dtype=dtype)
    without = session.gradients(dtype=dtype, stats=False)
    values = session.parameters(dtype=dtype, include_buffers=True, stats=False)
    expected_values = dict(local.named_parameters()) | dict(local.named_buffers())
    for name, p in local.named_parameters():
        assert p.grad is not None
        expected = p.grad.to(torch_dtype).float() if p.grad.is_floating_point() else p.grad
        for got in (with_stats[name], without[name]):
            assert got.present
            assert_equal_to_local(np.asarray(got.array, np.float32), expected)
        assert with_stats[name].stats is not None and without[name].stats is None
        assert with_stats[name].stats.norm == pytest.approx(float(p.grad.norm()), rel=1e-3 if dtype == "float32" else 1e-2)
    for name, value in expected_values.items():
        want = (value.to(torch_dtype).float() if value.is_floating_point() else value).detach()
        assert_equal_to_local(np.asarray(values[name].array, want.numpy().dtype), want)


def test_statistics_skipped_with_stats_only_is_refused(session: Session) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        session.gradients(stats_only=True, stats=False)
    assert err.value.reason == "NOTHING_TO_SEND"


def test_an_absent_gradient_stays_absent_without_statistics(session: Session) -> None:
    session.freeze("layer1")
    session.forward(rand(2, 3, 64, 64))
    session.backward("sum", rand(2, 1000))
    grads = session.gradients(stats=False)
    assert not grads["layer1.0.conv1.weight"].present and grads["layer1.0.conv1.weight"].array is None
    assert grads["fc.weight"].present and grads["fc.weight"].array is not None
