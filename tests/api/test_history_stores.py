"""The history queries the API relies on answer the same from the embedded SQLite store and
from a real InfluxDB 1.x (influxd): downsampled statuses, births/deaths/events, and the
forecast computed from each."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api.forecast import compute_stats
from devices.catalog import Catalog
from devices.contract import decode
from devices.topics import Channel
from ingest.influx import InfluxHistory
from ingest.sqlite_store import SQLiteStore
from ingest.store import HistoryRow, MessageType
from tests.influx_servers import influxd

pytestmark = pytest.mark.e2e

CATALOG = Catalog.load()
STATION = CATALOG.stations["yungu-road"]
PILE = next(d for d in STATION.devices if d.kind == "pile")
CABINET = next(d for d in STATION.devices if d.kind == "cabinet")
T0 = 1_795_000_000_000  # 2026-11-18, device time
HOUR = 3_600_000


def row(
    device_id: str, kind: str, channel: Channel, body: dict[str, Any], received: int
) -> HistoryRow:
    text = json.dumps(body)
    msg = decode(channel, text.encode())
    mtype: MessageType = (
        ("birth" if body["online"] else "death") if channel == "state" else
        "status" if channel == "status" else "event"
    )  # fmt: skip
    return HistoryRow(
        device_id=device_id, station_id=STATION.id, kind=kind, type=mtype, boot=body["boot"],
        seq=body["seq"], ts_ms=msg.ts if msg.ts is not None else received,
        received_ms=received, payload=text, message=msg,
    )  # fmt: skip


def story() -> list[HistoryRow]:
    """Two devices over ten hours: births, statuses every few minutes (two in the same
    millisecond), sessions, swaps, a death and a rebirth."""
    rng = random.Random(5)
    rows: list[HistoryRow] = []
    for device, kind in ((PILE, "pile"), (CABINET, "cabinet")):
        seq = 0
        units = "ports" if kind == "pile" else "slots"
        birth = {"v": 1, "ts": T0, "boot": "b00t", "seq": seq, "online": True, "kind": kind,
                 units: device.units, "heartbeat_s": 30}  # fmt: skip
        rows.append(row(device.id, kind, "state", birth, T0))
        t = T0
        died = False
        while t < T0 + 10 * HOUR:
            seq += 1
            t += rng.randint(1, 9) * 60_000 if seq % 7 else 0  # every 7th: the same ms
            if kind == "pile":
                states = [
                    rng.choice(["available", "charging", "finished"]) for _ in range(device.units)
                ]
                status = {"kind": kind, "ports": [
                    {"n": i + 1, "state": s, "power_w": 200.0 if s == "charging" else 0.0}
                    for i, s in enumerate(states)]}  # fmt: skip
            else:
                slots = []
                for i in range(device.units):
                    soc = rng.randint(20, 100)
                    slots.append({"n": i + 1, "state": "ready" if soc >= 90 else "charging",
                                  "battery": f"B-{i}", "soc": soc})  # fmt: skip
                status = {"kind": kind, "slots": slots}
            rows.append(
                row(
                    device.id,
                    kind,
                    "status",
                    {"v": 1, "ts": t, "boot": "b00t", "seq": seq, **status},
                    t + 30,
                )
            )
            if seq % 5 == 0:
                seq += 1
                event = ({"type": "session_ended", "port": 1, "session": f"s-{seq}", "energy_wh": 500.0}
                         if kind == "pile" else
                         {"type": "swap", "slot_out": 1, "battery_out": "B-1", "soc_out": 95,
                          "slot_in": 2, "battery_in": "B-9", "soc_in": 20})  # fmt: skip
                rows.append(
                    row(
                        device.id,
                        kind,
                        "event",
                        {"v": 1, "ts": t, "boot": "b00t", "seq": seq, **event},
                        t + 40,
                    )
                )
            if kind == "cabinet" and seq >= 40 and not died:
                died = True
                death = {"v": 1, "online": False, "boot": "b00t", "seq": 0}
                rows.append(row(device.id, kind, "state", death, t + 1000))
                t += HOUR
                seq += 1
                rows.append(row(device.id, kind, "state", {**birth, "ts": t, "seq": seq}, t))
    return rows


@pytest.fixture(scope="module", params=["raw", "compacted"])
def stores(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[SQLiteStore, InfluxHistory]]:
    """``compacted``: the embedded store's statuses of the first six hours are in blocks,
    and the first half is redelivered after that (stored once all the same)."""
    tmp: Path = tmp_path_factory.mktemp("stores")
    rows = story()
    with influxd(tmp / "influxd") as server:
        influx = InfluxHistory(f"influx1://127.0.0.1:{server.port}?db=cw")
        influx.create_database()
        sqlite = SQLiteStore(tmp / "cw.db")
        for store in (sqlite, influx):
            store.append(rows[: len(rows) // 2])
            store.append(rows)  # a redelivery of the first half is stored once
        if request.param == "compacted":
            while sqlite.compact(T0 + 6 * HOUR, max_blocks=3):
                pass
            assert sqlite.compact(T0 + 6 * HOUR) == 0
            blocks = sqlite._db.query("SELECT count(*) FROM status_blocks")[0][0]
            assert blocks == 2 * 6
            sqlite.append(rows[: len(rows) // 2])
        try:
            yield sqlite, influx
        finally:
            influx.close()
            sqlite.close()


@pytest.mark.parametrize("every_ms", [60_000, 15 * 60_000, HOUR])
def test_status_samples_agree(stores: tuple[SQLiteStore, InfluxHistory], every_ms: int) -> None:
    sqlite, influx = stores
    ids = [PILE.id, CABINET.id]
    since, until = T0 - HOUR, T0 + 11 * HOUR
    got = sqlite.status_samples(ids, since, until, every_ms)
    assert got == influx.status_samples(ids, since, until, every_ms)
    statuses = [r for r in story() if r.type == "status"]
    buckets = {(r.device_id, r.ts_ms - r.ts_ms % every_ms) for r in statuses}
    assert len(got) == len(buckets)
    for sample in got:
        in_bucket = [r for r in statuses if r.device_id == sample["device_id"]
                     and r.ts_ms - r.ts_ms % every_ms == sample["bucket_ms"]]  # fmt: skip
        last = max(in_bucket, key=lambda r: (r.ts_ms, r.seq))
        assert sample["payload"] == last.payload


def test_happenings_agree(stores: tuple[SQLiteStore, InfluxHistory]) -> None:
    sqlite, influx = stores
    ids = [PILE.id, CABINET.id]
    got = sqlite.happenings(ids, T0 - HOUR, T0 + 11 * HOUR)
    assert got == influx.happenings(ids, T0 - HOUR, T0 + 11 * HOUR)
    kinds = [r["type"] for r in got]
    assert kinds.count("death") == 1
    assert kinds.count("birth") == 3
    assert kinds.count("event") == sum(1 for r in story() if r.type == "event")
    assert [r["ts_ms"] for r in got] == sorted(r["ts_ms"] for r in got)
    assert sqlite.happenings(ids, T0, T0 + HOUR, limit=2) == influx.happenings(
        ids, T0, T0 + HOUR, limit=2
    )


def test_forecast_is_the_same_from_either_store(stores: tuple[SQLiteStore, InfluxHistory]) -> None:
    sqlite, influx = stores
    now = T0 + 10 * HOUR
    a = compute_stats(sqlite, CATALOG, STATION, now)
    b = compute_stats(influx, CATALOG, STATION, now)
    assert a.forecast == b.forecast
    assert a.rates == b.rates
    assert 40 <= a.forecast["samples"] <= 41  # ten hours of 15-minute instants (+ "now")
    assert sum(r[1] for r in a.rates) > 0, "session ends counted per hour"
