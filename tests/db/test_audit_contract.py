"""The audit log (api.audit.AuditLog) gives the same answers on both engines."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from api.audit import Actor, AuditLog, AuditQuery
from tests.db.engines import ENGINES, open_database


@pytest.fixture(params=ENGINES)
def log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AuditLog]:
    s = AuditLog(open_database(request, tmp_path))
    try:
        yield s
    finally:
        s.close()


def test_entries_newest_first_filtered_and_paged(log: AuditLog) -> None:
    ops, cli = Actor("k1", "ops", "maintainer"), Actor("cli", "root", "admin")
    first = log.record(cli, "key.create", "k1", {"name": "ops"})
    second = log.record(ops, "alert.acknowledge", "41")
    third = log.record(ops, "alert.note", "41", {"n": 1})
    assert first < second < third
    everything = log.query(AuditQuery())
    assert [e["id"] for e in everything] == [third, second, first]
    assert everything[2]["actor"] == {"id": "cli", "name": "root", "role": "admin"}
    assert everything[2]["detail"] == {"name": "ops"}
    assert [e["id"] for e in log.query(AuditQuery(actor="k1"))] == [third, second]
    assert [e["id"] for e in log.query(AuditQuery(action="alert.note"))] == [third]
    assert [e["id"] for e in log.query(AuditQuery(target="41", before_id=third))] == [second]
    assert [e["id"] for e in log.query(AuditQuery(limit=1))] == [third]
    since = everything[0]["at_ms"] + 1
    assert log.query(AuditQuery(since_ms=since)) == []
    assert log.query(AuditQuery(actor="k1", action="key.create")) == []


def test_a_long_detail_is_cut(log: AuditLog) -> None:
    entry = log.record(Actor("cli", "root", "admin"), "key.revoke", "k1", {"x": "y" * 5000})
    (got,) = log.query(AuditQuery())
    assert got["id"] == entry
    assert set(got["detail"]) == {"truncated"}
