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

import sqlite3
import time
from pathlib import Path
from typing import Any

from devices.catalog import Catalog, Device
from devices.contract import decode
from devices.topics import Channel
from ingest.sqlite_store import BLOCK_MS, DB_FILE, SQLiteStore
from ingest.store import HistoryRow, MessageType
from simulators import payloads
from simulators.cabinet import CabinetModel
from simulators.model import DEFAULT_FAULT_RATE, STEP_S, DeviceModel
from simulators.pile import PileModel
from simulators.rng import device_rng

HEARTBEAT_S = 30.0
DAY_START_S = 1_796_140_800.0  # 2026-12-01T00:00:00+08:00, midnight local
BATCH = 1000
TARGET_MB = 0.25


class _Device:
    def __init__(self, device: Device, start: float, seed: int) -> None:
        self.device = device
        model_type = PileModel if device.kind == "pile" else CabinetModel
        rng = device_rng(seed, device.id)
        self.model: DeviceModel = model_type(device.spec, rng, start, fault_rate=DEFAULT_FAULT_RATE)
        self.model.drain()
        self.boot = f"{rng.getrandbits(48):012x}"
        self.seq = 0
        self.beat_s = HEARTBEAT_S * rng.uniform(0.8, 0.95)
        self.last_status = start

    def row(self, channel: Channel, at: float, text: str) -> HistoryRow:
        msg = decode(channel, text.encode())
        mtype: MessageType = "birth" if channel == "state" else channel  # type: ignore[assignment]
        ts = msg.ts if msg.ts is not None else round(at * 1000)
        d = self.device
        return HistoryRow(d.id, d.station_id, d.kind, mtype, self.boot, self.seq, ts,
                          ts + 40, text, msg)  # fmt: skip

    def send(self, channel: Channel, at: float, body: dict[str, Any]) -> HistoryRow:
        text = payloads.message(self.device.kind, at, self.boot, self.seq, body)
        row = self.row(channel, at, text)
        self.seq += 1
        if channel == "status":
            self.last_status = at
        return row

    def birth(self, at: float) -> list[HistoryRow]:
        body = payloads.birth_body(self.model.birth_fields(), int(HEARTBEAT_S))
        return [self.send("state", at, body), self.send("status", at, self.model.snapshot())]

    def until(self, t: float) -> list[HistoryRow]:
        """What the device publishes in (t - STEP_S, t]: events, a status on change, and
        heartbeats (a device beats ``beat_s`` after its last status)."""
        rows: list[HistoryRow] = []
        self.model.advance_to(t)
        drained = self.model.drain()
        for event in drained.events:
            rows.append(self.send("event", event.at, event.body))
        if drained.changed:
            rows.append(self.send("status", t, self.model.snapshot()))
        while self.last_status + self.beat_s <= t:
            at = self.last_status + self.beat_s
            rows.append(self.send("status", at, self.model.snapshot()))
        return rows


def _file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def district_day(
    work: Path, devices: int | None = None, hours: float = 24.0, seed: int = 1
) -> dict[str, Any]:
    """Run ``hours`` of the district (the first ``devices`` of the catalog, spread over it)
    into a fresh embedded store; sizes per device-day."""
    catalog = Catalog.load()
    every = list(catalog.devices.values())
    chosen = (
        every
        if devices is None or devices >= len(every)
        else every[:: len(every) // devices][:devices]
    )
    data = work / "history-day"
    data.mkdir(parents=True, exist_ok=True)
    path = data / DB_FILE
    for old in data.glob(DB_FILE + "*"):
        old.unlink()
    store = SQLiteStore(path, synchronous="NORMAL")
    sims = [_Device(d, DAY_START_S, seed) for d in chosen]
    started = time.monotonic()
    messages = statuses = 0
    pending: list[HistoryRow] = []

    def flush() -> None:
        nonlocal pending
        for i in range(0, len(pending), BATCH):
            store.append(pending[i : i + BATCH])
        pending = []

    try:
        for sim in sims:
            pending += sim.birth(DAY_START_S)
        t = DAY_START_S
        end = DAY_START_S + hours * 3600
        next_compact = DAY_START_S + 3600
        while t + STEP_S <= end:
            t += STEP_S
            for sim in sims:
                pending += sim.until(t)
            if len(pending) >= BATCH:
                messages += len(pending)
                statuses += sum(1 for r in pending if r.type == "status")
                flush()
            if t >= next_compact:  # the hour just over, as housekeeping does
                while store.compact(round(t * 1000)):
                    pass
                next_compact += 3600
        messages += len(pending)
        statuses += sum(1 for r in pending if r.type == "status")
        flush()
        while store.compact(round(t * 1000)):
            pass
        elapsed = time.monotonic() - started
        stored = store.count_messages()
    finally:
        store.close()
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
    device_days = len(sims) * hours / 24
    return {
        "devices": len(sims),
        "piles": sum(1 for s in sims if s.device.kind == "pile"),
        "cabinets": sum(1 for s in sims if s.device.kind == "cabinet"),
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
