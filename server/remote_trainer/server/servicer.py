"""The TrainerService servicer: each method decodes, finds the session, calls the engine, encodes."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from remote_trainer.engine import checkpoints
from remote_trainer.server import convert
from remote_trainer.server.dispatch import Dispatcher
from remote_trainer.server.auth import TokenAuth, caller
from remote_trainer.engine.budget import UNLIMITED, MemoryBudget, Reservation, model_bytes
from remote_trainer.engine.limits import MAX_CLASSES, Limits
from remote_trainer.engine.models import ModelSpec
from remote_trainer.engine.optimizer import OptimizerSpec
from remote_trainer.engine.protocol import Engine
from remote_trainer.engine.results import FreezeResult, SessionDescription
from remote_trainer.engine.errors import TrainerError, Unavailable, invalid
from remote_trainer.engine.operation import Operation
from remote_trainer.server.calls import current_call
from remote_trainer.server.client_tokens import Once
from remote_trainer.server.events import (
    CallObserver, Change, CheckpointLoaded, CheckpointSaved, Froze, HeadReplaced, OptimizerReplaced, WasReset,
)
from remote_trainer.server.rpc import Context, at_once, operation_of, pushed, streaming, unary
from remote_trainer.server.sessions import DEFAULT_SESSION_ID, Sessions
from remote_trainer.server.shared_memory import TICKET_SECONDS, SharedMemory, TensorWriter, on_default_session, unavailable
from remote_trainer.server.streams import Emit, StreamBytes
from remote_trainer.server.watch import RECENT, SessionEvents
from remote_trainer.contract.names import AUTOCAST_MODES, MEMORY_FORMATS
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb

log = logging.getLogger(__name__)

# The ledger's own refusals (engine/ledger.py): answers about the number, not about the request.
_LEDGER_REASONS = frozenset({"OPERATION_OUT_OF_ORDER", "OPERATION_FORGOTTEN", "OPERATION_GIVEN_UP", "OPERATION_MISMATCH",
                             "OPERATION_ANSWER_NOT_KEPT", "BAD_OPERATION_NUMBER", "BAD_OPERATION_CLIENT", "SESSION_RECREATED"})

T = TypeVar("T")


@dataclass(frozen=True)
class ServicerOptions:
    """What the servicer is configured with (server/app.py fills it from the settings)."""

    # Every session's model spec but for what the request chooses: files only from the data
    # directory; the engine builds the model wherever it runs.
    model: ModelSpec
    chunk_bytes: int  # data bytes per chunk in tensor streams
    max_message_bytes: int  # largest message sent: bounds the logits a call returns
    max_workers: int  # worker threads running the calls' torch work
    stream_write_timeout: float  # seconds a stream waits for its reader to take the next message
    max_stream_bytes: int  # bytes of stream responses made and not yet written, all streams together
    checkpoint_dir: str  # empty: checkpoints disabled
    checkpoint_every: int  # automatic checkpoint every N steps (0: never)
    keep_auto_checkpoints: int  # newest automatic checkpoints kept per folder (0: all)
    max_checkpoint_bytes: int = 0  # bytes of checkpoints one owner may hold (0: no quota)
    order_wait: float = 10.0  # seconds a numbered call waits for the lower numbers (server/dispatch.py)


class TrainerServicer:
    """Serves trainer.v1.TrainerService over a session store (registered method by method from the
    service descriptor in app.py, each with the call shape of its decorator)."""

    def __init__(
        self,
        store: Sessions,
        limits: Limits,
        options: ServicerOptions,
        auth: TokenAuth | None,
        observer: CallObserver,
        watchers: SessionEvents,
        budget: MemoryBudget = UNLIMITED,
        shared_memory: SharedMemory | None = None,
    ) -> None:
        self._store = store
        self._shared_memory = shared_memory  # None: OpenSharedMemory refused (--allow-shared-memory off)
        self._budget = budget
        self._model_options = options.model
        self._limits = limits
        self._chunk_bytes = options.chunk_bytes
        self._max_message_bytes = options.max_message_bytes
        self._checkpoint_dir = options.checkpoint_dir
        self._checkpoint_every = options.checkpoint_every
        self._keep_auto_checkpoints = options.keep_auto_checkpoints
        self._max_checkpoint_bytes = options.max_checkpoint_bytes
        self._auth = auth
        self.observer = observer  # told of finished calls (the decorators) and of training
        self.watchers = watchers  # the sessions' events as the observer hears them (one of its observers), for WatchSession
        self.stream_write_timeout = options.stream_write_timeout
        self.stream_bytes = StreamBytes(options.max_stream_bytes)
        self._dispatcher = Dispatcher(options.max_workers, options.order_wait)
        self._created: Once[str] = Once()  # CreateSession by client_token: the session each token made
        self._closed: Once[str] = Once()  # CloseSession by client_token
        self._deleted: Once[int] = Once()  # DeleteCheckpoint by client_token: the bytes it freed

    async def run(self, session_id: str | None, work: Callable[[], T], operation: Operation | None = None) -> T:
        """Runs a method's blocking work on a worker thread, one call at a time per session, numbered
        calls in their number's order."""
        return await self._dispatcher.run(session_id, work, operation)

    def free(self, session_id: str) -> bool:
        """Whether work that never waits may run on the session now, on the event loop (``@at_once``)."""
        return self._store.in_process and not self._dispatcher.busy(session_id)

    def busy(self, session_id: str) -> bool:
        """Whether a call is running or waiting on the session (then it is not idle)."""
        return self._dispatcher.busy(session_id)

    def close(self) -> None:
        """Stops the worker threads once their current work is done, and unmaps every shared-memory region."""
        self._dispatcher.close()
        if self._shared_memory is not None:
            self._shared_memory.close_all()

    def forget_sessions(self, session_ids: list[str]) -> None:
        """Reports sessions the store has closed (expired ones) as closed."""
        for session_id in session_ids:
            self._close_shared_memory(session_id)
            self.observer.session_closed(session_id, "expired")

    def _close_shared_memory(self, session_id: str) -> None:
        if self._shared_memory is not None:
            self._shared_memory.close(session_id)

    def _shared_input(self, session_id: str, msg: pb.TensorInput) -> convert.SharedInput | None:
        """Where the input's SharedTensor is read from: the session's region it names (None: the
        server allows none)."""
        if self._shared_memory is None:
            return None
        return self._shared_memory.region(session_id or DEFAULT_SESSION_ID, msg.shared_memory.region).input

    def _through_shared_memory(self, session_id: str, request: pb.GetGradientsRequest | pb.GetParametersRequest,
                               emit: Emit, encode: Callable[[TensorWriter], object]) -> None:
        """A GetGradients/GetParameters stream with shared_memory: the elements written into the
        request's area of the session's region, their chunks (no data) sent in one response (``TensorWriter``)."""
        if self._shared_memory is None:
            raise unavailable("this server does not allow shared memory (trainer-server --allow-shared-memory 1)")
        region = self._shared_memory.region(session_id or DEFAULT_SESSION_ID, request.shared_memory_region)
        area = region.area(request.shared_memory_area_offset, request.shared_memory_area_bytes)
        writer = TensorWriter(region, area, emit)
        encode(writer)
        writer.finish()

    def _session(self, session_id: str, context: Context) -> Engine:
        return self._store.get(session_id, caller(self._auth, context))

    def _info(self, session_id: str, description: SessionDescription) -> pb.SessionInfo:
        sid = session_id or DEFAULT_SESSION_ID
        return convert.session_info(sid, description, sid == DEFAULT_SESSION_ID)

    @staticmethod
    @contextlib.contextmanager
    def _numbered(engine: Engine, operation: Operation | None) -> Iterator[None]:
        """Around a numbered call's work: a request refused before it reached the engine (a bad
        field) uses its number too, so the numbers after it are not held up and its repeat is refused
        the same way; one that came early is refused as out of order, to be tried in its turn
        (``Engine.refuse``; nothing when the engine used or refused the number itself)."""
        try:
            yield
        except TrainerError as exc:
            if operation is None or "next_operation" in exc.metadata or exc.reason in _LEDGER_REASONS:
                raise  # the engine's own answer
            try:
                answer = engine.refuse(operation, exc)
            except Unavailable:  # the session cannot be told (lost): the refusal stands
                raise exc from None
            raise answer from None

    def _checkpoint_path(self, name: str, context: Context) -> Path:
        return checkpoints.checkpoint_path(name, self._checkpoint_dir, caller(self._auth, context))

    def _quota(self, context: Context, frees: list[Path] | None = None) -> checkpoints.Quota | None:
        """The caller's checkpoint quota (None: no quota); ``frees``: files removed after the save."""
        if not self._max_checkpoint_bytes:
            return None
        folder = checkpoints.owner_folder(self._checkpoint_dir, caller(self._auth, context))
        return checkpoints.Quota(str(folder), self._max_checkpoint_bytes, tuple(str(p) for p in frees or ()))

    @unary
    def CreateSession(self, request: pb.CreateSessionRequest, context: Context) -> pb.CreateSessionResponse:
        # No optimizer, or one with nothing set: the tutorial's SGD(lr=0.01, momentum=0.9), the session default.
        given = request.HasField("optimizer") and request.optimizer != pb.OptimizerConfig()
        spec = convert.optimizer_spec(request.optimizer) if given else OptimizerSpec.tutorial()
        spec.validate()

        if not 0 <= request.num_classes <= MAX_CLASSES:  # before the estimate below
            raise invalid("num_classes", f"num_classes must be in 0..{MAX_CLASSES}, got {request.num_classes}", "BAD_NUM_CLASSES")
        # The session's own fast paths, or (empty) the server's.
        autocast = request.autocast or self._model_options.autocast
        if autocast not in AUTOCAST_MODES:
            raise invalid("autocast", f"autocast must be {', '.join(AUTOCAST_MODES)} or empty (the server's), "
                          f"got {request.autocast!r}", "BAD_AUTOCAST")
        if request.memory_format and request.memory_format not in MEMORY_FORMATS:
            raise invalid("memory_format", f"memory_format must be {', '.join(MEMORY_FORMATS)} or empty (the server's), "
                          f"got {request.memory_format!r}", "BAD_MEMORY_FORMAT")
        channels_last = (request.memory_format == "channels_last" if request.memory_format
                         else self._model_options.channels_last)
        model = replace(self._model_options, weights=request.weights or "random", num_classes=request.num_classes,
                        seed=request.seed, autocast=autocast, channels_last=channels_last,
                        input_transform=convert.input_transform(request))
        owner = caller(self._auth, context)
        resume = self._checkpoint_path(request.resume_from, context) if request.resume_from else None

        def create() -> str:
            reservation = Reservation()  # the new session's share of the memory budget while it is built
            with self._budget.use(reservation, model_bytes(request.num_classes or 1000), "a new session"):
                session_id, engine = self._store.create(model, spec, owner, current_call().still_wanted)
            if resume is not None:
                try:
                    engine.resume(str(resume))
                except BaseException:
                    self._store.close(session_id, owner)  # a session that did not resume is no use to anyone
                    raise
            return session_id

        session_id, _ = self._created.run(owner, request.client_token, create, wait=current_call().remaining())
        return pb.CreateSessionResponse(session=self._info(session_id, self._session(session_id, context).describe()))

    @unary
    def CloseSession(self, request: pb.CloseSessionRequest, context: Context) -> pb.CloseSessionResponse:
        def close() -> str:
            self._store.close(request.session_id, caller(self._auth, context))
            self._close_shared_memory(request.session_id)
            self.observer.session_closed(request.session_id)
            return request.session_id

        closed, _ = self._closed.run(caller(self._auth, context), request.client_token, close, scope=request.session_id,
                                     wait=current_call().remaining())
        return pb.CloseSessionResponse(session_id=closed)

    @unary
    @at_once
    def DescribeSession(self, request: pb.DescribeSessionRequest, context: Context) -> pb.DescribeSessionResponse:
        description = self._session(request.session_id, context).describe()
        return pb.DescribeSessionResponse(session=self._info(request.session_id, description))

    @unary
    def Forward(self, received: convert.LargeInput[pb.ForwardRequest], context: Context) -> pb.ForwardResponse:
        request = received.message
        engine = self._session(request.session_id, context)
        operation = operation_of(request, "Forward", received.raw)
        with self._numbered(engine, operation):
            return self._forward(engine, request, received.raw, operation)

    def _forward(self, engine: Engine, request: pb.ForwardRequest, raw: memoryview | None,
                 operation: Operation | None) -> pb.ForwardResponse:
        fmt = request.output_format
        if fmt not in pb.OutputFormat.values():
            raise invalid("output_format", f"unknown output_format {fmt}", "BAD_OUTPUT_FORMAT")
        shared = self._shared_input(request.session_id, request.input) if request.input.HasField("shared_memory") else None
        # A forward without a graph keeps nothing of its input once it answers: it may read the region itself.
        x, as_numbers = convert.input_tensor(request.input, "input", self._limits.max_input_elements, raw=raw, shared=shared,
                                             borrow=request.no_grad)
        as_values = fmt == pb.OUTPUT_FORMAT_VALUES or fmt == pb.OUTPUT_FORMAT_UNSPECIFIED and as_numbers
        # Numbers travel as 8-byte doubles, raw logits as 4-byte floats; 64 KiB for the rest of the message.
        budget = None if fmt == pb.OUTPUT_FORMAT_STATS_ONLY else (self._max_message_bytes - 65536) // (8 if as_values else 4)
        result = engine.forward(x, eval_mode=request.eval_mode, no_grad=request.no_grad, max_logits_elements=budget,
                                still_wanted=current_call().still_wanted, operation=operation)
        if not result.replayed:
            self.observer.forwarded(request.session_id or DEFAULT_SESSION_ID, samples=int(x.shape[0]))
        response = pb.ForwardResponse(forward_id=result.forward_id, logits_stats=convert.stats_message(result.stats))
        if as_values:
            response.logits_values.CopyFrom(convert.output_values(result.logits))
        elif fmt != pb.OUTPUT_FORMAT_STATS_ONLY:
            response.logits.CopyFrom(convert.output_tensor(result.logits))
        return response

    @unary
    def Backward(self, request: pb.BackwardRequest, context: Context) -> pb.BackwardResponse:
        engine = self._session(request.session_id, context)
        operation = operation_of(request, "Backward")
        with self._numbered(engine, operation):
            return self._backward(engine, request, operation, context)

    def _backward(self, engine: Engine, request: pb.BackwardRequest, operation: Operation | None,
                  context: Context) -> pb.BackwardResponse:
        wanted = current_call().still_wanted
        source = request.WhichOneof("source")
        max_elements = self._limits.max_input_elements
        if source == "loss":
            loss = convert.LOSSES.get(request.loss.function)
            if loss is None:
                raise invalid("loss.function", f"unknown loss function {request.loss.function}: "
                              "use SUM_DIFFERENCE, CROSS_ENTROPY or MSE", "UNKNOWN_LOSS")
            labels, _ = convert.input_tensor(request.loss.labels, "loss.labels", max_elements, integer=loss == "cross_entropy")
            result = engine.backward(request.forward_id, loss=loss, labels=labels, retain_graph=request.retain_graph,
                                     step=request.step, zero_grad_after_step=request.zero_grad_after_step,
                                     grad_norm=not request.skip_grad_norm, still_wanted=wanted, operation=operation)
        elif source == "output_gradient":
            gradient, _ = convert.input_tensor(request.output_gradient, "output_gradient", max_elements)
            result = engine.backward(request.forward_id, output_gradient=gradient, retain_graph=request.retain_graph,
                                     step=request.step, zero_grad_after_step=request.zero_grad_after_step,
                                     grad_norm=not request.skip_grad_norm, still_wanted=wanted, operation=operation)
        else:
            raise invalid("source", "give a loss or an output_gradient", "NO_BACKWARD_SOURCE")
        if not result.replayed:
            self.observer.backwarded(request.session_id or DEFAULT_SESSION_ID, engine, result.loss, result.grad_norm,
                                     result.step_count - 1 if request.step else None)  # before the step it took
        response = pb.BackwardResponse(
            forward_id=result.forward_id, parameters_with_grad=result.parameters_with_grad,
            step_count=result.step_count, parameters_updated=result.parameters_updated,
        )
        if result.loss is not None:
            response.loss = result.loss
        if result.grad_norm is not None:
            response.grad_norm = result.grad_norm
        if request.step and not result.replayed:
            self._after_step(engine, result.step_count, request.session_id, context)
        return response

    @unary
    def Step(self, request: pb.StepRequest, context: Context) -> pb.StepResponse:
        engine = self._session(request.session_id, context)
        expected = request.expected_step_count if request.HasField("expected_step_count") else None
        result = engine.step(expected, current_call().still_wanted, operation=operation_of(request, "Step"))
        if not result.replayed:
            self._after_step(engine, result.step_count, request.session_id, context)
        return pb.StepResponse(step_count=result.step_count, parameters_updated=result.parameters_updated)

    def _changed(self, session_id: str, answer: FreezeResult | SessionDescription, change: Change) -> None:
        """Tells the observers (watchers, metrics, TensorBoard) of ``change``, made by a call whose
        ``answer`` this is, unless the answer is a repeat's from the session's record: that call
        changed nothing."""
        if not answer.replayed:
            self.observer.session_changed(session_id or DEFAULT_SESSION_ID, change)

    def _after_step(self, engine: Engine, step_count: int, session_id: str, context: Context) -> None:
        """After any call that stepped: the observer is told (TensorBoard), and the automatic
        checkpoint every ``checkpoint_every`` steps."""
        self.observer.stepped(session_id or DEFAULT_SESSION_ID, engine, step_count)
        if self._checkpoint_every and step_count % self._checkpoint_every == 0:
            name = f"auto-{session_id or DEFAULT_SESSION_ID}.ckpt"
            try:
                path = self._checkpoint_path(name, context)
                # The automatic checkpoints that go once this one is written count as freed.
                rotated = checkpoints.past_newest(path.parent, "auto-*.ckpt", self._keep_auto_checkpoints, path)
                saved = engine.save_checkpoint(str(path), self._quota(context, rotated))
                checkpoints.keep_newest(path.parent, "auto-*.ckpt", self._keep_auto_checkpoints, path)
                self.observer.session_changed(session_id or DEFAULT_SESSION_ID,
                                              CheckpointSaved(name, saved.step_count, saved.size_bytes, automatic=True))
                log.info("session %s checkpointed to %s at step %d", session_id or DEFAULT_SESSION_ID, name, step_count)
            except Exception as exc:  # the step is done: a failed automatic checkpoint must not make it look failed
                if isinstance(exc, TrainerError) and exc.reason == "CHECKPOINT_QUOTA":  # the owner's to act on
                    log.warning("automatic checkpoint %s at step %d not written: %s", name, step_count, exc)
                else:
                    log.exception("automatic checkpoint %s at step %d failed", name, step_count)

    @unary
    def ZeroGrad(self, request: pb.ZeroGradRequest, context: Context) -> pb.ZeroGradResponse:
        set_to_none = request.set_to_none if request.HasField("set_to_none") else True
        cleared = self._session(request.session_id, context).zero_grad(set_to_none, operation=operation_of(request, "ZeroGrad"))
        return pb.ZeroGradResponse(parameters_cleared=cleared)

    @unary
    def ConfigureOptimizer(
        self, request: pb.ConfigureOptimizerRequest, context: Context
    ) -> pb.ConfigureOptimizerResponse:
        engine = self._session(request.session_id, context)
        operation = operation_of(request, "ConfigureOptimizer")
        with self._numbered(engine, operation):
            if not request.HasField("optimizer") or request.optimizer == pb.OptimizerConfig():
                # It would have meant torch's SGD(lr=0.001), unlike a session's default: say which one instead.
                raise invalid("optimizer", "give the optimizer's kind (and any settings); a new session's default is "
                              "kind SGD with lr 0.01 and momentum 0.9", "NO_OPTIMIZER")
            configured = engine.configure_optimizer(convert.optimizer_spec(request.optimizer), operation=operation)
        self._changed(request.session_id, configured, OptimizerReplaced(configured.optimizer))
        return pb.ConfigureOptimizerResponse(optimizer=convert.optimizer_config(configured.optimizer))

    @unary
    def FreezeLayers(self, request: pb.FreezeLayersRequest, context: Context) -> pb.FreezeLayersResponse:
        result = self._session(request.session_id, context).freeze(list(request.patterns), unfreeze=request.unfreeze,
                                                                   operation=operation_of(request, "FreezeLayers"))
        self._changed(request.session_id, result, Froze(
            tuple(request.patterns), request.unfreeze, len(result.changed), len(result.trainable), result.frozen_count))
        return pb.FreezeLayersResponse(changed=result.changed, trainable=result.trainable, frozen_count=result.frozen_count)

    @unary
    def ReplaceHead(self, request: pb.ReplaceHeadRequest, context: Context) -> pb.ReplaceHeadResponse:
        description = self._session(request.session_id, context).replace_head(
            request.num_classes, request.seed, operation=operation_of(request, "ReplaceHead"))
        self._changed(request.session_id, description, HeadReplaced(description.num_classes))
        return pb.ReplaceHeadResponse(session=self._info(request.session_id, description))

    @unary
    def ListParameters(self, request: pb.ListParametersRequest, context: Context) -> pb.ListParametersResponse:
        return convert.parameter_list(self._session(request.session_id, context).parameters_info())

    @streaming
    def GetGradients(self, request: pb.GetGradientsRequest, context: Context, emit: Emit) -> None:
        # Every response is written in wire form under the session's lock, straight from the
        # gradients' memory (one copy, no snapshot; a cast to float16 or bfloat16 is that copy),
        # and sent while the next tensors are written.
        engine = self._session(request.session_id, context)
        if request.shared_memory_region:
            self._through_shared_memory(request.session_id, request, emit, lambda writer: engine.encode_gradients(
                list(request.patterns), request.stats_only, convert.transfer_dtype(request.transfer_data_type), writer,
                with_stats=not request.skip_stats))
            return
        dtype = convert.transfer_dtype(request.transfer_data_type)
        send = convert.ChunkSender(emit, self._chunk_bytes, request.pack_chunks, current_call().still_wanted, dtype)
        engine.encode_gradients(
            list(request.patterns), request.stats_only, dtype, send, with_stats=not request.skip_stats, done=send.finish, casts=True,
        )

    @streaming
    def GetParameters(self, request: pb.GetParametersRequest, context: Context, emit: Emit) -> None:
        engine = self._session(request.session_id, context)
        if request.shared_memory_region:
            self._through_shared_memory(request.session_id, request, emit, lambda writer: engine.encode_parameters(
                list(request.patterns), request.stats_only, convert.transfer_dtype(request.transfer_data_type),
                request.include_buffers, writer, with_stats=not request.skip_stats))
            return
        dtype = convert.transfer_dtype(request.transfer_data_type)
        send = convert.ChunkSender(emit, self._chunk_bytes, request.pack_chunks, current_call().still_wanted, dtype)
        engine.encode_parameters(
            list(request.patterns), request.stats_only, dtype, request.include_buffers, send, with_stats=not request.skip_stats,
            done=send.finish, casts=True,
        )

    @unary
    def GetGraph(self, request: pb.GetGraphRequest, context: Context) -> pb.GetGraphResponse:
        return convert.graph_message(self._session(request.session_id, context).graph())

    @unary
    def SaveCheckpoint(self, request: pb.SaveCheckpointRequest, context: Context) -> pb.SaveCheckpointResponse:
        engine = self._session(request.session_id, context)
        saved = engine.save_checkpoint(str(self._checkpoint_path(request.name, context)), self._quota(context))
        self.observer.session_changed(request.session_id or DEFAULT_SESSION_ID,
                                      CheckpointSaved(request.name, saved.step_count, saved.size_bytes))
        return pb.SaveCheckpointResponse(name=request.name, step_count=saved.step_count, size_bytes=saved.size_bytes)

    @unary
    def LoadCheckpoint(self, request: pb.LoadCheckpointRequest, context: Context) -> pb.LoadCheckpointResponse:
        engine = self._session(request.session_id, context)
        operation = operation_of(request, "LoadCheckpoint")
        with self._numbered(engine, operation):
            description = engine.load_checkpoint(str(self._checkpoint_path(request.name, context)), operation=operation)
        self._changed(request.session_id, description, CheckpointLoaded(request.name, description.step_count))
        return pb.LoadCheckpointResponse(session=self._info(request.session_id, description))

    @unary
    def DeleteCheckpoint(self, request: pb.DeleteCheckpointRequest, context: Context) -> pb.DeleteCheckpointResponse:
        owner = caller(self._auth, context)
        path = self._checkpoint_path(request.name, context)

        def delete() -> int:
            size = checkpoints.delete(path)
            self._store.checkpoint_deleted(owner, str(path))
            return size

        freed, _ = self._deleted.run(owner, request.client_token, delete, scope=str(path), wait=current_call().remaining())
        return pb.DeleteCheckpointResponse(name=request.name, size_bytes=freed)

    @unary
    def ResetSession(self, request: pb.ResetSessionRequest, context: Context) -> pb.ResetSessionResponse:
        description = self._session(request.session_id, context).reset(operation=operation_of(request, "ResetSession"))
        self._changed(request.session_id, description, WasReset())
        return pb.ResetSessionResponse(session=self._info(request.session_id, description))

    @unary
    def ListSessions(self, request: pb.ListSessionsRequest, context: Context) -> pb.ListSessionsResponse:
        owner = caller(self._auth, context)
        sessions = [self._info(sid, engine.describe()) for sid, engine in self._store.visible_to(owner)]
        files = [
            pb.CheckpointFile(name=f.name, size_bytes=f.size_bytes, modified_unix_seconds=f.modified)
            for f in checkpoints.list_checkpoints(self._checkpoint_dir, owner)
        ]
        return pb.ListSessionsResponse(sessions=sessions, checkpoints=files)

    @unary
    def TrainStep(self, received: convert.LargeInput[pb.TrainStepRequest], context: Context) -> pb.TrainStepResponse:
        request = received.message
        engine = self._session(request.session_id, context)
        operation = operation_of(request, "TrainStep", received.raw)
        with self._numbered(engine, operation):
            return self._train_step(engine, request, received.raw, operation, context)

    def _train_step(self, engine: Engine, request: pb.TrainStepRequest, raw: memoryview | None, operation: Operation | None,
                    context: Context) -> pb.TrainStepResponse:
        loss = convert.LOSSES.get(request.loss.function)
        if loss is None:
            raise invalid("loss.function", f"unknown loss function {request.loss.function}: "
                          "use SUM_DIFFERENCE, CROSS_ENTROPY or MSE", "UNKNOWN_LOSS")
        max_elements = self._limits.max_input_elements
        shared = self._shared_input(request.session_id, request.input) if request.input.HasField("shared_memory") else None
        # The step's backward frees its graph within the call: nothing keeps the input once it answers.
        x, _ = convert.input_tensor(request.input, "input", max_elements, raw=raw, shared=shared, borrow=True)
        labels, _ = convert.input_tensor(request.loss.labels, "loss.labels", max_elements, integer=loss == "cross_entropy")
        zero_grad = request.zero_grad if request.HasField("zero_grad") else True
        budget = (self._max_message_bytes - 65536) // 4 if request.return_logits else None
        began = time.monotonic()
        result = engine.train_step(x, loss, labels, zero_grad=zero_grad, grad_norm=request.return_grad_norm,
                                   max_logits_elements=budget, still_wanted=current_call().still_wanted, operation=operation)
        if not result.replayed:
            # One call, the whole iteration: the observer hears of it as of a Forward, Backward and Step.
            session_id = request.session_id or DEFAULT_SESSION_ID
            self.observer.forwarded(session_id, began, int(x.shape[0]))
            self.observer.backwarded(session_id, engine, result.loss, result.grad_norm, result.step_count - 1)
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

    @unary
    def OpenSharedMemory(self, request: pb.OpenSharedMemoryRequest, context: Context) -> pb.OpenSharedMemoryResponse:
        engine = self._session(request.session_id, context)  # only who may use the session gets its region
        if self._shared_memory is None:
            raise unavailable("this server does not allow shared memory (trainer-server --allow-shared-memory 1, "
                              "with --backend local)")
        if (request.session_id or DEFAULT_SESSION_ID) == DEFAULT_SESSION_ID:
            raise on_default_session()
        self._shared_memory.check_size(request.size_bytes)
        # Counted in the session's and the server's budgets, checked and counted in one step, until the
        # session ends: a region replaced later stays counted, since its client may still map it.
        self._budget.hold(engine, request.size_bytes, "a shared-memory region")
        try:
            ticket, region = self._shared_memory.open(request.session_id, request.size_bytes)
        except BaseException:
            self._budget.let_go(engine, request.size_bytes)
            raise
        return pb.OpenSharedMemoryResponse(ticket=ticket, socket_address=self._shared_memory.address,
                                           size_bytes=region.size, ticket_seconds=TICKET_SECONDS, region=region.id)

    @pushed
    async def WatchSession(self, request: pb.WatchSessionRequest,
                           context: Context) -> AsyncGenerator[pb.WatchSessionResponse, None]:
        recent = request.recent if request.HasField("recent") else RECENT
        if recent > RECENT:
            raise invalid("recent", f"recent must be at most {RECENT}, got {recent}", "BAD_RECENT")
        with self.watchers.watch(request.session_id) as (watcher, latest):
            # Who may watch a session is who may call it (NOT_FOUND to anyone else), asked off the
            # event loop (the Ray backend asks the cluster), once the watcher is in place: nothing
            # that happens meanwhile is missed, and an end meanwhile ends the watch.
            await self.run(None, functools.partial(self._session, request.session_id, context))
            for event in latest[len(latest) - recent:]:
                yield convert.watch_event(event, 0, recent=True)
            async for event, missed in watcher.events():
                yield convert.watch_event(event, missed)
