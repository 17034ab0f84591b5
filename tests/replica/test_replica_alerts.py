"""Alerts and actions on API replicas (issue 13): alert reads from PostgreSQL, the SSE
stream fed by the alert store's NOTIFY, maintainers' actions queued for the worker that
owns the station (``ingest.actions``), and the API's own stores shared in PostgreSQL.

Real PostgreSQL, a real ``AlertEngine`` on ``AlertStore.on_postgresql`` as a worker runs it,
its ``ActionApplier``, and two replicas each with the real app over httpx's ASGI transport
(the SSE stream driven through the ASGI app itself: that transport buffers whole answers).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.app import ApiStores, create_app
from api.settings import ServeSettings
from devices.catalog import Catalog, Device
from devices.contract import decode
from ingest.actions import ActionApplier, ActionQueue
from ingest.alerts.config import AlertsConfig
from ingest.alerts.engine import AlertEngine
from ingest.alerts.order_store import WorkOrderStore
from ingest.alerts.orders import WorkOrders
from ingest.alerts.store import ALERTS_CHANNEL, AlertStore, Ops
from ingest.config import IngestConfig
from ingest.db.database import PgDatabase
from ingest.passport_store import PassportOps, PassportStore
from ingest.pg_store import PostgresStore
from ingest.pipeline import Twins
from ingest.readside import now_ms
from ingest.replica import ReplicaReadSide, as_read_and_act
from ingest.store import TwinRecord
from ingest.twins import Twin
from tests.alerts.helpers import eventually
from tests.replica.test_replica import STATION, a_pile, seeded

OTHER_STATION = "xinzhan-square"


@asynccontextmanager
async def worker_engine(url: str, catalog: Catalog) -> AsyncIterator[AlertEngine]:
    """A partition's alert engine on PostgreSQL, as a worker runs it (no timer noise)."""
    config = AlertsConfig(tick_s=3600)
    store = AlertStore.on_postgresql(url)
    try:
        async with AlertEngine(config, catalog, Twins(catalog, 0.9), store) as engine:
            yield engine
    finally:
        store.close()


@asynccontextmanager
async def applying(
    url: str, stations: list[str], engine: AlertEngine, orders: WorkOrders | None = None
) -> AsyncIterator[ActionApplier]:
    """The worker's applier for ``stations``, running."""
    async with ActionApplier(url, stations, alerts=engine, orders=orders, poll_s=0.5) as applier:
        task = asyncio.create_task(applier.run(), name="applier")
        try:
            yield applier
        finally:
            task.cancel()
            await asyncio.wait({task}, timeout=5)


@asynccontextmanager
async def replica(
    url: str, tmp_path: Path, name: str, **options: Any
) -> AsyncIterator[tuple[ReplicaReadSide, httpx.AsyncClient, Any]]:
    config = IngestConfig(data_dir=tmp_path / name)
    async with ReplicaReadSide(url, config, **options) as side:
        stores = pg_stores(url)
        try:
            app = create_app(*as_read_and_act(side), ServeSettings(), stores)
            transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
            async with httpx.AsyncClient(transport=transport, base_url=f"http://{name}") as http:
                yield side, http, app
        finally:
            stores.close()


def pg_stores(url: str) -> ApiStores:
    """The API's own stores in PostgreSQL, as ``chargewatch api`` opens them."""
    return ApiStores.on(lambda: PgDatabase(url, pool_size=2))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def maintainer_token(url: str, name: str = "li-wei", role: str = "maintainer") -> str:
    stores = pg_stores(url)
    try:
        _, token = stores.keys.create(name, role)
        return token
    finally:
        stores.close()


async def until(
    http: httpx.AsyncClient,
    path: str,
    token: str,
    holds: Callable[[Any], bool],
    within_s: float,
) -> float:
    """GET ``path`` until ``holds(json)``; the seconds it took (fails after ``within_s``)."""
    start = time.monotonic()
    while True:
        r = await http.get(path, headers=bearer(token))
        if r.status_code == 200 and holds(r.json()):
            return time.monotonic() - start
        assert time.monotonic() - start < within_s, f"{path} never held in {within_s} s: {r.text}"
        await asyncio.sleep(0.02)


