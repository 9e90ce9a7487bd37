"""ResetSession, ListSessions and errors that say what a changed head did, through a real server;
the session rules both stores apply (``session_policy``), as they word them."""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from remote_trainer.client import Session, TrainerClient
from remote_trainer.client.errors import FailedPreconditionError, InvalidArgumentError
from remote_trainer.engine.errors import FailedPrecondition, NotFound, ResourceExhausted
from remote_trainer.server import session_policy
from remote_trainer.server.app import TrainerServer, create_server
from remote_trainer.server.session_policy import Expired, SessionLimits
from remote_trainer.server.settings import Settings
from tests.conftest import assert_equal_to_local, rand
from tests.test_layout import loaded_after


def test_reset_puts_the_default_session_back_as_the_server_started_it(
    client: TrainerClient, state_dict: dict[str, torch.Tensor], local: nn.Module
) -> None:
    model = client.session()
    # Change everything reset must undo: head, optimizer and its momentum, steps, frozen set, grads, pending forward.
    model.replace_head(10, seed=3)
    model.configure_optimizer(kind="adam", lr=1e-3)
    model.forward(rand(2, 3, 32, 32))
    model.backward("cross_entropy", np.array([1, 2]))
    model.step()
    model.freeze("layer1")
    model.forward(rand(2, 3, 32, 32, seed=1))

    info = model.reset()
    assert (info.num_classes, info.step_count, info.pending_forward_id) == (1000, 0, 0)
    assert (info.trainable_parameters, info.frozen_parameters) == (62, 0)
    assert (info.optimizer.kind, info.optimizer.lr, info.optimizer.momentum) == ("sgd", 0.01, 0.9)
    assert not any(p.has_grad for p in model.list_parameters().parameters)
    values = model.parameters(include_buffers=True)  # weights and BatchNorm buffers bit-identical to the file
    assert set(values) == set(state_dict)
    for name, expected in state_dict.items():
        np.testing.assert_array_equal(values[name].array, expected.numpy(), err_msg=name)

    # The optimizer starts anew too: two momentum steps after the reset equal local PyTorch's first two.
    optim = torch.optim.SGD(local.parameters(), lr=1e-2, momentum=0.9)
    for seed in (5, 6):
        x, y = rand(2, 3, 32, 32, seed=seed), rand(2, 1000, seed=seed + 10)
        model.zero_grad()
        model.forward(x, stats_only=True)
        model.backward("sum", y)
        model.step()
        optim.zero_grad()
        (local(torch.from_numpy(x)) - torch.from_numpy(y)).sum().backward()
        optim.step()
    for name, p in local.named_parameters():
        if name.startswith(("fc", "layer4.1")):
            assert_equal_to_local(model.parameters(name)[name].array, p, rtol=1e-4, atol=1e-5)
    model.reset()


def test_reset_of_a_session_of_ones_own_is_refused_and_changes_nothing(session: Session) -> None:
    session.replace_head(10)
    with pytest.raises(FailedPreconditionError) as err:
        session.reset()
    assert err.value.reason == "RESET_NOT_AVAILABLE"
    assert "close this session and create a new one" in err.value.message
    assert session.info().num_classes == 10


def test_label_errors_after_replace_head_say_the_head_changed(client: TrainerClient, session: Session) -> None:
    session.replace_head(10)
    session.forward(rand(2, 3, 32, 32))
    with pytest.raises(InvalidArgumentError) as err:
        session.backward("sum", rand(2, 1000))
    assert err.value.reason == "BAD_LABEL_SHAPE"
    assert "must have the logits' shape [2, 10], got [2, 1000]" in err.value.message
    assert "the head has 10 classes since ReplaceHead(num_classes=10) replaced the one of 1000" in err.value.message
    assert "ResetSession" not in err.value.message  # this session cannot be reset
    with pytest.raises(InvalidArgumentError) as err:
        session.backward("cross_entropy", np.array([3, 500]))
    assert err.value.reason == "CLASS_INDEX_OUT_OF_RANGE" and "since ReplaceHead" in err.value.message
    with pytest.raises(InvalidArgumentError) as err:
        session.backward(output_gradient=np.ones((2, 1000), np.float32))
    assert err.value.reason == "BAD_OUTPUT_GRADIENT_SHAPE" and "since ReplaceHead" in err.value.message

    model = client.session()
    model.replace_head(10)
    try:
        model.forward(rand(2, 3, 32, 32))
        with pytest.raises(InvalidArgumentError) as err:
            model.backward("sum", rand(2, 1000))
        assert "; ResetSession restores the original)" in err.value.message
    finally:
        model.reset()
    model.forward(rand(2, 3, 32, 32))
    model.backward("sum", rand(2, 1000))  # the same call works after the reset
    model.reset()


