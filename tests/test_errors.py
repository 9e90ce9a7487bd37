"""Every bad request gets a precise status and reason, and leaves the session exactly as it was."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from remote_trainer.client import Optimizer, Reason, Session, TrainerClient, TrainerError
from remote_trainer.client.errors import from_rpc_error
from remote_trainer.contract import codec
from remote_trainer.server.app import create_server
from remote_trainer.server.settings import Settings
from tests.conftest import WEIGHTS_NAME, rand
from remote_trainer.contract.trainer.v1 import trainer_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass
class State:
    info: Any
    values: dict[str, np.ndarray]
    grads: dict[str, np.ndarray | None]


def state_of(s: Session) -> State:
    """The session's state; its operation numbering left out (a refusal uses its number, by design:
    docs/reliability.md, and another session numbers on its own)."""
    return State(
        dataclasses.replace(s.info(), next_operation=0, operation_epoch=""),
        {k: v.array for k, v in s.parameters(include_buffers=True).items()},  # type: ignore[misc]
        {k: v.array for k, v in s.gradients().items()},
    )


def assert_same_state(a: State, b: State) -> None:
    assert a.info == b.info
    assert a.values.keys() == b.values.keys() and a.grads.keys() == b.grads.keys()
    for name in a.values:
        np.testing.assert_array_equal(a.values[name], b.values[name], err_msg=name)
    for name in a.grads:
        assert (a.grads[name] is None) == (b.grads[name] is None), name
        if a.grads[name] is not None:
            np.testing.assert_array_equal(a.grads[name], b.grads[name], err_msg=name)


def raw_forward(s: Session, tensor: pb.Tensor | None = None, **input_fields: Any) -> Callable[[TrainerClient], Any]:
    def call(client: TrainerClient) -> Any:
        request = pb.ForwardRequest(session_id=s.session_id)
        if tensor is not None:
            request.input.tensor.CopyFrom(tensor)
        for key, value in input_fields.items():
            getattr(request.input, key).CopyFrom(value)
        return client.call(client.stub.Forward, request)
    return call


def raw_backward(s: Session, **fields: Any) -> Callable[[TrainerClient], Any]:
    def call(client: TrainerClient) -> Any:
        return client.call(client.stub.Backward, pb.BackwardRequest(session_id=s.session_id, **fields))
    return call


def sdk(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[[TrainerClient], Any]:
    def call(client: TrainerClient) -> Any:
        result = method(*args, **kwargs)
        return dict(result) if isinstance(result, dict) else result
    return call


def labels_input(array: np.ndarray) -> pb.TensorInput:
    return pb.TensorInput(tensor=codec.encode(array))


# Each case: (name, make the bad call from a prepared session, expected code, expected reason).
CASES: list[tuple[str, Callable[[Session], Callable[[TrainerClient], Any]], grpc.StatusCode, str]] = [
    ("rank-3 input", lambda s: sdk(s.forward, rand(3, 64, 64)), INVALID, "BAD_INPUT_SHAPE"),
    ("one channel", lambda s: sdk(s.forward, rand(2, 1, 64, 64)), INVALID, "BAD_INPUT_SHAPE"),
    ("empty image", lambda s: sdk(s.forward, rand(2, 3, 0, 64)), INVALID, "IMAGE_TOO_SMALL"),
    ("one 32x32 image in training mode", lambda s: sdk(s.forward, rand(1, 3, 32, 32)), INVALID, "BATCH_TOO_SMALL_FOR_TRAINING"),
    ("bfloat16 input", lambda s: raw_forward(s, codec.encode(np.zeros((2, 3, 32, 32), np.float32), pb.DATA_TYPE_BFLOAT16)),
     INVALID, "WRONG_DTYPE"),
    ("class index beyond int64", lambda s: raw_backward(s, loss=pb.Loss(function=pb.LOSS_FUNCTION_CROSS_ENTROPY,
     labels=pb.TensorInput(values=pb.TensorValues(shape=[2], values=[1, 2.0**64])))), INVALID, "VALUE_OUT_OF_RANGE"),
    ("int32 input", lambda s: raw_forward(s, codec.encode(np.zeros((2, 3, 32, 32), np.int32))), INVALID, "WRONG_DTYPE"),
    ("uint8 images without an input transform", lambda s: sdk(s.forward, np.zeros((2, 3, 32, 32), np.uint8)), INVALID,
     "INPUT_TRANSFORM_MISSING"),
    ("bytes do not match shape", lambda s: raw_forward(s, pb.Tensor(shape=[2, 3, 32, 32], data_type=pb.DATA_TYPE_FLOAT32, raw_data=b"\0" * 100)),
     INVALID, "BYTE_LENGTH_MISMATCH"),
    ("unspecified data type", lambda s: raw_forward(s, pb.Tensor(shape=[1], raw_data=b"\0" * 4)), INVALID, "UNKNOWN_DATA_TYPE"),
    ("negative dimension", lambda s: raw_forward(s, pb.Tensor(shape=[-2, 3, 32, 32], data_type=pb.DATA_TYPE_FLOAT32)), INVALID, "NEGATIVE_DIMENSION"),
    ("NaN in input", lambda s: sdk(s.forward, np.full((2, 3, 32, 32), np.nan, np.float32)), INVALID, "NON_FINITE_VALUES"),
    ("missing input", lambda s: raw_forward(s), INVALID, "MISSING_TENSOR"),
    ("values that do not fill the shape", lambda s: raw_forward(s, values=pb.TensorValues(shape=[2, 3, 32, 32], values=[1.0, 2.0])),
     INVALID, "VALUE_COUNT_MISMATCH"),
    ("generator without distribution", lambda s: raw_forward(s, generate=pb.TensorGenerator(shape=[2, 3, 32, 32])), INVALID, "BAD_GENERATOR"),
    ("input over max elements", lambda s: raw_forward(s, generate=pb.TensorGenerator(shape=[10**6, 3, 224, 224], distribution=pb.DISTRIBUTION_ONES)),
     EXHAUSTED, "INPUT_TOO_LARGE"),
    ("batch over max_batch", lambda s: sdk(s.forward, np.zeros((257, 3, 32, 32), np.float32)), EXHAUSTED, "BATCH_TOO_LARGE"),
    ("labels of the wrong shape", lambda s: sdk(s.backward, "sum", rand(2, 10)), INVALID, "BAD_LABEL_SHAPE"),
    ("NaN labels", lambda s: sdk(s.backward, "mse", np.full((2, 1000), np.nan, np.float32)), INVALID, "NON_FINITE_VALUES"),
    ("class index out of range", lambda s: sdk(s.backward, "cross_entropy", np.array([1, 1000])), INVALID, "CLASS_INDEX_OUT_OF_RANGE"),
    ("negative class index", lambda s: sdk(s.backward, "cross_entropy", np.array([-1, 3])), INVALID, "CLASS_INDEX_OUT_OF_RANGE"),
    ("class indices of the wrong shape", lambda s: sdk(s.backward, "cross_entropy", np.array([[1, 2]])), INVALID, "BAD_LABEL_SHAPE"),
    ("float class indices", lambda s: raw_backward(s, loss=pb.Loss(function=pb.LOSS_FUNCTION_CROSS_ENTROPY, labels=labels_input(np.array([1.0, 2.0], np.float32)))),
     INVALID, "WRONG_DTYPE"),
    ("fractional class indices as numbers", lambda s: raw_backward(s, loss=pb.Loss(function=pb.LOSS_FUNCTION_CROSS_ENTROPY,
     labels=pb.TensorInput(values=pb.TensorValues(shape=[2], values=[1.5, 2])))), INVALID, "NOT_INTEGRAL"),
    ("unknown loss", lambda s: raw_backward(s, loss=pb.Loss(labels=labels_input(rand(2, 1000)))), INVALID, "UNKNOWN_LOSS"),
    ("no loss and no output gradient", lambda s: raw_backward(s), INVALID, "NO_BACKWARD_SOURCE"),
    ("output gradient of the wrong shape", lambda s: sdk(s.backward, output_gradient=rand(1, 1000)), INVALID, "BAD_OUTPUT_GRADIENT_SHAPE"),
    ("infinite output gradient", lambda s: sdk(s.backward, output_gradient=np.full((2, 1000), np.inf, np.float32)), INVALID, "NON_FINITE_VALUES"),
    ("stale forward id", lambda s: sdk(s.backward, "sum", rand(2, 1000), forward_id=99), PRECONDITION, "STALE_FORWARD"),
    ("negative learning rate", lambda s: sdk(s.configure_optimizer, Optimizer("sgd", lr=-1.0)), INVALID, "BAD_OPTIMIZER_VALUE"),
    ("NaN learning rate", lambda s: sdk(s.configure_optimizer, Optimizer("adam", lr=float("nan"))), INVALID, "BAD_OPTIMIZER_VALUE"),
    ("nesterov without momentum", lambda s: sdk(s.configure_optimizer, Optimizer("sgd", lr=0.1, nesterov=True)), INVALID, "BAD_OPTIMIZER_VALUE"),
    ("beta out of range", lambda s: sdk(s.configure_optimizer, Optimizer("adamw", beta2=1.0)), INVALID, "BAD_OPTIMIZER_VALUE"),
    ("glob that matches nothing", lambda s: sdk(s.freeze, "layer9.*"), INVALID, "PATTERN_MATCHES_NOTHING"),
    ("second pattern matches nothing", lambda s: sdk(s.freeze, "layer1", "nothing*"), INVALID, "PATTERN_MATCHES_NOTHING"),
    ("unknown parameter name", lambda s: sdk(s.unfreeze, "fc.weights"), NOT_FOUND, "PARAMETER_NOT_FOUND"),
    ("no pattern", lambda s: sdk(s.freeze), INVALID, "NO_PATTERNS"),
    ("gradients of an unknown parameter", lambda s: sdk(s.gradients, "layer5"), NOT_FOUND, "PARAMETER_NOT_FOUND"),
    ("gradients in int64", lambda s: lambda c: list(c.stream(c.stub.GetGradients, pb.GetGradientsRequest(
        session_id=s.session_id, transfer_data_type=pb.DATA_TYPE_INT64))), INVALID, "BAD_TRANSFER_TYPE"),
    ("head of zero classes", lambda s: sdk(s.replace_head, 0), INVALID, "BAD_NUM_CLASSES"),
    ("unknown output format", lambda s: lambda c: c.call(c.stub.Forward, pb.ForwardRequest(
        session_id=s.session_id, input=labels_input(rand(2, 3, 32, 32)), output_format=9)), INVALID, "BAD_OUTPUT_FORMAT"),  # type: ignore[arg-type]
]


@pytest.fixture
def prepared(session: Session) -> Session:
    """A session with gradients, one step taken, and a pending forward whose graph is kept."""
    session.forward(rand(2, 3, 64, 64))
    session.backward("sum", rand(2, 1000))
    session.step()
    session.forward(rand(2, 3, 64, 64, seed=1))
    session.backward("sum", rand(2, 1000), retain_graph=True)
    return session


@pytest.mark.parametrize(("make", "code", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_is_refused_and_changes_nothing(
    prepared: Session, client: TrainerClient, make: Callable[[Session], Callable[[TrainerClient], Any]], code: grpc.StatusCode, reason: str
) -> None:
    before = state_of(prepared)
    with pytest.raises(TrainerError) as err:
        make(prepared)(client)
    assert (err.value.code, err.value.reason) == (code, reason), err.value
    assert err.value.message
    if code == INVALID:
        assert err.value.violations, "INVALID_ARGUMENT carries BadRequest field violations"
    assert_same_state(before, state_of(prepared))
    # The session still works: the pending forward's graph is intact.
    assert prepared.backward("sum", rand(2, 1000)).parameters_with_grad == 62
    assert client.health() == "SERVING"


def test_backward_without_a_forward(session: Session) -> None:
    with pytest.raises(TrainerError) as err:
        session.backward("sum", rand(2, 1000))
    assert (err.value.code, err.value.reason) == (PRECONDITION, "NO_PENDING_FORWARD")


def test_backward_after_everything_is_frozen(session: Session) -> None:
    session.freeze("*")
    session.forward(rand(2, 3, 32, 32))
    with pytest.raises(TrainerError) as err:
        session.backward("sum", rand(2, 1000))
    assert (err.value.code, err.value.reason) == (PRECONDITION, "NO_TRAINABLE_PARAMETERS")


def test_backward_after_the_head_was_replaced(session: Session) -> None:
    session.forward(rand(2, 3, 32, 32))
    session.replace_head(10)
    with pytest.raises(TrainerError) as err:
        session.backward("sum", rand(2, 10))
    assert (err.value.code, err.value.reason) == (PRECONDITION, "HEAD_REPLACED")


def test_unknown_and_closed_sessions(client: TrainerClient) -> None:
    with pytest.raises(TrainerError) as err:
        client.session("no-such-session").step()
    assert (err.value.code, err.value.reason) == (NOT_FOUND, "SESSION_NOT_FOUND")
    assert err.value.reason is Reason.SESSION_NOT_FOUND  # the catalogue's type, from the wire's string
    s = client.create_session(WEIGHTS_NAME)
    s.close()
    s.close()  # idempotent
    with pytest.raises(TrainerError) as err:
        s.info()
    assert (err.value.code, err.value.reason) == (NOT_FOUND, "SESSION_NOT_FOUND")
    with pytest.raises(TrainerError) as err:
        client.call(client.stub.CloseSession, pb.CloseSessionRequest(session_id=s.session_id))
    assert err.value.code == NOT_FOUND


def test_default_session_cannot_be_closed(client: TrainerClient) -> None:
    with pytest.raises(TrainerError) as err:
        client.call(client.stub.CloseSession, pb.CloseSessionRequest(session_id="default"))
    assert (err.value.code, err.value.reason) == (PRECONDITION, "DEFAULT_SESSION")


@pytest.mark.parametrize(
    ("weights", "code", "reason"),
    [
        ("../etc/passwd", INVALID, "PATH_OUTSIDE_DATA_DIR"),
        ("/etc/passwd", INVALID, "PATH_OUTSIDE_DATA_DIR"),
        ("missing.pt", NOT_FOUND, "WEIGHTS_NOT_FOUND"),
    ],
)
def test_create_session_with_bad_weights(client: TrainerClient, weights: str, code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(TrainerError) as err:
        client.create_session(weights)
    assert (err.value.code, err.value.reason) == (code, reason)


def test_create_session_with_bad_optimizer(client: TrainerClient) -> None:
    with pytest.raises(TrainerError) as err:
        client.create_session(optimizer=Optimizer("sgd", lr=-0.1))
    assert (err.value.code, err.value.reason) == (INVALID, "BAD_OPTIMIZER_VALUE")


def test_bytes_that_are_not_a_request(target: str) -> None:
    """Bytes that do not parse as the method's request are the client's mistake: INVALID_ARGUMENT
    with reason MALFORMED_REQUEST (not gRPC's own INTERNAL), for a Forward (whose batch bytes the
    server cuts out first), a unary call and a stream."""
    with grpc.insecure_channel(target) as channel:
        for method in ("Forward", "Step", "GetGradients"):
            call = getattr(channel, "unary_stream" if method == "GetGradients" else "unary_unary")(f"/trainer.v1.TrainerService/{method}")
            with pytest.raises(grpc.RpcError) as err:
                result = call(b"\xff\xff\xff", timeout=30)
                list(result) if method == "GetGradients" else result
            assert err.value.code() == INVALID, method
            assert f"not a valid trainer.v1.{method}Request" in err.value.details()
            status = rpc_status.from_call(err.value)  # type: ignore[arg-type]
            assert status is not None, method
            infos = [error_details_pb2.ErrorInfo() for _ in status.details]
            assert [(i.reason, i.domain) for i, d in zip(infos, status.details) if d.Unpack(i)] == [
                ("MALFORMED_REQUEST", "trainer.v1")], method
            assert from_rpc_error(err.value).reason == "MALFORMED_REQUEST"  # as the SDK reports it


def test_a_backward_through_a_graph_whose_parameters_a_step_changed(session: Session) -> None:
    """A graph kept with retain_graph saved the parameters it was made with; a Step changes them in
    place, so the next Backward through it is refused (PARAMETERS_CHANGED), before anything
    changes; a new Forward trains on."""
    first = session.forward(rand(2, 3, 64, 64)).forward_id
    session.backward("sum", rand(2, 1000), retain_graph=True)
    assert session.step() == 1
    before = state_of(session)
    with pytest.raises(TrainerError) as err:
        session.backward("sum", rand(2, 1000, seed=1), forward_id=first)
    assert (err.value.code, err.value.reason) == (PRECONDITION, "PARAMETERS_CHANGED"), err.value
    assert "run Forward again" in err.value.message
    assert_same_state(before, state_of(session))
    assert before.info.step_count == 1
    session.forward(rand(2, 3, 64, 64, seed=2))
    assert session.backward("sum", rand(2, 1000)).parameters_with_grad == 62


def test_too_many_sessions() -> None:
    running = create_server(Settings(port=0, weights="random", max_sessions=2))
    try:
        with TrainerClient(f"localhost:{running.port}") as client:
            first = client.create_session()
            with pytest.raises(TrainerError) as err:
                client.create_session()
            assert (err.value.code, err.value.reason) == (EXHAUSTED, "TOO_MANY_SESSIONS")
            assert err.value.metadata["limit"] == "2"
            first.close()
            client.create_session().close()  # closing gave the slot back
    finally:
        running.stop(None).wait()
