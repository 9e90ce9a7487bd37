"""The training step the sections time: in local PyTorch (``LocalStep``) and through the server
(``RemoteStep``), the same seed-0 weights, the tutorial's loss and SGD; and the few helpers the
step-timing sections share (repetitions from a time budget, timing side by side, inputs, the
logits' agreement)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch

from bench.measure import SideBySide, timed
from remote_trainer.client import Session
from remote_trainer.engine.models import build_model, head_of, new_head

# The step cases (``--cases``); see RemoteStep.
CASES = ("full", "frozen", "client-loss", "train-step", "client-loss-2rt", "full-grad-norm")
TUTORIAL_LR, TUTORIAL_MOMENTUM = 1e-2, 0.9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LocalStep:
    """The identical step in local PyTorch: forward, the tutorial's loss, backward, SGD step."""

    def __init__(self, case: str, device: torch.device) -> None:
        model, _ = build_model("random", 0, 0)
        if case == "frozen":
            for p in model.parameters():
                p.requires_grad_(False)
            model.fc = new_head(head_of(model).in_features, 10, 0)
        self.model = model.to(device).train()
        self.device = device
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=TUTORIAL_LR, momentum=TUTORIAL_MOMENTUM)
        self.logits: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        prediction = self.model(x.to(self.device))
        loss = (prediction - labels.to(self.device)).sum()
        loss.backward()
        self.optimizer.step()
        self.logits = prediction.detach()
        sync(self.device)


class RemoteStep:
    """The same step through the server. ``full``/``frozen``: Forward, Backward (server loss), Step;
    ``client-loss``: Forward, Backward (client gradient), Step; ``train-step``: one TrainStep call;
    ``client-loss-2rt``: Forward, then Backward (client gradient) that also steps. Each Backward
    asks for no gradient norm (``grad_norm=False``), since the local step computes none either;
    ``full-grad-norm`` is ``full`` with Backward's default, the norm computed and returned."""

    def __init__(self, session: Session, case: str) -> None:
        self.session = session
        self.case = case
        self.grad_norm = case == "full-grad-norm"
        if case == "frozen":
            session.freeze("*")
            session.replace_head(10, seed=0)
        self.logits: np.ndarray | None = None

    def __call__(self, x: np.ndarray, labels: np.ndarray) -> None:
        if self.case == "train-step":
            # The local step has no zero_grad (gradients accumulate, as in the tutorial): nor has this.
            self.logits = self.session.train_step(x, "sum", labels, zero_grad=False, return_logits=True).logits
            return
        logits = self.session.forward(x).logits
        if self.case == "client-loss-2rt":
            self.session.backward(output_gradient=self._client_gradient(logits, labels), step=True, grad_norm=False)
            self.logits = logits
            return
        if self.case == "client-loss":
            # The remote-nn.Module path: the client computes the loss and sends d(loss)/d(logits).
            self.session.backward(output_gradient=self._client_gradient(logits, labels), grad_norm=False)
        else:
            self.session.backward("sum", labels, grad_norm=self.grad_norm)
        self.session.step()
        self.logits = logits

    @staticmethod
    def _client_gradient(logits: np.ndarray | None, labels: np.ndarray) -> np.ndarray:
        """d(loss)/d(logits) of the tutorial's loss, computed by torch on the client."""
        prediction = torch.from_numpy(np.array(logits)).requires_grad_()
        (prediction - torch.from_numpy(labels)).sum().backward()  # type: ignore[no-untyped-call]
        assert prediction.grad is not None
        return prediction.grad.numpy()


def difference(remote: np.ndarray | None, local: torch.Tensor | None) -> float:
    """Largest difference between remote and local logits, relative to the logits' scale."""
    if remote is None or local is None:
        return float("nan")
    expected = local.cpu().numpy()
    return float(np.abs(remote - expected).max() / max(1.0, float(np.abs(expected).max())))


def repetitions(args: argparse.Namespace, first: float, calls: int = 1) -> int:
    """As many repetitions as ``--seconds-per-case`` allows (``calls`` timed steps of ``first``
    seconds each), between ``--min-reps`` and ``--reps``."""
    return int(max(args.min_reps, min(args.reps, int(args.seconds_per_case / calls / max(first, 1e-3)))))


def measure_steps(args: argparse.Namespace, contenders: dict[str, Callable[[], None]],
                  agreement: Callable[[], float]) -> tuple[SideBySide, int, float]:
    """Every contender's step once (their time sets the repetitions), then side by side; returns
    the timings, the repetitions, and the worst ``agreement()`` (of the logits) after the first
    step and after the last."""

    def each_once() -> None:
        for step in contenders.values():
            step()

    first = timed(each_once)
    worst = agreement()
    reps = repetitions(args, first)
    sbs = SideBySide(list(contenders))
    sbs.run(dict(contenders), reps=reps, warmup=max(0, args.warmup - 1))
    return sbs, reps, max(worst, agreement())


def step_inputs(shape: tuple[int, ...], classes: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """A seeded input batch of ``shape`` and labels for ``classes`` classes."""
    rng = np.random.default_rng(0)
    return rng.random(shape, dtype=np.float32), rng.random((shape[0], classes), dtype=np.float32)


def shape_name(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))
