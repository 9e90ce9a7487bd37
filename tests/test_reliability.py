"""Nothing lost: checkpoints across a server restart, idle expiry, graceful shutdown, cancelled and
timed-out calls, and the metrics that show it."""

from __future__ import annotations

import dataclasses
import logging
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from remote_trainer.client import Session, TrainerClient, TrainerError
from remote_trainer.server.app import TrainerServer, create_server
from remote_trainer.server.settings import Settings
from tests.conftest import WEIGHTS_NAME, rand
from tests.server_events import FakeClock, blocking_forward, waiting_for
from tests.test_server_process import start
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb


def train(session: Session, steps: range, classes: int = 1000) -> None:
    for i in steps:
        session.zero_grad()
        session.forward(rand(2, 3, 32, 32, seed=i))
        session.backward("sum", rand(2, classes, seed=1000 + i))
        session.step()


def test_checkpoint_survives_a_killed_server_bit_for_bit(tmp_path: Path, data_dir: Path) -> None:
    """Steps 1-5 uninterrupted, against: steps 1-3, checkpoint, server killed, a new server, load, steps 4-5."""
    args = ("--weights", "random", "--data-dir", str(data_dir), "--checkpoint-dir", str(tmp_path))
    proc, port, _ = start(*args)
    try:
        with TrainerClient(f"localhost:{port}") as client:
            s = client.create_session(WEIGHTS_NAME)
            s.freeze("layer1")
            s.replace_head(10, seed=3)
            s.unfreeze("layer1.0")
            train(s, range(3), 10)
            assert s.save_checkpoint("run.ckpt") == 3
            train(s, range(3, 5), 10)
            uninterrupted = s.parameters(include_buffers=True)
            uninterrupted_info = s.info()
    finally:
        proc.send_signal(signal.SIGKILL)  # no goodbye: the checkpoint file is all that is left
        proc.wait()
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]  # no temporary files left behind

    proc, port, _ = start(*args)
    try:
        with TrainerClient(f"localhost:{port}") as client:
            s = client.create_session("random", seed=99)  # different weights and head: all replaced
            info = s.load_checkpoint("run.ckpt")
            assert info.step_count == 3 and info.num_classes == 10 and info.pending_forward_id == 0
            assert all(not g.present for g in s.gradients().values())
            train(s, range(3, 5), 10)
            resumed = s.parameters(include_buffers=True)
            now = s.info()  # its own session, numbering its own calls
            assert now == dataclasses.replace(uninterrupted_info, session_id=s.session_id, next_operation=now.next_operation,
                                              operation_epoch=now.operation_epoch)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        np.testing.assert_array_equal(resumed[name].array, uninterrupted[name].array, err_msg=name)


def test_sessions_checkpoint_themselves_every_n_steps(tmp_path: Path) -> None:
    running = create_server(Settings(port=0, weights="random", checkpoint_dir=str(tmp_path), checkpoint_every=2))
    try:
        with TrainerClient(f"localhost:{running.port}") as client:
            s = client.session()
            train(s, range(1))
            assert not (tmp_path / "auto-default.ckpt").exists()
            train(s, range(1, 2))
            assert (tmp_path / "auto-default.ckpt").exists()
            with client.create_session() as other:
                other.load_checkpoint("auto-default.ckpt")
                assert other.info().step_count == 2
    finally:
        running.stop(None).wait()


