"""The Ray backend: every session is a named Ray actor, so any stateless front-end can serve it.

Imported only with ``--backend ray`` (it imports ray). Three parts:

- ``SessionActor``: a ``SessionEngine`` in a Ray actor, named ``session-<id>`` in the configured
  namespace, detached (it outlives the front-end that made it), placed by Ray where the resources it
  asks for (``--ray-num-cpus``, ``--ray-num-gpus``, ``--ray-resources``) are free. It builds its own
  model from a ``ModelSpec``; tensors cross as numpy arrays (``engine/portable.py``) through Ray's
  object store, which readers map without copying.
- ``SessionRegistry``: one small detached actor on the head node that knows every session's owner,
  state (creating, live, lost, expired) and last checkpoint. Its methods run one at a time, so the
  session limits (in all, and per token) hold across the cluster without races; it also remembers
  lost sessions, so that any front-end, even one started after the loss, answers SESSION_LOST with
  the session's last checkpoint instead of "unknown session".
- ``RaySessionStore`` (the front-end's ``Sessions``) and ``RayEngine`` (its ``Engine`` proxy): each
  call is ``ray.get(actor.call.remote(...), timeout=--ray-timeout)``. A session whose process or
  node died answers UNAVAILABLE ``SESSION_LOST`` (naming its last checkpoint); a node that does not
  answer yet, UNAVAILABLE ``SESSION_UNREACHABLE``; a call over the timeout, UNAVAILABLE
  ``SESSION_TIMEOUT``. Domain errors raised in the actor arrive wrapped in ``RayTaskError``; their
  ``cause`` (with reason, violations and metadata) is raised as is.

Residual races (documented in docs/deployment.md): a session whose node just died still counts
against the limits until the cluster declares the node dead (seconds, with Ray's health checks), and
a call that arrives while idle expiry closes its session may run or not before the actor is killed.
The registry lives on the head node: losing the head loses the cluster (Ray's GCS) anyway.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import ray
import torch
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from remote_trainer.contract.names import LossName
from remote_trainer.engine import portable
from remote_trainer.engine.errors import Abandoned, FailedPrecondition, NotFound, ResourceExhausted, Unavailable
from remote_trainer.engine.limits import Limits
from remote_trainer.engine.budget import MemoryBudget, default_total_bytes
from remote_trainer.engine.models import ModelSpec, resolve_device
from remote_trainer.engine.optimizer import OptimizerSpec
from remote_trainer.engine.protocol import Engine
from remote_trainer.engine.results import (
    BackwardResult,
    CheckpointInfo,
    ForwardResult,
    FreezeResult,
    Graph,
    NamedTensor,
    ParameterInfo,
    SessionDescription,
    TrainStepResult,
)
from remote_trainer.engine.session import SessionEngine
from remote_trainer.server.sessions import DEFAULT_SESSION_ID
from remote_trainer.server.settings import Settings, ray_resources

log = logging.getLogger(__name__)

T = TypeVar("T")

REGISTRY_NAME = "session-registry"
# A resource Ray gives the head node only: the registry lives there, with the GCS it cannot outlive.
HEAD_NODE_RESOURCE = "node:__internal_head__"
# Registry calls are small; a registry that does not answer within this is reported unavailable.
REGISTRY_TIMEOUT = 30.0
# Lost and expired sessions remembered (to answer SESSION_LOST / SESSION_EXPIRED), at most.
REMEMBERED = 10_000
# Engine methods a front-end may call on a session actor.
ENGINE_METHODS = frozenset({
    "forward", "backward", "step", "zero_grad", "configure_optimizer", "freeze", "replace_head", "parameters_info",
    "gradients", "parameters", "graph", "describe", "save_checkpoint", "load_checkpoint", "reset", "warm_up",
    "drop_pending", "train_step",
})

def actor_name(session_id: str) -> str:
    """The Ray actor name of a session."""
    return f"session-{session_id}"


# -- in the cluster ---------------------------------------------------------------------------------


class SessionActor:
    """One session's ``SessionEngine`` in a Ray actor (``ray.remote`` is applied in ``RaySessionStore``)."""

    def __init__(self) -> None:
        self._engine: SessionEngine | None = None
        self._build_lock = threading.Lock()
        self._node = ray.get_runtime_context().get_node_id()
        self._actor_id = ray.get_runtime_context().get_actor_id() or ""
        self._last_call = time.monotonic()

    def build(
        self,
        model: ModelSpec,
        optimizer: OptimizerSpec,
        limits: Limits,
        keep_initial_state: bool = False,
        session_memory_bytes: int = 0,
    ) -> tuple[SessionDescription, str]:
        """Builds the engine (once: a second front-end starting the default session finds it built);
        returns its description and this actor's id. The default session keeps its initial state
        (for ResetSession)."""
        with self._build_lock:
            if self._engine is None:
                # A budget of this actor's own process: the session's limit, within most of the node's memory.
                budget = MemoryBudget(default_total_bytes(resolve_device(model.device)), session_memory_bytes)
                self._engine = SessionEngine.from_spec(model, optimizer, limits, budget, keep_initial_state)
            return self._placed(self._engine.describe()), self._actor_id

    def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``engine.method(*args, **kwargs)`` with tensors packed as numpy arrays both ways."""
        if self._engine is None or method not in ENGINE_METHODS:
            raise FailedPrecondition(f"session actor cannot run {method!r} (not built, or not an engine method)", "SESSION_NOT_READY")
        if method != "drop_pending":  # the front-ends' housekeeping is no use of the session
            self._last_call = time.monotonic()
        result = getattr(self._engine, method)(*portable.unpack(args), **portable.unpack(kwargs))
        if isinstance(result, SessionDescription):
            result = self._placed(result)
        return portable.pack(result)

    def idle_seconds(self) -> float:
        """Seconds since the last engine call (for idle expiry; asking does not count as a call)."""
        return time.monotonic() - self._last_call

    def _placed(self, description: SessionDescription) -> SessionDescription:
        # Where the session runs: the device in its process, and the Ray node holding that process.
        return replace(description, device=f"{description.device} @ ray node {self._node}")


@dataclass
class Record:
    """What the registry knows of one session."""

    owner: str
    state: str  # "creating", "live", "lost" or "expired"
    since: float  # time.time() of the last change of state
    actor_id: str = ""
    checkpoint: str = ""  # the last checkpoint's name, relative to the owner's checkpoint folder
    checkpoint_step: int = 0
    idle_seconds: float = 0.0


HELD = ("creating", "live")  # the states that count against the limits


class SessionRegistry:
    """Every session of the namespace: owner, state, last checkpoint. One call at a time (a plain
    Ray actor), so checking a limit and reserving an id are one step for the whole cluster."""

    def __init__(self, namespace: str) -> None:
        self._namespace = namespace
        self._records: dict[str, Record] = {}

    def reserve(self, owner: str, max_sessions: int, max_per_owner: int, stale_after: float) -> str:
        """A new session id for ``owner`` within the limits, held as "creating" until ``commit``."""
        self._prune(stale_after)
        held = sum(1 for r in self._records.values() if r.state in HELD)
        if held >= max_sessions:
            raise ResourceExhausted(
                f"the cluster holds {held} sessions, its limit max_sessions={max_sessions}; close one first",
                "TOO_MANY_SESSIONS",
                metadata={"limit": str(max_sessions)},
            )
        owned = sum(1 for sid, r in self._records.items() if sid != DEFAULT_SESSION_ID and r.owner == owner and r.state in HELD)
        if max_per_owner and owned >= max_per_owner:
            raise ResourceExhausted(
                f"this token holds {owned} sessions, its limit max_sessions_per_token={max_per_owner}; close one first",
                "TOO_MANY_SESSIONS_FOR_TOKEN",
                metadata={"limit": str(max_per_owner)},
            )
        session_id = secrets.token_hex(16)  # unguessable: 128 random bits
        self._records[session_id] = Record(owner, "creating", time.time())
        return session_id

    def commit(self, session_id: str, actor_id: str) -> None:
        record = self._records.get(session_id)
        if record is not None:
            record.state, record.since, record.actor_id = "live", time.time(), actor_id

    def abort(self, session_id: str) -> None:
        self._records.pop(session_id, None)

    def register_default(self, actor_id: str) -> None:
        """The default session's actor (created by whichever front-end started first)."""
        self._records[DEFAULT_SESSION_ID] = Record("", "live", time.time(), actor_id)

    def lookup(self, session_id: str) -> Record | None:
        return self._records.get(session_id)

    def lost(self, session_id: str, actor_id: str) -> Record | None:
        """Marks the session lost if ``actor_id`` (whose calls failed) is still its actor; its record."""
        record = self._records.get(session_id)
        if record is not None and record.state == "live" and record.actor_id == actor_id:
            record.state, record.since = "lost", time.time()
            self._forget_old()
        return record

    def checkpointed(self, session_id: str, name: str, step_count: int) -> None:
        record = self._records.get(session_id)
        if record is not None:
            record.checkpoint, record.checkpoint_step = name, step_count

    def close(self, session_id: str, owner: str) -> Record | None:
        """Forgets a live or lost session of ``owner``; its record, or None when there is none to close."""
        record = self._records.get(session_id)
        if record is None or record.owner != owner or record.state not in ("live", "lost"):
            return None
        return self._records.pop(session_id)

    def expire(self, session_id: str, idle_seconds: float) -> bool:
        """Marks a live session expired; False when it is no longer live (closed, lost, expired)."""
        record = self._records.get(session_id)
        if record is None or record.state != "live" or session_id == DEFAULT_SESSION_ID:
            return False
        record.state, record.since, record.idle_seconds = "expired", time.time(), idle_seconds
        self._forget_old()
        return True

    def live(self) -> list[str]:
        """The live sessions but the default one."""
        return [sid for sid, r in self._records.items() if r.state == "live" and sid != DEFAULT_SESSION_ID]

    def owned(self, owner: str) -> list[str]:
        """The live sessions of ``owner`` but the default one, in creation order."""
        return [sid for sid, r in self._records.items() if r.state == "live" and r.owner == owner and sid != DEFAULT_SESSION_ID]

    def count(self) -> int:
        """Sessions held (live or being created), the default one included."""
        return sum(1 for r in self._records.values() if r.state in HELD)

    def _prune(self, stale_after: float) -> None:
        """Lost sessions that no front-end has called yet stop counting; abandoned reservations go."""
        now = time.time()
        for sid, record in list(self._records.items()):
            if record.state == "creating" and now - record.since > stale_after:
                del self._records[sid]  # its front-end died while creating it
            elif record.state == "live":
                try:
                    ray.get_actor(actor_name(sid), namespace=self._namespace)
                except ValueError:  # the cluster no longer has the actor: its process or node died
                    record.state, record.since = "lost", now
        self._forget_old()

    def _forget_old(self) -> None:
        gone = sorted((r.since, sid) for sid, r in self._records.items() if r.state in ("lost", "expired"))
        for _, sid in gone[: max(0, len(gone) - REMEMBERED)]:
            del self._records[sid]


