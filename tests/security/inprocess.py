"""The API in-process: ``create_app`` over an ``Ingest`` that is not started (no broker),
its twins fed directly, optionally a real ``AlertEngine`` on the data dir's SQLite file;
requests go through the whole ASGI app (middleware, auth, errors) with httpx, no socket."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from fastapi import FastAPI

from api.app import create_app
from api.auth import KeyStore
from api.settings import ServeSettings
from devices.catalog import Catalog
from devices.contract import Birth, CabinetStatus, PileStatus
from ingest.alerts.engine import AlertEngine
from ingest.alerts.store import AlertStore
from ingest.config import IngestConfig
from ingest.inprocess import read_and_act
from ingest.passport_store import PassportStore
from ingest.passports import Passports
from ingest.service import Ingest, now_ms

STATION = "yungu-road"
PILE_FIRMWARE, BOOT = "fw-9.9.9-secret", "boot-rider-1"
SESSION, BATTERY = "S-LINKABLE-42", "BAT-SERIAL-0007"


@dataclass
class InProcess:
    ingest: Ingest
    app: FastAPI
    http: httpx.AsyncClient
    data_dir: Path

    def key(self, role: str = "maintainer", name: str = "li-wei", **kw: int | None) -> str:
        store = KeyStore.in_dir(self.data_dir)
        try:
            return store.create(name, role, **kw)[1]
        finally:
            store.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def feed_station(ingest: Ingest, station_id: str = STATION) -> tuple[str, str]:
    """Every device of the station born and reporting: piles with port 1 charging in
    session ``SESSION``, cabinets with slot 1 holding battery ``BATTERY``. Returns the ids
    of its first pile and first cabinet."""
    now = now_ms()
    pile = cabinet = ""
    for spec in ingest.catalog.stations[station_id].devices:
        twin = ingest.twins[spec.id]
        units = "ports" if twin.kind == "pile" else "slots"
        head = {"v": 1, "ts": now, "boot": BOOT, "kind": twin.kind}
        twin.apply(
            Birth.of({**head, "seq": 0, "online": True, "model": "M1",
                      "firmware": PILE_FIRMWARE, units: twin.units, "heartbeat_s": 30}),
            now,
        )  # fmt: skip
        if twin.kind == "pile":
            pile = pile or spec.id
            ports = [{"n": 1, "state": "charging", "power_w": 150.0, "energy_wh": 10.0,
                      "session": SESSION}]  # fmt: skip
            ports += [{"n": n, "state": "available"} for n in range(2, twin.units + 1)]
            twin.apply(PileStatus.of({**head, "seq": 1, "ports": ports}), now)
        else:
            cabinet = cabinet or spec.id
            slots = [{"n": 1, "state": "ready", "battery": BATTERY, "soc": 97.0}]
            slots += [{"n": n, "state": "empty"} for n in range(2, twin.units + 1)]
            twin.apply(CabinetStatus.of({**head, "seq": 1, "slots": slots}), now)
    return pile, cabinet


@asynccontextmanager
async def in_process(
    tmp_path: Path,
    *,
    alerts: bool = False,
    passports: bool = False,
    config: IngestConfig | None = None,
    settings: ServeSettings | None = None,
    client: tuple[str, int] = ("127.0.0.1", 50000),
) -> AsyncIterator[InProcess]:
    data_dir = tmp_path / "data"
    config = (config or IngestConfig()).model_copy(update={"data_dir": data_dir})
    catalog = Catalog.load()
    ingest = Ingest(config, catalog)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(ingest.supervisor)  # as Ingest enters it
        if alerts:
            store = AlertStore.in_dir(data_dir)
            stack.callback(store.close)
            ingest.alerts = await stack.enter_async_context(
                AlertEngine(
                    config.alerts,
                    catalog,
                    ingest.twins,
                    store,
                    registry=ingest.metrics.registry,
                    supervisor=ingest.supervisor,
                )
            )
        if passports:  # wired as ingest.service wires them (fed by the test, not a pipeline)
            passport_store = PassportStore.in_dir(data_dir)
            stack.callback(passport_store.close)
            ingest.passports = Passports(
                passport_store,
                catalog,
                lock_flagged=config.batteries.lock_flagged,
                registry=ingest.metrics.registry,
            )
            ingest.passports.restore()
            if ingest.alerts is not None:
                ingest.alerts.on_opened.append(ingest.passports.alert_opened)
                ingest.passports.alerts = ingest.alerts
                ingest.alerts.flagged_batteries = ingest.passports.flagged
        app = create_app(*read_and_act(ingest), settings or ServeSettings())
        transport = httpx.ASGITransport(app=app, client=client)
        http = await stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url="http://testserver")
        )
        yield InProcess(ingest, app, http, data_dir)
