"""Retention against a real ``chargewatch serve`` on a real mosquitto: a large store whose
history is past ``history_days`` is pruned in the background while a device keeps
publishing, and what it publishes still reaches the API promptly (the prune's batches are
short transactions, so ingest's writes interleave)."""

from __future__ import annotations

import functools
import json
import sqlite3
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devices.contract import Death
from ingest.sqlite_store import SQLiteStore
from ingest.store import HistoryRow, MessageType
from tests.servers import Process, chargewatch_serve, eventually

pytestmark = pytest.mark.e2e

DEVICE = "SVC-P03"
DAY_MS = 86_400_000
OLD_ROWS = 150_000
RECENT_ROWS = 100
LATENCY_BOUND_S = 2.0  # generous: the machine is shared; a stalled ingest takes far longer
_MSG = Death(v=1, online=False, boot="old", seq=0)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def old_row(
    device_id: str, mtype: MessageType, boot: str, seq: int, ts_ms: int, payload: str
) -> HistoryRow:
    return HistoryRow(device_id, "st", "pile", mtype, boot, seq, ts_ms, ts_ms, payload, _MSG)


def yesterday(t0: int) -> list[HistoryRow]:
    """A catalog pile's birth and an hour of statuses every 30 s, a day ago."""
    ports = [{"n": n, "state": "available"} for n in range(1, 11)]
    birth = {"v": 1, "ts": t0, "boot": "yday", "seq": 0, "online": True, "kind": "pile",
             "ports": 10, "heartbeat_s": 30}  # fmt: skip
    rows = [HistoryRow(DEVICE, "service-centre", "pile", "birth", "yday", 0, t0, t0,
                       json.dumps(birth), _MSG)]  # fmt: skip
    for seq in range(1, 121):
        ts = t0 + seq * 30_000
        status = {"v": 1, "ts": ts, "boot": "yday", "seq": seq, "kind": "pile", "ports": ports}
        rows.append(HistoryRow(DEVICE, "service-centre", "pile", "status", "yday", seq, ts, ts,
                               json.dumps(status), _MSG))  # fmt: skip
    return rows


def big_store(data_dir: Path) -> None:
    """OLD_ROWS statuses of 200 days ago (past the 90-day retention) and RECENT_ROWS of
    yesterday, of devices not in the catalog (history only); an hour of a catalog pile
    yesterday."""
    store = SQLiteStore.in_dir(data_dir, synchronous="OFF")
    old = now_ms() - 200 * DAY_MS
    payload = json.dumps({"v": 1, "kind": "pile", "pad": "x" * 300})
    try:
        for start in range(0, OLD_ROWS, 10_000):
            store.append(
                [
                    old_row(f"OLD-{i % 50}", "status", "old", i, old + i, payload)
                    for i in range(start, start + 10_000)
                ]
            )
        recent = now_ms() - DAY_MS
        store.append(
            [old_row("OLD-0", "event", "new", i, recent + i, payload) for i in range(RECENT_ROWS)]
        )
        store.append(yesterday(recent))
    finally:
        store.close()


def count_old(data_dir: Path) -> int:
    db = sqlite3.connect(data_dir / "chargewatch.db", timeout=10)
    try:
        return int(db.execute("SELECT count(*) FROM messages WHERE boot = 'old'").fetchone()[0])
    finally:
        db.close()


def housekept(data_dir: Path) -> None:
    """Yesterday's statuses are compacted, and its hours rolled up for the pile."""
    db = sqlite3.connect(data_dir / "chargewatch.db", timeout=10)
    try:
        raw = db.execute("SELECT count(*) FROM messages WHERE boot = 'yday' AND type = 'status'")
        blocks = db.execute(
            "SELECT sum(statuses) FROM status_blocks WHERE device_id = ?", (DEVICE,)
        )
        online = db.execute(
            "SELECT sum(json_extract(data, '$.minutes_online')) FROM rollups"
            " WHERE scope = 'device' AND id = ?",
            (DEVICE,),
        )
        assert (raw.fetchone()[0], blocks.fetchone()[0]) == (0, 120)
        # the pile reported for an hour a day ago: 60 minutes online, give or take a minute
        # at each end (when the hour starts and when three heartbeats have passed)
        assert 58 <= (online.fetchone()[0] or 0) <= 62
    finally:
        db.close()


@pytest.fixture
def client(broker: Process) -> Iterator[paho.Client]:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="retention-test")
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    yield c
    c.loop_stop()
    c.disconnect()


def send(client: paho.Client, channel: str, body: dict[str, object]) -> None:
    topic = f"cw/v1/{DEVICE}/{channel}"
    client.publish(topic, json.dumps(body), qos=1).wait_for_publish(5)


def test_publish_to_api_latency_while_a_large_prune_runs(
    broker: Process, client: paho.Client, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    big_store(data)
    assert count_old(data) == OLD_ROWS
    env = {
        "CHARGEWATCH_INGEST__HISTORY_DAYS": "90",
        "CHARGEWATCH_INGEST__HOUSEKEEPING_S": "1",  # the first pass one second after start
    }
    with chargewatch_serve(tmp_path / "serve", broker.url, data_dir=data, env=env) as service:
        ports = [{"n": n, "state": "available"} for n in range(1, 11)]
        send(client, "state", {"v": 1, "ts": now_ms(), "boot": "boot1", "seq": 0, "online": True,
                               "kind": "pile", "ports": 10, "heartbeat_s": 30})  # fmt: skip

        def shown(seq: int) -> None:
            assert service.get(f"/v1/devices/{DEVICE}").json()["status_seq"] == seq

        latencies: list[float] = []
        during: list[float] = []  # measured while old rows were still being deleted
        seq = 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            left_before = count_old(data)
            seq += 1
            sent = time.monotonic()
            send(client, "status", {"v": 1, "ts": now_ms(), "boot": "boot1", "seq": seq,
                                    "kind": "pile", "ports": ports})  # fmt: skip
            eventually(functools.partial(shown, seq), timeout=30, interval=0.01)
            latency = time.monotonic() - sent
            latencies.append(latency)
            left_after = count_old(data)
            if 0 < left_after < left_before:
                during.append(latency)
            if left_after == 0:
                break
        assert count_old(data) == 0, "the prune finished"
        eventually(lambda: housekept(data), timeout=60, interval=0.2)
        metrics = dict(
            line.rsplit(" ", 1)
            for line in service.get("/metrics").text.splitlines()
            if line.startswith("chargewatch_history_")
        )
        assert float(metrics["chargewatch_history_pruned_total"]) == OLD_ROWS
        # yesterday's hour of statuses spans two hours of the clock
        assert float(metrics["chargewatch_history_blocks_compacted_total"]) in (1, 2)
    print(
        f"publish-to-API while pruning {OLD_ROWS} rows: {len(during)} samples,"
        f" median {statistics.median(during) * 1000:.0f} ms, max {max(during) * 1000:.0f} ms"
    )
    assert len(during) >= 3, f"the prune ran during the measurements ({len(during)})"
    assert max(latencies) < LATENCY_BOUND_S, latencies
    store = SQLiteStore.in_dir(data)
    try:
        assert len(store.messages("OLD-0", limit=10_000)) == RECENT_ROWS, "recent history kept"
    finally:
        store.close()
