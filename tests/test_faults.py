"""The fault-injecting proxy (``tests/faults.py``) against the real server: it forwards calls
unchanged, each fault kind does what it says to a call (and what the server did with it), the
channel gets over every fault, and a plan is seeded and bounded.

Every fault of a unary call reaches a grpc client (sync and asyncio) as UNAVAILABLE ("Stream
removed (...)"), which is the code the SDK may retry: a dropped answer was run by the server, so a
retry of a call that changes a session must be one the server recognises (exactly-once).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from remote_trainer.client import Session
from remote_trainer.contract import codec
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb
from remote_trainer.contract.trainer.v1 import trainer_pb2_grpc as pb_grpc
from remote_trainer.server.app import TrainerServer
from tests.conftest import rand
from tests.faults import CUT_REQUEST, DELAY, DROP_RESPONSE, KINDS, RESET, FaultPlan, FaultyProxy, disconnected

OPTIONS = [("grpc.max_send_message_length", 1 << 28), ("grpc.max_receive_message_length", 1 << 28)]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@pytest.fixture
def proxy(server: TrainerServer) -> Iterator[FaultyProxy]:
    """A proxy to the test server with a plan of no random faults: only armed ones happen."""
    with FaultyProxy(server.port, FaultPlan(max_delay=0.2)) as p:
        yield p


@pytest.fixture
def channel(proxy: FaultyProxy) -> Iterator[grpc.Channel]:
    """A plain channel through the proxy, for the raw generated stub: no SDK, no retries."""
    with grpc.insecure_channel(proxy.address, options=OPTIONS) as c:
        yield c


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.TrainerServiceStub:
    return pb_grpc.TrainerServiceStub(channel)


def failure(channel: grpc.Channel, call: grpc.UnaryUnaryMultiCallable[Any, Any], request: object) -> grpc.RpcError:
    """The error of a call that a fault kills, once ``channel`` knows its connection is gone."""
    with pytest.raises(grpc.RpcError) as raised:
        call(request, timeout=60)
    error = raised.value
    print(f"{error.code()} {error.details()!r}")  # noqa: T201 (what grpc reports is the point)
    disconnected(channel)
    return error


def big_forward(session_id: str) -> pb.ForwardRequest:
    """A Forward of a (8, 3, 224, 224) float32 batch: 4.8 MB, many DATA frames."""
    batch = codec.encode(np.zeros((8, 3, 224, 224), np.float32))
    return pb.ForwardRequest(session_id=session_id, input=pb.TensorInput(tensor=batch), eval_mode=True, no_grad=True)


def test_calls_pass_unchanged_while_paused(
    proxy: FaultyProxy, stub: pb_grpc.TrainerServiceStub, session: Session, server: TrainerServer
) -> None:
    """With faults paused, unary answers and a GetGradients stream (many frames) are the server's
    own, byte for byte; a delay fault loses nothing either."""
    proxy.pause()
    session.forward(rand(2, 3, 32, 32))
    session.backward("sum", rand(2, 1000, seed=1))
    describe = pb.DescribeSessionRequest(session_id=session.session_id)
    gradients = pb.GetGradientsRequest(session_id=session.session_id, patterns=["layer4.*", "fc.*"])
    with grpc.insecure_channel(f"127.0.0.1:{server.port}", options=OPTIONS) as channel:
        direct = pb_grpc.TrainerServiceStub(channel)
        expected = direct.DescribeSession(describe, timeout=60)
        expected_stream = [r.SerializeToString() for r in direct.GetGradients(gradients, timeout=60)]
    assert stub.DescribeSession(describe, timeout=60) == expected
    streamed = [r.SerializeToString() for r in stub.GetGradients(gradients, timeout=60)]
    assert streamed == expected_stream and len(streamed) > 1
    proxy.arm(DELAY, times=3)
    assert stub.DescribeSession(describe, timeout=60) == expected
    assert proxy.armed(DELAY) == 0 and proxy.counts == {CUT_REQUEST: 0, DROP_RESPONSE: 0, RESET: 0, DELAY: 3}
    assert proxy.summary() == "faults: cut_request=0 drop_response=0 reset=0 delay=3"


def test_a_dropped_answer_was_run_by_the_server(
    proxy: FaultyProxy, channel: grpc.Channel, stub: pb_grpc.TrainerServiceStub, session: Session
) -> None:
    """The server ran the Step, the client never hears of it: the double-apply hazard."""
    before = session.info().step_count
    proxy.arm(DROP_RESPONSE)
    error = failure(channel, stub.Step, pb.StepRequest(session_id=session.session_id))
    assert error.code() == UNAVAILABLE and "Stream removed" in str(error.details())
    assert proxy.counts[DROP_RESPONSE] == 1
    assert session.info().step_count == before + 1
    assert stub.Step(pb.StepRequest(session_id=session.session_id), timeout=60).step_count == before + 2


def test_a_cut_request_is_not_run_and_the_server_keeps_serving(
    proxy: FaultyProxy, channel: grpc.Channel, stub: pb_grpc.TrainerServiceStub, session: Session
) -> None:
    """Part of a 4.8 MB Forward reaches the server, then the connection dies: the server never runs
    it (the next forward gets the next id) and serves on, through the proxy too."""
    first = session.forward(rand(1, 3, 32, 32), eval_mode=True, no_grad=True).forward_id
    pending = session.info().pending_forward_id
    proxy.arm(CUT_REQUEST)
    error = failure(channel, stub.Forward, big_forward(session.session_id))
    assert error.code() == UNAVAILABLE and "Stream removed" in str(error.details())
    assert proxy.counts[CUT_REQUEST] == 1
    assert session.info().pending_forward_id == pending
    assert stub.Forward(big_forward(session.session_id), timeout=120).forward_id == first + 1


def test_after_a_reset_the_channel_reconnects(
    proxy: FaultyProxy, channel: grpc.Channel, stub: pb_grpc.TrainerServiceStub, session: Session
) -> None:
    describe = pb.DescribeSessionRequest(session_id=session.session_id)
    stub.DescribeSession(describe, timeout=60)
    connections = proxy.connections
    proxy.arm(RESET)
    assert failure(channel, stub.DescribeSession, describe).code() == UNAVAILABLE
    assert stub.DescribeSession(describe, timeout=60).session.session_id == session.session_id
    assert proxy.connections == connections + 1 and proxy.counts[RESET] == 1


@pytest.mark.parametrize("kind", [CUT_REQUEST, DROP_RESPONSE, RESET])
def test_every_fault_is_unavailable_to_sync_and_asyncio_clients(proxy: FaultyProxy, kind: str) -> None:
    """What the SDK's retries key on: each fault of a unary call is UNAVAILABLE in both grpc faces,
    and the same channel's next call succeeds."""
    request = pb.DescribeSessionRequest()
    with grpc.insecure_channel(proxy.address, options=OPTIONS) as channel:
        stub = pb_grpc.TrainerServiceStub(channel)
        stub.DescribeSession(request, timeout=60)
        proxy.arm(kind)
        print("sync:", end=" ")  # noqa: T201
        assert failure(channel, stub.DescribeSession, request).code() == UNAVAILABLE
        stub.DescribeSession(request, timeout=60)

    async def asyncio_face() -> tuple[grpc.StatusCode, str]:
        async with grpc.aio.insecure_channel(proxy.address, options=OPTIONS) as channel:
            stub = pb_grpc.TrainerServiceStub(channel)
            await stub.DescribeSession(request, timeout=60)
            proxy.arm(kind)
            try:
                await stub.DescribeSession(request, timeout=60)
            except grpc.aio.AioRpcError as error:
                while channel.get_state() == grpc.ChannelConnectivity.READY:  # as ``disconnected``
                    await channel.wait_for_state_change(grpc.ChannelConnectivity.READY)
                await stub.DescribeSession(request, timeout=60)
                return error.code(), str(error.details())
            raise AssertionError("no error")

    code, details = asyncio.run(asyncio_face())
    print(f"asyncio: {code} {details!r}")  # noqa: T201
    assert code == UNAVAILABLE and "Stream removed" in details
    assert proxy.counts[kind] == 2


