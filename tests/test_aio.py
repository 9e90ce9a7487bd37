"""The asyncio SDK (AsyncTrainerClient on grpc.aio) against a real server, compared with local PyTorch."""

from __future__ import annotations

import asyncio
import copy
import re

import numpy as np
import pytest
import torch
from torch import nn

from remote_trainer.client.aio import AsyncSession, AsyncTrainerClient
from remote_trainer.client.errors import FailedPreconditionError, NotFoundError
from remote_trainer.server.app import TrainerServer
from tests.conftest import WEIGHTS_NAME, assert_equal_to_local, rand
from tests.server_events import blocking_forward, waiting_for


async def assert_matches(session: AsyncSession, local: nn.Module, grads: bool = False) -> None:
    remote = await (session.gradients() if grads else session.parameters(include_buffers=True))
    expected = dict(local.named_parameters()) if grads else {**dict(local.named_parameters()), **dict(local.named_buffers())}
    assert set(remote) == set(expected)
    for name, tensor in expected.items():
        value = tensor.grad if grads else tensor
        assert value is not None
        assert_equal_to_local(remote[name].array, value, rtol=1e-4, atol=1e-5)


def test_tutorial_step_and_gradients_equal_local(target: str, local: nn.Module) -> None:
    async def main() -> None:
        async with AsyncTrainerClient(target) as client, await client.create_session(WEIGHTS_NAME) as session:
            data, labels = rand(1, 3, 64, 64, seed=1), rand(1, 1000, seed=2)
            forward = await session.forward(data)
            result = await session.backward("sum", labels, grad_norm=False)
            assert result.grad_norm is None
            prediction = local(torch.from_numpy(data))
            loss = (prediction - torch.from_numpy(labels)).sum()
            loss.backward()
            assert_equal_to_local(forward.logits, prediction)
            assert result.loss == pytest.approx(loss.item(), rel=1e-5)
            await assert_matches(session, local, grads=True)
            with_stats, without = await session.gradients(), await session.gradients(stats=False)
            for name, p in local.named_parameters():
                assert p.grad is not None and without[name].stats is None and with_stats[name].stats is not None
                np.testing.assert_array_equal(without[name].array, with_stats[name].array)
            assert await session.step() == 1
            torch.optim.SGD(local.parameters(), lr=1e-2, momentum=0.9).step()
            await assert_matches(session, local)

    asyncio.run(main())


def test_several_steps_on_two_sessions_at_once_equal_local(target: str, local: nn.Module) -> None:
    """Two sessions driven from one event loop, their calls interleaved, each equal to its local twin."""
    twins = [local, copy.deepcopy(local)]

    async def train(client: AsyncTrainerClient, index: int) -> AsyncSession:
        session = await client.create_session(WEIGHTS_NAME)
        optim = torch.optim.SGD(twins[index].parameters(), lr=1e-2, momentum=0.9)
        for i in range(3):
            data, labels = rand(2, 3, 32, 32, seed=10 * index + i), rand(2, 1000, seed=100 + 10 * index + i)
            await session.zero_grad()
            await session.forward(data, stats_only=True)
            await session.backward("sum", labels)
            await session.step()
            optim.zero_grad()
            (twins[index](torch.from_numpy(data)) - torch.from_numpy(labels)).sum().backward()
            optim.step()
        return session

    async def main() -> None:
        async with AsyncTrainerClient(target) as client:
            sessions = await asyncio.gather(train(client, 0), train(client, 1))
            for session, twin in zip(sessions, twins):
                assert (await session.info()).step_count == 3
                await assert_matches(session, twin)
                await session.close()
            names = [s.session_id for s in await client.list_sessions()]
            assert not set(names) & {s.session_id for s in sessions}

    asyncio.run(main())


def test_errors_are_the_sync_sdks(target: str) -> None:
    async def main() -> None:
        async with AsyncTrainerClient(target) as client:
            with pytest.raises(NotFoundError) as err:
                await client.session("no-such-session").info()
            assert err.value.reason == "SESSION_NOT_FOUND"
            async with await client.create_session(WEIGHTS_NAME) as session:
                with pytest.raises(FailedPreconditionError) as failed:
                    await session.backward("sum", rand(1, 1000))
                assert failed.value.reason == "NO_PENDING_FORWARD"

    asyncio.run(main())


STATUS_LOG = "remote_trainer.server.status"


def test_a_call_cancelled_while_it_runs_is_logged_cancelled_and_changes_nothing(
    server: TrainerServer, target: str, local: nn.Module
) -> None:
    """The task is cancelled only once the server has started the Forward (its own "running" line,
    and a hook that holds the model's forward until the server has marked the call gone), so the
    cancel reaches a call in progress: the server logs and counts it CANCELLED, keeps no pending
    forward and puts its BatchNorm statistics back; the session then trains as local PyTorch."""

    def cancelled_forwards() -> float:
        return server.metrics.registry.get_sample_value(
            "trainer_requests_total", {"method": "Forward", "code": "CANCELLED"}
        ) or 0.0

    async def main() -> None:
        async with AsyncTrainerClient(target) as client, await client.create_session(WEIGHTS_NAME) as session:
            sid = session.session_id
            before = await session.parameters(include_buffers=True)
            counted = cancelled_forwards()
            entered, release, remove = blocking_forward(server.store.get(sid)._model, until_abandoned=True)
            try:
                with waiting_for(f"rpc=Forward session={sid} running", STATUS_LOG) as started, \
                        waiting_for(f"rpc=Forward session={sid} status=", STATUS_LOG) as finished:
                    task = asyncio.create_task(session.forward(rand(2, 3, 32, 32, seed=3)))
                    # Waited for off the event loop, which must go on sending the call meanwhile.
                    assert await asyncio.to_thread(started.seen.wait, 120)
                    assert await asyncio.to_thread(entered.wait, 120)  # the model's forward has begun
                    task.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await task
                    remove()
                    release.set()  # the hook now waits until the server marks the call gone
                    assert await asyncio.to_thread(finished.seen.wait, 120)
            finally:
                remove()
                release.set()
            assert re.search(r"status=CANCELLED ", finished.messages[0]), finished.messages
            assert cancelled_forwards() == counted + 1
            info = await session.info()
            assert (info.pending_forward_id, info.step_count) == (0, 0)  # the cancelled forward was not kept
            after = await session.parameters(include_buffers=True)
            assert after.keys() == before.keys()
            for name in before:  # BatchNorm's running statistics included
                np.testing.assert_array_equal(after[name].array, before[name].array, err_msg=name)
            # The session serves the next forward and backward as local PyTorch computes them.
            data, labels = rand(2, 3, 32, 32, seed=7), rand(2, 1000, seed=8)
            forward = await session.forward(data)
            assert forward.forward_id == 1
            await session.backward("sum", labels)
            local.train()
            prediction = local(torch.from_numpy(data))
            assert_equal_to_local(forward.logits, prediction)
            (prediction - torch.from_numpy(labels)).sum().backward()
            grads = await session.gradients("fc.weight")
            assert_equal_to_local(grads["fc.weight"].array, local.fc.weight.grad)  # type: ignore[arg-type]
            assert await client.health() == "SERVING"

    asyncio.run(main())