def test_bad_checkpoint_requests_change_nothing(tmp_path: Path) -> None:
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    running = create_server(Settings(port=0, weights="random", checkpoint_dir=str(tmp_path)))
    try:
        with TrainerClient(f"localhost:{running.port}") as client:
            s = client.session()
            train(s, range(1))
            before = s.parameters()
            cases = [
                ("../escape.ckpt", grpc.StatusCode.INVALID_ARGUMENT, "PATH_OUTSIDE_DATA_DIR"),
                ("", grpc.StatusCode.INVALID_ARGUMENT, "PATH_OUTSIDE_DATA_DIR"),
                ("missing.ckpt", grpc.StatusCode.NOT_FOUND, "CHECKPOINT_NOT_FOUND"),
                ("junk.ckpt", grpc.StatusCode.INVALID_ARGUMENT, "BAD_CHECKPOINT"),
            ]
            for name, code, reason in cases:
                with pytest.raises(TrainerError) as err:
                    s.load_checkpoint(name)
                assert (err.value.code, err.value.reason) == (code, reason), name
            with pytest.raises(TrainerError) as err:
                s.save_checkpoint("/tmp/elsewhere.ckpt")
            assert err.value.reason == "PATH_OUTSIDE_DATA_DIR"
            after = s.parameters()
            assert all(np.array_equal(before[n].array, after[n].array) for n in before)
            assert s.info().step_count == 1
    finally:
        running.stop(None).wait()
    no_dir = create_server(Settings(port=0, weights="random"))
    try:
        with TrainerClient(f"localhost:{no_dir.port}") as client, pytest.raises(TrainerError) as err:
            client.session().save_checkpoint("x.ckpt")
        assert (err.value.code, err.value.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_CHECKPOINT_DIR")
    finally:
        no_dir.stop(None).wait()


def test_idle_sessions_expire_and_say_so(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()  # the store's clock, moved here instead of sleeping
    running = create_server(Settings(port=0, weights="random", session_idle_seconds=3600), clock=clock)
    try:
        with TrainerClient(f"localhost:{running.port}") as client, caplog.at_level(logging.INFO, logger="remote_trainer.server.sessions"):
            idle, busy = client.create_session(), client.create_session()
            for _ in range(3):  # 3600 s: not yet over the limit
                clock.now += 1200
                busy.info()  # kept alive by use
                running.store.expire_idle(running.servicer.busy)  # what the expiry thread does
                assert len(running.store) == 3
            clock.now += 1
            running.store.expire_idle(running.servicer.busy)
            assert len(running.store) == 2
            with pytest.raises(TrainerError) as err:
                idle.info()
            assert (err.value.code, err.value.reason) == (grpc.StatusCode.NOT_FOUND, "SESSION_EXPIRED")
            assert "expired" in err.value.message
            assert busy.info().session_id == busy.session_id
            assert client.session().info().is_default  # the default session never expires
        assert any(f"session {idle.session_id} expired" in r.getMessage() for r in caplog.records)
    finally:
        running.stop(None).wait()


def test_sigterm_lets_in_flight_calls_finish_and_refuses_new_ones() -> None:
    forward_running = threading.Event()  # the server's own log says when the Forward runs

    def watch_log(line: str) -> None:
        if "rpc=Forward session=- running" in line:
            forward_running.set()

    proc, port, log = start("--weights", "random", "--grace-seconds", "30", "--log-level", "DEBUG", on_line=watch_log)
    target = f"localhost:{port}"
    with TrainerClient(target, timeout=120) as client:
        channel = grpc.insecure_channel(target)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=300)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        results: dict[str, object] = {}

        def slow_forward() -> None:
            try:
                results["logits"] = client.session().forward(rand(24, 3, 224, 224)).logits
            except TrainerError as exc:
                results["error"] = exc

        worker = threading.Thread(target=slow_forward)
        worker.start()
        assert forward_running.wait(120)
        proc.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with TrainerClient(target, timeout=10) as late, pytest.raises(TrainerError) as err:
            late.session().info()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        worker.join(timeout=120)
        channel.close()
    assert "error" not in results, results
    assert results["logits"].shape == (24, 1000)  # type: ignore[attr-defined]
    assert proc.wait(timeout=60) == 0
    # The Forward was in flight when SIGTERM came: it ran before, and finished after, the signal.
    lines = [line for line in log.whole() if "received SIGTERM" in line or "rpc=Forward" in line]
    assert "running" in lines[0] and "received SIGTERM" in lines[1] and "status=OK" in lines[2], lines


def test_cancelled_stream_and_exceeded_deadline_leave_the_session_sound(
    client: TrainerClient, session: Session, server: TrainerServer
) -> None:
    train(session, range(1))
    expected = session.gradients()
    stream = client.stub.GetGradients(pb.GetGradientsRequest(session_id=session.session_id), timeout=60)
    next(stream)
    stream.cancel()  # the client walks away mid-stream
    # A Forward whose deadline passes while it waits for its session (held by a Forward that a hook
    # keeps running) never runs: the next forward is number 3, not 4.
    entered, release, remove = blocking_forward(server.store.get(session.session_id)._model)
    holder = threading.Thread(target=lambda: session.forward(rand(2, 3, 32, 32), stats_only=True))
    holder.start()
    assert entered.wait(120)
    remove()
    # The holder is let go only once the server has dropped the waiting call: the deadline passes
    # on the client first, and the server learns of it from the client's cancel or, a little later
    # (it counts from when the request arrived), from its own clock; it logs which it saw.
    try:
        with waiting_for(f"rpc=Forward session={session.session_id} status=", "remote_trainer.server.status") as dropped:
            with pytest.raises(TrainerError) as err:
                session.forward(rand(2, 3, 32, 32), timeout=3)
            assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert dropped.seen.wait(120)
        assert re.search("status=(CANCELLED|DEADLINE_EXCEEDED) ", dropped.messages[0]), dropped.messages
    finally:
        release.set()
        holder.join(120)
    again = session.gradients()
    for name in expected:
        np.testing.assert_array_equal(again[name].array, expected[name].array, err_msg=name)
    assert session.forward(rand(2, 3, 32, 32)).forward_id == 3
    train(session, range(1, 2))
    assert session.info().step_count == 2


def test_prometheus_metrics(tmp_path: Path) -> None:
    running = create_server(Settings(port=0, weights="random", metrics_port=0))
    try:
        with TrainerClient(f"localhost:{running.port}") as client:
            s = client.create_session()
            train(s, range(1))
            s.gradients("fc")
            with pytest.raises(TrainerError):
                s.backward("sum", rand(2, 1000))
        text = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10).read().decode()
    finally:
        running.stop(None).wait()
    assert 'trainer_requests_total{code="OK",method="Forward"} 1.0' in text
    assert 'trainer_requests_total{code="FAILED_PRECONDITION",method="Backward"} 1.0' in text
    assert 'trainer_request_duration_seconds_count{method="Step"} 1.0' in text
    assert "trainer_sessions_open 2.0" in text
    received = float(re.search(r'trainer_received_bytes_total\{method="Forward"\} (\S+)', text).group(1))  # type: ignore[union-attr]
    assert received > 2 * 3 * 32 * 32 * 4  # the input batch
    sent = float(re.search(r'trainer_sent_bytes_total\{method="GetGradients"\} (\S+)', text).group(1))  # type: ignore[union-attr]
    assert sent > 1000 * 512 * 4  # fc.weight's gradient





