"""The torch work of one session: a resnet18, its optimizer, its gradients and its pending forward.

``SessionEngine`` is the whole interface between the transport and PyTorch. It takes and returns
torch tensors and small dataclasses, imports neither grpc nor the generated code, and serialises
its calls with a lock, so a session can be driven from many threads (or, later, live elsewhere).

Every method validates its inputs before it changes anything: a rejected call leaves the session
exactly as it was.
"""

from __future__ import annotations

import copy
import logging
import functools
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from remote_trainer.contract.names import LossName
from remote_trainer.engine import checkpoints
from remote_trainer.engine.budget import UNLIMITED, GRAPH_BYTES_PER_PIXEL, MemoryBudget, forward_bytes, head_bytes, model_bytes
from remote_trainer.engine.errors import Abandoned, FailedPrecondition, ResourceExhausted, invalid
from remote_trainer.engine.graph import autograd_graph
from remote_trainer.engine.limits import MAX_CLASSES, Limits
from remote_trainer.engine.models import ModelSpec, head_of, new_head
from remote_trainer.engine.optimizer import OptimizerSpec
from remote_trainer.engine.patterns import match_patterns
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
from remote_trainer.engine.tensors import require_finite, require_float32, tensor_stats, tensors_stats, to_cpu


log = logging.getLogger(__name__)

# The --autocast settings and the types torch.autocast runs them in (None: off).
AUTOCAST_TYPES: dict[str, torch.dtype | None] = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class _Pending:
    """The last forward: its logits while its graph lives, or why Backward cannot use it."""

    forward_id: int
    logits: torch.Tensor | None
    unusable_because: str = ""
    reason: str = ""
    graph_bytes: int = 0  # the estimate of what its graph keeps (engine/budget.py)


CHECKPOINT_FORMAT = "trainer.v1/session-checkpoint/1"

P = ParamSpec("P")
R = TypeVar("R")


