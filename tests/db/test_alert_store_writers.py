"""Several writers on one PostgreSQL database (ingest workers, issue 13): two AlertStores
claiming the delivery outbox at once never take the same delivery, the alert ids they
reserve never collide, and the subscription counts they save at once add up."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from ingest.alerts.notify import Subscription
from ingest.alerts.store import DELIVERY_COLUMNS, AlertStore, WebhookCounts
from ingest.db import migrate

T0 = 1_796_284_800_000
R = TypeVar("R")


@pytest.fixture
def two(pg_url: str) -> Iterator[tuple[AlertStore, AlertStore]]:
    migrate.upgrade(pg_url)
    a, b = AlertStore.on_postgresql(pg_url), AlertStore.on_postgresql(pg_url)
    yield a, b
    a.close()
    b.close()


def _together(calls: list[Callable[[], R]]) -> list[R]:
    """Run the calls in threads started at the same moment; their results in order."""
    start = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        start.wait(timeout=10)
        try:
            results[i] = calls[i]()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return results


def _pending(i: int) -> tuple[Any, ...]:
    row = {
        "id": i, "webhook_id": 1, "alert_id": i, "event": "opened", "status": "pending",
        "attempts": 0, "http_status": None, "error": None, "created_at_ms": T0,
        "finished_at_ms": None, "body": "{}", "next_try_at_ms": T0,
        "deadline_at_ms": T0 + 3_600_000, "last_attempt_at_ms": None,
    }  # fmt: skip
    return tuple(row[c] for c in DELIVERY_COLUMNS)


def test_two_stores_claiming_at_once_never_take_the_same_delivery(
    two: tuple[AlertStore, AlertStore],
) -> None:
    a, b = two
    n = 600
    a.save_outbox([_pending(i) for i in range(1, n + 1)])

    def drain(store: AlertStore) -> list[int]:
        taken: list[int] = []
        while batch := store.claim_deliveries(T0, lease_ms=600_000, limit=7):
            taken += [d["id"] for d in batch]
        return taken

    got_a, got_b = _together([lambda: drain(a), lambda: drain(b)])
    assert not set(got_a) & set(got_b)
    assert sorted(got_a + got_b) == list(range(1, n + 1))
    assert got_a  # both took part: the claims did run side by side
    assert got_b


def test_two_stores_reserving_alert_ids_at_once_get_distinct_ids(
    two: tuple[AlertStore, AlertStore],
) -> None:
    a, b = two

    def reserve(store: AlertStore) -> list[int]:
        return [i for _ in range(50) for i in store.reserve_alert_ids(5)]

    got_a, got_b = _together([lambda: reserve(a), lambda: reserve(b)])
    assert len(got_a) == len(got_b) == 250
    assert not set(got_a) & set(got_b)
    assert sorted(got_a + got_b) == list(range(1, 501))


def test_two_stores_saving_a_subscriptions_counts_at_once_lose_none(
    two: tuple[AlertStore, AlertStore],
) -> None:
    """Two workers' notifiers save their counts of one subscription at the same moments:
    each save adds to the record in its transaction, so none is lost (a record written
    whole by each would keep only the last writer's)."""
    a, b = two
    hook = a.add_webhook(Subscription(id=0, url="http://127.0.0.1:9/a", secret="s").record())
    n = 60

    def count(store: AlertStore, failed: int) -> None:
        for i in range(n):
            counts = WebhookCounts(
                delivered=1, failed=failed, success_at_ms=T0 + i, failing_after=3
            )
            store.save_outbox([], [(hook, counts)])

    _together([lambda: count(a, 0), lambda: count(b, 1)])
    [(_, record)] = a.webhooks()
    assert (record["delivered"], record["failed"]) == (2 * n, n)
    assert record["last_success_at_ms"] == T0 + n - 1
