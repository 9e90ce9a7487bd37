"""The Ray backend's front-end proxy (``server/ray_backend/proxy.py``) without a cluster: a fake
actor handle records what ``RayEngine`` sends. The proxy imports neither ray nor grpc, so this runs
with the fast tests; tests/test_ray_backend.py runs it against real actors.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import torch

from remote_trainer.engine import portable
from remote_trainer.engine.errors import Abandoned
from remote_trainer.engine.protocol import Engine
from remote_trainer.engine.checkpoints import Quota
from remote_trainer.engine.results import CheckpointInfo, NamedTensor
from remote_trainer.server.calls import Call, in_call
from remote_trainer.server.ray_backend.proxy import FORWARDED, InStore, RayEngine, Request
from remote_trainer.server.settings import parse_settings
from tests.test_layout import loaded_after


class FakeActor:
    """A session actor's handle: records each ``call.remote`` (unpacked) and answers ``answer``."""

    def __init__(self, answer: object = None) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.deadlines: list[float | None] = []
        self.sent: list[object] = []  # as sealed
        self.answer = answer
        self.call = self

    def remote(self, sealed: object) -> object:
        self.sent.append(sealed)
        request: Request = portable.unseal(sealed)
        method, args, kwargs, until = request
        self.calls.append((method, args, kwargs))
        self.deadlines.append(until)
        return self.answer if isinstance(self.answer, InStore) else portable.seal(self.answer)  # as the actor answers


class FakeStore:
    """The store's side of the proxy: ``wait`` returns what the actor answered (or what ``objects``
    holds under that name: the object store)."""

    def __init__(self) -> None:
        self.checkpoints: list[tuple[str, int]] = []
        self.objects: dict[str, object] = {}

    def wait(self, engine: RayEngine, ref: object) -> object:
        return self.objects[ref] if isinstance(ref, str) else ref

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


def test_a_call_without_tensors_crosses_as_bytes_and_tensors_as_arrays_read_in_place() -> None:
    """A small call is pickled by the proxy (Ray carries bytes as they are, cheaper than its own
    serialiser); one with tensors is handed to Ray with them as numpy arrays, and an answer's arrays
    come back as tensors over the same memory (no copy)."""
    answer = torch.arange(6.0)
    engine, actor, _ = proxy(answer=[answer])
    engine.zero_grad(False)
    engine.backward(3, labels=torch.ones(2, 3))
    assert isinstance(actor.sent[0], bytes) and not isinstance(actor.sent[1], bytes)
    sealed = portable.seal([answer])
    assert not isinstance(sealed, bytes) and np.shares_memory(portable.unseal(sealed)[0].numpy(), answer.numpy())


def test_a_snapshot_the_actor_left_in_the_object_store_is_encoded_from_there() -> None:
    """GetGradients and GetParameters on Ray: the actor copies the tensors into the object store (its
    answer names them there) and the front-end encodes them from there, without a copy."""
    grad = torch.arange(4.0)
    engine, actor, store = proxy(answer=InStore("snapshot"))
    store.objects["snapshot"] = portable.seal([NamedTensor("fc.bias", (4,), grad, None)])
    encoded = engine.encode_gradients([], False, torch.float32, lambda item: item)
    assert actor.calls == [("gradients", ([], False, torch.float32, True), {})]
    assert [item.name for item in encoded] == ["fc.bias"] and encoded[0].tensor is not None
    assert np.shares_memory(encoded[0].tensor.numpy(), grad.numpy())


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
