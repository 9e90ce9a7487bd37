"""The Ray backend's front-end proxy (``server/ray_backend/proxy.py``) without a cluster: a fake
actor handle records what ``RayEngine`` sends. The proxy imports neither ray nor grpc, so this runs
with the fast tests; tests/test_ray_backend.py runs it against real actors.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from remote_trainer.engine import portable
from remote_trainer.engine.errors import Abandoned
from remote_trainer.engine.protocol import Engine
from remote_trainer.engine.checkpoints import Quota
from remote_trainer.engine.results import CheckpointInfo
from remote_trainer.server.calls import Call, in_call
from remote_trainer.server.ray_backend.proxy import FORWARDED, RayEngine, Request
from remote_trainer.server.settings import parse_settings
from tests.test_layout import loaded_after


class FakeActor:
    """A session actor's handle: records each ``call.remote`` (unpacked) and answers ``answer``."""

    def __init__(self, answer: object = None) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.deadlines: list[float | None] = []
        self.answer = answer
        self.call = self

    def remote(self, request: Request) -> object:
        method, args, kwargs, until = request
        self.calls.append((method, portable.unpack(args), portable.unpack(kwargs)))
        self.deadlines.append(until)
        return portable.pack(self.answer)


class FakeStore:
    """The store's side of the proxy: ``wait`` returns what the actor answered."""

    def __init__(self) -> None:
        self.checkpoints: list[tuple[str, int]] = []

    def wait(self, engine: RayEngine, ref: object) -> object:
        return ref

    def checkpointed(self, engine: RayEngine, path: str, step_count: int) -> None:
        self.checkpoints.append((path, step_count))


def proxy(answer: object = None) -> tuple[RayEngine, FakeActor, FakeStore]:
    actor, store = FakeActor(answer), FakeStore()
    return RayEngine(store, "s1", "alice", actor, "actor-1"), actor, store  # type: ignore[arg-type]


def test_the_proxy_forwards_every_engine_method_but_the_encoding_ones() -> None:
    """What the actor runs is what the proxy forwards: the protocol's methods, less the two that
    encode in the front-end."""
    protocol = {name for name, member in vars(Engine).items() if callable(member) and not name.startswith("_")}
    assert FORWARDED == protocol - {"encode_gradients", "encode_parameters"}
    assert all(callable(getattr(proxy()[0], name)) for name in protocol)


def test_the_proxy_sends_the_arguments_as_given_and_returns_the_answer() -> None:
    engine, actor, _ = proxy(answer=7)
    assert engine.zero_grad(False) == 7
    x = torch.ones(2, 3)
    engine.backward(3, labels=x, grad_norm=False)
    assert actor.calls[0] == ("zero_grad", (False,), {})
    method, args, kwargs = actor.calls[1]
    assert (method, args, sorted(kwargs)) == ("backward", (3,), ["grad_norm", "labels"])
    assert kwargs["grad_norm"] is False and torch.equal(kwargs["labels"], x)  # a tensor again, past the actor


def test_the_proxy_asks_still_wanted_before_sending_and_never_sends_it() -> None:
    engine, actor, _ = proxy(answer=(1, 1))
    with pytest.raises(Abandoned, match="^the step was not taken: its caller stopped waiting$"):
        engine.step(None, lambda: False)  # given by position, as the servicer gives it
    with pytest.raises(Abandoned, match="^the forward was not run: its caller stopped waiting$"):
        engine.forward(torch.ones(1, 3, 8, 8), still_wanted=lambda: False)
    with pytest.raises(Abandoned, match="^the training step was not run: its caller stopped waiting$"):
        engine.train_step(torch.ones(1, 3, 8, 8), "sum", None, still_wanted=lambda: False)
    assert actor.calls == []
    assert engine.step(4, lambda: True) == (1, 1)
    engine.forward(torch.ones(1, 3, 8, 8), no_grad=True, still_wanted=lambda: True)
    assert [(m, len(a), k) for m, a, k in actor.calls] == [("step", 1, {}), ("forward", 1, {"no_grad": True})]


def test_the_proxy_sends_the_calls_deadline_as_wall_clock_time() -> None:
    """The deadline crosses to the actor as plain data: when it passes, by ``time.time()`` (the
    actor's process has another monotonic clock); none outside a call or for a call without one."""
    engine, actor, _ = proxy(answer=0)
    engine.zero_grad()
    in_call(Call(), engine.zero_grad)
    before = time.time()
    in_call(Call(deadline=time.monotonic() + 30), engine.zero_grad)
    assert actor.deadlines[:2] == [None, None]
    until = actor.deadlines[2]
    assert until is not None and before + 29 < until < time.time() + 30


def test_the_proxy_tells_the_registry_of_a_saved_checkpoint() -> None:
    engine, actor, store = proxy(answer=CheckpointInfo(step_count=5, size_bytes=10))
    quota = Quota("/ckpt/alice", 1000, ("/ckpt/alice/auto-x.ckpt",))  # checked by the actor, where it writes
    assert engine.save_checkpoint("/ckpt/alice/a.ckpt", quota) == CheckpointInfo(5, 10)
    assert actor.calls == [("save_checkpoint", ("/ckpt/alice/a.ckpt", quota), {})]
    assert store.checkpoints == [("/ckpt/alice/a.ckpt", 5)]


def test_the_proxy_loads_without_ray() -> None:
    """So this file runs where ray is not installed (a thin test environment)."""
    assert "ray" not in loaded_after("import remote_trainer.server.ray_backend.proxy")


def test_joining_a_cluster_takes_a_namespace_of_its_own(capsys: pytest.CaptureFixture[str]) -> None:
    """Every deployment on a cluster names its namespace: with one shared default, a front-end of
    another deployment (``--ray-address auto`` on the same machine) took over this one's sessions."""
    with pytest.raises(SystemExit):
        parse_settings(["--backend", "ray", "--ray-address", "auto"], environ={})
    assert "ray-namespace is required with ray-address" in capsys.readouterr().err
    assert parse_settings(["--backend", "ray", "--ray-address", "auto", "--ray-namespace", "prod"], environ={}).ray_namespace == "prod"
    assert parse_settings(["--backend", "ray"], environ={}).ray_namespace == ""  # a Ray of its own: LOCAL_RAY_NAMESPACE
