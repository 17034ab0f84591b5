"""Import edges between our packages, read with ast (nothing is imported or executed): an
allowlist. Each top-level package of the repo names the packages of ours it may import, each
edge with why (``MAY_IMPORT``); any other edge fails, a declared edge no import uses fails
(the list stays the truth), and so does a top-level package not declared (a new one fails
until its edges are).

devices is pure and depends on nothing of ours; simulators and ingest depend only on devices.
api reaches ingest through one door: the read-side protocols (``ingest.readside``: what the
API reads, and the maintainers' actions), the plain records, errors and options they name,
and the store layer under the API's own stores (``API_MAY_IMPORT``: the exact modules, each
with why). Only api/cli.py, the composition root, builds what a command runs: the modules
of ``COMPOSITION_ROOT_MAY_IMPORT``, and only lazily (inside a function, or for type checking
only), so that importing the command loads none of them. bench (dev tooling, not product)
may use the product's packages; none uses it. tests may use every package; none uses tests.
README.md ("Layout") shows the same edges.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# every top-level package of the repo: the packages of ours it may import, and why
MAY_IMPORT: dict[str, dict[str, str]] = {
    "devices": {},
    "simulators": {"devices": "the firmware it plays speaks the contract, on the catalog's topics"},
    "ingest": {"devices": "decodes by the contract; the catalog, topics, availability, faults"},
    "api": {
        "devices": "the catalog, topics, contract limits and fault codes the answers show",
        "ingest": "only the modules of API_MAY_IMPORT (and the composition root's, lazily)",
    },
    "bench": {
        "devices": "the catalog and contract the workloads are shaped by",
        "simulators": "the simulated district as a workload",
        "ingest": "the pipeline and stores it measures",
    },
}
# tests may import every package, and none imports it (not scanned: nothing is denied to it)
TESTS = "tests"
OURS = frozenset({*MAY_IMPORT, TESTS})
# devices does no I/O: no event loop, database, sockets, MQTT or HTTP
DEVICES_FORBIDDEN_LIBS = frozenset(
    {"asyncio", "sqlite3", "socket", "paho", "aiomqtt", "httpx", "fastapi"}
)
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
    # the API's own stores (keys, audit log, riders) are in the state database, on ingest's
    # one store layer for both engines, migrated with the rest (the shared state)
    "ingest.db.database": "Database, the protocol the API's own stores run their statements on",
    "ingest.db.schema": "the tables of the API's own stores (api_keys, audit_log, riders...)",
    "ingest.statedb": "StateDB: the data dir's state file for the API's own stores (in_dir)",
}
# what the composition root builds for each command, only lazily (module docstring), and why
COMPOSITION_ROOT = "api/cli.py"
COMPOSITION_ROOT_MAY_IMPORT: dict[str, str] = {
    "ingest.service": "serve: the running Ingest (at run time: the broker, MQTT, SQLite)",
    "ingest.inprocess": "serve: the read side and actions over the running Ingest",
    "ingest.replica": "api: the read side and actions from PostgreSQL",
    "ingest.db.database": "api: PgDatabase, the pool under a replica's own stores",
    "ingest.statedb": "keys --db: the state database the keys are in",
    "ingest.db.cli": "db upgrade/status; api: the CHARGEWATCH_DB name",
    "ingest.worker": "ingest: a partitioned worker",
    "ingest.backup": "backup and restore of the embedded file",
    "ingest.brokerconfig": "broker-config: the broker's device credentials and ACLs",
    "ingest.influxsetup": "influx: the InfluxDB buckets and tasks",
    "ingest.gcpolicy": "serve and api: the collector's policy once started",
    "simulators.cli": "simulate: the simulated fleet (demo starts it as a process)",
    "bench.cli": "bench: dev tooling, outside the product packages",
}


def top_level_packages(root: Path) -> set[str]:
    """The repo's top-level packages (directories with an ``__init__.py``) and modules."""
    return {p.parent.name for p in root.glob("*/__init__.py")} | {p.stem for p in root.glob("*.py")}


