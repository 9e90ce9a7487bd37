"""The asyncio SDK: ``AsyncTrainerClient`` and ``AsyncSession`` on ``grpc.aio``.

The same session methods as ``TrainerClient``/``Session``, as coroutines, so one event loop can
drive many sessions, or upload the next batch while the server computes the last one. Cancelling
the task that awaits a call cancels the RPC. Arrays, results and errors are those of the sync SDK
(numpy in and out, ``client.types`` dataclasses, ``client.errors`` exceptions).

    async with AsyncTrainerClient("localhost:50051") as client:
        model = client.session()
        await model.forward(data)
        result = await model.backward("sum", labels)
"""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from remote_trainer.client.client import (
    _LOSSES,
    channel_settings,
    MIB,
    Session,
    _fill_input,
    _optimizer,
    _optimizer_message,
    _session_info,
    _stats,
    _transfer_type,
    tensor_streams,
)
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
)
from remote_trainer.contract import codec
from remote_trainer.contract.names import AutocastName, MemoryFormatName
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb
from remote_trainer.contract.trainer.v1 import trainer_pb2_grpc


class AsyncTrainerClient:
    """A ``grpc.aio`` connection to a training server; the async twin of ``TrainerClient``.

    ``async with AsyncTrainerClient(target) as client:`` closes the channel on exit. The options
    (``timeout``, ``token``, TLS certificates, ``max_message_bytes``) are ``TrainerClient``'s.
    Create it inside the event loop that will use it.
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
            self._channel = grpc.aio.secure_channel(target, credentials, options=channel_options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=channel_options)
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._stub = trainer_pb2_grpc.TrainerServiceStub(self._channel)
        self._tensor_streams = tensor_streams(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> AsyncTrainerClient:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel (calls in flight are cancelled)."""
        await self._channel.close(None)

    async def call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        """Awaits a unary call with the deadline, turning a failure into a ``TrainerError``."""
        try:
            return await method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    async def collect(self, method: Any, request: Any, timeout: float | None = None) -> list[Any]:
        """Awaits every message of a server-streaming call."""
        try:
            return [r async for r in method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)]
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    @property
    def stub(self) -> trainer_pb2_grpc.TrainerServiceStub:
        """The raw generated stub on the aio channel (its calls return awaitables)."""
        return self._stub

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        """The server's health status name: "SERVING", "NOT_SERVING", ..."""
        response = await self.call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def session(self, session_id: str = "") -> AsyncSession:
        """A handle on an existing session; no id means the server's default session."""
        return AsyncSession(self, session_id)

    async def create_session(
        self, weights: str = "random", *, num_classes: int = 0, optimizer: Optimizer | None = None, seed: int = 0,
        autocast: AutocastName | None = None, memory_format: MemoryFormatName | None = None, timeout: float | None = None,
    ) -> AsyncSession:
        """A new session (see ``TrainerClient.create_session``); ``async with`` it to close it on exit."""
        request = pb.CreateSessionRequest(weights=weights, num_classes=num_classes, seed=seed, autocast=autocast or "",
                                          memory_format=memory_format or "")
        if optimizer is not None:
            request.optimizer.CopyFrom(_optimizer_message(optimizer))
        response = await self.call(self._stub.CreateSession, request, timeout)
        return AsyncSession(self, response.session.session_id)

    async def list_sessions(self, timeout: float | None = None) -> list[SessionInfo]:
        """The default session, then this token's own sessions, oldest first."""
        response = await self.call(self._stub.ListSessions, pb.ListSessionsRequest(), timeout)
        return [_session_info(s) for s in response.sessions]

    async def list_checkpoints(self, timeout: float | None = None) -> list[CheckpointFile]:
        """The checkpoints this token may load, by name."""
        response = await self.call(self._stub.ListSessions, pb.ListSessionsRequest(), timeout)
        return [CheckpointFile(c.name, c.size_bytes, c.modified_unix_seconds) for c in response.checkpoints]


