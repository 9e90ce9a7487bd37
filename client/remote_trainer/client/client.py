"""The Python SDK: ``TrainerClient`` and the ``Session`` handle.

Needs grpcio, protobuf and numpy only. Arrays go in as numpy (or torch tensors, converted on the
CPU) and come back as numpy; results are small dataclasses. Every call has a deadline.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2, health_pb2_grpc

from remote_trainer.contract import chunking, codec, names, wire
from remote_trainer.contract.names import AutocastName, MemoryFormatName
from remote_trainer.client.errors import from_rpc_error
from remote_trainer.client.types import (
    BackwardResult,
    CheckpointFile,
    ForwardResult,
    FreezeResult,
    Graph,
    GraphNode,
    NamedTensor,
    Optimizer,
    ParameterInfo,
    ParameterList,
    SessionInfo,
    Stats,
    TrainStepResult,
)
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb
from remote_trainer.contract.trainer.v1 import trainer_pb2_grpc

MIB = 1024 * 1024
SERVICE = "trainer.v1.TrainerService"

# Calls that change nothing may be retried when the server is briefly UNAVAILABLE; calls that
# change a session (Forward, Backward, Step, ...) never are.
_IDEMPOTENT = ("DescribeSession", "ListParameters", "GetGradients", "GetParameters", "GetGraph", "ListSessions")
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": SERVICE, "method": m} for m in _IDEMPOTENT] + [{"service": "grpc.health.v1.Health"}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)

_LOSSES = codec.LOSS_FUNCTIONS
_OPTIMIZER_KINDS = codec.OPTIMIZER_KINDS
_OPTIMIZER_NAMES = codec.OPTIMIZER_NAMES
_OPTIMIZER_FIELDS = names.OPTIMIZER_FIELDS

Req = TypeVar("Req")
Resp = TypeVar("Resp")


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


def _spliced_input(request: pb.ForwardRequest | pb.TrainStepRequest, x: Any) -> wire.SplicedRequest:
    """``request`` with the float32 batch ``x`` as its input, its bytes sent beside the message."""
    raw = codec.encode_header_into(request.input.tensor, as_array(x, np.float32))
    path, _ = wire.raw_input_path(type(request))
    return wire.SplicedRequest(request, path, raw)


def tensor_streams(channel: Any) -> dict[str, Any]:
    """GetGradients and GetParameters on ``channel`` (sync or asyncio), read without protobuf's two
    copies of each chunk's data: each response comes as a list of (chunk without its data, a view
    of the data in the received bytes), ``wire.split_chunk_response``."""
    return {
        name: channel.unary_stream(
            f"/{SERVICE}/{name}", request_serializer=request.SerializeToString, response_deserializer=wire.split_chunk_response
        )
        for name, request in (("GetGradients", pb.GetGradientsRequest), ("GetParameters", pb.GetParametersRequest))
    }


def _stats(msg: pb.TensorStats) -> Stats:
    return Stats(msg.norm, msg.min, msg.max, msg.mean, msg.non_finite_count, msg.num_elements)


def _optimizer_message(optimizer: Optimizer) -> pb.OptimizerConfig:
    if optimizer.kind not in _OPTIMIZER_KINDS:
        raise ValueError(f"optimizer kind must be one of {sorted(_OPTIMIZER_KINDS)}, got {optimizer.kind!r}")
    config = pb.OptimizerConfig(kind=_OPTIMIZER_KINDS[optimizer.kind])
    for name in _OPTIMIZER_FIELDS:
        value = getattr(optimizer, name)
        if value is not None:
            setattr(config, name, value)
    return config


def _optimizer(msg: pb.OptimizerConfig) -> Optimizer:
    return Optimizer(_OPTIMIZER_NAMES.get(msg.kind, "sgd"), **{name: getattr(msg, name) for name in _OPTIMIZER_FIELDS})


def _session_info(msg: pb.SessionInfo) -> SessionInfo:
    return SessionInfo(
        msg.session_id, msg.model, msg.weights, msg.device, msg.num_classes, _optimizer(msg.optimizer),
        msg.step_count, msg.pending_forward_id, msg.trainable_parameters, msg.frozen_parameters, msg.is_default,
        msg.autocast, msg.memory_format,
    )


def _transfer_type(dtype: str) -> int:
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    return codec.DATA_TYPES_BY_NAME[dtype]


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = details.wait_for_ready
        self.compression = details.compression


if TYPE_CHECKING:  # the stubs make the interceptor classes generic; at run time they are not
    _UnaryInterceptor = grpc.UnaryUnaryClientInterceptor[Any, Any]
    _StreamInterceptor = grpc.UnaryStreamClientInterceptor[Any, Any]
else:
    _UnaryInterceptor = grpc.UnaryUnaryClientInterceptor
    _StreamInterceptor = grpc.UnaryStreamClientInterceptor


class _BearerToken(_UnaryInterceptor, _StreamInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call on the channel (the raw stub's too)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details, (*(details.metadata or ()), self._header))

    def intercept_unary_unary(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(details), request)


def channel_settings(max_message_bytes: int, options: Iterable[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """The channel options of both SDKs (sync and asyncio): message sizes, and the retry policy of
    the idempotent calls (``_SERVICE_CONFIG``), then the caller's own ``options``."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", _SERVICE_CONFIG),
        *options,
    ]