async def test_an_alert_opened_by_a_worker_shows_on_two_replicas_within_a_second(
    pg_url: str, tmp_path: Path
) -> None:
    catalog = seeded(pg_url)
    token = maintainer_token(pg_url)
    async with (
        worker_engine(pg_url, catalog) as engine,
        replica(pg_url, tmp_path, "a") as (_, a, _),
        replica(pg_url, tmp_path, "b") as (_, b, _),
    ):
        pile = a_pile(catalog)
        alert, joined = await engine.report(STATION, pile.id, 1, "smoke", "smoke from port 1")
        assert not joined
        for http in (a, b):
            took = await until(
                http, f"/v1/alerts/{alert.id}", token, lambda body: True, within_s=1.0
            )
            assert took < 1.0
            listed = (await http.get("/v1/alerts", headers=bearer(token))).json()
            assert [x["id"] for x in listed["alerts"]] == [alert.id]
            notes = (await http.get(f"/v1/alerts/{alert.id}", headers=bearer(token))).json()
            assert "smoke from port 1" in json.dumps(notes)


async def test_acknowledging_on_one_replica_is_applied_by_the_worker_and_shows_on_the_other(
    pg_url: str, tmp_path: Path
) -> None:
    catalog = seeded(pg_url)
    token = maintainer_token(pg_url)
    async with (
        worker_engine(pg_url, catalog) as engine,
        applying(pg_url, [STATION], engine) as applier,
        replica(pg_url, tmp_path, "a") as (_, a, _),
        replica(pg_url, tmp_path, "b") as (_, b, _),
    ):
        alert, _ = await engine.report(STATION, a_pile(catalog).id, 1, "smoke", "smoke")
        start = time.monotonic()
        r = await a.post(
            f"/v1/alerts/{alert.id}/ack", headers=bearer(token), json={"note": "on my way"}
        )
        took_ack = time.monotonic() - start
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "acknowledged"
        assert took_ack < 1.0  # the NOTIFYs both ways, not the pollers
        # the worker's engine took it: its memory, the store, the applier's count
        assert engine.by_id[alert.id].status == "acknowledged"
        assert engine.by_id[alert.id].acknowledged_by == "li-wei"
        assert applier.applied == 1
        await until(
            b, f"/v1/alerts/{alert.id}", token,
            lambda body: body["status"] == "acknowledged"
            and "on my way" in json.dumps(body),
            within_s=1.0,
        )  # fmt: skip
        # resolve on b; a note on a resolved alert is still taken, a second resolve is 409
        r = await b.post(f"/v1/alerts/{alert.id}/resolve", headers=bearer(token), json={})
        assert r.status_code == 200, r.text
        assert alert.id not in engine.by_id
        r = await a.post(f"/v1/alerts/{alert.id}/resolve", headers=bearer(token), json={})
        assert r.status_code == 409, r.text
        assert "resolved" in r.json()["detail"]
        r = await a.post("/v1/alerts/999999/ack", headers=bearer(token), json={})
        assert r.status_code == 404, r.text


async def test_an_action_for_a_station_no_worker_owns_is_503_and_never_applied_later(
    pg_url: str, tmp_path: Path
) -> None:
    catalog = seeded(pg_url)
    token = maintainer_token(pg_url)
    async with (
        worker_engine(pg_url, catalog) as engine,
        replica(pg_url, tmp_path, "a", action_wait_s=0.5) as (_, a, _),
    ):
        alert, _ = await engine.report(STATION, a_pile(catalog).id, 1, "smoke", "smoke")
        # an applier runs, but for another station's partition only
        async with applying(pg_url, [OTHER_STATION], engine):
            start = time.monotonic()
            r = await a.post(f"/v1/alerts/{alert.id}/ack", headers=bearer(token), json={})
            assert time.monotonic() - start < 3.0
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "unavailable"
        assert "no ingest worker took the action" in r.json()["detail"]
        assert STATION in r.json()["detail"]
        metrics = (await a.get("/metrics")).text
        assert 'cw_replica_actions_total{outcome="unavailable"} 1.0' in metrics
        # the owner comes up afterwards: the refused action is not applied behind our back
        async with applying(pg_url, [STATION], engine) as applier:
            await applier.apply_pending()
            assert applier.applied == 0
        assert engine.by_id[alert.id].status == "open"


