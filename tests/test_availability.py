"""No client can starve the others: calls that never send their request, streams whose reader
stops reading, and a flood of calls on one session, while another client trains and health answers.

The server runs with 4 worker threads; each test stalls several times that many calls.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from remote_trainer.client import TrainerClient
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb
from remote_trainer.contract.trainer.v1 import trainer_pb2_grpc as pb_grpc
from remote_trainer.server.app import TrainerServer, create_server
from remote_trainer.server.settings import Settings
from remote_trainer.engine.errors import ResourceExhausted
from remote_trainer.server.streams import StreamBytes
from tests.conftest import rand

WORKERS = 4
STALLED = 4 * WORKERS


@pytest.fixture
def running() -> Iterator[TrainerServer]:
    server = create_server(Settings(port=0, weights="random", max_workers=WORKERS, max_sessions=4, stream_write_timeout_seconds=3))
    yield server
    server.stop(0).wait()


def health(target: str) -> str:
    with grpc.insecure_channel(target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def train_one_step(target: str) -> float:
    """A whole training step on a session of its own, every call with a 30 s deadline."""
    with TrainerClient(target, timeout=30) as client, client.create_session("random", seed=5) as s:
        s.forward(rand(2, 3, 32, 32))
        loss = s.backward("sum", rand(2, 1000)).loss
        assert s.step() == 1
        assert loss is not None
        return loss


def test_calls_that_never_send_their_request_hold_no_worker(running: TrainerServer) -> None:
    """Headers sent, request message never: before the asyncio server, 16 of these hung everything."""
    target = f"localhost:{running.port}"
    release = threading.Event()

    def never_sends() -> Iterator[bytes]:
        release.wait()  # headers go out at once; the message never does
        return
        yield b""

    channel = grpc.insecure_channel(target)
    stalled = []
    try:
        for method in ("Forward", "Step", "GetGradients", "DescribeSession") * (STALLED // 4):
            call = channel.stream_unary(f"/trainer.v1.TrainerService/{method}", request_serializer=bytes, response_deserializer=bytes)
            stalled.append(call.future(never_sends(), timeout=300))
        assert health(target) == "SERVING"
        assert np.isfinite(train_one_step(target))
        assert health(target) == "SERVING"
        assert not any(call.done() for call in stalled)  # stalled all along
    finally:
        for call in stalled:
            call.cancel()
        release.set()
        channel.close()


class _Ended(logging.Handler):
    """Counts the server's log lines of streams ended because their reader stopped reading."""

    def __init__(self, expected: int) -> None:
        super().__init__()
        self.count, self.expected, self.all_ended = 0, expected, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "rpc=GetParameters: the client read nothing" in record.getMessage():
            self.count += 1
            if self.count >= self.expected:
                self.all_ended.set()


def test_streams_whose_reader_stops_hold_no_worker_and_are_ended(running: TrainerServer) -> None:
    target = f"localhost:{running.port}"
    ended = _Ended(STALLED)
    status_log = logging.getLogger("remote_trainer.server.status")
    status_log.addHandler(ended)
    clients = [TrainerClient(target, timeout=120) for _ in range(STALLED)]
    try:
        streams = []
        for client in clients:  # each takes one 1 MiB chunk of the 47 MB of parameters, then stops reading
            stream = client._stub.GetParameters(pb.GetParametersRequest(), timeout=120)  # raw: the SDK reads to the end
            next(stream)
            streams.append(stream)
        assert health(target) == "SERVING"
        assert np.isfinite(train_one_step(target))
        assert ended.all_ended.wait(60), f"{ended.count} of {STALLED} stalled streams ended"
        assert health(target) == "SERVING"
        assert np.isfinite(train_one_step(target))
    finally:
        status_log.removeHandler(ended)
        for client in clients:
            client.close()


def test_a_flood_of_calls_on_one_session_takes_one_worker(running: TrainerServer) -> None:
    """Forty forwards at once on the shared default session wait their turn without taking the
    other workers, so a client on another session trains meanwhile."""
    target = f"localhost:{running.port}"
    with TrainerClient(target, timeout=120) as flooder:
        default = flooder.session()
        futures = []
        for i in range(40):
            request = pb.ForwardRequest(input=pb.TensorInput(generate=pb.TensorGenerator(
                shape=[8, 3, 64, 64], distribution=pb.DISTRIBUTION_UNIFORM, seed=i)), output_format=pb.OUTPUT_FORMAT_STATS_ONLY)
            futures.append(flooder._stub.Forward.future(request, timeout=120))
        assert np.isfinite(train_one_step(target))
        assert health(target) == "SERVING"
        results = [f.result() for f in futures]
        assert sorted(r.forward_id for r in results) == list(range(1, 41))  # one at a time, none lost
        assert default.info().pending_forward_id == max(r.forward_id for r in results)


class WatchedStreamBytes(StreamBytes):
    """The server's bound on unsent stream bytes, saying when it refuses."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.refused = threading.Event()

    def take(self, n: int) -> None:
        try:
            super().take(n)
        except ResourceExhausted:
            self.refused.set()
            raise


def test_streams_nobody_reads_cannot_make_the_server_hold_more_than_max_stream_bytes() -> None:
    """A stream's responses are made without waiting for its reader, so they wait in the server's
    memory: max_stream_bytes bounds them, all streams together. An unread stream of every parameter
    and buffer (46.8 MB) holds most of its bytes; the next one on the same session (which runs only
    once the first was made) would pass 60 MB and is refused with STREAMS_UNREAD; once the first is
    read, fetching works again, and no byte stays counted."""
    server = create_server(Settings(port=0, weights="random", max_sessions=2, max_stream_bytes=60 * 1024 * 1024))
    server.servicer.stream_bytes = watched = WatchedStreamBytes(server.servicer.stream_bytes.limit)
    # No flow-control window growth, so what the client has not read stays in the server.
    options = [("grpc.max_receive_message_length", 1 << 30), ("grpc.http2.bdp_probe", 0)]
    try:
        with grpc.insecure_channel(f"localhost:{server.port}", options=options) as channel:
            stub = pb_grpc.TrainerServiceStub(channel)
            request = pb.GetParametersRequest(include_buffers=True, skip_stats=True)
            unread = stub.GetParameters(request, timeout=60)
            first = next(unread)  # the stream is under way; the rest waits unread
            second = stub.GetParameters(request, timeout=60)
            assert watched.refused.wait(60)  # the second stream's method, past the limit
            with pytest.raises(grpc.RpcError) as refused:
                list(second)  # what it sent before it was refused, then its status
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_stream_bytes" in refused.value.details()
            rest = list(unread)
            assert first.chunk.name == "conv1.weight" and rest[-1].chunk.last  # all of it, nothing dropped
            assert len(list(stub.GetParameters(request, timeout=60))) == 1 + len(rest)
        assert server.servicer.stream_bytes.held == 0
    finally:
        server.stop(0).wait()
