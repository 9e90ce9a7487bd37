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
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from remote_trainer.contract.names import LossName
from remote_trainer.engine import checkpoints
from remote_trainer.engine.budget import UNLIMITED, GRAPH_BYTES_PER_PIXEL, MemoryBudget, forward_bytes, head_bytes, model_bytes
from remote_trainer.engine.described import DescribedLock
from remote_trainer.engine.device import Placement, device_memory
from remote_trainer.engine.errors import Abandoned, FailedPrecondition, TrainerError, invalid
from remote_trainer.engine.graph import autograd_graph
from remote_trainer.engine.ledger import Ledger, numbered
from remote_trainer.engine.operation import Operation
from remote_trainer.engine.inputs import check_input, check_logits_size
from remote_trainer.engine.limits import MAX_CLASSES, Limits
from remote_trainer.engine.losses import backpropagate, backward_from_loss, check_labels
from remote_trainer.engine.models import ModelSpec, head_of, new_head, set_mode, set_trainable
from remote_trainer.engine.optimizer import OptimizerSpec
from remote_trainer.engine.pending import Pending, require_graph, revertible
from remote_trainer.engine.results import (BackwardResult, CheckpointInfo, ForwardResult, FreezeResult, Graph, NamedTensor,
                                           ParameterInfo, SessionDescription, StepResult, TrainStepResult)
from remote_trainer.engine.snapshots import Selection, owned
from remote_trainer.engine.state import SessionState
from remote_trainer.engine.tensors import global_norm, tensor_stats
from remote_trainer.engine.transforms import InputTransform


log = logging.getLogger(__name__)

T = TypeVar("T")


