"""Webhook delivery through receiver outages, against a real HTTP receiver (a thread on a
loopback port) and the real SQLite alert store: retries go on with backoff until the
deadline, a delivery in its retry wait never holds back later ones, the outbox survives a
restart, and sending never waits for the store (held by another process here)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ingest.alerts.config import WebhookOptions
from ingest.alerts.notify import SAVER, Notifier, Subscription
from ingest.alerts.store import DB_FILE, AlertStore, WebhookCounts
from ingest.sqlite_db import SQLiteDB
from tests.alerts.helpers import eventually
from tests.alerts.receiver import Receiver, receiver
from tests.alerts.test_formats import make_alert

FAST: dict[str, Any] = {"backoff_s": 0.05, "backoff_max_s": 0.2, "timeout_s": 2}


def ids(hook: Receiver) -> list[int]:
    """Alert ids of the notifications the receiver took (answered 200), in arrival order."""
    return [r.json["alert"]["id"] for r in hook.delivered()]


def _eq(a: object, b: object) -> None:
    assert a == b, (a, b)


async def test_a_delivery_outlives_an_outage_longer_than_the_old_attempts(tmp_path: Path) -> None:
    """Down for 2 s: six attempts at this backoff used to be spent in under a second, and the
    notification was dropped. Now it is retried until the receiver is back, once delivered."""
    store = AlertStore.in_dir(tmp_path)
    try:
        with receiver() as hook:
            async with Notifier(store, WebhookOptions(**FAST)) as notifier:
                sub = await notifier.add(hook.url, secret="outage-secret")
                hook.down_for(2.0)
                assert notifier.publish("opened", make_alert(id=1)) == 1
                await asyncio.wait_for(notifier.idle(), 10)
            assert ids(hook) == [1]
            assert len(hook.requests) > 6  # more than the old attempts
            assert len({r.headers["x-chargewatch-delivery"] for r in hook.requests}) == 1
            assert (sub.delivered, sub.failed) == (1, 0)
        [row] = store.deliveries(1)
        assert (row["status"], row["attempts"]) == ("delivered", len(hook.requests))
    finally:
        store.close()


async def test_the_deadline_marks_a_delivery_expired_never_silently_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = AlertStore.in_dir(tmp_path)
    try:
        with receiver() as hook:
            hook.down_for(600)
            options = WebhookOptions(**FAST, deadline_s=1.5)
            async with Notifier(store, options) as notifier:
                sub = await notifier.add(hook.url, name="ops room")
                started = time.monotonic()
                assert notifier.publish("opened", make_alert(id=7)) == 1

                def retrying() -> dict[str, Any]:
                    [pending] = notifier.pending()
                    assert pending["attempts"] >= 2
                    return pending

                pending = await eventually(retrying)
                assert (pending["alert_id"], pending["state"]) == (7, "pending")
                assert pending["last_error"] == "HTTP 500"
                assert pending["subscription"] == {"id": sub.id, "name": "ops room"}
                assert pending["next_try_at"] is not None
                assert pending["deadline"] > pending["created_at"]
                await asyncio.wait_for(notifier.idle(), 10)
                assert time.monotonic() - started >= 1.5
                assert notifier.pending() == []
                assert (sub.failed, sub.expired, sub.delivered) == (1, 1, 0)
                [said] = [
                    r
                    for r in caplog.records
                    if r.levelno >= logging.WARNING and "expired" in r.message
                ]
                assert "alert 7" in said.message
        [row] = store.deliveries(7)
        assert row["status"] == "expired"
        assert row["attempts"] == len(hook.requests) > 2
        assert "HTTP 500" in row["error"]
        assert row["finished_at_ms"] - row["created_at_ms"] >= 1500
    finally:
        store.close()


async def test_a_later_notification_is_not_held_behind_an_earlier_ones_backoff(
    tmp_path: Path,
) -> None:
    """A fails and waits 2.5-5 s for its retry; B, published meanwhile, is tried at once.
    When the receiver is back, the first success sends the waiting ones at once too, oldest
    first, instead of each waiting out its own backoff."""
    store = AlertStore.in_dir(tmp_path)
    options = WebhookOptions(backoff_s=5, backoff_max_s=5, timeout_s=2)
    try:
        with receiver() as hook:
            hook.down_for(600)
            async with Notifier(store, options) as notifier:
                await notifier.add(hook.url)
                notifier.publish("opened", make_alert(id=1))
                await eventually(lambda: _eq(len(hook.requests), 1))
                published_b = time.monotonic()
                notifier.publish("opened", make_alert(id=2))
                await eventually(lambda: _eq(len(hook.requests), 2), within_s=1.5)
                b = hook.requests[1]
                assert (b.json["alert"]["id"], b.status) == (2, 500)
                assert b.at - published_b < 1.5  # A's retry is >= 2.5 s after its attempt

                hook.down_for(0)  # back
                back = time.monotonic()
                notifier.publish("opened", make_alert(id=3))
                await eventually(lambda: _eq(sorted(ids(hook)), [1, 2, 3]), within_s=2)
                assert time.monotonic() - back < 2  # not after A's and B's backoff
                assert ids(hook) == [3, 1, 2]  # the fresh one, then the backlog in order
                await asyncio.wait_for(notifier.idle(), 5)
    finally:
        store.close()


async def test_a_receiver_that_never_answers_does_not_queue_new_notifications_behind_timeouts(
    tmp_path: Path,
) -> None:
    """A black hole (connections taken, no answer): each attempt ends only at the 2 s
    timeout. Of three notifications raised together, the next starts its first attempt
    when the one before has been unanswered for 1 s, not one timeout after another (the
    third at >= 4 s)."""
    store = AlertStore.in_dir(tmp_path)
    try:
        with receiver() as hook:
            hook.hang_until = time.monotonic() + 600
            async with Notifier(store, WebhookOptions(backoff_s=5, timeout_s=2)) as notifier:
                await notifier.add(hook.url)
                published = time.monotonic()
                for alert_id in (1, 2, 3):
                    notifier.publish("opened", make_alert(id=alert_id))
                await eventually(lambda: _eq(len(hook.requests), 3), within_s=3.8)
                assert [r.json["alert"]["id"] for r in hook.requests] == [1, 2, 3]
                assert hook.requests[-1].at - published < 3.2  # one timeout after another: 4
                hook.hang_until = 0  # back: everything arrives, once
                await eventually(lambda: _eq(sorted(ids(hook)), [1, 2, 3]), within_s=15)
                await asyncio.wait_for(notifier.idle(), 5)
    finally:
        store.close()


async def test_after_an_outage_every_notification_arrives_once_per_subscription(
    tmp_path: Path,
) -> None:
    store = AlertStore.in_dir(tmp_path)
    try:
        with receiver() as down, receiver() as up:
            async with Notifier(store, WebhookOptions(**FAST)) as notifier:
                await notifier.add(down.url)
                await notifier.add(up.url)
                notifier.publish("opened", make_alert(id=1))
                await eventually(lambda: _eq(ids(up), [1]))
                down.down_for(1.0)
                for alert_id in (2, 3, 4, 5):
                    notifier.publish("opened", make_alert(id=alert_id))
                    await asyncio.sleep(0.1)  # spread over the outage
                await asyncio.wait_for(notifier.idle(), 10)
            assert ids(up) == [1, 2, 3, 4, 5]  # a healthy receiver: in order
            assert sorted(ids(down)) == [1, 2, 3, 4, 5]
            assert any(r.status == 500 for r in down.requests)  # the outage was seen
            for hook in (down, up):
                took = Counter(r.headers["x-chargewatch-delivery"] for r in hook.delivered())
                assert set(took.values()) == {1}, took
        assert Counter(d["status"] for d in store.deliveries()) == {"delivered": 10}
    finally:
        store.close()


async def test_pending_deliveries_resume_after_a_restart_with_the_same_id(tmp_path: Path) -> None:
    store = AlertStore.in_dir(tmp_path)
    try:
        with receiver() as hook:
            hook.down_for(600)
            async with Notifier(store, WebhookOptions(**FAST)) as notifier:
                await notifier.add(hook.url)
                notifier.publish("opened", make_alert(id=1))
                notifier.publish("resolved", make_alert(id=1, status="resolved"))

                def saved_with_progress() -> None:
                    rows = store.deliveries(status="pending")
                    assert [(r["event"], r["error"]) for r in rows] == [
                        ("opened", "HTTP 500"),
                        ("resolved", "HTTP 500"),
                    ]
                    assert all(r["attempts"] >= 1 and r["next_try_at_ms"] for r in rows)

                await eventually(saved_with_progress)
            first_ids = {r.headers["x-chargewatch-delivery"] for r in hook.requests}
            hook.down_for(0)
            async with Notifier(store, WebhookOptions(**FAST)) as notifier:
                await asyncio.wait_for(notifier.idle(), 5)
            assert [(r.json["event"]) for r in hook.delivered()] == ["opened", "resolved"]
            assert {r.headers["x-chargewatch-delivery"] for r in hook.delivered()} == first_ids
        assert [d["status"] for d in store.deliveries()] == ["delivered", "delivered"]
    finally:
        store.close()


async def test_serves_counts_and_health_survive_restarts(tmp_path: Path) -> None:
    """Serve's one notifier saves its counts as increments: after each restart it lists the
    same counts it had, goes on from them, and the store holds what it lists."""
    store = AlertStore.in_dir(tmp_path)
    options = WebhookOptions(**FAST, failing_after=2)

    async def sent(notifier: Notifier, alert_id: int) -> None:
        assert notifier.publish("opened", make_alert(id=alert_id)) == 1
        await asyncio.wait_for(notifier.idle(), 5)

    try:
        with receiver() as hook:
            async with Notifier(store, options) as notifier:
                sub = await notifier.add(hook.url)
                await sent(notifier, 1)
                await sent(notifier, 2)
                hook.answer = 410
                await sent(notifier, 3)
                before = sub.view()
            assert (before["delivered"], before["failed"], before["consecutive_failures"]) == (
                2, 1, 1,
            )  # fmt: skip
            async with Notifier(store, options) as notifier:
                again = notifier.subscriptions[sub.id]
                assert again.view() == before
                await sent(notifier, 4)
                assert (again.failed, again.consecutive_failures, again.failing) == (2, 2, True)
                before = again.view()
            async with Notifier(store, options) as notifier:
                again = notifier.subscriptions[sub.id]
                assert again.view() == before
                hook.answer = 200
                await sent(notifier, 5)
                after = again.view()
        assert (after["delivered"], after["failed"], after["failing"]) == (3, 2, False)
        [(webhook_id, record)] = store.webhooks()
        assert Subscription(id=webhook_id, **record).view() == after
    finally:
        store.close()


def test_the_counts_a_save_adds_are_those_since_the_last_save() -> None:
    """What a notifier counted since its last save (``counts_since``), also when a success
    or a failure comes within the same millisecond as the saved one."""
    saved = Subscription(id=1, url="u", secret="s", delivered=4, failed=1, consecutive_failures=2,
                         last_success_at_ms=100, last_failure_at_ms=200, last_error="HTTP 500")  # fmt: skip
    now = replace(saved, delivered=5, failed=2, dropped=1, consecutive_failures=1,
                  last_success_at_ms=300, last_failure_at_ms=310, last_error="HTTP 410")  # fmt: skip
    assert now.counts_since(saved, 3) == WebhookCounts(
        failing_after=3, delivered=1, failed=1, dropped=1, failures=1, success_at_ms=300,
        failure_at_ms=310, error="HTTP 410",
    )  # fmt: skip
    assert saved.counts_since(saved, 3) == WebhookCounts(failing_after=3)
    # a success, then a failure, in the saved ones' milliseconds: seen in the counts
    same_ms = replace(saved, consecutive_failures=1, delivered=5)
    assert same_ms.counts_since(saved, 3) == WebhookCounts(
        failing_after=3, delivered=1, failures=1, success_at_ms=100, failure_at_ms=200,
        error="HTTP 500",
    )  # fmt: skip
    again = replace(saved, consecutive_failures=3)  # one more failure in that millisecond
    assert again.counts_since(saved, 3) == WebhookCounts(
        failing_after=3, failures=1, failure_at_ms=200, error="HTTP 500"
    )


class SlowCountsStore(AlertStore):
    """The real SQLite store, whose saves of subscription counts wait for ``gate`` (a disk
    that stalls, at the moment we choose: not something a test can make a real one do)."""

    def __init__(self, path: Path) -> None:
        super().__init__(SQLiteDB(path))
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def save_outbox(self, deliveries: Any, webhooks: Any = (), **options: Any) -> None:
        if webhooks:
            self.waiting.set()
            assert self.gate.wait(10)
        super().save_outbox(deliveries, webhooks, **options)


async def test_a_stop_during_a_save_counts_nothing_twice(tmp_path: Path) -> None:
    """A stop cancels the saver while its write of the counts goes on in its thread: the
    stop waits for that write's outcome, so its last save does not add them again."""
    store = SlowCountsStore(tmp_path / DB_FILE)
    try:
        with receiver() as hook:
            notifier = Notifier(store, WebhookOptions(**FAST))
            await notifier.__aenter__()
            sub = await notifier.add(hook.url)
            notifier.publish("opened", make_alert(id=1))
            await eventually(lambda: _eq(sub.delivered, 1))
            await asyncio.to_thread(store.waiting.wait, 5)  # the counts' save is under way
            stop = asyncio.create_task(notifier.__aexit__(None, None, None))
            await eventually(lambda: _eq(SAVER in notifier.supervisor.names, False))
            store.gate.set()  # the write goes through after the saver was cancelled
            await asyncio.wait_for(stop, 10)
        [(_, record)] = store.webhooks()
        assert record["delivered"] == 1
        assert [r["status"] for r in store.deliveries()] == ["delivered"]
    finally:
        store.close()


