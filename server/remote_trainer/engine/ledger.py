"""A session's record of numbered operations: run in order, each at most once, repeats answered.

A client numbers the calls that change a session 1, 2, 3, ... (``Operation``). ``Ledger.run`` runs
call ``n`` only when ``n`` is the number the session expects next; a repeat of a number it ran is
answered with the answer it gave (the result, or the same error) without running again, so a retry
after a lost answer cannot apply a step twice. What ended ``Abandoned`` (the caller's deadline passed
or it cancelled before the change was committed) or ``Unavailable`` (nothing was done; try again) did
not use its number: a retry runs it. Everything else did, errors included, so the numbers that
follow are not held up by a refused call.

The ledger lives in the engine, beside the state it guards, so the check, the work and the record are
one step wherever the engine runs (this process, or a Ray actor that several front-ends call), and a
checkpoint carries it (``snapshot``/``restore``): a session resumed from one goes on numbering where
it was, and a retry of a call the checkpoint saw is still answered.

Memory: the answers of the last ``KEEP_ANSWERS`` numbers are kept, small dataclasses but for the
logits of Forward and TrainStep, which are kept up to ``KEEP_TENSOR_BYTES`` in all (oldest answers
go first); an answer with more logits than that is remembered as run but not kept, and its repeat is
refused with ``OPERATION_ANSWER_NOT_KEPT`` instead of run again.
"""

from __future__ import annotations

import dataclasses
import functools
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar, cast

import torch

from remote_trainer.engine import errors
from remote_trainer.engine.errors import Abandoned, FailedPrecondition, InvalidArgument, TrainerError, Unavailable
from remote_trainer.engine.operation import Operation

if TYPE_CHECKING:
    from remote_trainer.engine.results import SessionDescription

T = TypeVar("T")
P = ParamSpec("P")

KEEP_ANSWERS = 64
KEEP_TENSOR_BYTES = 16 * 1024 * 1024
MAX_CLIENT_CHARS = 64
MAX_NUMBER = 2**62  # far past any session's life, and within int64 after +1
MAX_SKIP = 1 << 20  # numbers one supersede may give up at once