async def test_the_sse_stream_of_a_replica_sees_an_alert_opened_elsewhere(
    pg_url: str, tmp_path: Path
) -> None:
    catalog = seeded(pg_url)
    token = maintainer_token(pg_url)
    async with (
        worker_engine(pg_url, catalog) as engine,
        replica(pg_url, tmp_path, "a") as (side, _, app),
    ):
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "GET", "scheme": "http", "path": "/v1/alerts/stream", "raw_path": b"",
            "query_string": b"", "root_path": "", "server": ("replica", 80),
            "client": ("127.0.0.1", 50000),
            "headers": [(b"host", b"replica"), (b"authorization", f"Bearer {token}".encode())],
        }  # fmt: skip
        sent: list[dict[str, Any]] = []
        gone = asyncio.Event()

        async def receive() -> dict[str, Any]:
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        stream = asyncio.create_task(app(scope, receive, send), name="sse-client")
        try:

            def subscribed() -> None:
                assert len(side._subscribers) == 1

            await eventually(subscribed, within_s=5)
            start = time.monotonic()
            alert, _ = await engine.report(STATION, a_pile(catalog).id, 2, "fire", "flames")

            def heard() -> str:
                body = b"".join(m.get("body", b"") for m in sent if "body" in m).decode()
                assert f'"id":{alert.id}' in body, body
                return body

            body = await eventually(heard, within_s=2)
            assert time.monotonic() - start < 1.0
            assert "event: opened" in body
            assert sent[0]["status"] == 200
        finally:
            stream.cancel()
            await asyncio.wait({stream}, timeout=5)


async def test_a_key_created_through_one_replica_authenticates_on_the_other(
    pg_url: str, tmp_path: Path
) -> None:
    seeded(pg_url)
    admin = maintainer_token(pg_url, "ops", "admin")
    async with (
        replica(pg_url, tmp_path, "a") as (_, a, _),
        replica(pg_url, tmp_path, "b") as (_, b, _),
    ):
        r = await a.post("/v1/keys", headers=bearer(admin), json={"name": "zhang-min"})
        assert r.status_code == 201, r.text
        new = r.json()["token"]
        r = await b.get("/v1/alerts", headers=bearer(new))
        assert r.status_code == 200, r.text
        # its creation is in the one audit log, read through the other replica
        r = await b.get("/v1/audit", headers=bearer(admin))
        assert r.status_code == 200, r.text
        assert "key.create" in r.text
        # revoked on b: refused on a
        key_id = new.split("_")[1]
        assert (await b.delete(f"/v1/keys/{key_id}", headers=bearer(admin))).status_code == 204
        assert (await a.get("/v1/alerts", headers=bearer(new))).status_code == 401


async def test_alert_events_are_notified_at_the_stores_commit(pg_url: str) -> None:
    """The alert store's NOTIFY carries the batch's newest event id."""
    import psycopg

    from ingest.actions import libpq_url

    catalog = seeded(pg_url)
    async with await psycopg.AsyncConnection.connect(libpq_url(pg_url), autocommit=True) as conn:
        await conn.execute(f"LISTEN {ALERTS_CHANNEL}")
        async with worker_engine(pg_url, catalog) as engine:
            await engine.report(STATION, a_pile(catalog).id, 1, "smoke", "smoke")
            async with asyncio.timeout(5):
                async for notice in conn.notifies():
                    assert int(notice.payload) == engine.last_event_id
                    break