class TrainerClient:
    """A connection to a training server.

    ``with TrainerClient("localhost:50051") as client:`` closes the channel on exit. ``timeout`` is
    the deadline in seconds of every call (each method also takes its own ``timeout``).

    ``token`` is sent as ``authorization: Bearer <token>`` on every call. ``tls`` (implied by any
    certificate) encrypts the channel; ``ca_cert`` is the PEM of the CA that signed the server's
    certificate (default: the system's roots), ``client_cert`` and ``client_key`` the PEM pair for a
    server that asks for client certificates (mutual TLS).
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float = 120.0,
        token: str | None = None,
        tls: bool = False,
        ca_cert: bytes | None = None,
        client_cert: bytes | None = None,
        client_key: bytes | None = None,
        max_message_bytes: int = 512 * MIB,
        options: Iterable[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        channel_options = channel_settings(max_message_bytes, options)
        if tls or ca_cert or client_cert or client_key:
            credentials = grpc.ssl_channel_credentials(ca_cert, client_key, client_cert)
            self._channel = grpc.secure_channel(target, credentials, options=channel_options)
        else:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        self._base_channel = self._channel
        if token:
            self._channel = grpc.intercept_channel(self._channel, _BearerToken(token))
        self._stub = trainer_pb2_grpc.TrainerServiceStub(self._channel)
        self._tensor_streams = tensor_streams(self._channel)
        # Forward and TrainStep with the input's bytes copied once into the request (wire.SplicedRequest).
        self._spliced = {
            name: self._channel.unary_unary(
                f"/{SERVICE}/{name}", request_serializer=wire.SplicedRequest.serialize,
                response_deserializer=response.FromString,
            )
            for name, response in (("Forward", pb.ForwardResponse), ("TrainStep", pb.TrainStepResponse))
        }
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._closed = False

    def __enter__(self) -> TrainerClient:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel; calling it again does nothing."""
        if not self._closed:
            self._closed = True
            self._base_channel.close()

    def call(self, method: Callable[..., Resp], request: Any, timeout: float | None = None) -> Resp:
        """Runs a unary call with the deadline, turning a failure into a ``TrainerError``."""
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    def stream(self, method: Callable[..., Iterable[Resp]], request: Any, timeout: float | None = None) -> Iterator[Resp]:
        """Runs a server-streaming call with the deadline, turning a failure into a ``TrainerError``."""
        try:
            yield from method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    @property
    def stub(self) -> trainer_pb2_grpc.TrainerServiceStub:
        """The raw generated stub, for what the SDK does not wrap."""
        return self._stub

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The server's health status name: "SERVING", "NOT_SERVING", ..."""
        response = self.call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def session(self, session_id: str = "") -> Session:
        """A handle on an existing session; no id means the server's default session."""
        return Session(self, session_id)

    def create_session(
        self,
        weights: str = "random",
        *,
        num_classes: int = 0,
        optimizer: Optimizer | None = None,
        seed: int = 0,
        autocast: AutocastName | None = None,
        memory_format: MemoryFormatName | None = None,
        timeout: float | None = None,
    ) -> Session:
        """A new session: "random" (seeded) weights, "imagenet", or a weights file in the server's data dir.

        ``autocast`` ("off", "bf16", "fp16") runs its forwards under ``torch.autocast`` and
        ``memory_format`` ("contiguous", "channels_last") lays out its weights and inputs; None takes
        the server's setting (``info()`` says what the session runs with). Use it as a context
        manager to close it on exit.
        """
        request = pb.CreateSessionRequest(weights=weights, num_classes=num_classes, seed=seed, autocast=autocast or "",
                                          memory_format=memory_format or "")
        if optimizer is not None:
            request.optimizer.CopyFrom(_optimizer_message(optimizer))
        response = self.call(self._stub.CreateSession, request, timeout)
        return Session(self, response.session.session_id)

    def list_sessions(self, timeout: float | None = None) -> list[SessionInfo]:
        """The sessions this client's token may use: the default session first (``is_default``),
        then the ones it created, oldest first."""
        response = self.call(self._stub.ListSessions, pb.ListSessionsRequest(), timeout)
        return [_session_info(s) for s in response.sessions]

    def list_checkpoints(self, timeout: float | None = None) -> list[CheckpointFile]:
        """The checkpoints this client's token may load, by name (none when the server has no
        ``--checkpoint-dir``)."""
        response = self.call(self._stub.ListSessions, pb.ListSessionsRequest(), timeout)
        return [CheckpointFile(c.name, c.size_bytes, c.modified_unix_seconds) for c in response.checkpoints]


