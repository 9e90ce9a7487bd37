"""The SDK's core, with no I/O: what both faces of the SDK send and how they read the answers.

Per RPC, one function builds the request from a method's arguments and returns it as a ``Call``
(the RPC's path, the request, the parser of its response into the SDK's dataclasses), as
tritonclient's ``InferenceServerClientBase`` and ``_utils._get_inference_request`` do for its sync
and asyncio clients. ``TrainerClient``/``Session`` (``client.py``) and
``AsyncTrainerClient``/``AsyncSession`` (``aio.py``) only send a ``Call`` and hand its response
to ``Call.parse``, so the two faces cannot drift apart in what they send or return.

Needs grpcio, protobuf and numpy only.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast, get_args

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2

from remote_trainer.client.errors import FailedPreconditionError, NotFoundError, ResourceExhaustedError, TrainerError
from remote_trainer.client.types import (
    BackwardResult, CheckpointEvent, CheckpointFile, EndEvent, EventKind, ForwardResult, FreezeEvent, FreezeResult, Graph,
    GraphNode, HeadEvent, InputTransform, NamedTensor, Optimizer, ParameterInfo, ParameterList, ResetEvent, SessionEvent,
    SessionInfo, Stats, StepEvent, TrainStepResult, WatchEndReason,
)
from remote_trainer.contract import chunking, codec, names, wire
from remote_trainer.contract.names import (
    AutocastName, InputTransformName, LossName, MemoryFormatName, OptimizerName, TransferDataType,
)
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb

MIB = 1024 * 1024
MAX_MESSAGE_BYTES = 512 * MIB  # the largest message a client sends or takes unless told (max_message_bytes)
SERVICE = "trainer.v1.TrainerService"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"

# Calls that change a session: each carries an Operation number (``retry``), so a retry is run at
# most once. Every other call changes nothing, or carries a client_token the server remembers.
NUMBERED = frozenset(
    f"/{SERVICE}/{m}" for m in ("Forward", "Backward", "Step", "ZeroGrad", "ConfigureOptimizer", "FreezeLayers",
                                "ReplaceHead", "LoadCheckpoint", "ResetSession", "TrainStep")
)


def channel_settings(max_message_bytes: int, options: Iterable[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """The channel options of both faces, then the caller's own ``options``: message sizes, a quick
    reconnect after the server comes back (100 ms, backing off to 2 s), and keepalive pings every
    10 s, answered within 5 s, so that a dead connection is noticed in seconds, between calls too.
    Retries are the SDK's own (``retry``), not gRPC's."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        *options,
    ]


# -- the calls -------------------------------------------------------------------------------------

R = TypeVar("R")
# What a GetGradients or GetParameters response reads as: its chunks, each without its data, beside
# a view of that data in the received bytes (``wire.split_chunk_response``).
ChunkResponse = list[tuple[pb.TensorChunk, memoryview]]


@dataclass(frozen=True)
class Call(Generic[R]):
    """One unary call, ready to send: the RPC's path, the request, and the parser of its response.

    ``done_if`` reads the error of a retry whose earlier attempt may have done the work: the response
    that error stands for, or None when it stands for itself (CloseSession: NOT_FOUND, closed).
    """

    method: str
    request: Any
    parse: Callable[[Any], R]
    done_if: Callable[[TrainerError], Any] | None = None

    @property
    def numbered(self) -> bool:
        """Whether the call changes a session and so carries an operation number."""
        return self.method in NUMBERED


@dataclass(frozen=True)
class StreamCall(Generic[R]):
    """One server-streaming call: the RPC's path, the request, and the parser of all its responses."""

    method: str
    request: Any
    parse: Callable[[Iterable[ChunkResponse]], R]
    done_if: Callable[[TrainerError], Any] | None = None
    numbered = False


def number(request: Any, number: int, supersede: bool, client: str = "", epoch: str = "") -> None:
    """Puts the operation ``number`` (and ``supersede``, who numbers, and the numbering's epoch) in a
    numbered call's request."""
    message = request.message if isinstance(request, wire.SplicedRequest) else request
    message.operation.number = number
    message.operation.supersede = supersede
    message.operation.client = client
    message.operation.epoch = epoch


