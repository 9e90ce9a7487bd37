"""What a call's request may hold of the server before it is whole (server/receive.py, server/auth.py).

Spoken below gRPC with a raw HTTP/2 client (tests/raw_http2.py) that declares large requests and
sends as much of them as the server's flow-control windows let it, as an attacker would: a stranger
is refused at its headers, a caller's requests are received a bounded number at a time (the rest
may send only their first 64 KiB window), and a request that stops arriving is refused and frees its
turn. Each was broken once to see it fail (old code: a stranger's 8 streams took 1.5 GB, the calls
stayed open).
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from remote_trainer.client import TrainerClient
from remote_trainer.server.app import TrainerServer, create_server
from remote_trainer.server.receive import STREAM_WINDOW_BYTES
from remote_trainer.server.settings import MIB, Settings
from tests.raw_http2 import RawHttp2, RawStream

FORWARD = "/trainer.v1.TrainerService/Forward"
DECLARED = 8 * MIB  # each request's declared length: the server's largest message
RECEIVE_SECONDS = 2.0  # the time limit of the server that proves it (the other's is 60 s)
ALICE = (("authorization", "Bearer tok-a"),)
BOB = (("authorization", "Bearer tok-b"),)


def _server(receive_seconds: float) -> Iterator[TrainerServer]:
    """Tokens on; 8 MiB messages and 32 MiB being received: 4 requests at once, 2 of one caller."""
    running = create_server(Settings(
        port=0, weights="random", tokens="alice:tok-a,bob:tok-b", max_message_bytes=DECLARED,
        max_receiving_bytes=4 * DECLARED, request_receive_seconds=receive_seconds,
    ))
    yield running
    running.stop(None).wait()


@pytest.fixture(scope="module")
def server() -> Iterator[TrainerServer]:
    yield from _server(60.0)


@pytest.fixture(scope="module")
def impatient() -> Iterator[TrainerServer]:
    yield from _server(RECEIVE_SECONDS)


def _taken(conn: RawHttp2, stream: RawStream) -> bool:
    """Sends all of the request but its last byte, waiting for the server to open its windows: True
    when it did (the server is reading it), False when the stream was held at its first window."""
    conn.send(stream, stream.declared + 4, wait=2.0)
    return stream.sent == stream.declared + 4


def _still_serving(server: TrainerServer) -> None:
    with TrainerClient(f"localhost:{server.port}", token="tok-b") as client:
        assert client.session().info().step_count == 0


def test_a_stranger_is_refused_at_its_headers_and_sends_no_more(server: TrainerServer) -> None:
    """No token: the call is refused UNAUTHENTICATED before its request is read (the server once
    took all of it first, holding it for as long as the stranger liked)."""
    with RawHttp2(server.port) as conn:
        stream = conn.open(FORWARD, DECLARED)
        assert stream.ended.wait(10), "a call without a token was not refused before its request arrived"
        assert stream.grpc_status == str(grpc.StatusCode.UNAUTHENTICATED.value[0])
        assert conn.send(stream, DECLARED + 5) == 0  # the stream is over: nothing more goes in


def test_requests_are_received_a_bounded_number_at_a_time(server: TrainerServer) -> None:
    """Alice's three large requests: two are received, the third may send only its first window
    until one of the two is done; Bob (another caller) still has the two slots left of the four."""
    with RawHttp2(server.port) as alice, RawHttp2(server.port) as bob:
        first, second, third = (alice.open(FORWARD, DECLARED, ALICE) for _ in range(3))
        assert _taken(alice, first) and _taken(alice, second)
        assert not _taken(alice, third), "a caller's third request was received with two in progress"
        assert third.sent <= STREAM_WINDOW_BYTES
        bobs = [bob.open(FORWARD, DECLARED, BOB) for _ in range(3)]
        assert _taken(bob, bobs[0]) and _taken(bob, bobs[1])
        assert not _taken(bob, bobs[2]), "a fifth request was received with four in progress"
        # The first request ends (its last byte: zeros, not a ForwardRequest): its slot goes to the third.
        alice.send(first, DECLARED + 5)
        assert first.ended.wait(30) and first.grpc_status == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
        assert _taken(alice, third), "a freed slot did not go to the caller's waiting request"
    _still_serving(server)  # the connections closed: their calls ended and gave their slots back


def test_a_request_that_stops_arriving_is_refused_and_frees_its_turn(impatient: TrainerServer) -> None:
    """Half a request, then silence: the call is refused DEADLINE_EXCEEDED REQUEST_NOT_RECEIVED
    within request_receive_seconds (it once stayed open until the connection's maximum age, an
    hour), and the server keeps serving."""
    with RawHttp2(impatient.port) as conn:
        stream = conn.open(FORWARD, DECLARED, ALICE)
        conn.send(stream, DECLARED // 2, wait=2.0)
        assert stream.ended.wait(RECEIVE_SECONDS + 30), "a request that stopped arriving was never refused"
        assert stream.grpc_status == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
        assert "request_receive_seconds" in stream.headers.get("grpc-message", "")
    _still_serving(impatient)