@dataclass(frozen=True)
class Import:
    module: str  # absolute dotted name
    line: int
    lazy: bool  # not run on importing the file: inside a function, or for type checking only

    @property
    def top(self) -> str:
        return self.module.split(".")[0]


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking(test: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` / ``if typing.TYPE_CHECKING:``"""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(source: str, module: str, is_package: bool = False) -> list[Import]:
    """Every import in ``source`` (also inside functions), relative ones made absolute."""
    tree = ast.parse(source)
    lazy_nodes: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            lazy_nodes.update(id(inner) for inner in ast.walk(node) if inner is not node)
        elif isinstance(node, ast.If) and _type_checking(node.test):
            lazy_nodes.update(id(inner) for s in node.body for inner in ast.walk(s))
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


def file_imports(rel_path: str, source: str) -> list[Import]:
    path = Path(rel_path)
    return imports_of(source, _module_name(ROOT / path, ROOT), path.name == "__init__.py")


def violations(rel_path: str, source: str) -> list[str]:
    return edge_violations(rel_path, file_imports(rel_path, source))


def edge_violations(rel_path: str, imports: list[Import]) -> list[str]:
    """The undeclared edges of one file, as 'path:line: package -> module' strings."""
    package = rel_path.split("/")[0]
    found = []
    for imp in imports:
        if package == "devices" and imp.top in DEVICES_FORBIDDEN_LIBS:
            found.append(f"{rel_path}:{imp.line}: devices -> {imp.module} (devices does no I/O)")
        if imp.top not in OURS or imp.top == package:
            continue  # not ours, or its own package
        if rel_path == COMPOSITION_ROOT and imp.lazy and imp.module in COMPOSITION_ROOT_MAY_IMPORT:
            continue
        if imp.top not in MAY_IMPORT[package]:
            found.append(f"{rel_path}:{imp.line}: {package} -> {imp.module}")
        elif package == "api" and imp.top == "ingest" and imp.module not in API_MAY_IMPORT:
            found.append(
                f"{rel_path}:{imp.line}: api -> {imp.module} (not through ingest.readside)"
            )
    return found


def private_imports(rel_path: str, source: str) -> list[str]:
    """Names with a leading underscore that a file imports from another of our packages
    (``from ingest.pipeline import _Batch``): a private name is no seam to build on."""
    package = Path(rel_path).parts[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            top = node.module.split(".")[0]
            if top in OURS and top != package:
                found.extend(
                    f"{rel_path}:{node.lineno}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_")
                )
    return found


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@functools.cache
def tree_imports() -> dict[str, list[Import]]:
    """Each file of the packages in ``MAY_IMPORT`` (its path from ROOT): its imports."""
    found = {}
    for package in MAY_IMPORT:
        for f in sources(package):
            rel = f.relative_to(ROOT).as_posix()
            found[rel] = file_imports(rel, f.read_text(encoding="utf-8"))
    return found


# -- the real tree ---------------------------------------------------------------------------


def test_every_top_level_package_is_declared() -> None:
    assert top_level_packages(ROOT) == OURS


def test_declared_edges_form_no_cycle() -> None:
    def reaches(start: str, goal: str) -> bool:
        todo, seen = list(MAY_IMPORT[start]), set()
        while todo:
            package = todo.pop()
            if package == goal:
                return True
            if package not in seen:
                seen.add(package)
                todo.extend(MAY_IMPORT[package])
        return False

    assert [p for p in MAY_IMPORT if reaches(p, p)] == []


@pytest.mark.parametrize("package", MAY_IMPORT)
def test_no_undeclared_imports(package: str) -> None:
    files = [path for path in tree_imports() if path.startswith(f"{package}/")]
    assert files, f"no Python files under {package}/"
    assert [v for path in files for v in edge_violations(path, tree_imports()[path])] == []


def test_every_declared_edge_is_used() -> None:
    """The lists say what is, not what once was: an edge no import uses goes from them."""
    used = {(path.split("/")[0], imp.top) for path, imps in tree_imports().items() for imp in imps}
    declared = {(p, q) for p, edges in MAY_IMPORT.items() for q in edges}
    assert declared - used == set()
    api = {
        imp.module
        for path, imps in tree_imports().items()
        if path.startswith("api/") and path != COMPOSITION_ROOT
        for imp in imps
    }
    assert set(API_MAY_IMPORT) - api == set()
    root = {imp.module for imp in tree_imports()[COMPOSITION_ROOT] if imp.lazy}
    assert set(COMPOSITION_ROOT_MAY_IMPORT) - root == set()


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


def test_a_new_top_level_package_or_module_is_seen(tmp_path: Path) -> None:
    for name in ("devices", "newpkg", "docs"):
        (tmp_path / name).mkdir()
    (tmp_path / "devices" / "__init__.py").touch()
    (tmp_path / "newpkg" / "__init__.py").touch()
    (tmp_path / "tool.py").touch()
    assert top_level_packages(tmp_path) == {"devices", "newpkg", "tool"}


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
        # the composition root builds the service lazily, and only from the declared modules
        (
            "api/cli.py",
            "from ingest.service import Ingest\n",
            ["api/cli.py:1: api -> ingest.service (not through ingest.readside)"],
        ),
        ("api/cli.py", "def serve():\n    from ingest.service import Ingest\n", []),
        ("api/cli.py", "if TYPE_CHECKING:\n    from ingest.service import Ingest\n", []),
        (
            "api/cli.py",
            "def serve():\n    from ingest.pipeline import Pipeline\n",
            ["api/cli.py:2: api -> ingest.pipeline (not through ingest.readside)"],
        ),
        (
            "api/app.py",
            "if TYPE_CHECKING:\n    from ingest.service import Ingest\n",
            ["api/app.py:2: api -> ingest.service (not through ingest.readside)"],
        ),
        (
            "api/x.py",
            "from ingest.sqlite_db import SQLiteDB\n",
            ["api/x.py:1: api -> ingest.sqlite_db (not through ingest.readside)"],
        ),
        # an edge not declared at all: to tests, or bench -> api
        ("ingest/x.py", "import tests.conftest\n", ["ingest/x.py:1: ingest -> tests.conftest"]),
        ("bench/x.py", "from api.app import create_app\n", ["bench/x.py:1: bench -> api.app"]),
        ("api/x.py", "from devices.catalog import Catalog\n", []),
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
