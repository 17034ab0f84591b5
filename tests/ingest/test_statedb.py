"""``--db`` of ``serve`` (ingest.statedb): which database a URL names, and the embedded store
at a path of its own (``sqlite:///path``), run in-process with injected messages."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from devices.catalog import Catalog
from ingest.backup import DataDirInUse
from ingest.config import IngestConfig
from ingest.service import Ingest, now_ms
from ingest.statedb import StateDB, StateURLError


@pytest.mark.parametrize(
    ("db", "path", "url"),
    [
        (None, Path("data/chargewatch.db"), None),
        ("", Path("data/chargewatch.db"), None),
        ("sqlite:///state/cw.db", Path("state/cw.db"), None),  # relative, as SQLAlchemy's
        ("sqlite:////srv/cw/state.db", Path("/srv/cw/state.db"), None),  # absolute
        ("postgresql://cw@db.example/cw", None, "postgresql://cw@db.example/cw"),
        ("postgres://cw@db.example/cw", None, "postgres://cw@db.example/cw"),
    ],
)
def test_a_url_names_the_embedded_file_or_postgresql(
    db: str | None, path: Path | None, url: str | None
) -> None:
    state = StateDB.of(db, Path("data"))
    assert (state.path, state.url, state.embedded) == (path, url, path is not None)


@pytest.mark.parametrize(
    ("db", "says"),
    [
        ("mysql://cw:s3cret@db.example/cw", "give postgresql://user@host/db or sqlite:///path"),
        ("sqlite:///", "name the SQLite file"),
        ("sqlite:///state/", "name the SQLite file"),
        ("/var/lib/cw.db", "give postgresql://user@host/db or sqlite:///path"),
    ],
)
def test_any_other_url_is_refused_with_what_to_give(db: str, says: str) -> None:
    with pytest.raises(StateURLError, match=says) as caught:
        StateDB.of(db, Path("data"))
    assert "s3cret" not in str(caught.value)  # a password is never printed


def test_postgresql_is_shown_without_its_password() -> None:
    assert str(StateDB.of("postgresql://cw:s3cret@db/cw", "d")) == "postgresql://cw:***@db/cw"


async def test_serve_keeps_its_state_in_the_sqlite_file_it_is_given(tmp_path: Path) -> None:
    state = tmp_path / "elsewhere" / "state.db"
    config = IngestConfig(db=f"sqlite:///{state}", data_dir=tmp_path / "data")
    birth = {"v": 1, "ts": now_ms(), "boot": "boot-1", "seq": 0, "online": True, "kind": "pile",
             "ports": 10, "heartbeat_s": 60}  # fmt: skip
    async with Ingest(config, Catalog.load(), connect=False) as ingest:
        ingest.inject("cw/v1/YGR-P01/state", json.dumps(birth).encode())
        await ingest.drain(quiet_s=0, max_s=5)
        with pytest.raises(DataDirInUse, match=str(state.parent)):  # one service per file
            async with Ingest(config, Catalog.load(), connect=False):
                pass
    db = sqlite3.connect(state)
    try:
        (record,) = db.execute("SELECT record FROM twins WHERE device_id = 'YGR-P01'").fetchone()
        stored = db.execute("SELECT type FROM messages WHERE device_id = 'YGR-P01'").fetchall()
    finally:
        db.close()
    assert json.loads(record)["boot"] == "boot-1"
    assert stored == [("birth",)]  # the history too
    assert not (tmp_path / "data" / "chargewatch.db").exists()
