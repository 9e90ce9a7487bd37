"""Fuzzing: thousands of malformed or random requests to a live server, none of which may hurt it.

Hypothesis draws runs of requests over every RPC of TrainerService (the table in
tests/fuzz_requests.py, checked against the service's descriptor): random shapes (negative, empty,
huge, too many dimensions), data types (unknown enum values too), raw byte lengths that do not match,
the three input forms (raw ``Tensor``, ``TensorValues``, ``TensorGenerator``), patterns, session and
forward ids, loss functions, optimizer values (NaN, infinite, negative), output formats, transfer
types and option combinations, checkpoint names, watches and shared-memory sizes; plus a few requests
that are not protobuf at all. Properties:

- a client's mistake never gets INTERNAL or UNKNOWN (those mean the server broke);
- the server keeps serving (health SERVING after every run);
- a rejected call changes nothing: the session's fingerprint (DescribeSession plus stats-only
  GetParameters with buffers and GetGradients, compared bit for bit) after a run of rejected calls
  equals the fingerprint before it. Hypothesis shrinks a failing run to the one call that did it.
  ``test_rejected_calls_leave_every_array_identical`` then compares full arrays.
- exactly once (docs/reliability.md): the calls that change a session are often numbered
  (``fuzz_requests.Numbering``), among them repeats of the run's earlier numbered calls. A repeat of a
  number the session answered (a success, or an error that used the number), with the same request,
  gets the same answer (the same response, or the same code and reason) and changes nothing: neither
  the fingerprint nor the number the session expects next. A repeat with another request (another
  RPC, or one field changed: ``fuzz_requests.altered``) is refused ``INVALID_ARGUMENT``
  ``OPERATION_MISMATCH``. Either may instead be
  ``OPERATION_FORGOTTEN`` once the session has moved ``KEEP_ANSWERS`` numbers past it.

The victim is the server's default session (it cannot be closed, so runs never lose it), kept with a
pending forward whose graph is retained so that Backward's label checks are reached. A bystander
session that no fuzzed call names is compared array for array at the end.

CI runs ``FUZZ_EXAMPLES`` runs (default 300, about 2,000 requests); set it higher for a longer hunt:
``FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import logging
import os
import struct
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
import pytest
from google.protobuf import message_factory
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from remote_trainer.client import Session, TrainerClient, core
from remote_trainer.client.errors import from_rpc_error
from remote_trainer.engine.ledger import KEEP_ANSWERS
from remote_trainer.server.app import TrainerServer, create_server
from remote_trainer.server.settings import Settings
from tests.conftest import rand
from tests.fuzz_requests import BUILDERS, INT64_MAX, MAX_BATCH, MAX_ELEMENTS, Numbered, Request, altered, describe, requests
from tests.test_errors import State, assert_same_state, state_of
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
SERVICE = "/trainer.v1.TrainerService/"
Code = grpc.StatusCode

# A client's mistake gets one of these; INTERNAL and UNKNOWN mean the server broke.
CLIENT_ERRORS = {
    Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED, Code.OUT_OF_RANGE,
}
TRAINER_SERVICE = pb.DESCRIPTOR.services_by_name["TrainerService"]
# Calls that may change a session when they succeed: those the SDK numbers; the others only read it
# (SaveCheckpoint, DeleteCheckpoint and OpenSharedMemory change files and regions, not the session;
# CreateSession and CloseSession never touch the victim: the default session cannot be closed).
MUTATING = {method.rsplit("/", 1)[1] for method in core.NUMBERED}
STREAMING = {method.name for method in TRAINER_SERVICE.methods if method.server_streaming}
# A stream that ends only with its session: the fuzzer takes its first answer, then cancels it.
ENDLESS = {"WatchSession"}
RESPONSES = {method.name: message_factory.GetMessageClass(method.output_type) for method in TRAINER_SERVICE.methods}
VICTIM_IDS = ("", "default")


@dataclass
class Reply:
    """How a fuzzed call ended: its code and details, the answer of a unary call that succeeded, the
    error's ErrorInfo; ``may_change``: an accepted call that may have changed the session (not a
    repeat the session answered from its record)."""

    code: Code
    message: str = ""
    response: Any = None
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    may_change: bool = True


@dataclass(frozen=True)
class Sent:
    """A numbered call the fuzz sent in this run: the RPC, the request as sent (with its operation), the reply."""

    method: str
    request: Any
    reply: Reply

    @property
    def answered(self) -> bool:
        """Whether the session recorded an answer under its number (a success, or an error that used
        the number: it says the next one), which a repeat must get again."""
        return self.request.operation.number != 0 and self.request.session_id in VICTIM_IDS and (
            self.reply.code == Code.OK or "next_operation" in self.reply.metadata)


def _content(request: Any) -> bytes:
    """What a request asks, as the server compares a repeat with the first call: all but its
    operation and session id."""
    rest = type(request)()
    rest.CopyFrom(request)
    rest.ClearField("operation")
    rest.ClearField("session_id")
    return cast(bytes, rest.SerializeToString(deterministic=True))

# -- the live server and the session state -----------------------------------------------------------


class Fuzzer:
    """The live server, a client and what the fuzz has seen so far.

    A plain class with a short repr: hypothesis prints the arguments of a failing example.
    """

    def __init__(self, running: TrainerServer, client: TrainerClient, channel: grpc.Channel, errors: ServerErrors) -> None:
        self.running = running
        self.errors = errors
        self.client = client
        self.channel = channel
        self.fingerprint = b""
        self.codes: Counter[str] = Counter()
        self.sent = 0
        self.full_checks = 0  # stretches of rejected calls compared array for array
        self.full_checked_calls = 0
        self.numbered: list[Sent] = []  # the run's numbered calls, for its repeats
        self.repeats: Counter[str] = Counter()  # repeats checked, by what they were expected to get
        self.numbered_answers: Counter[str] = Counter()  # numbered calls, by how they were numbered and the answer

    def __repr__(self) -> str:
        return f"Fuzzer(port={self.running.port}, sent={self.sent})"

    def call(self, method: str, request: Any) -> Reply:
        """Sends one request through the raw channel (a ``Numbered`` one numbered first, and checked
        when it repeats an earlier number); returns how it ended."""
        if isinstance(request, Numbered):
            return self.call_numbered(method, request)
        return self.send(method, request)

    def send(self, method: str, request: Any) -> Reply:
        self.sent += 1
        garbage = method.startswith("garbage:")
        name = method.split(":")[-1]
        streaming = name in STREAMING
        make = self.channel.unary_stream if streaming else self.channel.unary_unary
        # Requests travel pre-serialised, so garbage bytes go the same way as real messages.
        rpc = make(SERVICE + name, request_serializer=None, response_deserializer=None)
        payload = request if garbage else request.SerializeToString()
        try:
            if name in ENDLESS:
                responses = rpc(payload, timeout=120)
                next(responses)  # accepted: the recent events came (an error is raised here instead)
                responses.cancel()
            elif streaming:
                for _ in rpc(payload, timeout=120):
                    pass
            else:
                response = rpc(payload, timeout=120)
                answer = RESPONSES[name].FromString(cast(bytes, response))
                if name == "CreateSession":  # a session the fuzz made by chance: close it at once
                    created = answer.session.session_id
                    self.client.call(self.client.stub.CloseSession, pb.CloseSessionRequest(session_id=created))
                self.codes[f"{name} OK"] += 1
                return Reply(Code.OK, response=answer)
            reply = Reply(Code.OK)
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
            reply = Reply(exc.code(), exc.details() or "", reason=error.reason, metadata=error.metadata)
        self.codes[f"{name} {reply.code.name}"] += 1
        return reply

    def expected(self) -> tuple[int, str]:
        """The number the victim expects next, and its numbering's epoch."""
        info = self.client.stub.DescribeSession(pb.DescribeSessionRequest(), timeout=120).session
        return info.next_operation, info.operation_epoch

    def call_numbered(self, method: str, numbered: Numbered) -> Reply:
        """Numbers the request as drawn, sends it, and checks what a repeat of an answered number gets."""
        how = numbered.numbering
        expected, epoch = self.expected()
        earlier = self.numbered[-1 - how.value % len(self.numbered)] if how.place == "repeat" and self.numbered else None
        if earlier is not None:
            # The earlier call's request again, or altered, or this one in its place; on the same
            # session, named one way or the other ("" and "default" name the victim); supersede as drawn.
            if how.request == "other":
                request = type(numbered.request)()
                request.CopyFrom(numbered.request)
            elif how.request == "altered":
                method = earlier.method
                request = altered(method, earlier.request)
            else:
                method = earlier.method
                request = type(earlier.request)()
                request.CopyFrom(earlier.request)
            request.operation.CopyFrom(earlier.request.operation)
            request.session_id = earlier.request.session_id
            if request.session_id in VICTIM_IDS and how.value % 2:
                request.session_id = VICTIM_IDS[1 - VICTIM_IDS.index(request.session_id)]
        else:
            request = type(numbered.request)()
            request.CopyFrom(numbered.request)
            if how.place == "next":
                number = expected
            elif how.place == "ahead":
                number = expected + (how.value if 0 < how.value <= 2**21 else 1)
            else:
                number = how.value
            request.operation.number = number
            request.operation.client = how.client
            request.operation.epoch = {"session": epoch, "": ""}.get(how.epoch, how.epoch)
        request.operation.supersede = how.supersede
        reply = self.send(method, request)
        self.numbered_answers[f"{how.place} {reply.reason or reply.code.name}"] += 1
        sent = Sent(method, request, reply)
        if earlier is not None and earlier.answered:
            self.check_repeat(earlier, sent, expected)
        self.numbered.append(sent)
        return reply

    def check_repeat(self, earlier: Sent, repeat: Sent, expected: int) -> None:
        """A repeat of a number the session answered: the same request gets the same answer and uses
        no number (the fingerprint, compared at the run's end, shows it changed nothing else); another
        request is refused. Either may find the answer forgotten once the session moved far enough."""
        got = repeat.reply
        now, _ = self.expected()
        call = f"{describe(repeat.method, repeat.request)} repeating {describe(earlier.method, earlier.request)}"
        forgotten = got.reason == "OPERATION_FORGOTTEN" and now - repeat.request.operation.number > KEEP_ANSWERS
        same = earlier.method == repeat.method and _content(earlier.request) == _content(repeat.request)
        if forgotten:
            self.repeats["forgotten"] += 1
        elif same:
            first = earlier.reply
            assert (got.code, got.reason, got.response) == (first.code, first.reason, first.response), (
                f"{call}: the repeat got {got.code.name} {got.reason} {got.message}, not the first answer "
                f"{first.code.name} {first.reason} {first.message}\n--- server:\n{self.errors.last()}"
            )
            self.repeats["answered again"] += 1
        else:
            assert (got.code, got.reason) == (Code.INVALID_ARGUMENT, "OPERATION_MISMATCH"), (
                f"{call}: a repeat with another request got {got.code.name} {got.reason} {got.message}"
            )
            self.repeats["refused as another request"] += 1
        assert now == expected, f"{call}: the repeat moved the session's next number from {expected} to {now}"
        got.may_change = False

    def take_fingerprint(self) -> bytes:
        """The victim's state, cheaply: its description, and the statistics of every parameter,
        buffer and gradient (norm, min, max, mean, non-finite count) as the server sends them."""
        stub = self.client.stub
        description = stub.DescribeSession(pb.DescribeSessionRequest(), timeout=120)
        description.session.next_operation = 0  # a refusal uses its number, by design (checked apart)
        parts = [description.SerializeToString()]
        for r in stub.GetParameters(pb.GetParametersRequest(stats_only=True, include_buffers=True), timeout=120):
            parts.append(r.SerializeToString())
        for g in stub.GetGradients(pb.GetGradientsRequest(stats_only=True), timeout=120):
            parts.append(g.SerializeToString())
        return b"".join(struct.pack("<I", len(p)) + p for p in parts)

    def prime(self) -> None:
        """Keeps the victim useful to fuzz: the 1000-class head that plausible labels fit, trainable
        parameters, and a pending forward with its graph. Unnumbered calls through the raw stub: the
        fuzz numbers the victim's calls too, so the SDK's own count would be out of step."""
        self.numbered.clear()
        stub = self.client.stub
        info = stub.DescribeSession(pb.DescribeSessionRequest(), timeout=120).session
        changed = False
        if info.num_classes != 1000:
            stub.ReplaceHead(pb.ReplaceHeadRequest(num_classes=1000), timeout=120)
            changed = True
        if info.trainable_parameters == 0:
            stub.FreezeLayers(pb.FreezeLayersRequest(patterns=["*"], unfreeze=True), timeout=120)
            changed = True
        if changed or info.pending_forward_id == 0:
            image = pb.TensorInput(generate=pb.TensorGenerator(shape=[2, 3, 32, 32], distribution=pb.DISTRIBUTION_UNIFORM))
            stub.Forward(pb.ForwardRequest(input=image, output_format=pb.OUTPUT_FORMAT_STATS_ONLY), timeout=120)
            changed = True
        if changed or not self.fingerprint:
            self.fingerprint = self.take_fingerprint()


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainerServer]:
    """Checkpoints within a quota of about two of them, shared-memory regions of at most 1 MiB, and a
    short wait for missing operation numbers (the fuzz sends one call at a time: none ever comes)."""
    running = create_server(Settings(
        port=0, weights="random", max_sessions=4, max_batch=MAX_BATCH, max_input_elements=MAX_ELEMENTS,
        checkpoint_dir=str(tmp_path_factory.mktemp("fuzz-checkpoints")), max_checkpoint_bytes=256 * 1024 * 1024,
        allow_shared_memory=1, max_shared_memory_bytes=1024 * 1024, log_level="WARNING",
        operation_order_wait_seconds=0.05,  # a number drawn ahead waits this long for the ones before it
    ))
    yield running
    running.stop(None).wait()