def _device_memory(method: Callable[Concatenate[SessionEngine, P], R]) -> Callable[Concatenate[SessionEngine, P], R]:
    """Reports a device running out of memory as the domain error ``DEVICE_OUT_OF_MEMORY`` (so it
    reaches the caller as RESOURCE_EXHAUSTED from any process), after giving the cached blocks back."""

    @functools.wraps(method)
    def wrapper(self: SessionEngine, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except torch.OutOfMemoryError as exc:
            if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
                torch.cuda.empty_cache()
            raise ResourceExhausted(
                f"the device ran out of memory: {exc}".splitlines()[0], "DEVICE_OUT_OF_MEMORY"
            ) from None

    return wrapper


T = TypeVar("T")


def _owned(item: NamedTensor) -> NamedTensor:
    """``item`` with a tensor of its own, so that later steps cannot change it."""
    if item.tensor is None:
        return item
    return NamedTensor(item.name, item.shape, item.tensor.clone(), item.stats, item.present)


class SessionEngine:
    """One model with its optimizer, gradients and pending forward; every method is thread-safe."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        weights: str,
        optimizer: OptimizerSpec,
        limits: Limits,
        budget: MemoryBudget = UNLIMITED,
        keep_initial_state: bool = False,
        autocast: str = "off",
        channels_last: bool = False,
        pin_memory: bool = False,
    ) -> None:
        """``budget`` is the memory budget the session counts against (shared by the sessions of one
        process); ``keep_initial_state`` keeps a CPU copy of the starting state (the size of the
        weights), which ``reset()`` returns to: the server's default session has one. ``autocast``
        ("off", "bf16", "fp16") runs forwards under ``torch.autocast`` on the session's device, as a
        local mixed-precision loop does (logits come back as float32); ``channels_last`` keeps the
        weights and inputs in that memory format; ``pin_memory`` (CUDA only) moves inputs, labels and
        output gradients to the device from page-locked host memory with non-blocking copies, and
        brings gradients and parameters back through page-locked buffers with one synchronisation."""
        optimizer.validate()
        if autocast not in AUTOCAST_TYPES:
            raise invalid("autocast", f"autocast must be one of {sorted(AUTOCAST_TYPES)}, got {autocast!r}", "BAD_AUTOCAST")
        self._lock = threading.Lock()
        if pin_memory and device.type != "cuda":
            raise FailedPrecondition(
                f"pin-memory needs a CUDA device (page-locked host buffers only speed up copies to and from "
                f"an accelerator), and this session's device is {device}: start the server without --pin-memory",
                "PIN_MEMORY_NEEDS_CUDA",
            )
        self._autocast_name = autocast
        self._autocast = AUTOCAST_TYPES[autocast]
        self._pin_memory = pin_memory
        self._memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._model = model.to(device).to(memory_format=self._memory_format)
        self._device = device
        self._weights = weights
        self._limits = limits
        self._spec = optimizer
        self._optimizer = optimizer.build(self._model.parameters())
        self._step_count = 0
        self._forward_count = 0
        self._pending: _Pending | None = None
        self._budget = budget
        self._keep_budget()
        # Said in errors about the head's size after ReplaceHead, so a shape error tells what changed.
        self._head_note = ""
        self._initial = self.checkpoint() if keep_initial_state else None

    def _keep_budget(self) -> None:
        """Tells the memory budget what the session keeps now: its model state and pending graph."""
        pending = self._pending.graph_bytes if self._pending is not None and self._pending.logits is not None else 0
        self._budget.keep(self, model_bytes(head_of(self._model).out_features) + pending)

    @classmethod
    def from_spec(
        cls,
        model: ModelSpec,
        optimizer: OptimizerSpec,
        limits: Limits,
        budget: MemoryBudget = UNLIMITED,
        keep_initial_state: bool = False,
    ) -> SessionEngine:
        """A session whose model is built here, from plain data (how a session in another process is made)."""
        optimizer.validate()
        module, source, device = model.build()
        return cls(module, device, source, optimizer, limits, budget, keep_initial_state, model.autocast, model.channels_last,
                   model.pin_memory)

    def _to_device(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A host tensor on the session's device; with pinned memory through a page-locked copy of
        it (the first copy of the request's bytes: the decoded tensor is a view of them), which the
        device reads asynchronously (torch keeps the pinned block until the copy is done)."""
        if self._pin_memory and t.device.type == "cpu":
            t = t.pin_memory()
        return t.to(self._device, dtype, non_blocking=True)

    def _run_model(self, x: torch.Tensor) -> torch.Tensor:
        """``model(x)`` on the session's device, in its memory format, under its autocast."""
        if self._pin_memory:  # copied as it is, then rearranged on the device
            x = self._to_device(x).contiguous(memory_format=self._memory_format)
        else:
            x = x.to(self._device, non_blocking=True, memory_format=self._memory_format)
        with torch.autocast(self._device.type, dtype=self._autocast or torch.float32, enabled=self._autocast is not None):
            out: torch.Tensor = self._model(x)
        return out

    def warm_up(self) -> None:
        """One training-mode forward and backward of a small batch on a copy of the model, so that the
        first client call does not pay for cold kernels and the allocator. The session itself
        (weights, BatchNorm statistics, gradients) is untouched."""
        started = time.monotonic()
        with self._lock:
            scratch = copy.deepcopy(self._model).train()
        with torch.autocast(self._device.type, dtype=self._autocast or torch.float32, enabled=self._autocast is not None):
            out = scratch(torch.zeros(2, 3, 64, 64, device=self._device).to(memory_format=self._memory_format))
        out.float().sum().backward()
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        del scratch
        log.info("warmed up in %.2f s", time.monotonic() - started)

    # -- training step -------------------------------------------------------------------------

    @_device_memory
    def forward(
        self,
        x: torch.Tensor,
        eval_mode: bool = False,
        no_grad: bool = False,
        max_logits_elements: int | None = None,
        still_wanted: Callable[[], bool] | None = None,
    ) -> ForwardResult:
        """``model(x)`` in train or eval mode, keeping the graph for Backward unless ``no_grad``.

        ``max_logits_elements`` refuses, before anything runs or changes, a forward whose logits
        (batch x classes) the caller could not send back. ``still_wanted`` is asked once the forward
        has run: when it says no (the caller's deadline passed, or it cancelled), the BatchNorm
        running statistics the forward updated are put back and ``Abandoned`` is raised, so the
        session keeps its pending forward and is exactly as before.
        """
        self._check_input(x, eval_mode)
        with self._lock:
            self._check_logits_budget(x.shape[0], max_logits_elements)
            classes = head_of(self._model).out_features
            # Train mode updates BatchNorm's running statistics in place, so the forward runs on copies
            # (resnet18's are 9,600 numbers) that replace them only when it is kept: the statistics,
            # and the pending graph that saved them, stay untouched when the caller gives up.
            n, _, h, w = x.shape
            needed = forward_bytes(n, h, w, classes, keeps_graph=not no_grad)
            originals = self._swap_in_buffer_copies() if still_wanted is not None and not eval_mode else []
            was_training = self._model.training
            self._model.train(not eval_mode)
            try:
                with self._budget.use(self, needed, f"a forward of {n} image(s) of {h}x{w}"), torch.set_grad_enabled(not no_grad):
                    logits = self._run_model(x)
                if still_wanted is not None and not still_wanted():
                    raise Abandoned("the forward was run but not kept: its caller stopped waiting", "ABANDONED")
            except BaseException:
                for module, name, buffer in originals:
                    module._buffers[name] = buffer
                self._model.train(was_training)
                raise
            self._pending = None  # the new forward replaces the pending one (and frees its graph)
            self._forward_count += 1
            fid = self._forward_count
            if no_grad:
                self._pending = _Pending(fid, None, f"forward {fid} ran with no_grad: no graph was kept", "NO_GRAPH")
            elif not logits.requires_grad:
                self._pending = _Pending(fid, None, f"forward {fid} has no graph: every parameter is frozen", "NO_TRAINABLE_PARAMETERS")
            else:
                self._pending = _Pending(fid, logits, graph_bytes=n * h * w * GRAPH_BYTES_PER_PIXEL)
            self._keep_budget()
            out = logits.detach().float()  # float32 under autocast too, as the logits a client compares
            return ForwardResult(fid, out.to("cpu"), tensor_stats(out))

    def _swap_in_buffer_copies(self) -> list[tuple[nn.Module, str, torch.Tensor]]:
        """Puts a copy in place of every buffer; returns the originals to put back."""
        originals = []
        for module in self._model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    originals.append((module, name, buffer))
                    module._buffers[name] = buffer.clone()
        return originals

    def _check_logits_budget(self, batch: int, max_logits_elements: int | None) -> None:
        classes = head_of(self._model).out_features
        if max_logits_elements is not None and batch * classes > max_logits_elements:
            raise ResourceExhausted(
                f"the logits of {batch} image(s) x {classes} classes ({batch * classes} numbers) would not "
                f"fit in one response (at most {max_logits_elements} in this output format); send a smaller batch "
                "or ask for OUTPUT_FORMAT_STATS_ONLY",
                "RESPONSE_TOO_LARGE",
                metadata={"limit": str(max_logits_elements)},
            )

    def _check_input(self, x: torch.Tensor, eval_mode: bool) -> None:
        require_float32(x, "input")
        if x.dim() != 4:
            raise invalid("input", f"input must have shape (N, 3, H, W), got rank {x.dim()} shape {list(x.shape)}", "BAD_INPUT_SHAPE")
        n, c, h, w = x.shape
        if c != 3:
            raise invalid("input", f"input must have 3 channels (N, 3, H, W), got {c} in shape {list(x.shape)}", "BAD_INPUT_SHAPE")
        # What local PyTorch refuses, and nothing more: resnet18 pools adaptively, so any image of at
        # least 1x1 runs (conv1 is 7x7 with padding 3); an empty batch runs too.
        if h < 1 or w < 1:
            raise invalid("input", f"input images must be at least 1x1 (resnet18's 7x7 conv1 with padding 3), got {h}x{w}",
                          "IMAGE_TOO_SMALL")
        if n > self._limits.max_batch:
            raise ResourceExhausted(f"batch {n} is over the limit max_batch={self._limits.max_batch}", "BATCH_TOO_LARGE",
                                    metadata={"limit": str(self._limits.max_batch)})
        # Each stage halves the image, rounding up (to ceil(h/32) at the last); train-mode BatchNorm
        # refuses exactly one value per channel (torch's _verify_batch_size), which the last stage
        # reaches first.
        if not eval_mode and n * math.ceil(h / 32) * math.ceil(w / 32) == 1:
            raise invalid(
                "input",
                f"a training-mode forward of 1 image of {h}x{w} leaves BatchNorm one value per channel "
                "in the last stage; send a batch of 2 or more, images larger than 32x32, or use eval_mode",
                "BATCH_TOO_SMALL_FOR_TRAINING",
            )
        require_finite(x, "input")

    @_device_memory
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
        """Backpropagates from the pending forward: from ``loss(logits, labels)`` or from
        ``logits.backward(gradient=output_gradient)``; gradients accumulate as in PyTorch.
        ``grad_norm`` False leaves the global gradient norm out (a pass over every .grad).

        ``step`` runs the optimizer step right after, under the same lock (as ``step()`` would), and
        ``zero_grad_after_step`` then clears every .grad (to None): a client-side-loss training step
        in one call after its Forward.
        """
        if zero_grad_after_step and not step:
            raise invalid("zero_grad_after_step", "zero_grad_after_step needs step", "ZERO_GRAD_WITHOUT_STEP")
        with self._lock:
            pending = self._pending
            if pending is None:
                raise FailedPrecondition("no pending forward: call Forward first", "NO_PENDING_FORWARD")
            if forward_id and forward_id != pending.forward_id:
                raise FailedPrecondition(
                    f"forward {forward_id} is not the pending forward (that is {pending.forward_id})", "STALE_FORWARD",
                    metadata={"pending_forward_id": str(pending.forward_id)},
                )
            if pending.logits is None:
                raise FailedPrecondition(pending.unusable_because, pending.reason)
            logits = pending.logits
            if (loss is None) == (output_gradient is None):
                raise invalid("source", "give exactly one of loss or output_gradient", "NO_BACKWARD_SOURCE")
            if loss is not None:
                root = self._loss(loss, logits, labels)
                root.backward(retain_graph=retain_graph)  # type: ignore[no-untyped-call]
                loss_value: float | None = float(root.detach())
            else:
                assert output_gradient is not None
                require_float32(output_gradient, "output_gradient")
                if tuple(output_gradient.shape) != tuple(logits.shape):
                    raise invalid(
                        "output_gradient",
                        f"output_gradient must have the logits' shape {list(logits.shape)}, got {list(output_gradient.shape)}"
                        + self._head_note,
                        "BAD_OUTPUT_GRADIENT_SHAPE",
                    )
                require_finite(output_gradient, "output_gradient")
                gradient = self._to_device(output_gradient, logits.dtype)  # the logits' own type under autocast
                logits.backward(gradient=gradient, retain_graph=retain_graph)  # type: ignore[no-untyped-call]
                loss_value = None
            if not retain_graph:
                pending.logits = None
                pending.unusable_because = (
                    f"the graph of forward {pending.forward_id} was freed by Backward; "
                    "pass retain_graph to backpropagate through it again"
                )
                pending.reason = "GRAPH_FREED"
                self._keep_budget()
            grads = [p.grad for p in self._model.parameters() if p.grad is not None]
            norm = self._grad_norm(grads) if grad_norm else None
            if not step:
                return BackwardResult(pending.forward_id, loss_value, len(grads), norm)
            step_count, updated = self._step()
            if zero_grad_after_step:
                self._model.zero_grad(set_to_none=True)
            return BackwardResult(pending.forward_id, loss_value, len(grads), norm, step_count, updated)

    @staticmethod
    def _grad_norm(grads: list[torch.Tensor]) -> float:
        """The L2 norm over all ``grads`` together: one fused per-tensor pass (``torch._foreach_norm``)."""
        if not grads:
            return 0.0
        norms = torch._foreach_norm([g if g.dtype == torch.float32 else g.float() for g in grads])
        return float(torch.linalg.vector_norm(torch.stack(norms)))

    def _loss(self, loss: LossName, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        labels = self._check_labels(loss, labels, tuple(logits.shape))
        if loss == "cross_entropy":
            return F.cross_entropy(logits, self._to_device(labels))
        target = self._to_device(labels)
        if loss == "sum":
            return (logits - target).sum()
        return F.mse_loss(logits, target)

    def _check_labels(self, loss: LossName, labels: torch.Tensor | None, logits_shape: tuple[int, ...]) -> torch.Tensor:
        """Refuses labels that ``loss`` cannot compare with logits of ``logits_shape``."""
        if labels is None:
            raise invalid("loss.labels", f"loss {loss} needs labels", "MISSING_LABELS")
        if loss == "cross_entropy":
            if labels.dtype != torch.int64:
                raise invalid("loss.labels", f"cross_entropy labels must be int64 class indices, got {labels.dtype}", "WRONG_DTYPE")
            if tuple(labels.shape) != (logits_shape[0],):
                raise invalid("loss.labels", f"cross_entropy labels must have shape [{logits_shape[0]}], got {list(labels.shape)}", "BAD_LABEL_SHAPE")
            classes = logits_shape[1]
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
                raise invalid("loss.labels", f"class indices must be in [0, {classes}), got {labels.tolist()}{self._head_note}",
                              "CLASS_INDEX_OUT_OF_RANGE")
            return labels
        require_float32(labels, "loss.labels")
        if tuple(labels.shape) != logits_shape:
            raise invalid("loss.labels", f"{loss} labels must have the logits' shape {list(logits_shape)}, got {list(labels.shape)}"
                          + self._head_note, "BAD_LABEL_SHAPE")
        require_finite(labels, "loss.labels")
        return labels

    @_device_memory
    def step(self, expected_step_count: int | None = None, still_wanted: Callable[[], bool] | None = None) -> tuple[int, int]:
        """One optimizer step; returns the step count and how many parameters had a gradient.

        ``expected_step_count`` makes a retried step safe: it is the step count the caller saw before
        this step. One less than the session's count means the step was already taken (its answer
        was lost): nothing is done and the current count is returned, with 0 parameters updated. Any
        other difference is refused. ``still_wanted`` is asked right before stepping.
        """
        with self._lock:
            if expected_step_count is not None and expected_step_count != self._step_count:
                if expected_step_count + 1 == self._step_count:
                    return self._step_count, 0
                raise FailedPrecondition(
                    f"expected_step_count {expected_step_count} does not fit the session's step count {self._step_count}",
                    "STEP_COUNT_MISMATCH", metadata={"step_count": str(self._step_count)},
                )
            if still_wanted is not None and not still_wanted():
                raise Abandoned("the step was not taken: its caller stopped waiting", "ABANDONED")
            return self._step()

    def _step(self) -> tuple[int, int]:
        updated = sum(1 for g in self._optimizer.param_groups for p in g["params"] if p.grad is not None)
        self._optimizer.step()
        self._step_count += 1
        pending = self._pending
        if updated and pending is not None and pending.logits is not None:
            # A graph kept with retain_graph saved the parameters it was made with, and the step
            # changed them in place: autograd would refuse to backpropagate through it, so it goes.
            fid = pending.forward_id
            self._pending = _Pending(
                fid, None, f"the parameters changed (step {self._step_count}) since forward {fid}; run Forward again",
                "PARAMETERS_CHANGED",
            )
            self._keep_budget()
        return self._step_count, updated

    @_device_memory
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
        """One training step under one lock, in a local training loop's order::

            optimizer.zero_grad()          # when zero_grad (set_to_none=True)
            logits = model.train()(x)
            loss(logits, labels).backward()
            optimizer.step()

        Input, labels, the logits budget and that something is trainable are all checked before
        anything changes; afterwards no graph is pending (the backward freed it), as after the
        separate Forward, Backward and Step calls. ``still_wanted`` is asked before anything runs
        (like Backward, a step under way cannot be taken back: gradients accumulate in place).
        """
        self._check_input(x, eval_mode=False)
        with self._lock:
            classes = head_of(self._model).out_features
            labels = self._check_labels(loss, labels, (x.shape[0], classes))
            self._check_logits_budget(x.shape[0], max_logits_elements)
            if not any(p.requires_grad for p in self._model.parameters()):
                raise FailedPrecondition("every parameter is frozen: a training step has nothing to train", "NO_TRAINABLE_PARAMETERS")
            n, _, h, w = x.shape
            self._budget.check(self, forward_bytes(n, h, w, classes, keeps_graph=True), f"a training step of {n} image(s) of {h}x{w}")
            if still_wanted is not None and not still_wanted():
                raise Abandoned("the training step was not run: its caller stopped waiting", "ABANDONED")
            if zero_grad:
                self._model.zero_grad(set_to_none=True)
            self._pending = None  # as a Forward does: the pending forward is replaced (and its graph freed)
            self._model.train(True)
            logits = self._run_model(x)
            self._forward_count += 1
            fid = self._forward_count
            root = self._loss(loss, logits, labels)
            root.backward()  # type: ignore[no-untyped-call]
            self._pending = _Pending(fid, None, f"the graph of forward {fid} was freed by TrainStep's backward", "GRAPH_FREED")
            self._keep_budget()
            norm = self._grad_norm([p.grad for p in self._model.parameters() if p.grad is not None]) if grad_norm else None
            step_count, updated = self._step()
            out = logits.detach().float()
            return TrainStepResult(fid, float(root.detach()), out.to("cpu"), tensor_stats(out), step_count, updated, norm)

    def zero_grad(self, set_to_none: bool = True) -> int:
        """Clears every parameter's .grad; returns how many had one."""
        with self._lock:
            cleared = sum(1 for p in self._model.parameters() if p.grad is not None)
            self._model.zero_grad(set_to_none=set_to_none)
            return cleared

    def drop_pending(self, why: str) -> bool:
        """Frees the pending forward's graph (Backward then says ``why``); False when none was kept."""
        with self._lock:
            pending = self._pending
            if pending is None or pending.logits is None:
                return False
            self._pending = _Pending(pending.forward_id, None, f"the graph of forward {pending.forward_id} was dropped: {why}",
                                     "GRAPH_EXPIRED")
            self._keep_budget()
            return True

    # -- model and optimizer changes ---------------------------------------------------------

    @_device_memory
    def configure_optimizer(self, spec: OptimizerSpec) -> OptimizerSpec:
        """Replaces the optimizer (its state starts anew)."""
        spec.validate()
        with self._lock:
            self._optimizer = spec.build(self._model.parameters())
            self._spec = spec
            return spec

    def freeze(self, patterns: list[str], unfreeze: bool = False) -> FreezeResult:
        """Sets requires_grad on the parameters matching ``patterns`` (False to freeze)."""
        with self._lock:
            params = dict(self._model.named_parameters())
            if not patterns:
                raise invalid("patterns", "give at least one pattern ('*' for every parameter)", "NO_PATTERNS")
            names = match_patterns(list(params), patterns)
            changed = [n for n in names if params[n].requires_grad != unfreeze]
            for n in names:
                params[n].requires_grad_(unfreeze)
            trainable = [n for n, p in params.items() if p.requires_grad]
            return FreezeResult(changed, trainable, len(params) - len(trainable))

    @_device_memory
    def replace_head(self, num_classes: int, seed: int) -> SessionDescription:
        """``model.fc = nn.Linear(512, num_classes)`` seeded, then a new optimizer over all parameters."""
        if num_classes < 1 or num_classes > MAX_CLASSES:
            raise invalid("num_classes", f"num_classes must be in 1..{MAX_CLASSES}, got {num_classes}", "BAD_NUM_CLASSES")
        with self._lock:
            self._budget.check(self, head_bytes(num_classes), f"a head of {num_classes} classes")
            head = new_head(head_of(self._model).in_features, num_classes, seed)
            before = head_of(self._model).out_features
            self._model.fc = head.to(self._device)
            self._head_note = (
                f" (the head has {num_classes} classes since ReplaceHead(num_classes={num_classes}) replaced the one "
                f"of {before}" + ("; ResetSession restores the original" if self._initial is not None else "") + ")"
            )
            self._optimizer = self._spec.build(self._model.parameters())
            if self._pending is not None:
                fid = self._pending.forward_id
                self._pending = _Pending(fid, None, f"forward {fid} was made with the old head, replaced since", "HEAD_REPLACED")
            self._keep_budget()
            return self._describe()

    # -- checkpoints -----------------------------------------------------------------------------

    @_device_memory
    def checkpoint(self) -> dict[str, object]:
        """Everything needed to go on bit-identically: weights and buffers, head size, frozen set,
        optimizer settings and state (momentum buffers), step count. Gradients are not kept."""
        with self._lock:
            return {
                "format": CHECKPOINT_FORMAT,
                "weights": self._weights,
                "num_classes": head_of(self._model).out_features,
                "model": {k: v.detach().to("cpu", copy=True) for k, v in self._model.state_dict().items()},
                "frozen": [n for n, p in self._model.named_parameters() if not p.requires_grad],
                "optimizer_spec": asdict(self._spec),
                "optimizer_state": to_cpu(self._optimizer.state_dict()),
                "step_count": self._step_count,
            }

    @_device_memory
    def save_checkpoint(self, path: str) -> CheckpointInfo:
        """Writes ``checkpoint()`` to the file ``path`` atomically (the caller chose and checked it)."""
        state = self.checkpoint()
        size = checkpoints.save(state, Path(path))
        return CheckpointInfo(int(state["step_count"]), size)  # type: ignore[call-overload]

    def load_checkpoint(self, path: str) -> SessionDescription:
        """``restore`` from the checkpoint file ``path``; a missing or bad file leaves the session as it was."""
        return self.restore(checkpoints.load(Path(path)))

    @_device_memory
    def restore(self, state: dict[str, object]) -> SessionDescription:
        """Puts the session in the state of ``checkpoint()``; the pending forward and gradients are dropped.

        Everything is checked and built aside first, so a bad checkpoint leaves the session as it was.
        """
        with self._lock:
            return self._restore(state)

    def _restore(self, state: dict[str, object]) -> SessionDescription:
        try:
            if state.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"unknown checkpoint format {state.get('format')!r}")
            spec = OptimizerSpec(**state["optimizer_spec"])  # type: ignore[arg-type]
            spec.validate()
            num_classes = int(state["num_classes"])  # type: ignore[call-overload]
            weights = state["model"]
            frozen = set(state["frozen"])  # type: ignore[call-overload]
            step_count = int(state["step_count"])  # type: ignore[call-overload]
            self._budget.check(self, model_bytes(num_classes), "loading a checkpoint")
            model = copy.deepcopy(self._model)
            if head_of(model).out_features != num_classes:
                model.fc = new_head(head_of(model).in_features, num_classes, 0)  # overwritten by the checkpoint
            model.load_state_dict(weights, strict=True)  # type: ignore[arg-type]
            model = model.to(self._device)
            for name, p in model.named_parameters():
                p.requires_grad_(name not in frozen)
                p.grad = None
            optimizer = spec.build(model.parameters())
            optimizer.load_state_dict(state["optimizer_state"])  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise invalid("name", f"the checkpoint does not fit this session: {exc}", "BAD_CHECKPOINT") from exc
        self._model, self._optimizer, self._spec = model, optimizer, spec
        self._step_count = step_count
        self._weights = str(state.get("weights", self._weights))
        self._pending = None
        self._head_note = ""
        self._keep_budget()
        return self._describe()

    def reset(self) -> SessionDescription:
        """Back to the state the session started in (``keep_initial_state``): weights, buffers, head,
        optimizer settings and state, step count, frozen set; no gradients, no pending forward.
        Forward ids keep counting up, so a prediction from before the reset stays stale."""
        with self._lock:
            if self._initial is None:
                raise FailedPrecondition(
                    "only the default session can be reset: close this session and create a new one", "RESET_NOT_AVAILABLE"
                )
            return self._restore(self._initial)

    # -- reading state -------------------------------------------------------------------------

    def parameters_info(self) -> list[ParameterInfo]:
        """Every parameter in model order."""
        with self._lock:
            return [
                ParameterInfo(n, tuple(p.shape), p.dtype, p.requires_grad, p.grad is not None)
                for n, p in self._model.named_parameters()
            ]

    @_device_memory
    def gradients(
        self, patterns: list[str], stats_only: bool = False, dtype: torch.dtype = torch.float32, with_stats: bool = True
    ) -> list[NamedTensor]:
        """Snapshots of the .grad of the parameters matching ``patterns`` (all when empty)."""
        return self.encode_gradients(patterns, stats_only, dtype, _owned, with_stats)

    @_device_memory
    def parameters(
        self,
        patterns: list[str],
        stats_only: bool = False,
        dtype: torch.dtype = torch.float32,
        include_buffers: bool = False,
        with_stats: bool = True,
    ) -> list[NamedTensor]:
        """Snapshots of parameter values (and buffers) matching ``patterns`` (all when empty)."""
        return self.encode_parameters(patterns, stats_only, dtype, include_buffers, _owned, with_stats)

    def encode_gradients(
        self, patterns: list[str], stats_only: bool, dtype: torch.dtype, encode: Callable[[NamedTensor], T],
        with_stats: bool = True,
    ) -> list[T]:
        """``encode`` of each .grad matching ``patterns``, in order, called under the session's lock
        with the tensor's own memory when it is already on the CPU in ``dtype`` (no snapshot copy):
        what ``encode`` returns or sends must not keep that tensor. ``encode`` may send each result
        before the next tensor is read. ``with_stats`` False skips the statistics."""
        return self._snapshot(patterns, stats_only, dtype, lambda p: p.grad, False, encode, with_stats)

    def encode_parameters(
        self, patterns: list[str], stats_only: bool, dtype: torch.dtype, include_buffers: bool, encode: Callable[[NamedTensor], T],
        with_stats: bool = True,
    ) -> list[T]:
        """``encode_gradients`` for parameter values (and buffers)."""
        return self._snapshot(patterns, stats_only, dtype, lambda p: p, include_buffers, encode, with_stats)

    def _snapshot(
        self,
        patterns: list[str],
        stats_only: bool,
        dtype: torch.dtype,
        pick: Callable[[torch.Tensor], torch.Tensor | None],
        include_buffers: bool,
        encode: Callable[[NamedTensor], T],
        with_stats: bool = True,
    ) -> list[T]:
        if stats_only and not with_stats:
            raise invalid("skip_stats", "skip_stats with stats_only would send nothing", "NOTHING_TO_SEND")
        with self._lock:
            tensors: dict[str, torch.Tensor] = dict(self._model.named_parameters())
            if include_buffers:
                tensors.update(self._model.named_buffers())
            names = match_patterns(list(tensors), patterns) if patterns else list(tensors)
            copies = 0 if stats_only else sum(
                v.numel() * (dtype.itemsize if v.is_floating_point() else v.element_size())
                for v in (pick(tensors[n]) for n in names) if v is not None
            )
            self._budget.check(self, copies, f"a snapshot of {len(names)} tensor(s)")
            values = {name: v.detach() for name in names if (v := pick(tensors[name])) is not None}
            # When data goes out, on the CPU each tensor's statistics are taken right before it is
            # encoded, so that a caller sending as it encodes starts with the first tensors while
            # later ones are read; otherwise all at once (fewer calls, one synchronisation).
            one_by_one = with_stats and not stats_only and self._device.type == "cpu"
            all_stats = dict(zip(values, tensors_stats(list(values.values())))) if with_stats and not one_by_one else {}
            staged = self._stage(values, dtype) if self._pin_memory and not stats_only else None
            out = []
            for name in names:
                source = tensors[name]
                if name not in values:
                    out.append(encode(NamedTensor(name, tuple(source.shape), None, None, present=False)))
                    continue
                value = values[name]
                stats = tensors_stats([value])[0] if one_by_one else all_stats.get(name)
                view = None
                if not stats_only:
                    # On the CPU in the transfer type: a copy only when it is elsewhere or in another type.
                    target = dtype if value.is_floating_point() else value.dtype
                    view = staged[name] if staged is not None else value.to("cpu", target).contiguous()
                out.append(encode(NamedTensor(name, tuple(value.shape), view, stats)))
            return out

    def _stage(self, values: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Device tensors copied into page-locked host tensors (floating ones in ``dtype``), all
        copies queued without waiting, then one synchronisation: what ``_snapshot`` sends with
        pinned memory, instead of one blocking copy per tensor."""
        staged = {}
        for name, value in values.items():
            host = torch.empty(value.shape, dtype=dtype if value.is_floating_point() else value.dtype, pin_memory=True)
            staged[name] = host.copy_(value, non_blocking=True)
        torch.cuda.synchronize(self._device)
        return staged

    def graph(self) -> Graph:
        """The autograd graph of the pending forward, from the logits' grad_fn to the leaf parameters."""
        with self._lock:
            pending = self._pending
            if pending is None:
                raise FailedPrecondition("no pending forward: call Forward first", "NO_PENDING_FORWARD")
            if pending.logits is None or pending.logits.grad_fn is None:
                raise FailedPrecondition(pending.unusable_because, pending.reason)
            names = {id(p): n for n, p in self._model.named_parameters()}
            return autograd_graph(pending.forward_id, pending.logits.grad_fn, names)

    def describe(self) -> SessionDescription:
        """What the session holds."""
        with self._lock:
            return self._describe()

    def _describe(self) -> SessionDescription:
        params = list(self._model.parameters())
        trainable = sum(1 for p in params if p.requires_grad)
        return SessionDescription(
            model="resnet18",
            weights=self._weights,
            device=str(self._device),
            num_classes=head_of(self._model).out_features,
            optimizer=self._spec,
            step_count=self._step_count,
            pending_forward_id=self._pending.forward_id if self._pending and self._pending.logits is not None else 0,
            trainable_parameters=trainable,
            frozen_parameters=len(params) - trainable,
            autocast=self._autocast_name,
            memory_format="channels_last" if self._memory_format == torch.channels_last else "contiguous",
        )
