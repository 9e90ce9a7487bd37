"""``SessionRegistry``: the one actor that knows every session of the cluster.

A small detached actor on the head node that knows every session's owner, state (creating, live,
lost, expired), last checkpoint and estimated model size. Its methods run one at a time, so the
session limits (in all, and per token) and the memory budget (``--memory-budget-bytes``: the
estimates of the held sessions' models, ``engine/budget.py``) hold across the cluster without races;
it also remembers lost sessions, so that any front-end, even one started after the loss, answers
SESSION_LOST with the session's last checkpoint instead of "unknown session". It imports ray but
not torch (the head node may have none). A session's model that changes size (``ReplaceHead``,
``LoadCheckpoint``, ``ResetSession``) is checked against the budget and recounted here by the
session's actor, through ``ClusterBudget``, so that a session counts as a fresh one of its shape would.

It is no single point of failure: every change is written to the GCS key-value store (as Ray Serve's
controller keeps its state) before the call returns, and the actor restarts without limit
(``max_restarts=-1``), reading the table back; front-ends retry their calls while it restarts
(``RaySessionStore._ask``). A reservation whose front-end died before committing it is dropped after
its bound and the actor it may have started is killed (``housekeeping``).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.experimental import internal_kv

from remote_trainer.engine.budget import MemoryBudget, over_budget
from remote_trainer.engine.errors import Unavailable
from remote_trainer.server.session_policy import DEFAULT_SESSION_ID, REMEMBERED, Expired, SessionLimits

REGISTRY_NAME = "session-registry"
# A resource Ray gives the head node only: the registry lives there, with the GCS it cannot outlive.
HEAD_NODE_RESOURCE = "node:__internal_head__"

HELD = ("creating", "live")  # the states that count against the limits
TABLE_KEY = "sessions"  # the registry's table in the GCS key-value store, in a namespace of the deployment's
# Registry calls are small; a registry that does not answer within this (its restarts included) is
# reported unavailable.
REGISTRY_TIMEOUT = 30.0

# The package's logger: the log lines name the Ray backend, whichever of its modules writes them.
log = logging.getLogger(__package__)


def kv_namespace(namespace: str) -> str:
    """The GCS key-value namespace of the registry of Ray namespace ``namespace``."""
    return f"remote-trainer:{namespace}"


def actor_name(session_id: str) -> str:
    """The Ray actor name of a session."""
    return f"session-{session_id}"


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
    stale_at: float = 0.0  # time.time() after which a "creating" reservation is abandoned
    model_bytes: int = 0  # what its model keeps, estimated (engine/budget.py): its share of the memory budget

    def expiry(self) -> Expired | None:
        """How the session expired, if it did (for ``session_policy.missing``)."""
        return Expired(self.owner, self.idle_seconds) if self.state == "expired" else None


class SessionRegistry:
    """Every session of the namespace: owner, state, last checkpoint. One call at a time (a plain
    Ray actor), so checking a limit and reserving an id are one step for the whole cluster."""

    def __init__(self, namespace: str, memory_budget_bytes: int = 0) -> None:
        """``memory_budget_bytes``: the first front-end's ``--memory-budget-bytes`` (a restart gets it
        again: Ray calls this with the same arguments); 0, the cluster's ``memory`` resource."""
        self._namespace = namespace
        self._memory_budget_bytes = memory_budget_bytes
        self._kv_namespace = kv_namespace(namespace)
        stored = internal_kv._internal_kv_get(TABLE_KEY, namespace=self._kv_namespace)  # a restart: the table back
        self._saved = stored.decode() if stored else ""
        self._records: dict[str, Record] = {
            sid: Record(**fields) for sid, fields in json.loads(stored).items()
        } if stored else {}

    def memory_budget(self) -> int:
        """The budget as set (0: the cluster's ``memory`` resource), for front-ends to agree on."""
        return self._memory_budget_bytes

    def reserve(self, owner: str, limits: SessionLimits, stale_after: float, model_bytes: int) -> tuple[str, int]:
        """A new session id for ``owner`` within the memory budget (first, as the local backend checks
        it) and the limits, held as "creating" until ``commit``, or abandoned ``stale_after`` seconds
        from now; and the bytes of the budget that were free for it (its actor's own budget)."""
        self._prune()
        total, held = self._total(), self._held("")
        if held + model_bytes > total:
            raise over_budget("a new session", model_bytes, held, total)
        limits.check_room("cluster", [(sid, r.owner) for sid, r in self._records.items() if r.state in HELD], owner)
        session_id = secrets.token_hex(16)  # unguessable: 128 random bits
        now = time.time()
        self._records[session_id] = Record(owner, "creating", now, stale_at=now + stale_after, model_bytes=model_bytes)
        self._save()
        return session_id, total - held

    def grow(self, session_id: str, extra: int, what: str) -> int:
        """Refuses ``what`` (a new model state of ``session_id``: a head, a checkpoint's model) when
        ``extra`` more bytes would take the held sessions over the budget, as the local backend checks
        it (the session's present model counted, since it lives while the new one is built); else the
        bytes the other held sessions leave free for ``session_id``. It reserves nothing: the new size
        is ``resized`` once made, as the local backend's ``MemoryBudget.keep``."""
        total, held = self._total(), self._held("")
        if held + extra > total:
            raise over_budget(what, extra, held, total)
        return self.room(session_id)

    def resized(self, session_id: str, actor_id: str, model_bytes: int) -> None:
        """The model of ``session_id`` (held by actor ``actor_id``) now keeps ``model_bytes``."""
        record = self._records.get(session_id)
        if record is not None and record.state in HELD and record.actor_id == actor_id:
            record.model_bytes = model_bytes
            self._save()

    def room(self, session_id: str) -> int:
        """The bytes of the memory budget that the held sessions but ``session_id`` leave free."""
        return self._total() - self._held(session_id)

    def _held(self, but: str) -> int:
        return sum(r.model_bytes for sid, r in self._records.items() if r.state in HELD and sid != but)

    def _total(self) -> int:
        if self._memory_budget_bytes:
            return self._memory_budget_bytes
        # Ray's memory for tasks and actors on the nodes alive now (what each had available when it
        # started, less its object store): a node that joins adds its memory.
        return int(ray.cluster_resources().get("memory", 0))  # type: ignore[no-untyped-call]

    def commit(self, session_id: str, actor_id: str, model_bytes: int) -> bool:
        """Makes a reservation live, with its model's size as built; False when it is no longer held
        (abandoned: its actor is killed)."""
        record = self._records.get(session_id)
        if record is None or record.state != "creating":
            return False
        record.state, record.since, record.actor_id, record.model_bytes = "live", time.time(), actor_id, model_bytes
        self._save()
        return True

    def abort(self, session_id: str) -> None:
        if self._records.pop(session_id, None) is not None:
            self._save()

    def register_default(self, actor_id: str, model_bytes: int) -> None:
        """The default session's actor (created by whichever front-end started first, or re-created).
        It is not refused for the budget (nor on the local backend): the server needs it."""
        self._records[DEFAULT_SESSION_ID] = Record("", "live", time.time(), actor_id, model_bytes=model_bytes)
        self._save()

    def lookup(self, session_id: str) -> Record | None:
        return self._records.get(session_id)

    def lost(self, session_id: str, actor_id: str) -> Record | None:
        """Marks the session lost if ``actor_id`` (whose calls failed) is still its actor; its record."""
        record = self._records.get(session_id)
        if record is not None and record.state == "live" and record.actor_id == actor_id:
            record.state, record.since = "lost", time.time()
            self._forget_old()
            self._save()
        return record

    def checkpointed(self, session_id: str, name: str, step_count: int) -> None:
        record = self._records.get(session_id)
        if record is not None:
            record.checkpoint, record.checkpoint_step = name, step_count
            self._save()

    def checkpoint_deleted(self, owner: str, name: str) -> None:
        """``owner`` deleted checkpoint ``name``: no record of theirs names it as its last one."""
        for record in self._records.values():
            if record.owner == owner and record.checkpoint == name:
                record.checkpoint, record.checkpoint_step = "", 0
        self._save()

    def close(self, session_id: str, owner: str) -> Record | None:
        """Forgets a live or lost session of ``owner``; its record, or None when there is none to close."""
        record = self._records.get(session_id)
        if record is None or record.owner != owner or record.state not in ("live", "lost"):
            return None
        record = self._records.pop(session_id)
        self._save()
        return record

    def expire(self, session_id: str, idle_seconds: float) -> bool:
        """Marks a live session expired; False when it is no longer live (closed, lost, expired)."""
        record = self._records.get(session_id)
        if record is None or record.state != "live" or session_id == DEFAULT_SESSION_ID:
            return False
        record.state, record.since, record.idle_seconds = "expired", time.time(), idle_seconds
        self._forget_old()
        self._save()
        return True

    def live(self) -> list[str]:
        """The live sessions but the default one."""
        return [sid for sid, r in self._records.items() if r.state == "live" and sid != DEFAULT_SESSION_ID]

    def owned(self, owner: str) -> list[str]:
        """The live and lost sessions of ``owner`` but the default one, in creation order (a lost
        session stays listed, as lost, until it is closed)."""
        return [sid for sid, r in self._records.items()
                if r.state in ("live", "lost") and r.owner == owner and sid != DEFAULT_SESSION_ID]

    def count(self) -> int:
        """Sessions held (live or being created), the default one included."""
        return sum(1 for r in self._records.values() if r.state in HELD)

    def housekeeping(self) -> list[str]:
        """Drops the abandoned reservations and kills their actors; the ids of those it dropped."""
        return self._prune()

    def _prune(self) -> list[str]:
        """Lost sessions that no front-end has called yet stop counting; abandoned reservations go,
        with the actor their front-end may have started before it died (else it would hold its
        resources for good, unreachable); the ids of those dropped."""
        now = time.time()
        dropped: list[str] = []
        for sid, record in list(self._records.items()):
            if record.state == "creating" and now > record.stale_at:
                del self._records[sid]  # its front-end died while creating it
                dropped.append(sid)
                try:
                    ray.kill(ray.get_actor(actor_name(sid), namespace=self._namespace), no_restart=True)
                except ValueError:
                    pass  # it never started one
            elif record.state == "live":
                try:
                    ray.get_actor(actor_name(sid), namespace=self._namespace)
                except ValueError:  # the cluster no longer has the actor: its process or node died
                    record.state, record.since = "lost", now
        self._forget_old()
        self._save()
        return dropped

    def _forget_old(self) -> None:
        gone = sorted((r.since, sid) for sid, r in self._records.items() if r.state in ("lost", "expired"))
        for _, sid in gone[: max(0, len(gone) - REMEMBERED)]:
            del self._records[sid]

    def _save(self) -> None:
        """The whole table to the GCS (small: the held sessions and the last few lost or expired)."""
        table = json.dumps({sid: asdict(record) for sid, record in self._records.items()})
        if table != self._saved:  # housekeeping mostly changes nothing
            internal_kv._internal_kv_put(TABLE_KEY, table, overwrite=True, namespace=self._kv_namespace)
            self._saved = table


