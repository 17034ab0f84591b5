"""The alert store's contract (ingest.alerts.store), the same tests on the embedded SQLite
file and on PostgreSQL: alerts upserted with their events and notes in one transaction,
the event log trimmed, the journal deleted through an id; the filtered reads; webhooks and
the delivery outbox (the body written once)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from sqlalchemy import insert

from ingest.alerts.model import Alert, AlertQuery
from ingest.alerts.notify import Subscription
from ingest.alerts.store import (
    DELIVERY_COLUMNS,
    WEBHOOKS_CHANNEL,
    AlertStore,
    Ops,
    WebhookCounts,
    _alert_row,
)
from ingest.db import migrate
from ingest.db.schema import alerts, unobserved

T0 = 1_796_284_800_000  # 2026-12-03T08:00:00Z


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AlertStore]:
    if request.param == "sqlite":
        s = AlertStore.in_dir(tmp_path / "data")
    else:
        url = request.getfixturevalue("pg_url")
        migrate.upgrade(url)
        s = AlertStore.on_postgresql(url)
    yield s
    s.close()


def alert(i: int, **changes: Any) -> Alert:
    a = Alert(
        id=i, rule="fault", code=f"code{i % 2}", severity="major" if i % 2 else "critical",
        status="open", station_id=f"st-{i % 3}", device_id=f"P{i}", unit=i, unit_kind="port",
        opened_at_ms=T0 + i * 1000, last_seen_at_ms=T0 + i * 1000, notified=True,
    )  # fmt: skip
    for name, value in changes.items():
        setattr(a, name, value)
    return a


def ops_of(*alerts: Alert, **more: Any) -> Ops:
    return Ops(alerts={a.id: a.record() for a in alerts}, **more)


def test_alerts_events_and_notes_are_written_and_read_back(store: AlertStore) -> None:
    assert store.next_ids() == (1, 1)
    store.apply(
        ops_of(alert(1), alert(2), alert(3, status="resolved", resolved_at_ms=T0 + 9000),
               events=[(1, 1, "opened", T0, '{"a":1}'), (2, 2, "opened", T0, '{"a":2}')],
               notes=[(1, T0 + 5, "li", "console", "on my way")]),
        events_kept=100,
    )  # fmt: skip
    store.apply(ops_of(alert(1, status="acknowledged", acknowledged_by="li")), events_kept=100)
    assert store.next_ids() == (4, 3)
    got = store.get(1)
    assert got is not None
    assert (got.status, got.acknowledged_by, got.notified, got.suppressed) == (
        "acknowledged", "li", True, False,
    )  # fmt: skip
    assert store.get(99) is None
    assert [a.id for a in store.load_active()] == [1, 2]
    assert store.events_after(0) == [(1, "opened", '{"a":1}'), (2, "opened", '{"a":2}')]
    assert store.events_after(1, limit=5) == [(2, "opened", '{"a":2}')]
    assert store.events_after(0, limit=1) == [(1, "opened", '{"a":1}')]
    assert store.oldest_event_id() == 1
    [note] = store.notes(1)
    assert (note["author"], note["source"], note["text"], note["at_ms"]) == (
        "li", "console", "on my way", T0 + 5,
    )  # fmt: skip
    assert store.notes(2) == []


def test_the_event_log_is_trimmed_to_the_newest_kept(store: AlertStore) -> None:
    store.apply(ops_of(alert(1), events=[(i, 1, "x", T0, "{}") for i in range(1, 11)]), 100)
    store.apply(Ops(events=[(11, 1, "x", T0, "{}")]), events_kept=3)
    assert store.oldest_event_id() == 9
    assert [e[0] for e in store.events_after(0)] == [9, 10, 11]


def test_the_journal_is_deleted_through_the_id_with_the_changes(store: AlertStore) -> None:
    db = store._db
    db.transaction(
        [(insert(unobserved), [{"id": i, "device_id": "P1", "received_ms": T0 + i,
                                "payload": f"e{i}"} for i in (1, 2, 3)])]
    )  # fmt: skip
    assert [u[0] for u in store.unobserved()] == [1, 2, 3]
    store.apply(ops_of(alert(1), unobserved_through=2), events_kept=10)
    assert store.unobserved() == [(3, "P1", T0 + 3, "e3")]
    assert store.get(1) is not None


def test_queries_filter_and_page_newest_first(store: AlertStore) -> None:
    store.apply(
        ops_of(*(alert(i) for i in range(1, 10)), alert(10, status="resolved",
               resolved_at_ms=T0 + 99_000)),
        events_kept=10,
    )  # fmt: skip

    def ids(**q: Any) -> list[int]:
        return [a.id for a in store.query(AlertQuery(**q))]

    assert ids() == list(range(10, 0, -1))
    assert ids(limit=3) == [10, 9, 8]
    assert ids(before_id=8, limit=3) == [7, 6, 5]
    assert ids(status=("resolved",)) == [10]
    assert ids(status=("open", "open", "acknowledged")) == list(range(9, 0, -1))
    assert ids(severity=("critical",), station="st-1") == [10, 4]
    assert ids(device="P5") == [5]
    assert ids(rule="code1", limit=2) == [9, 7]
    assert ids(rule="fault", limit=2) == [10, 9]
    assert ids(since_ms=T0 + 8000) == [10, 9, 8]
    assert ids(since_ms=T0 + 50_000) == [10]  # resolved since
    timings = store.timings(T0 + 2000, T0 + 4000)
    assert [(t[0], t[1], t[2]) for t in timings] == [("st-2", "code0", T0 + 2000),
                                                    ("st-0", "code1", T0 + 3000)]  # fmt: skip


def delivery(i: int, **changes: Any) -> tuple[Any, ...]:
    row = {
        "id": i, "webhook_id": 1, "alert_id": 100 + i % 2, "event": "opened",
        "status": "pending", "attempts": 0, "http_status": None, "error": None,
        "created_at_ms": T0 + i, "finished_at_ms": None, "body": f'{{"n":{i}}}',
        "next_try_at_ms": T0 + i, "deadline_at_ms": T0 + 86_400_000, "last_attempt_at_ms": None,
    } | changes  # fmt: skip
    return tuple(row[c] for c in DELIVERY_COLUMNS)


def test_webhooks_and_the_outbox(store: AlertStore) -> None:
    first = store.add_webhook({"url": "http://127.0.0.1:9/a"})
    second = store.add_webhook({"url": "http://127.0.0.1:9/b"})
    assert second > first
    store.save_outbox([delivery(i) for i in (1, 2, 3)])
    store.save_outbox(
        [delivery(2, status="delivered", attempts=1, http_status=200, body="not written")],
        [(first, WebhookCounts(delivered=1, success_at_ms=T0, failing_after=3))],
    )
    assert store.webhooks() == [
        (
            first,
            {"url": "http://127.0.0.1:9/a", "delivered": 1, "failed": 0, "expired": 0,
             "dropped": 0, "consecutive_failures": 0, "failing": False, "last_error": None,
             "last_success_at_ms": T0, "last_failure_at_ms": None},
        ),
        (second, {"url": "http://127.0.0.1:9/b"}),
    ]  # fmt: skip
    assert store.max_delivery_id() == 3
    two = store.deliveries(101)
    assert [(d["id"], d["status"], d["attempts"], d["body"]) for d in two] == [
        (1, "pending", 0, '{"n":1}'), (3, "pending", 0, '{"n":3}'),
    ]  # fmt: skip
    [done] = store.deliveries(status="delivered")
    assert (done["id"], done["http_status"], done["body"]) == (2, 200, '{"n":2}')
    newest = store.deliveries(status=("pending", "delivered"), newest_first=True, limit=2)
    assert [d["id"] for d in newest] == [3, 2]
    assert store.pending_by_webhook() == {1: 2}  # 1 and 3 (delivery(): webhook 1)
    store.save_outbox([delivery(4, webhook_id=second), delivery(5, webhook_id=second)])
    assert store.pending_by_webhook() == {1: 2, second: 2}
    assert store.delete_webhook(second) is True
    assert store.delete_webhook(second) is False
    assert [w[0] for w in store.webhooks()] == [first]


def test_subscription_counts_saved_by_several_notifiers_add_up(store: AlertStore) -> None:
    """Each notifier (an ingest worker; serve has one) saves what it counted since its last
    save; the store adds it to the subscription's record in the save's transaction. Failed
    attempts in a row are those since the newest success of any of them, as their saves
    arrive; ``failing`` from that count."""
    sub = Subscription(id=0, url="http://127.0.0.1:9/a", secret="s", name="夜班", created_at_ms=T0)
    hook = store.add_webhook(sub.record())

    def save(**counts: Any) -> dict[str, Any]:
        store.save_outbox([], [(hook, WebhookCounts(failing_after=3, **counts))])
        [(_, record)] = store.webhooks()
        return record

    def expect(**changed: Any) -> dict[str, Any]:
        return sub.record() | changed

    a = save(delivered=3, success_at_ms=T0 + 10)
    assert a == expect(delivered=3, last_success_at_ms=T0 + 10)
    # the other notifier: two delivered before the first one's success, then a refusal
    b = save(
        delivered=2, failed=1, failures=1, success_at_ms=T0 + 5, failure_at_ms=T0 + 20,
        error="HTTP 410",
    )  # fmt: skip
    assert b == expect(
        delivered=5, failed=1, consecutive_failures=1, last_success_at_ms=T0 + 10,
        last_failure_at_ms=T0 + 20, last_error="HTTP 410",
    )  # fmt: skip
    a = save(failures=2, failure_at_ms=T0 + 30, error="HTTP 500", expired=1, failed=1)
    assert (a["consecutive_failures"], a["failing"], a["failed"], a["expired"]) == (3, True, 2, 1)
    assert (a["last_error"], a["last_failure_at_ms"]) == ("HTTP 500", T0 + 30)
    # a failure saved late (before the newest one): counted, the newest error stays
    b = save(failures=1, failure_at_ms=T0 + 25, error="timeout", dropped=2)
    assert (b["consecutive_failures"], b["failing"], b["dropped"]) == (4, True, 2)
    assert (b["last_error"], b["last_failure_at_ms"]) == ("HTTP 500", T0 + 30)
    # a success clears the mark; failures after it count from there
    a = save(delivered=1, success_at_ms=T0 + 40, failures=1, failure_at_ms=T0 + 41, error="x")
    assert (a["consecutive_failures"], a["failing"], a["last_success_at_ms"]) == (1, False, T0 + 40)
    # an older success saved late changes nothing of the health; its count adds up
    b = save(delivered=1, success_at_ms=T0 + 35)
    assert b == expect(
        delivered=7, failed=2, expired=1, dropped=2, consecutive_failures=1,
        last_success_at_ms=T0 + 40, last_failure_at_ms=T0 + 41, last_error="x",
    )  # fmt: skip
    assert b["failing"] is False
    # the failures of a window without a success add to those in a row
    b = save(failures=2, failure_at_ms=T0 + 50, error="HTTP 503")
    assert (b["consecutive_failures"], b["failing"], b["last_error"]) == (3, True, "HTTP 503")
    # a removed subscription: its late counts are nobody's
    assert store.delete_webhook(hook) is True
    store.save_outbox([], [(hook, WebhookCounts(delivered=1, failing_after=3))])
    assert store.webhooks() == []


def test_webhook_changes_are_announced_at_commit(pg_url: str) -> None:
    """PostgreSQL: each add and remove NOTIFYs ``WEBHOOKS_CHANNEL`` with the id (a remove
    of nothing, nothing); the workers' notifiers follow it (ingest.worker_alerts)."""
    migrate.upgrade(pg_url)
    store = AlertStore.on_postgresql(pg_url)
    try:
        with psycopg.connect(pg_url, autocommit=True) as listener:
            listener.execute(f"LISTEN {WEBHOOKS_CHANNEL}")
            added = store.add_webhook({"url": "http://127.0.0.1:9/a"})
            assert store.delete_webhook(added) is True
            assert store.delete_webhook(added) is False
            heard = [(n.channel, n.payload) for n in listener.notifies(timeout=0.5)]
        assert heard == [(WEBHOOKS_CHANNEL, str(added))] * 2
    finally:
        store.close()


