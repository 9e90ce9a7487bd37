"""The shape of the code: one import namespace, and the dependency arrows docs/architecture.md draws.

Each check imports in a fresh interpreter and looks at what got loaded, so an import added anywhere
on the way (however indirect) that crosses a forbidden arrow fails here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import grpc
import pytest

from remote_trainer.contract.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from remote_trainer.server import app
from remote_trainer.server.receive import ReceiveGate
from remote_trainer.server.servicer import TrainerServicer
from remote_trainer.server.rpc import unary

ROOT = Path(__file__).resolve().parent.parent


def loaded_after(statement: str) -> set[str]:
    """The top-level names of the modules loaded by ``statement`` in a fresh interpreter, plus the
    remote_trainer subpackages among them (``remote_trainer.server`` ...)."""
    code = textwrap.dedent(f"""
        import json, sys
        {statement}
        names = set()
        for m in sys.modules:
            parts = m.split(".")
            names.add(parts[0])
            if parts[0] == "remote_trainer" and len(parts) > 1:
                names.add(".".join(parts[:2]))
        print(json.dumps(sorted(names)))
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout))


# The card's top level, and which portion of the namespace each distribution folder holds.
PORTIONS = {"protos": {"contract"}, "client": {"client"}, "server": {"server", "engine"}}


def test_the_top_level_is_the_cards() -> None:
    """protos/, server/, client/, tests/, docker-compose.yml, pyproject.toml and README.md at the top, and
    no generic package (a top-level ``server`` or ``client`` a user's project could shadow) anywhere."""
    for name in ("protos", "server", "client", "tests"):
        assert (ROOT / name).is_dir(), name
    for name in ("docker-compose.yml", "pyproject.toml", "README.md"):
        assert (ROOT / name).is_file(), name
    assert not (ROOT / "remote_trainer").exists(), "the code lives in protos/, server/ and client/"
    for folder, portions in PORTIONS.items():
        assert not (ROOT / folder / "__init__.py").exists(), folder
        namespace = ROOT / folder / "remote_trainer"
        assert not (namespace / "__init__.py").exists(), f"{namespace} is a PEP 420 namespace portion"
        assert {p.name for p in namespace.iterdir() if p.name != "__pycache__"} == portions, folder


