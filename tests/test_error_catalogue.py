"""Every refusal in one catalogue: the ErrorReason enum of protos/trainer/v1/errors.proto.

The code's reasons are read from its source (AST): each string literal passed as the ``reason`` of
an error (the server's ``TrainerError`` kinds, ``invalid()``, ``to_status()``, the codec's
``CodecError``, the pending forward's, the SDK's own error classes: whatever function or class takes
a parameter or field named ``reason``) or compared with an error's ``.reason``, or listed in a
collection named ``..._reasons``. Each must be catalogued, with the status code it comes with; each
catalogued reason must be used somewhere (or kept, its comment says why); docs/errors.md and
``remote_trainer.contract.reasons`` must be what scripts/gen-errors.py makes of the proto. A reason
passed through a variable is checked where its error is made (``require``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from remote_trainer.client import FailedPreconditionError, NotFoundError, Reason, RetryPolicy, TrainerClient, TrainerError
from remote_trainer.client import errors as sdk_errors
from remote_trainer.contract import reasons
from remote_trainer.contract.codec import CodecError
from remote_trainer.contract.trainer.v1 import errors_pb2
from remote_trainer.engine import errors as engine_errors
from remote_trainer.server import status
from tests.test_grpcurl import grpcurl_path
from tests.test_server_process import start, stop

ROOT = Path(__file__).resolve().parent.parent
# The code that raises, reads or lists reasons: the contract (not its generated code), the SDK, the server.
SOURCES = (ROOT / "protos" / "remote_trainer" / "contract", ROOT / "client" / "remote_trainer", ROOT / "server" / "remote_trainer")
GENERATED = (ROOT / "protos" / "remote_trainer" / "contract" / "trainer", ROOT / "protos" / "remote_trainer" / "contract" / "reasons.py")


def source_files() -> list[Path]:
    files = [p for folder in SOURCES for p in folder.rglob("*.py") if not any(p.is_relative_to(g) for g in GENERATED)]
    assert len(files) > 50, files
    return sorted(files)


@dataclass(frozen=True)
class Use:
    """A reason in the code: where, and the status code it is sent with (None: read, not raised)."""

    where: str
    code: grpc.StatusCode | None


def carriers(trees: dict[Path, ast.Module]) -> dict[str, int]:
    """What takes a reason, by name: the position of its ``reason`` argument (self not counted),
    from each function's parameters and each class's ``__init__`` or dataclass fields, a subclass
    inheriting its base's."""
    found: dict[str, set[int]] = defaultdict(set)
    bases: dict[str, list[str]] = {}
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases[node.name] = [b.id for b in node.bases if isinstance(b, ast.Name)]
                init = next((s for s in node.body if isinstance(s, ast.FunctionDef) and s.name == "__init__"), None)
                fields = [s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
                params = [a.arg for a in init.args.args][1:] if init else fields
                if "reason" in params:
                    found[node.name].add(params.index("reason"))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "__init__":
                params = [a.arg for a in node.args.args]
                params = params[1:] if params[:1] in (["self"], ["cls"]) else params
                if "reason" in params:
                    found[node.name].add(params.index("reason"))
    changed = True
    while changed:  # subclasses take their base's
        changed = False
        for name, of in bases.items():
            if name not in found and any(b in found for b in of):
                found[name] = set().union(*(found[b] for b in of if b in found))
                changed = True
    ambiguous = {name: places for name, places in found.items() if len(places) > 1}
    assert not ambiguous, f"names that take their reason at different places: {ambiguous}"
    return {name: next(iter(places)) for name, places in found.items()}


def code_of(name: str, call: ast.Call, path: Path) -> grpc.StatusCode | None:
    """The status code an error made by calling ``name`` is sent with (None: not known here)."""
    if name == "to_status" and call.args and isinstance(call.args[0], ast.Attribute):
        return grpc.StatusCode[call.args[0].attr]
    if name in ("invalid", "CodecError"):  # a codec error reaches the client as invalid(..., exc.reason)
        return grpc.StatusCode.INVALID_ARGUMENT
    if name in ("Pending", "free"):  # a pending forward's reason is raised as FailedPrecondition
        return grpc.StatusCode.FAILED_PRECONDITION
    sdk_side = path.is_relative_to(ROOT / "client")
    cls = getattr(sdk_errors if sdk_side else engine_errors, name, None)
    if not isinstance(cls, type) or not issubclass(cls, sdk_errors.TrainerError if sdk_side else engine_errors.TrainerError):
        return None
    if sdk_side:
        return cls.code  # type: ignore[no-any-return]
    if cls is engine_errors.Abandoned:
        return grpc.StatusCode.CANCELLED  # status.status_for: no one is listening
    return next((status.CODES[c] for c in cls.__mro__ if c in status.CODES), grpc.StatusCode.INTERNAL)


def reasons_in_code() -> tuple[dict[str, list[Use]], set[str]]:
    """Each reason the code raises, compares or lists, with its uses; and every string literal of the code."""
    trees = {p: ast.parse(p.read_text(), str(p)) for p in source_files()}
    takes = carriers(trees)
    uses: dict[str, list[Use]] = defaultdict(list)
    literals: set[str] = set()
    for path, tree in trees.items():
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name in takes):
            for call in (n for n in ast.walk(cls) if isinstance(n, ast.Call)):
                if isinstance(call.func, ast.Name) and call.func.id == "cls":  # cls(...) in a classmethod
                    call.func.id = cls.name
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                literals.add(node.value)
            elif isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                if name in takes:
                    at = takes[name]
                    given = node.args[at] if len(node.args) > at else next((k.value for k in node.keywords if k.arg == "reason"), None)
                    if isinstance(given, ast.Constant):
                        uses[given.value].append(Use(where, code_of(name, node, path)))
            elif isinstance(node, ast.Compare) and any(
                isinstance(side, ast.Attribute) and side.attr == "reason" for side in (node.left, *node.comparators)
            ):
                for side in (node.left, *node.comparators):
                    for const in ast.walk(side):
                        if isinstance(const, ast.Constant) and isinstance(const.value, str):
                            uses[const.value].append(Use(where, None))
            elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id if isinstance(t, ast.Name) else t.attr if isinstance(t, ast.Attribute) else "" for t in targets]
                if any(n.lower().endswith("reasons") for n in names):
                    for const in ast.walk(node.value):
                        if isinstance(const, ast.Constant) and isinstance(const.value, str):
                            uses[const.value].append(Use(where, None))
    return uses, literals


