"""Numbered operations on a real server, through raw gRPC stubs (what any client sends).

A repeat of a number that ran is answered with the same answer and changes nothing; numbered calls
run in their numbers' order whatever order they arrive in; a refusal uses its number; a call the
client abandoned does not; ``supersede`` gives up missing numbers for good; a checkpoint carries the
record, so a session resumed from it answers a repeat of a call the checkpoint saw.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from torchvision.models import resnet18

from remote_trainer.client import TrainerClient, TrainerError
from remote_trainer.client.errors import from_rpc_error
from remote_trainer.contract import codec
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb
from remote_trainer.contract.trainer.v1 import trainer_pb2_grpc as pb_grpc
from remote_trainer.server.app import TrainerServer, create_server
from remote_trainer.server.settings import Settings
from tests.conftest import WEIGHTS_NAME, rand
from tests.server_events import blocking_forward, waiting_for
from tests.test_watch import WATCH_SECONDS, Reader, trained

BATCH = (2, 3, 64, 64)


def _tensor(array: np.ndarray) -> pb.TensorInput:
    return pb.TensorInput(tensor=codec.encode(array))


def _op(number: int, supersede: bool = False) -> pb.Operation:
    return pb.Operation(number=number, supersede=supersede)


def _train_step(sid: str, number: int, seed: int = 0, supersede: bool = False) -> pb.TrainStepRequest:
    labels = np.array([1, 7], dtype=np.int64)
    return pb.TrainStepRequest(
        session_id=sid, input=_tensor(rand(*BATCH, seed=seed)),
        loss=pb.Loss(function=pb.LOSS_FUNCTION_CROSS_ENTROPY, labels=_tensor(labels)), operation=_op(number, supersede),
    )


def _reason(error: grpc.RpcError) -> str:
    return from_rpc_error(error).reason


def _expected(error: grpc.RpcError) -> str:
    return from_rpc_error(error).metadata["expected"]


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def numbered_server(data_dir: Path, checkpoint_dir: Path) -> Iterator[TrainerServer]:
    """A server that checkpoints every step and waits at most 2 s for a missing number."""
    running = create_server(Settings(
        port=0, weights=str(data_dir / WEIGHTS_NAME), data_dir=str(data_dir), checkpoint_dir=str(checkpoint_dir),
        checkpoint_every=1, keep_auto_checkpoints=0, operation_order_wait_seconds=2.0,
    ))
    yield running
    running.stop(None).wait()


@pytest.fixture(scope="module")
def stub(numbered_server: TrainerServer) -> Iterator[pb_grpc.TrainerServiceStub]:
    with grpc.insecure_channel(f"localhost:{numbered_server.port}", options=[
        ("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20),
    ]) as channel:
        stub = pb_grpc.TrainerServiceStub(channel)
        stub.target = f"localhost:{numbered_server.port}"  # type: ignore[attr-defined]  # for _weights
        yield stub


@pytest.fixture
def sid(stub: pb_grpc.TrainerServiceStub) -> Iterator[str]:
    info = stub.CreateSession(pb.CreateSessionRequest(weights=WEIGHTS_NAME), timeout=120).session
    assert info.next_operation == 1
    yield info.session_id
    stub.CloseSession(pb.CloseSessionRequest(session_id=info.session_id), timeout=60)


def _describe(stub: pb_grpc.TrainerServiceStub, sid: str) -> pb.SessionInfo:
    return stub.DescribeSession(pb.DescribeSessionRequest(session_id=sid), timeout=60).session


def _weights(stub: pb_grpc.TrainerServiceStub, sid: str) -> dict[str, np.ndarray]:
    """Every parameter and buffer of the session, read with the SDK (through the same channel's target)."""
    with TrainerClient(stub.target, timeout=120) as client:  # type: ignore[attr-defined]
        return {name: np.array(value.array) for name, value in client.session(sid).parameters(include_buffers=True).items()}


def test_a_repeated_train_step_is_answered_and_not_run_again(stub: pb_grpc.TrainerServiceStub, sid: str) -> None:
    first = stub.TrainStep(_train_step(sid, 1), timeout=120)
    after_one = _weights(stub, sid)
    again = stub.TrainStep(_train_step(sid, 1), timeout=120)  # a retry whose answer was lost
    assert again == first  # the same answer, word for word
    assert _describe(stub, sid).step_count == 1
    for name, value in _weights(stub, sid).items():
        np.testing.assert_array_equal(value, after_one[name], err_msg=name)
    assert _describe(stub, sid).next_operation == 2
    # Every other numbered call the same: the step, its answer and no second step.
    step = stub.Step(pb.StepRequest(session_id=sid, operation=_op(2)), timeout=60)
    assert stub.Step(pb.StepRequest(session_id=sid, operation=_op(2)), timeout=60) == step
    assert _describe(stub, sid).step_count == 2


def test_numbered_calls_run_in_their_order_whatever_order_they_arrive_in(stub: pb_grpc.TrainerServiceStub, sid: str) -> None:
    """Backward (2) arrives first and waits for Forward (1): run first, it would find no forward."""
    backward = pb.BackwardRequest(
        session_id=sid, loss=pb.Loss(function=pb.LOSS_FUNCTION_CROSS_ENTROPY, labels=_tensor(np.array([3, 4]))),
        step=True, operation=_op(2),
    )
    with ThreadPoolExecutor(1) as pool, waiting_for("operation 2 waits for operation 1", "remote_trainer.server.dispatch") as seen:
        early = pool.submit(stub.Backward, backward, timeout=60)
        assert seen.seen.wait(60)
        forward = stub.Forward(pb.ForwardRequest(session_id=sid, input=_tensor(rand(*BATCH)), operation=_op(1)), timeout=60)
        answer = early.result()
    assert answer.forward_id == forward.forward_id and answer.step_count == 1


def test_a_missing_number_is_waited_for_a_bounded_time_then_refused_saying_what_is_expected(
    stub: pb_grpc.TrainerServiceStub, sid: str
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        stub.Step(pb.StepRequest(session_id=sid, operation=_op(3)), timeout=60)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _reason(refused.value) == "OPERATION_OUT_OF_ORDER"
    assert "expects 1 next" in (refused.value.details() or "")
    assert _expected(refused.value) == "1"
    assert _describe(stub, sid).step_count == 0


def test_a_refused_call_uses_its_number_and_its_repeat_is_refused_the_same(stub: pb_grpc.TrainerServiceStub, sid: str) -> None:
    bad = pb.ForwardRequest(session_id=sid, input=_tensor(rand(2, 3, 64)), operation=_op(1))  # 3-D: refused by the server
    with pytest.raises(grpc.RpcError) as first:
        stub.Forward(bad, timeout=60)
    assert first.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    stub.ZeroGrad(pb.ZeroGradRequest(session_id=sid, operation=_op(2)), timeout=60)  # not held up by 1
    with pytest.raises(grpc.RpcError) as again:
        stub.Forward(bad, timeout=60)
    assert (again.value.code(), again.value.details()) == (first.value.code(), first.value.details())
    # An error from the engine itself the same: Backward with no forward pending.
    backward = pb.BackwardRequest(session_id=sid, output_gradient=_tensor(np.ones((2, 1000), np.float32)), operation=_op(3))
    with pytest.raises(grpc.RpcError) as no_forward:
        stub.Backward(backward, timeout=60)
    stub.Forward(pb.ForwardRequest(session_id=sid, input=_tensor(rand(*BATCH)), operation=_op(4)), timeout=60)
    with pytest.raises(grpc.RpcError) as repeat:
        stub.Backward(backward, timeout=60)  # a forward is pending now, but 3's answer was the refusal
    assert _reason(repeat.value) == _reason(no_forward.value) == "NO_PENDING_FORWARD"


def test_a_bad_request_that_came_early_is_refused_in_its_turn_and_uses_its_number(
    stub: pb_grpc.TrainerServiceStub, sid: str
) -> None:
    """Backward (2) with an unknown loss arrives first: it is refused in its turn (after Forward 1),
    using its number, so ZeroGrad (3) is not held up."""
    bad = pb.BackwardRequest(session_id=sid, loss=pb.Loss(function=99), operation=_op(2))  # type: ignore[arg-type]
    with ThreadPoolExecutor(1) as pool, waiting_for("operation 2 waits for operation 1", "remote_trainer.server.dispatch") as seen:
        early = pool.submit(stub.Backward, bad, timeout=60)
        assert seen.seen.wait(60)
        stub.Forward(pb.ForwardRequest(session_id=sid, input=_tensor(rand(*BATCH)), operation=_op(1)), timeout=60)
        with pytest.raises(grpc.RpcError) as refused:
            early.result()
    assert _reason(refused.value) == "UNKNOWN_LOSS"
    stub.ZeroGrad(pb.ZeroGradRequest(session_id=sid, operation=_op(3)), timeout=60)
    assert _describe(stub, sid).next_operation == 4


def test_a_waiting_call_is_tried_again_at_most_once_a_second(stub: pb_grpc.TrainerServiceStub, sid: str) -> None:
    """A call whose lower numbers never come waits without spinning: the servicer runs it about once
    a second (the engine is asked again) until the bound (2 s here), then refuses it."""
    with waiting_for(f"rpc=Step session={sid} running", "remote_trainer.server.status") as runs:
        with pytest.raises(grpc.RpcError) as refused:
            stub.Step(pb.StepRequest(session_id=sid, operation=_op(5)), timeout=60)
    assert _reason(refused.value) == "OPERATION_OUT_OF_ORDER"
    assert 1 <= len(runs.messages) <= 4, runs.messages


def test_a_supersede_gives_up_a_bounded_number_of_operations(stub: pb_grpc.TrainerServiceStub, sid: str) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        stub.ZeroGrad(pb.ZeroGradRequest(session_id=sid, operation=_op(10**12, supersede=True)), timeout=60)
    assert _reason(refused.value) == "BAD_OPERATION_NUMBER"
    stub.ZeroGrad(pb.ZeroGradRequest(session_id=sid, operation=_op(1000, supersede=True)), timeout=60)
    assert _describe(stub, sid).next_operation == 1001
    with pytest.raises(grpc.RpcError) as late:
        stub.ZeroGrad(pb.ZeroGradRequest(session_id=sid, operation=_op(990)), timeout=60)
    assert _reason(late.value) == "OPERATION_GIVEN_UP"


def test_a_session_made_anew_refuses_the_old_numbering(stub: pb_grpc.TrainerServiceStub, sid: str) -> None:
    """The default session of a restarted server has the same id and a fresh state: a client of the
    old one is told (SESSION_RECREATED), not run on the fresh weights."""
    epoch = _describe(stub, sid).operation_epoch
    assert len(epoch) == 16
    stub.ZeroGrad(pb.ZeroGradRequest(session_id=sid, operation=pb.Operation(number=1, epoch=epoch)), timeout=60)
    with pytest.raises(grpc.RpcError) as refused:
        stub.ZeroGrad(pb.ZeroGradRequest(session_id=sid, operation=pb.Operation(number=2, epoch="0" * 16, supersede=True)),
                      timeout=60)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and _reason(refused.value) == "SESSION_RECREATED"


def test_the_sdk_is_not_stuck_behind_a_refusal_its_number_never_reached(numbered_server: TrainerServer) -> None:
    """A Forward refused by gRPC's own message limit never reaches the session's record; the SDK's
    next call supersedes its number instead of waiting for it for ever."""
    with TrainerClient(f"localhost:{numbered_server.port}", timeout=60, max_message_bytes=1 << 20) as client, \
            client.create_session(WEIGHTS_NAME) as session:
        with pytest.raises(TrainerError) as too_big:
            session.forward(rand(4, 3, 224, 224))
        assert too_big.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert session.zero_grad() == 0
        session.train_step(rand(*BATCH), "cross_entropy", np.array([1, 2]))
        assert session.info().step_count == 1


def test_resume_refuses_a_session_that_still_lives(numbered_server: TrainerServer) -> None:
    with TrainerClient(f"localhost:{numbered_server.port}", timeout=60) as client, client.create_session(WEIGHTS_NAME) as session:
        with pytest.raises(TrainerError) as alive:
            session.resume()
        assert alive.value.reason == "SESSION_ALIVE"


def test_a_repeat_must_be_the_same_call(stub: pb_grpc.TrainerServiceStub, sid: str) -> None:
    stub.ZeroGrad(pb.ZeroGradRequest(session_id=sid, operation=_op(1)), timeout=60)
    with pytest.raises(grpc.RpcError) as mismatch:
        stub.Step(pb.StepRequest(session_id=sid, operation=_op(1)), timeout=60)
    assert mismatch.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _reason(mismatch.value) == "OPERATION_MISMATCH"


def test_a_repeat_that_asks_something_else_is_refused_and_changes_nothing(stub: pb_grpc.TrainerServiceStub, sid: str) -> None:
    """The same number, RPC and client with other fields is refused, not answered with the first
    call's answer: another batch (bytes the server cuts out of the message), another option, another
    bad request. A true repeat (supersede set, the session unchanged) is still answered."""
    first = stub.TrainStep(_train_step(sid, 1), timeout=120)
    stub.ZeroGrad(pb.ZeroGradRequest(session_id=sid, set_to_none=False, operation=_op(2)), timeout=60)
    with pytest.raises(grpc.RpcError) as bad:
        stub.Forward(pb.ForwardRequest(session_id=sid, output_format=99, operation=_op(3)), timeout=60)  # type: ignore[arg-type]
    assert _reason(bad.value) == "BAD_OUTPUT_FORMAT"
    weights = _weights(stub, sid)
    others = [
        ("TrainStep", _train_step(sid, 1, seed=5)),
        ("ZeroGrad", pb.ZeroGradRequest(session_id=sid, set_to_none=True, operation=_op(2))),
        ("Forward", pb.ForwardRequest(session_id=sid, output_format=98, operation=_op(3))),  # type: ignore[arg-type]
    ]
    for method, request in others:
        with pytest.raises(grpc.RpcError) as other:
            getattr(stub, method)(request, timeout=120)
        assert other.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
        assert _reason(other.value) == "OPERATION_MISMATCH" and "another" in (other.value.details() or ""), method
    assert stub.TrainStep(_train_step(sid, 1, supersede=True), timeout=120) == first
    info = _describe(stub, sid)
    assert (info.step_count, info.next_operation) == (1, 4)
    after = _weights(stub, sid)
    for name, value in weights.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)


def test_a_number_another_client_used_is_not_answered_with_its_answer(stub: pb_grpc.TrainerServiceStub, sid: str) -> None:
    """Two clients numbering one session collide: the second is refused, not handed the first's answer."""
    mine = stub.TrainStep(_train_step(sid, 1), timeout=120)
    theirs = _train_step(sid, 1, seed=5)
    theirs.operation.client = "another-client"
    with pytest.raises(grpc.RpcError) as refused:
        stub.TrainStep(theirs, timeout=120)
    assert _reason(refused.value) == "OPERATION_MISMATCH" and "another client" in (refused.value.details() or "")
    assert stub.TrainStep(_train_step(sid, 1), timeout=120) == mine
    assert _describe(stub, sid).step_count == 1


def test_supersede_gives_up_the_missing_numbers_for_good(stub: pb_grpc.TrainerServiceStub, sid: str) -> None:
    stub.TrainStep(_train_step(sid, 1), timeout=120)
    # 2 was sent but never arrived (the client gave up on it): 3 supersedes it and runs at once.
    stub.ZeroGrad(pb.ZeroGradRequest(session_id=sid, operation=_op(3, supersede=True)), timeout=60)
    with pytest.raises(grpc.RpcError) as late:  # the late copy of 2
        stub.TrainStep(_train_step(sid, 2), timeout=120)
    assert _reason(late.value) == "OPERATION_GIVEN_UP"
    assert _describe(stub, sid).step_count == 1


def test_an_abandoned_call_does_not_use_its_number(
    numbered_server: TrainerServer, stub: pb_grpc.TrainerServiceStub, sid: str
) -> None:
    """A Step whose deadline passes while it waits behind a held Forward is not taken; its retry is."""
    stub.TrainStep(_train_step(sid, 1), timeout=120)  # gradients for the step below
    entered, release, remove = blocking_forward(numbered_server.store.get(sid)._model)  # type: ignore[attr-defined]
    try:
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(stub.Forward, pb.ForwardRequest(session_id=sid, input=_tensor(rand(*BATCH))), timeout=60)
            assert entered.wait(60)
            with waiting_for(f"rpc=Step session={sid}", "remote_trainer.server.status") as gone:
                with pytest.raises(grpc.RpcError) as late:
                    stub.Step(pb.StepRequest(session_id=sid, operation=_op(2)), timeout=1)
                assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                release.set()
                held.result()
                assert gone.seen.wait(60)
    finally:
        release.set()
        remove()
    assert _describe(stub, sid).step_count == 1
    assert stub.Step(pb.StepRequest(session_id=sid, operation=_op(2)), timeout=60).step_count == 2


def test_a_resumed_session_goes_on_numbering_and_answers_what_its_checkpoint_saw(
    stub: pb_grpc.TrainerServiceStub, sid: str
) -> None:
    answers = [stub.TrainStep(_train_step(sid, n, seed=n), timeout=120) for n in (1, 2, 3)]
    resumed = stub.CreateSession(pb.CreateSessionRequest(resume_from=f"auto-{sid}.ckpt"), timeout=120).session
    try:
        assert (resumed.step_count, resumed.next_operation) == (3, 4)
        # The answer of 3 was lost in the crash: its retry on the resumed session is answered, not run.
        assert stub.TrainStep(_train_step(resumed.session_id, 3, seed=3), timeout=120) == answers[2]
        assert _describe(stub, resumed.session_id).step_count == 3
        # And it goes on exactly as the original: step 4 on both gives the same weights.
        stub.TrainStep(_train_step(sid, 4, seed=4), timeout=120)
        stub.TrainStep(_train_step(resumed.session_id, 4, seed=4), timeout=120)
        original, other = _weights(stub, sid), _weights(stub, resumed.session_id)
        for name in original:
            np.testing.assert_array_equal(other[name], original[name], err_msg=name)
    finally:
        stub.CloseSession(pb.CloseSessionRequest(session_id=resumed.session_id), timeout=60)


def test_a_checkpoint_of_the_previous_release_answers_its_repeats(
    stub: pb_grpc.TrainerServiceStub, sid: str, checkpoint_dir: Path
) -> None:
    """The release before answers carried ``replayed`` kept ConfigureOptimizer's answer as its
    OptimizerSpec alone (now the session's description), and FreezeResult and the description
    without ``replayed``. A session resumed from a checkpoint that release wrote answers a repeat of
    each with the first answer (a ConfigureOptimizer's was INTERNAL) and tells its watchers nothing
    again."""
    optimizer = pb.OptimizerConfig(kind=pb.OPTIMIZER_KIND_ADAM, lr=0.25)

    def calls(session_id: str) -> list[pb.ConfigureOptimizerResponse | pb.FreezeLayersResponse | pb.ReplaceHeadResponse]:
        """Operations 1, 2 and 3 on the session: their answers."""
        return [
            stub.ConfigureOptimizer(pb.ConfigureOptimizerRequest(session_id=session_id, optimizer=optimizer, operation=_op(1)),
                                    timeout=60),
            stub.FreezeLayers(pb.FreezeLayersRequest(session_id=session_id, patterns=["layer1"], operation=_op(2)), timeout=60),
            stub.ReplaceHead(pb.ReplaceHeadRequest(session_id=session_id, num_classes=10, seed=1, operation=_op(3)), timeout=60),
        ]

    answers = calls(sid)
    stub.SaveCheckpoint(pb.SaveCheckpointRequest(session_id=sid, name="previous-release.ckpt"), timeout=120)
    path = checkpoint_dir / "previous-release.ckpt"
    content = torch.load(path, weights_only=True)
    kept = {number: answer for number, answer in content["operations"]["answers"]}  # as plain data (engine/ledger.py)
    assert [kept[n]["result"]["type"] for n in (1, 2, 3)] == ["SessionDescription", "FreezeResult", "SessionDescription"]
    # The file as that release wrote it: what it kept, as ledger.py's _plain writes it.
    kept[1]["result"] = kept[1]["result"]["optimizer"]
    assert kept[1]["result"]["type"] == "OptimizerSpec"
    del kept[2]["result"]["replayed"], kept[3]["result"]["replayed"]
    torch.save(content, path)

    resumed = stub.CreateSession(pb.CreateSessionRequest(resume_from="previous-release.ckpt"), timeout=120).session
    rid = resumed.session_id
    with TrainerClient(stub.target, timeout=120) as client:  # type: ignore[attr-defined]
        try:
            assert (resumed.next_operation, resumed.num_classes) == (4, 10)
            stub.Step(pb.StepRequest(session_id=rid, operation=_op(4)), timeout=60)  # an event to begin the watch with
            reader = Reader(client.session(rid).watch(recent=1, timeout=WATCH_SECONDS))
            reader.next()  # the watch is in place
            answers[2].session.session_id = rid  # type: ignore[union-attr]
            assert calls(rid) == answers  # the repeats: answered from the record
            # Steps 4 and 5 (the session had taken none): nothing else ran.
            assert stub.Step(pb.StepRequest(session_id=rid, operation=_op(5)), timeout=60).step_count == 2
            described = _describe(stub, rid)
            assert (described.next_operation, described.optimizer.kind, described.optimizer.lr) == (6, optimizer.kind, 0.25)
        finally:
            stub.CloseSession(pb.CloseSessionRequest(session_id=rid), timeout=60)
        # The repeats told no watcher anything: after the watch began, the step (5) and the end only.
        assert [e.kind for e in trained(reader.rest())] == ["step", "end"]


def test_create_and_close_by_client_token_happen_once(stub: pb_grpc.TrainerServiceStub) -> None:
    request = pb.CreateSessionRequest(weights=WEIGHTS_NAME, client_token="a-retried-create")
    first = stub.CreateSession(request, timeout=120).session
    again = stub.CreateSession(request, timeout=120).session  # the retry of a create whose answer was lost
    assert again.session_id == first.session_id
    close = pb.CloseSessionRequest(session_id=first.session_id, client_token="a-retried-close")
    assert stub.CloseSession(close, timeout=60).session_id == first.session_id
    assert stub.CloseSession(close, timeout=60).session_id == first.session_id  # answered as the first close was
    with pytest.raises(grpc.RpcError) as gone:
        stub.DescribeSession(pb.DescribeSessionRequest(session_id=first.session_id), timeout=60)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


def test_unnumbered_calls_run_as_they_come(stub: pb_grpc.TrainerServiceStub, sid: str) -> None:
    request = _train_step(sid, 0)
    request.ClearField("operation")
    stub.TrainStep(request, timeout=120)
    stub.TrainStep(request, timeout=120)
    info = _describe(stub, sid)
    assert (info.step_count, info.next_operation) == (2, 1)


def test_expected_step_count_refuses_negative_values(stub: pb_grpc.TrainerServiceStub, sid: str) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        stub.Step(pb.StepRequest(session_id=sid, expected_step_count=-1), timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _reason(refused.value) == "BAD_EXPECTED_STEP_COUNT"


def test_the_steps_equal_local_pytorch(stub: pb_grpc.TrainerServiceStub, sid: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Numbered, repeated and all, the session trained exactly as local PyTorch does once per step."""
    for n in (1, 2):
        stub.TrainStep(_train_step(sid, n, seed=n), timeout=120)
        stub.TrainStep(_train_step(sid, n, seed=n), timeout=120)  # repeats change nothing
    local = resnet18()
    local.load_state_dict(state_dict)
    optimizer = torch.optim.SGD(local.parameters(), lr=0.01, momentum=0.9)
    for n in (1, 2):
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(local.train()(torch.from_numpy(rand(*BATCH, seed=n))), torch.tensor([1, 7]))
        loss.backward()
        optimizer.step()
    remote = _weights(stub, sid)
    for name, value in local.state_dict().items():
        np.testing.assert_allclose(remote[name], value.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