def test_a_claim_takes_pending_deliveries_nobody_holds(store: AlertStore) -> None:
    store.save_outbox([delivery(i) for i in range(1, 6)] + [delivery(6, status="delivered")])
    assert [d["id"] for d in store.claim_deliveries(T0, lease_ms=60_000, limit=2)] == [1, 2]
    assert [d["id"] for d in store.claim_deliveries(T0, lease_ms=60_000)] == [3, 4, 5]
    assert store.claim_deliveries(T0 + 59_999, lease_ms=60_000) == []
    store.save_outbox([delivery(1, attempts=1)])  # a save keeps the claim
    assert store.claim_deliveries(T0 + 59_999, lease_ms=60_000) == []
    store.save_outbox([delivery(2, status="delivered", attempts=1)])
    taken = store.claim_deliveries(T0 + 60_000, lease_ms=60_000)  # the claims ran out
    assert [(d["id"], d["attempts"], d["body"]) for d in taken] == [
        (1, 1, '{"n":1}'), (3, 0, '{"n":3}'), (4, 0, '{"n":4}'), (5, 0, '{"n":5}'),
    ]  # fmt: skip


def test_alert_ids_are_reserved_increasing_from_one(store: AlertStore) -> None:
    first = store.reserve_alert_ids(3)
    assert first == [1, 2, 3]
    with pytest.raises(ValueError, match="1 to 10000"):
        store.reserve_alert_ids(0)


def test_postgresql_alert_ids_start_after_the_alerts_already_there(pg_url: str) -> None:
    """A database with alerts when the sequence is made (migration 0002) goes on after
    them."""
    engine = migrate.connect(pg_url)
    with engine.begin() as conn:
        cfg = migrate._config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(insert(alerts), [_alert_row(alert(7).record())])
    engine.dispose()
    migrate.upgrade(pg_url)
    store = AlertStore.on_postgresql(pg_url)
    try:
        assert store.reserve_alert_ids(2) == [8, 9]
        assert store.reserve_alert_ids(1) == [10]
    finally:
        store.close()
