"""Fuzzing: thousands of malformed or random requests to a live server, none of which may hurt it.

Hypothesis draws runs of requests over every RPC of TrainerService: random shapes (negative, empty,
huge, too many dimensions), data types (unknown enum values too), raw byte lengths that do not match,
the three input forms (raw ``Tensor``, ``TensorValues``, ``TensorGenerator``), patterns, session and
forward ids, loss functions, optimizer values (NaN, infinite, negative), output formats, transfer
types and option combinations; plus a few requests that are not protobuf at all. Properties:

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
import math
import os
import struct
from collections import Counter, deque
from collections.abc import Iterator
from typing import Any, cast

import grpc
import pytest
from google.protobuf import text_format
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from remote_trainer.client import Session, TrainerClient
from remote_trainer.server.app import TrainerServer, create_server
from remote_trainer.server.settings import Settings
from tests.conftest import rand
from tests.test_errors import State, assert_same_state, state_of
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
SERVICE = "/trainer.v1.TrainerService/"
Code = grpc.StatusCode

# A client's mistake gets one of these; INTERNAL and UNKNOWN mean the server broke.
CLIENT_ERRORS = {
    Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED, Code.OUT_OF_RANGE,
}
# Calls that may change a session when they succeed; the others only read.
# (CreateSession and CloseSession never touch the victim: the default session cannot be closed.)
MUTATING = {"Forward", "Backward", "Step", "ZeroGrad", "ConfigureOptimizer", "FreezeLayers", "ReplaceHead", "ResetSession", "TrainStep"}
STREAMING = {"GetGradients", "GetParameters"}

# Small limits keep every accepted forward cheap on a CPU: at most 4 images of 3x64x64 elements.
MAX_BATCH = 4
MAX_ELEMENTS = 4 * 3 * 64 * 64

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# -- strategies ------------------------------------------------------------------------------------

# Session ids: mostly the victim (the default session, by "" or its name), else ids that name nothing.
_victim_ids = st.sampled_from(["", "", "", "default"])
_other_ids = st.one_of(st.sampled_from(["0" * 32, "DEFAULT", " default", "default\x00", "..", "*"]), st.text(max_size=40))
session_ids = st.integers(0, 9).flatmap(lambda k: _victim_ids if k < 7 else _other_ids)

int64s = st.one_of(
    st.sampled_from([0, 1, -1, 2, 7, INT64_MIN, INT64_MAX, 2**31, -(2**31), 2**32]), st.integers(INT64_MIN, INT64_MAX)
)


# Enum values in and out of range (proto3 enums are open: any int32 travels).
def enum_values(known: int) -> st.SearchStrategy[int]:
    """Mostly the enum's own values (so that the rest of a request gets checked too), else unknown ones."""
    unknown = st.sampled_from([known + 1, 99, -1, 2**31 - 1, -(2**31)])
    return st.integers(0, 4).flatmap(lambda k: st.integers(0, known) if k else unknown)


# A dimension: plausible sizes, edges around the server's checks, and sizes that overflow.
dims = st.one_of(
    st.sampled_from([1, 2, 3, 2, 3, 32, 32, 33, 64]),
    st.integers(-3, 70),
    st.sampled_from([1000, 10**6, 2**31, 2**40, 2**62, INT64_MAX, INT64_MIN]),
)
shapes = st.one_of(
    st.lists(dims, max_size=6),
    # (N, 3, H, W) images and (N, C) / (N,) labels, close to what the server takes.
    st.tuples(st.integers(0, MAX_BATCH + 1), st.sampled_from([3, 3, 1, 4]), st.sampled_from([16, 31, 32, 33, 48]),
              st.sampled_from([32, 33, 40])).map(list),
    st.tuples(st.integers(0, 3), st.sampled_from([1000, 1000, 10, 999, 1001])).map(list),
    st.integers(0, 3).map(lambda n: [n]),
    # Many dimensions (numpy arrays have at most 64).
    st.integers(30, 80).flatmap(lambda k: st.sampled_from([[1] * k, [0] * k, [0, 2**40, 2**40] + [1] * k])),
)
special_floats = st.sampled_from([0.0, 1.0, -1.0, math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, 0.5, 1e-3, 1e300])
floats = st.one_of(special_floats, st.floats(allow_nan=True, allow_infinity=True))


def _count(shape: list[int]) -> int | None:
    """Elements of a shape, or None when it is negative or too big to send."""
    if any(d < 0 for d in shape):
        return None
    n = math.prod(shape)
    return n if n <= MAX_ELEMENTS else None


_ITEMSIZE = {1: 4, 2: 2, 3: 2, 4: 8, 5: 8, 6: 4}
_NUMPY = {1: "<f4", 2: "<f2", 4: "<f8", 5: "<i8", 6: "<i4"}


