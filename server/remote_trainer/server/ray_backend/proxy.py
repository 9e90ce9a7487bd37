"""``RayEngine``: a session held by a Ray actor, behind the ``Engine`` protocol, in the front-end.

Every method of the protocol is one actor call through one forwarder, ``RayEngine._call``: its
arguments packed (tensors as numpy arrays, ``engine/portable.py``), ``ray.get`` with the store's
timeout, and an actor that failed or does not answer told as the domain error that says so
(``RaySessionStore.wait``). The class names each forwarded method once, as ``Forwarded(Engine.x)``:
its signature and result type are the protocol's, so ``mypy --strict`` checks the calls on the proxy
against the protocol, and the proxy as an ``Engine`` where the store hands it out (a member missing
or forwarded under another's name fails there). What the actor may run is exactly that list
(``FORWARDED``). Three things stay in the front-end: ``still_wanted`` (a callable of this front-end's
call, asked before sending), the registry's note of a new checkpoint, and ``encode_*`` (the encoding
of what the actor returned).

The caller's deadline crosses as plain data: the time it passes, on the wall clock (``time.time()``:
monotonic clocks differ between processes). The actor runs nothing whose deadline has passed, and
hands the methods that take ``still_wanted`` one of its own, which says no once the deadline has
passed or the front-end cancelled the task (``ray.cancel``, when its client goes away).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, TypeVar, overload

import torch

from remote_trainer.engine import portable
from remote_trainer.engine.checkpoints import Quota
from remote_trainer.engine.errors import Abandoned
from remote_trainer.engine.protocol import Engine
from remote_trainer.engine.results import CheckpointInfo, NamedTensor
from remote_trainer.server.calls import Call, current_call

if TYPE_CHECKING:
    from remote_trainer.server.ray_backend.store import RaySessionStore

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


# What a front-end sends with each actor call, as one object (Ray serialises each argument on its
# own), sealed (``portable.seal``: pickled here unless it holds tensors): the engine method's name,
# its positional and keyword arguments, and the caller's deadline (``wall_deadline``).
Request = tuple[str, tuple[Any, ...], dict[str, Any], "float | None"]


@dataclass(frozen=True)
class InStore:
    """An actor's answer left in the object store (``ray.put`` by the actor): the front-end reads it
    there, without a copy."""

    ref: Any  # ray.ObjectRef


def wall_deadline(call: Call) -> float | None:
    """When ``call``'s deadline passes, as ``time.time()`` (which another process on any node can
    compare, with clocks kept in step by NTP); None for a call without one."""
    remaining = call.remaining()
    return None if remaining is None else time.time() + remaining


def check_wanted(still_wanted: Callable[[], bool] | None, what: str) -> None:
    if still_wanted is not None and not still_wanted():
        raise Abandoned(f"{what}: its caller stopped waiting", "ABANDONED")


class Forwarded(Generic[P, R]):
    """An ``Engine`` method that the session's actor runs: on a ``RayEngine``, a callable with the
    protocol method's signature. A method with ``still_wanted`` names what a call dropped before
    sending says (``not_run``)."""

    def __init__(self, method: Callable[Concatenate[Engine, P], R], not_run: str = "") -> None:
        self.name = method.__name__
        self.signature = inspect.signature(method)
        self.not_run = not_run
        if ("still_wanted" in self.signature.parameters) != bool(not_run):
            raise TypeError(f"{self.name}: not_run is needed exactly when the method takes still_wanted")

    @overload
    def __get__(self, engine: None, owner: type[RayEngine]) -> Forwarded[P, R]: ...

    @overload
    def __get__(self, engine: RayEngine, owner: type[RayEngine]) -> Callable[P, R]: ...

    def __get__(self, engine: RayEngine | None, owner: type[RayEngine]) -> Forwarded[P, R] | Callable[P, R]:
        if engine is None:
            return self

        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            return engine._call(self, *args, **kwargs)

        return call


class RayEngine:
    """A session held by a Ray actor, behind the ``Engine`` protocol: each method is one actor call."""

    def __init__(self, store: RaySessionStore, session_id: str, owner: str, handle: Any, actor_id: str) -> None:
        self.session_id = session_id
        self.owner = owner
        self.actor_id = actor_id
        self._store = store
        self._handle = handle

    def _call(self, method: Forwarded[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """``method`` run by the session's actor; its result, or the error the actor raised, or the
        domain error that tells what happened to the actor (lost, unreachable, timed out)."""
        sent: tuple[tuple[Any, ...], dict[str, Any]] = (args, kwargs)
        if method.not_run:
            # ``still_wanted`` asks this front-end's call, which cannot cross to the actor: it is asked
            # before sending; in the actor the engine asks the actor's own (the deadline, a cancel).
            bound = method.signature.bind(self, *args, **kwargs)
            check_wanted(bound.arguments.pop("still_wanted", None), method.not_run)
            sent = (bound.args[1:], bound.kwargs)
        request: Request = (method.name, sent[0], sent[1], wall_deadline(current_call()))
        answer = self._store.wait(self, self._handle.call.remote(portable.seal(request)))
        if isinstance(answer, InStore):  # a snapshot the actor put into the object store: read in place
            answer = self._store.wait(self, answer.ref)
        result: R = portable.unseal(answer)
        return result

    forward = Forwarded(Engine.forward, not_run="the forward was not run")
    backward = Forwarded(Engine.backward, not_run="the backward was not run")
    train_step = Forwarded(Engine.train_step, not_run="the training step was not run")
    step = Forwarded(Engine.step, not_run="the step was not taken")
    drop_pending = Forwarded(Engine.drop_pending)
    zero_grad = Forwarded(Engine.zero_grad)
    configure_optimizer = Forwarded(Engine.configure_optimizer)
    freeze = Forwarded(Engine.freeze)
    replace_head = Forwarded(Engine.replace_head)
    parameters_info = Forwarded(Engine.parameters_info)
    gradients = Forwarded(Engine.gradients)
    parameters = Forwarded(Engine.parameters)
    graph = Forwarded(Engine.graph)
    describe = Forwarded(Engine.describe)
    reset = Forwarded(Engine.reset)
    warm_up = Forwarded(Engine.warm_up)
    load_checkpoint = Forwarded(Engine.load_checkpoint)
    resume = Forwarded(Engine.resume)
    refuse = Forwarded(Engine.refuse)
    _save_checkpoint = Forwarded(Engine.save_checkpoint)

    def save_checkpoint(self, path: str, quota: Quota | None = None) -> CheckpointInfo:
        """Written by the actor, on its node: the checkpoint folder must be storage every node sees
        (the quota is checked there too)."""
        result = self._save_checkpoint(path, quota)
        self._store.checkpointed(self, path, result.step_count)
        return result

    # The tensors come out of the actor as arrays in the object store: the actor copies them there
    # under the session's lock, straight from their memory (that copy is the snapshot); they are read
    # here without a copy, then ``encode`` and ``done`` run here: they never cross the process
    # boundary. ``casts`` changes nothing: the actor sends each tensor cast to ``dtype`` already.
    def encode_gradients(
        self, patterns: list[str], stats_only: bool, dtype: torch.dtype, encode: Callable[[NamedTensor], T],
        with_stats: bool = True, done: Callable[[], None] | None = None, casts: bool = False,
    ) -> list[T]:
        return _encoded(self.gradients(patterns, stats_only, dtype, with_stats), encode, done)

    def encode_parameters(
        self, patterns: list[str], stats_only: bool, dtype: torch.dtype, include_buffers: bool, encode: Callable[[NamedTensor], T],
        with_stats: bool = True, done: Callable[[], None] | None = None, casts: bool = False,
    ) -> list[T]:
        return _encoded(self.parameters(patterns, stats_only, dtype, include_buffers, with_stats), encode, done)


def _encoded(items: list[NamedTensor], encode: Callable[[NamedTensor], T], done: Callable[[], None] | None) -> list[T]:
    out = [encode(item) for item in items]
    if done is not None:
        done()
    return out


# The engine methods a front-end calls on a session actor, and all that the actor runs.
FORWARDED = frozenset(member.name for member in vars(RayEngine).values() if isinstance(member, Forwarded))
# Those that take ``still_wanted``: the actor gives them its own.
CHECKED = frozenset(member.name for member in vars(RayEngine).values() if isinstance(member, Forwarded) and member.not_run)