# -- in the front-end -------------------------------------------------------------------------------


def _check_wanted(still_wanted: Callable[[], bool] | None, what: str) -> None:
    if still_wanted is not None and not still_wanted():
        raise Abandoned(f"{what}: its caller stopped waiting", "ABANDONED")


def _cause(exc: RayTaskError) -> BaseException:
    """The exception the actor raised (a domain error with all its fields), or the wrapper itself."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class RayEngine:
    """A session held by a Ray actor, behind the ``Engine`` protocol: each method is one actor call."""

    def __init__(self, store: RaySessionStore, session_id: str, owner: str, handle: Any, actor_id: str) -> None:
        self.session_id = session_id
        self.owner = owner
        self.actor_id = actor_id
        self._store = store
        self._handle = handle

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        ref = self._handle.call.remote(method, portable.pack(args), portable.pack(kwargs))
        return portable.unpack(self._store.wait(self, ref))

    def forward(
        self,
        x: torch.Tensor,
        eval_mode: bool = False,
        no_grad: bool = False,
        max_logits_elements: int | None = None,
        still_wanted: Callable[[], bool] | None = None,
    ) -> ForwardResult:
        # ``still_wanted`` asks this front-end's call, which cannot cross to the actor: it is asked
        # before sending; a caller giving up while the actor runs the forward is not seen there.
        _check_wanted(still_wanted, "the forward was not run")
        result: ForwardResult = self._call("forward", x, eval_mode=eval_mode, no_grad=no_grad, max_logits_elements=max_logits_elements)
        return result

    def backward(
        self,
        forward_id: int = 0,
        loss: LossName | None = None,
        labels: torch.Tensor | None = None,
        output_gradient: torch.Tensor | None = None,
        retain_graph: bool = False,
        step: bool = False,
        zero_grad_after_step: bool = False,
        grad_norm: bool = True,
    ) -> BackwardResult:
        result: BackwardResult = self._call(
            "backward", forward_id, loss=loss, labels=labels, output_gradient=output_gradient, retain_graph=retain_graph,
            step=step, zero_grad_after_step=zero_grad_after_step, grad_norm=grad_norm,
        )
        return result

    def train_step(
        self,
        x: torch.Tensor,
        loss: LossName,
        labels: torch.Tensor | None,
        zero_grad: bool = True,
        grad_norm: bool = False,
        max_logits_elements: int | None = None,
        still_wanted: Callable[[], bool] | None = None,
    ) -> TrainStepResult:
        _check_wanted(still_wanted, "the training step was not run")  # asked before sending, as for forward
        result: TrainStepResult = self._call(
            "train_step", x, loss, labels, zero_grad=zero_grad, grad_norm=grad_norm, max_logits_elements=max_logits_elements
        )
        return result

    def step(self, expected_step_count: int | None = None, still_wanted: Callable[[], bool] | None = None) -> tuple[int, int]:
        _check_wanted(still_wanted, "the step was not taken")  # asked before sending, as for forward
        result: tuple[int, int] = self._call("step", expected_step_count)
        return result

    def drop_pending(self, why: str) -> bool:
        dropped: bool = self._call("drop_pending", why)
        return dropped

    def zero_grad(self, set_to_none: bool = True) -> int:
        result: int = self._call("zero_grad", set_to_none)
        return result

    def configure_optimizer(self, spec: OptimizerSpec) -> OptimizerSpec:
        result: OptimizerSpec = self._call("configure_optimizer", spec)
        return result

    def freeze(self, patterns: list[str], unfreeze: bool = False) -> FreezeResult:
        result: FreezeResult = self._call("freeze", patterns, unfreeze)
        return result

    def replace_head(self, num_classes: int, seed: int) -> SessionDescription:
        result: SessionDescription = self._call("replace_head", num_classes, seed)
        return result

    def parameters_info(self) -> list[ParameterInfo]:
        result: list[ParameterInfo] = self._call("parameters_info")
        return result

    def gradients(
        self, patterns: list[str], stats_only: bool = False, dtype: torch.dtype = torch.float32, with_stats: bool = True
    ) -> list[NamedTensor]:
        result: list[NamedTensor] = self._call("gradients", patterns, stats_only, dtype, with_stats)
        return result

    def parameters(
        self,
        patterns: list[str],
        stats_only: bool = False,
        dtype: torch.dtype = torch.float32,
        include_buffers: bool = False,
        with_stats: bool = True,
    ) -> list[NamedTensor]:
        result: list[NamedTensor] = self._call("parameters", patterns, stats_only, dtype, include_buffers, with_stats)
        return result

    # The tensors come out of the actor as arrays in the object store (a snapshot there, read here
    # without a copy), then ``encode`` runs here: it never crosses the process boundary.
    def encode_gradients(
        self, patterns: list[str], stats_only: bool, dtype: torch.dtype, encode: Callable[[NamedTensor], T],
        with_stats: bool = True,
    ) -> list[T]:
        return [encode(item) for item in self.gradients(patterns, stats_only, dtype, with_stats)]

    def encode_parameters(
        self, patterns: list[str], stats_only: bool, dtype: torch.dtype, include_buffers: bool, encode: Callable[[NamedTensor], T],
        with_stats: bool = True,
    ) -> list[T]:
        return [encode(item) for item in self.parameters(patterns, stats_only, dtype, include_buffers, with_stats)]

    def graph(self) -> Graph:
        result: Graph = self._call("graph")
        return result

    def describe(self) -> SessionDescription:
        result: SessionDescription = self._call("describe")
        return result

    def reset(self) -> SessionDescription:
        result: SessionDescription = self._call("reset")
        return result

    def warm_up(self) -> None:
        self._call("warm_up")

    def save_checkpoint(self, path: str) -> CheckpointInfo:
        """Written by the actor, on its node: the checkpoint folder must be storage every node sees."""
        result: CheckpointInfo = self._call("save_checkpoint", path)
        self._store.checkpointed(self, path, result.step_count)
        return result

    def load_checkpoint(self, path: str) -> SessionDescription:
        result: SessionDescription = self._call("load_checkpoint", path)
        return result


class RaySessionStore:
    """The front-end's view of the sessions in the Ray cluster (the ``Sessions`` protocol).

    It keeps nothing that another front-end would need: owners, states and checkpoints are in the
    registry, sessions in their actors. It caches actor handles (a session's owner never changes).
    """

    def __init__(self, settings: Settings, limits: Limits, registry: Any) -> None:
        self._namespace = settings.ray_namespace
        self._limits = limits
        self._max_sessions = settings.max_sessions
        self._max_per_owner = settings.max_sessions_per_token
        self._idle_seconds = settings.session_idle_seconds
        self._pending_seconds = settings.pending_graph_seconds
        self._session_memory_bytes = settings.session_memory_bytes
        self._timeout = settings.ray_timeout
        self._checkpoint_dir = settings.checkpoint_dir
        self._registry = registry
        self._actor: Any = ray.remote(SessionActor)
        options: dict[str, Any] = {
            "namespace": self._namespace,
            "lifetime": "detached",  # sessions outlive the front-end that made them
            "num_cpus": settings.ray_num_cpus,
            "num_gpus": settings.ray_num_gpus,
            "resources": ray_resources(settings),
            "max_restarts": 0,  # a restarted actor would be a fresh model: lost is lost, told as such
            "max_task_retries": 0,  # never run a Backward or Step twice
            "max_concurrency": 8,  # describe and idle checks while a step runs (the engine serialises)
        }
        if settings.ray_scheduling == "spread":
            options["scheduling_strategy"] = "SPREAD"
        self._options = options
        self._lock = threading.Lock()
        self._cache: dict[str, RayEngine] = {}

    @classmethod
    def connect(cls, settings: Settings, default_model: ModelSpec, limits: Limits) -> RaySessionStore:
        """Joins (or starts) the Ray cluster, finds or makes the registry and the default session."""
        if not ray.is_initialized():
            if settings.ray_address:
                ray.init(address=settings.ray_address, namespace=settings.ray_namespace,
                         log_to_driver=False, logging_level=logging.WARNING)
            else:  # a one-node Ray for this front-end alone, on loopback
                ray.init(namespace=settings.ray_namespace, include_dashboard=False, _node_ip_address="127.0.0.1",
                         log_to_driver=False, logging_level=logging.WARNING)
        registry_class: Any = ray.remote(SessionRegistry)
        registry = registry_class.options(
            name=REGISTRY_NAME, namespace=settings.ray_namespace, lifetime="detached", get_if_exists=True,
            num_cpus=0, resources={HEAD_NODE_RESOURCE: 0.001}, max_restarts=0,
        ).remote(settings.ray_namespace)
        store = cls(settings, limits, registry)
        store._start_default(default_model)
        log.info("joined Ray cluster %s (namespace %s)", settings.ray_address or "(local)", settings.ray_namespace)
        return store

    @property
    def idle_seconds(self) -> float:
        return self._idle_seconds

    # -- the Sessions protocol ----------------------------------------------------------------------

    def visible_to(self, owner: str = "") -> list[tuple[str, Engine]]:
        """The sessions ``owner`` may use, from any front-end: the default session first, then its own."""
        owned: list[str] = self._ask(self._registry.owned.remote(owner))
        return [(sid, self.get(sid, owner)) for sid in [DEFAULT_SESSION_ID, *owned]]

    def get(self, session_id: str, owner: str = "") -> RayEngine:
        sid = session_id or DEFAULT_SESSION_ID
        with self._lock:
            engine = self._cache.get(sid)
        if engine is not None:
            if sid == DEFAULT_SESSION_ID or engine.owner == owner:
                return engine
            raise self._missing(session_id, owner, None)
        record = self._ask(self._registry.lookup.remote(sid))
        if record is None or sid != DEFAULT_SESSION_ID and record.owner != owner or record.state not in ("live", "lost"):
            raise self._missing(session_id, owner, record)
        if record.state == "lost":
            raise self._lost_error(sid, record)
        try:
            handle = ray.get_actor(actor_name(sid), namespace=self._namespace)
        except ValueError:  # the actor is gone, the registry not told yet
            raise self._lost(sid, record.actor_id) from None
        engine = RayEngine(self, sid, record.owner, handle, record.actor_id)
        with self._lock:
            self._cache[sid] = engine
        return engine

    def create(
        self, model: ModelSpec, optimizer: OptimizerSpec, owner: str = "", still_wanted: Callable[[], bool] = lambda: True
    ) -> tuple[str, Engine]:
        sid: str = self._ask(self._registry.reserve.remote(owner, self._max_sessions, self._max_per_owner, 2 * self._timeout))
        handle = None
        try:
            handle = self._actor.options(name=actor_name(sid), **self._options).remote()
            description, actor_id = self._build(handle, model, optimizer)
            _check_wanted(still_wanted, "the session was built but dropped")  # no one could use or close it
            self._ask(self._registry.commit.remote(sid, actor_id))
        except BaseException:
            if handle is not None:
                ray.kill(handle)
            try:
                self._ask(self._registry.abort.remote(sid))
            except Unavailable:
                log.warning("could not release the reservation of session %s (the registry drops it later)", sid)
            raise
        engine = RayEngine(self, sid, owner, handle, actor_id)
        with self._lock:
            self._cache[sid] = engine
        log.info("session %s created (owner %s) on %s", sid, owner or "-", description.device)
        return sid, engine

    def close(self, session_id: str, owner: str = "") -> None:
        if session_id in ("", DEFAULT_SESSION_ID):
            raise FailedPrecondition("the default session cannot be closed", "DEFAULT_SESSION")
        record = self._ask(self._registry.close.remote(session_id, owner))
        if record is None:
            raise self._missing(session_id, owner, self._ask(self._registry.lookup.remote(session_id)))
        self._kill(session_id)
        log.info("session %s closed", session_id)

    @property
    def pending_seconds(self) -> float:
        return self._pending_seconds

    def expire_idle(self, busy: Callable[[str], bool] = lambda sid: False) -> list[str]:
        """Closes the sessions whose actors had no call for ``idle_seconds`` (a session with a call
        running or waiting on this front-end is not idle), and drops pending graphs unused for
        ``pending_seconds``. An actor busy with a call does not answer within 10 s: not idle either."""
        stale: list[str] = []
        if not self._idle_seconds and not self._pending_seconds:
            return stale
        for sid in [DEFAULT_SESSION_ID, *self._ask(self._registry.live.remote())]:
            if busy(sid):
                continue
            try:
                handle: Any = ray.get_actor(actor_name(sid), namespace=self._namespace)
                idle = float(ray.get(handle.idle_seconds.remote(), timeout=10))
                if self._pending_seconds and idle > self._pending_seconds:
                    ray.get(handle.call.remote("drop_pending", (f"unused for {idle:.0f} s (pending_graph_seconds)",), {}), timeout=10)
            except (ValueError, RayActorError, GetTimeoutError):
                continue  # lost (told to its next caller) or not answering: not idle
            if sid == DEFAULT_SESSION_ID or not self._idle_seconds:
                continue
            if idle > self._idle_seconds and self._ask(self._registry.expire.remote(sid, idle)):
                self._kill(sid)
                stale.append(sid)
                log.info("session %s expired after %.0f s idle", sid, idle)
        return stale

    def __len__(self) -> int:
        count: int = self._ask(self._registry.count.remote())
        return count

    # -- for RayEngine ------------------------------------------------------------------------------

    def wait(self, engine: RayEngine, ref: Any) -> Any:
        """The result of an actor call, or the domain error that tells what happened to it."""
        try:
            return ray.get(ref, timeout=self._timeout)
        except RayTaskError as exc:  # the engine raised: a domain error (or a bug, told as INTERNAL)
            raise _cause(exc) from None
        except ActorUnavailableError:  # not known dead yet: may be a passing network fault
            raise Unavailable(
                f"session {engine.session_id} cannot be reached now: the Ray node holding it does not answer "
                "(the call may or may not have run); try again shortly",
                "SESSION_UNREACHABLE",
            ) from None
        except RayActorError:  # the actor's process or node died (or the session was closed meanwhile)
            raise self._lost(engine.session_id, engine.actor_id) from None
        except GetTimeoutError:
            raise Unavailable(
                f"session {engine.session_id} did not answer within ray-timeout={self._timeout:g} s "
                "(the call may still be running)",
                "SESSION_TIMEOUT",
            ) from None

    def checkpointed(self, engine: RayEngine, path: str, step_count: int) -> None:
        """Tells the registry the session's latest checkpoint, named as the owner names it."""
        root = Path(self._checkpoint_dir, engine.owner) if engine.owner else Path(self._checkpoint_dir)
        try:
            name = str(Path(path).relative_to(root.resolve()))
        except ValueError:
            name = Path(path).name
        try:
            self._ask(self._registry.checkpointed.remote(engine.session_id, name, step_count))
        except Unavailable:  # the checkpoint is written; only the hint in a later SESSION_LOST is missing
            log.warning("could not record checkpoint %s of session %s in the registry", name, engine.session_id)

    # -- internals ----------------------------------------------------------------------------------

    def _start_default(self, model: ModelSpec) -> None:
        handle = self._actor.options(
            name=actor_name(DEFAULT_SESSION_ID), get_if_exists=True, **self._options
        ).remote()
        try:
            description, actor_id = self._build(handle, model, OptimizerSpec.tutorial(), keep_initial_state=True)
        except BaseException:
            ray.kill(handle)  # so that a front-end started with corrected settings builds it anew
            raise
        self._ask(self._registry.register_default.remote(actor_id))
        log.info("default session on %s (weights %s)", description.device, description.weights)

    def _build(
        self, handle: Any, model: ModelSpec, optimizer: OptimizerSpec, keep_initial_state: bool = False
    ) -> tuple[SessionDescription, str]:
        try:
            built: tuple[SessionDescription, str] = ray.get(
                handle.build.remote(model, optimizer, self._limits, keep_initial_state, self._session_memory_bytes),
                timeout=self._timeout,
            )
            return built
        except RayTaskError as exc:
            raise _cause(exc) from None
        except GetTimeoutError:
            raise ResourceExhausted(
                f"no node of the Ray cluster could start the session within {self._timeout:g} s: it asks for "
                f"{self._options['num_cpus']:g} CPU, {self._options['num_gpus']:g} GPU and {self._options['resources'] or 'no custom resources'}",
                "NO_RESOURCES_FOR_SESSION",
            ) from None
        except RayActorError:
            raise Unavailable("the session's actor died while it was being built", "SESSION_LOST") from None

    def _ask(self, ref: Any) -> Any:
        """The result of a registry call."""
        try:
            return ray.get(ref, timeout=REGISTRY_TIMEOUT)
        except RayTaskError as exc:
            raise _cause(exc) from None
        except (RayActorError, GetTimeoutError):
            raise Unavailable("the session registry of the Ray cluster does not answer", "REGISTRY_UNAVAILABLE") from None

    def _kill(self, session_id: str) -> None:
        with self._lock:
            self._cache.pop(session_id, None)
        try:
            ray.kill(ray.get_actor(actor_name(session_id), namespace=self._namespace))
        except ValueError:
            pass  # already gone

    def _lost(self, session_id: str, actor_id: str) -> Exception:
        """The error for a session whose actor calls fail: lost, or closed or expired meanwhile."""
        with self._lock:
            self._cache.pop(session_id, None)
        record = self._ask(self._registry.lost.remote(session_id, actor_id))
        if record is None or record.state == "expired":
            return self._missing(session_id, record.owner if record else "", record)
        if record.state == "live":  # a new actor took the name (the default session, re-created)
            return Unavailable(f"session {session_id} was restarted; call again", "SESSION_RESTARTED")
        return self._lost_error(session_id, record)

    def _lost_error(self, session_id: str, record: Record) -> Unavailable:
        if record.checkpoint:
            hint = (f"its last checkpoint is {record.checkpoint!r} (step {record.checkpoint_step}): create a session "
                    f"and LoadCheckpoint {record.checkpoint!r} to go on from there")
        else:
            hint = "it had no checkpoint (SaveCheckpoint, or the server's --checkpoint-every, makes them)"
        return Unavailable(
            f"session {session_id} was lost: the Ray node or process holding it died; {hint}",
            "SESSION_LOST",
            metadata={"checkpoint": record.checkpoint, "step_count": str(record.checkpoint_step)} if record.checkpoint else {},
        )

    @staticmethod
    def _missing(session_id: str, owner: str, record: Record | None) -> NotFound:
        """NOT_FOUND, as the local store says it: expired (told only to its owner) or unknown."""
        if record is not None and record.state == "expired" and record.owner == owner:
            return NotFound(f"session {session_id!r} expired after {record.idle_seconds:.0f} s without calls", "SESSION_EXPIRED")
        return NotFound(f"no session {session_id!r} (closed, or never created)", "SESSION_NOT_FOUND")
