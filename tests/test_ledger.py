"""The ledger of numbered operations on its own: what it keeps, what it forgets, what a checkpoint holds."""

from __future__ import annotations

import dataclasses
import inspect
import io
import typing

import pytest
import torch

from remote_trainer.engine.errors import Abandoned, FailedPrecondition, InvalidArgument, TrainerError, Unavailable
from remote_trainer.engine.ledger import Ledger
from remote_trainer.engine.operation import Operation
from remote_trainer.engine.optimizer import OptimizerSpec
from remote_trainer.engine.protocol import Engine
from remote_trainer.engine.results import ForwardResult, SessionDescription, Stats, StepResult
from remote_trainer.engine.transforms import InputTransform

STATS = Stats(1.0, 0.0, 1.0, 0.5, 0, 4)
# A session as a checkpoint restored it: what a restored ledger is put back with (Ledger.restore).
RESTORED = SessionDescription("resnet18", "w.pt", "cpu", 10, OptimizerSpec.tutorial(), 0, 0, 62, 0)


def _forward(number: int, elements: int = 4) -> tuple[Operation, ForwardResult]:
    return Operation(number, "Forward"), ForwardResult(number, torch.arange(elements, dtype=torch.float32), STATS)


def test_answers_are_kept_up_to_a_count_then_forgotten_with_a_reason() -> None:
    ledger = Ledger(keep_answers=2)
    for n in (1, 2, 3):
        ledger.run(Operation(n, "Step"), lambda n=n: StepResult(n, 1))
    assert ledger.run(Operation(3, "Step"), lambda: StepResult(99, 1)) == StepResult(3, 1, replayed=True)
    with pytest.raises(FailedPrecondition) as forgotten:
        ledger.run(Operation(1, "Step"), lambda: StepResult(99, 1))
    assert forgotten.value.reason == "OPERATION_FORGOTTEN" and "operations 2 to 3" in forgotten.value.message


def test_logits_are_kept_up_to_a_byte_bound_and_a_larger_answer_is_not_kept() -> None:
    ledger = Ledger(keep_tensor_bytes=64)  # 16 float32 logits
    op, result = _forward(1, elements=32)
    assert ledger.run(op, lambda: result) is result
    with pytest.raises(FailedPrecondition) as not_kept:
        ledger.run(op, lambda: result)
    assert not_kept.value.reason == "OPERATION_ANSWER_NOT_KEPT"
    for n in (2, 3, 4):  # 16 bytes each: the oldest answers go once 64 bytes are passed
        op, result = _forward(n)
        ledger.run(op, lambda result=result: result)
    op, _ = _forward(5)
    ledger.run(op, lambda: _forward(5)[1])
    with pytest.raises(FailedPrecondition):
        ledger.run(Operation(1, "Forward"), lambda: result)
    assert ledger.run(Operation(5, "Forward"), lambda: result).replayed


def test_the_byte_bound_forgets_exactly_the_oldest_answers_past_it_also_after_a_restore() -> None:
    """The ledger keeps a running total of its answers' tensor bytes (not walked on every call):
    64 bytes hold four 16-byte answers, so a fifth forgets the first and only the first, and a ledger
    restored from a snapshot goes on counting from what it holds."""
    ledger = Ledger(keep_tensor_bytes=64)
    for n in range(1, 6):
        op, result = _forward(n)
        ledger.run(op, lambda result=result: result)
    with pytest.raises(FailedPrecondition) as forgotten:
        ledger.run(Operation(1, "Forward"), lambda: _forward(1)[1])
    assert forgotten.value.reason == "OPERATION_FORGOTTEN"
    assert [ledger.run(Operation(n, "Forward"), lambda: _forward(99)[1]).forward_id for n in (2, 3, 4, 5)] == [2, 3, 4, 5]
    restored = Ledger(keep_tensor_bytes=64)
    restored.restore(ledger.snapshot())(RESTORED)
    op, result = _forward(6)
    restored.run(op, lambda: result)
    with pytest.raises(FailedPrecondition) as also_forgotten:
        restored.run(Operation(2, "Forward"), lambda: _forward(2)[1])
    assert also_forgotten.value.reason == "OPERATION_FORGOTTEN"
    assert [restored.run(Operation(n, "Forward"), lambda: _forward(99)[1]).forward_id for n in (3, 4, 5, 6)] == [3, 4, 5, 6]


