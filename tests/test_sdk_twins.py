"""The two faces of the SDK, ``TrainerClient``/``Session`` and ``AsyncTrainerClient``/``AsyncSession``,
are twins: the same public methods with the same parameters, and the same results through a real
server (compared with local PyTorch), the async side's token on every call, raw stub's too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import re
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from remote_trainer.client import Session, TrainerClient
from remote_trainer.client.aio import AsyncSession, AsyncTrainerClient
from remote_trainer.client.errors import FailedPreconditionError, UnauthenticatedError
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb
from remote_trainer.server.app import TrainerServer, create_server
from remote_trainer.server.settings import Settings
from tests.conftest import WEIGHTS_NAME, assert_equal_to_local, rand

TWINS = [(TrainerClient, AsyncTrainerClient), (Session, AsyncSession)]
# What a sync return annotation reads as on the async side.
ASYNC_NAMES = {"Iterator": "AsyncIterator", "TrainerClient": "AsyncTrainerClient", "Session": "AsyncSession"}


def public(cls: type) -> dict[str, Any]:
    """The public methods and properties of ``cls`` (its own and inherited), by name."""
    return {name: member for name, member in inspect.getmembers(cls) if not name.startswith("_")}


def parameters(function: Any) -> list[tuple[str, str, str, str]]:
    """Name, kind, default and annotation (as written) of each parameter."""
    return [(p.name, p.kind.name, repr(p.default), str(p.annotation)) for p in inspect.signature(function).parameters.values()]


def as_async(annotation: str) -> str:
    return re.sub(r"\b\w+\b", lambda m: ASYNC_NAMES.get(m.group(), m.group()), annotation)


@pytest.mark.parametrize(("sync", "twin"), TWINS, ids=lambda cls: cls.__name__)
def test_the_async_face_has_the_sync_faces_methods_and_parameters(sync: type, twin: type) -> None:
    methods, twins = public(sync), public(twin)
    assert sorted(methods) == sorted(twins)
    for name, method in methods.items():
        if isinstance(method, property):
            assert isinstance(twins[name], property), name
            continue
        assert parameters(twins[name]) == parameters(method), name
        returns = inspect.signature(twins[name]).return_annotation
        assert returns == as_async(inspect.signature(method).return_annotation), name
        assert not inspect.iscoroutinefunction(method) and not inspect.isasyncgenfunction(method), name
        if name != "session":  # a handle, made without a call
            assert inspect.iscoroutinefunction(twins[name]) or inspect.isasyncgenfunction(twins[name]), name
    if sync is TrainerClient:
        assert parameters(twin.__init__) == parameters(sync.__init__)
    for name in ("timeout",):  # a timeout is never positional
        for cls in (sync, twin):
            for method in public(cls).values():
                if not isinstance(method, property) and name in inspect.signature(method).parameters:
                    assert inspect.signature(method).parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, method


def fields(result: Any) -> dict[str, Any]:
    """A result's fields, arrays as lists, the ids that differ between two sessions left out."""
    if isinstance(result, dict):
        return {name: fields(value) for name, value in result.items()}
    if not dataclasses.is_dataclass(result):
        return result
    values = dataclasses.asdict(result)  # type: ignore[arg-type]
    for name in ("forward_id", "session_id", "operation_epoch"):
        values.pop(name, None)
    return {name: value.tolist() if isinstance(value, np.ndarray) else value for name, value in values.items()}


def script() -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    """The calls both faces make, in order: (method, args, kwargs)."""
    return [
        ("train_step", (rand(2, 3, 64, 64, seed=1), "cross_entropy", np.array([3, 997])), {"grad_norm": True, "return_logits": True}),
        ("forward", (rand(2, 3, 64, 64, seed=2),), {}),
        ("backward", ("sum", rand(2, 1000, seed=3)), {"step": True, "zero_grad_after_step": False}),
        ("forward", (rand(2, 3, 64, 64, seed=4),), {}),
        ("backward", (), {"output_gradient": rand(2, 1000, seed=5), "step": True, "zero_grad_after_step": True}),
        ("gradients", (), {}),
        ("forward", (rand(2, 3, 64, 64, seed=6),), {"stats_only": True}),
        ("backward", ("mse", rand(2, 1000, seed=7)), {}),
        ("step", (), {"expected_step_count": 3}),
        ("step", (), {"expected_step_count": 3}),  # a retry of a step whose answer was lost: no second step
        ("info", (), {}),
    ]


