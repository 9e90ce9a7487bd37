"""Conversions between trainer.v1 messages and the engine's torch tensors and dataclasses.

The server's one conversion module: every message the servicer answers with is built here. Byte
layout is the contract's (``remote_trainer.contract``: ``codec`` for tensors, ``chunking`` for tensor
streams, ``wire`` for the hand-written wire bytes, all shared with the SDK); this module only adds
torch and the engine's types on the server's side.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch

from remote_trainer.contract import chunking, codec, wire
from remote_trainer.contract.names import OPTIMIZER_FIELDS, LossName, OptimizerName
from remote_trainer.engine.optimizer import OptimizerSpec
from remote_trainer.engine.results import Graph, NamedTensor, ParameterInfo, SessionDescription, Stats
from remote_trainer.engine.tensors import generate
from remote_trainer.engine.transforms import InputTransform
from remote_trainer.engine.errors import Abandoned, FailedPrecondition, ResourceExhausted, invalid
from remote_trainer.server.events import CheckpointLoaded, CheckpointSaved, Froze, HeadReplaced, OptimizerReplaced, WasReset
from remote_trainer.server.watch import Ended, SessionEvent, Stepped
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb

# Inputs are decoded as read-only numpy views of the request's bytes and never written to; torch
# warns about such views, so that one warning is silenced here.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

LOSSES: dict[int, LossName] = codec.LOSS_NAMES
_OPTIMIZERS: dict[int, OptimizerName] = {pb.OPTIMIZER_KIND_UNSPECIFIED: "sgd", **codec.OPTIMIZER_NAMES}
_TRANSFER_TYPES: dict[int, torch.dtype] = {
    pb.DATA_TYPE_UNSPECIFIED: torch.float32,
    pb.DATA_TYPE_FLOAT32: torch.float32,
    pb.DATA_TYPE_FLOAT16: torch.float16,
    pb.DATA_TYPE_BFLOAT16: torch.bfloat16,
}
TORCH_TO_WIRE: dict[torch.dtype, int] = {
    torch.float32: pb.DATA_TYPE_FLOAT32,
    torch.float16: pb.DATA_TYPE_FLOAT16,
    torch.bfloat16: pb.DATA_TYPE_BFLOAT16,
    torch.float64: pb.DATA_TYPE_FLOAT64,
    torch.int64: pb.DATA_TYPE_INT64,
    torch.int32: pb.DATA_TYPE_INT32,
    torch.uint8: pb.DATA_TYPE_UINT8,
    torch.int16: pb.DATA_TYPE_INT16,
}


# Most dimensions of an input tensor (no input of this API has more than 4; numpy allows 64).
MAX_DIMENSIONS = 32


M = TypeVar("M", pb.ForwardRequest, pb.TrainStepRequest)


@dataclass(frozen=True)
class LargeInput(Generic[M]):
    """A Forward or TrainStep request as the server receives it: ``message`` as protobuf parses it
    without its input's raw bytes, and ``raw``, those bytes as a view of the received message (no
    copy; protobuf's parser and its ``raw_data`` getter would each copy a batch once more), or None
    when the input did not come as raw bytes (numbers, a generator)."""

    message: M
    raw: memoryview | None

    @property
    def session_id(self) -> str:
        return self.message.session_id

    @property
    def operation(self) -> pb.Operation:
        return self.message.operation

    def HasField(self, name: str) -> bool:  # noqa: N802  (protobuf's name, for operation_of)
        return self.message.HasField(name)  # type: ignore[arg-type]



# Where each request's batch bytes are, for the server's cut (``wire.raw_input_path``).
INPUT_PATHS = {name: wire.raw_input_path(cls) for name, cls in (("Forward", pb.ForwardRequest), ("TrainStep", pb.TrainStepRequest))}


# Where a SharedTensor's bytes are: its header and a view of the session's region (server/shared_memory.py).
SharedInput = Callable[[pb.SharedTensor, str], tuple[pb.Tensor, memoryview]]
SHARED_ALIGN = 64  # a borrowed SharedTensor starts at a multiple of this many bytes (else it is copied)


def input_tensor(
    msg: pb.TensorInput, field: str, max_elements: int, integer: bool = False, raw: memoryview | None = None,
    shared: SharedInput | None = None, borrow: bool = False,
) -> tuple[torch.Tensor, bool]:
    """The tensor a ``TensorInput`` carries, and whether it was written as numbers (or generated).

    ``integer`` asks for int64 from numbers and zeros/ones (class indices). Size limits are checked
    from the shape before anything is allocated. ``raw`` is the tensor's bytes when they were cut
    out of the request (``LargeInput``); ``shared`` finds a ``SharedTensor``'s bytes in the session's
    shared-memory region (None: the server allows none, SHARED_MEMORY_UNAVAILABLE). ``borrow`` lets
    that tensor view the region itself rather than a copy, for a call that keeps nothing of its input
    once it has answered (the client may write the region again then).
    """
    source = msg.WhichOneof("source")
    if source is None:
        raise invalid(field, f"{field} is missing: give tensor, values or generate", "MISSING_TENSOR")
    try:
        if source == "tensor":
            _check_size(msg.tensor.shape, field, max_elements)
            tensor = torch.from_numpy(codec.decode(msg.tensor, raw))
            if msg.tensor.data_type == pb.DATA_TYPE_BFLOAT16:
                tensor = tensor.to(torch.bfloat16)  # exact: the codec widened bfloat16 to float32
            return tensor, False
        if source == "shared_memory":
            if shared is None:
                raise FailedPrecondition(f"{field} is in a shared-memory region, and this server allows none "
                                         "(trainer-server --allow-shared-memory 1)", "SHARED_MEMORY_UNAVAILABLE")
            _check_size(msg.shared_memory.shape, field, max_elements)
            header, view = shared(msg.shared_memory, field)
            array = codec.decode(header, view)  # a view of the region (bfloat16: widened, a copy)
            del view
            if not (borrow and msg.shared_memory.offset % SHARED_ALIGN == 0):
                # A copy, made now: the client may write the region again once the call has answered,
                # while a forward's graph still holds its input (for conv1's weight gradient).
                array = np.array(array)
            tensor = torch.from_numpy(array)
            if header.data_type == pb.DATA_TYPE_BFLOAT16:
                tensor = tensor.to(torch.bfloat16)
            return tensor, False
        if source == "values":
            _check_size(msg.values.shape, field, max_elements)
            array = codec.values_to_array(msg.values, np.int64 if integer else np.float32)
            return torch.from_numpy(array), True
    except codec.CodecError as exc:
        raise invalid(f"{field}.{source}", f"{field}: {exc}", exc.reason) from exc
    spec = msg.generate
    shape = _check_size(spec.shape, field, max_elements)
    distribution = codec.DISTRIBUTION_NAMES.get(spec.distribution)
    if distribution is None:
        raise invalid(f"{field}.generate.distribution", f"{field}: choose a distribution", "BAD_GENERATOR")
    tensor = generate(shape, distribution, spec.seed, spec.high)
    if integer and distribution in ("zeros", "ones"):
        tensor = tensor.long()
    return tensor, True


def _check_size(shape: object, field: str, max_elements: int) -> tuple[int, ...]:
    try:
        dims = codec.check_shape(shape)  # type: ignore[arg-type]
    except codec.CodecError as exc:
        raise invalid(field, f"{field}: {exc}", exc.reason) from exc
    if len(dims) > MAX_DIMENSIONS:
        raise invalid(field, f"{field} has {len(dims)} dimensions, more than {MAX_DIMENSIONS}", "TOO_MANY_DIMENSIONS")
    count = codec.num_elements(dims)
    # Sizes beside a zero count too: numpy and torch refuse a shape such as [0, 2**62] (its strides
    # overflow), and no dimension larger than the element limit belongs to an accepted tensor.
    if count > max_elements or math.prod(max(d, 1) for d in dims) > max_elements:
        raise ResourceExhausted(
            f"{field} has {count} elements (shape {list(dims)}), over the limit max_input_elements={max_elements}",
            "INPUT_TOO_LARGE",
            metadata={"limit": str(max_elements)},
        )
    return dims


def raw_view(t: torch.Tensor) -> memoryview:
    """The elements of a contiguous CPU tensor as wire bytes, without a copy (bfloat16 as its bit pattern)."""
    if t.numel() == 0:
        return memoryview(b"")  # memoryview cannot cast a view with a zero in its shape
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.contiguous().numpy().data.cast("B")


def output_tensor(t: torch.Tensor) -> pb.Tensor:
    """A CPU tensor as a raw wire ``Tensor``."""
    return codec.encode_raw(raw_view(t).tobytes(), t.shape, TORCH_TO_WIRE[t.dtype])


def output_values(t: torch.Tensor) -> pb.TensorValues:
    """A CPU tensor as a ``TensorValues`` list of numbers."""
    return codec.array_to_values(t.float().numpy())


def stats_message(stats: Stats) -> pb.TensorStats:
    """Engine statistics as a ``TensorStats``."""
    return pb.TensorStats(
        norm=stats.norm, min=stats.min, max=stats.max, mean=stats.mean,
        non_finite_count=stats.non_finite_count, num_elements=stats.num_elements,
    )


def transfer_dtype(code: int) -> torch.dtype:
    """The element type for a tensor stream: float32, float16 or bfloat16."""
    if code not in _TRANSFER_TYPES:
        raise invalid("transfer_data_type", "transfer_data_type must be FLOAT32, FLOAT16 or BFLOAT16", "BAD_TRANSFER_TYPE")
    return _TRANSFER_TYPES[code]


class CastInto(wire.Source):
    """A contiguous CPU tensor's elements in ``dtype`` (float16 or bfloat16) as wire bytes, each
    slice cast by torch straight into its place in the response: no tensor of the cast values
    first, so the cast is the one copy of the data (the same conversion as ``Tensor.to``)."""

    def __init__(self, t: torch.Tensor, dtype: torch.dtype) -> None:
        self._flat = t.reshape(-1)
        self._dtype = dtype
        self.nbytes = t.numel() * dtype.itemsize

    def slice(self, start: int, end: int) -> wire.Fill:
        size = self._dtype.itemsize
        if start % size or end % size:
            raise ValueError(f"a slice of {self._dtype} must start and end on an element, not {start}:{end}")
        source, dtype = self._flat[start // size : end // size], self._dtype

        def write(dest: memoryview) -> None:
            torch.frombuffer(dest, dtype=dtype).copy_(source)

        return wire.Fill(end - start, write)


def wire_chunks(item: NamedTensor, chunk_bytes: int, packed: bool = False, dtype: torch.dtype | None = None) -> list[wire.Pieces]:
    """A named tensor as GetGradients/GetParameters responses in wire form, not yet joined: their
    pieces view the tensor's memory (the caller holds the session's lock until they are joined);
    ``packed`` for a stream whose responses a ``wire.Packer`` joins (the request's pack_chunks).
    A floating tensor not yet in ``dtype`` (the engine left the cast to the encoder: its
    ``casts``) is cast as it is written into the responses (``CastInto``)."""
    if not item.present:
        return chunking.encode_chunk_wire(item.name, None, item.shape, pb.DATA_TYPE_FLOAT32, None, chunk_bytes, packed)
    t = item.tensor
    stats = stats_message(item.stats) if item.stats is not None else None
    if t is None:
        return chunking.encode_chunk_wire(item.name, b"", item.shape, pb.DATA_TYPE_UNSPECIFIED, stats, chunk_bytes, packed)
    if dtype is None or not t.is_floating_point() or t.dtype == dtype:
        return chunking.encode_chunk_wire(item.name, raw_view(t), item.shape, TORCH_TO_WIRE[t.dtype], stats, chunk_bytes, packed)
    # Chunks end on elements when chunk_bytes allows (it always does but for odd settings).
    data = CastInto(t, dtype) if chunk_bytes % dtype.itemsize == 0 else raw_view(t.to(dtype))
    return chunking.encode_chunk_wire(item.name, data, item.shape, TORCH_TO_WIRE[dtype], stats, chunk_bytes, packed)


class ChunkSender:
    """The ``encode`` of a tensor stream that sends as it goes: each tensor becomes its responses in
    wire form (``wire_chunks``, floating tensors cast to ``dtype`` there), each joined (its data
    copied once) and handed to ``emit`` at once, or packed when the request asked (``pack_chunks``):
    then a group is joined when it is full, and ``finish``, the engine's ``done``, joins and sends
    the last one while the session's lock still holds the tensors it views. Once the stream's client
    is gone (``still_wanted``), the next tensor raises ``Abandoned`` instead of being encoded."""

    def __init__(
        self, emit: Callable[[wire.Serialized], None], chunk_bytes: int, packed: bool, still_wanted: Callable[[], bool],
        dtype: torch.dtype | None = None,
    ) -> None:
        self._emit = emit
        self._chunk_bytes = chunk_bytes
        self._packer = wire.Packer(chunk_bytes) if packed else None
        self._still_wanted = still_wanted
        self._dtype = dtype

    def __call__(self, item: NamedTensor) -> None:
        if not self._still_wanted():
            raise Abandoned("the stream's client went away; the rest of it was not made", "ABANDONED")
        for pieces in wire_chunks(item, self._chunk_bytes, self._packer is not None, self._dtype):
            done = self._packer.add(pieces) if self._packer is not None else pieces.join()
            if done is not None:
                self._emit(done)

    def finish(self) -> None:
        if self._packer is not None and (last := self._packer.flush()) is not None:
            self._emit(last)


def optimizer_spec(config: pb.OptimizerConfig) -> OptimizerSpec:
    """An ``OptimizerConfig`` with torch's defaults for the unset fields."""
    kind = _OPTIMIZERS.get(config.kind)
    if kind is None:
        raise invalid("optimizer.kind", f"unknown optimizer kind {config.kind}", "BAD_OPTIMIZER_VALUE")
    given = {
        name: getattr(config, name)
        for name in OPTIMIZER_FIELDS
        if config.HasField(name)
    }
    return OptimizerSpec.with_defaults(kind, **given)


def optimizer_config(spec: OptimizerSpec) -> pb.OptimizerConfig:
    """An ``OptimizerSpec`` as an ``OptimizerConfig`` with every field set."""
    return pb.OptimizerConfig(
        kind=codec.OPTIMIZER_KINDS[spec.kind], lr=spec.lr, momentum=spec.momentum, dampening=spec.dampening,
        weight_decay=spec.weight_decay, nesterov=spec.nesterov, beta1=spec.beta1, beta2=spec.beta2,
        eps=spec.eps, amsgrad=spec.amsgrad,
    )


def input_transform(request: pb.CreateSessionRequest) -> InputTransform | None:
    """The request's input transform, checked (``InputTransform.validate``); None when unset (off)."""
    if not request.HasField("input_transform"):
        return None
    transform = InputTransform(tuple(request.input_transform.mean), tuple(request.input_transform.std))
    transform.validate()
    return transform


def session_info(session_id: str, desc: SessionDescription, is_default: bool) -> pb.SessionInfo:
    """A session's description as a ``SessionInfo``."""
    info = pb.SessionInfo(
        session_id=session_id, model=desc.model, weights=desc.weights, device=desc.device,
        num_classes=desc.num_classes, optimizer=optimizer_config(desc.optimizer), step_count=desc.step_count,
        pending_forward_id=desc.pending_forward_id, trainable_parameters=desc.trainable_parameters,
        frozen_parameters=desc.frozen_parameters, is_default=is_default, autocast=desc.autocast,
        memory_format=desc.memory_format, next_operation=desc.next_operation, operation_epoch=desc.operation_epoch,
    )
    if desc.input_transform is not None:
        info.input_transform.CopyFrom(pb.InputTransform(mean=desc.input_transform.mean, std=desc.input_transform.std))
    return info


def parameter_list(params: list[ParameterInfo]) -> pb.ListParametersResponse:
    """Every parameter's name, shape, type and state, with the counts ListParameters adds up."""
    response = pb.ListParametersResponse()
    for p in params:
        count = math.prod(p.shape)
        response.parameters.add(
            name=p.name, shape=p.shape, data_type=TORCH_TO_WIRE[p.dtype],
            requires_grad=p.requires_grad, has_grad=p.has_grad, num_elements=count,
        )
        response.total_elements += count
        if p.requires_grad:
            response.trainable_count += 1
            response.trainable_elements += count
        else:
            response.frozen_count += 1
    return response


def graph_message(graph: Graph) -> pb.GetGraphResponse:
    """The autograd graph of a forward as a ``GetGraphResponse``."""
    return pb.GetGraphResponse(
        forward_id=graph.forward_id,
        root_id=graph.root_id,
        nodes=[pb.GraphNode(id=n.id, function=n.function, parameter=n.parameter) for n in graph.nodes],
        edges=[pb.GraphEdge(from_id=a, to_id=b) for a, b in graph.edges],
        leaf_parameters=graph.leaf_parameters,
        excluded_parameters=graph.excluded_parameters,
    )


_WATCH_ENDS = {
    "closed": pb.WATCH_END_SESSION_CLOSED, "expired": pb.WATCH_END_SESSION_EXPIRED, "lost": pb.WATCH_END_SESSION_LOST,
    "server_stopping": pb.WATCH_END_SERVER_STOPPING,
}


def watch_event(event: SessionEvent, missed: int, recent: bool = False) -> pb.WatchSessionResponse:
    """One event of a watched session (``missed``: the events the watcher lost just before it)."""
    response = pb.WatchSessionResponse(sequence=event.sequence, unix_seconds=event.unix_seconds, missed=missed, recent=recent)
    what = event.what
    if isinstance(what, Stepped):
        step = response.step
        step.step_count, step.learning_rate, step.seconds = what.step_count, what.learning_rate, what.seconds
        step.samples, step.samples_per_second = what.samples, what.samples_per_second
        if what.loss is not None:
            step.loss = what.loss
        if what.grad_norm is not None:
            step.grad_norm = what.grad_norm
    elif isinstance(what, Froze):
        response.freeze.CopyFrom(pb.FreezeEvent(patterns=what.patterns, unfreeze=what.unfreeze, changed_count=what.changed,
                                                trainable_count=what.trainable, frozen_count=what.frozen))
    elif isinstance(what, HeadReplaced):
        response.head.num_classes = what.num_classes
    elif isinstance(what, OptimizerReplaced):
        response.optimizer.CopyFrom(optimizer_config(what.optimizer))
    elif isinstance(what, CheckpointSaved):
        response.checkpoint_saved.CopyFrom(pb.CheckpointEvent(name=what.name, step_count=what.step_count,
                                                              size_bytes=what.size_bytes, automatic=what.automatic))
    elif isinstance(what, CheckpointLoaded):
        response.checkpoint_loaded.CopyFrom(pb.CheckpointEvent(name=what.name, step_count=what.step_count))
    elif isinstance(what, WasReset):
        response.reset.SetInParent()
    elif isinstance(what, Ended):
        response.end.reason = _WATCH_ENDS[what.why]
    return response
