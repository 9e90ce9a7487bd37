"""The torch work of one session: a resnet18, its optimizer, its gradients and its pending forward.

``SessionEngine`` is the whole interface between the transport and PyTorch. It takes and returns
torch tensors and small dataclasses, imports neither grpc nor the generated code, and serialises
its calls with a lock, so a session can be driven from many threads (or, later, live elsewhere).

Every method validates its inputs before it changes anything: a rejected call leaves the session
exactly as it was.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fnmatch
import math
import threading
from collections.abc import Callable, Iterable
import copy
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from server.errors import FailedPrecondition, NotFound, ResourceExhausted, invalid
from server.models import head_of, new_head

LossName = Literal["sum", "cross_entropy", "mse"]
OptimizerName = Literal["sgd", "adam", "adamw"]
Distribution = Literal["zeros", "ones", "uniform", "normal", "randint"]

_FLOAT32_MAX = float(torch.finfo(torch.float32).max)

# ResNet halves the image five times (to 1/32); smaller images collapse before the last stage.
MIN_IMAGE_SIZE = 32


@dataclass(frozen=True)
class OptimizerSpec:
    """A torch.optim optimizer with every value filled in (torch's defaults for unset ones)."""

    kind: OptimizerName = "sgd"
    lr: float = 1e-3
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    amsgrad: bool = False

    @staticmethod
    def tutorial() -> OptimizerSpec:
        """The tutorial's ``optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)``."""
        return OptimizerSpec(kind="sgd", lr=1e-2, momentum=0.9)

    @staticmethod
    def with_defaults(kind: OptimizerName, **given: float | bool) -> OptimizerSpec:
        """The spec of ``kind`` with torch's defaults for whatever is not given."""
        base = OptimizerSpec(kind=kind, lr=1e-3, weight_decay=0.01 if kind == "adamw" else 0.0)
        return replace(base, **given)  # type: ignore[arg-type]

    def validate(self) -> None:
        """Refuses values torch.optim would refuse, with the field named."""
        checks: list[tuple[str, float, bool, str]] = [
            ("lr", self.lr, self.lr >= 0, "must be finite and >= 0"),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0, "must be finite and >= 0"),
            ("eps", self.eps, self.eps >= 0, "must be finite and >= 0"),
        ]
        if self.kind == "sgd":
            checks.append(("momentum", self.momentum, self.momentum >= 0, "must be finite and >= 0"))
            checks.append(("dampening", self.dampening, True, "must be finite"))
        else:
            checks.append(("beta1", self.beta1, 0 <= self.beta1 < 1, "must be in [0, 1)"))
            checks.append(("beta2", self.beta2, 0 <= self.beta2 < 1, "must be in [0, 1)"))
        for name, value, ok, rule in checks:
            # torch's kernels take these as float32 scalars (add_(grad, alpha=-lr)): a larger value
            # would make every later step fail, so "finite" means finite in float32.
            if not math.isfinite(value) or abs(value) > _FLOAT32_MAX or not ok:
                raise invalid(f"optimizer.{name}", f"optimizer {name} {rule}, got {value}", "BAD_OPTIMIZER_VALUE")
        if self.kind == "sgd" and self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise invalid("optimizer.nesterov", "nesterov momentum needs momentum > 0 and dampening 0", "BAD_OPTIMIZER_VALUE")

    def build(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """The torch optimizer over ``params``."""
        if self.kind == "sgd":
            return torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, dampening=self.dampening,
                weight_decay=self.weight_decay, nesterov=self.nesterov,
            )
        cls = torch.optim.Adam if self.kind == "adam" else torch.optim.AdamW
        return cls(
            params, lr=self.lr, betas=(self.beta1, self.beta2), eps=self.eps,
            weight_decay=self.weight_decay, amsgrad=self.amsgrad,
        )


@dataclass(frozen=True)
class Limits:
    """Input limits a session enforces."""

    max_input_elements: int = 4 * 32 * 3 * 224 * 224
    max_batch: int = 256


@dataclass(frozen=True)
class Stats:
    """Summary of a tensor, computed in float32 on its device."""

    norm: float
    min: float
    max: float
    mean: float
    non_finite_count: int
    num_elements: int


