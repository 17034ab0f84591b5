"""``chargewatch db upgrade|status``: exit codes, messages, ``CHARGEWATCH_DB``, the registry
seeded from the catalog."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from api.cli import main
from devices.catalog import Catalog
from ingest.db import migrate, registry

CHARGEWATCH = [sys.executable, "-m", "api.cli"]


def test_upgrade_then_status_on_postgresql(pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "status", "--db", pg_url]) == 1
    assert "run `chargewatch db upgrade --db" in capsys.readouterr().err
    assert main(["db", "upgrade", "--db", pg_url]) == 0
    out = capsys.readouterr().out
    assert f"revision none -> {migrate.head()}" in out
    shipped = Catalog.load()
    assert f"registry: {len(shipped.stations)} stations, {len(shipped.devices)} devices" in out
    assert main(["db", "status", "--db", pg_url]) == 0
    assert main(["db", "upgrade", "--db", pg_url]) == 0  # again: nothing to do, not re-seeded
    assert "registry" not in capsys.readouterr().out
    engine = migrate.connect(pg_url)
    with engine.connect() as conn:
        loaded = registry.load_catalog(conn)
    engine.dispose()
    assert loaded is not None
    assert loaded.data == shipped.data  # the whole catalog, in order, round-trips


def test_db_from_the_environment_and_a_private_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "state" / "c.db"
    env = {**os.environ, "CHARGEWATCH_DB": f"sqlite:///{path}"}
    done = subprocess.run(
        [*CHARGEWATCH, "db", "upgrade"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert migrate.revision_of(f"sqlite:///{path}") == migrate.head()
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700


def test_no_database_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CHARGEWATCH_DB", raising=False)
    assert main(["db", "upgrade"]) == 2
    assert "no database: give --db URL or set CHARGEWATCH_DB" in capsys.readouterr().err


def test_an_unreachable_server_fails_with_its_reason(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.servers import free_port

    url = f"postgresql://postgres@127.0.0.1:{free_port()}/none"
    assert main(["db", "upgrade", "--db", url]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"chargewatch db upgrade: database {url}: ")
    assert "Connection refused" in err or "connection failed" in err


def test_a_bad_catalog_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "catalog.json"
    bad.write_text(json.dumps({"district": {}, "stations": []}))
    url = f"sqlite:///{tmp_path / 'c.db'}"
    assert main(["db", "upgrade", "--db", url, "--catalog", str(bad)]) == 1
    assert "invalid catalog" in capsys.readouterr().err
    assert migrate.revision_of(url) is None
