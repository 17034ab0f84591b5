"""Battery passports in-process: messages fed to the twins, the passports and a real alert
engine in the pipeline's order (passports first), answers through the whole ASGI app.

The lock command goes to a recording ``CommandSender``: the real one (remote commands) is
written on another branch; the integration wires it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from api.audit import AuditLog, AuditQuery
from devices.contract import Birth, CabinetStatus, Event, Message
from ingest import StoreError
from ingest.config import BatteriesConfig, IngestConfig
from ingest.passport_store import PassportOps, PassportStore
from ingest.passports import Flag, Passports
from ingest.service import Ingest, now_ms
from tests.security.inprocess import InProcess, bearer, in_process

STATION = "wanguo-south"
CAB1, CAB2 = "WGS-C01", "WGS-C02"
BOOT = "boot-bat-1"


class Recorder:
    """Stands in for the remote-commands service (another branch): records each lock."""

    def __init__(self) -> None:
        self.locks: list[tuple[str, int, str]] = []

    def send_lock_battery(self, device_id: str, slot: int, reason: str) -> None:
        self.locks.append((device_id, slot, reason))


class Feed:
    def __init__(self, ingest: Ingest) -> None:
        self.ingest = ingest
        self.seq: dict[str, int] = {}

    def send(self, device_id: str, body: dict[str, Any], cls: type[Message]) -> None:
        """What the pipeline does with one message: apply, then the observers in order."""
        twin = self.ingest.twins[device_id]
        seq = self.seq[device_id] = self.seq.get(device_id, -1) + 1
        now = now_ms()
        msg = cls.of({"v": 1, "ts": now, "boot": BOOT, "seq": seq, **body})  # type: ignore[attr-defined]
        twin.apply(msg, now)
        snap = twin.snapshot()
        assert self.ingest.passports is not None
        self.ingest.passports.observe(snap, msg, now)
        if self.ingest.alerts is not None:
            self.ingest.alerts.observe(snap, msg, now)

    def born(self, device_id: str) -> None:
        self.send(
            device_id,
            {"kind": "cabinet", "online": True, "model": "M", "firmware": "f", "slots": 12,
             "heartbeat_s": 30},
            Birth,
        )  # fmt: skip

    def status(self, device_id: str, filled: dict[int, dict[str, Any]]) -> None:
        slots = [{"n": n, "state": "empty"} for n in range(1, 13)]
        for n, slot in filled.items():
            slots[n - 1] = {"n": n, "state": "ready", "soc": 100.0, "temp_c": 25.0, **slot}
        self.send(device_id, {"kind": "cabinet", "slots": slots}, CabinetStatus)

    def swap(self, device_id: str, slot_out: int, out: str, slot_in: int, into: str) -> None:
        self.send(
            device_id,
            {"type": "swap", "slot_out": slot_out, "battery_out": out, "soc_out": 100.0,
             "slot_in": slot_in, "battery_in": into, "soc_in": 20.0},
            Event,
        )  # fmt: skip


async def _ready(ip: InProcess, device_id: str) -> int:
    r = await ip.http.get(f"/v1/devices/{device_id}")
    assert r.status_code == 200
    return int(r.json()["batteries_ready"])


async def test_overheated_pack_is_flagged_locked_and_never_ready_elsewhere(
    tmp_path: Path,
) -> None:
    async with in_process(tmp_path, alerts=True, passports=True) as ip:
        passports, engine = ip.ingest.passports, ip.ingest.alerts
        assert passports is not None
        assert engine is not None
        sender = passports.sender = Recorder()
        key = bearer(ip.key())
        feed = Feed(ip.ingest)
        for cab in (CAB1, CAB2):
            feed.born(cab)
        feed.status(CAB1, {3: {"battery": "B-1", "temp_c": 30.0}})
        feed.status(CAB2, {5: {"battery": "B-2"}, 6: {"battery": "B-3"}})
        assert await _ready(ip, CAB2) == 2
        assert sender.locks == []

        feed.status(CAB1, {3: {"battery": "B-1", "temp_c": 75.0, "state": "charging"}})
        hot = [a for a in engine.by_id.values() if a.rule == "temperature_high"]
        assert [(a.device_id, a.unit) for a in hot] == [(CAB1, 3)]
        assert "B-1" in passports.flagged
        assert sender.locks == [(CAB1, 3, "battery B-1: temperature_high")]

        # B-1 leaves cabinet 1 with a rider and is swapped into cabinet 2, slot 5
        feed.swap(CAB1, 3, "B-1", 3, "B-9")
        feed.swap(CAB2, 5, "B-2", 5, "B-1")
        flagged = [a for a in engine.by_id.values() if a.rule == "flagged_battery"]
        assert [(a.device_id, a.unit, a.severity, a.code) for a in flagged] == [
            (CAB2, 5, "critical", "B-1")
        ]
        assert sender.locks[-1] == (CAB2, 5, "flagged battery B-1")
        # the cabinet says B-1 is ready at 100 %: the rider API does not count it
        feed.status(CAB2, {5: {"battery": "B-1"}, 6: {"battery": "B-3"}})
        assert await _ready(ip, CAB2) == 1
        station = (await ip.http.get(f"/v1/stations/{STATION}")).json()
        assert station["cabinets"]["batteries_ready"] == 1
        public = (await ip.http.get(f"/v1/devices/{CAB2}")).text
        assert "B-1" not in public
        assert "B-3" not in public
        slot5 = (await ip.http.get(f"/v1/devices/{CAB2}", headers=key)).json()["slots"][4]
        assert (slot5["battery"], slot5["flagged"], slot5["ready"]) == ("B-1", True, False)
        assert slot5["ocpi_status"] == "OUTOFORDER"
        # one alert per pack and slot: the status naming it again opens no second one
        assert len([a for a in engine.by_id.values() if a.rule == "flagged_battery"]) == 1

        r = await ip.http.get("/v1/batteries/B-1", headers=key)
        assert r.status_code == 200, r.text
        p = r.json()
        assert p["flagged"] is True
        assert p["flag_reason"] == "temperature_high"
        assert p["max_temp_c"] == 75.0
        assert p["current"]["device_id"] == CAB2
        assert p["current"]["slot"] == 5
        assert [(s["device_id"], s["slot"], s["until"] is None) for s in p["stays"]] == [
            (CAB2, 5, True),
            (CAB1, 3, False),
        ]
        assert [(e["kind"], e["device_id"], e["slot"]) for e in p["events"]] == [
            ("appeared", CAB2, 5),
            ("temperature_high", CAB1, 3),
        ]
        assert p["events"][1]["alert_id"] == hot[0].id
        listed = (await ip.http.get("/v1/batteries?flagged=true", headers=key)).json()
        assert [b["serial"] for b in listed["batteries"]] == ["B-1"]

        # a maintainer clears the flag with a note: it counts again, the clearance is kept
        r = await ip.http.post(
            "/v1/batteries/B-1/clear", headers=key, json={"note": "inspected, cell OK"}
        )
        assert r.status_code == 200, r.text
        cleared = r.json()
        assert cleared["flagged"] is False
        assert [(c["note"], c["by"], c["flag_reason"]) for c in cleared["clearances"]] == [
            ("inspected, cell OK", "li-wei", "temperature_high")
        ]
        assert await _ready(ip, CAB2) == 2
        again = await ip.http.post("/v1/batteries/B-1/clear", headers=key, json={"note": "x"})
        assert again.status_code == 409
        audit = AuditLog.in_dir(ip.data_dir)
        try:
            entries = audit.query(AuditQuery(action="battery.clear"))
        finally:
            audit.close()
        assert [(e["target"], e["actor"]["name"], e["detail"]) for e in entries] == [
            ("B-1", "li-wei", {"chars": 18})
        ]


async def test_smoke_flags_every_pack_in_the_cabinet(tmp_path: Path) -> None:
    async with in_process(tmp_path, alerts=True, passports=True) as ip:
        passports = ip.ingest.passports
        assert passports is not None
        feed = Feed(ip.ingest)
        feed.born(CAB1)
        feed.status(CAB1, {1: {"battery": "S-1"}, 2: {"battery": "S-2"}})
        feed.send(CAB1, {"type": "fault_raised", "code": "smoke"}, Event)
        assert sorted(passports.flagged) == ["S-1", "S-2"]
        assert {f.reason for f in passports.flagged.values()} == {"smoke"}
        # no command sender wired (remote commands is another branch): counted, not sent
        assert passports.m_locks.labels("unsent")._value.get() == 2


async def test_a_flagged_pack_named_by_a_status_elsewhere_opens_an_alert_there(
    tmp_path: Path,
) -> None:
    """No swap event (lost, or a maintainer moved it): the status naming the pack in
    another cabinet is enough; its old stay ends there."""
    async with in_process(tmp_path, alerts=True, passports=True) as ip:
        passports, engine = ip.ingest.passports, ip.ingest.alerts
        assert passports is not None
        assert engine is not None
        sender = passports.sender = Recorder()
        feed = Feed(ip.ingest)
        for cab in (CAB1, CAB2):
            feed.born(cab)
        feed.status(CAB1, {4: {"battery": "M-1"}})
        feed.send(CAB1, {"type": "fault_raised", "code": "battery_fault", "slot": 4}, Event)
        assert passports.flagged["M-1"].reason == "battery_fault"
        feed.status(CAB2, {1: {"battery": "M-1"}})
        alerts = [
            (a.device_id, a.unit) for a in engine.by_id.values() if a.rule == "flagged_battery"
        ]
        assert alerts == [(CAB2, 1)]
        assert sender.locks == [
            (CAB1, 4, "battery M-1: battery_fault"),
            (CAB2, 1, "flagged battery M-1"),
        ]
        assert passports.occupant(CAB1, 4) is None
        assert passports.occupant(CAB2, 1) == "M-1"


async def test_lock_can_be_turned_off_and_flags_survive_a_restart(tmp_path: Path) -> None:
    config = IngestConfig(batteries=BatteriesConfig(lock_flagged=False))
    async with in_process(tmp_path, alerts=True, passports=True, config=config) as ip:
        passports = ip.ingest.passports
        assert passports is not None
        sender = passports.sender = Recorder()
        feed = Feed(ip.ingest)
        feed.born(CAB1)
        feed.status(CAB1, {2: {"battery": "R-1", "temp_c": 80.0}})
        assert "R-1" in passports.flagged
        assert sender.locks == []
        await passports.flush()
    store = PassportStore.in_dir(tmp_path / "data")
    try:
        again = Passports(store, ip.ingest.catalog)
        again.restore()
        assert set(again.flagged) == {"R-1"}
        assert again.occupant(CAB1, 2) == "R-1"
    finally:
        store.close()


async def test_bad_serials_are_refused(tmp_path: Path) -> None:
    async with in_process(tmp_path, passports=True) as ip:
        key = bearer(ip.key())
        assert (await ip.http.get("/v1/batteries/NOPE", headers=key)).status_code == 404
        long = "X" * 65
        assert (await ip.http.get(f"/v1/batteries/{long}", headers=key)).status_code == 422
        assert (await ip.http.get("/v1/batteries/a%20b", headers=key)).status_code == 422
        assert (await ip.http.get("/v1/batteries/B-1")).status_code == 401
        feed = Feed(ip.ingest)
        feed.born(CAB1)
        feed.status(CAB1, {1: {"battery": "bad serial"}, 2: {"battery": "Z" * 100}})
        assert ip.ingest.passports is not None
        assert ip.ingest.passports.occupant(CAB1, 1) is None
        assert ip.ingest.passports.m_refused._value.get() == 2


@pytest.mark.parametrize("moving", [False, True])
async def test_cost_per_status_of_a_12_slot_cabinet(tmp_path: Path, moving: bool) -> None:
    """Measured, reported (not a benchmark gate): the observer's cost per status message."""
    async with in_process(tmp_path, passports=True) as ip:
        passports = ip.ingest.passports
        assert passports is not None
        twin = ip.ingest.twins[CAB1]
        n = 2000
        msgs = []
        for i in range(n):
            tag = i if moving else 0
            slots = [
                {"n": s, "state": "charging", "battery": f"P-{s}-{tag}", "soc": 50.0,
                 "temp_c": 25.0 + (i % 7) * 0.1}
                for s in range(1, 13)
            ]  # fmt: skip
            msgs.append(
                CabinetStatus.of(
                    {"v": 1, "ts": now_ms(), "boot": BOOT, "seq": i, "kind": "cabinet",
                     "slots": slots}
                )
            )  # fmt: skip
        t0 = time.perf_counter()
        for i, msg in enumerate(msgs):
            passports.observe(twin, msg, 1_000_000 + i * 10_000)
        per_msg_us = (time.perf_counter() - t0) / n * 1e6
        print(f"passports.observe, 12 slots, packs moving={moving}: {per_msg_us:.1f} us/status")
        assert per_msg_us < (400 if moving else 100)
        await passports.flush()


