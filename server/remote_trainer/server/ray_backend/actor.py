"""``SessionActor``: one session's ``SessionEngine`` in a Ray actor.

Named ``session-<id>`` in the configured namespace, detached (it outlives the front-end that made
it), placed by Ray where the resources it asks for (``--ray-num-cpus``, ``--ray-num-gpus``,
``--ray-resources``) are free: the options are ``store.RaySessionStore``'s. It builds its own model
from a ``ModelSpec``; tensors cross as numpy arrays (``engine/portable.py``) through Ray's object
store, which readers map without copying. It runs the engine methods the front-end's proxy forwards
(``proxy.FORWARDED``) and nothing else.

A call carries its caller's deadline (``until``, wall-clock): one that passed while the call waited
for the actor is not run; the engine methods that check ``still_wanted`` get ``Wanted``, which also
says no once the front-end has cancelled the task. The idle clock counts a running call as use: it
is set when a call starts and when it ends, and the actor is not idle while one runs (so neither
idle expiry nor pending-graph expiry acts on a session busy with another front-end's call). The same
clock drives the actor's own expiry (``watchdog.py``), which thus never ends a busy session.
"""

from __future__ import annotations

import inspect
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import ray
import torch

from remote_trainer.engine import portable
from remote_trainer.engine.budget import default_total_bytes
from remote_trainer.engine.device import device_memory
from remote_trainer.engine.errors import Abandoned, FailedPrecondition
from remote_trainer.engine.limits import Limits
from remote_trainer.engine.models import ModelSpec, resolve_device
from remote_trainer.engine.optimizer import OptimizerSpec
from remote_trainer.engine.results import NamedTensor, SessionDescription
from remote_trainer.engine.session import SessionEngine
from remote_trainer.server.ray_backend import watchdog
from remote_trainer.server.ray_backend.proxy import CHECKED, FORWARDED, InStore, Request
from remote_trainer.server.ray_backend.registry import ClusterBudget

# The front-ends' housekeeping, which is no use of the session (it does not reset the idle clock).
HOUSEKEEPING = frozenset({"drop_pending"})
# The engine methods whose tensors go into the object store under the session's lock, with no
# snapshot in the actor's own memory first: the engine's encoding method for each (``_into_store``).
COPIED = {"gradients": "encode_gradients", "parameters": "encode_parameters"}