@dataclass(frozen=True)
class _Answer:
    """What a numbered call answered: its result or its error; ``kept`` False when too large to keep."""

    method: str
    client: str = ""
    request: str = ""  # the digest of what the call asked (Operation.request)
    result: Any = None
    error: TrainerError | None = None
    kept: bool = True
    given_up: bool = False  # superseded before it arrived: never run

    @functools.cached_property
    def tensor_bytes(self) -> int:
        """The bytes of the tensors it keeps (counted once: the ledger keeps a running total)."""
        return _tensor_bytes(self.result) if self.kept else 0


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(_tensor_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


class Ledger:
    """The next number a session expects and the answers of the last ones it ran (thread-safe).

    ``lock`` is held while a numbered call runs; code that holds the engine's own lock never takes it
    (the order is always ledger, then engine), so reading ``next_number`` takes no lock.
    """

    def __init__(self, keep_answers: int = KEEP_ANSWERS, keep_tensor_bytes: int = KEEP_TENSOR_BYTES) -> None:
        self.lock = threading.RLock()
        self.next_number = 1
        # This numbering's identity: a session re-created under the same id (the default session of a
        # restarted server) numbers anew under another epoch, and a client of the old one is told so.
        self.epoch = secrets.token_hex(8)
        self._answers: OrderedDict[int, _Answer] = OrderedDict()
        self._keep_answers = keep_answers
        self._keep_tensor_bytes = keep_tensor_bytes
        self._kept_bytes = 0  # tensor_bytes of the answers kept, kept up to date by _record (not walked each call)

    def run(self, operation: Operation, work: Callable[[], T]) -> T:
        """``work()`` as operation ``operation.number``: run when it is the next number, answered from
        the record when it ran already (a result with a ``replayed`` field comes back with it True),
        refused otherwise. An error that used the number says the next one (metadata ``next_operation``)."""
        with self.lock:
            number = self._check(operation)
            if number < self.next_number:
                return self._repeat(operation)  # type: ignore[no-any-return]
            if number > self.next_number:
                self._skip_to(operation)
            try:
                result = work()
            except (Abandoned, Unavailable):
                raise  # nothing was done: the number stays free for the retry
            except TrainerError as exc:
                raise self._record_error(operation, exc) from None
            except Exception as exc:  # a bug: its answer is INTERNAL, now and on a repeat (the log has the traceback)
                self._record_error(operation, TrainerError(f"internal error in operation {number}", "INTERNAL"))
                raise exc
            self._record(number, self._kept(operation, result))
            return result

    def refuse(self, operation: Operation, error: TrainerError) -> TrainerError:
        """The answer to a request refused before it could run (a bad field): recorded under its number
        when that is the next one, so its repeat is refused the same way; refused as out of order when
        it came early (it is then tried again in its turn, server/dispatch.py). A number used before
        answers as a repeat would be refused (another request, given up, forgotten) or the refusal
        it recorded; else (it ran, and this same request is refused now) ``error``."""
        with self.lock:
            number = self._check(operation)
            if isinstance(error, (Abandoned, Unavailable)):
                return error
            if number < self.next_number:
                try:
                    answer = self._recorded(operation)
                except TrainerError as refusal:
                    return refusal
                return error if answer.error is None else self._answered(_bare(answer.error))
            if number > self.next_number:
                self._skip_to(operation)  # OPERATION_OUT_OF_ORDER unless it supersedes
            return self._record_error(operation, error)

    def _check(self, operation: Operation) -> int:
        number = operation.number
        if not 1 <= number <= MAX_NUMBER:
            raise InvalidArgument(f"operation numbers are 1 to {MAX_NUMBER}, got {number}", "BAD_OPERATION_NUMBER")
        if len(operation.client) > MAX_CLIENT_CHARS:
            raise InvalidArgument(f"operation.client has {len(operation.client)} characters, more than {MAX_CLIENT_CHARS}",
                                  "BAD_OPERATION_CLIENT")
        if operation.epoch and operation.epoch != self.epoch:
            raise FailedPrecondition(
                "the session was made anew since this client numbered its calls (the server or its node restarted): "
                "its state is not the one the client trained; resume from a checkpoint, or start a new client",
                "SESSION_RECREATED", metadata={"expected": str(self.next_number)},
            )
        return number

    def _skip_to(self, operation: Operation) -> None:
        """``operation`` came before the numbers below it: refused, or with ``supersede`` the missing
        numbers are given up (the last ``keep_answers`` of them remembered as such)."""
        number = operation.number
        if not operation.supersede:
            raise FailedPrecondition(
                f"operation {number} arrived before operation {self.next_number}: the session runs numbered "
                f"calls in order and expects {self.next_number} next",
                "OPERATION_OUT_OF_ORDER", metadata={"expected": str(self.next_number)},
            )
        if number - self.next_number > MAX_SKIP:
            raise InvalidArgument(f"operation {number} would give up {number - self.next_number} operations "
                                  f"(at most {MAX_SKIP}); the session expects {self.next_number}", "BAD_OPERATION_NUMBER")
        for skipped in range(max(self.next_number, number - self._keep_answers), number):
            self._record(skipped, _Answer("", given_up=True, kept=False))

    def _record_error(self, operation: Operation, error: TrainerError) -> TrainerError:
        """Records ``error`` (a copy without its traceback, which holds the request) as the answer of
        ``operation``; returns the error to raise, saying the number the session expects next."""
        self._record(operation.number, _Answer(operation.method, operation.client, operation.request, error=_bare(error)))
        return self._answered(_bare(error))

    def _answered(self, error: TrainerError) -> TrainerError:
        error.metadata["next_operation"] = str(self.next_number)
        return error

    def _repeat(self, operation: Operation) -> Any:
        """The recorded answer of a number that ran: its result again, or its error raised again."""
        answer = self._recorded(operation)
        if answer.error is not None:
            raise self._answered(_bare(answer.error))
        if not answer.kept:
            raise FailedPrecondition(
                f"operation {operation.number} ({answer.method}) ran; its answer was too large to keep "
                f"(the session keeps {self._keep_tensor_bytes} bytes of logits)",
                "OPERATION_ANSWER_NOT_KEPT",
            )
        result = answer.result
        if dataclasses.is_dataclass(result) and any(f.name == "replayed" for f in dataclasses.fields(result)):
            result = dataclasses.replace(result, replayed=True)  # type: ignore[type-var]
        return result

    def _recorded(self, operation: Operation) -> _Answer:
        """The record of a number below the next one, when ``operation`` is its repeat: refused when it is
        forgotten, was given up, or was another client's, RPC or request."""
        number = operation.number
        answer = self._answers.get(number)
        if answer is None:
            oldest = next(iter(self._answers), self.next_number)
            raise FailedPrecondition(
                f"operation {number} ran already and its answer is no longer kept (the session keeps the answers "
                f"of operations {oldest} to {self.next_number - 1})",
                "OPERATION_FORGOTTEN", metadata={"expected": str(self.next_number)},
            )
        if answer.given_up:
            raise FailedPrecondition(
                f"operation {number} was given up by a later call (supersede) and never ran", "OPERATION_GIVEN_UP",
                metadata={"expected": str(self.next_number)},
            )
        if answer.client != operation.client:
            raise InvalidArgument(
                f"operation {number} was made by another client: two clients are numbering this session (a client "
                "taking a session over numbers from its next_operation, after the other has stopped)",
                "OPERATION_MISMATCH",
            )
        if answer.method != operation.method:
            raise InvalidArgument(
                f"operation {number} was a {answer.method}, not a {operation.method}: a repeat must be the same call",
                "OPERATION_MISMATCH",
            )
        if answer.request and operation.request and answer.request != operation.request:
            raise InvalidArgument(
                f"operation {number} was another {answer.method} request (its fields differ from this one's): a repeat "
                "must be the same request; a new call takes the session's next number",
                "OPERATION_MISMATCH",
            )
        return answer

    def _kept(self, operation: Operation, result: Any) -> _Answer:
        answer = _Answer(operation.method, operation.client, operation.request, result=result)
        if answer.tensor_bytes > self._keep_tensor_bytes:
            return _Answer(operation.method, operation.client, operation.request, kept=False)
        return answer

    def _record(self, number: int, answer: _Answer) -> None:
        """Keeps ``answer`` as number's; then forgets the oldest answers past ``keep_answers`` or past
        ``keep_tensor_bytes`` of tensors."""
        replaced = self._answers.get(number)
        if replaced is not None:
            self._kept_bytes -= replaced.tensor_bytes
        self._answers[number] = answer
        self._kept_bytes += answer.tensor_bytes
        self.next_number = number + 1
        while len(self._answers) > self._keep_answers or self._kept_bytes > self._keep_tensor_bytes:
            _, dropped = self._answers.popitem(last=False)
            self._kept_bytes -= dropped.tensor_bytes


    # -- in a checkpoint ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The ledger as plain data (dicts, lists, strings, numbers, tensors) for a checkpoint file."""
        with self.lock:
            return {
                "epoch": self.epoch,
                "next_number": self.next_number,
                "answers": [[number, _plain(answer)] for number, answer in self._answers.items()],
            }

    def restore(self, state: dict[str, Any]) -> Callable[[SessionDescription], None]:
        """Checks what ``snapshot`` made (a bad one raises ValueError, TypeError or KeyError) and
        returns the change that puts it back, to be made once everything else is checked too; it
        takes the session as the checkpoint restored it, from which an answer kept in the shape of
        an earlier release is made the current one (``_current``)."""
        next_number = int(state["next_number"])
        epoch = str(state.get("epoch", "")) or secrets.token_hex(8)
        answers = OrderedDict((int(number), _from_plain(plain)) for number, plain in state["answers"])
        if next_number < 1 or any(number >= next_number for number in answers):
            raise ValueError("the checkpoint's operation record is inconsistent")

        def put_back(described: SessionDescription) -> None:
            current = OrderedDict((number, _current(number, answer, described, epoch)) for number, answer in answers.items())
            with self.lock:
                self.next_number, self.epoch, self._answers = next_number, epoch, current
                self._kept_bytes = sum(a.tensor_bytes for a in current.values())

        return put_back


def _bare(error: TrainerError) -> TrainerError:
    """A copy of ``error`` with its message, reason, violations and metadata only: no traceback,
    cause or context (which hold the request's tensors), so a kept answer is small and each raise
    of it is a fresh exception."""
    return type(error)(error.message, error.reason, tuple(error.violations), dict(error.metadata))


# -- answers as plain data ---------------------------------------------------------------------------
# A checkpoint is read with torch.load(weights_only=True): no classes, so each dataclass is written
# as {"type": name, fields...} and read back through this list of the types an answer may hold.

def _answer_types() -> dict[str, type]:
    from remote_trainer.engine import results
    from remote_trainer.engine.optimizer import OptimizerSpec
    from remote_trainer.engine.transforms import InputTransform

    kinds: list[type] = [results.ForwardResult, results.BackwardResult, results.TrainStepResult, results.StepResult,
                         results.FreezeResult, results.SessionDescription, results.Stats, OptimizerSpec, InputTransform]
    return {kind.__name__: kind for kind in kinds}


_ERRORS = {kind.__name__: kind for kind in (errors.NotFound, errors.InvalidArgument, errors.FailedPrecondition,
                                            errors.ResourceExhausted, errors.TrainerError)}


def _plain(value: Any) -> Any:
    if isinstance(value, _Answer):
        return {"method": value.method, "client": value.client, "request": value.request, "result": _plain(value.result), "kept": value.kept, "given_up": value.given_up,
                "error": None if value.error is None else _plain_error(value.error)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__name__, **{f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _plain_error(error: TrainerError) -> dict[str, Any]:
    kind = type(error).__name__ if type(error).__name__ in _ERRORS else "TrainerError"
    return {"kind": kind, "message": error.message, "reason": error.reason, "metadata": dict(error.metadata),
            "violations": [[v.field, v.description] for v in error.violations]}


def _from_plain(plain: dict[str, Any]) -> _Answer:
    error = plain["error"]
    return _Answer(
        method=str(plain["method"]), client=str(plain.get("client", "")), request=str(plain.get("request", "")), result=_value(plain["result"]), kept=bool(plain["kept"]), given_up=bool(plain["given_up"]),
        error=None if error is None else _ERRORS[error["kind"]](
            str(error["message"]), str(error["reason"]),
            tuple(errors.FieldViolation(str(f), str(d)) for f, d in error["violations"]),
            {str(k): str(v) for k, v in error["metadata"].items()},
        ),
    )


def _current(number: int, answer: _Answer, described: SessionDescription, epoch: str) -> _Answer:
    """``answer`` (operation ``number``'s, read from a checkpoint) in the shape this release keeps.

    The release before answers carried ``replayed`` kept ConfigureOptimizer's answer as its
    OptimizerSpec alone; now it is the session's description, whose ``optimizer`` and ``replayed``
    the servicer reads, so the repeat of such an answer would fail. It becomes ``described`` (the
    session as the checkpoint restored it) with that optimizer and the numbering the answer had:
    its ``optimizer`` is all a repeat's ConfigureOptimizerResponse carries. (That release's
    FreezeResult and SessionDescription lack only ``replayed``, which reads back as False.)"""
    from remote_trainer.engine.optimizer import OptimizerSpec

    if answer.method == "ConfigureOptimizer" and isinstance(answer.result, OptimizerSpec):
        result = dataclasses.replace(described, optimizer=answer.result, next_operation=number, operation_epoch=epoch,
                                     replayed=False)
        return dataclasses.replace(answer, result=result)
    return answer


def _value(plain: Any) -> Any:
    if isinstance(plain, dict) and "type" in plain:
        kind = _answer_types()[plain["type"]]
        fields = {f.name: f for f in dataclasses.fields(kind)}
        values = {k: _value(v) for k, v in plain.items() if k != "type"}
        for name, field in fields.items():  # tuples were written as lists
            if name in values and isinstance(values[name], list) and "tuple" in str(field.type):
                values[name] = tuple(values[name])
        return kind(**values)
    if isinstance(plain, list):
        return [_value(v) for v in plain]
    return plain


class _Numbered(Protocol):
    ledger: Ledger


def numbered(method: Callable[P, T]) -> Callable[P, T]:
    """A method that changes its session (an engine with a ``ledger``), run under its ``operation=``
    number when one is given (``Ledger.run``: in order, at most once, a repeat answered from the
    record). The method declares ``operation`` for its signature's sake: it is taken here, never
    passed on."""

    @functools.wraps(method)
    def run(self: _Numbered, *args: Any, operation: Operation | None = None, **kwargs: Any) -> T:
        if operation is None:
            return method(self, *args, **kwargs)  # type: ignore[arg-type]
        return self.ledger.run(operation, lambda: method(self, *args, **kwargs))  # type: ignore[arg-type]

    return cast(Callable[P, T], run)