async def test_a_failing_store_keeps_what_is_pending_until_it_writes(tmp_path: Path) -> None:
    """A closed connection stands for a store that fails (locked, disk full): the flush
    raises, counts, keeps everything; the next one, on a working store, writes it all."""
    async with in_process(tmp_path, passports=True) as ip:
        passports = ip.ingest.passports
        assert passports is not None
        feed = Feed(ip.ingest)
        feed.born(CAB1)
        feed.status(CAB1, {1: {"battery": "F-1", "temp_c": 31.0}})
        broken = passports.store
        broken.close()
        with pytest.raises(StoreError):
            await passports.flush()
        assert passports.m_write_errors._value.get() == 1
        feed.status(CAB1, {2: {"battery": "F-1", "temp_c": 33.0}})  # moved meanwhile
        passports.store = PassportStore.in_dir(ip.data_dir)
        try:
            await passports.flush()
            p = passports.store.passport("F-1")
        finally:
            passports.store.close()
            passports.store = broken
        assert p is not None
        assert [(s["slot"], s["to_ms"] is None) for s in p["stays"]] == [(2, True), (1, False)]
        assert (p["slot"], p["max_temp_c"]) == (2, 33.0)


async def test_a_flag_lost_in_a_crash_is_taken_up_again_from_the_open_alert(
    tmp_path: Path,
) -> None:
    """The crash window: the alert store saved the safety alert, the passports' write of
    the flag (due within half a second) never happened. At the next start the alert is
    restored open, so it will not open again; ``reconcile`` flags the pack its slot holds,
    read from the restored twin. A recorded event whose flag a maintainer cleared stays
    cleared."""
    async with in_process(tmp_path, alerts=True, passports=True) as ip:
        passports, engine = ip.ingest.passports, ip.ingest.alerts
        assert passports is not None
        assert engine is not None
        feed = Feed(ip.ingest)
        feed.born(CAB1)
        feed.status(CAB1, {4: {"battery": "L-1", "temp_c": 80.0}})
        assert "L-1" in passports.flagged
        await engine.flush(timeout_s=10)  # the alert is durable ...
        passports._ops = PassportOps()  # ... the flag's write is lost: the crash
        status = ip.ingest.twins[CAB1].status
    async with in_process(tmp_path, alerts=True, passports=True) as ip:
        passports, engine = ip.ingest.passports, ip.ingest.alerts
        assert passports is not None
        assert engine is not None
        assert "L-1" not in passports.flagged  # lost, as the crash left it
        (alert,) = [a for a in engine.by_id.values() if a.rule == "temperature_high"]
        twin = ip.ingest.twins[CAB1]  # as restored from the state store
        twin.status = status
        assert await passports.reconcile(list(engine.by_id.values()), ip.ingest.twins.by_id) == 1
        assert passports.flagged["L-1"].reason == "temperature_high"
        await passports.flush()
        passport = await asyncio.to_thread(passports.store.passport, "L-1")
        assert passport is not None
        assert [(e["kind"], e["alert_id"]) for e in passport["events"]] == [
            ("temperature_high", alert.id)
        ]
        # a maintainer clears it; the next start finds the event recorded: no new flag
        assert await passports.clear("L-1", "k1", "li-wei", "replaced the cell")
        assert await passports.reconcile(list(engine.by_id.values()), ip.ingest.twins.by_id) == 0
        assert "L-1" not in passports.flagged


