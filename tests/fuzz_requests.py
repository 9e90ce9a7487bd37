"""Hypothesis strategies that draw requests for tests/test_fuzz.py: any RPC of TrainerService, mostly
aimed at the server's default session (the victim).

Random shapes (negative, empty, huge, too many dimensions), data types (unknown enum values too), raw
byte lengths that do not match, the three input forms (raw ``Tensor``, ``TensorValues``,
``TensorGenerator``), patterns, session and forward ids, loss functions, optimizer values (NaN,
infinite, negative), output formats, transfer types and option combinations, checkpoint names, watches'
``recent`` and shared-memory sizes; plus payloads that are not protobuf at all. ``requests()`` draws one ``(method, request)``; ``describe`` prints one.

A call that changes a session is often numbered (``Numbered``: its ``Operation`` is decided when it is
sent, tests/test_fuzz.py): the session's next number, one ahead (with or without ``supersede``), a
repeat of an earlier numbered call of the run (the same request, one with a field changed, or another
request under its number), or a number that is no place at all (0, negative, huge); by the fuzz's
client, none, another or one with too long an id; in the session's numbering (epoch), none, or a
wrong one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf import text_format
from hypothesis import strategies as st

from tests.conftest import rand
from remote_trainer.client import core
from remote_trainer.contract import codec
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb

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


_ITEMSIZE = {1: 4, 2: 2, 3: 2, 4: 8, 5: 8, 6: 4, 7: 1, 8: 2}
_NUMPY = {1: "<f4", 2: "<f2", 4: "<f8", 5: "<i8", 6: "<i4", 7: "u1", 8: "<i2"}


@st.composite
def raw_tensors(draw: st.DrawFn) -> pb.Tensor:
    """A raw Tensor: any shape and data type; bytes that fit them (with NaN/inf at times) or not."""
    shape = draw(shapes)
    data_type = draw(st.one_of(st.sampled_from([1, 1, 1, 2, 3, 4, 5, 6, 7, 7, 8]), enum_values(8)))
    n = _count(shape)
    kind = draw(st.sampled_from(["fit", "fit", "fit", "short", "long", "random"]))
    if kind == "random" or n is None or data_type not in _ITEMSIZE:
        raw = draw(st.binary(max_size=64))
    else:
        size = n * _ITEMSIZE[data_type]
        if data_type in _NUMPY:
            values = (rand(n, seed=draw(st.integers(0, 3))) * (255 if data_type in (7, 8) else 1)).astype(_NUMPY[data_type])
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
        elif draw(st.booleans()):  # uint8 image bytes (the victim has no input transform: refused)
            pixels = (rand(2, 3, 32, 32, seed=draw(st.integers(0, 3))) * 255).astype(np.uint8)
            message.tensor.CopyFrom(pb.Tensor(shape=[2, 3, 32, 32], data_type=pb.DATA_TYPE_UINT8, raw_data=pixels.tobytes()))
        else:
            message.generate.CopyFrom(pb.TensorGenerator(shape=[2, 3, 32, 32], distribution=draw(st.integers(1, 4)), seed=draw(int64s)))  # type: ignore[arg-type]
    elif kind == "labels":
        message.generate.CopyFrom(pb.TensorGenerator(shape=[2, draw(st.sampled_from([1000, 10, 1]))], distribution=draw(st.integers(1, 4))))  # type: ignore[arg-type]
    elif draw(st.booleans()):
        message.values.CopyFrom(pb.TensorValues(shape=[2], values=draw(st.lists(st.sampled_from([0.0, 1.0, 9.0, 999.0, -1.0, 1000.0, 0.5]), min_size=2, max_size=2))))
    elif draw(st.booleans()):  # class indices in a narrow integer type, as the SDK sends them
        indices = draw(st.lists(st.sampled_from([0, 3, 255, 999, 1000, -1]), min_size=2, max_size=2))
        dtype = draw(st.sampled_from(["u1", "<i2", "<i4", "<i8"]))
        array = np.array(indices).astype(dtype)  # wraps (255 + 1 as uint8 is 0): the server sees what it is sent
        message.tensor.CopyFrom(pb.Tensor(shape=[2], data_type=codec.DATA_TYPES_BY_NAME[array.dtype.name], raw_data=array.tobytes()))  # type: ignore[arg-type]
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
    if draw(st.booleans()):  # any number of means and stds, of any value
        request.input_transform.CopyFrom(pb.InputTransform(mean=draw(st.lists(floats, max_size=4)), std=draw(st.lists(floats, max_size=4))))
    return "CreateSession", request


def _session_only(method: str) -> Callable[[st.DrawFn, str], Request]:
    """A request of ``method`` that carries only a session id."""
    def build(draw: st.DrawFn, sid: str) -> Request:
        if method in ("Step", "ResetSession") and draw(st.booleans()):
            sid = draw(st.text(min_size=1, max_size=8))  # they always succeed on the victim: often elsewhere
        return method, getattr(pb, method + "Request")(session_id=sid)
    return build


def _zero_grad(draw: st.DrawFn, sid: str) -> Request:
    request = pb.ZeroGradRequest(session_id=sid if draw(st.booleans()) else draw(st.text(min_size=1, max_size=8)))
    if draw(st.booleans()):
        request.set_to_none = draw(st.booleans())
    return "ZeroGrad", request


def _gradients(draw: st.DrawFn, sid: str) -> Request:
    return "GetGradients", pb.GetGradientsRequest(
        session_id=sid, patterns=draw(patterns), stats_only=draw(st.booleans()),
        transfer_data_type=draw(transfer_types),  # type: ignore[arg-type]
    )


def _parameters(draw: st.DrawFn, sid: str) -> Request:
    return "GetParameters", pb.GetParametersRequest(
        session_id=sid, patterns=draw(patterns), stats_only=draw(st.booleans()),
        transfer_data_type=draw(transfer_types), include_buffers=draw(st.booleans()),  # type: ignore[arg-type]
    )


# Checkpoint names: a few that are taken (so that loads and deletes find files), and what must be refused.
checkpoint_names = st.one_of(
    st.sampled_from(["fuzz.ckpt", "fuzz.ckpt", "fuzz", "other.ckpt"]),
    st.sampled_from(["", ".", "..", "../x.ckpt", "/etc/passwd", "a/b.ckpt", "a\\b", "a\x00b", ".hidden", "x" * 300, " "]),
    st.text(max_size=20),
)


def _watch(draw: st.DrawFn, sid: str) -> Request:
    request = pb.WatchSessionRequest(session_id=sid)
    # Never 0: the victim has events (a watch of recent ones answers at once, and the fuzzer then
    # ends it), while a watch of none would wait for the victim's next event.
    recent = draw(st.one_of(st.none(), st.sampled_from([1, 16, 17, 100, 2**31, 2**32 - 1]), st.integers(1, 2**32 - 1)))
    if recent is not None:
        request.recent = recent
    return "WatchSession", request


# Every RPC of TrainerService and what draws its requests (tests/test_fuzz.py checks the names
# against the service's descriptor, so a new RPC cannot be left out), with how often it is drawn.
BUILDERS: dict[str, tuple[int, Callable[[st.DrawFn, str], Request]]] = {
    "Forward": (3, _forward),
    "Backward": (3, _backward),
    "TrainStep": (2, _train_step),
    "Step": (1, _session_only("Step")),
    "ZeroGrad": (1, _zero_grad),
    "ConfigureOptimizer": (2, _configure),
    "FreezeLayers": (2, lambda draw, sid: ("FreezeLayers", pb.FreezeLayersRequest(
        session_id=sid, patterns=draw(patterns), unfreeze=draw(st.booleans())))),
    "ReplaceHead": (1, lambda draw, sid: ("ReplaceHead", pb.ReplaceHeadRequest(
        session_id=sid, num_classes=draw(num_classes), seed=draw(int64s)))),
    "ListParameters": (1, _session_only("ListParameters")),
    "DescribeSession": (1, _session_only("DescribeSession")),
    "GetGradients": (2, _gradients),
    "GetParameters": (2, _parameters),
    "GetGraph": (1, _session_only("GetGraph")),
    "CreateSession": (1, _create),
    "CloseSession": (1, _session_only("CloseSession")),
    "ResetSession": (1, _session_only("ResetSession")),
    "ListSessions": (1, lambda draw, sid: ("ListSessions", pb.ListSessionsRequest())),
    "SaveCheckpoint": (1, lambda draw, sid: ("SaveCheckpoint", pb.SaveCheckpointRequest(
        session_id=sid, name=draw(checkpoint_names)))),
    "LoadCheckpoint": (1, lambda draw, sid: ("LoadCheckpoint", pb.LoadCheckpointRequest(
        session_id=sid, name=draw(checkpoint_names)))),
    "DeleteCheckpoint": (1, lambda draw, sid: ("DeleteCheckpoint", pb.DeleteCheckpointRequest(
        name=draw(checkpoint_names), client_token=draw(st.one_of(st.just(""), st.text(max_size=80)))))),
    "WatchSession": (1, _watch),
    "OpenSharedMemory": (1, lambda draw, sid: ("OpenSharedMemory", pb.OpenSharedMemoryRequest(
        session_id=sid, size_bytes=draw(st.one_of(st.sampled_from([1, 4096, 1 << 16, (1 << 16) + 1, 0, -1]), int64s))))),
}
_DRAWN = [name for name, (weight, _) in BUILDERS.items() for _ in range(weight)] + ["garbage"]


# -- operation numbers -------------------------------------------------------------------------------

NUMBERED = {path.rsplit("/", 1)[1] for path in core.NUMBERED}
FUZZ_CLIENT = "fuzz"  # the client id the fuzz numbers with (the SDK client that primes the victim has its own)
# Numbers that are no place in a session's order: out of range, or far ahead (past a supersede's
# 2**20 too), and the smallest ones (run long ago by the SDK client, given up, or forgotten).
ODD_NUMBERS = [0, -1, 1, 2, 2**20, 2**20 + 2, 2**62, 2**62 + 1, INT64_MAX, INT64_MIN, -(2**62)]


@dataclass(frozen=True)
class Numbering:
    """How the fuzz numbers one call, decided when it is sent (the session's next number is known then).

    ``place``: "next" (the number the session expects), "ahead" (``value`` past it when that is 1 to
    2**21, else 1), "repeat" (the
    earlier numbered call of the run ``value`` back, modulo their count, with its ``request``: "same"
    (the earlier request again, on the victim named the other way when ``value`` is odd), "altered"
    (the earlier request with one field changed, ``altered``) or "other" (this request)) or
    "number" (``value`` itself). ``epoch``: "session" (the victim's numbering), "" (none) or another
    string (a wrong one).
    """

    place: str
    value: int = 0
    supersede: bool = False
    client: str = FUZZ_CLIENT
    epoch: str = "session"
    request: str = "same"


@dataclass(frozen=True)
class Numbered:
    """A request of a call that changes a session, numbered as ``numbering`` says when it is sent."""

    request: Any
    numbering: Numbering


numberings = st.builds(
    Numbering,
    place=st.sampled_from(["next", "next", "next", "ahead", "repeat", "repeat", "repeat", "number"]),
    value=st.one_of(st.integers(0, 3), st.sampled_from(ODD_NUMBERS)),
    supersede=st.integers(0, 3).map(lambda k: k == 0),
    client=st.one_of(st.just(FUZZ_CLIENT), st.just(FUZZ_CLIENT), st.sampled_from(["", "another", "x" * 64, "x" * 65]),
                     st.text(max_size=70)),
    epoch=st.sampled_from(["session", "session", "session", "", "wrong"]),
    request=st.sampled_from(["same", "same", "altered", "other"]),
)


def altered(method: str, request: Any) -> Any:
    """A copy of a numbered request with one field changed (ResetSession has none to change)."""
    copy = type(request)()
    copy.CopyFrom(request)
    if method == "Forward":
        copy.eval_mode = not copy.eval_mode
    elif method == "Backward":
        copy.retain_graph = not copy.retain_graph
    elif method == "TrainStep":
        copy.return_grad_norm = not copy.return_grad_norm
    elif method == "Step":
        copy.expected_step_count ^= 1
    elif method == "ZeroGrad":
        copy.set_to_none = not copy.set_to_none
    elif method == "ConfigureOptimizer":
        copy.optimizer.amsgrad = not copy.optimizer.amsgrad
    elif method == "FreezeLayers":
        copy.unfreeze = not copy.unfreeze
    elif method == "ReplaceHead":
        copy.seed ^= 1
    elif method == "LoadCheckpoint":
        copy.name += "x"
    return copy


@st.composite
def requests(draw: st.DrawFn) -> Request:
    """One request to any RPC of TrainerService, or bytes that are not a request; a call that changes
    a session is numbered one time in two, then mostly on the victim."""
    sid = draw(session_ids)
    method = draw(st.sampled_from(_DRAWN))
    if method in NUMBERED and draw(st.booleans()):  # mostly on the victim, whose record it checks
        name, request = BUILDERS[method][1](draw, draw(_victim_ids) if draw(st.integers(0, 4)) else sid)
        return name, Numbered(request, draw(numberings))
    if method != "garbage":
        return BUILDERS[method][1](draw, sid)
    # Bytes that are not a valid message of the method they are sent to.
    target = draw(st.sampled_from(["Forward", "Backward", "FreezeLayers", "CreateSession", "GetGradients", "TrainStep"]))
    payload = draw(st.one_of(st.binary(min_size=1, max_size=64), st.sampled_from([b"\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05ab"])))
    return "garbage:" + target, payload


def describe(method: str, request: Any) -> str:
    if isinstance(request, Numbered):
        return f"{describe(method, request.request)} numbered {request.numbering}"
    if isinstance(request, bytes):
        return f"{method} {request!r}"
    text = text_format.MessageToString(request, as_one_line=True)
    return f"{method} {{{text[:400]}{' ...' if len(text) > 400 else ''}}}"
