"""Disk per device-day of the embedded history, on district-shaped traffic.

A day of the simulated district (10-port piles, 12-slot cabinets of the shipped catalog,
the simulators' own models) in virtual time: each device beats every 0.8-0.95 x 30 s of
device time, publishes a status on every change and its events, exactly as
``simulators.device.SimDevice`` does on the wire. The messages go into ``SQLiteStore`` in
ingest's batches and ``compact`` runs every simulated hour (what the service's housekeeping
does). Reported: the whole file after the day (history, index, WAL checkpointed, with the
raw statuses of the hour still open), and the day's history once fully compacted and
vacuumed (what each further day adds), both per device-day.

    chargewatch bench --parts history
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from devices.contract import decode
from devices.topics import Channel
from ingest.sqlite_store import BLOCK_MS, DB_FILE, SQLiteStore
from ingest.store import HistoryRow, MessageType

BATCH = 1000
TARGET_MB = 0.25
DAY_START_S = 1_796_140_800.0  # simulators.virtualday's: 2026-12-02T00:00:00+08:00


def history_row(
    device_id: str, station_id: str, kind: str, channel: Channel, at: float, boot: str,
    seq: int, text: str,
) -> HistoryRow:  # fmt: skip
    """The row ingest stores for one publish (its device time; a death's is its arrival)."""
    msg = decode(channel, text.encode())
    types: dict[str, MessageType] = {"status": "status", "event": "event"}
    online = getattr(msg, "online", False)
    mtype = ("birth" if online else "death") if channel == "state" else types[channel]
    ts = msg.ts if msg.ts is not None else round(at * 1000)
    return HistoryRow(device_id, station_id, kind, mtype, boot, seq, ts, ts + 40, text, msg)


def _published(devices: int | None, hours: float) -> Iterator[dict[str, Any]]:
    """The virtual district's publishes, from ``python -m simulators.virtualday`` (api may
    not import the simulators: tests/test_architecture.py)."""
    argv = [sys.executable, "-m", "simulators.virtualday", "--hours", str(hours)]
    if devices is not None:
        argv += ["--devices", str(devices)]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            yield json.loads(line)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)} exited with {proc.returncode}")


def _file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def district_day(work: Path, devices: int | None = None, hours: float = 24.0) -> dict[str, Any]:
    """Run ``hours`` of the district (``devices`` spread over the catalog; None: all) into
    a fresh embedded store; sizes per device-day."""
    from devices.catalog import Catalog

    catalog = Catalog.load()
    data = work / "history-day"
    data.mkdir(parents=True, exist_ok=True)
    path = data / DB_FILE
    for old in data.glob(DB_FILE + "*"):
        old.unlink()
    store = SQLiteStore(path, synchronous="NORMAL")
    started = time.monotonic()
    messages = statuses = 0
    seen: dict[str, str] = {}  # device -> kind
    pending: list[HistoryRow] = []
    next_compact = DAY_START_S + 3600
    at = DAY_START_S
    try:
        for w in _published(devices, hours):
            device = catalog.devices[w["device_id"]]
            seen[device.id] = device.kind
            at = w["at"]
            pending.append(
                history_row(
                    device.id,
                    device.station_id,
                    device.kind,
                    w["channel"],
                    at,
                    w["boot"],
                    w["seq"],
                    w["text"],
                )
            )
            if len(pending) >= BATCH:
                messages += len(pending)
                statuses += sum(1 for r in pending if r.type == "status")
                store.append(pending)
                pending = []
            if at >= next_compact:  # the hour just over, as housekeeping does
                messages += len(pending)
                statuses += sum(1 for r in pending if r.type == "status")
                store.append(pending)
                pending = []
                while store.compact(round(at * 1000)):
                    pass
                next_compact += 3600
        messages += len(pending)
        statuses += sum(1 for r in pending if r.type == "status")
        store.append(pending)
        while store.compact(round(at * 1000)):
            pass
        elapsed = time.monotonic() - started
        stored = store.count_messages()
    finally:
        store.close()
    end = DAY_START_S + hours * 3600
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        whole = _file_bytes(path)
        open_hour = db.execute("SELECT count(*) FROM messages WHERE type = 'status'").fetchone()[0]
    finally:
        db.close()
    compacted = SQLiteStore(path)
    try:
        while compacted.compact(round(end * 1000) + BLOCK_MS):
            pass
    finally:
        compacted.close()
    db = sqlite3.connect(path)
    try:
        db.execute("VACUUM")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    day_only = _file_bytes(path)
    device_days = len(seen) * hours / 24
    return {
        "devices": len(seen),
        "piles": sum(1 for k in seen.values() if k == "pile"),
        "cabinets": sum(1 for k in seen.values() if k == "cabinet"),
        "hours": hours,
        "messages": messages,
        "stored": stored,
        "statuses": statuses,
        "statuses_per_device_day": statuses / device_days,
        "open_hour_statuses": open_hour,
        "file_bytes": whole,
        "mb_per_device_day_file": whole / device_days / 1e6,
        "compacted_bytes": day_only,
        "mb_per_device_day": day_only / device_days / 1e6,
        "bytes_per_message": day_only / messages,
        "target_mb": TARGET_MB,
        "elapsed_s": elapsed,
    }