@st.composite
def raw_tensors(draw: st.DrawFn) -> pb.Tensor:
    """A raw Tensor: any shape and data type; bytes that fit them (with NaN/inf at times) or not."""
    shape = draw(shapes)
    data_type = draw(st.one_of(st.sampled_from([1, 1, 1, 2, 3, 4, 5, 6]), enum_values(6)))
    n = _count(shape)
    kind = draw(st.sampled_from(["fit", "fit", "fit", "short", "long", "random"]))
    if kind == "random" or n is None or data_type not in _ITEMSIZE:
        raw = draw(st.binary(max_size=64))
    else:
        size = n * _ITEMSIZE[data_type]
        if data_type in _NUMPY:
            values = rand(n, seed=draw(st.integers(0, 3))).astype(_NUMPY[data_type])
            if n and data_type in (1, 2, 4) and draw(st.booleans()):
                values[draw(st.integers(0, n - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
            raw = values.tobytes()
        else:  # bfloat16: any bit patterns, NaN and infinity included
            raw = draw(st.binary(min_size=min(size, 64), max_size=min(size, 64))) * (size // 64 + 1)
            raw = raw[:size]
        if kind == "short":
            raw = raw[: max(0, size - draw(st.integers(1, 8)))]
        elif kind == "long":
            raw += bytes(draw(st.integers(1, 8)))
    return pb.Tensor(shape=shape, data_type=data_type, raw_data=raw)  # type: ignore[arg-type]


@st.composite
def value_tensors(draw: st.DrawFn) -> pb.TensorValues:
    """TensorValues: a shape and numbers that fill it (or not), NaN and infinity included."""
    shape = draw(shapes)
    n = _count(shape)
    if n is not None and n <= 64 and draw(st.booleans()):
        values = draw(st.lists(floats, min_size=n, max_size=n))
    elif n is not None and draw(st.booleans()):
        values = [float(v) for v in rand(n, seed=1)]
        if n and draw(st.booleans()):
            values[draw(st.integers(0, n - 1))] = draw(special_floats)
    else:
        values = draw(st.lists(floats, max_size=8))
    return pb.TensorValues(shape=shape, values=values)


generators = st.builds(
    lambda shape, distribution, seed, high: pb.TensorGenerator(shape=shape, distribution=distribution, seed=seed, high=high),
    shapes, st.one_of(st.integers(1, 5), enum_values(5)), int64s, int64s,
)


@st.composite
def plausible_inputs(draw: st.DrawFn) -> pb.TensorInput:
    """Inputs the server may well accept: a batch of 2 images, logits-shaped labels, class indices.

    They let accepted calls happen (so later calls meet a changed session) and carry the fuzz past
    the tensor checks to the options around them.
    """
    message = pb.TensorInput()
    kind = draw(st.sampled_from(["image", "image", "labels", "classes"]))
    if kind == "image":
        if draw(st.booleans()):
            array = rand(2, 3, 32, 32, seed=draw(st.integers(0, 3)))
            message.tensor.CopyFrom(pb.Tensor(shape=[2, 3, 32, 32], data_type=pb.DATA_TYPE_FLOAT32, raw_data=array.tobytes()))
        else:
            message.generate.CopyFrom(pb.TensorGenerator(shape=[2, 3, 32, 32], distribution=draw(st.integers(1, 4)), seed=draw(int64s)))  # type: ignore[arg-type]
    elif kind == "labels":
        message.generate.CopyFrom(pb.TensorGenerator(shape=[2, draw(st.sampled_from([1000, 10, 1]))], distribution=draw(st.integers(1, 4))))  # type: ignore[arg-type]
    elif draw(st.booleans()):
        message.values.CopyFrom(pb.TensorValues(shape=[2], values=draw(st.lists(st.sampled_from([0.0, 1.0, 9.0, 999.0, -1.0, 1000.0, 0.5]), min_size=2, max_size=2))))
    else:
        message.generate.CopyFrom(pb.TensorGenerator(shape=[2], distribution=pb.DISTRIBUTION_RANDINT, high=draw(st.sampled_from([1, 10, 1000, 1001]))))
    return message


@st.composite
def tensor_inputs(draw: st.DrawFn) -> pb.TensorInput:
    """A TensorInput in any of its three forms, or none, or one the server may accept."""
    message = pb.TensorInput()
    form = draw(st.sampled_from(["tensor", "tensor", "values", "generate", "generate", "none", "plausible", "plausible"]))
    if form == "plausible":
        return draw(plausible_inputs())
    if form == "tensor":
        message.tensor.CopyFrom(draw(raw_tensors()))
    elif form == "values":
        message.values.CopyFrom(draw(value_tensors()))
    elif form == "generate":
        message.generate.CopyFrom(draw(generators))
    return message


@st.composite
def optimizer_configs(draw: st.DrawFn) -> pb.OptimizerConfig:
    """Optimizer kinds (unknown too) with any subset of fields set to any value."""
    config = pb.OptimizerConfig(kind=draw(enum_values(3)))  # type: ignore[arg-type]
    for name in ("lr", "momentum", "dampening", "weight_decay", "beta1", "beta2", "eps"):
        if draw(st.booleans()):
            setattr(config, name, draw(floats))
    for name in ("nesterov", "amsgrad"):
        if draw(st.booleans()):
            setattr(config, name, draw(st.booleans()))
    return config


PARAMETER_NAMES = ["*", "fc", "fc.*", "fc.weight", "layer1", "layer4.*", "conv1.weight", "bn1", "layer4.1.bn2.running_mean"]
patterns = st.lists(
    st.one_of(
        st.sampled_from(PARAMETER_NAMES),
        st.sampled_from(["", "layer9", "fc.weights", "[", "[!", "[]", "**", "?", "\\", ".", "layer1.", "*" * 200]),
        st.text(max_size=20),
    ),
    max_size=4,
)
# Head sizes: invalid ones and small valid ones. Large valid sizes are left out on purpose: a head of
# a million classes is legal and allocates gigabytes, which is a limit test, not a fuzz case.
num_classes = st.one_of(st.sampled_from([0, -1, 1_000_001, 2**31, 2**62, INT64_MAX, INT64_MIN]), st.integers(1, 20))
transfer_types = st.one_of(st.sampled_from([0, 1, 2, 3]), enum_values(6))

Request = tuple[str, Any]


def _forward(draw: st.DrawFn, sid: str) -> Request:
    return "Forward", pb.ForwardRequest(
        session_id=sid, input=draw(tensor_inputs()), eval_mode=draw(st.booleans()), no_grad=draw(st.booleans()),
        output_format=draw(enum_values(3)),  # type: ignore[arg-type]
    )


def _backward(draw: st.DrawFn, sid: str) -> Request:
    request = pb.BackwardRequest(
        session_id=sid, forward_id=draw(int64s), retain_graph=draw(st.booleans()), step=draw(st.booleans()),
        zero_grad_after_step=draw(st.booleans()),
    )
    source = draw(st.sampled_from(["loss", "loss", "loss", "output_gradient", "none", "plausible", "plausible"]))
    if source == "plausible":  # a loss and labels that fit the victim's logits, or an output gradient
        function = draw(st.integers(0, 3))
        if function == pb.LOSS_FUNCTION_CROSS_ENTROPY:
            labels = pb.TensorInput(values=pb.TensorValues(shape=[2], values=[3, 999]))
        else:
            labels = pb.TensorInput(generate=pb.TensorGenerator(shape=[2, 1000], distribution=draw(st.integers(1, 4))))  # type: ignore[arg-type]
        if function:
            request.loss.CopyFrom(pb.Loss(function=function, labels=labels))  # type: ignore[arg-type]
        else:
            request.output_gradient.CopyFrom(labels)
        if draw(st.booleans()):
            request.forward_id = 0
    elif source == "loss":
        request.loss.function = draw(enum_values(3))  # type: ignore[assignment]
        if draw(st.integers(0, 5)):
            request.loss.labels.CopyFrom(draw(tensor_inputs()))
    elif source == "output_gradient":
        request.output_gradient.CopyFrom(draw(tensor_inputs()))
    return "Backward", request


def _train_step(draw: st.DrawFn, sid: str) -> Request:
    request = pb.TrainStepRequest(
        session_id=sid, input=draw(tensor_inputs()), return_grad_norm=draw(st.booleans()), return_logits=draw(st.booleans()),
    )
    if draw(st.booleans()):
        request.zero_grad = draw(st.booleans())
    if draw(st.booleans()):  # labels that fit the victim's logits for a batch of 2
        function = draw(st.integers(0, 3))
        if function == pb.LOSS_FUNCTION_CROSS_ENTROPY:
            labels = pb.TensorInput(values=pb.TensorValues(shape=[2], values=[3, 999]))
        else:
            labels = pb.TensorInput(generate=pb.TensorGenerator(shape=[2, 1000], distribution=draw(st.integers(1, 4))))  # type: ignore[arg-type]
        request.loss.CopyFrom(pb.Loss(function=function, labels=labels))  # type: ignore[arg-type]
    else:
        request.loss.function = draw(enum_values(3))  # type: ignore[assignment]
        if draw(st.integers(0, 5)):
            request.loss.labels.CopyFrom(draw(tensor_inputs()))
    return "TrainStep", request


def _configure(draw: st.DrawFn, sid: str) -> Request:
    request = pb.ConfigureOptimizerRequest(session_id=sid)
    if draw(st.integers(0, 5)):
        request.optimizer.CopyFrom(draw(optimizer_configs()))
    return "ConfigureOptimizer", request


def _create(draw: st.DrawFn, sid: str) -> Request:
    weights = draw(st.one_of(
        # "" and "random" build a model (a second or so here): rarely.
        st.sampled_from(["imagenet", "../x.pt", "/etc/passwd", "missing.pt", "a\x00b", ".", "random "]),
        st.sampled_from(["imagenet", "../x.pt", "/etc/passwd", "missing.pt", "a\x00b", ".", "random "]),
        st.sampled_from(["", "random", "auto"]),
        st.text(min_size=1, max_size=20),
    ))
    request = pb.CreateSessionRequest(weights=weights, num_classes=draw(num_classes), seed=draw(int64s))
    if draw(st.booleans()):
        request.optimizer.CopyFrom(draw(optimizer_configs()))
    return "CreateSession", request


@st.composite
def requests(draw: st.DrawFn) -> Request:
    """One request to any RPC of TrainerService."""
    sid = draw(session_ids)
    method = draw(st.sampled_from([
        "Forward", "Forward", "Forward", "Backward", "Backward", "Backward", "Step", "ZeroGrad", "ConfigureOptimizer",
        "ConfigureOptimizer", "FreezeLayers", "FreezeLayers", "ReplaceHead", "ListParameters", "DescribeSession",
        "GetGradients", "GetGradients", "GetParameters", "GetParameters", "GetGraph", "CreateSession", "CloseSession",
        "ResetSession", "ListSessions", "TrainStep", "TrainStep", "garbage",
    ]))
    if method == "Forward":
        return _forward(draw, sid)
    if method == "Backward":
        return _backward(draw, sid)
    if method == "TrainStep":
        return _train_step(draw, sid)
    if method == "ConfigureOptimizer":
        return _configure(draw, sid)
    if method == "CreateSession":
        return _create(draw, sid)
    if method == "ListSessions":
        return method, pb.ListSessionsRequest()
    if method in ("Step", "DescribeSession", "ListParameters", "GetGraph", "CloseSession", "ResetSession"):
        # Steps, zero_grads and resets always succeed on the victim, so they mostly go elsewhere.
        if method in ("Step", "ResetSession") and draw(st.booleans()):
            sid = draw(st.text(min_size=1, max_size=8))
        return method, getattr(pb, method + "Request")(session_id=sid)
    if method == "ZeroGrad":
        request = pb.ZeroGradRequest(session_id=sid if draw(st.booleans()) else draw(st.text(min_size=1, max_size=8)))
        if draw(st.booleans()):
            request.set_to_none = draw(st.booleans())
        return method, request
    if method == "FreezeLayers":
        return method, pb.FreezeLayersRequest(session_id=sid, patterns=draw(patterns), unfreeze=draw(st.booleans()))
    if method == "ReplaceHead":
        return method, pb.ReplaceHeadRequest(session_id=sid, num_classes=draw(num_classes), seed=draw(int64s))
    if method == "GetGradients":
        return method, pb.GetGradientsRequest(
            session_id=sid, patterns=draw(patterns), stats_only=draw(st.booleans()),
            transfer_data_type=draw(transfer_types),  # type: ignore[arg-type]
        )
    if method == "GetParameters":
        return method, pb.GetParametersRequest(
            session_id=sid, patterns=draw(patterns), stats_only=draw(st.booleans()),
            transfer_data_type=draw(transfer_types), include_buffers=draw(st.booleans()),  # type: ignore[arg-type]
        )
    # Bytes that are not a valid message of the method they are sent to.
    target = draw(st.sampled_from(["Forward", "Backward", "FreezeLayers", "CreateSession", "GetGradients", "TrainStep"]))
    payload = draw(st.one_of(st.binary(min_size=1, max_size=64), st.sampled_from([b"\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05ab"])))
    return "garbage:" + target, payload


# -- the live server and the session state -----------------------------------------------------------


def describe(method: str, request: Any) -> str:
    if isinstance(request, bytes):
        return f"{method} {request!r}"
    text = text_format.MessageToString(request, as_one_line=True)
    return f"{method} {{{text[:400]}{' ...' if len(text) > 400 else ''}}}"


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
            if streaming:
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
def fuzz_server() -> Iterator[TrainerServer]:
    running = create_server(Settings(
        port=0, weights="random", max_sessions=4, max_batch=MAX_BATCH, max_input_elements=MAX_ELEMENTS,
        log_level="WARNING",
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
