"""A session actor's own expiry: the backstop for a session that no front-end is left to expire.

Front-ends expire an idle session after ``--session-idle-seconds`` (``RaySessionStore.expire_idle``);
when every front-end of the deployment is gone, nothing would, and the detached actor would hold its
resources for good. So each session's actor (the default one aside) watches itself: after
``SELF_EXPIRY_FACTOR`` times the idle period without an engine call, and none running, it tells the
registry it expired (its owner then hears "expired", as from a front-end) and ends itself. It also
ends an actor whose front-end died before committing it, if the registry's housekeeping has not.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import ray

from remote_trainer.server.ray_backend.registry import REGISTRY_NAME

log = logging.getLogger(__name__)

# A session's actor ends itself after this many idle periods without a call (front-ends take one).
SELF_EXPIRY_FACTOR = 3


def watch(idle_seconds: Callable[[], float], expire_after: float) -> None:
    """Starts the watchdog of this actor (``expire_after`` 0: none, the session never expires)."""
    if expire_after > 0:
        threading.Thread(target=_watch, args=(idle_seconds, expire_after), name="session-watchdog", daemon=True).start()


def _watch(idle_seconds: Callable[[], float], expire_after: float) -> None:
    context = ray.get_runtime_context()
    session_id = (context.get_actor_name() or "").removeprefix("session-")
    waiting = threading.Event()  # never set: a timed wait between checks
    while (left := expire_after - idle_seconds()) > 0:
        waiting.wait(left + 0.1)
    idle = idle_seconds()
    try:
        registry = ray.get_actor(REGISTRY_NAME, namespace=context.namespace)
        ray.get(registry.expire.remote(session_id, idle), timeout=30)
    except Exception as exc:  # noqa: BLE001 - the actor ends anyway; the registry then finds it gone (lost)
        log.warning("session %s: could not tell the registry it expired: %s", session_id, exc)
    log.info("session %s ends itself after %.0f s without a call", session_id, idle)
    ray.kill(context.current_actor, no_restart=True)
