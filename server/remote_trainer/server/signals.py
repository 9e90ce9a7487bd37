"""SIGTERM and SIGINT, from the first moment of start-up to the end: always a graceful stop.

The handlers are installed before anything slow (torch's import, the model, the port): a signal
during start-up is kept, and the server stops as soon as it is up, instead of dying by the signal's
default action (no drain, exit -15) as it did when one came before the handlers of ``serve``.
Imports no torch.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from types import FrameType

log = logging.getLogger("remote_trainer.server.app")  # the graceful-stop lines keep their logger


class StopSignals:
    """Installed once, in the main thread (``install``); ``serving`` hands over how to stop the
    running server, which a signal received before or after then calls, with one log line."""

    def __init__(self) -> None:
        self.received: int | None = None  # the first signal's number
        self._stop: Callable[[], object] | None = None
        self._grace = 0.0
        self._announced = False

    def install(self) -> StopSignals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Python runs this in the main thread between two bytecodes, whichever thread the kernel chose.
        if self.received is None:
            self.received = signum
        if self._stop is not None:
            self._stop_now()
        elif logging.getLogger().handlers:  # logging is configured: say so now, not only once up
            log.info("received %s during start-up: stopping as soon as the server is up", signal.Signals(signum).name)

    def serving(self, stop: Callable[[], object], grace: float) -> None:
        """The server is up: ``stop`` stops it (now, when a signal came during start-up). The
        handlers are installed again: joining Ray (``ray.init``) puts in its own SIGTERM handler,
        which aborts the process (exit -6, no drain)."""
        self.install()
        self._grace = grace
        self._stop = stop
        if self.received is not None:
            self._stop_now()

    def _stop_now(self) -> None:
        if not self._announced and self.received is not None:
            self._announced = True
            log.info("received %s: shutting down (grace %.1fs)", signal.Signals(self.received).name, self._grace)
        assert self._stop is not None
        self._stop()