@dataclass(frozen=True)
class ForwardResult:
    """What Forward made: its id and the logits (detached, on the CPU)."""

    forward_id: int
    logits: torch.Tensor
    stats: Stats


@dataclass(frozen=True)
class BackwardResult:
    """What Backward did."""

    forward_id: int
    loss: float | None
    parameters_with_grad: int
    grad_norm: float


@dataclass(frozen=True)
class ParameterInfo:
    """One parameter as ListParameters shows it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool
    has_grad: bool


@dataclass(frozen=True)
class NamedTensor:
    """A snapshot of one parameter's value or gradient, ready to send; ``tensor`` None when absent."""

    name: str
    shape: tuple[int, ...]
    tensor: torch.Tensor | None
    stats: Stats | None


@dataclass(frozen=True)
class FreezeResult:
    """What FreezeLayers changed and what is trainable afterwards."""

    changed: list[str]
    trainable: list[str]
    frozen_count: int


@dataclass(frozen=True)
class GraphNode:
    """A node of the autograd graph: a backward function, or AccumulateGrad of a parameter."""

    id: int
    function: str
    parameter: str = ""


@dataclass(frozen=True)
class Graph:
    """The autograd graph of a pending forward."""

    forward_id: int
    root_id: int
    nodes: list[GraphNode]
    edges: list[tuple[int, int]]
    leaf_parameters: list[str]
    excluded_parameters: list[str]


@dataclass(frozen=True)
class SessionDescription:
    """What a session holds."""

    model: str
    weights: str
    device: str
    num_classes: int
    optimizer: OptimizerSpec
    step_count: int
    pending_forward_id: int
    trainable_parameters: int
    frozen_parameters: int


@dataclass
class _Pending:
    """The last forward: its logits while its graph lives, or why Backward cannot use it."""

    forward_id: int
    logits: torch.Tensor | None
    unusable_because: str = ""
    reason: str = ""


CHECKPOINT_FORMAT = "trainer.v1/session-checkpoint/1"


def _to_cpu(value: object) -> object:
    """A copy of a (nested) optimizer state with every tensor on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


def tensor_stats(t: torch.Tensor) -> Stats:
    """Norm, min, max, mean and non-finite count of ``t``, in float32."""
    f = t.detach().float()
    n = f.numel()
    if n == 0:
        return Stats(0.0, math.nan, math.nan, math.nan, 0, 0)
    norm = torch.linalg.vector_norm(f)
    lo, hi = torch.aminmax(f)
    summary = torch.stack([norm, lo, hi, f.mean()]).tolist()
    non_finite = 0 if math.isfinite(summary[0]) else int((~torch.isfinite(f)).sum())
    return Stats(summary[0], summary[1], summary[2], summary[3], non_finite, n)


def generate(shape: tuple[int, ...], distribution: Distribution, seed: int, high: int = 0) -> torch.Tensor:
    """A tensor made on the CPU with its own generator, reproducible by any client."""
    g = torch.Generator().manual_seed(seed)
    if distribution == "zeros":
        return torch.zeros(shape)
    if distribution == "ones":
        return torch.ones(shape)
    if distribution == "uniform":
        return torch.rand(shape, generator=g)
    if distribution == "normal":
        return torch.randn(shape, generator=g)
    if high < 1:
        raise invalid("generate.high", f"randint needs high >= 1, got {high}", "BAD_GENERATOR")
    return torch.randint(high, shape, generator=g)


def match_patterns(names: list[str], patterns: Iterable[str], field_name: str = "patterns") -> list[str]:
    """Names matching any pattern, in ``names`` order.

    A pattern is a glob on the full name ("layer4.*", "*") or a module prefix ("layer1" matches
    "layer1.0.conv1.weight"). A pattern that matches nothing is refused, naming it.
    """
    chosen: set[str] = set()
    for pattern in patterns:
        if not pattern:
            raise invalid(field_name, "an empty pattern matches nothing", "PATTERN_MATCHES_NOTHING")
        hits = {n for n in names if fnmatch.fnmatchcase(n, pattern) or n.startswith(pattern + ".") or n == pattern}
        if not hits and not any(ch in pattern for ch in "*?["):
            raise NotFound(f"no parameter or module named {pattern!r}", "PARAMETER_NOT_FOUND")
        if not hits:
            raise invalid(field_name, f"pattern {pattern!r} matches no parameter", "PATTERN_MATCHES_NOTHING")
        chosen |= hits
    return [n for n in names if n in chosen]


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
        return trim
    except (OSError, AttributeError):  # not glibc
        return None


_malloc_trim = _load_malloc_trim()


def release_freed_memory() -> None:
    """Hands memory that closed sessions freed back to the operating system.

    glibc keeps freed heap pages (in every thread's arena) for reuse, so without this a closed
    session's 140 MB of weights, gradients and optimizer state stay in the server's RSS; the CUDA
    caching allocator likewise keeps freed blocks reserved. Costs about a millisecond.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)
    if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        torch.cuda.empty_cache()