def run_traffic(target_port: int, plan: FaultPlan, calls: int = 40) -> tuple[dict[str, int], int]:
    """``calls`` sequential DescribeSession calls through a proxy with ``plan``: (counts, failures)."""
    failures = 0
    with FaultyProxy(target_port, plan) as proxy, grpc.insecure_channel(proxy.address, options=OPTIONS) as channel:
        stub = pb_grpc.TrainerServiceStub(channel)
        for _ in range(calls):
            try:
                stub.DescribeSession(pb.DescribeSessionRequest(), timeout=60)
            except grpc.RpcError as error:
                assert error.code() == UNAVAILABLE
                failures += 1
                disconnected(channel)
        print(proxy.summary(), f"failures={failures}")  # noqa: T201
        return dict(proxy.counts), failures


def test_a_plan_is_seeded_and_bounded(server: TrainerServer) -> None:
    """The same seed and the same traffic inject the same faults; no kind passes its bound, and with
    every chance at 1 each kind reaches it exactly, after which every call passes."""
    plan = FaultPlan(seed=11, probability=dict.fromkeys(KINDS, 0.03), max_faults=3, quiet_frames=0, max_delay=0.01)
    first = run_traffic(server.port, plan)
    assert run_traffic(server.port, plan) == first
    assert all(count <= 3 for count in first[0].values()) and sum(first[0].values()) > 0
    certain = FaultPlan(seed=1, probability=dict.fromkeys(KINDS, 1.0), max_faults={RESET: 2, CUT_REQUEST: 1, DROP_RESPONSE: 3})
    counts, failures = run_traffic(server.port, certain, calls=20)
    assert counts == {CUT_REQUEST: 1, DROP_RESPONSE: 3, RESET: 2, DELAY: 0} and failures == 6
    with pytest.raises(ValueError, match="unknown fault kinds"):
        FaultPlan(probability={"slow": 1.0})


def test_closing_leaves_no_thread_and_no_listener(server: TrainerServer) -> None:
    with FaultyProxy(server.port) as proxy, grpc.insecure_channel(proxy.address) as channel:
        pb_grpc.TrainerServiceStub(channel).DescribeSession(pb.DescribeSessionRequest(), timeout=60)
        port = proxy.port
    assert not any(t.name == "faulty-proxy" for t in threading.enumerate())
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.TrainerServiceStub(channel).DescribeSession(pb.DescribeSessionRequest(), timeout=5)
    assert refused.value.code() == UNAVAILABLE