def test_an_applier_claims_only_its_stations_and_each_action_once(pg_url: str) -> None:
    seeded(pg_url)
    queue = ActionQueue(PgDatabase(pg_url))
    try:
        now = now_ms()
        ours = queue.submit(STATION, "acknowledge", {"alert_id": 1}, 5000)
        theirs = queue.submit(OTHER_STATION, "acknowledge", {"alert_id": 2}, 5000)
        old = queue.submit(STATION, "acknowledge", {"alert_id": 3}, 0)  # already past
        claimed = queue.claim([STATION], now)
        assert [r.id for r in claimed] == [ours]  # not another station's, not an expired one
        assert queue.claim([STATION], now) == []  # taken once
        assert not queue.expire(ours, now)  # taken: the replica can no longer withdraw it
        assert queue.expire(theirs, now)
        assert queue.claim([OTHER_STATION], now) == []  # withdrawn: never applied
        queue.finish(ours, now, result={"ok": 1})
        outcome = queue.outcome(ours)
        assert outcome is not None
        assert (outcome.state, outcome.result) == ("done", {"ok": 1})
        assert queue.outcome(old) is not None
        with pytest.raises(ValueError, match="unknown action"):
            queue.submit(STATION, "drop_table", {}, 5000)
        # finished ones are pruned after a while; one still queued never is
        queue.expire(old, now)
        later = now_ms() + 60_000
        assert queue.prune(later) == 3
        assert queue.outcome(ours) is None
        assert queue.outcome(old) is None
        waiting = queue.submit(STATION, "acknowledge", {"alert_id": 4}, 5000)
        assert queue.prune(later) == 0
        assert queue.outcome(waiting) is not None
    finally:
        queue.close()


async def test_two_appliers_on_one_station_apply_each_action_once(pg_url: str) -> None:
    """A partition moving between workers may briefly have two appliers: the claim keeps
    each action to one of them."""
    seeded(pg_url)
    queue = ActionQueue(PgDatabase(pg_url))
    try:
        ids = [queue.submit(STATION, "acknowledge", {"n": i}, 60_000) for i in range(200)]

        async def claim_all() -> list[int]:
            got: list[int] = []
            while claimed := await asyncio.to_thread(queue.claim, [STATION], now_ms(), 7):
                got += [r.id for r in claimed]
            return got

        first, second = await asyncio.gather(claim_all(), claim_all())
        assert sorted(first + second) == ids
        assert not set(first) & set(second)
    finally:
        queue.close()


async def test_no_replica_stream_of_an_event_twice_when_worker_ids_commit_out_of_order(
    pg_url: str, tmp_path: Path
) -> None:
    """Two writers' events commit out of id order (a higher id first): the replica's
    stream still hears the lower one, and each once."""
    seeded(pg_url)
    store = AlertStore.on_postgresql(pg_url)
    try:
        async with AsyncExitStack() as stack:
            side, _, _ = await stack.enter_async_context(replica(pg_url, tmp_path, "a"))
            queue, last = side.subscribe_alerts()
            for event_id in (last + 2, last + 1, last + 3):
                await asyncio.to_thread(
                    store.apply, Ops(events=[(event_id, 1, "note", now_ms(), "{}")]), 1000
                )
            got: list[int] = []
            async with asyncio.timeout(3):
                while len(got) < 3:
                    item = await queue.get()
                    assert item is not None
                    got.append(item.id)
            assert sorted(got) == [last + 1, last + 2, last + 3]
            await side._fan_out_events()  # what the safety net's poll does: nothing again
            assert queue.empty()
    finally:
        store.close()


@asynccontextmanager
async def worker_orders(url: str, engine: AlertEngine) -> AsyncIterator[WorkOrders]:
    store = WorkOrderStore.on_postgresql(url)
    try:
        async with WorkOrders(engine, store, engine.config.work_orders) as orders:
            yield orders
    finally:
        store.close()