@pytest.fixture(scope="module")
def fuzzer(fuzz_server: TrainerServer) -> Iterator[Fuzzer]:
    with TrainerClient(f"localhost:{fuzz_server.port}", timeout=120) as client:
        victim = client.session()
        victim.forward(rand(2, 3, 32, 32))
        victim.backward("sum", rand(2, 1000))
        victim.step()
        victim.forward(rand(2, 3, 32, 32, seed=1))
        victim.backward("sum", rand(2, 1000), retain_graph=True)
        channel = grpc.insecure_channel(f"localhost:{fuzz_server.port}")
        errors = ServerErrors()
        status_log = logging.getLogger("remote_trainer.server.status")
        status_log.addHandler(errors)
        try:
            yield Fuzzer(fuzz_server, client, channel, errors)
        finally:
            status_log.removeHandler(errors)
            channel.close()


class Bystander:
    """A session no fuzzed call names, and its state before the fuzz."""

    def __init__(self, session: Session, before: State) -> None:
        self.session = session
        self.before = before

    def __repr__(self) -> str:
        return f"Bystander({self.session.session_id})"


@pytest.fixture(scope="module")
def bystander(fuzzer: Fuzzer) -> Iterator[Bystander]:
    """A session with gradients and a step taken, which no fuzzed call names."""
    with fuzzer.client.create_session(seed=3) as s:
        s.forward(rand(2, 3, 32, 32))
        s.backward("mse", rand(2, 1000))
        s.step()
        yield Bystander(s, state_of(s))


