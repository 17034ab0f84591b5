"""API replicas (``chargewatch api``): the read model over PostgreSQL (``ingest.replica``),
kept current by the workers' NOTIFYs (``ingest.pg_store``) and a full refresh; real
PostgreSQL, the real app over httpx's ASGI transport (and one real ``chargewatch api``
process). Twins are written by a ``PostgresStore`` as an ingest worker writes them."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from api.app import create_app
from api.settings import ServeSettings
from devices.catalog import Catalog, Device
from devices.contract import decode
from ingest.config import IngestConfig
from ingest.db import migrate, registry
from ingest.pg_store import NOTICE_MAX_BYTES, TWINS_CHANNEL, PostgresStore, twin_notices
from ingest.readside import now_ms
from ingest.replica import ReplicaReadSide, as_read_and_act, libpq_url
from ingest.store import TwinRecord
from ingest.twins import Twin
from ingest.worker import record_history
from tests.pg_server import postgresql

STATION = "yungu-road"


def test_notices_name_every_id_once_and_stay_under_the_payload_limit() -> None:
    ids = [f"pile-{i:060d}" for i in range(1000)]  # 65 bytes each: ~65 kB in all
    notices = twin_notices([*ids, ids[0]])  # a repeat is named once
    assert len(notices) > 1
    assert all(len(n.encode()) <= NOTICE_MAX_BYTES for n in notices)
    assert [i for n in notices for i in n.split(" ")] == ids
    assert twin_notices([]) == []
    assert twin_notices(["a"]) == ["a"]


def seeded(url: str) -> Catalog:
    migrate.upgrade(url)
    catalog = Catalog.load()
    engine = migrate.connect(url)
    try:
        with engine.begin() as conn:
            registry.import_catalog(conn, catalog)
    finally:
        engine.dispose()
    return catalog


def online_pile(device: Device, charging: int, seq: int = 1) -> Twin:
    """A pile's twin after its birth and a status with ``charging`` ports busy, as a
    worker's pipeline leaves it."""
    twin = Twin.for_device(device)
    now = now_ms()
    head = {"v": 1, "ts": now, "boot": "boot-1"}
    birth = {**head, "seq": 0, "online": True, "kind": "pile", "ports": device.spec.units,
             "heartbeat_s": 30}  # fmt: skip
    twin.apply(decode("state", json.dumps(birth).encode()), now)
    ports = [
        {"n": n, "state": "charging" if n <= charging else "available", "power_w": 100.0}
        if n <= charging
        else {"n": n, "state": "available"}
        for n in range(1, device.spec.units + 1)
    ]
    status = {**head, "seq": seq, "kind": "pile", "ports": ports}
    twin.apply(decode("status", json.dumps(status).encode()), now)
    assert twin.online(now)
    return twin


def write_twin(store: PostgresStore, twin: Twin) -> None:
    store.write((), [TwinRecord(twin.device_id, twin.encode())], ())


def a_pile(catalog: Catalog) -> Device:
    spec = next(d for d in catalog.stations[STATION].devices if d.kind == "pile")
    return catalog.devices[spec.id]


@asynccontextmanager
async def replica(
    url: str, tmp_path: Path, name: str, **options: Any
) -> AsyncIterator[tuple[ReplicaReadSide, httpx.AsyncClient]]:
    config = IngestConfig(data_dir=tmp_path / name)
    async with ReplicaReadSide(url, config, **options) as side:
        app = create_app(*as_read_and_act(side), ServeSettings())
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as http:
            yield side, http


def ours(body: Any) -> Any:
    return next(s for s in body["stations"] if s["id"] == STATION)


async def until(
    http: httpx.AsyncClient, path: str, holds: Callable[[Any], bool], within_s: float
) -> float:
    """GET ``path`` until ``holds(json)``; the seconds it took (fails after ``within_s``)."""
    start = time.monotonic()
    while True:
        r = await http.get(path)
        assert r.status_code == 200, r.text
        if holds(r.json()):
            return time.monotonic() - start
        assert time.monotonic() - start < within_s, f"{path} never held in {within_s} s: {r.text}"
        await asyncio.sleep(0.02)


async def test_write_notifies_the_changed_twins_at_commit(pg_url: str) -> None:
    catalog = seeded(pg_url)
    store = PostgresStore(pg_url)
    try:
        async with await psycopg.AsyncConnection.connect(
            libpq_url(pg_url), autocommit=True
        ) as conn:
            await conn.execute(f"LISTEN {TWINS_CHANNEL}")
            devices = list(catalog.devices.values())
            records = [TwinRecord(d.id, Twin.for_device(d).encode()) for d in devices]
            await asyncio.to_thread(store.write, (), records, ())
            heard: set[str] = set()
            async with asyncio.timeout(5):
                async for notice in conn.notifies():
                    heard.update(notice.payload.split())
                    if len(heard) >= len(devices):
                        break
            assert heard == {d.id for d in devices}
    finally:
        store.close()


async def test_a_twin_written_by_a_worker_shows_on_two_replicas_within_a_second(
    pg_url: str, tmp_path: Path
) -> None:
    catalog = seeded(pg_url)
    pile = a_pile(catalog)
    store = PostgresStore(pg_url)
    try:
        async with AsyncExitStack() as stack:
            # a refresh far away: only the NOTIFY can bring the change in time
            a_side, a = await stack.enter_async_context(
                replica(pg_url, tmp_path, "a", refresh_s=600)
            )
            b_side, b = await stack.enter_async_context(
                replica(pg_url, tmp_path, "b", refresh_s=600)
            )
            for http in (a, b):
                body = (await http.get("/v1/stations")).json()
                assert ours(body)["piles"]["online"] == 0
            for side in (a_side, b_side):
                await until_listening(side)

            await asyncio.to_thread(write_twin, store, online_pile(pile, charging=2))
            took = await asyncio.gather(
                *(
                    until(
                        h, "/v1/stations", lambda s: ours(s)["piles"]["online"] == 1, within_s=1.0
                    )
                    for h in (a, b)
                )
            )
            assert max(took) < 1.0
            for http in (a, b):
                station = ours((await http.get("/v1/stations")).json())
                assert station["piles"]["ports_free"] == pile.spec.units - 2
                device = (await http.get(f"/v1/devices/{pile.id}")).json()
                assert device["online"] is True
                assert [p["state"] for p in device["ports"]][:3] == [
                    "charging", "charging", "available"]  # fmt: skip
                assert (await http.get("/readyz")).status_code == 200
    finally:
        store.close()