async def test_a_riders_report_and_a_work_order_through_two_replicas(
    pg_url: str, tmp_path: Path
) -> None:
    """A report taken on replica a opens the alert in the owner's engine (it matches against
    the engine's open alerts); a work order made on b, moved on a, read on both."""
    catalog = seeded(pg_url)
    token = maintainer_token(pg_url)
    pile = a_pile(catalog)
    async with AsyncExitStack() as stack:
        engine = await stack.enter_async_context(worker_engine(pg_url, catalog))
        orders = await stack.enter_async_context(worker_orders(pg_url, engine))
        applier = await stack.enter_async_context(applying(pg_url, [STATION], engine, orders))
        _, a, _ = await stack.enter_async_context(replica(pg_url, tmp_path, "a"))
        _, b, _ = await stack.enter_async_context(replica(pg_url, tmp_path, "b"))
        report = {"station": STATION, "device": pile.id, "port": 1, "category": "smoke",
                  "text": "smoke at port 1"}  # fmt: skip
        r = await a.post("/v1/reports", json=report)
        assert r.status_code == 201, r.text
        alert_id = r.json()["alert_id"]
        assert not r.json()["attached"]
        assert engine.by_id[alert_id].rule == "rider_report"
        r = await b.post("/v1/reports", json=report | {"text": "still smoking"})
        assert r.status_code == 201, r.text
        assert (r.json()["alert_id"], r.json()["attached"]) == (alert_id, True)

        r = await b.post(
            f"/v1/alerts/{alert_id}/work-order", headers=bearer(token),
            json={"assignee": "zhang-min"},
        )  # fmt: skip
        assert r.status_code == 201, r.text
        order_id = r.json()["id"]
        assert orders.current[order_id].state == "assigned"
        r = await b.post(f"/v1/alerts/{alert_id}/work-order", headers=bearer(token), json={})
        assert r.status_code == 409, r.text  # one per alert: the worker's answer
        r = await a.post(
            f"/v1/work-orders/{order_id}/state", headers=bearer(token),
            json={"state": "on_site", "note": "here"},
        )  # fmt: skip
        assert r.status_code == 200, r.text
        for http in (a, b):
            await until(
                http, f"/v1/work-orders/{order_id}", token,
                lambda body: body["state"] == "on_site", within_s=1.0,
            )  # fmt: skip
            listed = (await http.get("/v1/work-orders", headers=bearer(token))).json()
            assert [o["id"] for o in listed["work_orders"]] == [order_id]
        r = await a.post("/v1/work-orders/999999/notes", headers=bearer(token), json={"text": "x"})
        assert r.status_code == 404, r.text
        assert applier.applied >= 4


async def test_commands_and_passports_are_read_from_postgresql_on_a_replica(
    pg_url: str, tmp_path: Path
) -> None:
    """Reads answer from the stores (no longer 503); a command whose worker runs no
    commands is refused with that reason, an unknown device is 404."""
    catalog = seeded(pg_url)
    token = maintainer_token(pg_url)
    pile = a_pile(catalog)
    async with (
        worker_engine(pg_url, catalog) as engine,
        applying(pg_url, [STATION], engine),
        replica(pg_url, tmp_path, "a") as (_, a, _),
    ):
        r = await a.get(f"/v1/devices/{pile.id}/commands", headers=bearer(token))
        assert r.status_code == 200, r.text
        assert r.json()["commands"] == []
        r = await a.get("/v1/batteries", headers=bearer(token))
        assert r.status_code == 200, r.text
        r = await a.get("/v1/batteries/NO-SUCH-PACK", headers=bearer(token))
        assert r.status_code == 404, r.text
        r = await a.post(
            f"/v1/devices/{pile.id}/commands", headers=bearer(token),
            json={"type": "disable_port", "port": 1},
        )  # fmt: skip
        assert r.status_code == 503, r.text
        assert "remote commands do not run in this worker" in r.json()["detail"]
        r = await a.post(
            "/v1/devices/pile-nowhere/commands", headers=bearer(token),
            json={"type": "disable_port", "port": 1},
        )  # fmt: skip
        assert r.status_code == 404, r.text


