"""InfluxHistory against real servers: influxd 1.6.7 (v1 write + InfluxQL read) and
VictoriaMetrics (influxdb-client's /api/v2/write path), plus the pure bits it relies on."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from influxdb_client import Point, WritePrecision

from devices.catalog import Catalog
from devices.contract import decode
from devices.topics import Channel
from ingest import StoreError, StoreUnavailable
from ingest.influx import InfluxHistory, InfluxSettings, quote_ident, quote_string
from ingest.lineprotocol import line, rows_lines
from ingest.sqlite_store import SQLiteStore
from ingest.store import HistoryRow, MessageType
from tests.influx_servers import HTTPServer, influxd, victoria_metrics, vm_export

CATALOG = Catalog.load()
PILE = next(d for d in CATALOG.devices.values() if d.kind == "pile")
CABINET = next(d for d in CATALOG.devices.values() if d.kind == "cabinet")
NOW_MS = (int(time.time()) - 3600) * 1000  # recent: VictoriaMetrics drops future samples
ODD = 'quote " backslash \\ comma , equals = space  newline\nand tab\t, unicode ⚡ end\\'


def row(
    device: Any, channel: Channel, payload: dict[str, Any], received_ms: int | None = None
) -> HistoryRow:
    """A history row the way the pipeline builds it: from a decoded contract message."""
    text = json.dumps(payload, ensure_ascii=False)
    msg = decode(channel, text.encode())
    mtype: MessageType
    if channel == "state":
        mtype = "birth" if payload["online"] else "death"
    else:
        mtype = "status" if channel == "status" else "event"
    received = received_ms if received_ms is not None else (msg.ts or NOW_MS) + 40
    return HistoryRow(
        device_id=device.id,
        station_id=device.station_id,
        kind=device.kind,
        type=mtype,
        boot=msg.boot,
        seq=msg.seq,
        ts_ms=msg.ts if msg.ts is not None else received,
        received_ms=received,
        payload=text,
        message=msg,
    )


def district_rows(t0: int = NOW_MS) -> list[HistoryRow]:
    """A pile and a cabinet: births, statuses, events of every shape, a death."""
    pile, cab = PILE, CABINET
    ports = PILE.spec.units
    slots = CABINET.spec.units
    pile_ports = [{"n": n, "state": "available"} for n in range(1, ports + 1)]
    pile_ports[0] = {
        "n": 1,
        "state": "charging",
        "power_w": 182,
        "energy_wh": 96.4,
        "session": "s-1a2b",
    }
    pile_ports[1] = {"n": 2, "state": "faulted", "fault": "relay_stuck"}
    cab_slots: list[dict[str, Any]] = [{"n": n, "state": "empty"} for n in range(1, slots + 1)]
    cab_slots[0] = {"n": 1, "state": "ready", "battery": "B-88123", "soc": 97, "temp_c": 27.1}
    cab_slots[1] = {
        "n": 2,
        "state": "charging",
        "battery": "B-10017",
        "soc": 43,
        "temp_c": 33.0,
        "power_w": 250,
    }
    cab_slots[3] = {"n": 4, "state": "faulted", "fault": "lock_failure"}
    h = {"v": 1, "boot": "7f3a"}
    c = {"v": 1, "boot": "c0ff"}
    return [
        row(
            pile,
            "state",
            {**h, "ts": t0, "seq": 0, "online": True, "kind": "pile", "ports": ports},
        ),
        row(
            pile,
            "status",
            {
                **h,
                "ts": t0 + 1000,
                "seq": 1,
                "kind": "pile",
                "voltage_v": 229.8,
                "temp_c": 31.5,
                "rssi_dbm": -71,
                "faults": ["over_temperature"],
                "ports": pile_ports,
            },
        ),
        row(
            pile,
            "event",
            {
                **h,
                "ts": t0 + 1000,
                "seq": 2,
                "type": "session_started",
                "port": 1,
                "session": "s-1a2b",
            },
        ),
        row(
            pile,
            "event",
            {
                **h,
                "ts": t0 + 2000,
                "seq": 3,
                "type": "fault_raised",
                "code": "relay_stuck",
                "port": 2,
                "value": 1.5,
                "info": ODD,
            },
        ),
        row(pile, "state", {**h, "online": False, "seq": 0}, received_ms=t0 + 3000),
        row(
            cab,
            "state",
            {**c, "ts": t0, "seq": 0, "online": True, "kind": "cabinet", "slots": slots},
        ),
        row(
            cab,
            "status",
            {
                **c,
                "ts": t0 + 500,
                "seq": 1,
                "kind": "cabinet",
                "temp_c": 28.0,
                "smoke": True,
                "slots": cab_slots,
            },
        ),
        row(
            cab,
            "event",
            {
                **c,
                "ts": t0 + 900,
                "seq": 2,
                "type": "swap",
                "slot_out": 1,
                "battery_out": "B-88123",
                "soc_out": 97,
                "slot_in": 3,
                "battery_in": "B-1",
                "soc_in": 12.5,
            },
        ),
    ]


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def influx1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HTTPServer]:
    with influxd(tmp_path_factory.mktemp("influxd")) as server:
        yield server


@pytest.fixture
def v1_store(influx1: HTTPServer, request: pytest.FixtureRequest) -> Iterator[InfluxHistory]:
    """A fresh database per test on the shared influxd."""
    db = "cw_" + request.node.name.replace("[", "_").replace("]", "")
    store = InfluxHistory(f"influx1://127.0.0.1:{influx1.port}?db={db}", retry_s=2)
    store.create_database()
    yield store
    store.close()


def count(store: InfluxHistory, measurement: str, field: str) -> int:
    rows = store.query(f"SELECT COUNT({quote_ident(field)}) FROM {quote_ident(measurement)}")
    return int(rows[0]["count"]) if rows else 0


# -- InfluxDB 1.x: the full write + read path --------------------------------------------


@pytest.mark.e2e
def test_v1_messages_read_back_like_the_embedded_store(
    v1_store: InfluxHistory, tmp_path: Path
) -> None:
    rows = district_rows()
    v1_store.append(rows)
    embedded = SQLiteStore(tmp_path / "h.db")
    embedded.append(rows)
    try:
        for device in (PILE, CABINET):
            expected = embedded.messages(device.id)
            assert len(expected) == sum(1 for r in rows if r.device_id == device.id)
            assert v1_store.messages(device.id) == expected
            window = v1_store.messages(device.id, since_ms=NOW_MS + 500, until_ms=NOW_MS + 2000)
            assert window == embedded.messages(device.id, NOW_MS + 500, NOW_MS + 2000)
            assert v1_store.messages(device.id, limit=2) == expected[:2]
    finally:
        embedded.close()
    # the odd string made it through the raw payload unchanged
    fault = next(m for m in v1_store.messages(PILE.id) if m["seq"] == 3)
    assert json.loads(fault["payload"])["info"] == ODD


@pytest.mark.e2e
def test_v1_redelivery_is_idempotent(v1_store: InfluxHistory) -> None:
    rows = district_rows()
    v1_store.append(rows)
    before = {m: count(v1_store, m, f) for m, f in _COUNTED.items()}
    first = v1_store.messages(PILE.id)
    v1_store.append(rows)  # a broker redelivering everything
    v1_store.append(rows[2:4])  # and some of it again
    assert {m: count(v1_store, m, f) for m, f in _COUNTED.items()} == before
    assert before["message"] == len(rows)
    assert before["port"] == PILE.spec.units  # one pile status
    assert before["slot"] == CABINET.spec.units  # one cabinet status
    assert before["event"] == 3
    assert before["device"] == 5  # two births, two statuses, a death
    assert v1_store.points_written == 2 * len(rows_lines(rows)) + len(rows_lines(rows[2:4]))
    assert v1_store.messages(PILE.id) == first
    # a death has no device time: redelivered, it arrives at a new time and is a new point,
    # which messages() folds away as the embedded store does (same boot, seq and type)
    death = next(r for r in rows if r.type == "death")
    v1_store.append([row(PILE, "state", json.loads(death.payload), death.received_ms + 5000)])
    assert count(v1_store, "message", "seq") == len(rows) + 1
    assert v1_store.messages(PILE.id) == first


_COUNTED = {"message": "seq", "port": "state", "slot": "state", "event": "seq", "device": "seq"}


@pytest.mark.e2e
def test_v1_schema_tags_and_fields(v1_store: InfluxHistory) -> None:
    v1_store.append(district_rows())
    measurements = [r["name"] for r in v1_store.query("SHOW MEASUREMENTS")]
    assert measurements == ["device", "event", "message", "port", "slot"]
    tags = {
        m: {r["tagKey"] for r in v1_store.query(f"SHOW TAG KEYS FROM {quote_ident(m)}")}
        for m in measurements
    }
    assert tags == {
        "device": {"device", "kind", "station"},
        "event": {"device", "station", "type"},
        "message": {"device", "station", "type"},
        "port": {"device", "n", "station"},
        "slot": {"device", "n", "station"},
    }
    fields = {
        (r["fieldKey"], r["fieldType"]) for r in v1_store.query('SHOW FIELD KEYS FROM "slot"')
    }
    assert fields == {
        ("battery", "string"),
        ("energy_wh", "float"),
        ("fault", "string"),
        ("power_w", "float"),
        ("soc", "float"),
        ("state", "string"),
        ("temp_c", "float"),
    }
    port1 = v1_store.query(
        f'SELECT * FROM "port" WHERE "device" = {quote_string(PILE.id)} AND "n" = \'1\''
    )
    assert port1 == [
        {
            "time": (NOW_MS + 1000) * 1_000_000 + 1,  # device ms + seq as sub-ms ns
            "device": PILE.id,
            "station": PILE.station_id,
            "n": "1",
            "state": "charging",
            "power_w": 182,
            "energy_wh": 96.4,
            "session": "s-1a2b",  # a field, not a tag: sessions are unbounded
            "fault": None,
        }
    ]
    dev = v1_store.query(
        f'SELECT "faults", "temp_c", "online", "boot", "seq" FROM "device" WHERE "device" = {quote_string(CABINET.id)}'
    )
    assert [(d["faults"], d["temp_c"], d["online"], d["seq"]) for d in dev] == [
        (None, None, True, 0),  # birth
        ("smoke", 28, None, 1),  # smoke: true counts as the fault even when not listed
    ]
    swap = v1_store.query('SELECT * FROM "event" WHERE "type" = \'swap\'')
    assert len(swap) == 1
    assert (swap[0]["battery_out"], swap[0]["soc_in"], swap[0]["slot_in"]) == ("B-88123", 12.5, 3)
    fault = v1_store.query(
        'SELECT "info", "code", "value" FROM "event" WHERE "type" = \'fault_raised\''
    )
    assert [(f["info"], f["code"], f["value"]) for f in fault] == [(ODD, "relay_stuck", 1.5)]
    death = v1_store.query('SELECT "online" FROM "device" WHERE "online" = false')
    assert [d["time"] for d in death] == [(NOW_MS + 3000) * 1_000_000]  # arrival time, seq 0


@pytest.mark.e2e
def test_v1_odd_ids_are_escaped_not_injected(v1_store: InfluxHistory) -> None:
    odd = SimpleNamespace(id="pile a,b=c\"d'e", station_id="st 1,x=y", kind="pile")
    rows = [
        row(odd, "event", {"v": 1, "boot": "b00t", "ts": NOW_MS, "seq": 7, "type": "door_opened"}),
        row(PILE, "event", {"v": 1, "boot": "b00t", "ts": NOW_MS, "seq": 8, "type": "door_opened"}),
    ]
    v1_store.append(rows)
    got = v1_store.messages(odd.id)
    assert [(m["device_id"], m["seq"]) for m in got] == [(odd.id, 7)]
    raw = v1_store.query(
        f'SELECT "seq", "station" FROM "message" WHERE "device" = {quote_string(odd.id)}'
    )
    assert [(r["seq"], r["station"]) for r in raw] == [(7, "st 1,x=y")]
    # a device id that tries to widen the query finds nothing
    assert v1_store.messages('x\' OR "device" =~ /.*/ OR "device" = \'y') == []
    assert v1_store.messages(PILE.id + "\\") == []


@pytest.mark.e2e
def test_v1_same_millisecond_does_not_overwrite(v1_store: InfluxHistory) -> None:
    h = {"v": 1, "boot": "b00t", "ts": NOW_MS, "type": "door_opened"}
    v1_store.append([row(CABINET, "event", {**h, "seq": seq}) for seq in (5, 4, 6)])
    got = v1_store.messages(CABINET.id)
    assert [(m["seq"], m["ts_ms"]) for m in got] == [(4, NOW_MS), (5, NOW_MS), (6, NOW_MS)]


@pytest.mark.e2e
def test_v1_missing_database_is_a_store_error_not_retried(influx1: HTTPServer) -> None:
    errors: list[Exception] = []
    store = InfluxHistory(
        f"influx1://127.0.0.1:{influx1.port}?db=nope", on_error=errors.append, retry_s=5
    )
    started = time.monotonic()
    with pytest.raises(StoreError, match="database not found") as caught:
        store.append(district_rows()[:1])
    assert not isinstance(caught.value, StoreUnavailable)
    assert time.monotonic() - started < 1  # 4xx: retrying cannot help
    assert errors == [caught.value]
    assert store.failures == 1
    store.close()


@pytest.mark.e2e
def test_v1_stopped_server_is_unavailable_then_recovers(tmp_path: Path) -> None:
    with influxd(tmp_path / "influxd") as server:
        errors: list[Exception] = []
        store = InfluxHistory(
            f"influx1://127.0.0.1:{server.port}?db=cw",
            on_error=errors.append,
            retry_s=1.5,
            timeout_s=1,
        )
        store.create_database()
        rows = district_rows()
        store.append(rows[:3])
        server.stop()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="gave up after"):
            store.append(rows[3:])
        elapsed = time.monotonic() - started
        assert 0.2 < elapsed < 1.5 + 1 + 0.5, elapsed  # retried, within retry_s + timeout_s
        assert len(errors) >= 3
        assert all(isinstance(e, StoreUnavailable) for e in errors)
        assert store.failures == len(errors)
        assert not store.ping()
        server.start()
        assert store.ping()
        store.append(rows[3:])
        assert [m["seq"] for m in store.messages(PILE.id)] == [0, 1, 2, 3, 0]
        store.close()


# -- InfluxDB 2.x/3.x write path (influxdb-client) against VictoriaMetrics -----------------


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HTTPServer]:
    with victoria_metrics(tmp_path_factory.mktemp("vm")) as server:
        yield server


def series(exported: list[dict[str, Any]]) -> dict[tuple[str, ...], tuple[list[Any], list[int]]]:
    out = {}
    for s in exported:
        metric = s["metric"]
        key = (
            metric["__name__"],
            *(f"{k}={v}" for k, v in sorted(metric.items()) if k != "__name__"),
        )
        out[key] = (s["values"], s["timestamps"])
    return out


@pytest.mark.e2e
def test_v2_write_path_into_victoria_metrics(vm: HTTPServer) -> None:
    errors: list[Exception] = []
    store = InfluxHistory(
        f"influx2://127.0.0.1:{vm.port}?org=chargewatch&bucket=history&token=secret",
        on_error=errors.append,
    )
    rows = district_rows()
    store.append(rows)
    store.close()
    assert errors == []
    dev, st = f"device={PILE.id}", f"station={PILE.station_id}"
    ms = NOW_MS + 1000  # VictoriaMetrics keeps milliseconds
    ports = series(vm_export(vm, '{__name__=~"port_.*"}'))
    assert ports[("port_power_w", dev, "n=1", st)] == ([182], [ms])
    assert ports[("port_energy_wh", dev, "n=1", st)] == ([96.4], [ms])
    assert ports[("port_energy_wh", dev, "n=2", st)] == ([0], [ms])
    # every port of the status, each with only the bounded tags: no session, no fault label
    assert {k[2] for k in ports if k[0] == "port_power_w"} == {
        f"n={n}" for n in range(1, PILE.spec.units + 1)
    }
    assert all(len(k) == 4 for k in ports)
    slots = series(vm_export(vm, '{__name__="slot_soc"}'))
    cdev, cst = f"device={CABINET.id}", f"station={CABINET.station_id}"
    assert slots == {
        ("slot_soc", cdev, "n=1", cst): ([97], [NOW_MS + 500]),
        ("slot_soc", cdev, "n=2", cst): ([43], [NOW_MS + 500]),
    }
    seqs = series(vm_export(vm, '{__name__="message_seq"}'))
    assert seqs[("message_seq", dev, st, "type=event")] == ([2, 3], [NOW_MS + 1000, NOW_MS + 2000])
    assert seqs[("message_seq", dev, st, "type=death")] == ([0], [NOW_MS + 3000])
    swap = series(vm_export(vm, '{__name__=~"event_soc_.*"}'))
    assert swap == {
        ("event_soc_in", cdev, cst, "type=swap"): ([12.5], [NOW_MS + 900]),
        ("event_soc_out", cdev, cst, "type=swap"): ([97], [NOW_MS + 900]),
    }
    temp = series(vm_export(vm, '{__name__="device_temp_c"}'))
    assert temp == {
        ("device_temp_c", cdev, "kind=cabinet", cst): ([28], [NOW_MS + 500]),
        ("device_temp_c", dev, "kind=pile", st): ([31.5], [NOW_MS + 1000]),
    }


@pytest.mark.e2e
def test_v2_unavailable_within_bound_then_recovers(tmp_path: Path) -> None:
    with victoria_metrics(tmp_path / "vm") as server:
        errors: list[Exception] = []
        store = InfluxHistory(
            f"influx2://127.0.0.1:{server.port}?org=o&bucket=b&token=t",
            on_error=errors.append,
            retry_s=1,
            timeout_s=1,
        )
        rows = district_rows()
        server.stop()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="/api/v2/write"):
            store.append(rows)
        assert time.monotonic() - started < 1 + 1 + 0.5
        assert errors
        assert all(isinstance(e, StoreUnavailable) for e in errors)
        server.start()
        store.append(rows)
        store.close()
        assert series(vm_export(server, '{__name__="device_rssi_dbm"}')) == {
            (
                "device_rssi_dbm",
                f"device={PILE.id}",
                "kind=pile",
                f"station={PILE.station_id}",
            ): ([-71], [NOW_MS + 1000])
        }


# -- pure: settings and escaping -------------------------------------------------------


def test_settings_from_urls() -> None:
    v2 = InfluxSettings.parse("influx2s://db.example:8443?org=acme&bucket=hist&token=t%2Bk")
    assert (v2.mode, v2.base_url, v2.org, v2.bucket, v2.token, v2.database) == (
        "v2",
        "https://db.example:8443",
        "acme",
        "hist",
        "t+k",
        "hist",  # reads go to the bucket's DBRP mapping unless db= says otherwise
    )
    v1 = InfluxSettings.parse("influx1://me:p%40ss@localhost/cw?rp=week")
    assert (v1.mode, v1.base_url, v1.database, v1.retention_policy) == (
        "v1",
        "http://localhost:8086",
        "cw",
        "week",
    )
    assert (v1.username, v1.password) == ("me", "p@ss")
    with pytest.raises(StoreError, match="needs org and bucket"):
        InfluxSettings.parse("influx2://localhost:8086?token=x")
    with pytest.raises(StoreError, match="needs a database"):
        InfluxSettings.parse("influx1://localhost:8086")
    with pytest.raises(StoreError, match="scheme must be one of"):
        InfluxSettings.parse("http://localhost:8086")
    assert "secret" not in repr(InfluxHistory("influx2://h:1?org=o&bucket=b&token=secret"))


@pytest.mark.parametrize(
    ("tags", "fields"),
    [
        ({"device": "p-1", "station": "s 1,a=b"}, {"info": ODD, "n": 3, "x": 1.25, "ok": True}),
        ({"device": "a\nb\tc"}, {"s": '"', "f": -0.5}),
    ],
)
def test_line_matches_influxdb_client_point(tags: dict[str, str], fields: dict[str, Any]) -> None:
    point = Point("m x,y")
    for k, v in sorted(tags.items()):
        point = point.tag(k, v)
    for k, v in fields.items():
        point = point.field(k, v)
    point = point.time(1_700_000_000_123_456_789, WritePrecision.NS)
    # Point sorts fields by key; the order of fields means nothing to InfluxDB
    ours = line("m x,y", sorted(tags.items()), sorted(fields.items()), 1_700_000_000_123_456_789)
    assert ours == point.to_line_protocol()


def test_influxql_quoting() -> None:
    assert quote_string("a'b\\c") == "'a\\'b\\\\c'"
    assert quote_ident('we"ird\\') == '"we\\"ird\\\\"'