def cause(exc: RayTaskError) -> BaseException:
    """The exception an actor raised (a domain error with all its fields), or the wrapper itself."""
    raised = getattr(exc, "cause", None)
    return raised if isinstance(raised, BaseException) else exc


def ask(registry: Any, method: str, *args: Any) -> Any:
    """The result of registry call ``method(*args)``. A call that the registry's death cut off is
    sent again (a new call waits while the registry restarts), within ``REGISTRY_TIMEOUT`` in all:
    a reservation made twice that way is dropped as abandoned. A domain error the registry raised is
    raised as is."""
    deadline = time.monotonic() + REGISTRY_TIMEOUT
    while True:
        try:
            return ray.get(getattr(registry, method).remote(*args), timeout=max(0.0, deadline - time.monotonic()))
        except RayTaskError as exc:
            raise cause(exc) from None
        except RayActorError:
            if time.monotonic() < deadline:
                log.info("the session registry restarts; %s is sent again", method)
                time.sleep(0.1)  # a dead registry answers at once: do not spin while it restarts
                continue
        except GetTimeoutError:
            pass
        raise Unavailable("the session registry of the Ray cluster does not answer", "REGISTRY_UNAVAILABLE")


class ClusterBudget(MemoryBudget):
    """The budget a session's actor gives its engine. The session's calls count against its own
    process: the session's limit, and a total of what the cluster's budget leaves the session within
    ``node_bytes`` (most of the node's memory). A new model state (``check_model``: a new head, a
    checkpoint's model) is checked against the cluster's budget, the registry's, as the local
    backend checks it against its process's, and its size once made (``keep``) is recorded there:
    the registry counts the session as a fresh session of its shape, and frees that when it closes."""

    def __init__(self, node_bytes: int, session_bytes: int, room: int, registry: Any, session_id: str, actor_id: str) -> None:
        """``room``: what the cluster's budget had free for the session when it was reserved (0: not known)."""
        super().__init__(min(node_bytes, room) if room else node_bytes, session_bytes)
        self._node_bytes = node_bytes
        self._registry = registry
        self._session_id = session_id
        self._actor_id = actor_id
        self._model: int | None = None  # the size the registry has for the model (the store records the first)

    def check_model(self, holder: object, extra: int, what: str) -> None:
        with self._lock:
            self._check_session(holder, extra, what)
        room: int = ask(self._registry, "grow", self._session_id, extra, what)
        with self._lock:  # what the cluster's budget leaves the session now bounds its calls from here on
            self.total_bytes = min(self._node_bytes, room)

    def keep(self, holder: object, size: int, graph: int = 0) -> None:
        if self._model is not None and size != self._model:
            try:
                ask(self._registry, "resized", self._session_id, self._actor_id, size)
            except Unavailable:  # the session has changed: the call is not failed for its count
                log.warning("the registry could not be told the new size of session %s; it counts the old one", self._session_id)
        self._model = size
        super().keep(holder, size, graph)
