"""The server's resnet18 as a local-looking ``nn.Module``: the tutorial with one line changed.

::

    model = RemoteModel("localhost:50051")       # instead of resnet18(weights=...)
    prediction = model(data)                     # Forward on the server
    loss = (prediction - labels).sum()           # computed here, any loss you like
    loss.backward()                              # d(loss)/d(logits) goes to the server's Backward
    optim = model.sgd(lr=1e-2, momentum=0.9)     # or SGD(model.parameters(), lr=1e-2, momentum=0.9)
    optim.step()                                 # Step on the server
    model.fc.weight.grad                         # fetched from the server

The logits come back through a ``torch.autograd.Function`` (as hivemind's remote experts do):
its backward sends the gradient of the logits to the server, which backpropagates it through the
model there, so the parameters' ``.grad`` live on the server. ``model.fc.weight`` is a handle
whose ``.grad`` and ``.data`` are fetched when read and whose ``requires_grad`` freezes the
parameter when set. ``torch.no_grad()`` gives a forward that keeps no graph; ``model.eval()`` a
forward in eval mode. The gradient with respect to the *input* is not sent back (the server
computes parameter gradients only).

``SGD(model.parameters(), ..., step_on_backward=True)`` makes a step two round trips (Forward,
then Backward): ``loss.backward()`` also runs the optimizer step and clears the gradients on the
server in the same call, so the ``optim.step()`` and ``optim.zero_grad()`` that follow send
nothing. The numbers equal the four-call loop's; what differs is that ``.grad`` read between
``loss.backward()`` and the next backward is already cleared (None), and that gradients cannot be
accumulated over several backwards before a step.

The handles ``model.fc.weight`` and ``model.layer4`` live in ``remote_handles``. This module needs
torch on the client; the rest of the SDK does not (``import remote_trainer.client`` never imports
this module).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, NoReturn

import torch
from torch import nn

from remote_trainer.client.client import Session, TrainerClient
from remote_trainer.client.remote_handles import RemoteModule, RemoteParameter, to_tensor
from remote_trainer.client.retry import RetryPolicy
from remote_trainer.client.types import BackwardResult, Graph, InputTransform, Optimizer, ParameterList, SessionInfo
from remote_trainer.contract.names import AutocastName, InputTransformName, MemoryFormatName

__all__ = ["Adam", "RemoteModel", "RemoteModule", "RemoteOptimizer", "RemoteParameter", "SGD"]


class _RemoteLogits(torch.autograd.Function):
    """Logits the server computed, joined to the local autograd graph.

    ``anchor`` is an empty tensor that requires grad, so the logits require grad even though no
    local tensor that made them does; backward sends the logits' gradient to the server.
    """

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, logits: torch.Tensor, model: RemoteModel, forward_id: int) -> torch.Tensor:
        ctx.model = model
        ctx.forward_id = forward_id
        return logits.clone()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[None, None, None, None]:
        # Differentiable once, as ``@once_differentiable`` marks a function: the backward runs on the
        # server, so there is no graph of it here to differentiate again. That decorator alone would
        # not say so (this function returns no gradient to wrap), hence the explicit refusal: grad
        # mode is on inside a backward exactly when ``create_graph=True`` asked for its graph.
        if torch.is_grad_enabled():
            raise RuntimeError(
                "RemoteModel's logits are differentiable once: backward(create_graph=True) (double backward, gradient "
                "penalties, higher-order gradients) needs a graph of the backward pass, which runs on the server and "
                "stays there; nothing was sent. Call backward() without create_graph."
            )
        model: RemoteModel = ctx.model
        gradient = grad_output.detach().to("cpu", torch.float32).numpy()
        fused = model._step_on_backward
        model.last_backward = model.session.backward(
            output_gradient=gradient, forward_id=ctx.forward_id, step=fused, zero_grad_after_step=fused
        )
        if fused:
            model._step_done_by_backward = model.last_backward.step_count
            model._grads_cleared = True
        return None, None, None, None


class RemoteModel(nn.Module):
    """A session on a training server, used like the local resnet18 it holds.

    ``RemoteModel("localhost:50051")`` drives the server's default session;
    ``RemoteModel(client.session(id))`` or ``RemoteModel(client)`` use a session of an existing
    client; ``RemoteModel.create(target, weights=...)`` makes a new session, closed by ``close()``
    (or on leaving a ``with`` block). Calls are retried by the client's ``retry_policy``; ``retry``
    is that of the client a model opens itself (from a target string).

    Making one asks the server for the model's parameter names (one ``ListParameters``), so that
    reading an attribute (``model.fc``, ``hasattr(model, "layer4")``) never makes a call; only
    reading a value (``.grad``, ``.data``) or calling a method does. What ``nn.Module`` does
    locally is said, never silently skipped: ``state_dict()`` fetches the server's weights,
    ``load_state_dict()`` refuses (no call uploads weights into a session) and says what does,
    ``.to(device)``/``.cuda()``/``.cpu()`` warn that the model stays on the server, and casts to
    another dtype refuse with a pointer to ``autocast``.
    """

    last_backward: BackwardResult | None

    def __init__(
        self, target: str | TrainerClient | Session = "localhost:50051", *, session_id: str = "", timeout: float = 120.0,
        retry: RetryPolicy | None = RetryPolicy(),
    ) -> None:
        super().__init__()
        self._own_client: TrainerClient | None = None
        self._own_session = False
        if isinstance(target, Session):
            self._session = target
        else:
            if isinstance(target, str):
                target = self._own_client = TrainerClient(target, timeout=timeout, retry=retry)
            self._session = target.session(session_id)
        try:  # the names attribute access looks in, asked once here (never by ``model.fc`` or hasattr)
            self._parameters_cache: ParameterList = self._session.list_parameters()
        except BaseException:
            if self._own_client is not None:
                self._own_client.close()
            raise
        # requires_grad as the server last said it, and the changes made here not yet sent.
        self._known_requires_grad: dict[str, bool] | None = None
        self._pending_requires_grad: dict[str, bool] = {}
        # Requires grad, so that logits made on the server are part of the local autograd graph.
        self._anchor = torch.empty(0, requires_grad=True)
        self.last_backward = None
        # Set by an optimizer made with step_on_backward: Backward then also steps and zeroes.
        self._step_on_backward = False
        self._step_done_by_backward: int | None = None  # the step count of a step Backward took, not yet claimed by optim.step()
        self._grads_cleared = False  # the last Backward cleared every .grad after its step

    @classmethod
    def create(
        cls,
        target: str | TrainerClient = "localhost:50051",
        weights: str = "random",
        *,
        num_classes: int = 0,
        seed: int = 0,
        optimizer: Optimizer | None = None,
        autocast: AutocastName | None = None,
        memory_format: MemoryFormatName | None = None,
        input_transform: InputTransform | InputTransformName | None = None,
        timeout: float = 120.0,
        retry: RetryPolicy | None = RetryPolicy(),
    ) -> RemoteModel:
        """A new session on the server ("random" seeded weights, "imagenet", or a file in its data dir),
        with the per-session options of ``TrainerClient.create_session``: ``autocast`` ("off", "bf16",
        "fp16") and ``memory_format`` ("contiguous", "channels_last"; None: the server's setting), and
        ``input_transform`` ("imagenet", "scale" or an ``InputTransform``), which lets ``model(x)`` take
        uint8 images, normalised on the server."""
        own = TrainerClient(target, timeout=timeout, retry=retry) if isinstance(target, str) else None
        client = own or target
        if not isinstance(client, TrainerClient):
            raise TypeError(f"RemoteModel.create takes a target address or a TrainerClient, got {type(target).__name__}")
        session: Session | None = None
        try:
            session = client.create_session(weights, num_classes=num_classes, seed=seed, optimizer=optimizer,
                                            autocast=autocast, memory_format=memory_format,
                                            input_transform=input_transform)
            model = cls(session)
        except BaseException:
            try:
                if session is not None:
                    session.close()
            finally:
                if own is not None:
                    own.close()
            raise
        model._own_client = own
        model._own_session = True
        return model

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Closes the session if this model created it, and the connection if it opened it; idempotent."""
        try:
            if not self._own_session and self._pending_requires_grad:
                self._flush_requires_grad()  # a shared session keeps the changes made here
            if self._own_session:
                self._own_session = False
                self._session.close()
        finally:
            if self._own_client is not None:
                self._own_client.close()
                self._own_client = None

    def __enter__(self) -> RemoteModel:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def session(self) -> Session:
        """The SDK session underneath, for everything the SDK offers (requires_grad changes not yet
        sent are sent first, so every call sees them)."""
        self._flush_requires_grad()
        return self._session

    # -- forward -------------------------------------------------------------------------------

    def forward(self, x: Any) -> torch.Tensor:
        """``model(x)`` on the server for a batch (N, 3, H, W); logits (N, classes) on x's device. ``x``
        is float (sent as float32), or uint8 images on a session made with an ``input_transform``.

        With grad enabled the logits carry a graph: ``backward`` through them reaches the server.
        Under ``torch.no_grad()`` the server keeps no graph either. ``model.eval()`` runs the server
        in eval mode (BatchNorm running statistics used and left alone).
        """
        device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
        grad = torch.is_grad_enabled()
        result = self.session.forward(x, eval_mode=not self.training, no_grad=not grad)
        logits = to_tensor(result.logits)
        if grad:
            logits = _RemoteLogits.apply(self._anchor, logits, self, result.forward_id)
        return logits.to(device)

    # -- parameters ------------------------------------------------------------------------------

    def _parameter_list(self, refresh: bool = False) -> ParameterList:
        """The parameters as the server last listed them (at construction, or since), asked anew on ``refresh``."""
        if refresh:
            self._parameters_cache = self.session.list_parameters()
        return self._parameters_cache

    def _names(self) -> list[str]:
        return [p.name for p in self._parameter_list().parameters]

    def _handle(self, name: str) -> RemoteModule | RemoteParameter:
        names = self._names()
        if name in names:
            return RemoteParameter(self, name)
        if any(n.startswith(name + ".") for n in names):
            return RemoteModule(self, name)
        raise AttributeError(f"the remote model has no parameter or module {name!r}")

    def __getattr__(self, name: str) -> Any:
        """``model.fc``, ``model.layer4``: a handle, from the names known since construction (no call)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or "_parameters_cache" not in self.__dict__:
                raise
        return self._handle(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, nn.Module) and not name.startswith("_") and name in {n.split(".")[0] for n in self._names()}:
            raise TypeError(
                f"model.{name} lives on the server and cannot be replaced by a local module; "
                f"for a new classifier use model.replace_head(num_classes), the server's nn.Linear(512, num_classes)"
            )
        super().__setattr__(name, value)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True) -> Iterator[tuple[str, RemoteParameter]]:  # type: ignore[override]
        """(name, handle) of every parameter of the server's model, in model order."""
        for name in self._names():
            yield prefix + name, RemoteParameter(self, name)

    def parameters(self, recurse: bool = True) -> Iterator[RemoteParameter]:  # type: ignore[override]
        """Handles on every parameter of the server's model, in model order."""
        return (p for _, p in self.named_parameters())

    def list_parameters(self) -> ParameterList:
        """Every parameter with shape, requires_grad and whether it has a .grad (asked now; what this
        model knows of requires_grad is refreshed from it)."""
        self._flush_requires_grad()
        self._known_requires_grad = None
        return self._parameter_list(refresh=True)

    def _set_requires_grad(self, patterns: list[str], requires_grad: bool) -> None:
        result = self.session.unfreeze(*patterns) if requires_grad else self.session.freeze(*patterns)
        self._learn_trainable(result.trainable)

    def _learn_trainable(self, trainable: list[str]) -> None:
        """What a FreezeLayers answer says: exactly these parameters are trainable."""
        chosen = set(trainable)
        self._known_requires_grad = {name: name in chosen for name in self._names()}

    def _known(self) -> dict[str, bool]:
        if self._known_requires_grad is None:
            self._known_requires_grad = {p.name: p.requires_grad for p in self._parameter_list().parameters}
        return self._known_requires_grad

    def _requires_grad_of(self, name: str) -> bool:
        if name in self._pending_requires_grad:
            return self._pending_requires_grad[name]
        return self._known()[name]

    def _defer_requires_grad(self, name: str, requires_grad: bool) -> None:
        """Notes a change of one parameter's requires_grad, sent by the next ``_flush_requires_grad``."""
        known = self._known()
        if name not in known:
            raise AttributeError(f"the remote model has no parameter {name!r}")
        if known[name] == bool(requires_grad):
            self._pending_requires_grad.pop(name, None)  # back to what the server has: nothing to send
        else:
            self._pending_requires_grad[name] = bool(requires_grad)

    def _flush_requires_grad(self) -> None:
        """Sends the requires_grad changes not yet sent: one FreezeLayers call for those to freeze,
        one for those to unfreeze (none when nothing changed)."""
        if not self._pending_requires_grad:
            return
        pending, self._pending_requires_grad = self._pending_requires_grad, {}
        for value in (False, True):
            names = [n for n, v in pending.items() if v == value]
            if names:
                result = self._session.unfreeze(*names) if value else self._session.freeze(*names)
                self._learn_trainable(result.trainable)

    def requires_grad_(self, requires_grad: bool = True) -> RemoteModel:
        """Freezes (False) or unfreezes (True) every parameter, in one call."""
        self._set_requires_grad(["*"], requires_grad)
        return self

    def freeze(self, *patterns: str) -> list[str]:
        """Freezes parameters by name pattern ("layer4.*", "layer1", "*"); returns the trainable ones after."""
        trainable = self.session.freeze(*patterns).trainable
        self._learn_trainable(trainable)
        return trainable

    def unfreeze(self, *patterns: str) -> list[str]:
        """Unfreezes parameters by name pattern; returns the trainable ones after."""
        trainable = self.session.unfreeze(*patterns).trainable
        self._learn_trainable(trainable)
        return trainable

    def replace_head(self, num_classes: int, seed: int = 0) -> RemoteModule:
        """``model.fc = nn.Linear(512, num_classes)`` on the server (initialised after ``torch.manual_seed(seed)``).

        The new head is trainable, as a new ``nn.Linear`` is; the server's optimizer is rebuilt over
        the new parameters. Returns the handle ``model.fc``.
        """
        self.session.replace_head(num_classes, seed)
        self._parameter_list(refresh=True)
        self._known_requires_grad = None
        return RemoteModule(self, "fc")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears every parameter's ``.grad`` on the server."""
        self.session.zero_grad(set_to_none)

    def fetch_state_dict(self, include_buffers: bool = True) -> dict[str, torch.Tensor]:
        """Every parameter (and buffer) value as a torch tensor: ``local.load_state_dict(...)`` takes it."""
        return {
            name: to_tensor(t.array)
            for name, t in self.session.parameters(include_buffers=include_buffers, stats=False).items()
            if t.array is not None
        }

    def state_dict(  # type: ignore[override]
        self, *args: Any, destination: dict[str, Any] | None = None, prefix: str = "", keep_vars: bool = False
    ) -> dict[str, Any]:
        """The server's weights and buffers as torch tensors (copies, fetched now in one GetParameters
        stream), by ``nn.Module``'s names: ``resnet18().load_state_dict(model.state_dict())`` works,
        and so does ``torch.save(model.state_dict(), "name.pt")``. ``nn.Module``'s own would be empty."""
        if args:
            raise TypeError("RemoteModel.state_dict() takes keyword arguments only (destination=, prefix=)")
        result: dict[str, Any] = OrderedDict() if destination is None else destination
        fetched = self.fetch_state_dict()  # the parameters in model order, then the buffers
        by_module: dict[str, list[str]] = {}  # nn.Module's order: each module's parameters, then its buffers
        for name in fetched:
            by_module.setdefault(name.rpartition(".")[0], []).append(name)
        for names in by_module.values():
            for name in names:
                result[prefix + name] = fetched[name]
        return result

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Refused: no call of the service uploads weights into a running session. What does: save them
        where the server reads weight files and make a session on them, ``torch.save(state_dict,
        "name.pt")`` in the server's ``--data-dir``, then ``RemoteModel.create(target, weights="name.pt")``;
        or ``model.session.load_checkpoint(name)`` for a checkpoint the server saved."""
        raise NotImplementedError(
            "RemoteModel.load_state_dict: the weights cannot be uploaded into a running session (no call of the "
            "service takes them). Save them in the server's --data-dir, torch.save(state_dict, 'name.pt'), and make "
            "a session on them: RemoteModel.create(target, weights='name.pt'); or load a checkpoint the server saved: "
            "model.session.load_checkpoint(name)"
        )

    # -- where the model is: on the server, whatever .to() says ---------------------------------

    def to(self, *args: Any, **kwargs: Any) -> RemoteModel:
        """Moves nothing: the model's weights stay on the server, on its device (``info().device``),
        and the logits come back on the device of the input (``model(x.to("cuda"))`` gives logits on
        the GPU). A device warns saying so; another dtype is refused (``autocast`` is the server's
        mixed precision); ``memory_format`` points to ``RemoteModel.create(memory_format=...)``."""
        device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and dtype != torch.float32:
            self._refuse_dtype(str(dtype).removeprefix("torch."))
        if memory_format is not None:
            raise TypeError(
                f"RemoteModel.to(memory_format={memory_format}): the server lays out the weights; make the session with "
                "RemoteModel.create(..., memory_format='channels_last')"
            )
        if device is not None:
            self._stays(f"to({str(device)!r})")
        return self

    def cuda(self, device: Any = None) -> RemoteModel:
        """Moves nothing (see ``to``): warns that the model stays on the server."""
        self._stays("cuda()")
        return self

    def cpu(self) -> RemoteModel:
        """Moves nothing (see ``to``): warns that the model stays on the server."""
        self._stays("cpu()")
        return self

    @staticmethod
    def _stays(call: str) -> None:
        warnings.warn(
            f"RemoteModel.{call} moves nothing: the model stays on the server, on the server's device "
            "(model.info().device); the logits come back on the device of the input you pass",
            UserWarning, stacklevel=3,
        )

    @staticmethod
    def _refuse_dtype(dtype: str) -> NoReturn:
        hint = {"float16": "fp16", "bfloat16": "bf16"}.get(dtype)
        how = (f"for mixed precision make the session with RemoteModel.create(..., autocast={hint!r})" if hint
               else "no other dtype is offered")
        raise TypeError(f"the server's model is float32 and cannot be cast to {dtype}: {how}")

    # -- the rest ------------------------------------------------------------------------------

    def info(self) -> SessionInfo:
        """What the session holds: weights, device, classes, optimizer, steps."""
        return self.session.info()

    def resume(self, checkpoint: str | None = None) -> SessionInfo:
        """Goes on after the server lost the session, from its last checkpoint (``Session.resume``)."""
        return self._session.resume(checkpoint)

    def graph(self) -> Graph:
        """The autograd graph of the last forward (call it before ``backward``, which frees it)."""
        return self.session.graph()

    def sgd(
        self, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
        *, step_on_backward: bool = False,
    ) -> SGD:
        """``torch.optim.SGD(model.parameters(), ...)`` on the server (``step_on_backward``: see ``RemoteOptimizer``)."""
        return SGD(
            self.parameters(), lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            step_on_backward=step_on_backward,
        )

    def extra_repr(self) -> str:
        return f"session={self._session.session_id or 'default'!r}"

    # Last in the class: a method named ``float`` would shadow the type in the annotations after it.

    def float(self) -> RemoteModel:
        """Nothing to do: the server's weights are float32."""
        return self

    def half(self) -> RemoteModel:
        """Refused: see ``to``."""
        self._refuse_dtype("float16")

    def bfloat16(self) -> RemoteModel:
        """Refused: see ``to``."""
        self._refuse_dtype("bfloat16")

    def double(self) -> RemoteModel:
        """Refused: see ``to``."""
        self._refuse_dtype("float64")


class RemoteOptimizer:
    """An optimizer on the server, configured over every parameter of the model.

    The server's optimizer always covers all of the model's parameters, as the tutorial's
    ``optim.SGD(model.parameters(), ...)`` does: frozen parameters have no ``.grad`` and are left
    alone. Making one replaces the session's optimizer (its momentum starts anew).

    ``step_on_backward=True`` makes ``loss.backward()`` through the model's logits also step and
    clear the gradients on the server, in the same call; ``step()`` then returns that step's count
    without a call, and ``zero_grad()`` sends nothing when the last backward cleared the gradients.
    A training step is then two round trips (Forward, Backward) with the same numbers as four.
    """

    def __init__(
        self, params: Iterable[RemoteParameter] | RemoteModel, config: Optimizer, *, step_on_backward: bool = False
    ) -> None:
        handles: list[RemoteParameter] = list(params.parameters() if isinstance(params, RemoteModel) else params)
        if not handles:
            raise ValueError("optimizer got an empty parameter list")
        if any(not isinstance(p, RemoteParameter) for p in handles):
            raise TypeError("a remote optimizer takes the parameters of a RemoteModel (model.parameters())")
        model = handles[0].model
        if any(p.model is not model for p in handles):
            raise ValueError("the parameters belong to different remote models")
        if {p.name for p in handles} != set(model._names()):
            raise ValueError(
                "the server's optimizer covers every parameter of the model: pass model.parameters() "
                "and freeze what should not change (param.requires_grad = False)"
            )
        self.model = model
        self.config = model.session.configure_optimizer(config)
        self.step_on_backward = step_on_backward
        model._step_on_backward = step_on_backward
        model._step_done_by_backward = None
        model._grads_cleared = False

    def step(self) -> int:
        """One optimizer step on the server (or the one the last backward took); returns the session's step count."""
        done = self.model._step_done_by_backward
        if self.step_on_backward and done is not None:
            self.model._step_done_by_backward = None
            return done
        self.model._grads_cleared = False
        return self.model.session.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears every parameter's ``.grad`` on the server (nothing to send when a backward just cleared them)."""
        if self.step_on_backward and set_to_none and self.model._grads_cleared:
            return
        self.model.session.zero_grad(set_to_none)
        self.model._grads_cleared = set_to_none

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


class SGD(RemoteOptimizer):
    """``torch.optim.SGD`` on the server: ``SGD(model.parameters(), lr=1e-2, momentum=0.9)``."""

    def __init__(
        self,
        params: Iterable[RemoteParameter] | RemoteModel,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        step_on_backward: bool = False,
    ) -> None:
        config = Optimizer("sgd", lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
        super().__init__(params, config, step_on_backward=step_on_backward)


class Adam(RemoteOptimizer):
    """``torch.optim.Adam`` on the server (``AdamW`` with ``decoupled=True``)."""

    def __init__(
        self,
        params: Iterable[RemoteParameter] | RemoteModel,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        decoupled: bool = False,
        *,
        step_on_backward: bool = False,
    ) -> None:
        config = Optimizer(
            "adamw" if decoupled else "adam", lr=lr, beta1=betas[0], beta2=betas[1], eps=eps,
            weight_decay=weight_decay, amsgrad=amsgrad,
        )
        super().__init__(params, config, step_on_backward=step_on_backward)
