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
from typing import Any, cast

import grpc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from remote_trainer.client import Session, TrainerClient, core
from remote_trainer.server.app import TrainerServer, create_server
from remote_trainer.server.settings import Settings
from tests.conftest import rand
from tests.fuzz_requests import BUILDERS, INT64_MAX, MAX_BATCH, MAX_ELEMENTS, Request, describe, requests
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

    def __repr__(self) -> str:
        return f"Fuzzer(port={self.running.port}, sent={self.sent})"

    def call(self, method: str, request: Any) -> tuple[Code, str]:
        """Sends one request through the raw channel; returns its status code and message."""
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
                if name == "CreateSession":  # a session the fuzz made by chance: close it at once
                    created = pb.CreateSessionResponse.FromString(cast(bytes, response)).session.session_id
                    self.client.call(self.client.stub.CloseSession, pb.CloseSessionRequest(session_id=created))
            code, message = Code.OK, ""
        except grpc.RpcError as exc:
            code, message = exc.code(), exc.details() or ""
        self.codes[f"{name} {code.name}"] += 1
        return code, message

    def take_fingerprint(self) -> bytes:
        """The victim's state, cheaply: its description, and the statistics of every parameter,
        buffer and gradient (norm, min, max, mean, non-finite count) as the server sends them."""
        stub = self.client.stub
        parts = [stub.DescribeSession(pb.DescribeSessionRequest(), timeout=120).SerializeToString()]
        for r in stub.GetParameters(pb.GetParametersRequest(stats_only=True, include_buffers=True), timeout=120):
            parts.append(r.SerializeToString())
        for g in stub.GetGradients(pb.GetGradientsRequest(stats_only=True), timeout=120):
            parts.append(g.SerializeToString())
        return b"".join(struct.pack("<I", len(p)) + p for p in parts)

    def prime(self) -> None:
        """Keeps the victim useful to fuzz: the 1000-class head that plausible labels fit, trainable
        parameters, and a pending forward with its graph."""
        victim = self.client.session()
        info = victim.info()
        changed = False
        if info.num_classes != 1000:
            victim.replace_head(1000)
            changed = True
        if info.trainable_parameters == 0:
            victim.unfreeze("*")
            changed = True
        if changed or info.pending_forward_id == 0:
            victim.forward(rand(2, 3, 32, 32), stats_only=True)
            changed = True
        if changed or not self.fingerprint:
            self.fingerprint = self.take_fingerprint()


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainerServer]:
    """Checkpoints within a quota of about two of them, shared-memory regions of at most 1 MiB."""
    running = create_server(Settings(
        port=0, weights="random", max_sessions=4, max_batch=MAX_BATCH, max_input_elements=MAX_ELEMENTS,
        checkpoint_dir=str(tmp_path_factory.mktemp("fuzz-checkpoints")), max_checkpoint_bytes=256 * 1024 * 1024,
        allow_shared_memory=1, max_shared_memory_bytes=1024 * 1024, log_level="WARNING",
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
        code, message = fuzzer.call(method, request)
        call = describe(method, request)
        since.append(f"{call} -> {code.name}")
        assert code not in (Code.INTERNAL, Code.UNKNOWN), (
            f"{call} got {code.name}: {message}\n" + "\n".join(since[:-1]) + "\n--- server:\n" + fuzzer.errors.last()
        )
        assert code == Code.OK or code in CLIENT_ERRORS, f"{call} got {code.name}: {message}"
        if code == Code.OK and method in MUTATING:
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
        code, message = fuzzer.call(method, request)
        assert code not in (Code.INTERNAL, Code.UNKNOWN), (
            f"{describe(method, request)} got {code.name}: {message}\n--- server:\n" + fuzzer.errors.last()
        )
        if code == Code.OK and method in MUTATING:
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
