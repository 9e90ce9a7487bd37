"""The Python SDK: ``TrainerClient`` and the ``Session`` handle.

Needs grpcio, protobuf and numpy only. Arrays go in as numpy (or torch tensors, converted on the
CPU) and come back as numpy; results are small dataclasses. Every call has a deadline, within which
a transient failure is retried (``retry.RetryPolicy``, ``client.retry_policy``), and every call that
changes a session carries an operation number, so that a retry runs at most once (``retry``). What
each call sends and how its answer is read is ``core``'s, when and how often it is tried
``retry``'s, both shared with the asyncio twin (``aio``): this module only does the I/O.
"""

from __future__ import annotations

import functools
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, TypeVar

import grpc

from remote_trainer.client import core
from remote_trainer.client import shared_memory as shm
from remote_trainer.client.auth import BearerToken
from remote_trainer.client.errors import TrainerError, from_rpc_error
from remote_trainer.client.retry import (
    CHANNEL_IN_FLIGHT, Attempts, Operations, Place, RetryPolicy, final, policy_of, waited_too_long,
)
from remote_trainer.client.types import (
    BackwardResult,
    CheckpointFile,
    ForwardResult,
    FreezeResult,
    Graph,
    InputTransform,
    NamedTensor,
    Optimizer,
    ParameterList,
    SessionEvent,
    SessionInfo,
    TrainStepResult,
)
from remote_trainer.contract.names import (
    AutocastName, InputTransformName, LossName, MemoryFormatName, OptimizerName, TransferDataType,
)
from remote_trainer.contract.trainer.v1 import trainer_pb2_grpc

R = TypeVar("R")


