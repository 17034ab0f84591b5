"""Webhook subscriptions managed from API replicas (issue 13) and followed by every worker.

A replica lists, adds and removes subscriptions in PostgreSQL with serve's routes, and the
alert store NOTIFYs ``WEBHOOKS_CHANNEL``; each worker's notifier (``WorkerAlerts``) LISTENs
and starts or stops the subscription's delivery lanes, with a periodic reload as the
safety net. Real PostgreSQL, real ``WorkerAlerts`` as ``chargewatch ingest`` runs them, a
replica with the real app over httpx's ASGI transport, a real HTTP receiver; serve is the
in-process app over a real ``Ingest`` (SQLite, or PostgreSQL as ``serve --db``), for the
JSON the replica must equal. No mocks.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, insert, text

from devices.catalog import Catalog
from ingest.alerts.config import AlertsConfig, WebhookOptions
from ingest.alerts.ids import IdPool
from ingest.alerts.notify import Notifier, Subscription
from ingest.alerts.store import WEBHOOKS_CHANNEL, AlertStore
from ingest.config import IngestConfig
from ingest.db import migrate
from ingest.db.schema import webhooks as webhooks_table
from ingest.worker_alerts import WorkerAlerts
from tests.alerts.helpers import eventually
from tests.alerts.receiver import receiver
from tests.alerts.test_formats import make_alert
from tests.api.injected import service
from tests.replica.test_replica import seeded
from tests.replica.test_replica_alerts import bearer, maintainer_token, replica

pytestmark = pytest.mark.e2e

FAST = AlertsConfig(
    webhooks=WebhookOptions(backoff_s=0.05, backoff_max_s=0.2, timeout_s=2),
)
LEASE_S = 1.0
SECRET = "a-long-enough-secret"


@asynccontextmanager
async def workers(
    url: str, catalog: Catalog, n: int = 2, **options: Any
) -> AsyncIterator[list[WorkerAlerts]]:
    """``n`` workers' alerts on one database, as ``chargewatch ingest`` runs them."""
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                WorkerAlerts(url, catalog, FAST, claim_lease_s=LEASE_S, **options)
            )
            for _ in range(n)
        ]


async def followed_within(
    alerts: list[WorkerAlerts], webhook_id: int, present: bool, within_s: float
) -> float:
    """Seconds until every worker's notifier has (or no longer has) the subscription."""
    start = time.monotonic()

    def holds() -> None:
        for a in alerts:
            assert (webhook_id in a.notifier.subscriptions) is present
            assert (f"webhook:{webhook_id}:fresh" in a.notifier.task_names) is present

    await eventually(holds, within_s=within_s)
    return time.monotonic() - start


async def test_added_on_a_replica_every_worker_follows_and_delivers_once_then_removed(
    pg_url: str, tmp_path: Path
) -> None:
    catalog = seeded(pg_url)
    admin = bearer(maintainer_token(pg_url, "ops-lead", "admin"))
    with receiver() as hook:
        async with (
            workers(pg_url, catalog, reload_s=3600) as (a, b),  # the NOTIFY, not the reload
            replica(pg_url, tmp_path, "r") as (_, http, _),
        ):
            r = await http.post(
                "/v1/webhooks", headers=admin, json={"url": hook.url, "secret": SECRET}
            )
            assert r.status_code == 201, r.text
            webhook_id = r.json()["id"]
            assert r.json()["secret"] == SECRET
            took = await followed_within([a, b], webhook_id, True, within_s=1.0)
            print(f"\nboth workers follow the new subscription after {took * 1000:.0f} ms")

            assert b.notifier.publish("opened", make_alert(id=1)) == 1  # on any worker
            assert a.notifier.publish("opened", make_alert(id=2)) == 1

            def two() -> None:
                assert len(hook.delivered()) >= 2

            await eventually(two, within_s=5)
            await asyncio.sleep(0.3)  # nothing more comes
            assert collections.Counter(i for _, i in hook.events()) == {1: 1, 2: 1}
            assert all(r.signature_ok(SECRET) for r in hook.delivered())

            r = await http.delete(f"/v1/webhooks/{webhook_id}", headers=admin)
            assert r.status_code == 204, r.text
            await followed_within([a, b], webhook_id, False, within_s=1.0)
            assert a.notifier.publish("resolved", make_alert(id=1)) == 0
            assert b.notifier.publish("opened", make_alert(id=3)) == 0
            await asyncio.sleep(0.3)
            assert len(hook.requests) == 2
            r = await http.get("/v1/webhooks", headers=admin)
            assert r.json() == {"webhooks": [], "failing": []}


