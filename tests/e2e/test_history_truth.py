"""The embedded history rebuilds the past exactly: the simulated district runs through a
real mosquitto into ``chargewatch serve``, then every hour of statuses is compacted into
blocks, and each device's state at random past instants - its last status (byte-exact) and
the events so far - is rebuilt from the store and compared with the simulator's
ground-truth log. The district run is the one test_district restarts a service on
(``district_run``): this test compacts a copy of its store."""

from __future__ import annotations

import json
import random
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from devices.catalog import Catalog
from devices.contract import parse_ts
from ingest.sqlite_store import SQLiteStore
from tests.e2e.test_district import SIM_SECONDS, SIM_START, DistrictRun

pytestmark = pytest.mark.e2e

INSTANTS = 25


def published(truth: Path) -> dict[str, dict[str, list[tuple[int, int, str]]]]:
    """Per device and channel (status, event): (device time, seq, payload text) as sent."""
    out: dict[str, dict[str, list[tuple[int, int, str]]]] = defaultdict(lambda: defaultdict(list))
    for line in truth.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("hold"):
            continue
        _, _, device_id, channel = entry["topic"].split("/")
        if channel in ("status", "event"):
            body = json.loads(entry["payload"])
            out[device_id][channel].append((parse_ts(body["ts"]), body["seq"], entry["payload"]))
    return out


def state_at(rows: list[dict[str, Any]], t_ms: int) -> tuple[str | None, list[str]]:
    """(the last status at or before ``t_ms``, the events until then) from stored rows."""
    before = [r for r in rows if r["ts_ms"] <= t_ms]
    statuses = [r for r in before if r["type"] == "status"]
    last = max(statuses, key=lambda r: (r["ts_ms"], r["seq"]))["payload"] if statuses else None
    return last, sorted(r["payload"] for r in before if r["type"] == "event")


def truth_at(
    sent: dict[str, list[tuple[int, int, str]]], t_ms: int
) -> tuple[str | None, list[str]]:
    statuses = [s for s in sent["status"] if s[0] <= t_ms]
    last = max(statuses)[2] if statuses else None
    return last, sorted(e[2] for e in sent["event"] if e[0] <= t_ms)


def test_device_state_at_past_instants_is_rebuilt_from_the_compacted_store(
    district_run: DistrictRun, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(district_run.data, data)  # the service is stopped: its files are at rest
    sent = published(district_run.truth)
    catalog = Catalog.load()
    store = SQLiteStore.in_dir(data)
    try:
        blocks = 0
        while n := store.compact(2**62):  # every hour of device time is over
            blocks += n
        assert blocks >= len(catalog.devices), "each device's statuses went into blocks"
        raw = store._db.query("SELECT count(*) FROM messages WHERE type = 'status'")[0][0]
        assert raw == 0
        start = parse_ts(SIM_START)
        rng = random.Random(3)
        instants = sorted(rng.randrange(start, start + SIM_SECONDS * 1000) for _ in range(INSTANTS))
        compared = changed = 0
        for spec in catalog.devices.values():
            rows = store.messages(spec.id, limit=1_000_000)
            statuses = [r for r in rows if r["type"] == "status"]
            assert len(statuses) == len(sent[spec.id]["status"]), spec.id  # each one, once
            for t in instants:
                got = state_at(rows, t)
                assert got == truth_at(sent[spec.id], t), (spec.id, t)
                compared += 1
                changed += got[0] is not None and got[0] != statuses[0]["payload"]
        assert compared == INSTANTS * len(catalog.devices)
        assert changed > compared // 2, "the instants see the state change"
    finally:
        store.close()