async def test_a_read_of_the_flags_keeps_one_it_could_not_see_and_drops_a_cleared_one(
    tmp_path: Path,
) -> None:
    """``adopt_flags`` (the cluster's reload of the flagged set): a flag raised here that the
    read could not see yet (not written, or written after the read began) is kept; once a
    read that began after its write lacks it, a maintainer cleared it elsewhere: dropped,
    also from the alert engine's view (the same mapping)."""
    async with in_process(tmp_path, alerts=True, passports=True) as ip:
        passports, engine = ip.ingest.passports, ip.ingest.alerts
        assert passports is not None
        assert engine is not None
        feed = Feed(ip.ingest)
        feed.born(CAB1)
        before = passports.flushes  # a read that began before the flag
        feed.status(CAB1, {2: {"battery": "K-1", "temp_c": 80.0}})
        assert "K-1" in passports.flagged
        passports.adopt_flags({}, before)
        assert "K-1" in passports.flagged
        await passports.flush()
        passports.adopt_flags({}, before)  # that read's answer came after the write
        assert "K-1" in passports.flagged
        passports.adopt_flags({}, passports.flushes)
        assert "K-1" not in passports.flagged
        assert "K-1" not in engine.flagged_batteries


async def test_serve_announces_at_start_a_flagged_pack_no_alert_announced(
    tmp_path: Path,
) -> None:
    """A crash lost the ``flagged_battery`` alert of P-1, flagged in cabinet 1 and then
    swapped into cabinet 2 (its passport was written: the stays, the ``appeared`` event, the
    flag). ``serve``'s start opens it, once, and locks the slot; P-2, flagged by its own
    alert where it sits (locked then), gets none. A restart with the alert open adds no
    second alert and no second lock."""
    from devices.catalog import Catalog
    from tests.alerts.helpers import eventually

    config = IngestConfig(data_dir=tmp_path / "data")
    async with Ingest(config, Catalog.load(), connect=False):
        pass  # the data dir and its schema
    t = now_ms() - 60_000
    ops = PassportOps()
    ops.batteries = {
        "P-1": (t, CAB2, 5, t + 20_000, 79.0, None),
        "P-2": (t, CAB1, 2, t, 80.0, None),
    }
    ops.opened = [("P-1", CAB1, 3, t), ("P-1", CAB2, 5, t + 20_000), ("P-2", CAB1, 2, t)]
    ops.closed = [(t + 10_000, "P-1", CAB1, 3, t)]
    ops.events = [
        ("P-1", "temperature_high", 1, t + 5_000, CAB1, 3, "79"),
        ("P-2", "temperature_high", 2, t + 5_000, CAB1, 2, "80"),
        ("P-1", "appeared", 3, t + 20_000, CAB2, 5, "flagged battery P-1 in slot 5"),
    ]
    ops.flags = [(t + 5_000, "temperature_high", "P-1"), (t + 5_000, "temperature_high", "P-2")]
    store = PassportStore.in_dir(tmp_path / "data")
    try:
        store.apply(ops)
    finally:
        store.close()

    ids = []
    for start in (1, 2):
        async with Ingest(config, Catalog.load(), connect=False) as ingest:
            engine, commands = ingest.alerts, ingest.commands
            assert engine is not None
            assert commands is not None
            flagged = [a for a in engine.by_id.values() if a.rule == "flagged_battery"]
            assert [(a.device_id, a.unit, a.severity, a.code, a.count) for a in flagged] == [
                (CAB2, 5, "critical", "P-1", 1)
            ]
            ids.append(flagged[0].id)

            def one_lock() -> None:
                locks = [
                    (c.device_id, c.unit) for c in commands.open.values()  # noqa: B023
                    if c.type == "lock_battery"
                ]  # fmt: skip
                assert locks == [(CAB2, 5)]

            await eventually(one_lock)  # stored as an open command (no broker here)
            await asyncio.sleep(0.2 if start == 2 else 0)  # a second lock would be stored
            one_lock()
    assert ids[0] == ids[1]