async def until_listening(side: ReplicaReadSide, within_s: float = 5.0) -> None:
    async with asyncio.timeout(within_s):
        while side.problems():  # noqa: ASYNC110 (bounded polling: no event to wait on)
            await asyncio.sleep(0.02)


async def test_the_full_refresh_recovers_a_missed_notify(pg_url: str, tmp_path: Path) -> None:
    catalog = seeded(pg_url)
    pile = a_pile(catalog)
    async with replica(pg_url, tmp_path, "a", refresh_s=0.5) as (side, http):
        await until_listening(side)
        changed: list[str] = []
        side.on_twins_changed(lambda twins: changed.extend(t.device_id for t in twins))
        # written behind the workers' back: no NOTIFY
        record = online_pile(pile, charging=1).encode().decode()
        engine = migrate.connect(pg_url)
        try:
            with engine.begin() as conn:
                conn.exec_driver_sql(
                    "INSERT INTO twins (device_id, record) VALUES (%(id)s, %(r)s)",
                    {"id": pile.id, "r": record},
                )
        finally:
            engine.dispose()
        await until(http, "/v1/stations", lambda s: ours(s)["piles"]["online"] == 1, within_s=3.0)
        assert changed == [pile.id]  # listeners (SSE, station views) heard of it once
        metrics = (await http.get("/metrics")).text
        assert "cw_replica_notices_total 0.0" in metrics  # the refresh brought it
        assert "cw_replica_refreshes_total" in metrics
        assert "cw_replica_twins_changed_total 1.0" in metrics


async def test_pages_and_health_load_from_a_replica(pg_url: str, tmp_path: Path) -> None:
    seeded(pg_url)
    async with replica(pg_url, tmp_path, "a") as (side, http):
        await until_listening(side)
        for path in ("/", "/console", "/healthz", "/readyz", "/openapi.json",
                     f"/v1/stations/{STATION}"):  # fmt: skip
            r = await http.get(path)
            assert r.status_code == 200, (path, r.text)
        assert (await http.get("/readyz")).json() == {"ready": True, "problems": []}
        assert "cw_replica_ready 1.0" in (await http.get("/metrics")).text
        r = await http.get("/v1/alerts")
        assert r.status_code in (401, 503), r.text


async def test_a_replica_reading_influxdb_while_the_workers_write_postgresql_is_not_ready(
    pg_url: str, tmp_path: Path
) -> None:
    seeded(pg_url)
    store = PostgresStore(pg_url)
    try:
        record_history(store, None)  # as a worker without --history does at start
    finally:
        store.close()
    # never read: the replica finds the mismatch in PostgreSQL alone
    config = IngestConfig(data_dir=tmp_path / "a", history="influx1://127.0.0.1:9?db=cw")
    async with ReplicaReadSide(pg_url, config) as side:
        assert (
            "history not served: the ingest workers write it to PostgreSQL and this replica"
            " reads InfluxDB; start `chargewatch api` without --history (nor"
            " CHARGEWATCH_HISTORY)"
        ) in side.problems()


async def test_a_replica_refuses_a_database_behind_its_schema(pg_url: str, tmp_path: Path) -> None:
    with pytest.raises(migrate.SchemaBehind, match="chargewatch db upgrade"):
        async with replica(pg_url, tmp_path, "a"):
            pass


async def test_readyz_fails_while_postgresql_is_down_and_recovers(tmp_path: Path) -> None:
    with postgresql() as pg:
        url = pg.create_database("replica")
        catalog = seeded(url)
        pile = a_pile(catalog)
        async with replica(url, tmp_path, "a", refresh_s=0.5, ping_s=0.2) as (side, http):
            await until_listening(side)
            assert (await http.get("/readyz")).status_code == 200

            await asyncio.to_thread(pg.stop)
            body = await until_status(http, "/readyz", 503, within_s=5.0)
            assert body["ready"] is False
            assert any("database unreachable" in p for p in body["problems"]), body
            # what the rules watch (ChargewatchReplicaNotReady, deploy/prometheus)
            assert "cw_replica_ready 0.0" in (await http.get("/metrics")).text
            # riders still get the last known state, from memory
            assert (await http.get("/v1/stations")).status_code == 200

            await asyncio.to_thread(pg.start)
            await until_status(http, "/readyz", 200, within_s=15.0)
            # and it hears the workers again
            store = PostgresStore(url)
            try:
                await asyncio.to_thread(write_twin, store, online_pile(pile, charging=1))
                await until(
                    http, "/v1/stations", lambda s: ours(s)["piles"]["online"] == 1, within_s=1.0
                )
            finally:
                store.close()


async def until_status(http: httpx.AsyncClient, path: str, status: int, within_s: float) -> Any:
    start = time.monotonic()
    while True:
        r = await http.get(path)
        if r.status_code == status:
            return r.json()
        assert time.monotonic() - start < within_s, f"{path}: {r.status_code} {r.text}"
        await asyncio.sleep(0.05)
