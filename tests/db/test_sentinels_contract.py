"""Riders, their reports and points (api.sentinels.SentinelStore) give the same answers on
both engines."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from api.sentinels import Conflict, NotFound, RiderRefused, SentinelStore
from devices.rollup import RiderReport
from tests.db.engines import ENGINES, open_database


@pytest.fixture(params=ENGINES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SentinelStore]:
    s = SentinelStore(open_database(request, tmp_path))
    try:
        yield s
    finally:
        s.close()


def test_riders_register_and_are_checked(store: SentinelStore) -> None:
    rider, token = store.register("st-1", "闪电侠", 1000)
    assert store.check(token) == rider
    assert store.rider(rider.id) == rider
    assert store.rider("nope") is None
    with pytest.raises(RiderRefused, match="unknown"):
        store.check(token[:-2] + "xx")
    with pytest.raises(ValueError, match="phone"):
        store.register("st-1", "138 0013 8000", 1000)


def test_reports_outcomes_and_points_once_per_incident(store: SentinelStore) -> None:
    rider, _ = store.register("st-1", "ann", 1000)
    first = store.add_report(rider.id, "st-1", "pile-1", 2, "port", "smoke", "smells", 41, 2000)
    assert (first.outcome, first.points, first.rider_id) == ("pending", 0, rider.id)
    second = store.add_report(rider.id, "st-1", "pile-1", 2, "port", "smoke", "again", 41, 2500)
    anon = store.add_report(None, "st-2", None, None, None, "broken", "", 50, 3000)
    assert first.id < second.id < anon.id
    done = store.decide(first.id, "confirmed", 4000, confirmed_by_alert=77, points=10)
    assert (done.outcome, done.points, done.confirmed_by_alert, done.decided_by) == (
        "confirmed", 10, 77, "chargewatch")  # fmt: skip
    assert type(done.points) is int, "PostgreSQL's sum is a Decimal: the audit log refused it"
    dup = store.decide(second.id, "confirmed", 4100, actor="ops", role="maintainer", points=10)
    assert (dup.points, dup.duplicate_of, dup.no_points) == (0, first.id, "duplicate")
    with pytest.raises(Conflict):
        store.decide(first.id, "rejected", 4200)
    with pytest.raises(NotFound):
        store.decide(999, "rejected", 4200)
    assert store.decide(anon.id, "expired", 4300).outcome == "expired"
    assert store.balance(rider.id) == 10
    (award,) = store.ledger(rider.id)
    assert (award.reason, award.incident_id, award.alert_id) == ("confirmed_by_telemetry", 77, 41)
    back = store.reverse(award.id, "wrong station", 5000, "boss", "admin")
    assert (back.delta, back.reverses, back.note) == (-10, award.id, "wrong station")
    with pytest.raises(Conflict, match="already"):
        store.reverse(award.id, "again", 5001, "boss", "admin")
    with pytest.raises(Conflict, match="itself"):
        store.reverse(back.id, "again", 5001, "boss", "admin")
    assert store.balance(rider.id) == 0
    entry = store.entry(award.id)
    assert entry is not None
    assert entry.reversed_by == back.id
    assert [e.id for e in store.ledger(rider.id)] == [back.id, award.id]
    assert [e.id for e in store.ledger(rider.id, before_id=back.id)] == [award.id]
    assert store.report(first.id) is not None
    assert store.report(first.id).points == 0  # type: ignore[union-attr]

    assert [r.id for r in store.reports()] == [anon.id, second.id, first.id]
    assert [r.id for r in store.reports(rider_id=rider.id, limit=1)] == [second.id]
    assert [r.id for r in store.reports(outcome="expired")] == [anon.id]
    assert [r.id for r in store.reports(station_id="st-1", before_id=second.id)] == [first.id]
    assert [r.id for r in store.made_between(2000, 3000)] == [first.id, second.id]
    assert store.reports_made(2500, 3001) == [
        RiderReport("st-1", "pile-1", "smoke", 2500), RiderReport("st-2", None, "broken", 3000)]  # fmt: skip


def test_a_known_incident_earns_nothing(store: SentinelStore) -> None:
    rider, _ = store.register("st-1", "bob", 1000)
    r = store.add_report(rider.id, "st-1", None, None, None, "smoke", "", 41, 2000)
    done = store.decide(r.id, "confirmed", 3000, points=10, known=True)
    assert (done.no_points, done.points, store.balance(rider.id)) == ("known", 0, 0)
