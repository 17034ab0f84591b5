"""Remote commands (ingest.commands.store) give the same answers on both engines."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from ingest.commands.model import CommandRecord
from ingest.commands.store import CommandStore
from tests.db.engines import ENGINES, open_database


@pytest.fixture(params=ENGINES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CommandStore]:
    s = CommandStore(open_database(request, tmp_path))
    try:
        yield s
    finally:
        s.close()


def _command(n: int, device: str = "pile-1", state: str = "pending") -> CommandRecord:
    return CommandRecord(
        id=f"c{n:03d}", device_id=device, station_id="st-1", type="disable_port", unit=n % 4,
        state=state, requested_by="ops", requested_key="k1", requested_at_ms=1000 + n,
        expires_at_ms=90_000 + n, payload=f'{{"n":{n}}}',
    )  # fmt: skip


def test_save_inserts_then_updates_every_column(store: CommandStore) -> None:
    first = _command(1)
    store.save([first])
    assert store.get("c001") == first
    done = replace(first, state="done", sends=2, sent_at_ms=1100, last_sent_at_ms=1200,
                   result="ok", info="port 1 off", result_at_ms=1300, repeats=1,
                   updated_at_ms=1300)  # fmt: skip
    store.save([done])
    assert store.get("c001") == done
    assert store.get("nope") is None


def test_open_ones_oldest_first_and_recent_newest_first(store: CommandStore) -> None:
    store.save([
        _command(3, state="sent"), _command(1), _command(2, "cab-1", state="done"),
        _command(4, "cab-1", state="expired"),
    ])  # fmt: skip
    assert [c.id for c in store.load_open()] == ["c001", "c003"]
    assert [c.id for c in store.recent()] == ["c004", "c003", "c002", "c001"]
    assert [c.id for c in store.recent("cab-1")] == ["c004", "c002"]
    assert [c.id for c in store.recent(limit=2, before_ms=1004)] == ["c003", "c002"]
    assert [c.id for c in store.recent("pile-1", before_ms=1003)] == ["c001"]


def test_pruning_keeps_the_newest_and_every_open_one(store: CommandStore) -> None:
    store.save([_command(n, state="pending" if n in (0, 2) else "done") for n in range(8)])
    store.save([_command(8, state="done")], kept=3)
    kept = sorted(c.id for c in store.recent(limit=100))
    # older than the 4th newest (c005: the cut is "older than", as on main) unless open
    assert kept == ["c000", "c002", "c005", "c006", "c007", "c008"]
