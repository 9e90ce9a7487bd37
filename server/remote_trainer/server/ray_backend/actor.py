"""``SessionActor``: one session's ``SessionEngine`` in a Ray actor.

Named ``session-<id>`` in the configured namespace, detached (it outlives the front-end that made
it), placed by Ray where the resources it asks for (``--ray-num-cpus``, ``--ray-num-gpus``,
``--ray-resources``) are free: the options are ``store.RaySessionStore``'s. It builds its own model
from a ``ModelSpec``; tensors cross as numpy arrays (``engine/portable.py``) through Ray's object
store, which readers map without copying. It runs the engine methods the front-end's proxy forwards
(``proxy.FORWARDED``) and nothing else.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any

import ray

from remote_trainer.engine import portable
from remote_trainer.engine.budget import MemoryBudget, default_total_bytes
from remote_trainer.engine.errors import FailedPrecondition
from remote_trainer.engine.limits import Limits
from remote_trainer.engine.models import ModelSpec, resolve_device
from remote_trainer.engine.optimizer import OptimizerSpec
from remote_trainer.engine.results import SessionDescription
from remote_trainer.engine.session import SessionEngine
from remote_trainer.server.ray_backend import watchdog
from remote_trainer.server.ray_backend.proxy import FORWARDED


class SessionActor:
    """One session's ``SessionEngine`` in a Ray actor (``ray.remote`` is applied in ``RaySessionStore``)."""

    def __init__(self) -> None:
        self._engine: SessionEngine | None = None
        self._build_lock = threading.Lock()
        self._node = ray.get_runtime_context().get_node_id()
        self._actor_id = ray.get_runtime_context().get_actor_id() or ""
        self._last_call = time.monotonic()
        self._running = 0  # engine calls under way (the watchdog never ends a busy session)
        self._running_lock = threading.Lock()

    def build(
        self,
        model: ModelSpec,
        optimizer: OptimizerSpec,
        limits: Limits,
        keep_initial_state: bool = False,
        session_memory_bytes: int = 0,
        expire_after: float = 0.0,
    ) -> tuple[SessionDescription, str]:
        """Builds the engine (once: a second front-end starting the default session finds it built);
        returns its description and this actor's id. The default session keeps its initial state
        (for ResetSession). ``expire_after`` > 0: the actor ends itself after that long without a
        call (``watchdog.py``)."""
        with self._build_lock:
            if self._engine is None:
                watchdog.watch(lambda: 0.0 if self._running else self.idle_seconds(), expire_after)
                # A budget of this actor's own process: the session's limit, within most of the node's memory.
                budget = MemoryBudget(default_total_bytes(resolve_device(model.device)), session_memory_bytes)
                self._engine = SessionEngine.from_spec(model, optimizer, limits, budget, keep_initial_state)
            return self._placed(self._engine.describe()), self._actor_id

    def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``engine.method(*args, **kwargs)`` with tensors packed as numpy arrays both ways."""
        if self._engine is None or method not in FORWARDED:
            raise FailedPrecondition(f"session actor cannot run {method!r} (not built, or not an engine method)", "SESSION_NOT_READY")
        used = method != "drop_pending"  # the front-ends' housekeeping is no use of the session
        if used:
            self._last_call = time.monotonic()
        with self._running_lock:
            self._running += used
        try:
            result = getattr(self._engine, method)(*portable.unpack(args), **portable.unpack(kwargs))
        finally:
            with self._running_lock:
                self._running -= used
        if isinstance(result, SessionDescription):
            result = self._placed(result)
        return portable.pack(result)

    def idle_seconds(self) -> float:
        """Seconds since the last engine call (for idle expiry; asking does not count as a call)."""
        return time.monotonic() - self._last_call

    def _placed(self, description: SessionDescription) -> SessionDescription:
        # Where the session runs: the device in its process, and the Ray node holding that process.
        return replace(description, device=f"{description.device} @ ray node {self._node}")
