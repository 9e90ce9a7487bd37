"""The memory budget: big allocations are refused before they are made, from estimates from shapes.

Each session holds an estimate of what it keeps (weights, gradients, optimizer state, a pending
forward's graph); a call that is about to allocate more (a model, a new head, a forward's
activations, a snapshot of parameters) first asks ``use()``, which refuses with RESOURCE_EXHAUSTED
naming the limit when the session (``session_memory_bytes``) or the whole server on its device
(``memory_budget_bytes``) would go over. What a session holds beside its estimate (its shared-memory
regions) is checked and counted in one step by ``hold()``, until the session goes. Estimates, not
measurements: simple, explicit and made before anything is allocated. The figures are resnet18's,
measured on CPU (docs/deployment.md).
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

from remote_trainer.engine.errors import ResourceExhausted

if TYPE_CHECKING:  # torch only where a device is asked about: the Ray registry imports this without it
    import torch

# resnet18's parameters without its head (conv layers and BatchNorm), and its BatchNorm buffers.
BODY_PARAMETERS = 11_176_512
BUFFER_ELEMENTS = 9_620
HEAD_IN_FEATURES = 512
# Bytes per parameter held by a session: the float32 weight, its gradient and two optimizer slots
# (Adam's moments; SGD's momentum uses one).
BYTES_PER_PARAMETER = 4 * 4
# Bytes a forward allocates per image pixel (N x H x W), measured for resnet18 on CPU: a training
# forward keeps ~471 (its graph's saved activations, held until Backward); a no-grad one peaks at ~205.
GRAPH_BYTES_PER_PIXEL = 480
NO_GRAD_BYTES_PER_PIXEL = 210


def model_bytes(num_classes: int) -> int:
    """What a session on resnet18 with a ``num_classes`` head keeps."""
    return (BODY_PARAMETERS + (HEAD_IN_FEATURES + 1) * num_classes) * BYTES_PER_PARAMETER + BUFFER_ELEMENTS * 4


def head_bytes(num_classes: int) -> int:
    """What a ``num_classes`` head adds to a session (weights, gradient, optimizer state)."""
    return (HEAD_IN_FEATURES + 1) * num_classes * BYTES_PER_PARAMETER


def forward_bytes(batch: int, height: int, width: int, num_classes: int, keeps_graph: bool) -> int:
    """What a forward allocates: activations (kept when ``keeps_graph``) and its logits (three copies:
    on the device, their statistics, and the answer's)."""
    per_pixel = GRAPH_BYTES_PER_PIXEL if keeps_graph else NO_GRAD_BYTES_PER_PIXEL
    return batch * height * width * per_pixel + batch * num_classes * 4 * 3


def default_total_bytes(device: torch.device) -> int:
    """The server's budget when none is set: 80% of the machine's memory on CPU, 90% of the CUDA
    device's memory on a GPU."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.9)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.8)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def over_budget(what: str, extra: int, held: int, total: int) -> ResourceExhausted:
    """SERVER_MEMORY_BUDGET: ``what`` needs ``extra`` bytes more while the sessions hold ``held`` of
    ``total``; said alike by both backends (this process's budget, or the Ray registry's)."""
    return ResourceExhausted(
        f"{what} would need about {_gib(extra)} more, and the server's sessions hold about {_gib(held)} "
        f"({_gib(max(0, total - held))} free): over the limit memory_budget_bytes={total} ({_gib(total)})",
        "SERVER_MEMORY_BUDGET", metadata={"limit": str(total), "needed_bytes": str(extra), "held_bytes": str(held)},
    )


class MemoryBudget:
    """The memory of one device: a limit per session and one for all sessions together."""

    def __init__(self, total_bytes: int, session_bytes: int) -> None:
        self.total_bytes = total_bytes
        self.session_bytes = session_bytes
        self._lock = threading.Lock()
        # What each session keeps, and what calls are allocating now; an engine that is gone (closed,
        # expired, dropped) leaves by itself.
        self._kept: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()
        self._in_use: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()
        # What each session holds beside its own estimate (its shared-memory regions), until it goes.
        self._held: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()

    def keep(self, holder: object, size: int, graph: int = 0) -> None:
        """Records what ``holder`` keeps from now on: ``size`` bytes (a session's model state) and
        ``graph`` (its pending forward's graph)."""
        with self._lock:
            self._kept[holder] = size + graph

    def hold(self, holder: object, extra: int, what: str) -> None:
        """Checks ``extra`` bytes more for ``holder`` and, in the same step (no other check between),
        counts them as held beside its own estimate until ``holder`` goes or ``let_go`` gives them back."""
        with self._lock:
            self._check(holder, extra, what)
            self._held[holder] = self._held.get(holder, 0) + extra

    def let_go(self, holder: object, size: int) -> None:
        """Gives back ``size`` bytes that ``hold`` counted for ``holder``."""
        with self._lock:
            self._held[holder] = self._held.get(holder, 0) - size

    def check(self, holder: object, extra: int, what: str) -> None:
        """Refuses ``what`` when ``extra`` more bytes would take ``holder`` or the server over its limit."""
        with self._lock:
            self._check(holder, extra, what)

    def check_model(self, holder: object, extra: int, what: str) -> None:
        """``check`` for a new model state of a session (a new head, a checkpoint's model), whose size
        ``keep`` then records: here the same; a Ray session's actor checks the cluster's budget too
        (``ray_backend/registry.py``, ``ClusterBudget``)."""
        self.check(holder, extra, what)

    def _check(self, holder: object, extra: int, what: str) -> None:
        self._check_session(holder, extra, what)
        everyone = sum(self._kept.values()) + sum(self._in_use.values()) + sum(self._held.values())
        if everyone + extra > self.total_bytes:
            raise over_budget(what, extra, everyone, self.total_bytes)

    def _check_session(self, holder: object, extra: int, what: str) -> None:
        mine = self._kept.get(holder, 0) + self._in_use.get(holder, 0) + self._held.get(holder, 0)
        if mine + extra > self.session_bytes:
            raise ResourceExhausted(
                f"{what} would need about {_gib(extra)} more, and the session holds about {_gib(mine)}: over the limit "
                f"session_memory_bytes={self.session_bytes} ({_gib(self.session_bytes)})",
                "SESSION_MEMORY_BUDGET", metadata={"limit": str(self.session_bytes), "needed_bytes": str(extra)},
            )

    @contextlib.contextmanager
    def use(self, holder: object, extra: int, what: str) -> Iterator[None]:
        """Checks, then counts ``extra`` bytes against the limits while the block runs."""
        with self._lock:
            self._check(holder, extra, what)
            self._in_use[holder] = self._in_use.get(holder, 0) + extra
        try:
            yield
        finally:
            with self._lock:
                self._in_use[holder] = self._in_use.get(holder, 0) - extra


class Reservation:
    """Holds budget for something not built yet (a session being created)."""


UNLIMITED = MemoryBudget(2**62, 2**62)
