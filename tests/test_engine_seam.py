"""The engine seam without Ray: what crosses a process boundary survives it whole.

Sessions built from a plain ``ModelSpec``; results packed as numpy arrays and unpacked again
(pickled in between, as Ray does); domain errors pickled with every field; checkpoint files written
and read by the engine; a device out-of-memory classified by the engine itself.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models import resnet18

from remote_trainer.engine import portable
from remote_trainer.engine.errors import FieldViolation, ResourceExhausted, TrainerError, Unavailable, invalid
from remote_trainer.engine.limits import Limits
from remote_trainer.engine.models import ModelSpec
from remote_trainer.engine.optimizer import OptimizerSpec
from remote_trainer.engine.protocol import Engine
from remote_trainer.engine.session import SessionEngine


def fresh(seed: int = 0, num_classes: int = 10) -> SessionEngine:
    return SessionEngine.from_spec(ModelSpec("random", num_classes, seed, "cpu"), OptimizerSpec.tutorial(), Limits())


def test_a_session_built_from_a_spec_is_the_seeded_model() -> None:
    engine: Engine = fresh(seed=3)
    torch.manual_seed(3)
    local = resnet18(num_classes=10)
    params = {t.name: t.tensor for t in engine.parameters([])}
    for name, value in local.named_parameters():
        assert params[name] is not None and torch.equal(params[name], value.detach()), name  # type: ignore[arg-type]
    info = engine.describe()
    assert (info.weights, info.device, info.num_classes) == ("random(seed=3)", "cpu", 10)


def test_results_cross_as_numpy_and_come_back_equal() -> None:
    engine = fresh()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    forward = engine.forward(x)
    engine.backward(loss="sum", labels=torch.ones(2, 10))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        grads = engine.gradients(["fc"], dtype=dtype)
        packed = pickle.loads(pickle.dumps(portable.pack(grads)))
        assert all(isinstance(g.tensor, portable.PortableArray) and isinstance(g.tensor.array, np.ndarray) for g in packed)
        back = portable.unpack(packed)
        for before, after in zip(grads, back):
            assert after.tensor.dtype == dtype and torch.equal(after.tensor, before.tensor), (dtype, before.name)
            assert (after.name, after.shape, after.stats) == (before.name, before.shape, before.stats)
    back_forward = portable.unpack(pickle.loads(pickle.dumps(portable.pack(forward))))
    assert torch.equal(back_forward.logits, forward.logits) and back_forward.forward_id == forward.forward_id
    labels = torch.tensor([1, 2])  # integers and arguments in tuples and dicts too
    args = portable.unpack(pickle.loads(pickle.dumps(portable.pack(((x,), {"labels": labels})))))
    assert torch.equal(args[0][0], x) and torch.equal(args[1]["labels"], labels) and args[1]["labels"].dtype == torch.int64


def test_domain_errors_pickle_with_every_field() -> None:
    """An engine in another process (a Ray actor) raises these: code, reason, violations and
    metadata must cross."""
    for error in (
        Unavailable("session x was lost", "SESSION_LOST", metadata={"checkpoint": "auto-x.ckpt"}),
        ResourceExhausted("too many", "TOO_MANY_SESSIONS", (FieldViolation("f", "d"),), {"limit": "3"}),
        invalid("input", "input must be float32", "WRONG_DTYPE"),  # the violation made from the field
    ):
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and isinstance(back, TrainerError)
        assert (back.message, back.reason, back.violations, back.metadata) == (error.message, error.reason, error.violations, error.metadata)
        assert str(back) == str(error)


def test_checkpoints_are_engine_operations(tmp_path: Path) -> None:
    engine = fresh()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    engine.forward(x)
    engine.backward(loss="sum", labels=torch.ones(2, 10))
    engine.step()
    saved = engine.save_checkpoint(str(tmp_path / "c.ckpt"))
    assert saved.step_count == 1 and saved.size_bytes == (tmp_path / "c.ckpt").stat().st_size
    other = fresh(seed=9)
    assert other.load_checkpoint(str(tmp_path / "c.ckpt")).step_count == 1
    for a, b in zip(engine.parameters([], include_buffers=True), other.parameters([], include_buffers=True)):
        assert torch.equal(a.tensor, b.tensor), a.name  # type: ignore[arg-type]


def test_a_checkpoint_with_a_damaged_field_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    """A checkpoint file is a plain dictionary whose fields are read with their types checked: a
    field missing or of the wrong type is BAD_CHECKPOINT, naming the field, and the session stays as
    it was."""
    engine = fresh()
    engine.save_checkpoint(str(tmp_path / "good.ckpt"))
    good = torch.load(tmp_path / "good.ckpt", weights_only=True)
    assert list(good) == ["format", "weights", "num_classes", "model", "frozen", "optimizer_spec", "optimizer_state", "step_count",
                          "operations"]
    before = engine.parameters([], include_buffers=True)
    damaged = {"format": "other", "num_classes": [10], "model": 1, "frozen": 3, "optimizer_spec": "sgd", "optimizer_state": [],
               "step_count": None}
    for key, value in damaged.items():
        for name, state in ((f"{key}.ckpt", dict(good, **{key: value})), (f"no-{key}.ckpt", {k: v for k, v in good.items() if k != key})):
            torch.save(state, tmp_path / name)
            with pytest.raises(TrainerError) as err:
                engine.load_checkpoint(str(tmp_path / name))
            assert err.value.reason == "BAD_CHECKPOINT" and key in err.value.message, (name, err.value.message)
    # The record of numbered operations may be missing (files from before it), not of another type;
    # a damaged one is refused when a session resumes from it.
    for name, operations in (("ops-type.ckpt", 5), ("ops-bad.ckpt", {"next_number": 0, "answers": []}),
                             ("ops-missing.ckpt", {"answers": []})):
        torch.save(dict(good, operations=operations), tmp_path / name)
        with pytest.raises(TrainerError) as err:
            engine.resume(str(tmp_path / name))
        assert err.value.reason == "BAD_CHECKPOINT", (name, err.value.message)
    torch.save({k: v for k, v in good.items() if k != "operations"}, tmp_path / "old.ckpt")
    assert engine.resume(str(tmp_path / "old.ckpt")).next_operation == 1
    for a, b in zip(before, engine.parameters([], include_buffers=True)):
        assert torch.equal(a.tensor, b.tensor), a.name  # type: ignore[arg-type]


def test_device_out_of_memory_is_a_domain_error(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = fresh()

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail")

    monkeypatch.setattr(engine._model, "forward", out_of_memory)
    with pytest.raises(ResourceExhausted) as err:
        engine.forward(torch.rand(2, 3, 32, 32))
    assert err.value.reason == "DEVICE_OUT_OF_MEMORY" and "Tried to allocate 20.00 GiB" in err.value.message
    assert "\n" not in err.value.message
    assert pickle.loads(pickle.dumps(err.value)).reason == "DEVICE_OUT_OF_MEMORY"