def operation(request: Any) -> pb.Operation:
    """The operation a numbered call's request carries."""
    message = request.message if isinstance(request, wire.SplicedRequest) else request
    return cast(pb.Operation, message.operation)


def token() -> str:
    """A fresh client_token: a random UUID, in hex."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class WatchCall:
    """A watch (``WatchSession``): the RPC's path, the request, and the parser of each event."""

    method: str
    request: pb.WatchSessionRequest
    parse: Callable[[pb.WatchSessionResponse], SessionEvent]


def _path(name: str) -> str:
    return f"/{SERVICE}/{name}"


def _serialize(message: Any) -> bytes:
    return cast(bytes, message.SerializeToString())


_STREAMS = ("GetGradients", "GetParameters")
_WATCH = "WatchSession"
_SPLICED = ("Forward", "TrainStep")  # their requests are wire.SplicedRequest: the batch's bytes beside the message


def unary_methods(channel: Any) -> dict[str, Any]:
    """Every unary RPC of the service (and the health check) on ``channel``, sync or asyncio, by path."""
    methods = {
        _path(m.name): channel.unary_unary(
            _path(m.name),
            request_serializer=wire.SplicedRequest.serialize if m.name in _SPLICED else _serialize,
            response_deserializer=getattr(pb, m.output_type.name).FromString,
        )
        for m in pb.DESCRIPTOR.services_by_name["TrainerService"].methods
        if not m.server_streaming
    }
    methods[HEALTH_CHECK] = channel.unary_unary(
        HEALTH_CHECK, request_serializer=_serialize, response_deserializer=health_pb2.HealthCheckResponse.FromString
    )
    return methods


def stream_methods(channel: Any) -> dict[str, Any]:
    """GetGradients and GetParameters on ``channel`` (sync or asyncio), by path, read without
    protobuf's two copies of each chunk's data (``wire.split_chunk_response``); and WatchSession."""
    methods = {
        _path(name): channel.unary_stream(
            _path(name), request_serializer=_serialize, response_deserializer=wire.split_chunk_response
        )
        for name in _STREAMS
    }
    methods[_path(_WATCH)] = channel.unary_stream(
        _path(_WATCH), request_serializer=_serialize, response_deserializer=pb.WatchSessionResponse.FromString
    )
    return methods


# -- arrays in -------------------------------------------------------------------------------------