async def test_adopted_flags_wait_for_the_announcement_and_a_stale_view_is_not_announced(
    tmp_path: Path,
) -> None:
    """``adopt_flags`` as a partition's index takes it while its alert engine loads
    (``announcing`` off): the flag is adopted, nothing announced; ``announce_flagged`` then
    announces it, once. Afterwards a flag learnt is announced at once, even for a pack here
    since before its flag; not one whose latest stay (the read's) is in another slot since
    after it came here: it left (our stale view)."""
    async with in_process(tmp_path, alerts=True, passports=True) as ip:
        passports, engine = ip.ingest.passports, ip.ingest.alerts
        assert passports is not None
        assert engine is not None
        sender = passports.sender = Recorder()
        feed = Feed(ip.ingest)
        feed.born(CAB2)
        feed.status(CAB2, {5: {"battery": "D-1"}, 6: {"battery": "D-2"}, 7: {"battery": "D-3"}})
        later = now_ms() + 1_000  # each flag raised elsewhere after the pack came here

        def announced() -> list[tuple[str | None, int | None, str, int]]:
            return sorted(
                (a.device_id, a.unit, a.code, a.count)
                for a in engine.by_id.values()  # type: ignore[union-attr]
                if a.rule == "flagged_battery"
            )

        passports.announcing = False
        passports.adopt_flags({"D-1": Flag(later, "smoke")}, passports.flushes)
        assert "D-1" in passports.flagged
        assert (announced(), sender.locks) == ([], [])
        assert passports.announce_flagged() == 1
        assert announced() == [(CAB2, 5, "D-1", 1)]
        assert passports.announce_flagged() == 0  # its alert is open
        stays = {"D-2": (CAB2, 6, 0), "D-3": (CAB1, 1, later)}  # D-3 was seen in CAB1 since
        flags = {s: Flag(later, "smoke") for s in ("D-1", "D-2", "D-3")}
        passports.adopt_flags(flags, passports.flushes, stays)
        assert announced() == [(CAB2, 5, "D-1", 1), (CAB2, 6, "D-2", 1)]
        assert sender.locks == [
            (CAB2, 5, "flagged battery D-1"),
            (CAB2, 6, "flagged battery D-2"),
        ]