def _require_finite(t: torch.Tensor, field_name: str) -> None:
    if not t.is_floating_point():
        return
    # A finite sum proves every element finite (NaN and infinity propagate through a sum) and costs
    # one pass with no temporary, a twentieth of isfinite(t).all() on a 19 MB batch; only a sum
    # that is not finite (a bad element, or an overflow) needs the exact check.
    if math.isfinite(float(t.sum())):
        return
    if not bool(torch.isfinite(t).all()):
        raise invalid(field_name, f"{field_name} contains NaN or infinite values", "NON_FINITE_VALUES")


def _require_float32(t: torch.Tensor, field_name: str) -> None:
    if t.dtype != torch.float32:
        raise invalid(field_name, f"{field_name} must be float32, got {str(t.dtype).removeprefix('torch.')}", "WRONG_DTYPE")


class SessionEngine:
    """One model with its optimizer, gradients and pending forward; every method is thread-safe."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        weights: str,
        optimizer: OptimizerSpec,
        limits: Limits,
    ) -> None:
        optimizer.validate()
        self._lock = threading.Lock()
        self._model = model.to(device)
        self._device = device
        self._weights = weights
        self._limits = limits
        self._spec = optimizer
        self._optimizer = optimizer.build(self._model.parameters())
        self._step_count = 0
        self._forward_count = 0
        self._pending: _Pending | None = None

    # -- training step -------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, eval_mode: bool = False, no_grad: bool = False) -> ForwardResult:
        """``model(x)`` in train or eval mode, keeping the graph for Backward unless ``no_grad``."""
        self._check_input(x, eval_mode)
        with self._lock:
            self._pending = None  # a new forward replaces the pending one (and frees its graph)
            self._model.train(not eval_mode)
            with torch.set_grad_enabled(not no_grad):
                logits = self._model(x.to(self._device, non_blocking=True))
            self._forward_count += 1
            fid = self._forward_count
            if no_grad:
                self._pending = _Pending(fid, None, f"forward {fid} ran with no_grad: no graph was kept", "NO_GRAPH")
            elif not logits.requires_grad:
                self._pending = _Pending(fid, None, f"forward {fid} has no graph: every parameter is frozen", "NO_TRAINABLE_PARAMETERS")
            else:
                self._pending = _Pending(fid, logits)
            out = logits.detach()
            return ForwardResult(fid, out.to("cpu"), tensor_stats(out))

    def _check_input(self, x: torch.Tensor, eval_mode: bool) -> None:
        _require_float32(x, "input")
        if x.dim() != 4:
            raise invalid("input", f"input must have shape (N, 3, H, W), got rank {x.dim()} shape {list(x.shape)}", "BAD_INPUT_SHAPE")
        n, c, h, w = x.shape
        if c != 3:
            raise invalid("input", f"input must have 3 channels (N, 3, H, W), got {c} in shape {list(x.shape)}", "BAD_INPUT_SHAPE")
        if n < 1:
            raise invalid("input", "input batch is empty", "BAD_INPUT_SHAPE")
        if h < MIN_IMAGE_SIZE or w < MIN_IMAGE_SIZE:
            raise invalid("input", f"input images must be at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}, got {h}x{w}", "IMAGE_TOO_SMALL")
        if n > self._limits.max_batch:
            raise ResourceExhausted(f"batch {n} is over the limit max_batch={self._limits.max_batch}", "BATCH_TOO_LARGE",
                                    metadata={"limit": str(self._limits.max_batch)})
        if not eval_mode and n * math.ceil(h / 32) * math.ceil(w / 32) < 2:
            raise invalid(
                "input",
                f"a training-mode forward of {n} image(s) of {h}x{w} leaves BatchNorm one value per channel "
                "in the last stage; send a batch of 2 or more, larger images, or use eval_mode",
                "BATCH_TOO_SMALL_FOR_TRAINING",
            )
        _require_finite(x, "input")

    def backward(
        self,
        forward_id: int = 0,
        loss: LossName | None = None,
        labels: torch.Tensor | None = None,
        output_gradient: torch.Tensor | None = None,
        retain_graph: bool = False,
    ) -> BackwardResult:
        """Backpropagates from the pending forward: from ``loss(logits, labels)`` or from
        ``logits.backward(gradient=output_gradient)``; gradients accumulate as in PyTorch."""
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
                _require_float32(output_gradient, "output_gradient")
                if tuple(output_gradient.shape) != tuple(logits.shape):
                    raise invalid(
                        "output_gradient",
                        f"output_gradient must have the logits' shape {list(logits.shape)}, got {list(output_gradient.shape)}",
                        "BAD_OUTPUT_GRADIENT_SHAPE",
                    )
                _require_finite(output_gradient, "output_gradient")
                logits.backward(gradient=output_gradient.to(self._device, non_blocking=True), retain_graph=retain_graph)  # type: ignore[no-untyped-call]
                loss_value = None
            if not retain_graph:
                pending.logits = None
                pending.unusable_because = (
                    f"the graph of forward {pending.forward_id} was freed by Backward; "
                    "pass retain_graph to backpropagate through it again"
                )
                pending.reason = "GRAPH_FREED"
            grads = [p.grad for p in self._model.parameters() if p.grad is not None]
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))) if grads else 0.0
            return BackwardResult(pending.forward_id, loss_value, len(grads), norm)

    def _loss(self, loss: LossName, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None:
            raise invalid("loss.labels", f"loss {loss} needs labels", "MISSING_LABELS")
        if loss == "cross_entropy":
            if labels.dtype != torch.int64:
                raise invalid("loss.labels", f"cross_entropy labels must be int64 class indices, got {labels.dtype}", "WRONG_DTYPE")
            if tuple(labels.shape) != (logits.shape[0],):
                raise invalid("loss.labels", f"cross_entropy labels must have shape [{logits.shape[0]}], got {list(labels.shape)}", "BAD_LABEL_SHAPE")
            classes = logits.shape[1]
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
                raise invalid("loss.labels", f"class indices must be in [0, {classes}), got {labels.tolist()}", "CLASS_INDEX_OUT_OF_RANGE")
            return F.cross_entropy(logits, labels.to(self._device))
        _require_float32(labels, "loss.labels")
        if tuple(labels.shape) != tuple(logits.shape):
            raise invalid("loss.labels", f"{loss} labels must have the logits' shape {list(logits.shape)}, got {list(labels.shape)}", "BAD_LABEL_SHAPE")
        _require_finite(labels, "loss.labels")
        target = labels.to(self._device, non_blocking=True)
        if loss == "sum":
            return (logits - target).sum()
        return F.mse_loss(logits, target)

    def step(self) -> tuple[int, int]:
        """One optimizer step; returns the step count and how many parameters had a gradient."""
        with self._lock:
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
            return self._step_count, updated

    def zero_grad(self, set_to_none: bool = True) -> int:
        """Clears every parameter's .grad; returns how many had one."""
        with self._lock:
            cleared = sum(1 for p in self._model.parameters() if p.grad is not None)
            self._model.zero_grad(set_to_none=set_to_none)
            return cleared

    # -- model and optimizer changes ---------------------------------------------------------

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

    def replace_head(self, num_classes: int, seed: int) -> SessionDescription:
        """``model.fc = nn.Linear(512, num_classes)`` seeded, then a new optimizer over all parameters."""
        if num_classes < 1 or num_classes > 1_000_000:
            raise invalid("num_classes", f"num_classes must be in 1..1000000, got {num_classes}", "BAD_NUM_CLASSES")
        head = new_head(head_of(self._model).in_features, num_classes, seed)
        with self._lock:
            self._model.fc = head.to(self._device)
            self._optimizer = self._spec.build(self._model.parameters())
            if self._pending is not None:
                fid = self._pending.forward_id
                self._pending = _Pending(fid, None, f"forward {fid} was made with the old head, replaced since", "HEAD_REPLACED")
            return self._describe()

    # -- checkpoints -----------------------------------------------------------------------------

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
                "optimizer_state": _to_cpu(self._optimizer.state_dict()),
                "step_count": self._step_count,
            }

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
        return self._describe()

    # -- reading state -------------------------------------------------------------------------

    def parameters_info(self) -> list[ParameterInfo]:
        """Every parameter in model order."""
        with self._lock:
            return [
                ParameterInfo(n, tuple(p.shape), p.dtype, p.requires_grad, p.grad is not None)
                for n, p in self._model.named_parameters()
            ]

    def gradients(self, patterns: list[str], stats_only: bool = False, dtype: torch.dtype = torch.float32) -> list[NamedTensor]:
        """Snapshots of the .grad of the parameters matching ``patterns`` (all when empty)."""
        return self._snapshot(patterns, stats_only, dtype, lambda p: p.grad, include_buffers=False)

    def parameters(
        self, patterns: list[str], stats_only: bool = False, dtype: torch.dtype = torch.float32, include_buffers: bool = False
    ) -> list[NamedTensor]:
        """Snapshots of parameter values (and buffers) matching ``patterns`` (all when empty)."""
        return self._snapshot(patterns, stats_only, dtype, lambda p: p, include_buffers)

    def _snapshot(
        self,
        patterns: list[str],
        stats_only: bool,
        dtype: torch.dtype,
        pick: Callable[[torch.Tensor], torch.Tensor | None],
        include_buffers: bool,
    ) -> list[NamedTensor]:
        with self._lock:
            tensors: dict[str, torch.Tensor] = dict(self._model.named_parameters())
            if include_buffers:
                tensors.update(self._model.named_buffers())
            names = match_patterns(list(tensors), patterns) if patterns else list(tensors)
            out = []
            for name in names:
                source = tensors[name]
                value = pick(source)
                if value is None:
                    out.append(NamedTensor(name, tuple(source.shape), None, None))
                    continue
                value = value.detach()
                stats = tensor_stats(value)
                snapshot = None
                if not stats_only:
                    # A copy on the CPU in the transfer type, so later steps cannot change what is sent.
                    target = dtype if value.is_floating_point() else value.dtype
                    snapshot = value.to("cpu", target, copy=True).contiguous()
                out.append(NamedTensor(name, tuple(value.shape), snapshot, stats))
            return out

    def graph(self) -> Graph:
        """The autograd graph of the pending forward, from the logits' grad_fn to the leaf parameters."""
        with self._lock:
            pending = self._pending
            if pending is None:
                raise FailedPrecondition("no pending forward: call Forward first", "NO_PENDING_FORWARD")
            if pending.logits is None or pending.logits.grad_fn is None:
                raise FailedPrecondition(pending.unusable_because, pending.reason)
            names = {id(p): n for n, p in self._model.named_parameters()}
            root = pending.logits.grad_fn
            ids: dict[object, int] = {root: 0}
            nodes = [GraphNode(0, type(root).__name__)]
            edges: list[tuple[int, int]] = []
            leaves: list[str] = []
            todo = [root]
            while todo:
                fn = todo.pop()
                for nxt, _ in fn.next_functions:
                    if nxt is None:
                        continue
                    if nxt not in ids:
                        ids[nxt] = len(nodes)
                        variable = getattr(nxt, "variable", None)
                        param = names.get(id(variable), "") if variable is not None else ""
                        if param:
                            leaves.append(param)
                        nodes.append(GraphNode(ids[nxt], type(nxt).__name__, param))
                        todo.append(nxt)
                    edges.append((ids[fn], ids[nxt]))
            order = list(names.values())
            leaf_set = set(leaves)
            return Graph(
                pending.forward_id, 0, nodes, edges,
                [n for n in order if n in leaf_set], [n for n in order if n not in leaf_set],
            )

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
        )
