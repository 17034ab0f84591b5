"""Import edges between our packages, read with ast (nothing is imported or executed).

devices is pure and depends on nothing of ours; simulators and ingest depend only on devices.
api reaches ingest through one door: the read-side protocols (``ingest.readside``: what the
API reads, and the maintainers' actions) and the plain records, errors and options they
name (``API_MAY_IMPORT``, each with why). Only api/cli.py, the composition root, builds the
running ``Ingest`` (any ingest module) and may reach simulators and bench (lazily). bench
(dev tooling, not product) may use every package; none uses it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("devices", "simulators", "ingest", "api", "bench")

FORBIDDEN: dict[str, frozenset[str]] = {
    "devices": frozenset({"ingest", "api", "simulators", "bench"}),
    "simulators": frozenset({"ingest", "api", "bench"}),
    "ingest": frozenset({"api", "simulators", "bench"}),
    "api": frozenset({"simulators", "bench"}),
    "bench": frozenset(),
}
# devices does no I/O: no event loop, database, sockets, MQTT or HTTP
DEVICES_FORBIDDEN_LIBS = frozenset(
    {"asyncio", "sqlite3", "socket", "paho", "aiomqtt", "httpx", "fastapi"}
)
# the composition root may start the simulators and the benchmarks, importing their CLI
# inside a function
COMPOSITION_ROOT = "api/cli.py"
COMPOSITION_ROOT_MAY_IMPORT = frozenset({"simulators.cli", "bench.cli"})
# the ingest modules api/ may import (a module, not its submodules), and why
API_MAY_IMPORT: dict[str, str] = {
    "ingest.readside": "the door: ReadSide, Actions, Unavailable, now_ms and the bounds",
    "ingest": "the package's error bases (StoreError) the stores raise through the door",
    "ingest.config": "IngestConfig, part of ServeSettings (one settings class per process)",
    "ingest.twins": "Twin: the plain record of a device's state the read side hands out",
    "ingest.store": "HistoryStore/RollupStore protocols and DeadLetter, named by the read side",
    "ingest.alerts.model": "Alert, AlertQuery, StreamEvent, the alert errors, categories",
    "ingest.alerts.order_model": "WorkOrder, OrderQuery, the order states and errors",
    "ingest.alerts.config": "AlertsConfig: the alert options the read side hands out",
    "ingest.alerts.repair": "pure arithmetic of times to acknowledge/repair over Timing rows",
    "ingest.commands": "the command errors (CommandInvalid, CommandNotFound, TooManyCommands)",
    "ingest.sqlite_db": "the SQLite adapter under the API's own stores (keys, audit, riders)",
    "ingest.db.database": "Database, the engine under the API's own stores, and PgDatabase",
    "ingest.db.schema": "the tables of the API's own stores (api_keys, audit_log, riders...)",
}


@dataclass(frozen=True)
class Import:
    module: str  # absolute dotted name
    line: int
    lazy: bool  # inside a function body

    @property
    def top(self) -> str:
        return self.module.split(".")[0]


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool = False) -> list[Import]:
    """Every import in ``source`` (also inside functions), relative ones made absolute."""
    tree = ast.parse(source)
    lazy_nodes: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            lazy_nodes.update(id(inner) for inner in ast.walk(node) if inner is not node)
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: list[Import] = []
    for node in ast.walk(tree):
        lazy = id(node) in lazy_nodes
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, node.lineno, lazy) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            if node.module:
                found.append(Import(".".join([*base, node.module]), node.lineno, lazy))
            else:  # "from . import x" / "from .. import x": the names are modules
                found.extend(
                    Import(".".join([*base, a.name]), node.lineno, lazy) for a in node.names
                )
    return found


def violations(rel_path: str, source: str) -> list[str]:
    """The forbidden edges in one file, as 'path:line: package -> module' strings."""
    path = Path(rel_path)
    package = path.parts[0]
    module = _module_name(ROOT / path, ROOT)
    found = []
    for imp in imports_of(source, module, path.name == "__init__.py"):
        if imp.top in FORBIDDEN[package]:
            allowed = (
                rel_path == COMPOSITION_ROOT
                and imp.lazy
                and any(
                    imp.module == m or imp.module.startswith(f"{m}.")
                    for m in COMPOSITION_ROOT_MAY_IMPORT
                )
            )
            if not allowed:
                found.append(f"{rel_path}:{imp.line}: {package} -> {imp.module}")
        if (
            package == "api"
            and imp.top == "ingest"
            and rel_path != COMPOSITION_ROOT
            and imp.module not in API_MAY_IMPORT
        ):
            found.append(
                f"{rel_path}:{imp.line}: api -> {imp.module} (not through ingest.readside)"
            )
        if package == "devices" and imp.top in DEVICES_FORBIDDEN_LIBS:
            found.append(f"{rel_path}:{imp.line}: devices -> {imp.module} (devices does no I/O)")
    return found


def private_imports(rel_path: str, source: str) -> list[str]:
    """Names with a leading underscore that a file imports from another of our packages
    (``from ingest.pipeline import _Batch``): a private name is no seam to build on."""
    package = Path(rel_path).parts[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            top = node.module.split(".")[0]
            if top in PACKAGES and top != package:
                found.extend(
                    f"{rel_path}:{node.lineno}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_")
                )
    return found


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


# -- the real tree ---------------------------------------------------------------------------


@pytest.mark.parametrize("package", PACKAGES)
def test_no_forbidden_imports(package: str) -> None:
    files = sources(package)
    assert files, f"no Python files under {package}/"
    problems = [
        v
        for f in files
        for v in violations(f.relative_to(ROOT).as_posix(), f.read_text(encoding="utf-8"))
    ]
    assert problems == []


def test_bench_imports_no_private_names_of_the_product() -> None:
    files = sources("bench")
    assert files, "no Python files under bench/"
    problems = [
        v
        for f in files
        for v in private_imports(f.relative_to(ROOT).as_posix(), f.read_text(encoding="utf-8"))
    ]
    assert problems == []


def test_private_imports_are_seen() -> None:
    source = "from ingest.pipeline import Pipeline, _Batch\nfrom bench.rig import _x\n"
    assert private_imports("bench/x.py", source) == ["bench/x.py:1: ingest.pipeline._Batch"]


def test_devices_imports_only_devices_of_ours() -> None:
    ours = set(PACKAGES)
    for f in sources("devices"):
        module = _module_name(f, ROOT)
        tops = {i.top for i in imports_of(f.read_text(encoding="utf-8"), module)}
        assert tops & ours <= {"devices"}, f


# -- the checker itself can fail -------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        ("devices/x.py", "import ingest.twins\n", ["devices/x.py:1: devices -> ingest.twins"]),
        ("devices/x.py", "from api import app\n", ["devices/x.py:1: devices -> api"]),
        (
            "devices/x.py",
            "def f():\n    from simulators.cli import main\n",
            ["devices/x.py:2: devices -> simulators.cli"],
        ),
        (
            "devices/x.py",
            "import asyncio\n",
            ["devices/x.py:1: devices -> asyncio (devices does no I/O)"],
        ),
        (
            "devices/x.py",
            "import paho.mqtt.client as mqtt\n",
            ["devices/x.py:1: devices -> paho.mqtt.client (devices does no I/O)"],
        ),
        (
            "devices/x.py",
            "from sqlite3 import connect\n",
            ["devices/x.py:1: devices -> sqlite3 (devices does no I/O)"],
        ),
        (
            "simulators/x.py",
            "from ingest.mqtt import Received\n",
            ["simulators/x.py:1: simulators -> ingest.mqtt"],
        ),
        ("simulators/x.py", "import api.app\n", ["simulators/x.py:1: simulators -> api.app"]),
        ("ingest/x.py", "from api.views import rfc3339\n", ["ingest/x.py:1: ingest -> api.views"]),
        ("ingest/x.py", "import simulators\n", ["ingest/x.py:1: ingest -> simulators"]),
        (
            "api/app.py",
            "from simulators.fleet import Fleet\n",
            ["api/app.py:1: api -> simulators.fleet"],
        ),
        # the composition root: only simulators.cli, and only lazily
        (
            "api/cli.py",
            "from simulators.cli import main\n",
            ["api/cli.py:1: api -> simulators.cli"],
        ),
        (
            "api/cli.py",
            "def demo():\n    from simulators.fleet import Fleet\n",
            ["api/cli.py:2: api -> simulators.fleet"],
        ),
        ("api/cli.py", "def demo():\n    from simulators.cli import main\n", []),
        ("api/cli.py", "def main():\n    from bench.cli import main\n", []),
        ("api/cli.py", "from bench.cli import main\n", ["api/cli.py:1: api -> bench.cli"]),
        (
            "api/cli.py",
            "def main():\n    from bench.suite import Plan\n",
            ["api/cli.py:2: api -> bench.suite"],
        ),
        # bench is dev tooling: the product never imports it, it may import the product
        (
            "ingest/x.py",
            "from bench.rig import pipeline_rig\n",
            ["ingest/x.py:1: ingest -> bench.rig"],
        ),
        ("api/app.py", "import bench\n", ["api/app.py:1: api -> bench"]),
        (
            "simulators/x.py",
            "def f():\n    import bench.workload\n",
            ["simulators/x.py:2: simulators -> bench.workload"],
        ),
        ("devices/x.py", "from bench import cli\n", ["devices/x.py:1: devices -> bench"]),
        ("bench/x.py", "from ingest.pipeline import Pipeline\nimport simulators.pile\n", []),
        ("api/cli.py", "async def demo():\n    import simulators.cli\n", []),
        # relative imports resolve to the package they name
        ("devices/x.py", "from ..ingest import twins\n", ["devices/x.py:1: devices -> ingest"]),
        ("ingest/sub/x.py", "from ...api import app\n", ["ingest/sub/x.py:1: ingest -> api"]),
        ("devices/x.py", "from . import contract\nfrom .topics import Channel\n", []),
        ("devices/x.py", "from .. import ingest\n", ["devices/x.py:1: devices -> ingest"]),
        # allowed edges
        ("ingest/x.py", "from devices.contract import decode\nimport sqlite3\n", []),
        ("simulators/x.py", "import aiomqtt\nfrom devices.topics import TopicScheme\n", []),
        ("api/x.py", "from ingest.readside import ReadSide\nimport fastapi\n", []),
        ("api/x.py", "from ingest.alerts.model import Alert\nfrom ingest import StoreError\n", []),
        # api reaches ingest only through the read side and the records it names
        (
            "api/x.py",
            "from ingest.pipeline import Twins\n",
            ["api/x.py:1: api -> ingest.pipeline (not through ingest.readside)"],
        ),
        (
            "api/routes/x.py",
            "def f():\n    from ingest.service import Ingest\n",
            ["api/routes/x.py:2: api -> ingest.service (not through ingest.readside)"],
        ),
        (
            "api/x.py",
            "from ingest.alerts import AlertEngine\n",
            ["api/x.py:1: api -> ingest.alerts (not through ingest.readside)"],
        ),
        ("api/cli.py", "from ingest.service import Ingest\n", []),  # the composition root
        ("devices/x.py", "import re, json, math\nfrom pydantic import BaseModel\n", []),
        ("devices/x.py", "import devices_extra\n", []),  # a name that merely starts alike
    ],
)
def test_checker(path: str, source: str, expected: list[str]) -> None:
    assert violations(path, source) == expected


def test_checker_sees_every_import_in_a_file() -> None:
    source = "import asyncio\nif True:\n    import socket\nclass A:\n    import httpx\n"
    assert [v.split(": ")[1] for v in violations("devices/x.py", source)] == [
        "devices -> asyncio (devices does no I/O)",
        "devices -> socket (devices does no I/O)",
        "devices -> httpx (devices does no I/O)",
    ]
