"""The walls between feddiff's packages and between fedcore's rooms, read from every import of every module (ast).

- fedcore imports none of the processes' packages (service, coordinator, worker, feddiff), not Prometheus, and
  not the command line's argparse or YAML (flags, their help and settings files live in service);
- inside fedcore only the wire room imports grpc, protobuf or the generated code (fedcore.wire.proto);
- a room of fedcore imports no room to its right in fedcore.ROOMS, and the modules
  at fedcore's top (errors, atomic, settings) import no room;
- service imports neither process; coordinator and worker never import each other; neither imports the CLI.

Every import counts, also one inside a function or under TYPE_CHECKING: each is a dependency a reader follows.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from fedcore import ROOMS

ROOT = Path(__file__).resolve().parent.parent
FIRST_PARTY = ("fedcore", "service", "coordinator", "worker", "feddiff", "tools", "bench", "tests")
# The first-party packages each package may import; any other is a wall crossed (tools, bench and tests are
# free to import everything and are not walked).
MAY_IMPORT = {
    "fedcore": {"fedcore"},
    "service": {"fedcore", "service"},
    "coordinator": {"fedcore", "service", "coordinator"},
    "worker": {"fedcore", "service", "worker"},
    "feddiff": {"fedcore", "service", "coordinator", "worker", "feddiff"},
}
# within fedcore, the wire room's alone (grpc_health, grpc_status, ... are gRPC too)
TRANSPORT = ("grpc", "grpc_health", "grpc_status", "grpc_reflection", "google.protobuf", "fedcore.wire.proto")
# each process's metrics, certificates and malloc tuning live with the processes (service/, feddiff/certs.py)
NEVER_IN_FEDCORE = ("prometheus_client", "cryptography", "ssl", "ctypes")
# the command line's flags, help and settings files live with it (service/flags.py): fedcore knows settings by name
COMMAND_LINE = ("argparse", "yaml")


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def room_of(module: str) -> int:
    """0 for fedcore's top (the package and errors, atomic, settings), else 1 + the room's place in ROOMS."""
    parts = module.split(".")
    return ROOMS.index(parts[1]) + 1 if len(parts) > 1 and parts[1] in ROOMS else 0


def _room_name(module: str) -> str:
    rank = room_of(module)
    return f"room {ROOMS[rank - 1]!r}" if rank else "fedcore's top"


def imports_of(module: str, source: str, *, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module imported) for every import in `source`, the module `module` (relative imports resolved;
    `from a import b` gives a.b, since b may be a module)."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found += [(node.lineno, f"{base}.{alias.name}" if alias.name != "*" else base) for alias in node.names]
    return found


def crossings(module: str, source: str, *, is_package: bool = False) -> list[str]:
    """Every wall the imports of `module` (its source) cross, one line each naming the import."""
    top = module.split(".", maxsplit=1)[0]
    found = []
    for line, imported in imports_of(module, source, is_package=is_package):
        target = imported.split(".")[0]
        where = f"{module}:{line} imports {imported}"
        if target in FIRST_PARTY and top in MAY_IMPORT and target not in MAY_IMPORT[top]:
            found.append(f"{where}: {top} may import only {sorted(MAY_IMPORT[top])}")
        if top != "fedcore":
            continue
        if _within(imported, NEVER_IN_FEDCORE):
            found.append(f"{where}: fedcore is the pure core, the processes' metrics, certificates and malloc tuning live outside it")
        if _within(imported, COMMAND_LINE):
            found.append(f"{where}: fedcore builds typed configs from plain values, the command line and its files live in service")
        if _within(imported, TRANSPORT) and not _within(module, ("fedcore.wire",)):
            found.append(f"{where}: only fedcore.wire knows grpc and protobuf")
        if target == "fedcore" and room_of(imported) > room_of(module):
            found.append(f"{where}: {_room_name(module)} imports {_room_name(imported)}, to its right in fedcore.ROOMS")
    return found


def first_party_modules() -> list[tuple[str, Path]]:
    modules = []
    for package in MAY_IMPORT:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return modules


def test_no_wall_is_crossed() -> None:
    modules = first_party_modules()
    names = {name for name, _ in modules}
    assert {"fedcore.wire.convert", "fedcore.federation.engine", "coordinator.servicer", "worker.daemon", "service.metrics"} <= names
    found = [c for name, path in modules for c in crossings(name, path.read_text(), is_package=path.name == "__init__.py")]
    assert found == [], "\n".join(found)


def test_rooms_are_the_subpackages_of_fedcore() -> None:
    packages = sorted(p.parent.name for p in (ROOT / "fedcore").glob("*/__init__.py"))
    assert packages == sorted(ROOMS)


@pytest.mark.parametrize(
    ("module", "source", "wall"),
    [
        ("fedcore.model.unet", "from fedcore.wire.convert import task_to_proto", "room 'model' imports room 'wire'"),
        ("fedcore.payload.serialization", "from ..federation import engine", "room 'payload' imports room 'federation'"),
        ("fedcore.federation", "from . import evaluation", "room 'federation' imports room 'evaluation'"),
        ("fedcore.errors", "def f():\n    from fedcore.data import datasets", "fedcore's top imports room 'data'"),
        ("fedcore.federation.client", "import grpc", "only fedcore.wire knows grpc"),
        ("fedcore.evaluation.fid", "from google.protobuf.message import Message", "only fedcore.wire knows grpc"),
        ("fedcore.evaluation.images", "from fedcore.wire.proto.feddiff.v1 import feddiff_pb2", "only fedcore.wire"),
        ("fedcore.model.training", "from prometheus_client import Counter", "the processes' metrics, certificates"),
        ("fedcore.model.unet", "from grpc_health.v1 import health", "only fedcore.wire knows grpc"),
        ("fedcore.federation.checkpoint", "from cryptography import x509", "certificates and malloc tuning live outside"),
        ("fedcore.data.datasets", "import ctypes", "certificates and malloc tuning live outside"),
        ("fedcore.experiments.simulation", "from coordinator.rounds import RoundDriver", "fedcore may import only"),
        ("fedcore.data.datasets", "import service.ports", "fedcore may import only"),
        ("fedcore.settings", "import argparse", "the command line and its files live in service"),
        ("fedcore.data.shards", "import yaml", "the command line and its files live in service"),
        ("coordinator.rounds", "from worker.rpc import CoordinatorClient", "coordinator may import only"),
        ("worker.daemon", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from coordinator import metrics", "worker may import only"),
        ("worker.daemon", "from feddiff.cli import main", "worker may import only"),
        ("service.metrics", "from coordinator.metrics import Metrics", "service may import only"),
    ],
)
def test_a_crossed_wall_is_found(module: str, source: str, wall: str) -> None:
    found = crossings(module, source)
    assert len(found) == 1 and wall in found[0], found


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("fedcore.wire.convert", "from fedcore.federation.client import TrainTask\nfrom fedcore.model.training import TrainConfig"),
        ("fedcore.wire.convert", "import grpc\nfrom fedcore.wire.proto.feddiff.v1 import feddiff_pb2"),
        ("fedcore.model.training", "from fedcore import settings\nfrom fedcore.errors import FeddiffError"),
        ("fedcore.experiments.reproduce", "from fedcore.evaluation.fid import ReferenceStats"),
        ("coordinator.servicer", "import grpc\nfrom fedcore.wire import convert\nfrom service.metrics import ProcessMetrics"),
        ("feddiff.cli", "from coordinator.server import Coordinator\nfrom worker.daemon import WorkerDaemon"),
    ],
)
def test_an_allowed_import_passes(module: str, source: str) -> None:
    assert crossings(module, source) == []


def test_the_wire_converters_load_neither_scipy_nor_inception() -> None:
    probe = (
        "import sys, fedcore.wire.convert\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('scipy', 'torchvision', 'matplotlib')"
        " or m.startswith('fedcore.evaluation'))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == []
