"""Reliability III, the front door: no small request, listing or stream a client opens holds the
event loop or a worker thread for others, and every refusal arrives with its reason.

Each test drives a real server through real channels and fails when the guard it names is removed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from remote_trainer.client import TrainerClient, TrainerError
from remote_trainer.contract import codec
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb
from remote_trainer.server.app import TrainerServer, create_server
from remote_trainer.server.settings import Settings
from tests.conftest import rand
from tests.server_events import blocking_forward, waiting_for
from tests.test_codec import nested_forward

STATUS_LOG = "remote_trainer.server.status"


@pytest.fixture(scope="module")
def two_workers() -> Iterator[TrainerServer]:
    """A server with two worker threads, so that a call holding one shows at once."""
    running = create_server(Settings(port=0, weights="random", max_workers=2, max_sessions=4))
    yield running
    running.stop(None).wait()


def _raw_forward(channel: grpc.Channel, data: bytes) -> pb.ForwardResponse:
    call = channel.unary_unary("/trainer.v1.TrainerService/Forward", response_deserializer=pb.ForwardResponse.FromString)
    response: pb.ForwardResponse = call(data, timeout=120)
    return response


def test_a_request_of_nested_pieces_is_read_by_protobuf_and_answered(two_workers: TrainerServer) -> None:
    """Half a megabyte of nested pieces (262,144 fields, which the server's cut once walked in Python
    on the event loop for about half a second) is answered as the same batch sent plainly is: the
    cut gives up after a bounded number of fields (tests/test_codec.py counts them) and protobuf
    reads the request."""
    data, array = nested_forward()
    plain = pb.ForwardRequest(eval_mode=True)
    codec.encode_into(plain.input.tensor, array)
    with grpc.insecure_channel(f"localhost:{two_workers.port}") as channel:
        nested = _raw_forward(channel, data)
        expected = _raw_forward(channel, plain.SerializeToString())
    np.testing.assert_array_equal(codec.decode(nested.logits), codec.decode(expected.logits))


def test_list_sessions_never_waits_for_a_busy_session(two_workers: TrainerServer) -> None:
    """A Forward held on the default session: sixteen ListSessions (which describe it) and then a
    call on another session are all answered while it is still held, on a server of two workers
    (each ListSessions once held a worker until the Forward ended, and the other call waited)."""
    with TrainerClient(f"localhost:{two_workers.port}", timeout=120) as client:
        other = client.create_session()
        default = client.session()
        before = default.info()
        entered, release, remove = blocking_forward(two_workers.store.get("")._model)  # type: ignore[attr-defined]
        try:
            with ThreadPoolExecutor(1) as pool:
                held = pool.submit(default.forward, rand(2, 3, 32, 32))
                assert entered.wait(60) or held.result(0) is None
                with ThreadPoolExecutor(16) as listers:
                    listings = list(listers.map(lambda _: client.list_sessions(timeout=20), range(16)))
                assert other.forward(rand(2, 3, 32, 32)).forward_id == 1
                assert not held.done()  # all of it while the Forward was held
                for listing in listings:
                    [listed] = [s for s in listing if s.is_default]
                    assert listed.pending_forward_id == before.pending_forward_id  # as the last call left it
                remove()
                release.set()
                assert held.result(120).forward_id == before.pending_forward_id + 1
            assert default.info().pending_forward_id == before.pending_forward_id + 1
        finally:
            remove()
            release.set()
            other.close()


def test_a_stream_cancelled_unread_is_cancelled_not_internal(two_workers: TrainerServer) -> None:
    """A client that cancels a GetGradients stream it never read: the call is logged and counted as
    CANCELLED, with no traceback (a write to the cancelled stream failed inside gRPC and was
    answered as an unexpected INTERNAL error, in some of the tries)."""
    with TrainerClient(f"localhost:{two_workers.port}", timeout=120) as client:
        s = client.create_session()
        s.forward(rand(2, 3, 32, 32))
        s.backward("sum", rand(2, 1000))
        with grpc.insecure_channel(f"localhost:{two_workers.port}") as channel:
            stream = channel.unary_stream("/trainer.v1.TrainerService/GetGradients", request_serializer=pb.GetGradientsRequest.SerializeToString)
            request = pb.GetGradientsRequest(session_id=s.session_id)
            for _ in range(20):
                with waiting_for(f"rpc=GetGradients session={s.session_id} running", STATUS_LOG) as running, \
                        waiting_for(f"rpc=GetGradients session={s.session_id} status=", STATUS_LOG) as finished, \
                        waiting_for("unexpected error", STATUS_LOG) as unexpected:
                    call = stream(request, timeout=120)
                    assert running.seen.wait(120)
                    call.cancel()
                    assert finished.seen.wait(120)
                assert "status=CANCELLED" in finished.messages[0] and not unexpected.seen.is_set()
        s.close()


@pytest.mark.parametrize("char", ["x", "\u00e4", "\U0001f600"])
def test_a_long_value_echoed_in_an_error_arrives_cut_with_its_reason(two_workers: TrainerServer, char: str) -> None:
    """A 20,000-character session id is echoed by the NOT_FOUND that refuses it: the status passed
    the client's 16 KiB limit on metadata and arrived as RESOURCE_EXHAUSTED with no reason. Every
    text of a status is now cut to a size that arrives (server/status.py), for any characters."""
    with TrainerClient(f"localhost:{two_workers.port}", timeout=60) as client:
        with pytest.raises(TrainerError) as err:
            client.session(char * 20_000).info()
    assert (err.value.code, err.value.reason) == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    assert "more characters" in str(err.value)