def test_abandoned_and_unavailable_calls_leave_their_number_free() -> None:
    ledger = Ledger()
    for error in (Abandoned("gone", "ABANDONED"), Unavailable("later", "SESSION_UNREACHABLE")):
        def fail(error: Exception = error) -> StepResult:
            raise error
        with pytest.raises(type(error)):
            ledger.run(Operation(1, "Step"), fail)
        assert ledger.next_number == 1
    with pytest.raises(InvalidArgument):
        ledger.run(Operation(0, "Step"), lambda: StepResult(1, 1))


def test_a_snapshot_holds_the_answers_as_plain_data_and_restores_them() -> None:
    ledger = Ledger()
    op, result = _forward(1)
    ledger.run(op, lambda: result)
    bad = InvalidArgument("bad input", "BAD_INPUT_SHAPE")

    def refuse() -> StepResult:
        raise bad
    with pytest.raises(InvalidArgument):
        ledger.run(Operation(2, "Step"), refuse)
    ledger.run(Operation(4, "ZeroGrad", supersede=True), lambda: 3)
    snapshot = ledger.snapshot()
    # torch.load(weights_only=True) reads a checkpoint: plain types and tensors only.
    buffer = io.BytesIO()
    torch.save(snapshot, buffer)
    buffer.seek(0)
    restored = Ledger()
    restored.restore(torch.load(buffer, weights_only=True))(RESTORED)
    assert restored.next_number == 5
    replayed = restored.run(op, lambda: _forward(9)[1])
    assert replayed.forward_id == 1 and replayed.stats == STATS and torch.equal(replayed.logits, result.logits)
    with pytest.raises(InvalidArgument) as again:
        restored.run(Operation(2, "Step"), lambda: StepResult(1, 1))
    assert (again.value.message, again.value.reason) == ("bad input", "BAD_INPUT_SHAPE")
    with pytest.raises(FailedPrecondition) as given_up:
        restored.run(Operation(3, "Step"), lambda: StepResult(1, 1))
    assert given_up.value.reason == "OPERATION_GIVEN_UP"
    assert restored.run(Operation(4, "ZeroGrad"), lambda: 0) == 3
    with pytest.raises(ValueError):
        Ledger().restore({"next_number": 1, "answers": [[3, snapshot["answers"][0][1]]]})


def test_a_kept_error_holds_no_traceback_and_each_repeat_raises_a_fresh_one() -> None:
    """A refused request's tensors live in its error's traceback: the record keeps a bare copy."""
    ledger = Ledger()
    big = torch.zeros(1 << 20)

    def refuse(x: torch.Tensor = big) -> StepResult:
        raise InvalidArgument(f"bad input of {x.numel()} numbers", "BAD_INPUT_SHAPE")
    with pytest.raises(InvalidArgument) as first:
        ledger.run(Operation(1, "Forward"), refuse)
    kept = ledger._answers[1].error
    assert kept is not None and kept.__traceback__ is None and kept.__context__ is None
    with pytest.raises(InvalidArgument) as again:
        ledger.run(Operation(1, "Forward"), refuse)
    with pytest.raises(InvalidArgument) as third:
        ledger.run(Operation(1, "Forward"), refuse)
    assert again.value is not third.value and again.value is not kept
    assert (again.value.message, again.value.metadata["next_operation"]) == (first.value.message, "2")


