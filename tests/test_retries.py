"""The SDK retries by itself, safely: one policy for both faces (``retry.RetryPolicy``), attempts
within the call's deadline, and operation numbers on every call that changes a session, so that a
retried call runs at most once.

The calls go through a real server, most of them through a real gRPC hop in front of it
(``tests/grpc_proxy.py``) that records what the SDK sent and loses requests or answers on purpose.
Where the answer depends on whether the server numbers operations (``SessionInfo.next_operation``
at least 1), the test checks what each kind of server must do: a server that numbers runs a
retried call once; against one that does not, the SDK never retries a changing call.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from remote_trainer.client import TrainerClient
from remote_trainer.client import core
from remote_trainer.client.aio import AsyncSession, AsyncTrainerClient
from remote_trainer.client.errors import (
    DeadlineExceededError, FailedPreconditionError, InternalError, NotFoundError, TrainerError, UnavailableError,
)
from remote_trainer.client.remote import RemoteModel
from remote_trainer.client.retry import Attempts, Operations, Place, RetryPolicy
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb
from remote_trainer.server.app import TrainerServer, create_server
from remote_trainer.server.settings import Settings
from tests.conftest import WEIGHTS_NAME, rand
from tests.grpc_proxy import Proxy

REQUESTS = {name: getattr(pb, f"{name}Request") for name in (
    "Forward", "Backward", "Step", "ZeroGrad", "TrainStep", "CreateSession", "CloseSession", "DescribeSession",
    "FreezeLayers", "ConfigureOptimizer",
)}
NUMBERED = ("Forward", "Backward", "Step", "ZeroGrad", "TrainStep", "FreezeLayers", "ConfigureOptimizer")


@pytest.fixture
def proxy(target: str) -> Iterator[Proxy]:
    hop = Proxy(target)
    yield hop
    hop.stop()


@pytest.fixture(scope="module")
def numbering(target: str) -> bool:
    """Whether the server numbers operations (a session starts at next_operation 1)."""
    with TrainerClient(target, timeout=60) as client:
        return client.session().info().next_operation >= 1


def operations(proxy: Proxy, *names: str) -> list[tuple[str, int, bool]]:
    """(method, number, supersede) of the numbered requests of ``names`` that came, by number."""
    found = [(name, REQUESTS[name].FromString(data).operation) for name, data in proxy.requests if name in names]
    return sorted((name, op.number, op.supersede) for name, op in found)


# -- the policy and the numbering, as logic --------------------------------------------------------


def test_the_policy_backs_off_exponentially_with_jitter_and_knows_what_is_transient() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0, jitter=0.2)
    assert [policy.backoff(n, lambda low, high: 1.0) for n in (1, 2, 3, 4, 5, 6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert policy.backoff(1, lambda low, high: low) == pytest.approx(0.08)
    assert policy.backoff(9, lambda low, high: high) == pytest.approx(1.2)
    assert policy.transient(UnavailableError("gone a while", "SESSION_UNREACHABLE"))
    assert not policy.transient(UnavailableError("the node died", "SESSION_LOST"))
    assert policy.transient(InternalError("Received RST_STREAM with error code 2"))
    assert not policy.transient(InternalError("a bug"))
    assert not policy.transient(NotFoundError("no such session"))
    assert (RetryPolicy.none().max_attempts, RetryPolicy.none().wait_for_ready) == (1, False)
    for bad in ({"max_attempts": 0}, {"jitter": 1.5}, {"initial_backoff": 3.0, "max_backoff": 1.0}):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)  # type: ignore[arg-type]
    now = [0.0]
    attempts = Attempts(RetryPolicy(max_attempts=3, jitter=0), 1.0, clock=lambda: now[0])
    assert attempts.next() == 1.0 and attempts.delay(UnavailableError("x")) == pytest.approx(0.1)
    now[0] = 0.95  # the next pause would pass the deadline: give up now
    assert attempts.next() == pytest.approx(0.05) and attempts.delay(UnavailableError("x")) is None
    assert Attempts(RetryPolicy(max_attempts=2), 9.0, retryable=False).delay(UnavailableError("x")) is None


def test_numbers_follow_the_order_calls_are_made_and_a_doubt_makes_the_next_call_supersede() -> None:
    ops = Operations("s")
    first, second = Place(ops), Place(ops)  # both made before the start is known (a handle on an old session)
    ops.begin(7)
    calls = [core.zero_grad("s", True), core.forward("s", rand(1, 3, 32, 32), False, False, True)]
    for place, call in zip((first, second), calls):
        place.stamp(call.request)
    assert [(core.operation(c.request).number, core.operation(c.request).supersede) for c in calls] == [(7, False), (8, False)]
    assert pb.ForwardRequest.FromString(calls[1].request.serialize()).operation.number == 8  # on the wire too
    second.end(None)
    first.end(UnavailableError("lost"))  # 7 may or may not have run
    third = Place(ops)
    step = core.step("s", None)
    third.stamp(step.request)
    assert (step.request.operation.number, step.request.operation.supersede, ops.next_number) == (9, True, 10)
    third.end(None)  # answered: 7 is given up on the server, if it never came
    fourth = Place(ops)
    fourth.stamp(step.request)
    assert (step.request.operation.number, step.request.operation.supersede) == (10, False)
    # Any failure, a definite one too: its number may be unused (refused before the session's record,
    # or by gRPC's own limits), so the next call supersedes it (a no-op when it was used).
    fourth.end(NotFoundError("no such session"))
    fifth = Place(ops)
    fifth.stamp(step.request)
    assert (step.request.operation.number, step.request.operation.supersede) == (11, True)
    fifth.end(None)
    Place(ops).stamp(step.request)
    assert (step.request.operation.number, step.request.operation.supersede) == (12, False)


# -- numbers and tokens on the wire ----------------------------------------------------------------


def test_changing_calls_carry_increasing_numbers_and_a_new_handle_asks_where_they_stand(proxy: Proxy, numbering: bool) -> None:
    with TrainerClient(proxy.target, timeout=60) as client, client.create_session(WEIGHTS_NAME) as session:
        start = session.next_operation
        assert start == (session.created_info.next_operation if numbering else 1)  # type: ignore[union-attr]
        session.zero_grad()
        session.forward(rand(2, 3, 32, 32))
        session.info()
        session.backward("sum", rand(2, 1000))
        session.gradients("fc.bias")
        assert session.step() == 1
        session.train_step(rand(2, 3, 32, 32), "cross_entropy", np.array([1, 2]))
        assert client.session(session.session_id).next_operation == start + 5  # the client's handles share the numbers
        assert session.info().next_operation == (start + 5 if numbering else 0)
        names = ("ZeroGrad", "Forward", "Backward", "Step", "TrainStep")
        assert operations(proxy, *names) == sorted(zip(names, range(start, start + 5), [False] * 5))  # type: ignore[operator]
        with TrainerClient(proxy.target, timeout=60) as other:  # another client: it asks the server first
            described = len(proxy.sent("DescribeSession"))
            handle = other.session(session.session_id)
            assert handle.next_operation is None
            handle.forward(rand(2, 3, 32, 32), no_grad=True)
            assert len(proxy.sent("DescribeSession")) == described + 1
            number = pb.ForwardRequest.FromString(proxy.sent("Forward")[-1]).operation.number
            assert number == (start + 5 if numbering else 1) and handle.next_operation == number + 1
    create, close = (REQUESTS[n].FromString(proxy.sent(n)[0]) for n in ("CreateSession", "CloseSession"))
    assert len(create.client_token) == len(close.client_token) == 32 and create.client_token != close.client_token


def test_create_and_close_retried_after_a_lost_answer_reuse_their_token(proxy: Proxy, numbering: bool) -> None:
    proxy.faults = {"CreateSession": ["drop_answer"], "CloseSession": ["drop_answer"]}
    with TrainerClient(proxy.target, timeout=60) as client:
        before = {s.session_id for s in client.list_sessions()}
        session = client.create_session(WEIGHTS_NAME)
        made = {s.session_id for s in client.list_sessions()} - before
        session.close()  # the first close closed it; the retry counts as closed either way
        assert session.session_id not in {s.session_id for s in client.list_sessions()}
        for orphan in made - {session.session_id}:  # a server that ignores client_token made two
            client.session(orphan).close()
    assert proxy.injected == 2
    creates = [REQUESTS["CreateSession"].FromString(data).client_token for data in proxy.sent("CreateSession")]
    closes = [REQUESTS["CloseSession"].FromString(data).client_token for data in proxy.sent("CloseSession")]
    assert len(creates) == 2 and len(set(creates)) == 1 and len(closes) >= 2 and len(set(closes[:2])) == 1
    if numbering:
        assert made == {session.session_id}  # the retry answered with the session the first attempt made


def test_a_lost_answer_is_retried_with_the_same_number_and_runs_once(proxy: Proxy, numbering: bool) -> None:
    with TrainerClient(proxy.target, timeout=60) as client, client.create_session(WEIGHTS_NAME) as session:
        session.forward(rand(2, 3, 32, 32))
        session.backward("sum", rand(2, 1000))
        proxy.faults = {"Step": ["drop_answer"], "ZeroGrad": ["refuse"]}
        if numbering:
            assert session.step() == 1  # the server ran it; the retry got the answer it gave
            assert session.zero_grad() == 62  # refused before the server saw it: the retry ran it
            assert session.info().step_count == 1
            assert operations(proxy, "Step", "ZeroGrad") == [("Step", 3, False), ("Step", 3, False),
                                                              ("ZeroGrad", 4, False), ("ZeroGrad", 4, False)]
        else:  # a server that ignores numbers would step twice: the SDK does not retry
            with pytest.raises(UnavailableError):
                session.step()
            with pytest.raises(UnavailableError):
                session.zero_grad()  # the step was in doubt: this call supersedes it
            session.zero_grad()
            assert operations(proxy, "Step", "ZeroGrad") == [("Step", 3, False), ("ZeroGrad", 4, True), ("ZeroGrad", 5, True)]
        assert proxy.injected == 2


def test_a_stream_cut_midway_is_read_again_from_the_start(proxy: Proxy, session: object) -> None:
    with TrainerClient(proxy.target, timeout=60) as client:
        expected = client.session().parameters()
        proxy.faults = {"GetParameters": ["cut_stream"]}
        again = client.session().parameters()
    assert proxy.injected == 1 and len(proxy.sent("GetParameters")) == 3
    assert list(again) == list(expected)
    for name, tensor in expected.items():
        np.testing.assert_array_equal(again[name].array, tensor.array)  # type: ignore[arg-type]


def test_async_calls_pipelined_are_numbered_in_the_order_they_were_made(proxy: Proxy, numbering: bool) -> None:
    async def main() -> None:
        async with AsyncTrainerClient(proxy.target, timeout=60) as client:
            async with await client.create_session(WEIGHTS_NAME) as session:
                start = session.next_operation
                assert start is not None
                x = rand(2, 3, 32, 32)
                await asyncio.gather(session.zero_grad(), session.forward(x, no_grad=True), session.freeze("fc"),
                                     session.forward(x, no_grad=True), session.unfreeze("fc"))
                names = ["ZeroGrad", "Forward", "FreezeLayers", "Forward", "FreezeLayers"]
                made = operations(proxy, "ZeroGrad", "Forward", "FreezeLayers")
                assert sorted(made, key=lambda m: m[1]) == [(n, start + i, False) for i, n in enumerate(names)]
                assert session.next_operation == start + 5
                if numbering:  # run in the order made, whatever order they arrive in
                    results = await asyncio.gather(session.forward(x), session.backward("sum", rand(2, 1000), forward_id=0),
                                                   session.step())
                    assert results[2] == 1 and results[1].forward_id == results[0].forward_id

    asyncio.run(main())


def test_more_calls_than_the_server_remembers_or_a_connection_carries_each_run_once(target: str, numbering: bool) -> None:
    """Five sessions, 200 ZeroGrads each made at once on one channel: more calls of a session than
    the server keeps answers for (64), more calls than a connection carries (256). Every call is
    answered, even with retries off, and runs once (each session's numbering moves by exactly 200):
    a session's calls go at most 64 at a time (retry.IN_FLIGHT) and the channel's 128
    (retry.CHANNEL_IN_FLIGHT). Without the first, a session's numbering moved by 55 of 200
    (OPERATION_FORGOTTEN); without the second, calls past 256 were refused (UNAVAILABLE), again on
    retry, until the calls behind them gave up (OPERATION_OUT_OF_ORDER)."""
    if not numbering:
        pytest.skip("the server does not number operations")

    async def burst(retry: RetryPolicy | None) -> set[str]:
        async with AsyncTrainerClient(target, timeout=120, retry=retry) as client:
            sessions = [await client.create_session(WEIGHTS_NAME) for _ in range(5)]
            starts = [(await session.info()).next_operation for session in sessions]

            async def one(session: AsyncSession) -> str:
                try:
                    await session.zero_grad()
                    return "OK"
                except TrainerError as error:
                    return f"{error.code.name} {error.reason}"

            outcomes = await asyncio.gather(*(one(session) for _ in range(200) for session in sessions))
            assert [(await s.info()).next_operation - start for s, start in zip(sessions, starts)] == [200] * 5
            for session in sessions:
                await session.close()
            return set(outcomes)

    assert asyncio.run(burst(None)) == {"OK"}
    assert asyncio.run(burst(RetryPolicy())) == {"OK"}


def test_a_sync_session_used_by_many_threads_runs_each_call_once(target: str, numbering: bool) -> None:
    """The sync face's window: 100 threads' ZeroGrads on one session (64 in flight at most) each
    run once."""
    with TrainerClient(target, timeout=120) as client, client.create_session(WEIGHTS_NAME) as session:
        start = session.info().next_operation
        with ThreadPoolExecutor(100) as pool:
            list(pool.map(lambda _: session.zero_grad(), range(100)))
        assert session.info().next_operation - start == (100 if numbering else 0)


def test_remote_model_numbers_through_its_clients_policy(proxy: Proxy) -> None:
    policy = RetryPolicy(max_attempts=4, max_backoff=1.0)
    with TrainerClient(proxy.target, timeout=60, retry=policy) as client:
        with RemoteModel.create(client, WEIGHTS_NAME) as model:
            assert model.session._client.retry_policy is policy
            optim = model.sgd(lr=1e-2, momentum=0.9)
            (model(rand(2, 3, 32, 32)) * 1.0).sum().backward()
            optim.step()
            made = sorted(operations(proxy, *NUMBERED), key=lambda m: m[1])  # sgd() configures the optimizer first
            start = model.session.created_info.next_operation or 1  # type: ignore[union-attr]
            assert [number for _, number, _ in made] == list(range(start, start + len(made)))
            assert [name for name, _, _ in made][-3:] == ["Forward", "Backward", "Step"]
    with RemoteModel(proxy.target, retry=None) as own:
        assert own.session._client.retry_policy == RetryPolicy.none()


# -- a server that goes away and comes back --------------------------------------------------------


@pytest.fixture
def restarting() -> Iterator[tuple[list[TrainerServer], int]]:
    """A server on a free port, and a way to start another on that port after it stops."""
    servers = [create_server(Settings(port=0, weights="random"))]
    yield servers, servers[0].port
    for server in servers:
        server.stop(None).wait()


def test_a_call_waits_within_its_deadline_for_a_server_that_comes_back(restarting: tuple[list[TrainerServer], int]) -> None:
    servers, port = restarting
    target = f"localhost:{port}"
    with TrainerClient(target, timeout=60) as client, TrainerClient(target, timeout=60, retry=None) as fail_fast:
        assert client.health() == fail_fast.health() == "SERVING"
        servers[0].stop(None).wait()
        with pytest.raises(UnavailableError) as refused:  # one attempt: the transport's refusal, said as ours
            fail_fast.session().info()
        assert refused.value.reason == "SERVER_UNREACHABLE" and "is it running?" in refused.value.message
        with pytest.raises(UnavailableError) as spent:  # waited its whole deadline; the server never came
            client.session().info(timeout=1.5)
        assert spent.value.reason == "SERVER_UNREACHABLE"
        restart = threading.Thread(target=lambda: servers.append(create_server(Settings(port=port, weights="random"))))
        restart.start()  # while the call below waits for the connection (or just before it)
        result = client.session().forward(rand(2, 3, 32, 32), timeout=60)  # DescribeSession, then Forward, once back
        restart.join()
        assert result.logits is not None
        assert client.session().info().pending_forward_id == result.forward_id


def test_a_changing_call_whose_deadline_passes_makes_the_next_one_supersede(restarting: tuple[list[TrainerServer], int]) -> None:
    servers, port = restarting
    hop = Proxy(f"localhost:{port}")
    try:
        with TrainerClient(hop.target, timeout=60) as client:
            session = client.session()
            session.zero_grad()
            number = session.next_operation
            assert number is not None
            servers[0].stop(None).wait()
            with pytest.raises((UnavailableError, DeadlineExceededError)):  # the proxy waits for the server until the deadline
                session.zero_grad(timeout=2)
            servers.append(create_server(Settings(port=port, weights="random")))
            # The restarted server's default session is a new one (fresh weights): not run on it.
            with pytest.raises(FailedPreconditionError) as restarted:
                session.zero_grad()
            assert restarted.value.reason == "SESSION_RECREATED"
        assert operations(hop, "ZeroGrad")[-1] == ("ZeroGrad", number + 1, True)
        assert all(not supersede for _, n, supersede in operations(hop, "ZeroGrad") if n <= number)
    finally:
        hop.stop()
