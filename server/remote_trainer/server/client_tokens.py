"""CreateSession, CloseSession and DeleteCheckpoint by a client's token: a retry whose first answer
was lost is answered as the first call was, instead of making a second session (or failing a close
or a delete that worked).

``Once`` remembers the last ``KEEP`` tokens' answers in this process. A second call with a token whose
first call is still running waits for it (on a worker thread, at most ``WAIT`` seconds or its own
deadline, then UNAVAILABLE ``TOKEN_CALL_IN_PROGRESS``: try again) and then answers the same; a first
call that ended without an answer (an error) leaves the token free. The
record is the front-end's own: on the Ray backend a retry through another front-end is not seen
(docs/deployment.md).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from remote_trainer.engine.errors import Unavailable, invalid

T = TypeVar("T")

KEEP = 4096
MAX_TOKEN_CHARS = 128
WAIT = 30.0  # seconds a repeat waits for the first call with its token


class Once(Generic[T]):
    """The answers of calls made under a client's token, each made at most once (thread-safe)."""

    def __init__(self, keep: int = KEEP) -> None:
        self._lock = threading.Lock()
        self._answers: OrderedDict[tuple[str, str, str], T] = OrderedDict()
        self._running: dict[tuple[str, str, str], threading.Event] = {}
        self._keep = keep

    def run(self, owner: str, token: str, make: Callable[[], T], scope: str = "", wait: float | None = None) -> tuple[T, bool]:
        """``make()``'s answer and False; or, when ``owner`` gave ``token`` before (for the same
        ``scope``: the session a close names) and that call answered, its answer and True. An empty
        token: ``make()`` every time. ``wait``: the most seconds the caller may wait for a first call
        with its token that is still running (``WAIT`` at most)."""
        if not token:
            return make(), False
        if len(token) > MAX_TOKEN_CHARS:
            raise invalid("client_token", f"client_token has {len(token)} characters, more than {MAX_TOKEN_CHARS}",
                          "BAD_CLIENT_TOKEN")
        key = (owner, scope, token)
        while True:
            with self._lock:
                if key in self._answers:
                    return self._answers[key], True
                running = self._running.get(key)
                if running is None:
                    running = self._running[key] = threading.Event()
                    break
            # The first call with this token is still running: its answer will be ours.
            if not running.wait(min(WAIT, WAIT if wait is None else max(0.0, wait))):
                raise Unavailable("a call with this client_token is still running; try again shortly",
                                  "TOKEN_CALL_IN_PROGRESS")
        try:
            answer = make()
            with self._lock:
                self._answers[key] = answer
                while len(self._answers) > self._keep:
                    self._answers.popitem(last=False)
            return answer, False
        finally:
            with self._lock:
                del self._running[key]
            running.set()