class TrainerClient:
    """A connection to a training server.

    ``with TrainerClient("localhost:50051") as client:`` closes the channel on exit. ``timeout`` is
    the deadline in seconds of every call (each method also takes its own keyword ``timeout``).

    ``token`` is sent as ``authorization: Bearer <token>`` on every call, those made through
    ``stub`` too. ``tls`` (implied by any certificate) encrypts the channel; ``ca_cert`` is the PEM
    of the CA that signed the server's certificate (default: the system's roots), ``client_cert``
    and ``client_key`` the PEM pair for a server that asks for client certificates (mutual TLS).

    ``retry`` is how a call that failed transiently is tried again within its deadline (``None``:
    never, failing fast; see ``retry.RetryPolicy``); ``retry_policy`` tells it. Calls made through
    ``stub``, ``call`` and ``stream`` are made once, as given.
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
        max_message_bytes: int = core.MAX_MESSAGE_BYTES,
        options: Iterable[tuple[str, Any]] = (),
        retry: RetryPolicy | None = RetryPolicy(),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._retry = policy_of(retry)
        self.max_message_bytes = max_message_bytes  # an input batch larger than this is refused before it is sent
        channel_options = core.channel_settings(max_message_bytes, options)
        if tls or ca_cert or client_cert or client_key:
            credentials = grpc.ssl_channel_credentials(ca_cert, client_key, client_cert)
            self._channel = grpc.secure_channel(target, credentials, options=channel_options)
        else:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        self._base_channel = self._channel
        self._state = grpc.ChannelConnectivity.IDLE
        if self._retry.wait_for_ready:  # to tell a server never reached from a slow one (``retry.final``)
            self._base_channel.subscribe(self._connectivity, try_to_connect=False)
        self._operations: dict[str, Operations] = {}
        self._in_flight = threading.BoundedSemaphore(CHANNEL_IN_FLIGHT)  # calls in flight (retry.CHANNEL_IN_FLIGHT)
        self._client_id = uuid.uuid4().hex  # sent with each operation number: whose numbers they are
        if token:
            self._channel = grpc.intercept_channel(self._channel, BearerToken(token))
        self._stub = trainer_pb2_grpc.TrainerServiceStub(self._channel)
        self._unary = core.unary_methods(self._channel)
        self._streams = core.stream_methods(self._channel)
        self._closed = False

    def __enter__(self) -> TrainerClient:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel; calling it again does nothing."""
        if not self._closed:
            self._closed = True
            if self._retry.wait_for_ready:
                self._base_channel.unsubscribe(self._connectivity)
            self._base_channel.close()

    def call(self, method: Callable[..., Any], request: Any, *, timeout: float | None = None) -> Any:
        """Runs a unary call (``client.call(client.stub.Step, request)``) with the deadline, turning
        a failure into a ``TrainerError``."""
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None  # gRPC's error: .rpc_error

    def stream(self, method: Callable[..., Any], request: Any, *, timeout: float | None = None) -> Iterator[Any]:
        """Runs a server-streaming call with the deadline, turning a failure into a ``TrainerError``."""
        try:
            yield from method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None  # gRPC's error: .rpc_error

    @property
    def retry_policy(self) -> RetryPolicy:
        """How a call that failed transiently is tried again (``retry`` at construction)."""
        return self._retry

    def _connectivity(self, state: grpc.ChannelConnectivity) -> None:
        self._state = state

    def _operations_of(self, session_id: str) -> Operations:
        """The operation numbers of a session, shared by this client's handles on it."""
        return self._operations.setdefault(session_id or "default", Operations(session_id, self._client_id))

    def _send(self, call: core.Call[R] | core.StreamCall[R], *, timeout: float | None, operations: Operations | None = None) -> R:
        """Runs ``call`` with retries within its deadline, numbered in ``operations`` if it changes the session."""
        attempts = Attempts(self._retry, self.timeout if timeout is None else timeout)
        if not call.numbered or operations is None:
            return self._attempts(call, attempts)
        place = Place(operations)  # taken now, in the order the calls are made
        try:
            operations.wait_turn(place.index, attempts.remaining())
            if not operations.known:  # a handle on an existing session: where does its numbering stand?
                info = self._send(core.describe_session(operations.session_id), timeout=attempts.remaining())
                operations.begin(info.next_operation, info.operation_epoch)
            attempts.retryable = operations.numbering
            result = self._attempts(call, attempts, place)
        except BaseException as error:
            place.end(error)
            raise
        place.end(None)
        return result

    def _attempts(self, call: core.Call[R] | core.StreamCall[R], attempts: Attempts, place: Place | None = None) -> R:
        while True:
            timeout = attempts.next()
            if place is not None:
                place.stamp(call.request)
            try:
                return self._attempt(call, timeout)
            except TrainerError as error:
                if attempts.count > 1 and call.done_if is not None and (done := call.done_if(error)) is not None:
                    return call.parse(done)
                pause = attempts.delay(error)
                if pause is None:
                    if (last := final(error, attempts, self.target, self._state)) is not error:
                        raise last from None  # what was raised: last.rpc_error
                    raise
            time.sleep(pause)

    def _attempt(self, call: core.Call[R] | core.StreamCall[R], timeout: float | None) -> R:
        """One attempt, through ``call`` or ``stream``: a stream that fails midway is read again
        from its start by the next attempt."""
        if not self._in_flight.acquire(timeout=timeout):
            raise waited_too_long(CHANNEL_IN_FLIGHT, "on the client's channel")
        try:
            if isinstance(call, core.StreamCall):
                method = functools.partial(self._streams[call.method], wait_for_ready=self._retry.wait_for_ready)
                return call.parse(self.stream(method, call.request, timeout=timeout))
            method = functools.partial(self._unary[call.method], wait_for_ready=self._retry.wait_for_ready)
            return call.parse(self.call(method, call.request, timeout=timeout))
        finally:
            self._in_flight.release()

    def _watch(self, call: core.WatchCall, timeout: float | None) -> Iterator[SessionEvent]:
        """The events of a watch as they come; the call is cancelled when the iteration stops."""
        responses = self._streams[call.method](call.request, timeout=timeout, wait_for_ready=self._retry.wait_for_ready)
        try:
            for response in responses:
                yield call.parse(response)
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
            if not core.watch_over(error, timeout):
                raise error from exc
        finally:
            responses.cancel()

    @property
    def stub(self) -> trainer_pb2_grpc.TrainerServiceStub:
        """The raw generated stub, for what the SDK does not wrap."""
        return self._stub

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The server's health status name: "SERVING", "NOT_SERVING", ..."""
        return self._send(core.health(service), timeout=timeout)

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
        input_transform: InputTransform | InputTransformName | None = None,
        shared_memory: bool | int = False,
        timeout: float | None = None,
    ) -> Session:
        """A new session: "random" (seeded) weights, "imagenet", or a weights file in the server's data dir.

        ``autocast`` ("off", "bf16", "fp16") runs its forwards under ``torch.autocast`` and
        ``memory_format`` ("contiguous", "channels_last") lays out its weights and inputs; None takes
        the server's setting (``info()`` says what the session runs with). ``input_transform`` lets
        the session take uint8 images (a quarter of float32's bytes) and turn them into the model's
        input on the server, as ``ToTensor()`` then ``Normalize(mean, std)`` would: "imagenet"
        (ImageNet's mean and std), "scale" (``ToTensor()`` alone) or an ``InputTransform``; None:
        off (uint8 inputs refused, INPUT_TRANSFORM_MISSING). The handle's ``created_info`` is the
        ``SessionInfo`` the server answered with. Use it as a context manager to close it on exit.

        ``shared_memory`` (True, or a size in bytes) gives the session a shared-memory region at once
        (``Session.use_shared_memory``); the session is closed again when that is refused.
        """
        call = core.create_session(weights, num_classes, optimizer, seed, autocast, memory_format, input_transform)
        info = self._send(call, timeout=timeout)
        self._operations_of(info.session_id).begin(info.next_operation, info.operation_epoch)
        session = Session(self, info.session_id, created_info=info)
        if shared_memory:
            try:
                session.use_shared_memory(shm.size_of(shared_memory), timeout=timeout)
            except BaseException:
                session.close(timeout=timeout)
                raise
        return session

    def list_sessions(self, *, timeout: float | None = None) -> list[SessionInfo]:
        """The sessions this client's token may use: the default session first (``is_default``),
        then the ones it created, oldest first."""
        return self._send(core.list_sessions(), timeout=timeout)

    def list_checkpoints(self, *, timeout: float | None = None) -> list[CheckpointFile]:
        """The checkpoints this client's token may load, by name (none when the server has no
        ``--checkpoint-dir``)."""
        return self._send(core.list_checkpoints(), timeout=timeout)

    def delete_checkpoint(self, name: str, *, timeout: float | None = None) -> int:
        """Deletes one of this token's checkpoints (a name ``list_checkpoints`` gives); the bytes it
        freed of the server's checkpoint quota. ``NotFoundError`` (``CHECKPOINT_NOT_FOUND``) when
        there is none of that name; a retry of a delete whose answer was lost says 0 bytes."""
        return self._send(core.delete_checkpoint(name), timeout=timeout)