@pytest.fixture(scope="module")
def token_server() -> Iterator[TrainerServer]:
    running = create_server(Settings(port=0, weights="random", tokens="alice:a-token,bob:b-token", max_sessions=6))
    yield running
    running.stop(None).wait()


def test_list_sessions_shows_the_default_and_the_callers_own_only(token_server: TrainerServer) -> None:
    target = f"localhost:{token_server.port}"
    with TrainerClient(target, token="a-token") as alice, TrainerClient(target, token="b-token") as bob:
        a1 = alice.create_session("random", seed=1)
        a2 = alice.create_session("random", num_classes=10)
        b1 = bob.create_session("random")
        try:
            a2.step()
            listed = alice.list_sessions()
            assert [s.session_id for s in listed] == ["default", a1.session_id, a2.session_id]
            assert [s.is_default for s in listed] == [True, False, False]
            assert listed[2] == a2.info()  # the same SessionInfo as DescribeSession
            assert (listed[2].num_classes, listed[2].step_count) == (10, 1)
            assert [s.session_id for s in bob.list_sessions()] == ["default", b1.session_id]
            a1.close()
            assert [s.session_id for s in alice.list_sessions()] == ["default", a2.session_id]
        finally:
            for s in (a1, a2, b1):
                s.close()


# -- the rules both stores apply ------------------------------------------------------------------


def exhausted(limits: SessionLimits, place: str, held: list[tuple[str, str]], owner: str,
              building: dict[str, int] | None = None) -> ResourceExhausted:
    with pytest.raises(ResourceExhausted) as err:
        limits.check_room(place, held, owner, building)
    return err.value


def test_the_limits_count_the_default_session_in_all_and_not_per_owner() -> None:
    limits = SessionLimits(max_sessions=3, max_per_owner=1)
    limits.check_room("server", [("default", ""), ("s1", "alice")], "bob")
    err = exhausted(limits, "cluster", [("default", ""), ("s1", "alice"), ("s2", "bob")], "carol")
    assert (err.reason, err.metadata) == ("TOO_MANY_SESSIONS", {"limit": "3"})
    assert err.message == "the cluster holds 3 sessions, its limit max_sessions=3; close one first"
    err = exhausted(limits, "server", [("default", ""), ("s1", "alice")], "alice")
    assert (err.reason, err.metadata) == ("TOO_MANY_SESSIONS_FOR_TOKEN", {"limit": "1"})
    assert err.message == "this token holds 1 sessions, its limit max_sessions_per_token=1; close one first"
    SessionLimits(max_sessions=3).check_room("server", [("default", ""), ("s1", "alice")], "alice")  # 0: no limit per owner


def test_sessions_being_built_count_against_the_limits_but_not_in_the_messages() -> None:
    limits = SessionLimits(max_sessions=3, max_per_owner=2)
    err = exhausted(limits, "server", [("default", ""), ("s1", "alice")], "bob", {"alice": 1})
    assert err.message == "the server holds 2 sessions, its limit max_sessions=3; close one first"
    err = exhausted(SessionLimits(max_sessions=9, max_per_owner=2), "server", [("s1", "alice")], "alice", {"alice": 1})
    assert err.message.startswith("this token holds 1 sessions")
    limits.check_room("server", [("default", ""), ("s1", "alice")], "bob", {"bob": 0})


def test_a_missing_session_is_expired_to_its_owner_only() -> None:
    expired = session_policy.missing("abc", "alice", Expired("alice", 61.4))
    assert (expired.reason, expired.message) == ("SESSION_EXPIRED", "session 'abc' expired after 61 s without calls")
    for err in (session_policy.missing("abc", "bob", Expired("alice", 61.4)), session_policy.missing("abc", "alice", None)):
        assert isinstance(err, NotFound)
        assert (err.reason, err.message) == ("SESSION_NOT_FOUND", "no session 'abc' (closed, or never created)")


def test_the_default_session_is_everyones_and_cannot_be_closed() -> None:
    assert session_policy.may_use("default", "", "anyone") and session_policy.may_use("s1", "alice", "alice")
    assert not session_policy.may_use("s1", "alice", "bob")
    for sid in ("", "default"):
        with pytest.raises(FailedPrecondition) as err:
            session_policy.check_closable(sid)
        assert (err.value.reason, err.value.message) == ("DEFAULT_SESSION", "the default session cannot be closed")
    session_policy.check_closable("s1")


def test_the_rules_and_the_ray_registry_load_without_torch() -> None:
    """The registry's actor runs them on the head node, which may have no torch."""
    statement = "import remote_trainer.server.session_policy"
    if importlib.util.find_spec("ray") is not None:
        statement += ", remote_trainer.server.ray_backend.registry"
    loaded = loaded_after(statement)
    assert "torch" not in loaded, loaded