@contextmanager
def write_locked(path: Path) -> Iterator[None]:
    """Another process holds the SQLite file's write lock (as a backup job or a stuck
    writer would) until the block ends."""
    code = (
        "import sqlite3, sys\n"
        f"db = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
        "db.execute('BEGIN IMMEDIATE')\n"
        "print('locked', flush=True)\n"
        "sys.stdin.readline()\n"
        "db.execute('ROLLBACK')\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "locked"
        yield
    finally:
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.close()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def saved_rows(data_dir: Path) -> int:
    """Delivery rows in the file, read on a connection of our own (WAL: never blocked by
    the writer; the store's own connection is busy waiting for the lock)."""
    db = sqlite3.connect(data_dir / DB_FILE)
    try:
        return int(db.execute("SELECT count(*) FROM deliveries").fetchone()[0])
    finally:
        db.close()


async def test_sending_never_waits_for_the_store(tmp_path: Path) -> None:
    """The alert store cannot write (busy timeout 10 s, then an error, for as long as the
    lock is held): notifications are sent at once anyway, and recorded when it can write."""
    store = AlertStore.in_dir(tmp_path)
    try:
        with receiver() as hook:
            async with Notifier(store, WebhookOptions(**FAST)) as notifier:
                sub = await notifier.add(hook.url)
                with write_locked(tmp_path / DB_FILE):
                    published = time.monotonic()
                    notifier.publish("opened", make_alert(id=1))
                    notifier.publish("opened", make_alert(id=2))
                    await eventually(lambda: _eq(ids(hook), [1, 2]), within_s=3)
                    assert hook.delivered()[-1].at - published < 3
                    assert saved_rows(tmp_path) == 0  # nothing could be written yet
                    await eventually(lambda: _eq(sub.delivered, 2))  # the answers handled
                await asyncio.wait_for(notifier.idle(), 30)  # the outbox catches up
        rows = store.deliveries()
        assert [(r["alert_id"], r["status"], r["attempts"]) for r in rows] == [
            (1, "delivered", 1),
            (2, "delivered", 1),
        ]
        [(_, record)] = store.webhooks()  # the saves that failed counted on: none lost
        assert (record["delivered"], record["last_success_at_ms"]) == (2, sub.last_success_at_ms)
        assert {str(r["id"]) for r in rows} == {
            r.headers["x-chargewatch-delivery"] for r in hook.requests
        }
    finally:
        store.close()


async def test_a_store_file_of_the_previous_version_keeps_its_pending_deliveries(
    tmp_path: Path,
) -> None:
    """The deliveries table as the previous release wrote it (no retry columns), with one
    notification still pending: the store adds the columns, the notifier sends it."""
    old = sqlite3.connect(tmp_path / DB_FILE)
    old.executescript(
        """
        CREATE TABLE webhooks (id INTEGER PRIMARY KEY AUTOINCREMENT, record TEXT NOT NULL);
        CREATE TABLE deliveries (
            id INTEGER PRIMARY KEY AUTOINCREMENT, webhook_id INTEGER NOT NULL,
            alert_id INTEGER NOT NULL, event TEXT NOT NULL, status TEXT NOT NULL,
            attempts INTEGER NOT NULL, http_status INTEGER, error TEXT,
            created_at_ms INTEGER NOT NULL, finished_at_ms INTEGER, body TEXT NOT NULL
        );
        """
    )
    with receiver() as hook:
        old.execute(
            "INSERT INTO webhooks (record) VALUES (?)",
            (f'{{"url": "{hook.url}", "secret": "old-secret", "format": "json"}}',),
        )
        body = '{"event": "opened", "alert": {"id": 9}, "created_at": "2026-12-01T00:00:00Z"}'
        now_ms = time.time_ns() // 1_000_000
        old.execute(
            "INSERT INTO deliveries (webhook_id, alert_id, event, status, attempts,"
            " created_at_ms, body) VALUES (1, 9, 'opened', 'pending', 0, ?, ?)",
            (now_ms, body),
        )
        old.commit()
        old.close()
        store = AlertStore.in_dir(tmp_path)
        try:
            async with Notifier(store, WebhookOptions(**FAST)) as notifier:
                await asyncio.wait_for(notifier.idle(), 5)
            assert [r.headers["x-chargewatch-delivery"] for r in hook.delivered()] == ["1"]
            [row] = store.deliveries()
            assert (row["status"], row["attempts"]) == ("delivered", 1)
            assert row["deadline_at_ms"] == now_ms + 6 * 3600 * 1000
        finally:
            store.close()