CATALOGUE = {r.value for r in Reason}


def test_the_catalogue_is_the_proto_enum() -> None:
    """``Reason`` has exactly the proto's values, each without the ERROR_REASON_ prefix and with a
    status code; the wire string is the member's value and its name."""
    names = {n for n in errors_pb2.ErrorReason.keys() if n != "ERROR_REASON_UNSPECIFIED"}
    assert {f"ERROR_REASON_{r}" for r in CATALOGUE} == names
    assert all(r.name == r.value for r in Reason)
    assert set(reasons.STATUS) == set(Reason) and all(code in grpc.StatusCode.__members__ for code in reasons.STATUS.values())
    assert reasons.KEPT <= set(Reason)


def test_every_reason_in_the_code_is_catalogued_with_its_status_code() -> None:
    uses, _ = reasons_in_code()
    missing = {reason: [u.where for u in found] for reason, found in uses.items() if reason not in CATALOGUE}
    assert not missing, (
        f"reasons not in the catalogue: {missing}; add each to the ErrorReason enum of protos/trainer/v1/errors.proto "
        "(Status:, Cause:, Do:) and run scripts/gen-protos.sh"
    )
    wrong = {
        reason: (reasons.STATUS[Reason(reason)], sorted({f"{u.code.name} at {u.where}" for u in found if u.code is not None}))
        for reason, found in uses.items()
        if any(u.code is not None and u.code.name != reasons.STATUS[Reason(reason)] for u in found)
    }
    assert not wrong, f"reasons sent with another status code than the catalogue's (catalogue, code): {wrong}"
    # The reading is not blind: reasons of each side and each way of passing one are found.
    assert {"SESSION_NOT_FOUND", "BYTE_LENGTH_MISMATCH", "UNAUTHENTICATED", "NO_GRAPH", "GRAPH_EXPIRED", "SERVER_UNREACHABLE",
            "CLIENT_CALLS_IN_FLIGHT", "OPERATION_ANSWER_NOT_KEPT", "CHECKPOINT_IO_ERROR"} <= set(uses)
    assert len(uses) >= 100, sorted(uses)


def test_every_catalogued_reason_is_used_or_kept() -> None:
    """A reason no code has any more is marked Kept: in the proto (old clients and checkpoints know it)."""
    _, literals = reasons_in_code()
    unused = sorted(r for r in Reason if r.value not in literals and r not in reasons.KEPT)
    assert not unused, f"catalogued reasons no code uses: {unused}; remove the code's mention or mark them 'Kept:' in errors.proto"