def test_each_distribution_builds_a_wheel_of_its_portion_only(tmp_path: Path) -> None:
    """The wheels install under remote_trainer/ only, each its own portion, none with the namespace's
    ``__init__.py`` (which would hide the other portions)."""
    for folder in PORTIONS:  # built from copies: setuptools leaves build/ beside the sources it builds
        shutil.copytree(ROOT / folder, tmp_path / "src" / folder, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
         *(str(tmp_path / "src" / folder) for folder in PORTIONS)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    wheels = {w.name.split("-")[0]: w for w in tmp_path.glob("*.whl")}
    assert set(wheels) == {"remote_trainer_contract", "remote_trainer_client", "remote_trainer_server"}, wheels
    for folder, portions in PORTIONS.items():
        with zipfile.ZipFile(wheels[f"remote_trainer_{'contract' if folder == 'protos' else folder}"]) as wheel:
            files = [n for n in wheel.namelist() if ".dist-info/" not in n]
        assert files and all(n.split("/")[0] == "remote_trainer" for n in files), files
        assert {n.split("/")[1] for n in files} == portions, folder
        assert "remote_trainer/__init__.py" not in files
        assert {f"remote_trainer/{p}/py.typed" for p in portions} <= set(files), folder


def test_the_sdk_loads_neither_torch_nor_the_server_nor_the_engine() -> None:
    loaded = loaded_after("from remote_trainer.client import TrainerClient, Session")
    assert "remote_trainer.contract" in loaded
    assert not loaded & {"torch", "torchvision", "remote_trainer.server", "remote_trainer.engine"}, loaded


def test_the_server_never_loads_the_sdk() -> None:
    loaded = loaded_after("import remote_trainer.server.app, remote_trainer.server.__main__")
    assert {"remote_trainer.server", "remote_trainer.engine", "remote_trainer.contract"} <= loaded
    assert "remote_trainer.client" not in loaded, loaded


def test_the_local_backend_never_loads_ray() -> None:
    """Ray is an optional extra: the server imports it only with --backend ray."""
    loaded = loaded_after(
        "import remote_trainer.server.app, remote_trainer.server.__main__, remote_trainer.server.sessions, "
        "remote_trainer.engine.protocol, remote_trainer.engine.portable"
    )
    assert "ray" not in loaded, loaded


def test_the_ray_registry_loads_without_torch() -> None:
    """The registry actor runs on the head node, which may have no torch: its limits and the memory
    budget's words (engine/budget.py) come without it."""
    loaded = loaded_after("import remote_trainer.server.ray_backend.registry")
    assert "ray" in loaded and "torch" not in loaded, loaded


def test_the_engine_imports_no_transport() -> None:
    loaded = loaded_after(
        "import pkgutil, importlib, remote_trainer.engine as e\n"
        "        [importlib.import_module(f'remote_trainer.engine.{m.name}') for m in pkgutil.iter_modules(e.__path__)]"
    )
    assert "torch" in loaded
    assert not loaded & {"grpc", "google", "remote_trainer.server", "remote_trainer.client"}, loaded


def test_the_contract_imports_neither_side() -> None:
    loaded = loaded_after(
        "import remote_trainer.contract.codec, remote_trainer.contract.names, remote_trainer.contract.chunking, "
        "remote_trainer.contract.wire"
    )
    assert not loaded & {"torch", "remote_trainer.server", "remote_trainer.client", "remote_trainer.engine"}, loaded


def test_the_settings_load_without_torch() -> None:
    """``trainer-server --help`` and flag errors answer before torch is imported (it takes seconds)."""
    loaded = loaded_after("import remote_trainer.server.__main__")
    assert "torch" not in loaded, loaded


def test_every_rpc_is_registered_with_the_call_shape_of_its_descriptor() -> None:
    service = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"]
    for method in service.methods:
        served = getattr(getattr(TrainerServicer, method.name), "rpc_kind", None)
        expected = ("stream" if method.client_streaming else "unary") + "_" + ("stream" if method.server_streaming else "unary")
        assert served == expected, method.name


class _Missing(TrainerServicer):
    """A servicer that forgot an RPC (the generated base answers UNIMPLEMENTED)."""

    GetGraph = trainer_pb2_grpc.TrainerServiceServicer.GetGraph  # type: ignore[assignment]


class _WrongShape(TrainerServicer):
    """A servicer that serves a server-streaming RPC with the unary decorator."""

    @unary
    def GetGradients(self, request: object, context: grpc.ServicerContext) -> object:  # type: ignore[override]
        return None


@pytest.mark.parametrize(("servicer_class", "message"), [
    (_Missing, "GetGraph is a unary_unary RPC but the servicer does not implement it"),
    (_WrongShape, "GetGradients is a unary_stream RPC but the servicer serves it as unary_unary"),
])
def test_registration_refuses_a_servicer_that_does_not_match_the_descriptor(servicer_class: type, message: str) -> None:
    servicer = servicer_class.__new__(servicer_class)  # registration reads only the methods
    with pytest.raises(RuntimeError, match=message):
        app._counted_handlers(servicer, None, app.Receiving(ReceiveGate(2, 1), 1.0, str))  # type: ignore[arg-type]


# The fifth "must never" arrow of docs/architecture.md, and the SDK's modules without torch.

OUTSIDE_THE_PACKAGE = {"tests", "bench", "examples"}


def modules_named_by(source: str, filename: str) -> set[str]:
    """The modules a file's text imports anywhere (in functions too): ``import``, absolute
    ``from ... import``, and ``importlib.import_module("...")`` or ``__import__("...")`` of a literal
    name. Relative imports stay inside ``remote_trainer`` and are left out."""
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


def test_nothing_in_remote_trainer_imports_tests_bench_or_examples() -> None:
    """Every module file of the three distributions (generated code included), read as Python:
    none names a module of tests/, bench/ or examples/, at its top or inside a function."""
    files = sorted(path for folder in PORTIONS for path in (ROOT / folder / "remote_trainer").rglob("*.py"))
    assert len(files) > 30 and ROOT / "server" / "remote_trainer" / "server" / "app.py" in files, files
    crossing = {
        str(path.relative_to(ROOT)): sorted(bad)
        for path in files
        if (bad := {n for n in modules_named_by(path.read_text(), str(path)) if n.split(".")[0] in OUTSIDE_THE_PACKAGE})
    }
    assert not crossing, crossing


def test_every_sdk_module_but_remote_model_loads_without_torch() -> None:
    """The thin client's SDK modules, the command line and the graph drawing included, load neither
    torch nor the server: only ``remote_trainer.client.remote`` (RemoteModel, an ``nn.Module``) and its
    ``remote_handles`` need torch."""
    loaded = loaded_after(
        "import importlib, pkgutil, remote_trainer.client as c\n"
        "        found = [m.name for m in pkgutil.walk_packages(c.__path__, 'remote_trainer.client.')]\n"
        "        assert {'remote_trainer.client.aio', 'remote_trainer.client.graphviz'} <= set(found), found\n"
        "        assert any(n.startswith('remote_trainer.client.cli') for n in found), found\n"
        "        [importlib.import_module(n) for n in found if n not in ('remote_trainer.client.remote', 'remote_trainer.client.remote_handles') and not n.endswith('__main__')]"
    )
    assert {"remote_trainer.client", "remote_trainer.contract", "grpc"} <= loaded, loaded
    assert not loaded & {"torch", "torchvision", "remote_trainer.server", "remote_trainer.engine"}, loaded


# Each package of the namespace and the folder it lives in.
PACKAGES = {
    "contract": ROOT / "protos" / "remote_trainer" / "contract",
    "client": ROOT / "client" / "remote_trainer" / "client",
    "server": ROOT / "server" / "remote_trainer" / "server",
    "engine": ROOT / "server" / "remote_trainer" / "engine",
}


def package_imports(package: str = "server") -> dict[str, set[str]]:
    """Each module of remote_trainer.PACKAGE (by its name under it: ``app``, ``ray_backend.store``) and
    the modules of the same package it imports when it runs: anywhere in its text (in functions too:
    a deferred import still closes a circle) but under ``if TYPE_CHECKING:``."""
    import ast

    def run_time_nodes(node: ast.AST) -> Iterator[ast.AST]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                yield from (n for branch in child.orelse for n in [branch, *run_time_nodes(branch)])
                continue
            yield child
            yield from run_time_nodes(child)

    folder = PACKAGES[package]
    paths = {".".join(p.relative_to(folder).with_suffix("").parts).removesuffix(".__init__"): p
             for p in folder.rglob("*.py") if p.parent != folder or p.name != "__init__.py"}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        targets: set[str] = set()
        for node in run_time_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:  # "from remote_trainer.server import convert" too
                targets.update([node.module] + [f"{node.module}.{alias.name}" for alias in node.names])
        prefix = f"remote_trainer.{package}."
        graph[name] = {t[len(prefix):] for t in targets if t.startswith(prefix) and t[len(prefix):] in paths} - {name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """The modules ``start`` imports, directly or through others."""
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph[name])
    return seen


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_module_imports_itself_back(package: str) -> None:
    graph = package_imports(package)
    assert {"contract": {"codec", "wire"}, "client": {"core", "client", "aio"}, "server": {"app", "auth", "settings"},
            "engine": {"session", "pending"}}[package] <= set(graph), sorted(graph)
    circles = sorted(name for name in graph if name in reachable(graph, name))
    assert not circles, f"modules in an import circle: {circles} ({ {n: sorted(graph[n]) for n in circles} })"


# The process layer builds the server from flags and watches it; the RPC layer serves calls and is
# handed plain values and an observer (server/events.py), so it never imports the process layer.
PROCESS_LAYER = {"app", "__main__", "settings", "metrics", "tensorboard"}
RPC_LAYER = {"servicer", "rpc", "status", "calls", "streams", "events", "auth", "tokens"}


def test_the_rpc_layer_never_imports_the_process_layer() -> None:
    graph = package_imports("server")
    assert RPC_LAYER <= set(graph), sorted(RPC_LAYER - set(graph))
    for name in sorted(RPC_LAYER):
        assert not reachable(graph, name) & PROCESS_LAYER, (name, sorted(reachable(graph, name) & PROCESS_LAYER))


def test_the_token_flags_are_checked_without_torch(tmp_path: Path) -> None:
    """``--tokens NAME:TOKEN`` is parsed and checked (docs/architecture.md: settings never pull torch in)
    where importing torch fails."""
    code = textwrap.dedent("""
        import sys

        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "torchvision"):
                    raise ImportError(f"{name} is not installed here")
                return None

        sys.meta_path.insert(0, NoTorch())
        from remote_trainer.server.settings import parse_settings

        settings = parse_settings(["--tokens", "alice:secret,bob:other"], environ={})
        assert settings.tokens == "alice:secret,bob:other", settings
        try:
            parse_settings(["--tokens", "alice:"], environ={})  # checked: an empty token is refused
        except SystemExit as exc:
            assert exc.code == 2, exc.code
        else:
            raise AssertionError("an empty token was accepted")
        assert "torch" not in sys.modules
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert "the token of 'alice' is empty" in done.stderr


def test_the_error_map_and_the_call_machinery_load_without_torch() -> None:
    """How a call is served (decorators, call context, stream flow control, error map, auth) knows no
    torch: a torch out-of-memory error is recognised without importing it."""
    loaded = loaded_after(
        "import remote_trainer.server.status, remote_trainer.server.rpc, remote_trainer.server.auth, "
        "remote_trainer.server.calls, remote_trainer.server.streams, remote_trainer.server.events"
    )
    assert "grpc" in loaded
    assert "torch" not in loaded, loaded