class Session:
    """One session on the server: a model with its optimizer, gradients and pending forward.

    ``created_info`` is the ``SessionInfo`` the server returned when ``create_session`` made this
    session (as it was then: ``info()`` asks for it now); None on a handle from ``client.session(id)``.

    Every call that changes the session (forward, backward, train_step, step, zero_grad,
    configure_optimizer, freeze, unfreeze, replace_head, load_checkpoint, reset) carries the next
    operation number (``next_operation``), shared by all of the client's handles on the session; a
    handle on an existing session asks the server where its numbering stands (one DescribeSession)
    before its first such call. Two clients changing one session each number it on their own, and
    so must not take turns on it without a DescribeSession between (see ``retry``).
    """

    def __init__(self, client: TrainerClient, session_id: str = "", *, created_info: SessionInfo | None = None) -> None:
        self._client = client
        self.session_id = session_id
        self.created_info = created_info
        self._closed = False
        self._last_forward_id = 0  # of the last Forward or TrainStep made through this handle
        self._operations = client._operations_of(session_id)
        self._shared: shm.SharedRegion | None = None  # use_shared_memory's region
        self._shared_lock = threading.Lock()  # one call at a time writes or reads the region

    @property
    def next_operation(self) -> int | None:
        """The operation number of the session's next changing call (None until it is known)."""
        return self._operations.next_number

    def _call(self, call: core.Call[R] | core.StreamCall[R], timeout: float | None) -> R:
        return self._client._send(call, timeout=timeout, operations=self._operations)

    def _shared_call(self, build: Callable[[shm.SharedRegion], core.Call[R] | core.StreamCall[R]],
                     timeout: float | None) -> R:
        """A call through the region, which it holds from writing its input to reading its answer."""
        with self._shared_lock:
            if self._shared is None:
                raise shm.gone()
            return self._call(build(self._shared), timeout)

    def use_shared_memory(
        self, size_bytes: int = shm.DEFAULT_BYTES, *, timeout: float | None = None
    ) -> None:
        """Gives the session a shared-memory region of ``size_bytes`` (replacing any it had), for a
        client on the server's host: from then on ``forward`` and ``train_step`` inputs that fit in
        a third of it (the input area), and ``gradients`` and ``parameters`` that fit in a third
        (an answer area), pass through it instead of gRPC messages, the results the same bit for
        bit. Their arrays are writable views of the region that stay as they came while you hold
        them (the server writes an answer area only when this handle names it, and it names only
        one no live array lies in; with both held, the answer comes in gRPC messages). The server
        must allow it (``--allow-shared-memory 1``, else ``FailedPreconditionError``
        SHARED_MEMORY_UNAVAILABLE) and bounds the size (``--max-shared-memory-bytes``,
        SHARED_MEMORY_TOO_LARGE); the default session gets none (``FailedPreconditionError``
        SHARED_MEMORY_DEFAULT_SESSION: use a session of your own). Each region counts in the
        session's memory budget until the session closes, a replaced one too
        (SESSION_MEMORY_BUDGET when it cannot). The region goes when the session closes, the arrays
        still held keep this side's mapping (docs/shared-memory.md)."""
        grant = self._call(shm.open_region(self.session_id, size_bytes), timeout)
        region = shm.SharedRegion.fetch(grant)
        with self._shared_lock:
            old, self._shared = self._shared, region
        if old is not None:
            old.close()

    def _drop_shared_memory(self) -> None:
        with self._shared_lock:
            old, self._shared = self._shared, None
        if old is not None:
            old.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self, *, timeout: float | None = None) -> None:
        """Closes the session on the server; idempotent, and a no-op for the default session."""
        if self.session_id in ("", "default") or self._closed:
            return
        self._call(core.close_session(self.session_id), timeout)
        self._closed = True  # only now: a close that failed (a timeout, say) can be tried again
        self._client._operations.pop(self.session_id, None)
        self._drop_shared_memory()

    def info(self, *, timeout: float | None = None) -> SessionInfo:
        """What the session holds (and, for a handle that has not numbered a call yet, where its
        numbering stands)."""
        info = self._call(core.describe_session(self.session_id), timeout)
        self._operations.begin(info.next_operation, info.operation_epoch)
        return info

    def resume(self, checkpoint: str | None = None, *, timeout: float | None = None) -> SessionInfo:
        """Goes on after the server lost this session (it was restarted, or its Ray node died): a new
        session from the session's last checkpoint (``auto-<session id>.ckpt``, which the server's
        ``--checkpoint-every`` writes, unless ``checkpoint`` names another), with the operation
        numbering the checkpoint holds, so a call the checkpoint saw is answered and not run again.
        This handle then works on the new session (``session_id`` changes); ``info().step_count``
        says where the training is. Returns the new session's ``SessionInfo``. Refused
        (``SESSION_ALIVE``) while the server still has the session."""
        try:
            alive = self._client._send(core.describe_session(self.session_id), timeout=timeout)
        except TrainerError as error:
            if not core.lost(error):
                raise
        else:
            raise core.not_lost(self.session_id, alive)
        info = self._client._send(core.resume_session(checkpoint or f"auto-{self.session_id}.ckpt"), timeout=timeout)
        self.session_id, self.created_info, self._closed = info.session_id, info, False
        self._operations = self._client._operations_of(info.session_id)
        self._operations.begin(info.next_operation, info.operation_epoch)
        return info

    def forward(
        self, x: Any, *, eval_mode: bool = False, no_grad: bool = False, stats_only: bool = False, timeout: float | None = None
    ) -> ForwardResult:
        """``model(x)`` on the server for a batch (N, 3, H, W), float (sent as float32) or uint8 images
        (numpy or torch, NCHW; on a session with an ``input_transform``); keeps the graph unless ``no_grad``."""
        if self._shared is not None and self._shared.fits(x):
            result = self._shared_call(lambda region: shm.forward(
                self.session_id, region, x, eval_mode, no_grad, stats_only), timeout)
        else:
            result = self._call(core.forward(self.session_id, x, eval_mode, no_grad, stats_only, self._client.max_message_bytes), timeout)
        self._last_forward_id = result.forward_id
        return result

    def backward(
        self,
        loss: LossName | None = None,
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
        fid = self._last_forward_id if forward_id is None else forward_id
        call = core.backward(self.session_id, fid, loss, labels, output_gradient, retain_graph, step, zero_grad_after_step, grad_norm)
        return self._call(call, timeout)

    def train_step(
        self,
        x: Any,
        loss: LossName,
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
        if self._shared is not None and self._shared.fits(x):
            result = self._shared_call(lambda region: shm.train_step(
                self.session_id, region, x, loss, labels, zero_grad, grad_norm, return_logits), timeout)
        else:
            call = core.train_step(self.session_id, x, loss, labels, zero_grad, grad_norm, return_logits,
                                   self._client.max_message_bytes)
            result = self._call(call, timeout)
        self._last_forward_id = result.forward_id
        return result

    def step(self, *, expected_step_count: int | None = None, timeout: float | None = None) -> int:
        """One optimizer step; returns the session's step count.

        The SDK's own retries are safe without it (the operation number). ``expected_step_count``
        (the count before this step) makes a step you retry yourself safe too, after a lost answer
        (DEADLINE_EXCEEDED, UNAVAILABLE): if the first try was taken, the retry takes no second step
        and answers with the same count. Any other count gives STEP_COUNT_MISMATCH.
        """
        return self._call(core.step(self.session_id, expected_step_count), timeout)

    def zero_grad(self, set_to_none: bool = True, *, timeout: float | None = None) -> int:
        """Clears every .grad (to None, or to zeros); returns how many were set."""
        return self._call(core.zero_grad(self.session_id, set_to_none), timeout)

    def configure_optimizer(
        self, optimizer: Optimizer | OptimizerName | None = None, *, timeout: float | None = None, **values: Any
    ) -> Optimizer:
        """Replaces the optimizer (its state starts anew): ``configure_optimizer("adam", lr=1e-3)``,
        ``configure_optimizer(kind="sgd", lr=1e-2, momentum=0.9)`` or ``configure_optimizer(Optimizer(...))``;
        values not given take torch's defaults."""
        return self._call(core.configure_optimizer(self.session_id, optimizer, values), timeout)

    def freeze(self, *patterns: str, timeout: float | None = None) -> FreezeResult:
        """Freezes parameters by name pattern ("layer4.*", a module prefix "layer1", or "*")."""
        return self._call(core.freeze(self.session_id, patterns, False), timeout)

    def unfreeze(self, *patterns: str, timeout: float | None = None) -> FreezeResult:
        """Unfreezes parameters by name pattern."""
        return self._call(core.freeze(self.session_id, patterns, True), timeout)

    def replace_head(self, num_classes: int, seed: int = 0, *, timeout: float | None = None) -> SessionInfo:
        """``model.fc = nn.Linear(512, num_classes)`` after ``torch.manual_seed(seed)``; the optimizer is rebuilt."""
        return self._call(core.replace_head(self.session_id, num_classes, seed), timeout)

    def list_parameters(self, *, timeout: float | None = None) -> ParameterList:
        """Every parameter with shape, dtype, requires_grad and whether it has a .grad."""
        return self._call(core.list_parameters(self.session_id), timeout)

    def gradients(
        self, *patterns: str, stats_only: bool = False, dtype: TransferDataType = "float32", stats: bool = True,
        timeout: float | None = None,
    ) -> dict[str, NamedTensor]:
        """The .grad of every parameter (or those matching ``patterns``), by name, in model order.

        ``stats=False`` leaves out the statistics (one pass fewer over the gradients on the server).
        """
        if self._shared is not None and not stats_only:
            return self._shared_call(lambda region: shm.gradients(
                self.session_id, region, patterns, stats_only, dtype, stats), timeout)
        return self._call(core.gradients(self.session_id, patterns, stats_only, dtype, stats), timeout)

    def parameters(
        self, *patterns: str, stats_only: bool = False, dtype: TransferDataType = "float32", include_buffers: bool = False,
        stats: bool = True, timeout: float | None = None,
    ) -> dict[str, NamedTensor]:
        """The values of every parameter (or those matching ``patterns``), and buffers if asked
        (``stats=False``: without statistics)."""
        if self._shared is not None and not stats_only:
            return self._shared_call(lambda region: shm.parameters(
                self.session_id, region, patterns, stats_only, dtype, include_buffers, stats), timeout)
        call = core.parameters(self.session_id, patterns, stats_only, dtype, include_buffers, stats)
        return self._call(call, timeout)

    def save_checkpoint(self, name: str, *, timeout: float | None = None) -> int:
        """Writes the session's state to checkpoint ``name`` on the server; returns the step count saved."""
        return self._call(core.save_checkpoint(self.session_id, name), timeout)

    def load_checkpoint(self, name: str, *, timeout: float | None = None) -> SessionInfo:
        """Puts the session in the state of checkpoint ``name`` (gradients and pending forward cleared)."""
        return self._call(core.load_checkpoint(self.session_id, name), timeout)

    def graph(self, *, timeout: float | None = None) -> Graph:
        """The autograd graph of the pending forward."""
        return self._call(core.graph(self.session_id), timeout)

    def watch(self, *, recent: int | None = None, timeout: float | None = None) -> Iterator[SessionEvent]:
        """The session's events as they happen, pushed by the server (``WatchSession``): each
        optimizer step (its loss, gradient norm, learning rate, time and samples a second), freezes,
        head changes, checkpoints written and loaded, resets, and last its end (``kind`` "end":
        closed, expired, lost, or the server stopping), after which the iteration stops. It first
        gives the session's ``recent`` latest events (None: 16, the most; 0: none), so a watch begun
        late sees where the run is.

        A watch changes nothing and never slows the session: one that reads more slowly than events
        come loses the oldest of those waiting on the server, and the next event says how many
        (``missed``). ``timeout`` bounds how long it watches (None: until the session ends); the
        iteration then just stops. Leaving the loop (``break``) ends the watch on the server.

        A watch is not retried or resumed: a broken one raises (``UnavailableError``, say), since
        the events meanwhile are gone; watching again gives the recent ones. Only the session's
        owner may watch it (anyone the default session), as for every call.
        """
        return self._client._watch(core.watch_session(self.session_id, recent), timeout)

    def reset(self, *, timeout: float | None = None) -> SessionInfo:
        """Puts the default session back as the server started it: weights, BatchNorm buffers, head,
        optimizer and its state, step count, frozen set; no gradients, no pending forward. Other
        sessions cannot be reset (``FailedPreconditionError``, reason ``RESET_NOT_AVAILABLE``)."""
        return self._call(core.reset_session(self.session_id), timeout)