async def test_the_listed_counts_are_every_workers_and_failing_counts_their_failures(
    pg_url: str, tmp_path: Path
) -> None:
    """Two workers deliver to one subscription: the replica lists the sum of their counts
    (each saves its increments; a record saved whole would keep only the last saver's).
    Three refusals in a row, two by one worker and one by the other, mark it failing (the
    receiver's health, not a worker's); a success on either clears the mark."""
    catalog = seeded(pg_url)
    admin = bearer(maintainer_token(pg_url, "ops-lead", "admin"))
    with receiver() as hook:
        async with (
            workers(pg_url, catalog, reload_s=3600) as (a, b),
            replica(pg_url, tmp_path, "r") as (_, http, _),
        ):
            r = await http.post("/v1/webhooks", headers=admin, json={"url": hook.url})
            webhook_id = r.json()["id"]
            await followed_within([a, b], webhook_id, True, within_s=1.0)

            async def published(*on: tuple[WorkerAlerts, int]) -> dict[str, Any]:
                for worker, alert_id in on:
                    assert worker.notifier.publish("opened", make_alert(id=alert_id)) == 1
                    async with asyncio.timeout(5):  # answered and saved
                        await worker.notifier.idle()
                [listed] = (await http.get("/v1/webhooks", headers=admin)).json()["webhooks"]
                return dict(listed)

            listed = await published((a, 1), (b, 2), (a, 3), (b, 4), (a, 5))
            assert (listed["delivered"], listed["failed"], listed["failing"]) == (5, 0, False)
            assert a.notifier.subscriptions[webhook_id].delivered == 3  # its own count

            hook.answer = 410  # refused: failed at once, no retry
            listed = await published((a, 6), (b, 7))
            assert (listed["delivered"], listed["failed"]) == (5, 2)
            assert (listed["consecutive_failures"], listed["failing"]) == (2, False)
            listed = await published((a, 8))
            assert (listed["failed"], listed["consecutive_failures"]) == (3, 3)
            assert listed["failing"] is True
            assert listed["last_error"] == "HTTP 410"
            r = await http.get("/v1/webhooks", headers=admin)
            assert r.json()["failing"] == [webhook_id]
            assert not b.notifier.subscriptions[webhook_id].failing  # it saw one of them

            hook.answer = 200
            listed = await published((b, 9))
            assert (listed["delivered"], listed["failed"]) == (6, 3)
            assert (listed["consecutive_failures"], listed["failing"]) == (0, False)
            assert listed["last_success_at"] is not None
    assert len(hook.requests) == 9


async def test_a_removal_drops_what_waits_for_a_retry_as_serve_does(
    pg_url: str, tmp_path: Path
) -> None:
    catalog = seeded(pg_url)
    admin = bearer(maintainer_token(pg_url, "ops-lead", "admin"))
    with receiver() as hook:
        hook.down_for(60)
        async with (
            workers(pg_url, catalog, n=1, reload_s=3600) as (a,),
            replica(pg_url, tmp_path, "r") as (_, http, _),
        ):
            body = {"url": hook.url, "name": "夜班 night shift"}
            r = await http.post("/v1/webhooks", headers=admin, json=body)
            webhook_id = r.json()["id"]
            await followed_within([a], webhook_id, True, within_s=1.0)
            assert a.notifier.publish("opened", make_alert(id=7)) == 1

            def retried() -> None:
                assert len(hook.requests) >= 2
                assert a.store.deliveries(7)[0]["attempts"] >= 1

            await eventually(retried, within_s=5)
            # the replica lists what waits in the worker's outbox, as serve lists its own
            [listed] = (await http.get("/v1/webhooks", headers=admin)).json()["webhooks"]
            assert (listed["id"], listed["pending"]) == (webhook_id, 1)
            r = await http.get("/v1/notifications?state=pending", headers=admin)
            assert r.status_code == 200, r.text
            [waiting] = r.json()["notifications"]
            assert r.json()["pending"] == 1
            assert waiting["subscription"] == {"id": webhook_id, "name": "夜班 night shift"}
            assert (waiting["alert_id"], waiting["state"]) == (7, "pending")
            assert waiting["next_try_at"] is not None

            r = await http.delete(f"/v1/webhooks/{webhook_id}", headers=admin)
            assert r.status_code == 204
            await followed_within([a], webhook_id, False, within_s=1.0)

            def dropped() -> None:
                [row] = a.store.deliveries(7)
                assert (row["status"], row["error"]) == ("dropped", "subscription removed")

            await eventually(dropped, within_s=3)
            tried = len(hook.requests)
            await asyncio.sleep(0.5)  # retries were due every 0.2 s at most: none comes
            assert len(hook.requests) == tried
            assert a.notifier.pending_count == 0
            r = await http.get("/v1/notifications", headers=admin)
            assert r.json()["pending"] == 0
            [gone] = r.json()["notifications"]
            assert (gone["id"], gone["state"]) == (waiting["id"], "dropped")
            assert gone["last_error"] == "subscription removed"
            assert gone["subscription"] == {"id": webhook_id, "name": None}  # as serve's


