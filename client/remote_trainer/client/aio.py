"""The asyncio SDK: ``AsyncTrainerClient`` and ``AsyncSession`` on ``grpc.aio``.

The same methods as ``TrainerClient``/``Session``, with the same parameters, as coroutines, so one
event loop can drive many sessions, or upload the next batch while the server computes the last
one. Cancelling the task that awaits a call cancels the RPC. What each call sends and how its
answer is read is ``core``'s, and when and how often it is tried ``retry``'s, as for the sync SDK,
so arrays, results, errors, retries and operation numbers are the sync SDK's (numpy in and out,
``client.types`` dataclasses, ``client.errors`` exceptions); a test (tests/test_sdk_twins.py) keeps
the two faces' signatures the same. A session's changing calls are numbered when they are called,
so calls pipelined on the loop (``asyncio.gather(s.forward(a), s.zero_grad())``) run on the server
in the order they were made.

    async with AsyncTrainerClient("localhost:50051") as client:
        model = client.session()
        await model.forward(data)
        result = await model.backward("sum", labels)
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import Any, TypeVar

import grpc

from remote_trainer.client import core
from remote_trainer.client import shared_memory as shm
from remote_trainer.client.auth import async_bearer_token
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


async def _wake(turns: asyncio.Condition) -> None:
    """A call has ended: the calls waiting for their turn look again (retry.IN_FLIGHT)."""
    async with turns:
        turns.notify_all()


class AsyncTrainerClient:
    """A ``grpc.aio`` connection to a training server; the async twin of ``TrainerClient``.

    ``async with AsyncTrainerClient(target) as client:`` closes the channel on exit. The options
    (``timeout``, ``token``, TLS certificates, ``max_message_bytes``, ``retry``) are
    ``TrainerClient``'s; the token goes with every call, those made through ``stub`` too. Create it
    inside the event loop that will use it.
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
        self._operations: dict[str, Operations] = {}
        self._turns: dict[str, asyncio.Condition] = {}  # where calls wait for their turn (retry.IN_FLIGHT)
        self._in_flight = asyncio.Semaphore(CHANNEL_IN_FLIGHT)  # calls in flight (retry.CHANNEL_IN_FLIGHT)
        self._client_id = uuid.uuid4().hex  # sent with each operation number: whose numbers they are
        self.max_message_bytes = max_message_bytes  # an input batch larger than this is refused before it is sent
        channel_options = core.channel_settings(max_message_bytes, options)
        interceptors = async_bearer_token(token) if token else None
        if tls or ca_cert or client_cert or client_key:
            credentials = grpc.ssl_channel_credentials(ca_cert, client_key, client_cert)
            self._channel = grpc.aio.secure_channel(target, credentials, options=channel_options, interceptors=interceptors)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=channel_options, interceptors=interceptors)
        self._stub = trainer_pb2_grpc.TrainerServiceStub(self._channel)
        self._unary = core.unary_methods(self._channel)
        self._streams = core.stream_methods(self._channel)

    async def __aenter__(self) -> AsyncTrainerClient:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel (calls in flight are cancelled)."""
        await self._channel.close(None)

    async def call(self, method: Callable[..., Any], request: Any, *, timeout: float | None = None) -> Any:
        """Awaits a unary call (``await client.call(client.stub.Step, request)``) with the deadline,
        turning a failure into a ``TrainerError``."""
        try:
            return await method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None  # gRPC's error: .rpc_error

    async def stream(self, method: Callable[..., Any], request: Any, *, timeout: float | None = None) -> AsyncIterator[Any]:
        """The messages of a server-streaming call, with the deadline, a failure raised as a ``TrainerError``."""
        try:
            async for response in method(request, timeout=self.timeout if timeout is None else timeout):
                yield response
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None  # gRPC's error: .rpc_error

    @property
    def retry_policy(self) -> RetryPolicy:
        """How a call that failed transiently is tried again (``retry`` at construction)."""
        return self._retry

    def _operations_of(self, session_id: str) -> Operations:
        """The operation numbers of a session, shared by this client's handles on it."""
        return self._operations.setdefault(session_id or "default", Operations(session_id, self._client_id))

    async def _send(
        self, call: core.Call[R] | core.StreamCall[R], *, timeout: float | None, operations: Operations | None = None
    ) -> R:
        """Runs ``call`` with retries within its deadline, numbered in ``operations`` if it changes the session."""
        attempts = Attempts(self._retry, self.timeout if timeout is None else timeout)
        if not call.numbered or operations is None:
            return await self._attempts(call, attempts)
        place = Place(operations)  # taken before the first await: in the order the calls are made
        turns = self._turns.setdefault(operations.session_id or "default", asyncio.Condition())
        try:
            if not operations.may_start(place.index):
                try:
                    async with asyncio.timeout(attempts.remaining()), turns:
                        await turns.wait_for(lambda: operations.may_start(place.index))
                except TimeoutError:
                    raise waited_too_long() from None
            if not operations.known:  # a handle on an existing session: where does its numbering stand?
                info = await self._send(core.describe_session(operations.session_id), timeout=attempts.remaining())
                operations.begin(info.next_operation, info.operation_epoch)
            attempts.retryable = operations.numbering
            result = await self._attempts(call, attempts, place)
        except BaseException as error:  # asyncio.CancelledError too: the call may or may not have run
            place.end(error)
            await _wake(turns)
            raise
        place.end(None)
        await _wake(turns)
        return result

    async def _attempts(self, call: core.Call[R] | core.StreamCall[R], attempts: Attempts, place: Place | None = None) -> R:
        while True:
            timeout = attempts.next()
            if place is not None:
                place.stamp(call.request)
            try:
                return await self._attempt(call, timeout)
            except TrainerError as error:
                if attempts.count > 1 and call.done_if is not None and (done := call.done_if(error)) is not None:
                    return call.parse(done)
                pause = attempts.delay(error)
                if pause is None:
                    state = self._channel.get_state(try_to_connect=False)
                    if (last := final(error, attempts, self.target, state)) is not error:
                        raise last from None  # what was raised: last.rpc_error
                    raise
            await asyncio.sleep(pause)

    async def _attempt(self, call: core.Call[R] | core.StreamCall[R], timeout: float | None) -> R:
        """One attempt, through ``call`` or ``stream``: a stream that fails midway is read again
        from its start by the next attempt."""
        try:
            async with asyncio.timeout(timeout):  # (wait_for could lose a slot taken as it timed out)
                await self._in_flight.acquire()
        except TimeoutError:
            raise waited_too_long(CHANNEL_IN_FLIGHT, "on the client's channel") from None
        try:
            if isinstance(call, core.StreamCall):
                method = functools.partial(self._streams[call.method], wait_for_ready=self._retry.wait_for_ready)
                return call.parse([response async for response in self.stream(method, call.request, timeout=timeout)])
            method = functools.partial(self._unary[call.method], wait_for_ready=self._retry.wait_for_ready)
            return call.parse(await self.call(method, call.request, timeout=timeout))
        finally:
            self._in_flight.release()

    @property
    def stub(self) -> trainer_pb2_grpc.TrainerServiceStub:
        """The raw generated stub on the aio channel (its calls return awaitables)."""
        return self._stub

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The server's health status name: "SERVING", "NOT_SERVING", ..."""
        return await self._send(core.health(service), timeout=timeout)

    def session(self, session_id: str = "") -> AsyncSession:
        """A handle on an existing session; no id means the server's default session."""
        return AsyncSession(self, session_id)

    async def create_session(
        self, weights: str = "random", *, num_classes: int = 0, optimizer: Optimizer | None = None, seed: int = 0,
        autocast: AutocastName | None = None, memory_format: MemoryFormatName | None = None,
        input_transform: InputTransform | InputTransformName | None = None, shared_memory: bool | int = False,
        timeout: float | None = None,
    ) -> AsyncSession:
        """A new session (see ``TrainerClient.create_session``); ``async with`` it to close it on exit.
        Its ``created_info`` is the ``SessionInfo`` the server answered with."""
        call = core.create_session(weights, num_classes, optimizer, seed, autocast, memory_format, input_transform)
        info = await self._send(call, timeout=timeout)
        self._operations_of(info.session_id).begin(info.next_operation, info.operation_epoch)
        session = AsyncSession(self, info.session_id, created_info=info)
        if shared_memory:
            try:
                await session.use_shared_memory(shm.size_of(shared_memory), timeout=timeout)
            except BaseException:
                await session.close(timeout=timeout)
                raise
        return session

    async def list_sessions(self, *, timeout: float | None = None) -> list[SessionInfo]:
        """The default session, then this token's own sessions, oldest first."""
        return await self._send(core.list_sessions(), timeout=timeout)

    async def list_checkpoints(self, *, timeout: float | None = None) -> list[CheckpointFile]:
        """The checkpoints this token may load, by name."""
        return await self._send(core.list_checkpoints(), timeout=timeout)

    async def delete_checkpoint(self, name: str, *, timeout: float | None = None) -> int:
        """Deletes one of this token's checkpoints; the bytes freed (see ``TrainerClient.delete_checkpoint``)."""
        return await self._send(core.delete_checkpoint(name), timeout=timeout)


