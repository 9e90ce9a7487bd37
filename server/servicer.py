"""The TrainerService servicer: each method decodes, finds the session, calls the engine, encodes."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import torch

from server import checkpoints, wire
from server.auth import TokenAuth, caller
from server.engine import Limits, OptimizerSpec, SessionDescription, SessionEngine
from server.errors import invalid
from server.metrics import Metrics
from server.sessions import DEFAULT_SESSION_ID, SessionStore
from server.settings import Settings
from server.status import streaming, unary
from trainer.v1 import trainer_pb2 as pb
from trainer.v1 import trainer_pb2_grpc

log = logging.getLogger(__name__)

# Builds a model for CreateSession: (weights, num_classes, seed) -> (model, description).
ModelFactory = Callable[[str, int, int], tuple[torch.nn.Module, str]]


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    """Serves trainer.v1.TrainerService over a session store."""

    def __init__(
        self,
        store: SessionStore,
        build_model: ModelFactory,
        device: torch.device,
        limits: Limits,
        settings: Settings,
        auth: TokenAuth | None,
        metrics: Metrics,
    ) -> None:
        self._store = store
        self._build_model = build_model
        self._device = device
        self._limits = limits
        self._chunk_bytes = settings.chunk_bytes
        self._checkpoint_dir = settings.checkpoint_dir
        self._checkpoint_every = settings.checkpoint_every
        self._auth = auth
        self.metrics = metrics

    def _session(self, session_id: str, context: grpc.ServicerContext) -> SessionEngine:
        return self._store.get(session_id, caller(self._auth, context))

    def _info(self, session_id: str, description: SessionDescription) -> pb.SessionInfo:
        sid = session_id or DEFAULT_SESSION_ID
        return wire.session_info(sid, description, sid == DEFAULT_SESSION_ID)

    def _checkpoint_path(self, name: str, context: grpc.ServicerContext) -> Path:
        return checkpoints.checkpoint_path(name, self._checkpoint_dir, caller(self._auth, context))

    @unary
    def CreateSession(self, request: pb.CreateSessionRequest, context: grpc.ServicerContext) -> pb.CreateSessionResponse:
        spec = wire.optimizer_spec(request.optimizer) if request.HasField("optimizer") else OptimizerSpec.tutorial()
        spec.validate()

        def build() -> SessionEngine:
            model, source = self._build_model(request.weights, request.num_classes, request.seed)
            return SessionEngine(model, self._device, source, spec, self._limits)

        session_id, engine = self._store.create(build, caller(self._auth, context))
        return pb.CreateSessionResponse(session=self._info(session_id, engine.describe()))

    @unary
    def CloseSession(self, request: pb.CloseSessionRequest, context: grpc.ServicerContext) -> pb.CloseSessionResponse:
        self._store.close(request.session_id, caller(self._auth, context))
        return pb.CloseSessionResponse(session_id=request.session_id)

    @unary
    def DescribeSession(self, request: pb.DescribeSessionRequest, context: grpc.ServicerContext) -> pb.DescribeSessionResponse:
        description = self._session(request.session_id, context).describe()
        return pb.DescribeSessionResponse(session=self._info(request.session_id, description))

    @unary
    def Forward(self, request: pb.ForwardRequest, context: grpc.ServicerContext) -> pb.ForwardResponse:
        engine = self._session(request.session_id, context)
        fmt = request.output_format
        if fmt not in pb.OutputFormat.values():
            raise invalid("output_format", f"unknown output_format {fmt}", "BAD_OUTPUT_FORMAT")
        x, as_numbers = wire.input_tensor(request.input, "input", self._limits.max_input_elements)
        result = engine.forward(x, eval_mode=request.eval_mode, no_grad=request.no_grad)
        response = pb.ForwardResponse(forward_id=result.forward_id, logits_stats=wire.stats_message(result.stats))
        if fmt == pb.OUTPUT_FORMAT_VALUES or fmt == pb.OUTPUT_FORMAT_UNSPECIFIED and as_numbers:
            response.logits_values.CopyFrom(wire.output_values(result.logits))
        elif fmt != pb.OUTPUT_FORMAT_STATS_ONLY:
            response.logits.CopyFrom(wire.output_tensor(result.logits))
        return response

    @unary
    def Backward(self, request: pb.BackwardRequest, context: grpc.ServicerContext) -> pb.BackwardResponse:
        engine = self._session(request.session_id, context)
        source = request.WhichOneof("source")
        max_elements = self._limits.max_input_elements
        if source == "loss":
            loss = wire.LOSSES.get(request.loss.function)
            if loss is None:
                raise invalid("loss.function", f"unknown loss function {request.loss.function}: "
                              "use SUM_DIFFERENCE, CROSS_ENTROPY or MSE", "UNKNOWN_LOSS")
            labels, _ = wire.input_tensor(request.loss.labels, "loss.labels", max_elements, integer=loss == "cross_entropy")
            result = engine.backward(request.forward_id, loss=loss, labels=labels, retain_graph=request.retain_graph)
        elif source == "output_gradient":
            gradient, _ = wire.input_tensor(request.output_gradient, "output_gradient", max_elements)
            result = engine.backward(request.forward_id, output_gradient=gradient, retain_graph=request.retain_graph)
        else:
            raise invalid("source", "give a loss or an output_gradient", "NO_BACKWARD_SOURCE")
        response = pb.BackwardResponse(
            forward_id=result.forward_id, parameters_with_grad=result.parameters_with_grad, grad_norm=result.grad_norm
        )
        if result.loss is not None:
            response.loss = result.loss
        return response

    @unary
    def Step(self, request: pb.StepRequest, context: grpc.ServicerContext) -> pb.StepResponse:
        engine = self._session(request.session_id, context)
        step_count, updated = engine.step()
        if self._checkpoint_every and step_count % self._checkpoint_every == 0:
            name = f"auto-{request.session_id or DEFAULT_SESSION_ID}.ckpt"
            try:
                checkpoints.save(engine.checkpoint(), self._checkpoint_path(name, context))
                log.info("session %s checkpointed to %s at step %d", request.session_id or DEFAULT_SESSION_ID, name, step_count)
            except Exception:  # the step is done: a failed automatic checkpoint must not make it look failed
                log.exception("automatic checkpoint %s at step %d failed", name, step_count)
        return pb.StepResponse(step_count=step_count, parameters_updated=updated)

    @unary
    def ZeroGrad(self, request: pb.ZeroGradRequest, context: grpc.ServicerContext) -> pb.ZeroGradResponse:
        set_to_none = request.set_to_none if request.HasField("set_to_none") else True
        cleared = self._session(request.session_id, context).zero_grad(set_to_none)
        return pb.ZeroGradResponse(parameters_cleared=cleared)

    @unary
    def ConfigureOptimizer(
        self, request: pb.ConfigureOptimizerRequest, context: grpc.ServicerContext
    ) -> pb.ConfigureOptimizerResponse:
        engine = self._session(request.session_id, context)
        spec = engine.configure_optimizer(wire.optimizer_spec(request.optimizer))
        return pb.ConfigureOptimizerResponse(optimizer=wire.optimizer_config(spec))

    @unary
    def FreezeLayers(self, request: pb.FreezeLayersRequest, context: grpc.ServicerContext) -> pb.FreezeLayersResponse:
        result = self._session(request.session_id, context).freeze(list(request.patterns), unfreeze=request.unfreeze)
        return pb.FreezeLayersResponse(changed=result.changed, trainable=result.trainable, frozen_count=result.frozen_count)

    @unary
    def ReplaceHead(self, request: pb.ReplaceHeadRequest, context: grpc.ServicerContext) -> pb.ReplaceHeadResponse:
        description = self._session(request.session_id, context).replace_head(request.num_classes, request.seed)
        return pb.ReplaceHeadResponse(session=self._info(request.session_id, description))

    @unary
    def ListParameters(self, request: pb.ListParametersRequest, context: grpc.ServicerContext) -> pb.ListParametersResponse:
        params = self._session(request.session_id, context).parameters_info()
        response = pb.ListParametersResponse()
        for p in params:
            count = math.prod(p.shape)
            response.parameters.add(
                name=p.name, shape=p.shape, data_type=wire.TORCH_TO_WIRE[p.dtype],
                requires_grad=p.requires_grad, has_grad=p.has_grad, num_elements=count,
            )
            response.total_elements += count
            if p.requires_grad:
                response.trainable_count += 1
                response.trainable_elements += count
            else:
                response.frozen_count += 1
        return response

    @streaming
    def GetGradients(self, request: pb.GetGradientsRequest, context: grpc.ServicerContext) -> Iterator[pb.GetGradientsResponse]:
        engine = self._session(request.session_id, context)
        tensors = engine.gradients(list(request.patterns), request.stats_only, wire.transfer_dtype(request.transfer_data_type))
        yield from wire.chunk_responses(tensors, self._chunk_bytes, pb.GetGradientsResponse)

    @streaming
    def GetParameters(self, request: pb.GetParametersRequest, context: grpc.ServicerContext) -> Iterator[pb.GetParametersResponse]:
        engine = self._session(request.session_id, context)
        tensors = engine.parameters(
            list(request.patterns), request.stats_only, wire.transfer_dtype(request.transfer_data_type), request.include_buffers
        )
        yield from wire.chunk_responses(tensors, self._chunk_bytes, pb.GetParametersResponse)

    @unary
    def GetGraph(self, request: pb.GetGraphRequest, context: grpc.ServicerContext) -> pb.GetGraphResponse:
        graph = self._session(request.session_id, context).graph()
        return pb.GetGraphResponse(
            forward_id=graph.forward_id,
            root_id=graph.root_id,
            nodes=[pb.GraphNode(id=n.id, function=n.function, parameter=n.parameter) for n in graph.nodes],
            edges=[pb.GraphEdge(from_id=a, to_id=b) for a, b in graph.edges],
            leaf_parameters=graph.leaf_parameters,
            excluded_parameters=graph.excluded_parameters,
        )

    @unary
    def SaveCheckpoint(self, request: pb.SaveCheckpointRequest, context: grpc.ServicerContext) -> pb.SaveCheckpointResponse:
        engine = self._session(request.session_id, context)
        path = self._checkpoint_path(request.name, context)
        state = engine.checkpoint()
        size = checkpoints.save(state, path)
        return pb.SaveCheckpointResponse(name=request.name, step_count=int(state["step_count"]), size_bytes=size)  # type: ignore[call-overload]

    @unary
    def LoadCheckpoint(self, request: pb.LoadCheckpointRequest, context: grpc.ServicerContext) -> pb.LoadCheckpointResponse:
        engine = self._session(request.session_id, context)
        description = engine.restore(checkpoints.load(self._checkpoint_path(request.name, context)))
        return pb.LoadCheckpointResponse(session=self._info(request.session_id, description))