@device_memory
def _into_store(engine: SessionEngine, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> InStore:
    """What ``engine.method(*args, **kwargs)`` would snapshot, copied into Ray's object store instead,
    once, straight from the tensors' own memory: the engine's ``encode_*`` hands them over under the
    session's lock and ``done``, still under it, puts them all (that copy is the snapshot)."""
    arguments = inspect.signature(getattr(engine, method)).bind(*args, **kwargs)
    arguments.apply_defaults()
    items: list[NamedTensor] = []
    put: list[Any] = []
    getattr(engine, COPIED[method])(**arguments.arguments, encode=items.append, done=lambda: put.append(ray.put(portable.pack(items))))
    return InStore(put[0])


@dataclass(frozen=True)
class Wanted:
    """``still_wanted`` in the actor: no once the caller's deadline (``time.time()``) has passed or
    the front-end has cancelled the task (its client went away)."""

    until: float | None

    def __call__(self) -> bool:
        return self.outcome() is None

    def outcome(self) -> str | None:
        if self.until is not None and time.time() >= self.until:
            return "DEADLINE_EXCEEDED"
        return "CANCELLED" if ray.get_runtime_context().is_canceled() else None


class SessionActor:
    """One session's ``SessionEngine`` in a Ray actor (``ray.remote`` is applied in ``RaySessionStore``)."""

    def __init__(self) -> None:
        self._engine: SessionEngine | None = None
        self._build_lock = threading.Lock()
        self._node = ray.get_runtime_context().get_node_id()
        self._actor_id = ray.get_runtime_context().get_actor_id() or ""
        self._clock = threading.Lock()
        self._last_call = time.monotonic()
        self._running = 0  # calls under way (housekeeping aside): the idle clock reads 0 meanwhile

    def build(
        self,
        registry: Any,
        session_id: str,
        model: ModelSpec,
        optimizer: OptimizerSpec,
        limits: Limits,
        keep_initial_state: bool = False,
        session_memory_bytes: int = 0,
        expire_after: float = 0.0,
        memory_bytes: int = 0,
        torch_threads: int = 0,
    ) -> tuple[SessionDescription, str]:
        """Builds the engine of session ``session_id`` (once: a second front-end starting the default
        session finds it built); returns its description and this actor's id. The default session
        keeps its initial state (for ResetSession). ``expire_after`` > 0: the actor ends itself after
        that long without a call (``watchdog.py``; ``idle_seconds`` reads 0 while a call runs).
        ``memory_bytes`` > 0: what the cluster's memory budget had free for the session when it was
        reserved (the registry's): the budget of this process is no larger; a new head or a
        checkpoint's model is checked against the cluster's budget and recounted by ``registry``
        (the registry actor's handle; ``registry.ClusterBudget``). ``torch_threads`` > 0: the
        session computes with that many torch threads (else Ray's OMP_NUM_THREADS: the CPUs the
        actor reserves, at least one)."""
        with self._build_lock:
            if self._engine is None:
                if torch_threads:
                    torch.set_num_threads(torch_threads)
                watchdog.watch(self.idle_seconds, expire_after)
                # The session's limit, within most of the node's memory and what the cluster's budget
                # has free for it; its model's size is the registry's to count.
                budget = ClusterBudget(default_total_bytes(resolve_device(model.device)), session_memory_bytes, memory_bytes,
                                       registry, session_id, self._actor_id)
                self._engine = SessionEngine.from_spec(model, optimizer, limits, budget, keep_initial_state)
            return self._placed(self._engine.describe()), self._actor_id

    def call(self, sealed: Any) -> Any:
        """``engine.method(*args, **kwargs)`` with tensors packed as numpy arrays both ways, unless
        the caller's deadline ``until`` (``time.time()``) passed while it waited to run. The request
        is one object (``proxy.Request``, sealed: ``portable.seal``), and so is the answer. The
        gradients and parameters are copied into the object store under the session's lock, straight
        from the tensors' memory: that copy is the snapshot, handed back as ``InStore``."""
        request: Request = portable.unseal(sealed)
        method, args, kwargs, until = request
        if self._engine is None or method not in FORWARDED:
            raise FailedPrecondition(f"session actor cannot run {method!r} (not built, or not an engine method)", "SESSION_NOT_READY")
        wanted = Wanted(until)
        outcome = wanted.outcome()
        if outcome is not None:
            raise Abandoned(f"{method} was not run: its caller stopped waiting before the session was free", outcome)
        if method in CHECKED:
            kwargs["still_wanted"] = wanted
        use = method not in HOUSEKEEPING
        self._count(use, +1)
        try:
            if method in COPIED:
                return _into_store(self._engine, method, args, kwargs)
            result = getattr(self._engine, method)(*args, **kwargs)
        finally:
            self._count(use, -1)
        if isinstance(result, SessionDescription):
            result = self._placed(result)
        return portable.seal(result)

    def _count(self, use: bool, change: int) -> None:
        """A call of the session starts (+1) or ends (-1): both are use, for the idle clock."""
        if use:
            with self._clock:
                self._running += change
                self._last_call = time.monotonic()

    def idle_seconds(self) -> float:
        """Seconds since an engine call last started or ended, 0 while one runs (for idle and
        pending-graph expiry; asking does not count as a call)."""
        with self._clock:
            return 0.0 if self._running else time.monotonic() - self._last_call

    def _placed(self, description: SessionDescription) -> SessionDescription:
        # Where the session runs: the device in its process, and the Ray node holding that process.
        return replace(description, device=f"{description.device} @ ray node {self._node}")