def test_a_forward_whose_logits_could_not_be_sent_changes_nothing() -> None:
    """Refused before it runs: no BatchNorm statistics updated, the pending forward kept."""
    running = create_server(Settings(port=0, weights="random", max_message_bytes=1024 * 1024, chunk_bytes=256 * 1024))
    try:
        with TrainerClient(f"localhost:{running.port}", max_message_bytes=1024 * 1024) as client:
            s = client.session()
            first = s.forward(rand(2, 3, 32, 32))
            before = s.parameters(include_buffers=True)
            with pytest.raises(TrainerError) as caught:  # 256 x 1000 logits: 1 MB raw, over the 1 MiB limit less headroom
                s.forward(rand(256, 3, 1, 1))
            assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RESPONSE_TOO_LARGE")
            after = s.parameters(include_buffers=True)
            assert all(np.array_equal(before[n].array, after[n].array) for n in before)
            assert s.backward("sum", rand(2, 1000)).forward_id == first.forward_id
            assert s.forward(rand(256, 3, 1, 1), stats_only=True).stats.num_elements == 256_000  # statistics fit
    finally:
        running.stop(None).wait()


def test_a_refused_call_is_counted_before_its_client_hears_of_it() -> None:
    """The count of a failed call is made before the error leaves the server, so a client that has
    seen the error and then reads /metrics finds it counted (the error used to be sent first, and
    the count made when the handler's coroutine next ran on the event loop)."""
    running = create_server(Settings(port=0, weights="random", metrics_port=0))
    try:
        with TrainerClient(f"localhost:{running.port}") as client:
            session = client.create_session()
            for n in range(1, 301):
                with pytest.raises(TrainerError) as err:
                    session.backward("sum", rand(2, 1000))  # no forward yet: FAILED_PRECONDITION
                assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
                counted = running.metrics.registry.get_sample_value(
                    "trainer_requests_total", {"method": "Backward", "code": "FAILED_PRECONDITION"}
                )
                assert counted == n
            for n in range(1, 101):  # a streaming call refused the same way
                with pytest.raises(TrainerError) as err:
                    session.gradients("no.such.tensor")
                assert err.value.code == grpc.StatusCode.NOT_FOUND
                counted = running.metrics.registry.get_sample_value(
                    "trainer_requests_total", {"method": "GetGradients", "code": "NOT_FOUND"}
                )
                assert counted == n
    finally:
        running.stop(None).wait()
