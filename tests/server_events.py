"""Synchronising tests on the server's own log events: a log record as the sign that the server
reached a point, a hook that holds a model's forward there, and a clock the test moves instead of
sleeping.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

import torch

from remote_trainer.server.calls import current_call


class FakeClock:
    """The session store's clock, moved by the test instead of sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class LogWaiter(logging.Handler):
    """Sets an event when a log record's message contains ``text`` (a server-side sync point)."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.seen = threading.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.text in message:
            self.messages.append(message)
            self.seen.set()


@contextlib.contextmanager
def waiting_for(text: str, logger: str) -> Iterator[LogWaiter]:
    waiter = LogWaiter(text)
    target = logging.getLogger(logger)
    level = target.level
    target.addHandler(waiter)
    target.setLevel(logging.DEBUG)
    try:
        yield waiter
    finally:
        target.removeHandler(waiter)
        target.setLevel(level)


def blocking_forward(
    model: torch.nn.Module, until_abandoned: bool = False
) -> tuple[threading.Event, threading.Event, Callable[[], None]]:
    """A forward pre-hook on a server's model: ``entered`` is set when a forward starts, which then
    waits for ``release`` (and with ``until_abandoned`` also until the server has marked the call
    gone: a deadline passes on the server a little after it passes on the client, as the server
    counts from when the request arrived). Returns (entered, release, remove)."""
    entered, release = threading.Event(), threading.Event()

    def hook(module: torch.nn.Module, args: object) -> None:
        entered.set()
        assert release.wait(120)
        if until_abandoned:
            assert current_call().gone.wait(120)

    handle = model.register_forward_pre_hook(hook)
    return entered, release, handle.remove