class ServerErrors(logging.Handler):
    """Keeps the tracebacks the server logs for INTERNAL answers, to show with a failure."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: deque[str] = deque(maxlen=5)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))

    def last(self) -> str:
        return self.records[-1] if self.records else "(no traceback logged)"


def test_the_fuzz_draws_every_rpc_of_the_service() -> None:
    """The fuzz's table of RPCs is the service's, read from its descriptor: a new RPC fails this
    until the fuzz draws its requests."""
    assert set(BUILDERS) == {method.name for method in TRAINER_SERVICE.methods}
    assert MUTATING <= set(BUILDERS) and ENDLESS <= STREAMING


def check(fuzzer: Fuzzer, run: list[Request]) -> None:
    """Sends a run of requests to the victim and checks the three properties."""
    fuzzer.prime()
    since: list[str] = []  # the calls since the fingerprint was last taken
    for method, request in run:
        reply = fuzzer.call(method, request)
        code, message = reply.code, reply.message
        call = describe(method, request)
        since.append(f"{call} -> {code.name}")
        assert code not in (Code.INTERNAL, Code.UNKNOWN), (
            f"{call} got {code.name}: {message}\n" + "\n".join(since[:-1]) + "\n--- server:\n" + fuzzer.errors.last()
        )
        assert code == Code.OK or code in CLIENT_ERRORS, f"{call} got {code.name}: {message}"
        if code == Code.OK and method in MUTATING and reply.may_change:
            fuzzer.fingerprint = fuzzer.take_fingerprint()  # accepted: the session may have changed
            since.clear()
    after = fuzzer.take_fingerprint()
    assert after == fuzzer.fingerprint, "a rejected or read-only call changed the session:\n" + "\n".join(since)
    assert fuzzer.client.health() == "SERVING"


@settings(
    max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
@given(run=st.lists(requests(), min_size=1, max_size=12))
# What the fuzz found once, kept as fixed examples (each got INTERNAL before it was fixed):
# a bfloat16 scalar decoded to a numpy scalar, not an array;
@example(run=[("Forward", pb.ForwardRequest(input=pb.TensorInput(tensor=pb.Tensor(data_type=pb.DATA_TYPE_BFLOAT16, raw_data=b"\0\0"))))])
# shapes with a zero beside a huge size, which numpy ("array is too big") and torch ("stride
# calculation overflowed") refuse, in each input form, and more dimensions than numpy holds;
@example(run=[("Forward", pb.ForwardRequest(input=pb.TensorInput(tensor=pb.Tensor(shape=[0, INT64_MAX], data_type=pb.DATA_TYPE_FLOAT32))))])
@example(run=[("Backward", pb.BackwardRequest(loss=pb.Loss(function=pb.LOSS_FUNCTION_MSE, labels=pb.TensorInput(values=pb.TensorValues(shape=[0, INT64_MAX])))))])
@example(run=[("Forward", pb.ForwardRequest(input=pb.TensorInput(generate=pb.TensorGenerator(shape=[0, 2**62, 4], distribution=pb.DISTRIBUTION_ONES))))])
@example(run=[("Forward", pb.ForwardRequest(input=pb.TensorInput(tensor=pb.Tensor(shape=[1] * 65, data_type=pb.DATA_TYPE_FLOAT32, raw_data=bytes(4)))))])
# a CreateSession head of 2**31 classes (no upper bound: allocation failed; 10**7 would take 20 GB).
@example(run=[("CreateSession", pb.CreateSessionRequest(num_classes=2**31))])
# bytes that are not a request message (grpcio's own deserialisation answered INTERNAL);
@example(run=[("garbage:Forward", b"\x0a\xff\xff\xff\xff\x0f"), ("garbage:GetGradients", b"\x00")])
# an optimizer value beyond float32 (Adam weight_decay 1e300), accepted, then every Step failed;
@example(run=[
    ("ConfigureOptimizer", pb.ConfigureOptimizerRequest(optimizer=pb.OptimizerConfig(kind=pb.OPTIMIZER_KIND_ADAM, weight_decay=1e300))),
    ("Step", pb.StepRequest()),
])
# a Backward through a graph kept with retain_graph after a Step changed the parameters in place.
@example(run=[
    ("Backward", pb.BackwardRequest(retain_graph=True, output_gradient=pb.TensorInput(
        generate=pb.TensorGenerator(shape=[2, 1000], distribution=pb.DISTRIBUTION_UNIFORM)))),
    ("Step", pb.StepRequest()),
    ("Backward", pb.BackwardRequest(loss=pb.Loss(function=pb.LOSS_FUNCTION_SUM_DIFFERENCE, labels=pb.TensorInput(
        generate=pb.TensorGenerator(shape=[2, 1000], distribution=pb.DISTRIBUTION_ONES))))),
])
def test_fuzzed_requests_never_break_the_server(fuzzer: Fuzzer, bystander: Bystander, run: list[Request]) -> None:
    check(fuzzer, run)


@settings(
    max_examples=max(5, EXAMPLES // 20), deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
@given(run=st.lists(requests(), min_size=5, max_size=15))
def test_rejected_calls_leave_every_array_identical(fuzzer: Fuzzer, run: list[Request]) -> None:
    """The full comparison: every parameter, buffer and gradient array and the session's description,
    bit for bit, from after the run's last accepted change (or its start) to its end."""
    fuzzer.prime()
    victim = fuzzer.client.session()
    before = state_of(victim)
    since: list[str] = []
    for method, request in run:
        reply = fuzzer.call(method, request)
        code, message = reply.code, reply.message
        assert code not in (Code.INTERNAL, Code.UNKNOWN), (
            f"{describe(method, request)} got {code.name}: {message}\n--- server:\n" + fuzzer.errors.last()
        )
        if code == Code.OK and method in MUTATING and reply.may_change:
            before = state_of(victim)  # an accepted change: compare from here
            since.clear()
            fuzzer.fingerprint = b""  # and the cheap test takes a new fingerprint
        else:
            since.append(f"{describe(method, request)} -> {code.name}")
    if since:
        try:
            assert_same_state(before, state_of(victim))
        except AssertionError as exc:
            raise AssertionError("one of these calls changed the session:\n" + "\n".join(since)) from exc
        fuzzer.full_checks += 1
        fuzzer.full_checked_calls += len(since)


def test_bystander_untouched_and_summary(fuzzer: Fuzzer, bystander: Bystander, capsys: pytest.CaptureFixture[str]) -> None:
    """No fuzzed call reached the bystander session; prints what was sent and what came back."""
    assert_same_state(bystander.before, state_of(bystander.session))
    assert fuzzer.client.health() == "SERVING"
    with capsys.disabled():
        print(f"\nfuzz: {fuzzer.sent} requests; {fuzzer.full_checks} stretches of {fuzzer.full_checked_calls} "
              "rejected or read-only calls compared array for array")
        for key, count in sorted(fuzzer.codes.items()):
            print(f"  {key}: {count}")
        print("  numbered calls: " + ", ".join(f"{k} {n}" for k, n in sorted(fuzzer.numbered_answers.items())))
        print("  repeats of answered numbers: " + (", ".join(f"{k} {n}" for k, n in sorted(fuzzer.repeats.items())) or "none"))
    if EXAMPLES >= 100 and fuzzer.numbered:  # a run as long as CI's checked repeats of both kinds (none would prove nothing)
        assert fuzzer.repeats["answered again"] and fuzzer.repeats["refused as another request"], fuzzer.repeats
