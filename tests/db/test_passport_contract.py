"""Battery passports (ingest.passport_store) give the same answers on both engines."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest.passport_store import PassportOps, PassportStore
from tests.db.engines import ENGINES, open_database


@pytest.fixture(params=ENGINES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PassportStore]:
    s = PassportStore(open_database(request, tmp_path))
    try:
        yield s
    finally:
        s.close()


def test_maxima_only_rise_and_a_stay_opens_and_closes_in_one_batch(store: PassportStore) -> None:
    ops = PassportOps()
    ops.batteries["B1"] = (1000, "cab-1", 3, 1000, 40.5, None)
    ops.opened.append(("B1", "cab-1", 3, 1000))
    store.apply(ops)
    later = PassportOps()
    later.batteries["B1"] = (1000, None, None, None, 38.0, 1.5)  # lower temp, a first rise
    later.closed.append((5000, "B1", "cab-1", 3, 1000))
    later.opened.append(("B1", "cab-2", 1, 6000))
    later.closed.append((7000, "B1", "cab-2", 1, 6000))
    store.apply(later)
    p = store.passport("B1")
    assert p is not None
    assert (p["max_temp_c"], p["max_rise_c_per_min"]) == (40.5, 1.5)
    assert (p["device_id"], p["slot"], p["since_ms"], p["first_seen_ms"]) == (
        None,
        None,
        None,
        1000,
    )
    assert p["stays"] == [
        {"device_id": "cab-2", "slot": 1, "from_ms": 6000, "to_ms": 7000},
        {"device_id": "cab-1", "slot": 3, "from_ms": 1000, "to_ms": 5000},
    ]
    assert store.passport("nope") is None


def test_flags_events_restore_and_clearance(store: PassportStore) -> None:
    ops = PassportOps()
    ops.batteries["B1"] = (1000, "cab-1", 3, 1000, 70.0, 4.0)
    ops.batteries["B2"] = (1100, "cab-1", 4, 1100, None, None)
    ops.events.append(("B1", "overheat", 41, 2000, "cab-1", 3, "70 C"))
    ops.events.append(("B2", "smoke", 42, 2100, "cab-1", 4, None))
    ops.flags.append((2000, "overheat", "B1"))
    store.apply(ops)
    restored = store.restore()
    assert restored.flagged == {"B1": (2000, "overheat")}
    assert sorted(restored.placed) == [
        ("B1", "cab-1", 3, 1000, 70.0, 4.0),
        ("B2", "cab-1", 4, 1100, None, None),
    ]
    assert store.alerts_recorded([]) == set()
    many = [*range(1000, 1300), 42]  # more ids than one statement takes
    assert store.alerts_recorded(many) == {("B2", 42)}
    assert store.alerts_recorded([41, 42, 43]) == {("B1", 41), ("B2", 42)}
    assert store.clear("B2", 3000, "k1", "ops", "not flagged") is False
    assert store.clear("B1", 3000, "k1", "ops", "cooled down, checked") is True
    assert store.clear("B1", 3001, "k1", "ops", "again") is False
    p = store.passport("B1")
    assert p is not None
    assert (p["flagged"], p["flagged_at_ms"], p["flag_reason"]) == (False, None, None)
    assert p["events"] == [
        {
            "kind": "overheat",
            "alert_id": 41,
            "at_ms": 2000,
            "device_id": "cab-1",
            "slot": 3,
            "detail": "70 C",
        }
    ]
    assert p["clearances"] == [
        {
            "at_ms": 3000,
            "actor_id": "k1",
            "actor_name": "ops",
            "note": "cooled down, checked",
            "flagged_at_ms": 2000,
            "flag_reason": "overheat",
        }
    ]
    assert store.restore().flagged == {}


def test_batteries_page_by_serial_and_filter_by_flag(store: PassportStore) -> None:
    ops = PassportOps()
    for i in range(5):
        ops.batteries[f"B{i}"] = (1000 + i, None, None, None, None, None)
    ops.flags += [(2000, "smoke", "B1"), (2000, "smoke", "B3")]
    store.apply(ops)
    assert [b["serial"] for b in store.batteries(flagged=None, after=None, limit=3)] == [
        "B0", "B1", "B2"]  # fmt: skip
    assert [b["serial"] for b in store.batteries(flagged=None, after="B2", limit=3)] == ["B3", "B4"]
    assert [b["serial"] for b in store.batteries(flagged=True, after=None, limit=10)] == [
        "B1",
        "B3",
    ]
    flagged = store.batteries(flagged=True, after="B1", limit=10)
    assert [(b["serial"], b["flagged"]) for b in flagged] == [("B3", True)]
    assert len(store.batteries(flagged=False, after=None, limit=10)) == 3