class SessionEngine:
    """One model with its optimizer, gradients and pending forward; every method is thread-safe."""

    def __init__(self, model: nn.Module, device: torch.device, weights: str, optimizer: OptimizerSpec, limits: Limits,
                 budget: MemoryBudget = UNLIMITED, keep_initial_state: bool = False, autocast: str = "off",
                 channels_last: bool = False, pin_memory: bool = False, input_transform: InputTransform | None = None) -> None:
        """``budget`` is the memory budget the session counts against (shared by the sessions of one
        process); ``keep_initial_state`` keeps a CPU copy of the starting state (the size of the
        weights), which ``reset()`` returns to: the server's default session has one. ``autocast``,
        ``channels_last``, ``pin_memory`` and ``input_transform`` (what uint8 inputs become) are how the
        model runs on ``device`` (``Placement``)."""
        optimizer.validate()
        self._placement = Placement(device, autocast, channels_last, pin_memory, input_transform)
        self._placement.validate()
        self._listed: tuple[nn.Module, nn.Module, list[nn.Parameter]] | None = None  # _parameters()' list, of (model, head)
        self._lock = DescribedLock(self._describe)  # describe() never waits for a call that holds it
        self.ledger = Ledger()  # taken before self._lock, never after it
        self._model = self._placement.place(model)
        self._device = device
        self._weights = weights
        self._limits = limits
        self._spec = optimizer
        self._optimizer = optimizer.build(self._model.parameters())
        self._step_count = 0
        self._forward_count = 0
        self._pending: Pending | None = None
        self._budget = budget
        self._keep_budget()
        # Said in errors about the head's size after ReplaceHead, so a shape error tells what changed.
        self._head_note = ""
        self._initial = self.checkpoint() if keep_initial_state else None

    def _keep_budget(self) -> None:
        """Tells the memory budget what the session keeps now: its model state and pending graph."""
        pending = self._pending.kept_bytes if self._pending is not None else 0
        self._budget.keep(self, model_bytes(head_of(self._model).out_features), pending)

    @classmethod
    def from_spec(cls, model: ModelSpec, optimizer: OptimizerSpec, limits: Limits, budget: MemoryBudget = UNLIMITED,
                  keep_initial_state: bool = False) -> SessionEngine:
        """A session whose model is built here, from plain data (how a session in another process is made)."""
        optimizer.validate()
        module, source, device = model.build()
        return cls(module, device, source, optimizer, limits, budget, keep_initial_state, model.autocast, model.channels_last,
                   model.pin_memory, model.input_transform)

    def warm_up(self) -> None:
        """One training-mode forward and backward of a small batch on a copy of the model, so that the
        first client call does not pay for cold kernels and the allocator. The session itself
        (weights, BatchNorm statistics, gradients) is untouched."""
        started = time.monotonic()
        with self._lock:
            scratch = copy.deepcopy(self._model).train()
        self._placement.warm_up(scratch)
        del scratch
        log.info("warmed up in %.2f s", time.monotonic() - started)

    # -- training step -------------------------------------------------------------------------

    @numbered
    @device_memory
    def forward(self, x: torch.Tensor, eval_mode: bool = False, no_grad: bool = False, max_logits_elements: int | None = None,
                still_wanted: Callable[[], bool] | None = None, *, operation: Operation | None = None) -> ForwardResult:
        """``model(x)`` in train or eval mode, keeping the graph for Backward unless ``no_grad``.

        ``max_logits_elements`` refuses, before anything runs or changes, a forward whose logits
        (batch x classes) the caller could not send back. ``still_wanted`` is asked once the forward
        has run: when it says no (the caller's deadline passed, or it cancelled), the BatchNorm
        running statistics the forward updated are put back and ``Abandoned`` is raised, so the
        session keeps its pending forward and is exactly as before.
        """
        with self._lock:
            check_input(x, eval_mode, self._limits, self._placement.input_transform)
            classes = head_of(self._model).out_features
            check_logits_size(x.shape[0], classes, max_logits_elements)
            # Train mode updates BatchNorm's running statistics in place, so the forward runs on copies
            # (resnet18's are 9,600 numbers) that replace them only when it is kept: the statistics,
            # and the pending graph that saved them, stay untouched when the caller gives up.
            n, _, h, w = x.shape
            needed = forward_bytes(n, h, w, classes, keeps_graph=not no_grad)
            with revertible(self._model, train=not eval_mode, copy_buffers=still_wanted is not None and not eval_mode):
                with self._budget.use(self, needed, f"a forward of {n} image(s) of {h}x{w}"), torch.set_grad_enabled(not no_grad):
                    logits = self._placement.run(self._model, x)
                if still_wanted is not None and not still_wanted():
                    raise Abandoned("the forward was run but not kept: its caller stopped waiting", "ABANDONED")
            self._pending = None  # the new forward replaces the pending one (and frees its graph)
            self._forward_count += 1
            fid = self._forward_count
            self._pending = Pending.of_forward(fid, logits, no_grad, graph_bytes=n * h * w * GRAPH_BYTES_PER_PIXEL)
            self._keep_budget()
            out = logits.detach().float()  # float32 under autocast too, as the logits a client compares
            return ForwardResult(fid, out.to("cpu"), tensor_stats(out))

    @numbered
    @device_memory
    def backward(self, forward_id: int = 0, loss: LossName | None = None, labels: torch.Tensor | None = None,
                 output_gradient: torch.Tensor | None = None, retain_graph: bool = False, step: bool = False,
                 zero_grad_after_step: bool = False, grad_norm: bool = True, still_wanted: Callable[[], bool] | None = None,
                 *, operation: Operation | None = None) -> BackwardResult:
        """Backpropagates from the pending forward: from ``loss(logits, labels)`` or from
        ``logits.backward(gradient=output_gradient)``; gradients accumulate as in PyTorch.
        ``grad_norm`` False leaves the global gradient norm out (a pass over every .grad).

        ``step`` runs the optimizer step right after, under the same lock (as ``step()`` would), and
        ``zero_grad_after_step`` then clears every .grad (to None): a client-side-loss training step
        in one call after its Forward. ``still_wanted`` is asked before the backward runs (once it
        has, gradients have accumulated in place and cannot be taken back).
        """
        if zero_grad_after_step and not step:
            raise invalid("zero_grad_after_step", "zero_grad_after_step needs step", "ZERO_GRAD_WITHOUT_STEP")
        with self._lock:
            pending, logits = require_graph(self._pending, forward_id)
            if still_wanted is not None and not still_wanted():
                raise Abandoned("the backward was not run: its caller stopped waiting", "ABANDONED")
            loss_value = backpropagate(logits, loss, labels, output_gradient, retain_graph, self._placement, self._head_note)
            if not retain_graph:
                pending.free(
                    f"the graph of forward {pending.forward_id} was freed by Backward; "
                    "pass retain_graph to backpropagate through it again",
                    "GRAPH_FREED",
                )
                self._keep_budget()
            grads = [p.grad for p in self._parameters() if p.grad is not None]
            norm = global_norm(grads) if grad_norm else None
            if not step:
                return BackwardResult(pending.forward_id, loss_value, len(grads), norm)
            step_count, updated = self._step()
            if zero_grad_after_step:
                self._model.zero_grad(set_to_none=True)
            return BackwardResult(pending.forward_id, loss_value, len(grads), norm, step_count, updated)

    @numbered
    @device_memory
    def step(self, expected_step_count: int | None = None, still_wanted: Callable[[], bool] | None = None,
             *, operation: Operation | None = None) -> StepResult:
        """One optimizer step; returns the step count and how many parameters had a gradient.

        ``expected_step_count`` makes a retried step safe: it is the step count the caller saw before
        this step. One less than the session's count means the step was already taken (its answer
        was lost): nothing is done and the current count is returned, with 0 parameters updated. Any
        other difference is refused. ``still_wanted`` is asked right before stepping.
        """
        if expected_step_count is not None and expected_step_count < 0:
            raise invalid("expected_step_count", f"expected_step_count must be 0 or more, got {expected_step_count}",
                          "BAD_EXPECTED_STEP_COUNT")
        with self._lock:
            if expected_step_count is not None and expected_step_count != self._step_count:
                if expected_step_count + 1 == self._step_count:
                    return StepResult(self._step_count, 0)
                raise FailedPrecondition(
                    f"expected_step_count {expected_step_count} does not fit the session's step count {self._step_count}",
                    "STEP_COUNT_MISMATCH", metadata={"step_count": str(self._step_count)},
                )
            if still_wanted is not None and not still_wanted():
                raise Abandoned("the step was not taken: its caller stopped waiting", "ABANDONED")
            return StepResult(*self._step())

    def _step(self) -> tuple[int, int]:
        updated = sum(1 for g in self._optimizer.param_groups for p in g["params"] if p.grad is not None)
        self._optimizer.step()
        self._step_count += 1
        pending = self._pending
        if updated and pending is not None and pending.logits is not None:
            # A graph kept with retain_graph saved the parameters it was made with, and the step
            # changed them in place: autograd would refuse to backpropagate through it, so it goes.
            fid = pending.forward_id
            pending.free(f"the parameters changed (step {self._step_count}) since forward {fid}; run Forward again", "PARAMETERS_CHANGED")
            self._keep_budget()
        return self._step_count, updated

    @numbered
    @device_memory
    def train_step(self, x: torch.Tensor, loss: LossName, labels: torch.Tensor | None, zero_grad: bool = True,
                   grad_norm: bool = False, max_logits_elements: int | None = None,
                   still_wanted: Callable[[], bool] | None = None, *, operation: Operation | None = None) -> TrainStepResult:
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
        with self._lock:
            check_input(x, False, self._limits, self._placement.input_transform)
            classes = head_of(self._model).out_features
            labels = check_labels(loss, labels, (x.shape[0], classes), self._head_note)
            check_logits_size(x.shape[0], classes, max_logits_elements)
            if not any(p.requires_grad for p in self._parameters()):
                raise FailedPrecondition("every parameter is frozen: a training step has nothing to train", "NO_TRAINABLE_PARAMETERS")
            n, _, h, w = x.shape
            self._budget.check(self, forward_bytes(n, h, w, classes, keeps_graph=True), f"a training step of {n} image(s) of {h}x{w}")
            if still_wanted is not None and not still_wanted():
                raise Abandoned("the training step was not run: its caller stopped waiting", "ABANDONED")
            if zero_grad:
                self._model.zero_grad(set_to_none=True)
            self._pending = None  # as a Forward does: the pending forward is replaced (and its graph freed)
            set_mode(self._model, True)
            logits = self._placement.run(self._model, x)
            self._forward_count += 1
            fid = self._forward_count
            root = backward_from_loss(loss, logits, labels, self._placement, self._head_note)
            self._pending = Pending(fid, None, f"the graph of forward {fid} was freed by TrainStep's backward", "GRAPH_FREED")
            self._keep_budget()
            norm = global_norm([p.grad for p in self._parameters() if p.grad is not None]) if grad_norm else None
            step_count, updated = self._step()
            out = logits.detach().float()
            return TrainStepResult(fid, float(root), out.to("cpu"), tensor_stats(out), step_count, updated, norm)

    @numbered
    def zero_grad(self, set_to_none: bool = True, *, operation: Operation | None = None) -> int:
        """Clears every parameter's .grad; returns how many had one."""
        with self._lock:
            cleared = sum(1 for p in self._parameters() if p.grad is not None)
            self._model.zero_grad(set_to_none=set_to_none)
            return cleared

    def drop_pending(self, why: str) -> bool:
        """Frees the pending forward's graph (Backward then says ``why``); False when none was kept."""
        with self._lock:
            pending = self._pending
            if pending is None or pending.logits is None:
                return False
            pending.free(f"the graph of forward {pending.forward_id} was dropped: {why}", "GRAPH_EXPIRED")
            self._keep_budget()
            return True

    # -- model and optimizer changes ---------------------------------------------------------

    @numbered
    @device_memory
    def configure_optimizer(self, spec: OptimizerSpec, *, operation: Operation | None = None) -> SessionDescription:
        """Replaces the optimizer (its state starts anew); the session as it is then (its ``optimizer``: ``spec``)."""
        spec.validate()
        with self._lock:
            self._optimizer = spec.build(self._model.parameters())
            self._spec = spec
            return self._describe()

    @numbered
    def freeze(self, patterns: list[str], unfreeze: bool = False, *, operation: Operation | None = None) -> FreezeResult:
        """Sets requires_grad on the parameters matching ``patterns`` (False to freeze)."""
        with self._lock:
            return set_trainable(self._model, patterns, unfreeze)

    @numbered
    @device_memory
    def replace_head(self, num_classes: int, seed: int, *, operation: Operation | None = None) -> SessionDescription:
        """``model.fc = nn.Linear(512, num_classes)`` seeded, then a new optimizer over all parameters."""
        if num_classes < 1 or num_classes > MAX_CLASSES:
            raise invalid("num_classes", f"num_classes must be in 1..{MAX_CLASSES}, got {num_classes}", "BAD_NUM_CLASSES")
        with self._lock:
            self._budget.check_model(self, head_bytes(num_classes), f"a head of {num_classes} classes")
            head = new_head(head_of(self._model).in_features, num_classes, seed)
            before = head_of(self._model).out_features
            self._model.fc = head.to(self._device)
            self._head_note = (
                f" (the head has {num_classes} classes since ReplaceHead(num_classes={num_classes}) replaced the one "
                f"of {before}" + ("; ResetSession restores the original" if self._initial is not None else "") + ")"
            )
            self._optimizer = self._spec.build(self._model.parameters())
            if self._pending is not None:
                self._pending.free(f"forward {self._pending.forward_id} was made with the old head, replaced since", "HEAD_REPLACED")
            self._keep_budget()
            return self._describe()

    # -- checkpoints -----------------------------------------------------------------------------

    @device_memory
    def checkpoint(self) -> SessionState:
        """Everything needed to go on bit-identically: weights and buffers, head size, frozen set,
        optimizer settings and state (momentum buffers), step count, and the record of numbered
        operations (engine/ledger.py). Gradients are not kept."""
        with self.ledger.lock, self._lock:  # no numbered call half-way: the record fits the state
            return SessionState.capture(self._model, self._weights, self._spec, self._optimizer, self._step_count,
                                        self.ledger.snapshot(), self._placement.input_transform)

    @device_memory
    def save_checkpoint(self, path: str, quota: checkpoints.Quota | None = None) -> CheckpointInfo:
        """Writes ``checkpoint()`` to the file ``path`` atomically (the caller chose and checked it),
        within ``quota`` when there is one (``checkpoints.save``)."""
        state = self.checkpoint()
        size = checkpoints.save(state, Path(path), quota)
        return CheckpointInfo(state.step_count, size)

    @numbered
    def load_checkpoint(self, path: str, *, operation: Operation | None = None) -> SessionDescription:
        """``restore`` from the checkpoint file ``path``; a missing or bad file leaves the session as it was."""
        return self.restore(checkpoints.load(Path(path)))

    def refuse(self, operation: Operation, error: TrainerError) -> TrainerError:
        """The answer to ``operation``, refused before it reached the session (a bad request): its
        number is used and its repeat refused the same way (``Ledger.refuse``)."""
        return self.ledger.refuse(operation, error)

    def resume(self, path: str) -> SessionDescription:
        """``load_checkpoint`` with the checkpoint's record of numbered operations too: a session
        resumed after a crash goes on numbering where the checkpoint was, and a repeat of a call the
        checkpoint saw is answered from it. A bad file leaves the session as it was."""
        state = checkpoints.load(Path(path))
        try:
            put_back = self.ledger.restore(state.operations or {"next_number": 1, "answers": []})
        except (KeyError, TypeError, ValueError) as exc:
            raise invalid("resume_from", f"the checkpoint's operation record is unreadable: {exc}", "BAD_CHECKPOINT") from exc
        with self.ledger.lock:
            description = self.restore(state)
            put_back(description)
            return replace(description, next_operation=self.ledger.next_number, operation_epoch=self.ledger.epoch)

    @device_memory
    def restore(self, state: SessionState) -> SessionDescription:
        """Puts the session in the state of ``checkpoint()``; the pending forward and gradients are dropped.

        Everything is checked and built aside first, so a bad checkpoint leaves the session as it was.
        """
        with self._lock:
            return self._restore(state)

    def _restore(self, state: SessionState) -> SessionDescription:
        try:
            self._budget.check_model(self, model_bytes(state.num_classes), "loading a checkpoint")
            model, optimizer = state.build(self._model, self._device)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise invalid("name", f"the checkpoint does not fit this session: {exc}", "BAD_CHECKPOINT") from exc
        self._model, self._optimizer, self._spec = model, optimizer, state.optimizer_spec
        self._placement = replace(self._placement, input_transform=state.input_transform)
        self._step_count = state.step_count
        self._weights = state.weights if state.weights is not None else self._weights
        self._pending = None
        self._head_note = ""
        self._keep_budget()
        return self._describe()

    @numbered
    def reset(self, *, operation: Operation | None = None) -> SessionDescription:
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

    @device_memory
    def gradients(
        self, patterns: list[str], stats_only: bool = False, dtype: torch.dtype = torch.float32, with_stats: bool = True
    ) -> list[NamedTensor]:
        """Snapshots of the .grad of the parameters matching ``patterns`` (all when empty)."""
        return self.encode_gradients(patterns, stats_only, dtype, owned, with_stats)

    @device_memory
    def parameters(self, patterns: list[str], stats_only: bool = False, dtype: torch.dtype = torch.float32,
                   include_buffers: bool = False, with_stats: bool = True) -> list[NamedTensor]:
        """Snapshots of parameter values (and buffers) matching ``patterns`` (all when empty)."""
        return self.encode_parameters(patterns, stats_only, dtype, include_buffers, owned, with_stats)

    def encode_gradients(
        self, patterns: list[str], stats_only: bool, dtype: torch.dtype, encode: Callable[[NamedTensor], T],
        with_stats: bool = True, done: Callable[[], None] | None = None, casts: bool = False,
    ) -> list[T]:
        """``encode`` of each .grad matching ``patterns``, in order, called under the session's lock
        with the tensor's own memory when it is already on the CPU in ``dtype`` (no snapshot copy):
        what ``encode`` returns or sends must not keep that tensor, except until ``done``, called
        after the last ``encode`` and still under the lock. ``encode`` may send each result before
        the next tensor is read. ``with_stats`` False skips the statistics. ``casts``: ``encode``
        casts floating tensors to ``dtype`` itself as it copies them, so one already on the CPU
        comes in its own type and memory rather than as a cast copy."""
        return self._snapshot(patterns, stats_only, dtype, lambda p: p.grad, False, encode, with_stats, done, casts)

    def encode_parameters(
        self, patterns: list[str], stats_only: bool, dtype: torch.dtype, include_buffers: bool, encode: Callable[[NamedTensor], T],
        with_stats: bool = True, done: Callable[[], None] | None = None, casts: bool = False,
    ) -> list[T]:
        """``encode_gradients`` for parameter values (and buffers)."""
        return self._snapshot(patterns, stats_only, dtype, lambda p: p, include_buffers, encode, with_stats, done, casts)

    def _snapshot(self, patterns: list[str], stats_only: bool, dtype: torch.dtype, pick: Callable[[torch.Tensor], torch.Tensor | None],
                  include_buffers: bool, encode: Callable[[NamedTensor], T], with_stats: bool = True,
                  done: Callable[[], None] | None = None, casts: bool = False) -> list[T]:
        """``encode`` of each tensor ``pick`` chooses, under the lock (``encode_gradients``)."""
        if stats_only and not with_stats:
            raise invalid("skip_stats", "skip_stats with stats_only would send nothing", "NOTHING_TO_SEND")
        with self._lock:
            chosen = Selection.of(self._model, patterns, pick, include_buffers)
            copies = 0 if stats_only else chosen.copy_bytes(dtype)
            self._budget.check(self, copies, f"a snapshot of {len(chosen.names)} tensor(s)")
            out = chosen.encode(encode, stats_only, dtype, with_stats, self._placement, casts)
            if done is not None:
                done()
            return out

    def graph(self) -> Graph:
        """The autograd graph of the pending forward, from the logits' grad_fn to the leaf parameters."""
        with self._lock:
            pending, logits = require_graph(self._pending)
            if logits.grad_fn is None:
                raise FailedPrecondition(pending.unusable_because, pending.reason)
            names = {id(p): n for n, p in self._model.named_parameters()}
            return autograd_graph(pending.forward_id, logits.grad_fn, names)

    def describe(self) -> SessionDescription:
        """What the session holds: now, or while a call holds the session, as the last call left it (never waits)."""
        return self._lock.now_or_last()

    def _parameters(self) -> list[nn.Parameter]:
        """The model's parameters, listed again only when the model or its head (the one part ever
        replaced) is another: listing them walks every module (~60 us for resnet18 on a 2.8 GHz
        core), and the session is described each time a call lets it go."""
        model = self._model
        head = head_of(model)
        if self._listed is None or self._listed[0] is not model or self._listed[1] is not head:
            self._listed = (model, head, list(model.parameters()))
        return self._listed[2]

    def _describe(self) -> SessionDescription:
        params = self._parameters()
        trainable = sum(1 for p in params if p.requires_grad)
        return SessionDescription(
            model="resnet18",
            weights=self._weights,
            device=str(self._device),
            num_classes=head_of(self._model).out_features,
            optimizer=self._spec,
            step_count=self._step_count,
            pending_forward_id=self._pending.kept_id if self._pending is not None else 0,
            trainable_parameters=trainable,
            frozen_parameters=len(params) - trainable,
            autocast=self._placement.autocast,
            memory_format="channels_last" if self._placement.channels_last else "contiguous",
            next_operation=self.ledger.next_number,
            operation_epoch=self.ledger.epoch,
            input_transform=self._placement.input_transform,
        )
