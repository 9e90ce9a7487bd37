"""The TrainerService servicer: each method decodes, finds the session, calls the engine, encodes."""

from __future__ import annotations

import functools
import logging
from typing import TypeVar
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from remote_trainer.engine import checkpoints
from remote_trainer.server import convert
from remote_trainer.server.dispatch import Dispatcher
from remote_trainer.server.auth import TokenAuth, caller
from remote_trainer.engine.limits import Limits
from remote_trainer.engine.optimizer import OptimizerSpec
from remote_trainer.engine.results import SessionDescription
from remote_trainer.engine.session import SessionEngine
from remote_trainer.engine.errors import invalid
from remote_trainer.server.metrics import Metrics
from remote_trainer.server.sessions import DEFAULT_SESSION_ID, SessionStore
from remote_trainer.server.settings import Settings
from remote_trainer.server.status import Context, streaming, unary
from remote_trainer.contract import codec
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb

log = logging.getLogger(__name__)

T = TypeVar("T")

# Builds a model for CreateSession: (weights, num_classes, seed) -> (model, description).
ModelFactory = Callable[[str, int, int], tuple[torch.nn.Module, str]]


class TrainerServicer:
    """Serves trainer.v1.TrainerService over a session store (registered method by method from the
    service descriptor in app.py, each with the call shape of its decorator)."""

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
        self._max_message_bytes = settings.max_message_bytes
        self._checkpoint_dir = settings.checkpoint_dir
        self._checkpoint_every = settings.checkpoint_every
        self._auth = auth
        self.metrics = metrics
        self.stream_write_timeout = settings.stream_write_timeout_seconds
        self._dispatcher = Dispatcher(settings.max_workers)

    async def run(self, session_id: str | None, work: Callable[[], T]) -> T:
        """Runs a method's blocking work on a worker thread, one call at a time per session."""
        return await self._dispatcher.run(session_id, work)

    def close(self) -> None:
        """Stops the worker threads once their current work is done."""
        self._dispatcher.close()

    def _session(self, session_id: str, context: Context) -> SessionEngine:
        return self._store.get(session_id, caller(self._auth, context))

    def _info(self, session_id: str, description: SessionDescription) -> pb.SessionInfo:
        sid = session_id or DEFAULT_SESSION_ID
        return convert.session_info(sid, description, sid == DEFAULT_SESSION_ID)

    def _checkpoint_path(self, name: str, context: Context) -> Path:
        return checkpoints.checkpoint_path(name, self._checkpoint_dir, caller(self._auth, context))

    @unary
    def CreateSession(self, request: pb.CreateSessionRequest, context: Context) -> pb.CreateSessionResponse:
        spec = convert.optimizer_spec(request.optimizer) if request.HasField("optimizer") else OptimizerSpec.tutorial()
        spec.validate()

        def build() -> SessionEngine:
            model, source = self._build_model(request.weights, request.num_classes, request.seed)
            return SessionEngine(model, self._device, source, spec, self._limits)

        session_id, engine = self._store.create(build, caller(self._auth, context))
        return pb.CreateSessionResponse(session=self._info(session_id, engine.describe()))

    @unary
    def CloseSession(self, request: pb.CloseSessionRequest, context: Context) -> pb.CloseSessionResponse:
        self._store.close(request.session_id, caller(self._auth, context))
        return pb.CloseSessionResponse(session_id=request.session_id)

    @unary
    def DescribeSession(self, request: pb.DescribeSessionRequest, context: Context) -> pb.DescribeSessionResponse:
        description = self._session(request.session_id, context).describe()
        return pb.DescribeSessionResponse(session=self._info(request.session_id, description))

    @unary
    def Forward(self, request: pb.ForwardRequest, context: Context) -> pb.ForwardResponse:
        engine = self._session(request.session_id, context)
        fmt = request.output_format
        if fmt not in pb.OutputFormat.values():
            raise invalid("output_format", f"unknown output_format {fmt}", "BAD_OUTPUT_FORMAT")
        x, as_numbers = convert.input_tensor(request.input, "input", self._limits.max_input_elements)
        as_values = fmt == pb.OUTPUT_FORMAT_VALUES or fmt == pb.OUTPUT_FORMAT_UNSPECIFIED and as_numbers
        # Numbers travel as 8-byte doubles, raw logits as 4-byte floats; 64 KiB for the rest of the message.
        budget = None if fmt == pb.OUTPUT_FORMAT_STATS_ONLY else (self._max_message_bytes - 65536) // (8 if as_values else 4)
        result = engine.forward(x, eval_mode=request.eval_mode, no_grad=request.no_grad, max_logits_elements=budget)
        response = pb.ForwardResponse(forward_id=result.forward_id, logits_stats=convert.stats_message(result.stats))
        if as_values:
            response.logits_values.CopyFrom(convert.output_values(result.logits))
        elif fmt != pb.OUTPUT_FORMAT_STATS_ONLY:
            response.logits.CopyFrom(convert.output_tensor(result.logits))
        return response

    @unary
    def Backward(self, request: pb.BackwardRequest, context: Context) -> pb.BackwardResponse:
        engine = self._session(request.session_id, context)
        source = request.WhichOneof("source")
        max_elements = self._limits.max_input_elements
        if source == "loss":
            loss = convert.LOSSES.get(request.loss.function)
            if loss is None:
                raise invalid("loss.function", f"unknown loss function {request.loss.function}: "
                              "use SUM_DIFFERENCE, CROSS_ENTROPY or MSE", "UNKNOWN_LOSS")
            labels, _ = convert.input_tensor(request.loss.labels, "loss.labels", max_elements, integer=loss == "cross_entropy")
            result = engine.backward(request.forward_id, loss=loss, labels=labels, retain_graph=request.retain_graph,
                                     step=request.step, zero_grad_after_step=request.zero_grad_after_step)
        elif source == "output_gradient":
            gradient, _ = convert.input_tensor(request.output_gradient, "output_gradient", max_elements)
            result = engine.backward(request.forward_id, output_gradient=gradient, retain_graph=request.retain_graph,
                                     step=request.step, zero_grad_after_step=request.zero_grad_after_step)
        else:
            raise invalid("source", "give a loss or an output_gradient", "NO_BACKWARD_SOURCE")
        response = pb.BackwardResponse(
            forward_id=result.forward_id, parameters_with_grad=result.parameters_with_grad, grad_norm=result.grad_norm,
            step_count=result.step_count, parameters_updated=result.parameters_updated,
        )
        if result.loss is not None:
            response.loss = result.loss
        if request.step:
            self._after_step(engine, result.step_count, request.session_id, context)
        return response

    @unary
    def Step(self, request: pb.StepRequest, context: Context) -> pb.StepResponse:
        engine = self._session(request.session_id, context)
        step_count, updated = engine.step()
        self._after_step(engine, step_count, request.session_id, context)
        return pb.StepResponse(step_count=step_count, parameters_updated=updated)

    def _after_step(self, engine: SessionEngine, step_count: int, session_id: str, context: Context) -> None:
        """The automatic checkpoint every ``checkpoint_every`` steps, after any call that stepped."""
        if self._checkpoint_every and step_count % self._checkpoint_every == 0:
            name = f"auto-{session_id or DEFAULT_SESSION_ID}.ckpt"
            try:
                checkpoints.save(engine.checkpoint(), self._checkpoint_path(name, context))
                log.info("session %s checkpointed to %s at step %d", session_id or DEFAULT_SESSION_ID, name, step_count)
            except Exception:  # the step is done: a failed automatic checkpoint must not make it look failed
                log.exception("automatic checkpoint %s at step %d failed", name, step_count)

    @unary
    def ZeroGrad(self, request: pb.ZeroGradRequest, context: Context) -> pb.ZeroGradResponse:
        set_to_none = request.set_to_none if request.HasField("set_to_none") else True
        cleared = self._session(request.session_id, context).zero_grad(set_to_none)
        return pb.ZeroGradResponse(parameters_cleared=cleared)

    @unary
    def ConfigureOptimizer(
        self, request: pb.ConfigureOptimizerRequest, context: Context
    ) -> pb.ConfigureOptimizerResponse:
        engine = self._session(request.session_id, context)
        spec = engine.configure_optimizer(convert.optimizer_spec(request.optimizer))
        return pb.ConfigureOptimizerResponse(optimizer=convert.optimizer_config(spec))

    @unary
    def FreezeLayers(self, request: pb.FreezeLayersRequest, context: Context) -> pb.FreezeLayersResponse:
        result = self._session(request.session_id, context).freeze(list(request.patterns), unfreeze=request.unfreeze)
        return pb.FreezeLayersResponse(changed=result.changed, trainable=result.trainable, frozen_count=result.frozen_count)

    @unary
    def ReplaceHead(self, request: pb.ReplaceHeadRequest, context: Context) -> pb.ReplaceHeadResponse:
        description = self._session(request.session_id, context).replace_head(request.num_classes, request.seed)
        return pb.ReplaceHeadResponse(session=self._info(request.session_id, description))

    @unary
    def ListParameters(self, request: pb.ListParametersRequest, context: Context) -> pb.ListParametersResponse:
        return convert.parameter_list(self._session(request.session_id, context).parameters_info())

    @streaming
    def GetGradients(self, request: pb.GetGradientsRequest, context: Context) -> Iterator[codec.Serialized]:
        # Every response is written in wire form under the session's lock, straight from the
        # gradients' memory (one copy, no snapshot); the stream then sends what is written.
        engine = self._session(request.session_id, context)
        encode = functools.partial(convert.wire_chunks, chunk_bytes=self._chunk_bytes)
        for messages in engine.encode_gradients(
            list(request.patterns), request.stats_only, convert.transfer_dtype(request.transfer_data_type), encode,
            with_stats=not request.skip_stats,
        ):
            yield from messages

    @streaming
    def GetParameters(self, request: pb.GetParametersRequest, context: Context) -> Iterator[codec.Serialized]:
        engine = self._session(request.session_id, context)
        encode = functools.partial(convert.wire_chunks, chunk_bytes=self._chunk_bytes)
        for messages in engine.encode_parameters(
            list(request.patterns), request.stats_only, convert.transfer_dtype(request.transfer_data_type),
            request.include_buffers, encode, with_stats=not request.skip_stats,
        ):
            yield from messages

    @unary
    def GetGraph(self, request: pb.GetGraphRequest, context: Context) -> pb.GetGraphResponse:
        return convert.graph_message(self._session(request.session_id, context).graph())

    @unary
    def SaveCheckpoint(self, request: pb.SaveCheckpointRequest, context: Context) -> pb.SaveCheckpointResponse:
        engine = self._session(request.session_id, context)
        path = self._checkpoint_path(request.name, context)
        state = engine.checkpoint()
        size = checkpoints.save(state, path)
        return pb.SaveCheckpointResponse(name=request.name, step_count=int(state["step_count"]), size_bytes=size)  # type: ignore[call-overload]

    @unary
    def LoadCheckpoint(self, request: pb.LoadCheckpointRequest, context: Context) -> pb.LoadCheckpointResponse:
        engine = self._session(request.session_id, context)
        description = engine.restore(checkpoints.load(self._checkpoint_path(request.name, context)))
        return pb.LoadCheckpointResponse(session=self._info(request.session_id, description))

    @unary
    def TrainStep(self, request: pb.TrainStepRequest, context: Context) -> pb.TrainStepResponse:
        engine = self._session(request.session_id, context)
        loss = convert.LOSSES.get(request.loss.function)
        if loss is None:
            raise invalid("loss.function", f"unknown loss function {request.loss.function}: "
                          "use SUM_DIFFERENCE, CROSS_ENTROPY or MSE", "UNKNOWN_LOSS")
        max_elements = self._limits.max_input_elements
        x, _ = convert.input_tensor(request.input, "input", max_elements)
        labels, _ = convert.input_tensor(request.loss.labels, "loss.labels", max_elements, integer=loss == "cross_entropy")
        zero_grad = request.zero_grad if request.HasField("zero_grad") else True
        budget = (self._max_message_bytes - 65536) // 4 if request.return_logits else None
        result = engine.train_step(x, loss, labels, zero_grad=zero_grad, grad_norm=request.return_grad_norm, max_logits_elements=budget)
        self._after_step(engine, result.step_count, request.session_id, context)
        response = pb.TrainStepResponse(
            forward_id=result.forward_id, loss=result.loss, logits_stats=convert.stats_message(result.stats),
            step_count=result.step_count, parameters_updated=result.parameters_updated,
        )
        if result.grad_norm is not None:
            response.grad_norm = result.grad_norm
        if request.return_logits:
            response.logits.CopyFrom(convert.output_tensor(result.logits))
        return response