class AsyncSession:
    """One session on the server, with ``Session``'s methods as coroutines."""

    def __init__(self, client: AsyncTrainerClient, session_id: str = "") -> None:
        self._client = client
        self._stub = client.stub
        self.session_id = session_id
        self._closed = False
        self._last_forward_id = 0  # of the last Forward made through this handle

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self, timeout: float | None = None) -> None:
        """Closes the session on the server; idempotent, and a no-op for the default session."""
        if self.session_id in ("", "default") or self._closed:
            return
        await self._client.call(self._stub.CloseSession, pb.CloseSessionRequest(session_id=self.session_id), timeout)
        self._closed = True

    async def info(self, timeout: float | None = None) -> SessionInfo:
        """What the session holds."""
        response = await self._client.call(self._stub.DescribeSession, pb.DescribeSessionRequest(session_id=self.session_id), timeout)
        return _session_info(response.session)

    async def forward(
        self, x: Any, *, eval_mode: bool = False, no_grad: bool = False, stats_only: bool = False, timeout: float | None = None
    ) -> ForwardResult:
        """``model(x)`` on the server (see ``Session.forward``)."""
        request = pb.ForwardRequest(
            session_id=self.session_id, eval_mode=eval_mode, no_grad=no_grad,
            output_format=pb.OUTPUT_FORMAT_STATS_ONLY if stats_only else pb.OUTPUT_FORMAT_RAW,
        )
        _fill_input(request.input, x, np.float32)
        response = await self._client.call(self._stub.Forward, request, timeout)
        logits = codec.decode(response.logits).copy() if response.HasField("logits") else None
        self._last_forward_id = response.forward_id
        return ForwardResult(response.forward_id, logits, _stats(response.logits_stats))  # type: ignore[arg-type]

    async def backward(
        self, loss: str | None = None, labels: Any = None, *, output_gradient: Any = None, retain_graph: bool = False,
        forward_id: int | None = None, grad_norm: bool = True, timeout: float | None = None,
    ) -> BackwardResult:
        """Backpropagates from the pending forward (see ``Session.backward``)."""
        if (loss is None) == (output_gradient is None):
            raise ValueError("give exactly one of loss (with labels) or output_gradient")
        fid = self._last_forward_id if forward_id is None else forward_id
        request = pb.BackwardRequest(session_id=self.session_id, forward_id=fid, retain_graph=retain_graph,
                                     skip_grad_norm=not grad_norm)
        if loss is not None:
            if loss not in _LOSSES:
                raise ValueError(f"loss must be one of {sorted(_LOSSES)}, got {loss!r}")
            if labels is None:
                raise ValueError(f"loss {loss!r} needs labels")
            request.loss.function = _LOSSES[loss]
            _fill_input(request.loss.labels, labels, np.int64 if loss == "cross_entropy" else np.float32)
        if output_gradient is not None:
            _fill_input(request.output_gradient, output_gradient, np.float32)
        response = await self._client.call(self._stub.Backward, request, timeout)
        return BackwardResult(
            response.forward_id, response.loss if response.HasField("loss") else None, response.parameters_with_grad,
            response.grad_norm if response.HasField("grad_norm") else None,
        )

    async def step(self, timeout: float | None = None) -> int:
        """One optimizer step; returns the session's step count."""
        response = await self._client.call(self._stub.Step, pb.StepRequest(session_id=self.session_id), timeout)
        return int(response.step_count)

    async def zero_grad(self, set_to_none: bool = True, timeout: float | None = None) -> int:
        """Clears every .grad (to None, or to zeros); returns how many were set."""
        request = pb.ZeroGradRequest(session_id=self.session_id, set_to_none=set_to_none)
        return int((await self._client.call(self._stub.ZeroGrad, request, timeout)).parameters_cleared)

    async def configure_optimizer(self, optimizer: Optimizer | None = None, timeout: float | None = None, **values: Any) -> Optimizer:
        """Replaces the optimizer: ``await configure_optimizer(kind="adam", lr=1e-3)``."""
        request = pb.ConfigureOptimizerRequest(session_id=self.session_id, optimizer=_optimizer_message(optimizer or Optimizer(**values)))
        return _optimizer((await self._client.call(self._stub.ConfigureOptimizer, request, timeout)).optimizer)

    async def freeze(self, *patterns: str, timeout: float | None = None) -> FreezeResult:
        """Freezes parameters by name pattern."""
        return await self._freeze(patterns, False, timeout)

    async def unfreeze(self, *patterns: str, timeout: float | None = None) -> FreezeResult:
        """Unfreezes parameters by name pattern."""
        return await self._freeze(patterns, True, timeout)

    async def _freeze(self, patterns: Iterable[str], unfreeze: bool, timeout: float | None) -> FreezeResult:
        request = pb.FreezeLayersRequest(session_id=self.session_id, patterns=list(patterns), unfreeze=unfreeze)
        response = await self._client.call(self._stub.FreezeLayers, request, timeout)
        return FreezeResult(list(response.changed), list(response.trainable), response.frozen_count)

    async def replace_head(self, num_classes: int, seed: int = 0, timeout: float | None = None) -> SessionInfo:
        """``model.fc = nn.Linear(512, num_classes)`` after ``torch.manual_seed(seed)``."""
        request = pb.ReplaceHeadRequest(session_id=self.session_id, num_classes=num_classes, seed=seed)
        return _session_info((await self._client.call(self._stub.ReplaceHead, request, timeout)).session)

    async def list_parameters(self, timeout: float | None = None) -> ParameterList:
        """Every parameter with shape, dtype, requires_grad and whether it has a .grad."""
        response = await self._client.call(self._stub.ListParameters, pb.ListParametersRequest(session_id=self.session_id), timeout)
        return ParameterList(
            [ParameterInfo(p.name, tuple(p.shape), codec.DATA_TYPE_NAMES.get(p.data_type, "unknown"), p.requires_grad,
                           p.has_grad, p.num_elements) for p in response.parameters],
            response.trainable_count, response.frozen_count, response.trainable_elements, response.total_elements,
        )

    async def gradients(
        self, *patterns: str, stats_only: bool = False, dtype: str = "float32", stats: bool = True, timeout: float | None = None
    ) -> dict[str, NamedTensor]:
        """The .grad of every parameter (or those matching ``patterns``), by name (see ``Session.gradients``)."""
        request = pb.GetGradientsRequest(session_id=self.session_id, patterns=list(patterns), stats_only=stats_only,
                                         transfer_data_type=_transfer_type(dtype),  # type: ignore[arg-type]
                                         skip_stats=not stats, pack_chunks=True)
        responses = await self._client.collect(self._client._tensor_streams["GetGradients"], request, timeout)
        return Session._assemble((chunk for response in responses for chunk in response), not stats_only)

    async def parameters(
        self, *patterns: str, stats_only: bool = False, dtype: str = "float32", include_buffers: bool = False,
        stats: bool = True, timeout: float | None = None,
    ) -> dict[str, NamedTensor]:
        """The values of every parameter (or those matching ``patterns``), and buffers if asked."""
        request = pb.GetParametersRequest(session_id=self.session_id, patterns=list(patterns), stats_only=stats_only,
                                          transfer_data_type=_transfer_type(dtype),  # type: ignore[arg-type]
                                          include_buffers=include_buffers, skip_stats=not stats, pack_chunks=True)
        responses = await self._client.collect(self._client._tensor_streams["GetParameters"], request, timeout)
        return Session._assemble((chunk for response in responses for chunk in response), not stats_only)

    async def save_checkpoint(self, name: str, timeout: float | None = None) -> int:
        """Writes the session's state to checkpoint ``name``; returns the step count saved."""
        request = pb.SaveCheckpointRequest(session_id=self.session_id, name=name)
        return int((await self._client.call(self._stub.SaveCheckpoint, request, timeout)).step_count)

    async def load_checkpoint(self, name: str, timeout: float | None = None) -> SessionInfo:
        """Puts the session in the state of checkpoint ``name``."""
        request = pb.LoadCheckpointRequest(session_id=self.session_id, name=name)
        return _session_info((await self._client.call(self._stub.LoadCheckpoint, request, timeout)).session)

    async def graph(self, timeout: float | None = None) -> Graph:
        """The autograd graph of the pending forward."""
        response = await self._client.call(self._stub.GetGraph, pb.GetGraphRequest(session_id=self.session_id), timeout)
        return Graph(
            response.forward_id, response.root_id, [GraphNode(n.id, n.function, n.parameter) for n in response.nodes],
            [(e.from_id, e.to_id) for e in response.edges], list(response.leaf_parameters), list(response.excluded_parameters),
        )

    async def reset(self, timeout: float | None = None) -> SessionInfo:
        """Puts the default session back as the server started it (see ``Session.reset``)."""
        request = pb.ResetSessionRequest(session_id=self.session_id)
        return _session_info((await self._client.call(self._stub.ResetSession, request, timeout)).session)
