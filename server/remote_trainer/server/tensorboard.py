"""TensorBoard event files of every session's training (``--tensorboard-dir``).

One run per session (``DIR/SESSION_ID``, the default session's is ``DIR/default``), so
``tensorboard --logdir DIR`` shows the sessions side by side. Written as the calls happen, with
``torch.utils.tensorboard`` (the ``tensorboard`` package, the server's optional
``tensorboard`` extra). The x axis is the session's step count when the value was made:

- ``loss`` and ``grad_norm``: from each Backward with a server-computed loss (grad_norm from every Backward that computes it);
- ``lr``: the optimizer's learning rate, at each Step;
- ``step_seconds``: wall time of the training iteration a Step ends, from the first Forward after the
  previous Step to the end of this one (so it includes the client's time between calls);
- ``grad/NAME``: a histogram of each parameter's gradient, at every Nth Step (``--tensorboard-histograms-every``).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from remote_trainer.engine.errors import FailedPrecondition
from remote_trainer.engine.protocol import Engine
from remote_trainer.server.events import CallObserver, Ending

log = logging.getLogger(__name__)


class TrainingLog(CallObserver):
    """Per-session TensorBoard writers, written as the servicer reports training events; every
    method is thread-safe and cheap when nothing is due."""

    def __init__(self, directory: str, histograms_every: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise FailedPrecondition(
                "--tensorboard-dir needs the tensorboard package: pip install tensorboard "
                "(the server's tensorboard extra: pip install './server[tensorboard]')", "TENSORBOARD_MISSING",
            ) from exc
        self._writer_class = SummaryWriter
        self._directory = Path(directory)
        self.histograms_every = histograms_every
        self._lock = threading.Lock()
        self._writers: dict[str, Any] = {}
        self._iteration_started: dict[str, float] = {}
        log.info("writing TensorBoard event files to %s (tensorboard --logdir %s)", directory, directory)

    def _writer(self, session_id: str) -> Any:
        with self._lock:
            writer = self._writers.get(session_id)
            if writer is None:
                writer = self._writers[session_id] = self._writer_class(log_dir=str(self._directory / session_id))
            return writer

    def forwarded(self, session_id: str, began: float | None = None, samples: int = 0) -> None:
        """A forward ran: the first since the last Step starts the iteration that Step will end."""
        with self._lock:
            self._iteration_started.setdefault(session_id, time.monotonic() if began is None else began)

    def backwarded(self, session_id: str, session: Engine, loss: float | None, grad_norm: float | None,
                   step_count: int | None = None) -> None:
        """Loss and gradient norm, at the step count the backward ran at."""
        if step_count is None:
            step_count = session.describe().step_count
        writer = self._writer(session_id)
        if loss is not None:
            writer.add_scalar("loss", loss, step_count)
        if grad_norm is not None:  # a Backward with skip_grad_norm has none
            writer.add_scalar("grad_norm", grad_norm, step_count)

    def histograms_due(self, step_count: int) -> bool:
        return self.histograms_every > 0 and step_count % self.histograms_every == 0

    def stepped(self, session_id: str, session: Engine, step_count: int) -> None:
        """A Step ended: learning rate, iteration time and (when due) gradient histograms; then flushed."""
        due = self.histograms_due(step_count)
        lr = session.describe().optimizer.lr
        gradients = session.gradients([]) if due else []
        writer = self._writer(session_id)
        with self._lock:
            started = self._iteration_started.pop(session_id, None)
        writer.add_scalar("lr", lr, step_count)
        if started is not None:
            writer.add_scalar("step_seconds", time.monotonic() - started, step_count)
        for g in gradients:
            if g.tensor is not None:
                writer.add_histogram(f"grad/{g.name}", g.tensor, step_count)
        writer.flush()

    def session_closed(self, session_id: str, ending: Ending = "closed") -> None:
        with self._lock:
            writer = self._writers.pop(session_id, None)
            self._iteration_started.pop(session_id, None)
        if writer is not None:
            writer.close()

    def close(self) -> None:
        with self._lock:
            writers = list(self._writers.values())
            self._writers.clear()
        for writer in writers:
            writer.close()
