"""Battery passports (ingest.passport_store) give the same answers on both engines."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest.db import migrate
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
    # where a pack is comes from its open stay (as ``Passports`` writes them)
    ops.opened += [("B1", "cab-1", 3, 1000), ("B2", "cab-1", 4, 1100)]
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
    assert sorted(store.restore(["cab-1"]).placed) == sorted(restored.placed)  # a partition's
    assert store.restore(["cab-2"]) == type(restored)(restored.flagged, [])
    assert store.restore([]).placed == []
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


def _moves(serial: str) -> dict[str, PassportOps]:
    """What two partitions write about one pack (cluster, issue 13): it sat in cab-A slot 3
    (partition 1) from 1000, was flagged there at 2000, was carried to cab-B slot 1
    (partition 2) at 5000 and flagged there by smoke at 6000; cab-A reported its slot empty
    only at 9000 (late: partition 1 closes the stay then). Each partition writes its own
    batches in order; the two partitions' batches interleave in any order."""
    a1, a2, b1 = PassportOps(), PassportOps(), PassportOps()
    a1.batteries[serial] = (1000, "cab-A", 3, 1000, 40.0, None)
    a1.opened.append((serial, "cab-A", 3, 1000))
    a1.events.append((serial, "temperature_high", 41, 2000, "cab-A", 3, "71"))
    a1.flags.append((2000, "temperature_high", serial))
    a2.batteries[serial] = (1000, None, None, None, 71.0, 2.5)  # it left, as partition 1 saw
    a2.closed.append((9000, serial, "cab-A", 3, 1000))
    b1.batteries[serial] = (5000, "cab-B", 1, 5000, 30.0, None)  # first seen by partition 2
    b1.opened.append((serial, "cab-B", 1, 5000))
    b1.events.append((serial, "smoke", 42, 6000, "cab-B", 1, None))
    b1.flags.append((6000, "smoke", serial))
    return {"a1": a1, "a2": a2, "b1": b1}


@pytest.mark.parametrize("order", [("a1", "a2", "b1"), ("a1", "b1", "a2"), ("b1", "a1", "a2")])
def test_two_partitions_writes_about_one_pack_merge_in_any_order(
    store: PassportStore, order: tuple[str, str, str]
) -> None:
    ops = _moves("X1")
    for name in order:
        store.apply(ops[name])
    p = store.passport("X1")
    assert p is not None
    # where it is: its latest stay (cab-B); first seen by the earlier partition; the maxima
    assert (p["device_id"], p["slot"], p["since_ms"]) == ("cab-B", 1, 5000)
    assert p["first_seen_ms"] == 1000
    assert (p["max_temp_c"], p["max_rise_c_per_min"]) == (71.0, 2.5)
    # flagged since the first safety event, whichever partition's write came first
    assert (p["flagged"], p["flagged_at_ms"], p["flag_reason"]) == (True, 2000, "temperature_high")
    # cab-A's stay ended when the pack was in cab-B, not when cab-A noticed
    assert p["stays"] == [
        {"device_id": "cab-B", "slot": 1, "from_ms": 5000, "to_ms": None},
        {"device_id": "cab-A", "slot": 3, "from_ms": 1000, "to_ms": 5000},
    ]
    assert sorted(e["alert_id"] for e in p["events"]) == [41, 42]
    assert store.restore().placed == [("X1", "cab-B", 1, 5000, 71.0, 2.5)]


def test_a_late_arrival_written_after_the_pack_moved_on_does_not_place_it(
    store: PassportStore,
) -> None:
    """Partition 1 lags: its arrival of the pack in cab-A (at 1000) is written after
    partition 2 saw the pack come to cab-B (5000) and leave it (8000)."""
    b = PassportOps()
    b.batteries["X2"] = (5000, None, None, None, None, None)
    b.opened.append(("X2", "cab-B", 1, 5000))
    b.closed.append((8000, "X2", "cab-B", 1, 5000))
    store.apply(b)
    a = PassportOps()
    a.batteries["X2"] = (1000, "cab-A", 3, 1000, None, None)
    a.opened.append(("X2", "cab-A", 3, 1000))
    store.apply(a)
    p = store.passport("X2")
    assert p is not None
    assert (p["device_id"], p["slot"], p["since_ms"], p["first_seen_ms"]) == (
        None, None, None, 1000)  # fmt: skip
    assert [(s["device_id"], s["to_ms"]) for s in p["stays"]] == [("cab-B", 8000), ("cab-A", 5000)]
    assert store.restore().placed == []


