"""No one let in: bearer tokens, session ownership, per-token limits, TLS and mutual TLS."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from remote_trainer.client import TrainerClient, TrainerError
from remote_trainer.server.app import TrainerServer, create_server
from remote_trainer.server.settings import Settings
from tests.certs import make_pki
from tests.conftest import rand


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainerServer]:
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text("# operators\nbob:tok-bob\n")
    running = create_server(Settings(
        port=0, weights="random", tokens="alice:tok-alice,anonymous-token", tokens_file=str(tokens),
        max_sessions_per_token=2, max_sessions=10,
    ))
    yield running
    running.stop(None).wait()


def connect(server: TrainerServer, token: str | None = None) -> TrainerClient:
    return TrainerClient(f"localhost:{server.port}", token=token, timeout=60)


def test_calls_without_a_valid_token_are_refused(secured: TrainerServer) -> None:
    for token in (None, "wrong", "tok-alic", "Tok-alice"):
        with connect(secured, token) as client:
            with pytest.raises(TrainerError) as err:
                client.session().forward(rand(2, 3, 32, 32))
            assert (err.value.code, err.value.reason) == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
            with pytest.raises(TrainerError):
                client.create_session()
            assert client.health() == "SERVING"  # health needs no token


def test_tokens_from_flag_and_file_are_accepted(secured: TrainerServer) -> None:
    for token in ("tok-alice", "tok-bob", "anonymous-token"):
        with connect(secured, token) as client:
            assert client.session().info().is_default


def test_a_session_belongs_to_the_token_that_created_it(secured: TrainerServer) -> None:
    with connect(secured, "tok-alice") as alice, connect(secured, "tok-bob") as bob:
        mine = alice.create_session()
        assert re.fullmatch(r"[0-9a-f]{32}", mine.session_id)  # 128 random bits
        theirs = bob.session(mine.session_id)
        for call in (theirs.info, theirs.step, theirs.close):
            with pytest.raises(TrainerError) as err:
                call()
            # Exactly what an unknown id gets: no hint that the session exists.
            assert (err.value.code, err.value.reason) == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
            assert mine.session_id in err.value.message
        assert mine.step() == 1  # the owner's session is untouched
        mine.close()


def test_sessions_per_token_are_limited(secured: TrainerServer) -> None:
    with connect(secured, "tok-alice") as alice, connect(secured, "tok-bob") as bob:
        first, second = alice.create_session(), alice.create_session()
        with pytest.raises(TrainerError) as err:
            alice.create_session()
        assert (err.value.code, err.value.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_SESSIONS_FOR_TOKEN")
        bob.create_session().close()  # another token is not held back
        first.close()
        second.close()


@pytest.fixture(scope="module")
def pki_files(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    pki = make_pki()
    return pki, pki.write(tmp_path_factory.mktemp("pki"))


def test_tls(pki_files) -> None:  # type: ignore[no-untyped-def]
    pki, paths = pki_files
    running = create_server(Settings(port=0, weights="random", tls_cert=paths["tls_cert"], tls_key=paths["tls_key"]))
    try:
        with TrainerClient(f"localhost:{running.port}", ca_cert=pki.ca.cert, timeout=30) as client:
            assert client.session().forward(rand(2, 3, 32, 32)).logits.shape == (2, 1000)  # type: ignore[union-attr]
        with TrainerClient(f"localhost:{running.port}", timeout=5) as plaintext, pytest.raises(TrainerError) as err:
            plaintext.health()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        with TrainerClient(f"localhost:{running.port}", tls=True, timeout=5) as untrusting, pytest.raises(TrainerError) as err:
            untrusting.health()  # the system roots do not know the test CA
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(None).wait()


def test_mutual_tls_with_tokens(pki_files) -> None:  # type: ignore[no-untyped-def]
    pki, paths = pki_files
    running = create_server(Settings(port=0, weights="random", tokens="tok", **paths))
    target = f"localhost:{running.port}"
    try:
        with TrainerClient(target, ca_cert=pki.ca.cert, client_cert=pki.client.cert, client_key=pki.client.key, token="tok") as client:
            assert client.session().info().is_default
        for cert in (None, pki.stranger):
            kwargs = {"client_cert": cert.cert, "client_key": cert.key} if cert else {}
            with TrainerClient(target, ca_cert=pki.ca.cert, token="tok", timeout=5, **kwargs) as client, pytest.raises(TrainerError) as err:
                client.session().info()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(None).wait()


def test_cli_with_token_and_mutual_tls(pki_files, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    from remote_trainer.client.cli import main

    pki, paths = pki_files
    (tmp_path / "client.crt").write_bytes(pki.client.cert)
    (tmp_path / "client.key").write_bytes(pki.client.key)
    running = create_server(Settings(port=0, weights="random", tokens="tok", **paths))
    common = ["--target", f"localhost:{running.port}", "--ca-cert", paths["tls_client_ca"],
              "--client-cert", str(tmp_path / "client.crt"), "--client-key", str(tmp_path / "client.key")]
    try:
        assert main([*common, "--token", "tok", "info"]) == 0
        assert "resnet18" in capsys.readouterr().out
        assert main([*common, "--token", "nope", "info"]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
    finally:
        running.stop(None).wait()


def test_bad_security_settings_are_refused(tmp_path: Path) -> None:
    from remote_trainer.server.settings import parse_settings

    for argv in (["--tls-cert", str(tmp_path / "missing.crt"), "--tls-key", "x"], ["--tls-client-ca", __file__]):
        with pytest.raises(SystemExit):
            parse_settings(argv, {})


def test_the_cli_refused_for_its_token_says_how_to_give_one(
    secured: TrainerServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from remote_trainer.client.cli import main

    monkeypatch.delenv("TRAINER_TOKEN", raising=False)
    target = ["--target", f"localhost:{secured.port}"]
    assert main([*target, "info"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("trainer-client: error: UNAUTHENTICATED: ") and err.count("\n") == 1
    assert err.rstrip().endswith("(this server wants a token: pass --token TOKEN, or set TRAINER_TOKEN)")
    assert main([*target, "--token", "wrong", "info"]) == 1
    assert capsys.readouterr().err.rstrip().endswith(
        "(the token given by --token or $TRAINER_TOKEN was refused: is it one the server was started with?)")
    monkeypatch.setenv("TRAINER_TOKEN", "tok-bob")
    assert main(target + ["info"]) == 0