async def test_the_first_admin_key_of_the_cluster_from_the_command_line(
    pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``chargewatch keys --db URL create``: a key every replica takes, its creation in
    the audit log the replicas share; a database behind the schema is refused."""
    from api.cli import main

    seeded(pg_url)
    assert main(["keys", "--db", pg_url, "create", "--name", "ops", "--role", "admin"]) == 0
    token = capsys.readouterr().out.splitlines()[0]
    async with replica(pg_url, tmp_path, "a") as (_, a, _):
        r = await a.get("/v1/audit", headers=bearer(token))
        assert r.status_code == 200, r.text
        assert "key.create" in r.text
    assert main(["keys", "--db", pg_url, "list"]) == 0
    assert "ops" in capsys.readouterr().out
    # a database never upgraded: refused, nothing written
    bare = pg_url.rsplit("/", 1)[0] + "/postgres"
    with pytest.raises(SystemExit, match="chargewatch db upgrade"):
        main(["keys", "--db", bare, "list"])


def ready_cabinet(device: Device) -> Twin:
    """A cabinet's twin with every slot holding a full pack ``B-<slot>``."""
    twin = Twin.for_device(device)
    now = now_ms()
    head = {"v": 1, "ts": now, "boot": "boot-1"}
    birth = {**head, "seq": 0, "online": True, "kind": "cabinet", "slots": device.spec.units,
             "heartbeat_s": 30}  # fmt: skip
    twin.apply(decode("state", json.dumps(birth).encode()), now)
    slots = [
        {"n": n, "state": "ready", "battery": f"B-{n}", "soc": 95, "temp_c": 30.0}
        for n in range(1, device.spec.units + 1)
    ]
    twin.apply(decode("status", json.dumps({**head, "seq": 1, "kind": "cabinet",
                                             "slots": slots}).encode()), now)  # fmt: skip
    return twin


async def test_a_pack_flagged_by_a_worker_is_never_ready_on_a_replica(
    pg_url: str, tmp_path: Path
) -> None:
    """The replica's flagged packs follow the passports the workers write: the cabinet is
    recomputed when a pack is flagged (with its alert's event), without a restart."""
    catalog = seeded(pg_url)
    spec = next(d for d in catalog.stations[STATION].devices if d.kind == "cabinet")
    cabinet = catalog.devices[spec.id]
    state = PostgresStore(pg_url)
    passports = PassportStore.on_postgresql(pg_url)
    alerts = AlertStore.on_postgresql(pg_url)
    try:
        await asyncio.to_thread(
            state.write, (), [TwinRecord(cabinet.id, ready_cabinet(cabinet).encode())], ()
        )
        async with replica(pg_url, tmp_path, "a", refresh_s=600) as (_, a, _):

            def ready(body: Any) -> int:
                station = next(s for s in body["stations"] if s["id"] == STATION)
                return int(station["cabinets"]["batteries_ready"])

            full = ready((await a.get("/v1/stations")).json())
            assert full >= cabinet.spec.units
            now = now_ms()
            ops = PassportOps(
                batteries={"B-1": (now, cabinet.id, 1, now, 80.0, 9.0)},
                flags=[(now, "thermal runaway", "B-1")],
            )
            await asyncio.to_thread(passports.apply, ops)
            # the flag's alert event (what the worker's engine writes with it) wakes the read
            event = (1, 1, "opened", now, "{}")
            await asyncio.to_thread(alerts.apply, Ops(events=[event]), 1000)
            took = await until_public(a, "/v1/stations", lambda b: ready(b) == full - 1, 1.0)
            assert took < 1.0
            r = await a.get("/v1/batteries?flagged=true", headers=bearer(maintainer_token(pg_url)))
            assert [b["serial"] for b in r.json()["batteries"]] == ["B-1"]
    finally:
        for store in (state, passports, alerts):
            store.close()


async def until_public(
    http: httpx.AsyncClient, path: str, holds: Callable[[Any], bool], within_s: float
) -> float:
    start = time.monotonic()
    while True:
        r = await http.get(path)
        assert r.status_code == 200, r.text
        if holds(r.json()):
            return time.monotonic() - start
        assert time.monotonic() - start < within_s, f"{path} never held in {within_s} s: {r.text}"
        await asyncio.sleep(0.02)