def local_script(model: nn.Module) -> list[Any]:
    """The same training locally; returns what to compare: losses, logits, grad norm, step counts."""
    calls = script()
    optim = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    model.train()

    def x(i: int) -> torch.Tensor:
        return torch.from_numpy(calls[i][1][0])

    optim.zero_grad()
    logits = model(x(0))
    first = F.cross_entropy(logits, torch.from_numpy(calls[0][1][2]))
    first.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))  # type: ignore[union-attr]
    optim.step()
    second = (model(x(1)) - torch.from_numpy(calls[2][1][1])).sum()  # the gradients of step 1 stay: they add up
    second.backward()
    optim.step()
    model(x(3)).backward(torch.from_numpy(calls[4][2]["output_gradient"]))
    optim.step()
    optim.zero_grad()
    last = F.mse_loss(model(x(6)), torch.from_numpy(calls[7][1][1]))
    last.backward()
    optim.step()
    return [first, logits, norm, second, last]


def check_against_local(results: list[Any], expected: list[Any]) -> None:
    first, logits, norm, second, last = expected
    trained, _, stepped, _, cleared, grads, _, backward, count, retried, info = results
    assert (trained.step_count, trained.parameters_updated) == (1, 62)
    assert trained.loss == pytest.approx(first.item(), rel=1e-5)
    assert trained.grad_norm == pytest.approx(float(norm), rel=1e-5)
    assert_equal_to_local(trained.logits, logits)
    assert (stepped.step_count, stepped.loss) == (2, pytest.approx(second.item(), rel=1e-5))
    assert (cleared.step_count, cleared.loss, cleared.parameters_updated) == (3, None, 62)
    assert not any(t.present for t in grads.values())  # zero_grad_after_step cleared every .grad
    assert backward.loss == pytest.approx(last.item(), rel=1e-5)
    assert (count, retried, info.step_count, info.pending_forward_id) == (4, 4, 4, 0)


def run_sync(session: Session) -> list[Any]:
    return [getattr(session, name)(*args, **kwargs) for name, args, kwargs in script()]


async def run_async(session: AsyncSession) -> list[Any]:
    return [await getattr(session, name)(*args, **kwargs) for name, args, kwargs in script()]


def assert_state_equal_to_local(parameters: dict[str, Any], model: nn.Module) -> None:
    expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert set(parameters) == set(expected)
    for name, value in expected.items():
        assert_equal_to_local(parameters[name].array, value)


def test_both_faces_train_as_local_pytorch_does(client: TrainerClient, target: str, local: nn.Module) -> None:
    """train_step, backward(step=True, zero_grad_after_step=...) and step(expected_step_count=...)
    through each face: the same results, and those of the same loop in local PyTorch."""
    expected = local_script(local)
    with client.create_session(WEIGHTS_NAME) as session:
        assert session.created_info is not None and session.created_info.session_id == session.session_id
        sync_results = run_sync(session)
        sync_state = session.parameters(include_buffers=True)

    async def main() -> tuple[list[Any], dict[str, Any]]:
        async with AsyncTrainerClient(target) as aclient, await aclient.create_session(WEIGHTS_NAME) as asession:
            assert asession.created_info is not None and asession.created_info.session_id == asession.session_id
            return await run_async(asession), await asession.parameters(include_buffers=True)

    async_results, async_state = asyncio.run(main())
    check_against_local(sync_results, expected)
    check_against_local(async_results, expected)
    assert [fields(r) for r in async_results] == [fields(r) for r in sync_results]
    assert_state_equal_to_local(sync_state, local)
    assert_state_equal_to_local(async_state, local)
    with pytest.raises(FailedPreconditionError) as err:
        client.session().step(expected_step_count=10**6)
    assert err.value.reason == "STEP_COUNT_MISMATCH"


@pytest.fixture(scope="module")
def secured() -> Iterator[TrainerServer]:
    running = create_server(Settings(port=0, weights="random", tokens="tok-alice"))
    yield running
    running.stop(None).wait()


def test_the_async_client_sends_its_token_on_every_call_raw_stub_included(secured: TrainerServer) -> None:
    target = f"localhost:{secured.port}"

    async def main() -> None:
        async with AsyncTrainerClient(target, token="tok-alice", timeout=60) as client:
            async with await client.create_session() as session:
                assert (await session.info()).session_id == session.session_id
                assert list(await session.gradients("fc.bias")) == ["fc.bias"]  # a stream
            response = await client.stub.DescribeSession(pb.DescribeSessionRequest(), timeout=60)
            assert response.session.is_default
            chunks = [r async for r in client.stub.GetParameters(pb.GetParametersRequest(patterns=["fc.bias"]), timeout=60)]
            assert chunks
            assert await client.call(client.stub.ListSessions, pb.ListSessionsRequest())
        async with AsyncTrainerClient(target, timeout=60) as anonymous:
            with pytest.raises(grpc.aio.AioRpcError) as raw:
                await anonymous.stub.DescribeSession(pb.DescribeSessionRequest(), timeout=60)
            assert raw.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(UnauthenticatedError):
                await anonymous.session().info()

    asyncio.run(main())