def test_flagged_packs_with_their_last_stay_and_those_flagged_where_they_sit(
    store: PassportStore,
) -> None:
    """What ``Passports.adopt_flags`` and ``announce_flagged`` read: each flagged pack's
    latest stay (ended or not; None if it never sat in a slot), and which placed flagged
    packs a safety event flagged in their stay there (an ``appeared`` does not count, nor
    an event before the stay began, nor one at another slot)."""
    ops = PassportOps()
    ops.batteries["H1"] = (1000, "cab-1", 3, 1000, 80.0, None)  # flagged where it sits
    ops.batteries["M1"] = (1000, "cab-2", 5, 4000, 80.0, None)  # flagged, then moved
    ops.batteries["L1"] = (1000, None, None, None, None, None)  # flagged, then it left
    ops.batteries["N1"] = (1000, None, None, None, None, None)  # never in a slot
    ops.opened += [("H1", "cab-1", 3, 1000), ("M1", "cab-1", 4, 1000), ("M1", "cab-2", 5, 4000)]
    ops.opened += [("L1", "cab-1", 6, 1000)]
    ops.closed += [(3000, "M1", "cab-1", 4, 1000), (6000, "L1", "cab-1", 6, 1000)]
    ops.events += [
        ("H1", "temperature_high", 41, 2000, "cab-1", 3, "80"),
        ("M1", "temperature_high", 42, 2000, "cab-1", 4, "80"),
        ("M1", "appeared", 43, 4000, "cab-2", 5, "flagged battery M1 in slot 5"),
        ("L1", "smoke", 44, 2000, "cab-1", 6, None),
    ]
    ops.flags += [(2000, "temperature_high", s) for s in ("H1", "M1")]
    ops.flags += [(2000, "smoke", "L1"), (500, "smoke", "N1")]
    store.apply(ops)
    assert store.flagged_where() == {
        "H1": (2000, "temperature_high", ("cab-1", 3, 1000)),
        "M1": (2000, "temperature_high", ("cab-2", 5, 4000)),
        "L1": (2000, "smoke", ("cab-1", 6, 1000)),
        "N1": (500, "smoke", None),
    }
    assert store.restore().flagged_here == {"H1"}
    assert store.restore(["cab-1"]).flagged_here == {"H1"}
    assert store.restore(["cab-2"]).flagged_here == frozenset()
    later = PassportOps()  # H1 leaves and comes back: its flag is from before this stay
    later.batteries["H1"] = (1000, "cab-1", 3, 7000, None, None)
    later.closed.append((6500, "H1", "cab-1", 3, 1000))
    later.opened.append(("H1", "cab-1", 3, 7000))
    store.apply(later)
    assert store.restore().flagged_here == frozenset()


def test_flags_and_clearances_are_announced_on_postgresql(pg_url: str) -> None:
    """The workers LISTEN on ``FLAGS_CHANNEL``: a flag written and a flag cleared NOTIFY it
    (at commit), a write without a flag does not."""
    import psycopg

    from ingest.passport_store import FLAGS_CHANNEL

    migrate.upgrade(pg_url)
    s = PassportStore.on_postgresql(pg_url)
    try:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f"LISTEN {FLAGS_CHANNEL}")
            quiet = PassportOps()
            quiet.batteries["N1"] = (1000, None, None, None, 20.0, None)
            s.apply(quiet)
            flag = PassportOps()
            flag.batteries["N1"] = (1000, None, None, None, 90.0, None)
            flag.flags.append((2000, "temperature_high", "N1"))
            s.apply(flag)
            assert s.clear("N1", 3000, "k1", "ops", "checked")
            heard = [n.payload for n in conn.notifies(timeout=0.5)]
        assert heard == ["N1", "N1"]
    finally:
        s.close()