class Session:
    """One session on the server: a model with its optimizer, gradients and pending forward."""

    def __init__(self, client: TrainerClient, session_id: str = "") -> None:
        self._client = client
        self._stub = client.stub
        self.session_id = session_id
        self._closed = False
        self._last_forward_id = 0  # of the last Forward made through this handle

    def __enter__(self) -> Session:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self, timeout: float | None = None) -> None:
        """Closes the session on the server; idempotent, and a no-op for the default session."""
        if self.session_id in ("", "default") or self._closed:
            return
        self._client.call(self._stub.CloseSession, pb.CloseSessionRequest(session_id=self.session_id), timeout)
        self._closed = True  # only now: a close that failed (a timeout, say) can be tried again

    def info(self, timeout: float | None = None) -> SessionInfo:
        """What the session holds."""
        response = self._client.call(self._stub.DescribeSession, pb.DescribeSessionRequest(session_id=self.session_id), timeout)
        return _session_info(response.session)

    def forward(
        self, x: Any, *, eval_mode: bool = False, no_grad: bool = False, stats_only: bool = False, timeout: float | None = None
    ) -> ForwardResult:
        """``model(x)`` on the server for a float batch (N, 3, H, W); keeps the graph unless ``no_grad``."""
        request = pb.ForwardRequest(
            session_id=self.session_id, eval_mode=eval_mode, no_grad=no_grad,
            output_format=pb.OUTPUT_FORMAT_STATS_ONLY if stats_only else pb.OUTPUT_FORMAT_RAW,
        )
        response = self._client.call(self._client._spliced["Forward"], _spliced_input(request, x), timeout)
        # A writable copy (the decoded view would be read-only, over the response's bytes); logits are small.
        logits = codec.decode(response.logits).copy() if response.HasField("logits") else None
        self._last_forward_id = response.forward_id
        return ForwardResult(response.forward_id, logits, _stats(response.logits_stats))  # type: ignore[arg-type]

    def backward(
        self,
        loss: str | None = None,
        labels: Any = None,
        *,
        output_gradient: Any = None,
        retain_graph: bool = False,
        forward_id: int | None = None,
        step: bool = False,
        zero_grad_after_step: bool = False,
        grad_norm: bool = True,
        timeout: float | None = None,
    ) -> BackwardResult:
        """Backpropagates from the pending forward.

        ``loss`` "sum" is the tutorial's ``(prediction - labels).sum()``; "cross_entropy" takes class
        indices; "mse" is the mean squared error. Or pass ``output_gradient``, the gradient of your own
        loss with respect to the logits (``prediction.backward(gradient=...)``).

        ``forward_id`` defaults to the last forward made through this handle, so that on a shared
        session a forward someone else made since is refused (STALE_FORWARD), never silently used;
        0 means whatever forward is pending.

        ``step`` runs the optimizer step in the same call, right after the backward (the result's
        ``step_count`` is then set), and ``zero_grad_after_step`` clears every .grad after it, as
        the next iteration's ``optimizer.zero_grad()`` would: a training step with a client-side
        loss in two round trips (Forward, then this).

        ``grad_norm=False`` leaves the global gradient norm out of the result (None): the server
        then skips a pass over every .grad, which is worth it in a tight loop.
        """
        if (loss is None) == (output_gradient is None):
            raise ValueError("give exactly one of loss (with labels) or output_gradient")
        fid = self._last_forward_id if forward_id is None else forward_id
        request = pb.BackwardRequest(
            session_id=self.session_id, forward_id=fid, retain_graph=retain_graph, step=step,
            zero_grad_after_step=zero_grad_after_step, skip_grad_norm=not grad_norm,
        )
        if loss is not None:
            if loss not in _LOSSES:
                raise ValueError(f"loss must be one of {sorted(_LOSSES)}, got {loss!r}")
            if labels is None:
                raise ValueError(f"loss {loss!r} needs labels")
            request.loss.function = _LOSSES[loss]
            _fill_input(request.loss.labels, labels, np.int64 if loss == "cross_entropy" else np.float32)
        if output_gradient is not None:
            _fill_input(request.output_gradient, output_gradient, np.float32)
        response = self._client.call(self._stub.Backward, request, timeout)
        return BackwardResult(
            response.forward_id, response.loss if response.HasField("loss") else None,
            response.parameters_with_grad, response.grad_norm if response.HasField("grad_norm") else None,
            response.step_count, response.parameters_updated,
        )

    def step(self, timeout: float | None = None, expected_step_count: int | None = None) -> int:
        """One optimizer step; returns the session's step count.

        ``expected_step_count`` (the count before this step) makes retrying safe after a lost answer
        (DEADLINE_EXCEEDED, UNAVAILABLE): if the first try was taken, the retry takes no second step
        and answers with the same count. Any other count gives STEP_COUNT_MISMATCH.
        """
        request = pb.StepRequest(session_id=self.session_id, expected_step_count=expected_step_count)
        return self._client.call(self._stub.Step, request, timeout).step_count

    def zero_grad(self, set_to_none: bool = True, timeout: float | None = None) -> int:
        """Clears every .grad (to None, or to zeros); returns how many were set."""
        request = pb.ZeroGradRequest(session_id=self.session_id, set_to_none=set_to_none)
        return self._client.call(self._stub.ZeroGrad, request, timeout).parameters_cleared

    def configure_optimizer(self, optimizer: Optimizer | None = None, timeout: float | None = None, **values: Any) -> Optimizer:
        """Replaces the optimizer: ``configure_optimizer(kind="sgd", lr=1e-2, momentum=0.9)``."""
        optimizer = optimizer or Optimizer(**values)
        request = pb.ConfigureOptimizerRequest(session_id=self.session_id, optimizer=_optimizer_message(optimizer))
        return _optimizer(self._client.call(self._stub.ConfigureOptimizer, request, timeout).optimizer)

    def freeze(self, *patterns: str, timeout: float | None = None) -> FreezeResult:
        """Freezes parameters by name pattern ("layer4.*", a module prefix "layer1", or "*")."""
        return self._freeze(patterns, False, timeout)

    def unfreeze(self, *patterns: str, timeout: float | None = None) -> FreezeResult:
        """Unfreezes parameters by name pattern."""
        return self._freeze(patterns, True, timeout)

    def _freeze(self, patterns: Iterable[str], unfreeze: bool, timeout: float | None) -> FreezeResult:
        request = pb.FreezeLayersRequest(session_id=self.session_id, patterns=list(patterns), unfreeze=unfreeze)
        response = self._client.call(self._stub.FreezeLayers, request, timeout)
        return FreezeResult(list(response.changed), list(response.trainable), response.frozen_count)

    def replace_head(self, num_classes: int, seed: int = 0, timeout: float | None = None) -> SessionInfo:
        """``model.fc = nn.Linear(512, num_classes)`` after ``torch.manual_seed(seed)``; the optimizer is rebuilt."""
        request = pb.ReplaceHeadRequest(session_id=self.session_id, num_classes=num_classes, seed=seed)
        return _session_info(self._client.call(self._stub.ReplaceHead, request, timeout).session)

    def list_parameters(self, timeout: float | None = None) -> ParameterList:
        """Every parameter with shape, dtype, requires_grad and whether it has a .grad."""
        response = self._client.call(self._stub.ListParameters, pb.ListParametersRequest(session_id=self.session_id), timeout)
        return ParameterList(
            [
                ParameterInfo(
                    p.name, tuple(p.shape), codec.DATA_TYPE_NAMES.get(p.data_type, "unknown"),
                    p.requires_grad, p.has_grad, p.num_elements,
                )
                for p in response.parameters
            ],
            response.trainable_count, response.frozen_count, response.trainable_elements, response.total_elements,
        )

    def gradients(
        self, *patterns: str, stats_only: bool = False, dtype: str = "float32", stats: bool = True, timeout: float | None = None
    ) -> dict[str, NamedTensor]:
        """The .grad of every parameter (or those matching ``patterns``), by name, in model order.

        ``stats=False`` leaves out the statistics (one pass fewer over the gradients on the server).
        """
        request = pb.GetGradientsRequest(
            session_id=self.session_id, patterns=list(patterns), stats_only=stats_only,
            transfer_data_type=_transfer_type(dtype), skip_stats=not stats, pack_chunks=True,  # type: ignore[arg-type]
        )
        responses = self._client.stream(self._client._tensor_streams["GetGradients"], request, timeout)
        chunks = (chunk for response in responses for chunk in response)
        return self._assemble(chunks, not stats_only)

    def parameters(
        self,
        *patterns: str,
        stats_only: bool = False,
        dtype: str = "float32",
        include_buffers: bool = False,
        stats: bool = True,
        timeout: float | None = None,
    ) -> dict[str, NamedTensor]:
        """The values of every parameter (or those matching ``patterns``), and buffers if asked
        (``stats=False``: without statistics)."""
        request = pb.GetParametersRequest(
            session_id=self.session_id, patterns=list(patterns), stats_only=stats_only,
            transfer_data_type=_transfer_type(dtype), include_buffers=include_buffers,  # type: ignore[arg-type]
            skip_stats=not stats, pack_chunks=True,
        )
        responses = self._client.stream(self._client._tensor_streams["GetParameters"], request, timeout)
        chunks = (chunk for response in responses for chunk in response)
        return self._assemble(chunks, not stats_only)

    @staticmethod
    def _assemble(chunks: Iterable[tuple[pb.TensorChunk, memoryview]], with_data: bool) -> dict[str, NamedTensor]:
        return {
            t.name: NamedTensor(t.name, t.shape, t.present, _stats(t.stats) if t.stats else None, t.array)  # type: ignore[arg-type]
            for t in chunking.assemble_split_chunks(chunks, with_data)
        }

    def save_checkpoint(self, name: str, timeout: float | None = None) -> int:
        """Writes the session's state to checkpoint ``name`` on the server; returns the step count saved."""
        request = pb.SaveCheckpointRequest(session_id=self.session_id, name=name)
        return self._client.call(self._stub.SaveCheckpoint, request, timeout).step_count

    def load_checkpoint(self, name: str, timeout: float | None = None) -> SessionInfo:
        """Puts the session in the state of checkpoint ``name`` (gradients and pending forward cleared)."""
        request = pb.LoadCheckpointRequest(session_id=self.session_id, name=name)
        return _session_info(self._client.call(self._stub.LoadCheckpoint, request, timeout).session)

    def graph(self, timeout: float | None = None) -> Graph:
        """The autograd graph of the pending forward."""
        response = self._client.call(self._stub.GetGraph, pb.GetGraphRequest(session_id=self.session_id), timeout)
        return Graph(
            response.forward_id,
            response.root_id,
            [GraphNode(n.id, n.function, n.parameter) for n in response.nodes],
            [(e.from_id, e.to_id) for e in response.edges],
            list(response.leaf_parameters),
            list(response.excluded_parameters),
        )

    def reset(self, timeout: float | None = None) -> SessionInfo:
        """Puts the default session back as the server started it: weights, BatchNorm buffers, head,
        optimizer and its state, step count, frozen set; no gradients, no pending forward. Other
        sessions cannot be reset (``FailedPreconditionError``, reason ``RESET_NOT_AVAILABLE``)."""
        request = pb.ResetSessionRequest(session_id=self.session_id)
        return _session_info(self._client.call(self._stub.ResetSession, request, timeout).session)
    def train_step(
        self,
        x: Any,
        loss: str,
        labels: Any,
        *,
        zero_grad: bool = True,
        grad_norm: bool = False,
        return_logits: bool = False,
        timeout: float | None = None,
    ) -> TrainStepResult:
        """One whole training step in one round trip, in a local training loop's order::

            optimizer.zero_grad()                 # when zero_grad (else gradients accumulate)
            prediction = model(x)                 # train mode
            loss_fn(prediction, labels).backward()
            optimizer.step()

        ``loss`` and ``labels`` as for ``backward``. The numbers equal the separate ``zero_grad``,
        ``forward``, ``backward`` and ``step`` calls bit for bit. ``grad_norm`` also returns the
        gradients' L2 norm (one more pass over them), ``return_logits`` the logits.
        """
        if loss not in _LOSSES:
            raise ValueError(f"loss must be one of {sorted(_LOSSES)}, got {loss!r}")
        request = pb.TrainStepRequest(
            session_id=self.session_id, zero_grad=zero_grad, return_grad_norm=grad_norm, return_logits=return_logits,
        )
        request.loss.function = _LOSSES[loss]
        _fill_input(request.loss.labels, labels, np.int64 if loss == "cross_entropy" else np.float32)
        response = self._client.call(self._client._spliced["TrainStep"], _spliced_input(request, x), timeout)
        self._last_forward_id = response.forward_id
        logits = codec.decode(response.logits).copy() if response.HasField("logits") else None
        return TrainStepResult(
            response.forward_id, response.loss, _stats(response.logits_stats), response.step_count,
            response.parameters_updated, response.grad_norm if response.HasField("grad_norm") else None,
            logits,  # type: ignore[arg-type]
        )