def test_the_generated_catalogue_and_docs_are_current(tmp_path: Path) -> None:
    """docs/errors.md and contract/reasons.py are what scripts/gen-errors.py makes of the committed
    descriptor set (which scripts/gen-protos.sh --check holds to the proto)."""
    descriptors = ROOT / "protos" / "remote_trainer" / "contract" / "trainer" / "v1" / "trainer.binpb"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-errors.py"), str(descriptors), str(tmp_path)], check=True, timeout=60)
    for name in ("docs/errors.md", "protos/remote_trainer/contract/reasons.py"):
        assert (tmp_path / name).read_text() == (ROOT / name).read_text(), f"{name} is not current: run scripts/gen-protos.sh"
    doc = (ROOT / "docs" / "errors.md").read_text()
    for reason in Reason:
        assert f"| `{reason.value}` | " in doc, reason


def test_grpcurl_describes_the_catalogue_with_its_comments() -> None:
    """What docs/errors.md says: ``grpcurl describe trainer.v1.ErrorReason`` prints the catalogue (the
    server's reflection serves errors.proto with its comments). A server process of its own: this
    one's imports must not be what puts errors.proto in the server's descriptor pool."""
    process, port, _ = start("--weights", "random")
    try:
        done = subprocess.run([grpcurl_path(), "-plaintext", f"127.0.0.1:{port}", "describe", "trainer.v1.ErrorReason"],
                              capture_output=True, text=True, timeout=60)
    finally:
        stop(process)
    assert done.returncode == 0, done.stderr
    assert "enum ErrorReason {" in done.stdout
    assert "  // Status: NOT_FOUND.\n  // Cause: no session has this id" in done.stdout
    assert "  ERROR_REASON_SESSION_NOT_FOUND = 7;" in done.stdout


def test_an_error_with_an_uncatalogued_reason_cannot_be_made() -> None:
    """The server's errors, its statuses and the codec's carry catalogued reasons only: a new literal
    fails the first test that raises it, naming where to add it."""
    for make in (
        lambda: engine_errors.NotFound("no such thing", "NOT_IN_THE_CATALOGUE"),
        lambda: engine_errors.invalid("field", "bad", "NOT_IN_THE_CATALOGUE"),
        lambda: status.to_status(grpc.StatusCode.NOT_FOUND, "no such thing", "NOT_IN_THE_CATALOGUE"),
        lambda: CodecError("bad tensor", "NOT_IN_THE_CATALOGUE"),
    ):
        with pytest.raises(ValueError, match="NOT_IN_THE_CATALOGUE.*protos/trainer/v1/errors.proto"):
            make()
    assert engine_errors.NotFound("gone", "SESSION_NOT_FOUND").reason == "SESSION_NOT_FOUND"


def test_the_sdk_reason_is_the_catalogue_type_and_a_string() -> None:
    error = NotFoundError("no session 'x'", "SESSION_NOT_FOUND")
    assert error.reason is Reason.SESSION_NOT_FOUND and error.reason == "SESSION_NOT_FOUND"
    assert str(error) == "NOT_FOUND: no session 'x' [SESSION_NOT_FOUND]"
    assert NotFoundError("no reason").reason == ""


def test_a_newer_servers_reason_reaches_the_sdk_as_a_plain_string() -> None:
    """A real gRPC server that answers with a reason this SDK's catalogue lacks: the SDK raises the
    error of its status code carrying that reason as a string, not an exception of its own."""
    info = error_details_pb2.ErrorInfo(reason="FROM_A_NEWER_SERVER", domain="trainer.v1")
    packed = any_pb2.Any()
    packed.Pack(info)
    refusal = rpc_status.to_status(status_pb2.Status(code=grpc.StatusCode.FAILED_PRECONDITION.value[0], message="not yet", details=[packed]))

    def refuse(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort_with_status(refusal)
        raise AssertionError("abort_with_status returns only by raising")

    handler = grpc.method_handlers_generic_handler(
        "trainer.v1.TrainerService", {"DescribeSession": grpc.unary_unary_rpc_method_handler(refuse)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with TrainerClient(f"127.0.0.1:{port}", timeout=30, retry=RetryPolicy.none()) as client:
            with pytest.raises(TrainerError) as err:
                client.session("s").info()
    finally:
        server.stop(None).wait()
    assert isinstance(err.value, FailedPreconditionError)
    assert err.value.reason == "FROM_A_NEWER_SERVER" and type(err.value.reason) is str
    assert str(err.value) == "FAILED_PRECONDITION: not yet [FROM_A_NEWER_SERVER]"