def test_a_bug_uses_its_number_as_internal() -> None:
    ledger = Ledger()

    def bug() -> StepResult:
        raise ZeroDivisionError("a bug")
    with pytest.raises(ZeroDivisionError):
        ledger.run(Operation(1, "Step"), bug)
    with pytest.raises(TrainerError) as repeat:
        ledger.run(Operation(1, "Step"), lambda: StepResult(1, 1))
    assert repeat.value.reason == "INTERNAL" and ledger.next_number == 2


def test_every_numbered_answer_but_zero_grads_says_when_it_is_a_repeat() -> None:
    """The servicer tells its observers (watchers, metrics, TensorBoard) of a change only when it
    was made, not when its repeat is answered from the record: each numbered call's answer has the
    ``replayed`` field the ledger sets on a repeat. ZeroGrad's count is the one exception: no
    observer hears of a ZeroGrad."""
    numbered = {name: typing.get_type_hints(method)["return"] for name, method in vars(Engine).items()
                if callable(method) and "operation" in inspect.signature(method).parameters and name != "refuse"}
    assert {"forward", "backward", "step", "train_step", "configure_optimizer", "freeze", "replace_head",
            "load_checkpoint", "reset", "zero_grad"} <= set(numbered)
    assert numbered.pop("zero_grad") is int
    for name, answer in numbered.items():
        assert dataclasses.is_dataclass(answer) and "replayed" in {f.name for f in dataclasses.fields(answer)}, name


def test_a_session_description_with_an_input_transform_is_kept_through_a_snapshot() -> None:
    """The answer of a ReplaceHead, ConfigureOptimizer, LoadCheckpoint or ResetSession describes the
    session, its input transform included: a checkpoint holding one reads back, and its repeat is
    answered as a repeat."""
    described = SessionDescription("resnet18", "w.pt", "cpu", 10, OptimizerSpec.tutorial(), 0, 0, 62, 0,
                                   input_transform=InputTransform.imagenet())
    ledger = Ledger()
    assert ledger.run(Operation(1, "ReplaceHead"), lambda: described) is described
    buffer = io.BytesIO()
    torch.save(ledger.snapshot(), buffer)
    buffer.seek(0)
    restored = Ledger()
    restored.restore(torch.load(buffer, weights_only=True))(RESTORED)
    again = restored.run(Operation(1, "ReplaceHead"), lambda: described)
    assert again.replayed and again.input_transform == InputTransform.imagenet()
    assert dataclasses.replace(again, replayed=False) == described


def test_a_repeat_that_asks_something_else_is_refused_and_not_answered() -> None:
    """A number used for one request is refused for another request of the same RPC and client (what it
    asks differs: ``Operation.request``), whatever the first answer was; the record keeps it through a
    snapshot. A repeat that asks the same is answered."""
    ledger = Ledger()
    ledger.run(Operation(1, "Step", request="first"), lambda: StepResult(1, 1))
    refused = InvalidArgument("bad input", "BAD_INPUT_SHAPE")

    def refuse() -> StepResult:
        raise refused
    with pytest.raises(InvalidArgument):
        ledger.run(Operation(2, "Step", request="second"), refuse)
    restored = Ledger()
    restored.restore(ledger.snapshot())(RESTORED)
    for record in (ledger, restored):
        for number in (1, 2):
            with pytest.raises(InvalidArgument) as other:
                record.run(Operation(number, "Step", request="other"), lambda: StepResult(99, 1))
            assert other.value.reason == "OPERATION_MISMATCH" and "another Step request" in other.value.message
        assert record.run(Operation(1, "Step", request="first"), lambda: StepResult(99, 1)) == StepResult(1, 1, replayed=True)
        # Refused before it could run (a bad field, server/servicer.py): the same answers.
        assert record.refuse(Operation(1, "Step", request="other"), refused).reason == "OPERATION_MISMATCH"
        assert record.refuse(Operation(2, "Step", request="second"), InvalidArgument("other labels", "BAD_LABEL_SHAPE")).reason == "BAD_INPUT_SHAPE"
        assert record.next_number == 3
