"""``RaySessionStore``: the front-end's ``Sessions``, with every session in a Ray actor.

Each call on a session is ``actor.call.remote(...)`` (through the proxy, ``proxy.RayEngine``), waited
for until the call's own deadline or ``--ray-timeout``, whichever comes first; a call whose client
goes away (or whose deadline passes) stops waiting at once and cancels the actor's task, which then
commits nothing (``actor.Wanted``), so a SIGTERM's grace is never outlived by a call on an actor. A session whose process or node died answers UNAVAILABLE
``SESSION_LOST`` (naming its last checkpoint); a node that does not answer yet, UNAVAILABLE
``SESSION_UNREACHABLE``; a call over the timeout, UNAVAILABLE ``SESSION_TIMEOUT``. Domain errors
raised in the actor arrive wrapped in ``RayTaskError``; their ``cause`` (with reason, violations and
metadata) is raised as is. Owners, states and checkpoints are the registry's (``registry.py``); the
limits, ownership and NOT_FOUND answers are ``session_policy.py``'s, as for the local store.

Residual races (documented in docs/deployment.md): a session whose node just died still counts
against the limits until the cluster declares the node dead (seconds, with Ray's health checks), and
a call that arrives while idle expiry closes its session may run or not before the actor is killed.
The registry lives on the head node: losing the head loses the cluster (Ray's GCS) anyway; a lost
registry actor restarts and reads its table back from the GCS, and registry calls are retried
while it does (``_ask``). A lost default session is made again by the next call that needs it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError, TaskCancelledError

from remote_trainer.engine import checkpoints, portable
from remote_trainer.engine.budget import model_bytes
from remote_trainer.engine.errors import Abandoned, FailedPrecondition, NotFound, ResourceExhausted, Unavailable
from remote_trainer.engine.limits import Limits
from remote_trainer.engine.models import ModelSpec
from remote_trainer.engine.optimizer import OptimizerSpec
from remote_trainer.engine.protocol import Engine
from remote_trainer.engine.results import SessionDescription
from remote_trainer.server.ray_backend.access import check_access
from remote_trainer.server.calls import Call, current_call
from remote_trainer.server.ray_backend.actor import SessionActor
from remote_trainer.server.ray_backend.lost import Described, lost_description, lost_error
from remote_trainer.server.ray_backend.proxy import RayEngine, Request, check_wanted
from remote_trainer.server.ray_backend.registry import HEAD_NODE_RESOURCE, REGISTRY_NAME, Record, SessionRegistry, actor_name, ask, cause
from remote_trainer.server.ray_backend.watchdog import SELF_EXPIRY_FACTOR
from remote_trainer.server.session_policy import DEFAULT_SESSION_ID, SessionLimits, check_closable, may_use, missing
from remote_trainer.server.settings import LOCAL_RAY_NAMESPACE, Settings, ray_resources

# The package's logger: the log lines name the Ray backend, whichever of its modules writes them.
log = logging.getLogger(__package__)

# How often a call waiting on an actor looks whether its client went away (Call.gone has no callback).
GONE_POLL = 0.1
# A CreateSession that finds no room answers this long before its deadline, so its client hears why.
ANSWER_MARGIN = 0.5
# Housekeeping's questions to a session's actor; one busy with a call that long is not idle.
HOUSEKEEPING_TIMEOUT = 10.0


def _sized_for_own_ray(settings: Settings) -> Settings:
    """On a Ray this server started itself (as many CPUs and GPUs as the machine), each session
    reserves at most its share, so that it holds ``--max-sessions`` as the local backend would. The
    share is Ray's accounting only: each session still computes with as many torch threads as a
    local session (``RaySessionStore.connect``)."""
    total: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
    cpus = min(settings.ray_num_cpus, math.floor(total.get("CPU", 0.0) / settings.max_sessions * 1e4) / 1e4)
    gpus = min(settings.ray_num_gpus, math.floor(total.get("GPU", 0.0) / settings.max_sessions * 1e4) / 1e4)
    if (cpus, gpus) != (settings.ray_num_cpus, settings.ray_num_gpus):
        log.info("each session reserves %g CPU and %g GPU of this server's own Ray (room for max-sessions=%d)",
                 cpus, gpus, settings.max_sessions)
    return replace(settings, ray_num_cpus=cpus, ray_num_gpus=gpus)


class RaySessionStore:
    """The front-end's view of the sessions in the Ray cluster (the ``Sessions`` protocol).

    It keeps nothing that another front-end would need: owners, states and checkpoints are in the
    registry, sessions in their actors. It caches actor handles (a session's owner never changes).
    """

    in_process = False  # every session is a Ray actor: finding and describing one are remote calls

    def __init__(
        self, settings: Settings, limits: Limits, registry: Any, default_model: ModelSpec, torch_threads: int = 0
    ) -> None:
        """``torch_threads`` > 0: each session's actor computes with that many torch threads (else
        Ray's: as many as the CPUs it reserves, at least one)."""
        self._default_model = default_model
        self._torch_threads = torch_threads
        self._namespace = settings.ray_namespace
        self._limits = limits
        self._session_limits = SessionLimits(settings.max_sessions, settings.max_sessions_per_token)
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
        settings = replace(settings, ray_namespace=settings.ray_namespace or LOCAL_RAY_NAMESPACE)
        # On a Ray of its own, sessions compute as the local backend's do: with this process's torch
        # threads (torch's default for the machine), not one thread for a fractional CPU share; the
        # numbers are then the local backend's to the last bit, not 1e-4 apart.
        torch_threads = 0 if settings.ray_address else torch.get_num_threads()
        if not ray.is_initialized():
            if settings.ray_address:
                check_access(settings.ray_address)
                ray.init(address=settings.ray_address, namespace=settings.ray_namespace,
                         log_to_driver=False, logging_level=logging.WARNING)
            else:  # a one-node Ray for this front-end alone, on loopback
                # "local", not None: ray.init() without an address joins the cluster in RAY_ADDRESS or
                # the last one started on this machine (/tmp/ray/ray_current_cluster, which any
                # ``ray start`` or test cluster writes), and this server's sessions would live and die
                # with someone else's cluster.
                ray.init(address="local", namespace=settings.ray_namespace, include_dashboard=False, _node_ip_address="127.0.0.1",
                         log_to_driver=False, logging_level=logging.WARNING)
                settings = _sized_for_own_ray(settings)
        registry_class: Any = ray.remote(SessionRegistry)
        registry = registry_class.options(
            name=REGISTRY_NAME, namespace=settings.ray_namespace, lifetime="detached", get_if_exists=True,
            num_cpus=0, resources={HEAD_NODE_RESOURCE: 0.001},
            max_restarts=-1,  # restarts without limit, its table read back from the GCS (registry.py)
        ).remote(settings.ray_namespace, settings.memory_budget_bytes)
        store = cls(settings, limits, registry, default_model, torch_threads)
        store._agree_on_budget(settings.memory_budget_bytes)
        store._start_default()
        log.info("joined Ray cluster %s (namespace %s)", settings.ray_address or "(local)", settings.ray_namespace)
        return store

    @property
    def idle_seconds(self) -> float:
        return self._idle_seconds

    # -- the Sessions protocol ----------------------------------------------------------------------

    def visible_to(self, owner: str = "") -> list[tuple[str, Engine]]:
        """The sessions ``owner`` may use, from any front-end: the default session first, then its
        own; a lost one as lost (its description says so)."""
        owned: list[str] = self._ask("owned", owner)
        visible: list[tuple[str, Engine]] = []
        for sid in [DEFAULT_SESSION_ID, *owned]:
            try:
                visible.append((sid, self._described(sid, owner)))
            except NotFound:
                continue  # closed or expired meanwhile
        return visible

    def _described(self, sid: str, owner: str) -> Engine:
        """The session as listed, described now; a lost one as lost (a lost default session is made
        again by ``get`` or ``_lost``: the second try describes the new one)."""
        for _ in range(2):
            try:
                engine = self.get(sid, owner)
                return Described(self, sid, engine.owner, engine._handle, engine.actor_id, engine.describe())
            except Unavailable as exc:
                if exc.reason not in ("SESSION_LOST", "SESSION_RESTARTED"):
                    raise
                if sid != DEFAULT_SESSION_ID:
                    break
        record = self._ask("lookup", sid)
        if record is None or record.state != "lost":
            raise self._missing(sid, owner, record)
        return Described(self, sid, record.owner, None, record.actor_id, lost_description(record))

    def get(self, session_id: str, owner: str = "") -> RayEngine:
        sid = session_id or DEFAULT_SESSION_ID
        with self._lock:
            engine = self._cache.get(sid)
        if engine is not None:
            if may_use(sid, engine.owner, owner):
                return engine
            raise self._missing(session_id, owner, None)
        record = self._ask("lookup", sid)
        if sid == DEFAULT_SESSION_ID and (record is None or record.state == "lost" or not self._exists(sid)):
            self._start_default()  # the default session was lost: the call that needs it makes it again, fresh
            record = self._ask("lookup", sid)
        if record is None or not may_use(sid, record.owner, owner) or record.state not in ("live", "lost"):
            raise self._missing(session_id, owner, record)
        if record.state == "lost":
            raise lost_error(sid, record)
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
        # Not committed within twice the build's bound, the reservation is abandoned (its actor killed).
        # The memory budget's share: the local backend's estimate (the weights' own head counted as 1000 classes).
        reserved: tuple[str, int] = self._ask("reserve", owner, self._session_limits, 2 * self._timeout,
                                              model_bytes(model.num_classes or 1000))
        sid, room = reserved
        handle = None
        try:
            handle = self._actor.options(name=actor_name(sid), **self._options).remote()
            log.info("session %s reserved; its actor is starting", sid)
            description, actor_id = self._build(handle, sid, model, optimizer, expire_after=SELF_EXPIRY_FACTOR * self._idle_seconds,
                                                memory_bytes=room)
            check_wanted(still_wanted, "the session was built but dropped")  # no one could use or close it
            if not self._ask("commit", sid, actor_id, model_bytes(description.num_classes)):
                raise Unavailable(f"session {sid} took longer than twice ray-timeout to start and was given up; "
                                  "create it again", "SESSION_ABANDONED")
        except BaseException:
            if handle is not None:
                ray.kill(handle)
            try:
                self._ask("abort", sid)
            except Unavailable:
                log.warning("could not release the reservation of session %s (the registry drops it later)", sid)
            raise
        engine = RayEngine(self, sid, owner, handle, actor_id)
        with self._lock:
            self._cache[sid] = engine
        log.info("session %s created (owner %s) on %s", sid, owner or "-", description.device)
        return sid, engine

    def close(self, session_id: str, owner: str = "") -> None:
        check_closable(session_id)
        record = self._ask("close", session_id, owner)
        if record is None:
            raise self._missing(session_id, owner, self._ask("lookup", session_id))
        self._kill(session_id)
        log.info("session %s closed", session_id)

    @property
    def pending_seconds(self) -> float:
        return self._pending_seconds

    def expire_idle(self, busy: Callable[[str], bool] = lambda sid: False) -> list[str]:
        """Closes the sessions whose actors had no call for ``idle_seconds`` (a session with a call
        running or waiting on this front-end is not idle), and drops pending graphs unused for
        ``pending_seconds``. An actor busy with a call does not answer within 10 s: not idle either.
        First the registry drops the reservations of front-ends that died creating a session, and kills
        the actors they started."""
        stale: list[str] = []
        try:  # this runs on the expiry thread: a registry that does not answer now is asked next time
            for sid in self._ask("housekeeping"):
                log.info("session %s was never committed (its front-end died creating it): reservation and actor dropped", sid)
            live: list[str] = self._ask("live") if self._idle_seconds or self._pending_seconds else []
        except Unavailable as exc:
            log.warning("housekeeping skipped: %s", exc.message)
            return stale
        if not self._idle_seconds and not self._pending_seconds:
            return stale
        for sid in [DEFAULT_SESSION_ID, *live]:
            if busy(sid):
                continue
            try:
                handle: Any = ray.get_actor(actor_name(sid), namespace=self._namespace)
                idle = float(self._await(handle.idle_seconds.remote(), Call(), HOUSEKEEPING_TIMEOUT))
                if self._pending_seconds and idle > self._pending_seconds:
                    request: Request = ("drop_pending", (f"unused for {idle:.0f} s (pending_graph_seconds)",), {}, None)
                    self._await(handle.call.remote(portable.seal(request)), Call(), HOUSEKEEPING_TIMEOUT)
            except (ValueError, RayActorError, GetTimeoutError):
                continue  # lost (told to its next caller) or not answering: not idle
            if sid == DEFAULT_SESSION_ID or not self._idle_seconds:
                continue
            if idle > self._idle_seconds and self._ask("expire", sid, idle):
                self._kill(sid)
                stale.append(sid)
                log.info("session %s expired after %.0f s idle", sid, idle)
        return stale

    def __len__(self) -> int:
        count: int = self._ask("count")
        return count

    # -- for RayEngine ------------------------------------------------------------------------------

    def wait(self, engine: RayEngine, ref: Any) -> Any:
        """The result of an actor call, or the domain error that tells what happened to it."""
        try:
            return self._await(ref, current_call())
        except RayTaskError as exc:  # the engine raised: a domain error (or a bug, told as INTERNAL)
            raise cause(exc) from None
        except ActorUnavailableError:  # not known dead yet: may be a passing network fault
            raise Unavailable(
                f"session {engine.session_id} cannot be reached now: the Ray node holding it does not answer "
                "(the call may or may not have run); try again shortly",
                "SESSION_UNREACHABLE",
            ) from None
        except RayActorError:  # the actor's process or node died (or the session was closed meanwhile)
            raise self._lost(engine.session_id, engine.actor_id) from None
        except TaskCancelledError:
            raise Abandoned(f"a call on session {engine.session_id} was cancelled: its caller stopped waiting", "CANCELLED") from None
        except GetTimeoutError:
            raise Unavailable(
                f"session {engine.session_id} did not answer within ray-timeout={self._timeout:g} s "
                "(the call may still be running)",
                "SESSION_TIMEOUT",
            ) from None

    def checkpointed(self, engine: RayEngine, path: str, step_count: int) -> None:
        """Tells the registry the session's latest checkpoint, named as the owner names it."""
        name = self._checkpoint_name(engine.owner, path)
        try:
            self._ask("checkpointed", engine.session_id, name, step_count)
        except Unavailable:  # the checkpoint is written; only the hint in a later SESSION_LOST is missing
            log.warning("could not record checkpoint %s of session %s in the registry", name, engine.session_id)

    def checkpoint_deleted(self, owner: str, path: str) -> None:
        """The registry forgets the deleted checkpoint as any of ``owner``'s sessions' last one, so a
        SESSION_LOST no longer names a file that is gone."""
        name = self._checkpoint_name(owner, path)
        try:
            self._ask("checkpoint_deleted", owner, name)
        except Unavailable:  # the file is gone; only a later SESSION_LOST may still name it
            log.warning("could not tell the registry that checkpoint %s of %r was deleted", name, owner)

    def _checkpoint_name(self, owner: str, path: str) -> str:
        """A checkpoint file's name as its owner names it (relative to their folder)."""
        try:
            return str(Path(path).relative_to(checkpoints.owner_folder(self._checkpoint_dir, owner).resolve()))
        except ValueError:
            return Path(path).name

    # -- internals ----------------------------------------------------------------------------------

    def _start_default(self) -> None:
        """Finds the default session's actor, or starts and builds it (the first front-end, or after a loss)."""
        handle = self._actor.options(
            name=actor_name(DEFAULT_SESSION_ID), get_if_exists=True, **self._options
        ).remote()
        try:
            description, actor_id = self._build(handle, DEFAULT_SESSION_ID, self._default_model, OptimizerSpec.tutorial(), keep_initial_state=True,
                                                memory_bytes=self._ask("room", DEFAULT_SESSION_ID))
        except BaseException:
            ray.kill(handle)  # so that a front-end started with corrected settings builds it anew
            raise
        self._ask("register_default", actor_id, model_bytes(description.num_classes))
        log.info("default session on %s (weights %s)", description.device, description.weights)

    def _agree_on_budget(self, memory_budget_bytes: int) -> None:
        """The memory budget is the registry's, set by the namespace's first front-end: one started
        with another ``--memory-budget-bytes`` would promise what the cluster does not hold to."""
        theirs: int = self._ask("memory_budget")
        if theirs != memory_budget_bytes:
            raise FailedPrecondition(
                f"this front-end has memory-budget-bytes={memory_budget_bytes}, but the Ray namespace {self._namespace!r} "
                f"already has memory-budget-bytes={theirs} (its first front-end's; 0: the cluster's memory): every "
                "front-end of a namespace must be started with the same value",
                "MEMORY_BUDGET_MISMATCH",
            )

    def _build(
        self, handle: Any, session_id: str, model: ModelSpec, optimizer: OptimizerSpec, keep_initial_state: bool = False,
        expire_after: float = 0.0, memory_bytes: int = 0,
    ) -> tuple[SessionDescription, str]:
        """Builds session ``session_id`` in its actor, whose memory budget is ``memory_bytes`` (what the
        cluster's budget had free for it) at most."""
        call, started = current_call(), time.monotonic()
        ref = handle.build.remote(self._registry, session_id, model, optimizer, self._limits, keep_initial_state, self._session_memory_bytes,
                                  expire_after, memory_bytes, self._torch_threads)
        try:
            try:
                built: tuple[SessionDescription, str] = self._await(ref, call, margin=ANSWER_MARGIN)
            except GetTimeoutError:
                # Short of the deadline (or at ray-timeout): refused while the client can hear why,
                # unless the cluster has room (the actor is placed and still building: wait the rest).
                free: dict[str, float] = ray.available_resources()  # type: ignore[no-untyped-call]
                if not self._fits(free) or time.monotonic() - started >= self._timeout:
                    raise self._no_room(free, time.monotonic() - started) from None
                built = self._await(ref, call)
            return built
        except RayTaskError as exc:
            raise cause(exc) from None
        except RayActorError:
            raise Unavailable("the session's actor died while it was being built", "SESSION_LOST") from None

    def _await(self, ref: Any, call: Call, timeout: float | None = None, margin: float = 0.0) -> Any:
        """``ray.get(ref)`` within ``timeout`` (default ``--ray-timeout``; else ``GetTimeoutError``) and the
        call's deadline less ``margin``. When the client goes away or its deadline passes, or at the
        timeout, the task is cancelled (one not started never runs; a running one sees it,
        ``actor.Wanted``) and ``Abandoned`` or ``GetTimeoutError`` raised; at the margin,
        ``GetTimeoutError`` alone. Every wait on a session's actor is this one."""
        give_up = time.monotonic() + (self._timeout if timeout is None else timeout)
        while True:
            now = time.monotonic()
            end = give_up if call.deadline is None else min(give_up, call.deadline - margin)
            ready, _ = ray.wait([ref], timeout=max(0.0, min(end - now, GONE_POLL)))
            if ready:
                return ray.get(ref)
            outcome, now = call.outcome(), time.monotonic()
            if outcome is not None or now >= give_up:
                ray.cancel(ref)
                if outcome is not None:
                    raise Abandoned("the call on the session was dropped: its caller stopped waiting", outcome)
            if now >= end:
                raise GetTimeoutError()

    def _asked(self) -> dict[str, float]:
        """What each session's actor reserves (the resources it asks for that are not 0)."""
        asked = {"CPU": self._options["num_cpus"], "GPU": self._options["num_gpus"], **self._options["resources"]}
        return {name: float(amount) for name, amount in asked.items() if amount}

    def _fits(self, free: dict[str, float]) -> bool:
        """Whether ``free`` (the whole cluster's: one node may still lack it) holds one more session."""
        return all(free.get(name, 0.0) >= amount for name, amount in self._asked().items())

    def _no_room(self, free: dict[str, float], waited: float) -> ResourceExhausted:
        """NO_RESOURCES_FOR_SESSION, saying what a session asks for and what the cluster has free."""
        asked = self._asked()
        show = ", ".join(f"{name} {free.get(name, 0.0):g}" for name in asked)
        wants = ", ".join(f"{name} {amount:g}" for name, amount in asked.items()) or "nothing"
        return ResourceExhausted(
            f"no node of the Ray cluster had room for the session (it asks for {wants}; free in the whole cluster now: "
            f"{show or 'n/a'}), waited {waited:.1f} s; close a session or add a node",
            "NO_RESOURCES_FOR_SESSION",
            metadata={"free_" + name: f"{free.get(name, 0.0):g}" for name in asked},
        )

    def _ask(self, method: str, *args: Any) -> Any:
        """The result of registry call ``method(*args)`` (``registry.ask``: retried while it restarts)."""
        return ask(self._registry, method, *args)

    def _exists(self, session_id: str) -> bool:
        try:
            ray.get_actor(actor_name(session_id), namespace=self._namespace)
            return True
        except ValueError:
            return False

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
        record = self._ask("lost", session_id, actor_id)
        if record is None or record.state == "expired":
            return self._missing(session_id, record.owner if record else "", record)
        if record.state == "live":  # a new actor took the name (the default session, re-created)
            return Unavailable(f"session {session_id} was restarted; call again", "SESSION_RESTARTED")
        if session_id == DEFAULT_SESSION_ID:  # lost: made again, fresh, for this call's retry
            self._start_default()
            return Unavailable("the default session was lost and is started again, fresh; call again", "SESSION_RESTARTED")
        return lost_error(session_id, record)

    @staticmethod
    def _missing(session_id: str, owner: str, record: Record | None) -> NotFound:
        """NOT_FOUND, as the local store says it: expired (told only to its owner) or unknown."""
        return missing(session_id, owner, record.expiry() if record is not None else None)