async def test_the_periodic_reload_catches_a_change_whose_notice_was_missed(
    pg_url: str,
) -> None:
    catalog = seeded(pg_url)
    engine = migrate.connect(pg_url)
    record = Subscription(id=0, url="http://127.0.0.1:9/hook", secret="s", created_at_ms=1)
    try:
        async with workers(pg_url, catalog, n=1, reload_s=0.3) as (a,):
            for _ in range(2):  # the second: long after the read at (re)connection
                with engine.begin() as conn:  # written behind the store's back: no NOTIFY
                    webhook_id = conn.execute(
                        insert(webhooks_table)
                        .values(record=json.dumps(record.record()))
                        .returning(webhooks_table.c.id)
                    ).scalar_one()
                await followed_within([a], webhook_id, True, within_s=2.0)
                with engine.begin() as conn:
                    conn.execute(delete(webhooks_table).where(webhooks_table.c.id == webhook_id))
                await followed_within([a], webhook_id, False, within_s=2.0)
    finally:
        engine.dispose()


async def test_a_lost_listen_connection_is_made_again_and_what_changed_meanwhile_read(
    pg_url: str,
) -> None:
    catalog = seeded(pg_url)
    engine = migrate.connect(pg_url)
    store = AlertStore.on_postgresql(pg_url)
    listening = text(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND query = :listen AND pid <> pg_backend_pid()"
    )

    def listener() -> int:
        with engine.connect() as conn:
            pids = conn.execute(listening, {"listen": f"LISTEN {WEBHOOKS_CHANNEL}"}).all()
        assert len(pids) == 1, pids
        return int(pids[0][0])

    try:
        async with workers(pg_url, catalog, n=1, reload_s=3600) as (a,):  # no reload
            first = await eventually(listener, within_s=3)
            with engine.begin() as conn:
                conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
            # added while nobody listens (the follower waits at least 0.25 s to reconnect)
            sub = Subscription(id=0, url="http://127.0.0.1:9/hook", secret="s", created_at_ms=1)
            webhook_id = store.add_webhook(sub.record())
            await followed_within([a], webhook_id, True, within_s=3.0)
            assert await eventually(listener, within_s=3) != first
    finally:
        store.close()
        engine.dispose()


async def test_a_delivery_taken_over_for_a_subscription_not_heard_of_yet_is_sent(
    pg_url: str,
) -> None:
    """A worker that claims a dead worker's delivery of a subscription it does not know
    (its notice not arrived yet) reads the subscriptions again: it sends it, never drops it
    as removed."""
    migrate.upgrade(pg_url)
    a_store, b_store = AlertStore.on_postgresql(pg_url), AlertStore.on_postgresql(pg_url)

    def claiming(store: AlertStore) -> Notifier:
        return Notifier(
            store,
            FAST.webhooks,
            claim_lease_s=LEASE_S,
            ids=IdPool(lambda n: store.reserve_ids("delivery", n), block=4),
        )

    try:
        with receiver() as hook:
            hook.down_for(60)
            async with claiming(b_store) as late:  # started before the subscription
                sub = Subscription(id=0, url=hook.url, secret="s", created_at_ms=1)
                webhook_id = b_store.add_webhook(sub.record())
                async with claiming(a_store) as first:
                    assert first.publish("opened", make_alert(id=5)) == 1

                    def tried() -> None:
                        assert len(hook.requests) >= 1

                    await eventually(tried, within_s=5)
                # ``first`` died with the delivery pending under its claim
                assert webhook_id not in late.subscriptions
                hook.down_for(0)

                def sent() -> None:
                    assert hook.events() == [("opened", 5)]

                await eventually(sent, within_s=5 * LEASE_S)
                assert webhook_id in late.subscriptions
                assert late.taken_over == 1
                async with asyncio.timeout(5):
                    await late.idle()  # the answer handled and saved
        [row] = a_store.deliveries(5)
        assert row["status"] == "delivered"
    finally:
        a_store.close()
        b_store.close()