def as_array(x: Any, dtype: npt.DTypeLike | None = None) -> npt.NDArray[Any]:
    """A numpy array from numpy, a nested list or a torch tensor (detached, moved to the CPU)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if dtype is not None:
        if np.dtype(dtype).kind in "iu" and arr.dtype.kind in "fc":
            _require_whole(arr, np.dtype(dtype))
        return arr.astype(dtype, copy=False)
    if arr.dtype.kind == "f" and arr.dtype != np.float32:
        return arr.astype(np.float32)
    return arr


def _require_whole(arr: npt.NDArray[Any], dtype: np.dtype[Any]) -> None:
    """Refuses a cast to integers that would change a value (numpy truncates 1.7 to 1 and turns NaN
    into INT64_MIN without a word): every value must be a finite whole number within ``dtype``."""
    if arr.dtype.kind == "c":
        raise ValueError(f"complex values cannot be {dtype} class indices")
    finite = np.isfinite(arr)
    if not finite.all():
        raise ValueError(f"{int((~finite).sum())} value(s) are NaN or infinite: they cannot be {dtype} class indices")
    fraction = arr != np.floor(arr)
    if fraction.any():
        raise ValueError(f"{arr[fraction].ravel()[:3].tolist()} are not whole numbers: pass {dtype} class indices, "
                         "not floats, so nothing is rounded away")
    info = np.iinfo(dtype)  # its bounds as floats: min exactly, max + 1 exactly (powers of two)
    if arr.size and (arr.min() < float(info.min) or arr.max() >= float(info.max) + 1):
        raise ValueError(f"values outside the range of {dtype}")


def _fill_input(target: pb.TensorInput, x: Any, dtype: npt.DTypeLike | None = None) -> None:
    # Written in place into the request: a sub-message passed to a constructor or CopyFrom is copied.
    codec.encode_into(target.tensor, as_array(x, dtype))


def images(x: Any) -> npt.NDArray[Any]:
    """An input batch as it is sent: uint8 images (numpy, or torch as a decoder gives them; for a
    session with an input transform) as they are, anything else as float32. Only NCHW is taken:
    an NHWC batch (N, H, W, 3) is refused by the server's shape check (BAD_INPUT_SHAPE), never
    guessed at; ``x.permute(0, 3, 1, 2)`` (torch) or ``x.transpose(0, 3, 1, 2)`` (numpy) makes it NCHW."""
    arr = as_array(x)
    return arr if arr.dtype == np.uint8 else as_array(arr, np.float32)


def check_input_bytes(shape: Iterable[int], dtype: npt.DTypeLike, max_message_bytes: int) -> None:
    """Refuses, before anything is built or sent, an input batch whose bytes alone pass the largest
    message this client sends (``max_message_bytes``): gRPC would refuse it only once it is built and
    serialised (a batch of 100000 images, 5 GB, takes a minute for that)."""
    dims = [int(d) for d in shape]
    nbytes = math.prod(dims) * np.dtype(dtype).itemsize
    if nbytes > max_message_bytes:
        raise ResourceExhaustedError(
            f"an input of shape {dims} ({np.dtype(dtype).name}) is {nbytes / MIB:,.1f} MiB, over the {max_message_bytes / MIB:,.1f} "
            "MiB this client sends in one message (max_message_bytes); the server takes at most its --max-message-bytes "
            "(256 MiB unless set), --max-batch images (256) and --max-input-elements: send smaller batches",
            "REQUEST_TOO_LARGE", {"limit": str(max_message_bytes)},
        )


def _spliced_input(request: pb.ForwardRequest | pb.TrainStepRequest, x: Any, max_message_bytes: int) -> wire.SplicedRequest:
    """``request`` with the batch ``x`` as its input (``images``), its bytes sent beside the message."""
    batch = images(x)
    check_input_bytes(batch.shape, batch.dtype, max_message_bytes)
    raw = codec.encode_header_into(request.input.tensor, batch)
    path, _ = wire.raw_input_path(type(request))
    return wire.SplicedRequest(request, path, raw)


def _fill_loss(target: pb.Loss, loss: LossName, labels: Any) -> None:
    if loss not in codec.LOSS_FUNCTIONS:
        raise ValueError(f"loss must be one of {sorted(codec.LOSS_FUNCTIONS)}, got {loss!r}")
    if labels is None:
        raise ValueError(f"loss {loss!r} needs labels")
    target.function = codec.LOSS_FUNCTIONS[loss]
    if loss == "cross_entropy":  # class indices in the narrowest integer type that holds them (uint8 below 256)
        codec.encode_into(target.labels.tensor, codec.narrowest_integers(as_array(labels, np.int64)))
    else:
        _fill_input(target.labels, labels, np.float32)


def _optimizer_message(optimizer: Optimizer) -> pb.OptimizerConfig:
    if optimizer.kind not in codec.OPTIMIZER_KINDS:
        raise ValueError(f"optimizer kind must be one of {sorted(codec.OPTIMIZER_KINDS)}, got {optimizer.kind!r}")
    config = pb.OptimizerConfig(kind=codec.OPTIMIZER_KINDS[optimizer.kind])
    for name in names.OPTIMIZER_FIELDS:
        value = getattr(optimizer, name)
        if value is not None:
            setattr(config, name, value)
    return config


def _transfer_type(dtype: TransferDataType) -> pb.DataType.ValueType:
    if dtype not in get_args(TransferDataType):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    return pb.DataType.ValueType(codec.DATA_TYPES_BY_NAME[dtype])


# -- results out -----------------------------------------------------------------------------------


def stats(msg: pb.TensorStats) -> Stats:
    return Stats(msg.norm, msg.min, msg.max, msg.mean, msg.non_finite_count, msg.num_elements)


def optimizer(msg: pb.OptimizerConfig) -> Optimizer:
    return Optimizer(codec.OPTIMIZER_NAMES.get(msg.kind, "sgd"), **{name: getattr(msg, name) for name in names.OPTIMIZER_FIELDS})


def _input_transform_message(transform: InputTransform | InputTransformName) -> pb.InputTransform:
    if isinstance(transform, str):
        if transform not in names.INPUT_TRANSFORMS:
            raise ValueError(f"input_transform must be an InputTransform or one of {list(names.INPUT_TRANSFORMS)}, got {transform!r}")
        transform = InputTransform.imagenet() if transform == "imagenet" else InputTransform()
    return pb.InputTransform(mean=transform.mean, std=transform.std)


def session_info(msg: pb.SessionInfo) -> SessionInfo:
    return SessionInfo(
        msg.session_id, msg.model, msg.weights, msg.device, msg.num_classes, optimizer(msg.optimizer),
        msg.step_count, msg.pending_forward_id, msg.trainable_parameters, msg.frozen_parameters, msg.is_default,
        cast(AutocastName, msg.autocast), cast(MemoryFormatName, msg.memory_format),  # the server sends only these names
        msg.next_operation, msg.operation_epoch,
        InputTransform(tuple(msg.input_transform.mean), tuple(msg.input_transform.std))
        if msg.HasField("input_transform") else None,
    )


def _logits(response: pb.ForwardResponse | pb.TrainStepResponse) -> Any:
    # A writable copy (the decoded view would be read-only, over the response's bytes); logits are small.
    return codec.decode(response.logits).copy() if response.HasField("logits") else None


def named_tensors(chunks: Iterable[tuple[pb.TensorChunk, memoryview]], with_data: bool) -> dict[str, NamedTensor]:
    """The tensors of a GetGradients or GetParameters stream, by name, in the order they came."""
    return {
        t.name: NamedTensor(t.name, t.shape, t.present, stats(t.stats) if t.stats else None, t.array)  # type: ignore[arg-type]
        for t in chunking.assemble_split_chunks(chunks, with_data)
    }


def _named_tensors(with_data: bool) -> Callable[[Iterable[ChunkResponse]], dict[str, NamedTensor]]:
    return lambda responses: named_tensors((chunk for response in responses for chunk in response), with_data)


# -- one function per RPC: the request from the method's arguments, and how to read the answer ------


def health(service: str) -> Call[str]:
    return Call(HEALTH_CHECK, health_pb2.HealthCheckRequest(service=service),
                lambda r: str(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)))


def create_session(
    weights: str, num_classes: int, optimizer: Optimizer | None, seed: int,
    autocast: AutocastName | None, memory_format: MemoryFormatName | None,
    input_transform: InputTransform | InputTransformName | None = None,
) -> Call[SessionInfo]:
    request = pb.CreateSessionRequest(weights=weights, num_classes=num_classes, seed=seed, autocast=autocast or "",
                                      memory_format=memory_format or "", client_token=token())
    if optimizer is not None:
        request.optimizer.CopyFrom(_optimizer_message(optimizer))
    if input_transform is not None:
        request.input_transform.CopyFrom(_input_transform_message(input_transform))
    return Call(_path("CreateSession"), request, lambda r: session_info(r.session))


def resume_session(checkpoint: str) -> Call[SessionInfo]:
    """A new session from ``checkpoint`` with the operation numbering it holds (CreateSession's resume_from)."""
    request = pb.CreateSessionRequest(resume_from=checkpoint, client_token=token())
    return Call(_path("CreateSession"), request, lambda r: session_info(r.session))


def lost(error: TrainerError) -> bool:
    """Whether a DescribeSession refused with ``error`` says the session is gone (what resuming is for)."""
    return isinstance(error, NotFoundError) or error.reason == "SESSION_LOST"


def not_lost(session_id: str, info: SessionInfo) -> FailedPreconditionError:
    """The refusal of a resume of a session that still lives (it would go back to its checkpoint)."""
    return FailedPreconditionError(
        f"session {session_id} is alive (step {info.step_count}): resume() is for a session the server lost; "
        "close it first to go back to its checkpoint", "SESSION_ALIVE",
    )


def list_sessions() -> Call[list[SessionInfo]]:
    return Call(_path("ListSessions"), pb.ListSessionsRequest(), lambda r: [session_info(s) for s in r.sessions])


def list_checkpoints() -> Call[list[CheckpointFile]]:
    return Call(_path("ListSessions"), pb.ListSessionsRequest(),
                lambda r: [CheckpointFile(c.name, c.size_bytes, c.modified_unix_seconds) for c in r.checkpoints])


def delete_checkpoint(name: str) -> Call[int]:
    """The bytes freed. A retry answered CHECKPOINT_NOT_FOUND after an attempt that may have deleted
    the file: deleted (0 bytes said, the first answer being lost)."""
    request = pb.DeleteCheckpointRequest(name=name, client_token=token())
    return Call(_path("DeleteCheckpoint"), request, lambda r: int(r.size_bytes),
                done_if=lambda e: pb.DeleteCheckpointResponse(name=name) if e.reason == "CHECKPOINT_NOT_FOUND" else None)


def close_session(session_id: str) -> Call[None]:
    """A retry answered NOT_FOUND after an attempt that may have closed the session: closed."""
    request = pb.CloseSessionRequest(session_id=session_id, client_token=token())
    return Call(_path("CloseSession"), request, lambda r: None,
                done_if=lambda e: pb.CloseSessionResponse(session_id=session_id) if isinstance(e, NotFoundError) else None)


def describe_session(session_id: str) -> Call[SessionInfo]:
    return Call(_path("DescribeSession"), pb.DescribeSessionRequest(session_id=session_id), lambda r: session_info(r.session))


def forward(
    session_id: str, x: Any, eval_mode: bool, no_grad: bool, stats_only: bool, max_message_bytes: int = MAX_MESSAGE_BYTES
) -> Call[ForwardResult]:
    request = pb.ForwardRequest(
        session_id=session_id, eval_mode=eval_mode, no_grad=no_grad,
        output_format=pb.OUTPUT_FORMAT_STATS_ONLY if stats_only else pb.OUTPUT_FORMAT_RAW,
    )
    return Call(_path("Forward"), _spliced_input(request, x, max_message_bytes), forward_result)


def forward_result(r: pb.ForwardResponse) -> ForwardResult:
    return ForwardResult(r.forward_id, _logits(r), stats(r.logits_stats))


def backward(
    session_id: str, forward_id: int, loss: LossName | None, labels: Any, output_gradient: Any,
    retain_graph: bool, step: bool, zero_grad_after_step: bool, grad_norm: bool,
) -> Call[BackwardResult]:
    if (loss is None) == (output_gradient is None):
        raise ValueError("give exactly one of loss (with labels) or output_gradient")
    request = pb.BackwardRequest(
        session_id=session_id, forward_id=forward_id, retain_graph=retain_graph, step=step,
        zero_grad_after_step=zero_grad_after_step, skip_grad_norm=not grad_norm,
    )
    if loss is not None:
        _fill_loss(request.loss, loss, labels)
    else:
        _fill_input(request.output_gradient, output_gradient, np.float32)
    return Call(_path("Backward"), request, lambda r: BackwardResult(
        r.forward_id, r.loss if r.HasField("loss") else None, r.parameters_with_grad,
        r.grad_norm if r.HasField("grad_norm") else None, r.step_count, r.parameters_updated,
    ))


def train_step(
    session_id: str, x: Any, loss: LossName, labels: Any, zero_grad: bool, grad_norm: bool, return_logits: bool,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> Call[TrainStepResult]:
    request = pb.TrainStepRequest(session_id=session_id, zero_grad=zero_grad, return_grad_norm=grad_norm,
                                  return_logits=return_logits)
    _fill_loss(request.loss, loss, labels)
    return Call(_path("TrainStep"), _spliced_input(request, x, max_message_bytes), train_step_result)


def train_step_result(r: pb.TrainStepResponse) -> TrainStepResult:
    return TrainStepResult(r.forward_id, r.loss, stats(r.logits_stats), r.step_count, r.parameters_updated,
                           r.grad_norm if r.HasField("grad_norm") else None, _logits(r))


def step(session_id: str, expected_step_count: int | None) -> Call[int]:
    request = pb.StepRequest(session_id=session_id, expected_step_count=expected_step_count)
    return Call(_path("Step"), request, lambda r: int(r.step_count))


def zero_grad(session_id: str, set_to_none: bool) -> Call[int]:
    request = pb.ZeroGradRequest(session_id=session_id, set_to_none=set_to_none)
    return Call(_path("ZeroGrad"), request, lambda r: int(r.parameters_cleared))


def configure_optimizer(session_id: str, config: Optimizer | OptimizerName | None, values: dict[str, Any]) -> Call[Optimizer]:
    """``config`` is an ``Optimizer``, or its kind ("sgd", "adam", "adamw") with ``values`` beside it."""
    if isinstance(config, str):
        if "kind" in values:
            raise ValueError(f"configure_optimizer({config!r}, kind={values['kind']!r}): give the kind once")
        config = Optimizer(config, **values)  # a bad kind: _optimizer_message says which
    elif config is not None and values:
        raise ValueError(f"configure_optimizer(Optimizer(...), {', '.join(values)}=...): give an Optimizer or values, not both")
    elif config is not None and not isinstance(config, Optimizer):
        raise TypeError(f"configure_optimizer takes an Optimizer or a kind name ('sgd', 'adam', 'adamw'), got {config!r}")
    request = pb.ConfigureOptimizerRequest(session_id=session_id, optimizer=_optimizer_message(config or Optimizer(**values)))
    return Call(_path("ConfigureOptimizer"), request, lambda r: optimizer(r.optimizer))


def freeze(session_id: str, patterns: Iterable[str], unfreeze: bool) -> Call[FreezeResult]:
    request = pb.FreezeLayersRequest(session_id=session_id, patterns=list(patterns), unfreeze=unfreeze)
    return Call(_path("FreezeLayers"), request, lambda r: FreezeResult(list(r.changed), list(r.trainable), r.frozen_count))


def replace_head(session_id: str, num_classes: int, seed: int) -> Call[SessionInfo]:
    request = pb.ReplaceHeadRequest(session_id=session_id, num_classes=num_classes, seed=seed)
    return Call(_path("ReplaceHead"), request, lambda r: session_info(r.session))


def _parameter_list(response: pb.ListParametersResponse) -> ParameterList:
    return ParameterList(
        [
            ParameterInfo(p.name, tuple(p.shape), codec.DATA_TYPE_NAMES.get(p.data_type, "unknown"), p.requires_grad,
                          p.has_grad, p.num_elements)
            for p in response.parameters
        ],
        response.trainable_count, response.frozen_count, response.trainable_elements, response.total_elements,
    )


def list_parameters(session_id: str) -> Call[ParameterList]:
    return Call(_path("ListParameters"), pb.ListParametersRequest(session_id=session_id), _parameter_list)


def gradients(
    session_id: str, patterns: Iterable[str], stats_only: bool, dtype: TransferDataType, with_stats: bool
) -> StreamCall[dict[str, NamedTensor]]:
    request = pb.GetGradientsRequest(session_id=session_id, patterns=list(patterns), stats_only=stats_only,
                                     transfer_data_type=_transfer_type(dtype), skip_stats=not with_stats, pack_chunks=True)
    return StreamCall(_path("GetGradients"), request, _named_tensors(not stats_only))


def parameters(
    session_id: str, patterns: Iterable[str], stats_only: bool, dtype: TransferDataType, include_buffers: bool,
    with_stats: bool,
) -> StreamCall[dict[str, NamedTensor]]:
    request = pb.GetParametersRequest(session_id=session_id, patterns=list(patterns), stats_only=stats_only,
                                      transfer_data_type=_transfer_type(dtype), include_buffers=include_buffers,
                                      skip_stats=not with_stats, pack_chunks=True)
    return StreamCall(_path("GetParameters"), request, _named_tensors(not stats_only))


def save_checkpoint(session_id: str, name: str) -> Call[int]:
    return Call(_path("SaveCheckpoint"), pb.SaveCheckpointRequest(session_id=session_id, name=name), lambda r: int(r.step_count))


def load_checkpoint(session_id: str, name: str) -> Call[SessionInfo]:
    return Call(_path("LoadCheckpoint"), pb.LoadCheckpointRequest(session_id=session_id, name=name), lambda r: session_info(r.session))


def _graph(response: pb.GetGraphResponse) -> Graph:
    return Graph(
        response.forward_id, response.root_id, [GraphNode(n.id, n.function, n.parameter) for n in response.nodes],
        [(e.from_id, e.to_id) for e in response.edges], list(response.leaf_parameters), list(response.excluded_parameters),
    )


def graph(session_id: str) -> Call[Graph]:
    return Call(_path("GetGraph"), pb.GetGraphRequest(session_id=session_id), _graph)


def reset_session(session_id: str) -> Call[SessionInfo]:
    return Call(_path("ResetSession"), pb.ResetSessionRequest(session_id=session_id), lambda r: session_info(r.session))


# -- watching a session -----------------------------------------------------------------------------

_WATCH_ENDS: dict[int, WatchEndReason] = {
    pb.WATCH_END_SESSION_CLOSED: "session_closed", pb.WATCH_END_SESSION_EXPIRED: "session_expired",
    pb.WATCH_END_SESSION_LOST: "session_lost", pb.WATCH_END_SERVER_STOPPING: "server_stopping",
}


def _checkpoint_event(msg: pb.CheckpointEvent) -> CheckpointEvent:
    return CheckpointEvent(msg.name, msg.step_count, msg.size_bytes, msg.automatic)


def session_event(response: pb.WatchSessionResponse) -> SessionEvent:
    """One event of a watch, as the SDK's dataclasses."""
    kind = response.WhichOneof("event")
    detail: StepEvent | FreezeEvent | HeadEvent | Optimizer | CheckpointEvent | ResetEvent | EndEvent | None = None
    if kind == "step":
        s = response.step
        detail = StepEvent(s.step_count, s.loss if s.HasField("loss") else None, s.grad_norm if s.HasField("grad_norm") else None,
                           s.learning_rate, s.seconds, s.samples, s.samples_per_second)
    elif kind == "freeze":
        f = response.freeze
        detail = FreezeEvent(list(f.patterns), f.unfreeze, f.changed_count, f.trainable_count, f.frozen_count)
    elif kind == "head":
        detail = HeadEvent(response.head.num_classes)
    elif kind == "optimizer":
        detail = optimizer(response.optimizer)
    elif kind == "checkpoint_saved":
        detail = _checkpoint_event(response.checkpoint_saved)
    elif kind == "checkpoint_loaded":
        detail = _checkpoint_event(response.checkpoint_loaded)
    elif kind == "reset":
        detail = ResetEvent()
    elif kind == "end":
        detail = EndEvent(_WATCH_ENDS.get(response.end.reason, "unknown"))
    known = detail is not None
    return SessionEvent(response.sequence, response.unix_seconds, response.missed, response.recent,
                        cast(EventKind, kind) if known else "unknown", detail)


def watch_session(session_id: str, recent: int | None) -> WatchCall:
    """A watch of the session, the ``recent`` latest events first (None: the server's 16)."""
    request = pb.WatchSessionRequest(session_id=session_id)
    if recent is not None:
        request.recent = recent
    return WatchCall(_path(_WATCH), request, session_event)


def watch_over(error: TrainerError, timeout: float | None) -> bool:
    """Whether a watch that failed with ``error`` just ended: it ran for the ``timeout`` it was given."""
    return timeout is not None and error.code is grpc.StatusCode.DEADLINE_EXCEEDED
