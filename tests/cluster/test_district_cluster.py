"""The simulated district through the scaled-out shape, compared with the simulator's
ground-truth log: real mosquitto, a real PostgreSQL, two ``chargewatch ingest`` workers and
two ``chargewatch api`` replicas, all processes. Both replicas must show every device and
station as the truth has it, a few devices' history as they published it, every message
stored once; then one replica is killed (SIGKILL) and the other answers the same."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devices.contract import parse_ts
from tests.alerts.keys import maintainer_get
from tests.cluster.processes import Cluster, cluster
from tests.e2e.test_district import (
    SIM_START,
    assert_matches_truth,
    simulator,
    wait_for_words,
)
from tests.pg_server import PgServer
from tests.servers import Service, eventually

pytestmark = pytest.mark.e2e

# a pile and a cabinet of three stations (partitions differ), checked message by message
HISTORY_DEVICES = 3


@dataclass
class Run:
    cluster: Cluster
    truth: Path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, pg_session: PgServer) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("district-cluster")
    with cluster(tmp, pg_session, workers=2, replicas=2) as c:
        truth = tmp / "truth.jsonl"
        with simulator(c.broker.url, truth, tmp / "simulator.log") as sim:
            wait_for_words(sim, {"READY", "HOLD"}, timeout=120)
            # each replica shows the truth within the test's patience (NOTIFY, then memory)
            for replica in c.replicas:
                eventually(
                    lambda r=replica: assert_matches_truth(r, truth, c.catalog),  # type: ignore[misc]
                    timeout=30,
                    interval=0.5,
                )
            yield Run(c, truth)


def published(truth: Path) -> list[tuple[str, str, dict[str, Any]]]:
    """(device, channel, payload) of every message the simulator published, in order."""
    out = []
    for line in truth.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("hold"):
            continue
        _, _, device_id, channel = entry["topic"].split("/")
        out.append((device_id, channel, json.loads(entry["payload"])))
    return out


def test_both_replicas_show_the_district_as_the_ground_truth(run: Run) -> None:
    for replica in run.cluster.replicas:
        assert_matches_truth(replica, run.truth, run.cluster.catalog)
        body = replica.get("/v1/stations").json()["stations"]
        assert sum(s["piles"]["online"] + s["cabinets"]["online"] for s in body) == len(
            run.cluster.catalog.devices
        )
        assert maintainer_get(replica, "/v1/deadletters").json()["counts"] == {}
    # both workers took part: each consumed some partitions of the district
    applied = [w.gauge("chargewatch_messages_applied_total") for w in run.cluster.workers]
    assert all(n > 0 for n in applied), applied
    assert sum(applied) == len(published(run.truth)), applied


def test_every_published_message_is_stored_once(run: Run) -> None:
    sent = set()
    for device_id, channel, body in published(run.truth):
        kind = channel
        if channel == "state":
            kind = "birth" if body["online"] else "death"
        sent.add((device_id, body["boot"], body["seq"], kind))
    with psycopg.connect(run.cluster.db) as conn:
        stored = conn.execute("SELECT device_id, boot, seq, type FROM messages").fetchall()
    assert len(stored) == len(set(stored)), "a message stored twice"
    missing = sent - set(stored)
    assert not missing, f"{len(missing)} published messages not stored, e.g. {sorted(missing)[:3]}"
    assert set(stored) == sent


def history_devices(run: Run) -> list[str]:
    out = []
    for station in list(run.cluster.catalog.stations)[:HISTORY_DEVICES]:
        devices = run.cluster.catalog.station_devices(station)
        for kind in ("pile", "cabinet"):
            out += [d.id for d in devices if d.kind == kind][:1]
    return out


def test_a_few_devices_history_is_what_they_published_on_both_replicas(run: Run) -> None:
    sent = published(run.truth)
    end = max(parse_ts(body["ts"]) for _, _, body in sent if "ts" in body)
    window = {"from": SIM_START, "to": _rfc3339(end + 60_000), "every": "60s"}
    checked_events = 0
    for device_id in history_devices(run):
        answers = [
            maintainer_get(r, f"/v1/devices/{device_id}/history", **window)
            for r in run.cluster.replicas
        ]
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        first, second = (a.json() for a in answers)
        assert first == second, f"{device_id}: the replicas' histories differ"
        mine = [(ch, body) for d, ch, body in sent if d == device_id]
        # births, deaths and events at the device's own times (a Will carries none: the
        # store gives it the time it arrived)
        want = []
        for ch, body in mine:
            if ch == "state":
                want.append(("birth" if body["online"] else "death", body.get("ts")))
            elif ch == "event":
                want.append((body["type"], body["ts"]))
        got = Counter((c["type"], parse_ts(c["t"])) for c in first["changes"])
        assert sorted(got.elements()) == sorted(
            (kind, parse_ts(t) if t is not None else got_time(got, kind)) for kind, t in want
        ), device_id
        checked_events += len(want)
        # the last point holds the device's last status, as published
        statuses = [body for ch, body in mine if ch == "status"]
        last = max(statuses, key=lambda b: (parse_ts(b["ts"]), b["seq"]))
        point = first["points"][-1]
        assert parse_ts(point["reported_at"]) == parse_ts(last["ts"]), device_id
        units = last["ports"] if last["kind"] == "pile" else last["slots"]
        states: dict[str, int] = {}
        for u in units:
            states[u["state"]] = states.get(u["state"], 0) + 1
        assert {k: n for k, n in point["states"].items() if n} == states, device_id
    assert checked_events > 2 * len(history_devices(run)), "the devices had events to compare"


def got_time(got: Counter[tuple[str, int]], kind: str) -> int:
    """The stored time of the one ``kind`` change without a time of its own (a Will)."""
    times = [t for k, t in got if k == kind]
    assert times, kind
    return max(times)


def _rfc3339(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def answers(replica: Service, run: Run) -> dict[str, Any]:
    """What a replica says of every station and device, without the ages that tick."""
    out: dict[str, Any] = {"stations": _steady(replica.get("/v1/stations").json())}
    for station in run.cluster.catalog.stations:
        out[station] = _steady(maintainer_get(replica, f"/v1/stations/{station}").json())
    return out


# what moves between two reads with no change of state: ages and countdowns tick, and the
# frozen simulators still send a status every heartbeat (new seq, new time, same units)
TICKING = {"data_age_s", "last_known", "last_seen", "last_updated", "status_seq"}


def _steady(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _steady(v)
            for k, v in value.items()
            if k not in TICKING and not k.endswith(("_in_s", "_at"))
        }
    if isinstance(value, list):
        return [_steady(v) for v in value]
    return value


def test_one_replica_killed_the_other_answers_the_same(run: Run) -> None:
    a, b = run.cluster.replicas
    before = eventually(lambda: _same(answers(a, run), answers(b, run)), timeout=20)
    a.process.kill()  # SIGKILL
    assert a.process.proc is not None
    assert a.process.proc.returncode == -9
    assert b.get("/readyz").status_code == 200
    assert answers(b, run) == before
    assert_matches_truth(b, run.truth, run.cluster.catalog)


def _same(x: dict[str, Any], y: dict[str, Any]) -> dict[str, Any]:
    assert x == y, f"the replicas differ at {differences(x, y)[:5]}"
    return x


def differences(x: Any, y: Any, path: str = "") -> list[str]:
    """Where two JSON values differ (paths, with both values)."""
    if isinstance(x, dict) and isinstance(y, dict):
        return [d for k in sorted(x.keys() | y.keys())
                for d in differences(x.get(k), y.get(k), f"{path}.{k}")]  # fmt: skip
    if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        return [
            d
            for i, (a, b) in enumerate(zip(x, y, strict=True))
            for d in differences(a, b, f"{path}[{i}]")
        ]
    return [] if x == y else [f"{path}: {x!r} != {y!r}"]