class AsyncSession:
    """One session on the server, with ``Session``'s methods as coroutines (``created_info`` and the
    operation numbers: see ``Session``)."""

    def __init__(self, client: AsyncTrainerClient, session_id: str = "", *, created_info: SessionInfo | None = None) -> None:
        self._client = client
        self.session_id = session_id
        self.created_info = created_info
        self._closed = False
        self._last_forward_id = 0  # of the last Forward or TrainStep made through this handle
        self._operations = client._operations_of(session_id)
        self._shared: shm.SharedRegion | None = None  # use_shared_memory's region
        self._shared_lock = asyncio.Lock()  # one call at a time writes or reads the region

    @property
    def next_operation(self) -> int | None:
        """The operation number of the session's next changing call (None until it is known)."""
        return self._operations.next_number

    async def _call(self, call: core.Call[R] | core.StreamCall[R], timeout: float | None) -> R:
        return await self._client._send(call, timeout=timeout, operations=self._operations)

    async def _shared_call(self, build: Callable[[shm.SharedRegion], core.Call[R] | core.StreamCall[R]],
                           timeout: float | None) -> R:
        """A call through the region, which it holds from writing its input to reading its answer."""
        async with self._shared_lock:
            if self._shared is None:
                raise shm.gone()
            return await self._call(build(self._shared), timeout)

    async def use_shared_memory(
        self, size_bytes: int = shm.DEFAULT_BYTES, *, timeout: float | None = None
    ) -> None:
        """Gives the session a shared-memory region (see ``Session.use_shared_memory``)."""
        grant = await self._call(shm.open_region(self.session_id, size_bytes), timeout)
        region = await asyncio.to_thread(shm.SharedRegion.fetch, grant)
        async with self._shared_lock:
            old, self._shared = self._shared, region
        if old is not None:
            old.close()

    async def _drop_shared_memory(self) -> None:
        async with self._shared_lock:
            old, self._shared = self._shared, None
        if old is not None:
            old.close()

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self, *, timeout: float | None = None) -> None:
        """Closes the session on the server; idempotent, and a no-op for the default session."""
        if self.session_id in ("", "default") or self._closed:
            return
        await self._call(core.close_session(self.session_id), timeout)
        self._closed = True
        self._client._operations.pop(self.session_id, None)
        await self._drop_shared_memory()

    async def info(self, *, timeout: float | None = None) -> SessionInfo:
        """What the session holds (and where its numbering stands: see ``Session.info``)."""
        info = await self._call(core.describe_session(self.session_id), timeout)
        self._operations.begin(info.next_operation, info.operation_epoch)
        return info

    async def resume(self, checkpoint: str | None = None, *, timeout: float | None = None) -> SessionInfo:
        """Goes on after the server lost this session (it was restarted, or its Ray node died): a new
        session from the session's last checkpoint (``auto-<session id>.ckpt``, which the server's
        ``--checkpoint-every`` writes, unless ``checkpoint`` names another), with the operation
        numbering the checkpoint holds, so a call the checkpoint saw is answered and not run again.
        This handle then works on the new session (``session_id`` changes); ``info().step_count``
        says where the training is. Returns the new session's ``SessionInfo``. Refused
        (``SESSION_ALIVE``) while the server still has the session."""
        try:
            alive = await self._client._send(core.describe_session(self.session_id), timeout=timeout)
        except TrainerError as error:
            if not core.lost(error):
                raise
        else:
            raise core.not_lost(self.session_id, alive)
        info = await self._client._send(core.resume_session(checkpoint or f"auto-{self.session_id}.ckpt"), timeout=timeout)
        self.session_id, self.created_info, self._closed = info.session_id, info, False
        self._operations = self._client._operations_of(info.session_id)
        self._operations.begin(info.next_operation, info.operation_epoch)
        return info

    async def forward(
        self, x: Any, *, eval_mode: bool = False, no_grad: bool = False, stats_only: bool = False, timeout: float | None = None
    ) -> ForwardResult:
        """``model(x)`` on the server (see ``Session.forward``)."""
        if self._shared is not None and self._shared.fits(x):
            result = await self._shared_call(lambda region: shm.forward(
                self.session_id, region, x, eval_mode, no_grad, stats_only), timeout)
        else:
            result = await self._call(core.forward(self.session_id, x, eval_mode, no_grad, stats_only, self._client.max_message_bytes), timeout)
        self._last_forward_id = result.forward_id
        return result

    async def backward(
        self, loss: LossName | None = None, labels: Any = None, *, output_gradient: Any = None, retain_graph: bool = False,
        forward_id: int | None = None, step: bool = False, zero_grad_after_step: bool = False, grad_norm: bool = True,
        timeout: float | None = None,
    ) -> BackwardResult:
        """Backpropagates from the pending forward, and steps if asked (see ``Session.backward``)."""
        fid = self._last_forward_id if forward_id is None else forward_id
        call = core.backward(self.session_id, fid, loss, labels, output_gradient, retain_graph, step, zero_grad_after_step, grad_norm)
        return await self._call(call, timeout)

    async def train_step(
        self, x: Any, loss: LossName, labels: Any, *, zero_grad: bool = True, grad_norm: bool = False,
        return_logits: bool = False, timeout: float | None = None,
    ) -> TrainStepResult:
        """One whole training step in one round trip (see ``Session.train_step``)."""
        if self._shared is not None and self._shared.fits(x):
            result = await self._shared_call(lambda region: shm.train_step(
                self.session_id, region, x, loss, labels, zero_grad, grad_norm, return_logits), timeout)
        else:
            result = await self._call(core.train_step(self.session_id, x, loss, labels, zero_grad, grad_norm, return_logits,
                                   self._client.max_message_bytes), timeout)
        self._last_forward_id = result.forward_id
        return result

    async def step(self, *, expected_step_count: int | None = None, timeout: float | None = None) -> int:
        """One optimizer step; returns the session's step count (see ``Session.step``)."""
        return await self._call(core.step(self.session_id, expected_step_count), timeout)

    async def zero_grad(self, set_to_none: bool = True, *, timeout: float | None = None) -> int:
        """Clears every .grad (to None, or to zeros); returns how many were set."""
        return await self._call(core.zero_grad(self.session_id, set_to_none), timeout)

    async def configure_optimizer(
        self, optimizer: Optimizer | OptimizerName | None = None, *, timeout: float | None = None, **values: Any
    ) -> Optimizer:
        """Replaces the optimizer (its state starts anew): ``await configure_optimizer("adam", lr=1e-3)``,
        ``await configure_optimizer(kind="sgd", lr=1e-2, momentum=0.9)`` or ``await configure_optimizer(Optimizer(...))``;
        values not given take torch's defaults."""
        return await self._call(core.configure_optimizer(self.session_id, optimizer, values), timeout)

    async def freeze(self, *patterns: str, timeout: float | None = None) -> FreezeResult:
        """Freezes parameters by name pattern."""
        return await self._call(core.freeze(self.session_id, patterns, False), timeout)

    async def unfreeze(self, *patterns: str, timeout: float | None = None) -> FreezeResult:
        """Unfreezes parameters by name pattern."""
        return await self._call(core.freeze(self.session_id, patterns, True), timeout)

    async def replace_head(self, num_classes: int, seed: int = 0, *, timeout: float | None = None) -> SessionInfo:
        """``model.fc = nn.Linear(512, num_classes)`` after ``torch.manual_seed(seed)``."""
        return await self._call(core.replace_head(self.session_id, num_classes, seed), timeout)

    async def list_parameters(self, *, timeout: float | None = None) -> ParameterList:
        """Every parameter with shape, dtype, requires_grad and whether it has a .grad."""
        return await self._call(core.list_parameters(self.session_id), timeout)

    async def gradients(
        self, *patterns: str, stats_only: bool = False, dtype: TransferDataType = "float32", stats: bool = True,
        timeout: float | None = None,
    ) -> dict[str, NamedTensor]:
        """The .grad of every parameter (or those matching ``patterns``), by name (see ``Session.gradients``)."""
        if self._shared is not None and not stats_only:
            return await self._shared_call(lambda region: shm.gradients(
                self.session_id, region, patterns, stats_only, dtype, stats), timeout)
        return await self._call(core.gradients(self.session_id, patterns, stats_only, dtype, stats), timeout)

    async def parameters(
        self, *patterns: str, stats_only: bool = False, dtype: TransferDataType = "float32", include_buffers: bool = False,
        stats: bool = True, timeout: float | None = None,
    ) -> dict[str, NamedTensor]:
        """The values of every parameter (or those matching ``patterns``), and buffers if asked."""
        if self._shared is not None and not stats_only:
            return await self._shared_call(lambda region: shm.parameters(
                self.session_id, region, patterns, stats_only, dtype, include_buffers, stats), timeout)
        call = core.parameters(self.session_id, patterns, stats_only, dtype, include_buffers, stats)
        return await self._call(call, timeout)

    async def save_checkpoint(self, name: str, *, timeout: float | None = None) -> int:
        """Writes the session's state to checkpoint ``name``; returns the step count saved."""
        return await self._call(core.save_checkpoint(self.session_id, name), timeout)

    async def load_checkpoint(self, name: str, *, timeout: float | None = None) -> SessionInfo:
        """Puts the session in the state of checkpoint ``name``."""
        return await self._call(core.load_checkpoint(self.session_id, name), timeout)

    async def graph(self, *, timeout: float | None = None) -> Graph:
        """The autograd graph of the pending forward."""
        return await self._call(core.graph(self.session_id), timeout)

    async def watch(self, *, recent: int | None = None, timeout: float | None = None) -> AsyncIterator[SessionEvent]:
        """The session's events as they happen (``Session.watch``): ``async for event in session.watch():``."""
        call = core.watch_session(self.session_id, recent)
        client = self._client
        responses = client._streams[call.method](call.request, timeout=timeout, wait_for_ready=client._retry.wait_for_ready)
        try:
            async for response in responses:
                yield call.parse(response)
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
            if not core.watch_over(error, timeout):
                raise error from exc
        finally:
            responses.cancel()

    async def reset(self, *, timeout: float | None = None) -> SessionInfo:
        """Puts the default session back as the server started it (see ``Session.reset``)."""
        return await self._call(core.reset_session(self.session_id), timeout)
