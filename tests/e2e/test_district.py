"""The whole path, end to end: the simulated district -> MQTT -> ingest -> store -> API,
compared exactly with the simulator's ground-truth log, on a real mosquitto and on the
embedded broker; then a restart of the service keeps state and history.

The run on mosquitto (``district_on_mosquitto``) is made once for the e2e package
(``tests/e2e/conftest.py``, fixture ``district_run``): this module restarts a service on its
data, and ``test_history_truth`` compacts a copy of its store."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devices.catalog import Catalog
from tests.alerts.keys import maintainer_get
from tests.servers import (
    Process,
    Service,
    chargewatch_argv,
    chargewatch_serve,
    eventually,
    free_port,
    mosquitto,
)

pytestmark = pytest.mark.e2e

RELEASE_SOC = 90  # the service default; the shipped catalog sets no per-device level
SIM_START = "2026-11-28T10:30:00+08:00"  # through the lunch peak
SIM_SECONDS = 3 * 3600
SPEED = 1200  # 3 simulated hours in 9 s


@contextmanager
def simulator(broker: str, truth: Path, log: Path) -> Iterator[subprocess.Popen[str]]:
    argv = chargewatch_argv(
        "simulate",
        "--broker", broker,
        "--seed", "7",
        "--speed", str(SPEED),
        "--duration", str(SIM_SECONDS),
        "--start", SIM_START,
        "--fault-rate", "2",
        "--truth", str(truth),
    )  # fmt: skip
    with open(log, "w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def wait_for_words(proc: subprocess.Popen[str], words: set[str], timeout: float) -> None:
    """Wait until the simulator has printed a line starting with each of ``words``."""
    assert proc.stdout is not None
    seen: set[str] = set()
    done = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.update(line.split()[:1])
            if words <= seen:
                done.set()
                return

    threading.Thread(target=read, daemon=True).start()
    if not done.wait(timeout):
        raise AssertionError(f"simulator printed {sorted(seen)}, not all of {sorted(words)}")


def ground_truth(truth: Path) -> dict[str, dict[str, Any]]:
    """The last birth/death and the last status each device published, from the log."""
    last: dict[str, dict[str, Any]] = {}
    for line in truth.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("hold"):
            continue
        _, _, device_id, channel = entry["topic"].split("/")
        payload = json.loads(entry["payload"])
        if channel in ("state", "status"):
            last.setdefault(device_id, {})[channel] = payload
    return last


def expected_device(truth: dict[str, Any], flagged: Collection[str] = ()) -> dict[str, Any]:
    """What the service must show for a device, from the ground truth; ``flagged``: serials
    of packs with a recorded safety event (battery passports), never counted ready."""
    assert "status" in truth, "device has not published a status yet"
    status = truth["status"]
    online = truth["state"]["online"]
    if status["kind"] == "pile":
        units = [
            {
                "n": p["n"],
                "state": p["state"],
                "power_w": float(p.get("power_w", 0)),
                "energy_wh": float(p.get("energy_wh", 0)),
                "fault": p.get("fault"),
            }
            for p in sorted(status["ports"], key=lambda p: p["n"])
        ]
    else:
        units = [
            {
                "n": s["n"],
                "state": s["state"],
                "battery": s.get("battery"),
                "soc": None if s.get("soc") is None else float(s["soc"]),
                "temp_c": None if s.get("temp_c") is None else float(s["temp_c"]),
                "fault": s.get("fault"),
            }
            for s in sorted(status["slots"], key=lambda s: s["n"])
        ]
    device_faults = list(status.get("faults", []))
    if status.get("smoke") and "smoke" not in device_faults:
        device_faults.append("smoke")
    if status["kind"] == "pile":
        free = sum(1 for u in units if u["state"] == "available" and not u["fault"])
    else:
        free = sum(
            1
            for u in units
            if u["state"] == "ready"
            and not u["fault"]
            and (u["soc"] or 0) >= RELEASE_SOC
            and u["battery"] not in flagged
        )
    return {
        "online": online,
        "units": units,
        "faults": device_faults,
        "free": free if online and not device_faults else 0,
    }


def actual_device(view: dict[str, Any]) -> dict[str, Any]:
    if view["kind"] == "pile":
        keys = ("n", "state", "power_w", "energy_wh", "fault")
        units = [{k: p[k] for k in keys} for p in view["ports"]]
        free = view["ports_free"]
    else:
        keys = ("n", "state", "battery", "soc", "temp_c", "fault")
        units = [{k: s[k] for k in keys} for s in view["slots"]]
        free = view["batteries_ready"]
    return {"online": view["online"], "units": units, "faults": view["faults"], "free": free}


def flagged_packs(service: Service, view: dict[str, Any]) -> set[str]:
    """The packs a cabinet holds that the service flagged, each checked to have a recorded
    safety event in its passport (the simulator's injected faults flag packs)."""
    flagged = {s["battery"] for s in view.get("slots", []) if s.get("flagged")}
    for serial in flagged:
        passport = maintainer_get(service, f"/v1/batteries/{serial}").json()
        assert passport["flagged"] is True, passport
        assert passport["events"], f"{serial} is flagged with no safety event: {passport}"
    return flagged


def assert_matches_truth(service: Service, truth_file: Path, catalog: Catalog) -> None:
    truth = ground_truth(truth_file)
    assert len(truth) == len(catalog.devices), "every device published"
    mismatches = []
    for station in catalog.stations.values():
        # with a key: battery serials are for maintainers (docs/security.md)
        detail = maintainer_get(service, f"/v1/stations/{station.id}").json()
        views = {d["id"]: d for d in detail["devices"]}
        expected_free = {"pile": 0, "cabinet": 0}
        online = {"pile": 0, "cabinet": 0}
        for spec in station.devices:
            want = expected_device(truth[spec.id], flagged_packs(service, views[spec.id]))
            got = actual_device(views[spec.id])
            if want != got:
                mismatches.append((spec.id, want, got))
            expected_free[spec.kind] += want["free"]
            online[spec.kind] += want["online"]
        assert detail["piles"]["ports_free"] == expected_free["pile"], station.id
        assert detail["cabinets"]["batteries_ready"] == expected_free["cabinet"], station.id
        assert detail["piles"]["online"] == online["pile"], station.id
        assert detail["cabinets"]["online"] == online["cabinet"], station.id
    assert not mismatches, f"{len(mismatches)} devices differ, first: {mismatches[0]}"
    listing = {s["id"]: s for s in service.get("/v1/stations").json()["stations"]}
    for station in catalog.stations.values():
        detail = service.get(f"/v1/stations/{station.id}").json()
        assert listing[station.id]["piles"] == detail["piles"]
        assert listing[station.id]["cabinets"] == detail["cabinets"]


def run_district(tmp_path: Path, service: Service, broker_url: str) -> Path:
    truth = tmp_path / "truth.jsonl"
    catalog = Catalog.load()
    with simulator(broker_url, truth, tmp_path / "simulator.log") as sim:
        wait_for_words(sim, {"READY", "HOLD"}, timeout=120)
        eventually(lambda: assert_matches_truth(service, truth, catalog), timeout=30, interval=0.5)
        body = service.get("/v1/stations").json()["stations"]
        assert sum(s["piles"]["online"] + s["cabinets"]["online"] for s in body) == 412
        activity = [json.loads(line) for line in truth.read_text().splitlines()]
        events = [e for e in activity if e.get("topic", "").endswith("/event")]
        assert len(events) > 100, "the simulated hours produced sessions and swaps"
    return truth


@dataclass(frozen=True)
class DistrictRun:
    """The district run through a real mosquitto into ``chargewatch serve`` (now stopped):
    the broker (still up), the service's data dir, the ground truth and its dead letters."""

    broker: Process
    data: Path
    truth: Path
    dead_letters: dict[str, Any]


@contextmanager
def district_on_mosquitto(tmp: Path) -> Iterator[DistrictRun]:
    with mosquitto(tmp / "mosquitto") as broker:
        data = tmp / "data"
        with chargewatch_serve(tmp / "serve", broker.url, data_dir=data) as service:
            truth = run_district(tmp, service, broker.url)
            dead = maintainer_get(service, "/v1/deadletters").json()
        yield DistrictRun(broker, data, truth, dead)


def test_district_on_mosquitto_and_restart(district_run: DistrictRun, tmp_path: Path) -> None:
    assert district_run.dead_letters["counts"] == {}, district_run.dead_letters
    broker, data, truth = district_run.broker, district_run.data, district_run.truth
    # the simulator said goodbye (graceful deaths) while the service was still up:
    # after a restart, state and history are back from the store before any new message
    with chargewatch_serve(tmp_path / "serve2", broker.url, data_dir=data) as again:
        catalog = Catalog.load()
        eventually(lambda: assert_matches_truth(again, truth, catalog), timeout=20)
        body = again.get("/v1/stations").json()["stations"]
        assert sum(s["piles"]["online"] + s["cabinets"]["online"] for s in body) == 0
        assert_history_complete(data, truth)


def assert_history_complete(data: Path, truth: Path) -> None:
    """Every message the simulator published is stored exactly once."""
    import sqlite3

    published = set()
    for line in truth.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("hold"):
            continue
        payload = json.loads(entry["payload"])
        kind = entry["topic"].rsplit("/", 1)[1]
        if kind == "state":
            kind = "birth" if payload["online"] else "death"
        published.add((entry["topic"].split("/")[2], payload["boot"], payload["seq"], kind))
    db = sqlite3.connect(data / "chargewatch.db")
    try:
        stored = db.execute("SELECT device_id, boot, seq, type FROM messages").fetchall()
    finally:
        db.close()
    assert len(stored) == len(set(stored))
    missing = published - set(stored)
    assert not missing, f"{len(missing)} published messages not stored, e.g. {sorted(missing)[:3]}"


def test_district_on_embedded_broker(tmp_path: Path) -> None:
    port = free_port()
    with chargewatch_serve(tmp_path / "serve", None, broker_port=port) as service:
        run_district(tmp_path, service, f"mqtt://127.0.0.1:{port}")