# -- the replica answers as serve does ------------------------------------------------------


def _comparable(body: Any) -> Any:
    """An answer with what differs by nature (ids, creation times, generated secrets)
    named, not valued."""
    if isinstance(body, list):
        return [_comparable(x) for x in body]
    if not isinstance(body, dict):
        return body
    found = {}
    for key, value in body.items():
        if key in ("id", "created_at") and value is not None:
            found[key] = f"<{key}>"
        elif key == "secret" and value != SECRET:
            found[key] = "<generated>"
        elif key == "failing" and isinstance(value, list):
            found[key] = ["<id>" for _ in value]
        else:
            found[key] = _comparable(value)
    return found


async def _session(http: httpx.AsyncClient, admin: dict[str, str]) -> list[tuple[int, Any]]:
    """One admin's session on the webhook routes: every answer (status, JSON)."""
    answers: list[tuple[int, Any]] = []

    async def note(r: httpx.Response) -> httpx.Response:
        answers.append((r.status_code, r.json() if r.content else None))
        return r

    await note(await http.get("/v1/webhooks", headers=admin))
    first = await note(
        await http.post(
            "/v1/webhooks",
            headers=admin,
            json={
                "url": "https://oapi.dingtalk.com/robot/send?access_token=T0KEN",
                "name": "夜班 night shift",
                "secret": SECRET,
                "format": "dingtalk",
                "severities": ["critical", "major"],
                "stations": ["yungu-road"],
                "rules": ["fault"],
                "events": ["opened", "escalated"],
                "language": "en",
            },
        )
    )
    second = await note(
        await http.post("/v1/webhooks", headers=admin, json={"url": "http://127.0.0.1:9/h"})
    )
    assert len(second.json()["secret"]) >= 32  # generated, shown this once
    await note(await http.get("/v1/webhooks", headers=admin))
    for bad in (
        {"url": "not a url"},
        {"url": "http://127.0.0.1:9/h", "secret": "short"},
        {"url": "http://127.0.0.1:9/h", "format": "telegram"},
        {"url": "http://127.0.0.1:9/h", "language": "fr"},
        {"url": "http://127.0.0.1:9/h", "severities": ["loud"]},
    ):
        await note(await http.post("/v1/webhooks", headers=admin, json=bad))
    await note(await http.delete(f"/v1/webhooks/{first.json()['id']}", headers=admin))
    await note(await http.delete(f"/v1/webhooks/{first.json()['id']}", headers=admin))
    await note(await http.delete("/v1/webhooks/0", headers=admin))
    await note(await http.get("/v1/webhooks", headers=admin))
    await note(await http.get("/v1/webhooks", headers={}))
    return answers


@pytest.mark.parametrize("serve_db", ["sqlite", "postgresql"])
async def test_the_replica_answers_the_webhook_routes_as_serve(
    pg_url: str, tmp_path: Path, serve_db: str, request: pytest.FixtureRequest
) -> None:
    seeded(pg_url)
    async with replica(pg_url, tmp_path, "r") as (_, http, _):
        admin = bearer(maintainer_token(pg_url, "ops-lead", "admin"))
        on_replica = await _session(http, admin)
    config = IngestConfig()
    if serve_db == "postgresql":  # `serve --db postgresql://`, on a database of its own
        pg = request.getfixturevalue("pg_session")
        serve_url = pg.create_database(f"t_serve_webhooks_{uuid.uuid4().hex[:8]}")
        migrate.upgrade(serve_url)
        config = IngestConfig(db=serve_url)
    async with service(tmp_path / "serve", config) as serve:
        on_serve = await _session(serve.http, bearer(serve.key("admin", "ops-lead")))
    if config.db is not None:  # serve's subscriptions were PostgreSQL's
        store = AlertStore.on_postgresql(config.db)
        try:
            assert [r["url"] for _, r in store.webhooks()] == ["http://127.0.0.1:9/h"]
        finally:
            store.close()
    assert [status for status, _ in on_replica] == [
        200, 201, 201, 200, 422, 422, 422, 422, 422, 204, 404, 422, 200, 401,
    ]  # fmt: skip
    listed = on_replica[3][1]["webhooks"]
    assert [set(w) & {"secret"} for w in listed] == [set(), set()]  # never echoed back
    assert listed[0]["url"] == "https://oapi.dingtalk.com/robot/send?access_token=T0KEN"
    for (status, body), (serve_status, serve_body) in zip(on_replica, on_serve, strict=True):
        assert (status, _comparable(body)) == (serve_status, _comparable(serve_body))
