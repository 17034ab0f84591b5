"""The ingest pipeline in-process: Received objects in, SQLite rows, dead letters and acks out.

No broker: messages are injected the way the MQTT source would hand them over.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from api.views import station_view
from devices.catalog import Catalog
from devices.topics import TopicScheme
from ingest import StoreUnavailable
from ingest.metrics import IngestMetrics
from ingest.mqtt import Received
from ingest.pipeline import Batch, Pipeline, Twins
from ingest.sqlite_store import SQLiteStore
from ingest.store import DeadLetter, HistoryRow, TwinRecord, Unobserved
from ingest.twins import Twin

T0 = 1_796_284_800_000
CATALOG = Catalog.load()
PILE = next(d.id for d in CATALOG.devices.values() if d.kind == "pile")
CABINET = next(d.id for d in CATALOG.devices.values() if d.kind == "cabinet")
SCHEME = TopicScheme()


# -- building blocks -------------------------------------------------------------------------


class FlakyStore(SQLiteStore):
    """The real SQLite store, which can be told to be unavailable, and logs every write."""

    def __init__(self, path: Path, log: list[tuple[str, int]]) -> None:
        super().__init__(path, synchronous="OFF")
        self.log = log
        self.failing = False
        self.failures = 0

    def _fail(self) -> None:
        if self.failing:
            self.failures += 1
            raise StoreUnavailable("disk unplugged")

    def append(self, rows: Sequence[HistoryRow]) -> None:
        self._fail()
        super().append(rows)
        self.log.extend(("stored", r.seq) for r in rows)

    def save(
        self,
        twins: Sequence[TwinRecord],
        dead_letters: Sequence[DeadLetter],
        unobserved: Sequence[Unobserved] = (),
    ) -> None:
        self._fail()
        super().save(twins, dead_letters, unobserved)
        self.log.extend(("dead", d.received_ms) for d in dead_letters)

    def write(
        self,
        rows: Sequence[HistoryRow],
        twins: Sequence[TwinRecord],
        dead_letters: Sequence[DeadLetter],
        unobserved: Sequence[Unobserved] = (),
    ) -> None:  # what the pipeline calls: append and save in one transaction
        self._fail()
        super().write(rows, twins, dead_letters, unobserved)
        self.log.extend(("stored", r.seq) for r in rows)
        self.log.extend(("dead", d.received_ms) for d in dead_letters)


@dataclass
class Rig:
    pipeline: Pipeline
    store: FlakyStore
    metrics: IngestMetrics
    log: list[tuple[str, int]]  # ("stored", seq), ("dead", received_ms), ("ack", mid)
    acked: list[Received] = field(default_factory=list)
    mids: Iterator[int] = field(default_factory=lambda: iter(range(1, 10**6)))

    def received(
        self, device_id: str, channel: str, payload: Any, *, retained: bool = False, at: int = T0
    ) -> Received:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        topic = f"cw/v1/{device_id}/{channel}"
        return Received(topic, raw, 1, retained, next(self.mids), at, 1)

    async def feed(self, *messages: Received) -> None:
        """Handle ``messages`` as one batch, the way ``run`` does."""
        batch = Batch()
        for r in messages:
            self.pipeline.unacked += 1
            self.pipeline.handle(r, batch)
        await self.pipeline.commit(batch)

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def twin(self, device_id: str) -> Twin:
        return self.pipeline.twins[device_id]

    def stored_seqs(self, device_id: str) -> list[tuple[str, int]]:
        return [(r["type"], r["seq"]) for r in self.store.messages(device_id)]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    log: list[tuple[str, int]] = []
    store = FlakyStore(tmp_path / "cw.db", log)
    metrics = IngestMetrics()
    holder: list[Rig] = []

    def ack(r: Received) -> bool:
        holder[0].acked.append(r)
        log.append(("ack", r.mid))
        return True

    pipeline = Pipeline(
        catalog=CATALOG,
        scheme=SCHEME,
        twins=Twins(CATALOG),
        history=store,
        state=store,
        metrics=metrics,
        ack=ack,
        retry_max_s=0.05,
    )
    holder.append(Rig(pipeline, store, metrics, log))
    yield holder[0]
    store.close()


@pytest.fixture
async def running(rig: Rig) -> AsyncIterator[Rig]:
    task = asyncio.create_task(rig.pipeline.run(), name="pipeline-under-test")
    yield rig
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


def header(seq: int, boot: str = "boot-a", ts: int = T0) -> dict[str, Any]:
    return {"v": 1, "ts": ts, "boot": boot, "seq": seq}


def pile_birth(seq: int = 0, ports: int = 10, **kw: Any) -> dict[str, Any]:
    return {**header(seq, **kw), "online": True, "kind": "pile", "ports": ports}


def cabinet_birth(seq: int = 0, **kw: Any) -> dict[str, Any]:
    return {**header(seq, **kw), "online": True, "kind": "cabinet", "slots": 12}


def pile_status(seq: int, ports: int = 10, state: str = "available", **kw: Any) -> dict[str, Any]:
    listed = [{"n": i, "state": state} for i in range(1, ports + 1)]
    return {**header(seq, **kw), "kind": "pile", "ports": listed}


def cabinet_status(seq: int, slots: int = 12, **kw: Any) -> dict[str, Any]:
    listed = [{"n": i, "state": "ready", "soc": 95} for i in range(1, slots + 1)]
    return {**header(seq, **kw), "kind": "cabinet", "slots": listed}


def will(seq: int = 0, boot: str = "boot-a") -> dict[str, Any]:
    return {"v": 1, "online": False, "boot": boot, "seq": seq}


# -- the good path ---------------------------------------------------------------------------


async def test_valid_messages_stored_and_applied(rig: Rig) -> None:
    msgs = [
        rig.received(PILE, "state", pile_birth()),
        rig.received(PILE, "status", pile_status(1, state="charging"), at=T0 + 1),
        rig.received(
            PILE,
            "event",
            {**header(2), "type": "session_started", "port": 1, "session": "s-1"},
            at=T0 + 2,
        ),
    ]
    await rig.feed(*msgs)
    assert rig.stored_seqs(PILE) == [("birth", 0), ("status", 1), ("event", 2)]
    twin = rig.twin(PILE)
    assert twin.online(T0 + 2)
    assert twin.status is not None
    assert {p.state for p in twin.status.units} == {"charging"}
    assert [r.mid for r in rig.acked] == [r.mid for r in msgs]
    # the twin record was saved in the same batch
    (record,) = [t for t in rig.store.load_twins() if t["device_id"] == PILE]
    assert (record["boot"], record["max_seq"], record["online_flag"]) == ("boot-a", 2, True)
    assert rig.metric("chargewatch_messages_accepted_total", type="status") == 1
    assert rig.metric("chargewatch_messages_applied_total") == 3
    assert rig.metric("chargewatch_history_rows_written_total") == 3
    assert rig.metric("chargewatch_inflight_messages") == 0


async def test_history_row_fields(rig: Rig) -> None:
    payload = pile_status(1, ts="2026-11-28T12:00:00+08:00")
    await rig.feed(rig.received(PILE, "status", payload, at=T0 + 123))
    (stored,) = rig.store.messages(PILE)
    assert stored["ts_ms"] == 1_795_838_400_000  # device time, as epoch ms
    assert stored["received_ms"] == T0 + 123
    assert json.loads(str(stored["payload"])) == payload  # the JSON text as received


async def test_will_is_stamped_with_arrival(rig: Rig) -> None:
    await rig.feed(rig.received(PILE, "state", pile_birth()))
    await rig.feed(rig.received(PILE, "state", will(0), at=T0 + 7000))
    assert not rig.twin(PILE).online_flag
    deaths = [r for r in rig.store.messages(PILE) if r["type"] == "death"]
    assert [(r["seq"], r["ts_ms"]) for r in deaths] == [(0, T0 + 7000)]


@pytest.mark.parametrize("same_batch", [True, False])
async def test_delivered_twice_stored_once(rig: Rig, same_batch: bool) -> None:
    birth = rig.received(PILE, "state", pile_birth())
    first = rig.received(PILE, "status", pile_status(1))
    again = rig.received(PILE, "status", pile_status(1))  # QoS 1 redelivery: new mid
    if same_batch:
        await rig.feed(birth, first, again)
    else:
        await rig.feed(birth, first)
        await rig.feed(again)
    assert rig.stored_seqs(PILE) == [("birth", 0), ("status", 1)]
    assert rig.store.count_messages() == 2
    assert [r.mid for r in rig.acked] == [birth.mid, first.mid, again.mid]
    assert rig.metric("chargewatch_messages_duplicate_total") == 1
    assert rig.twin(PILE).duplicates == 1


async def test_out_of_order_kept_in_history_only(rig: Rig) -> None:
    await rig.feed(
        rig.received(PILE, "state", pile_birth()),
        rig.received(PILE, "status", pile_status(2, state="charging")),
        rig.received(PILE, "status", pile_status(1, state="available")),
    )
    assert rig.stored_seqs(PILE) == [("birth", 0), ("status", 1), ("status", 2)]
    status = rig.twin(PILE).status
    assert status is not None
    assert (status.seq, status.units[0].state) == (2, "charging")
    assert rig.metric("chargewatch_messages_out_of_order_total") == 1


async def test_redelivered_older_status_is_counted_once(rig: Rig) -> None:
    # QoS 1 redelivers a stored but unacknowledged status after newer ones (a broker restart)
    await rig.feed(
        rig.received(PILE, "state", pile_birth()),
        rig.received(PILE, "status", pile_status(1)),
        rig.received(PILE, "status", pile_status(2, state="charging")),
    )
    await rig.feed(rig.received(PILE, "status", pile_status(1)))
    assert rig.metric("chargewatch_messages_out_of_order_total") == 0
    assert rig.metric("chargewatch_messages_duplicate_total") == 1
    assert rig.stored_seqs(PILE) == [("birth", 0), ("status", 1), ("status", 2)]


async def test_huge_seq_is_stored_held_and_the_device_goes_on(rig: Rig) -> None:
    await rig.feed(
        rig.received(PILE, "state", pile_birth()),
        rig.received(PILE, "status", pile_status(1)),
        rig.received(PILE, "status", pile_status(2**53 - 1, state="disabled")),
        rig.received(PILE, "status", pile_status(2, state="charging")),
    )
    twin = rig.twin(PILE)
    assert twin.status is not None
    assert (twin.status.seq, twin.lost_messages, twin.max_seq) == (2, 0, 2)
    assert rig.metric("chargewatch_messages_seq_jump_total") == 1
    assert ("status", 2**53 - 1) in rig.stored_seqs(PILE)
    assert rig.store.dead_letters() == []


async def test_device_time_is_kept_and_its_skew_counted(rig: Rig) -> None:
    year_9999 = 253_402_300_799_000
    await rig.feed(
        rig.received(PILE, "state", pile_birth(0, ts=T0 + 60_000)),  # a minute off: fine
        rig.received(PILE, "status", pile_status(1, ts=year_9999)),
        rig.received(PILE, "status", pile_status(1, ts=year_9999)),  # a redelivery: once
        rig.received(PILE, "status", pile_status(2, ts=0)),
        # a retained copy may be old (not skew), never from our future
        rig.received(CABINET, "status", cabinet_status(5, ts=T0 - 3_600_000), retained=True),
        rig.received(CABINET, "status", cabinet_status(6, ts=T0 + 600_000), retained=True),
    )
    stored = {r["seq"]: r["ts_ms"] for r in rig.store.messages(PILE)}
    assert stored == {0: T0 + 60_000, 1: year_9999, 2: 0}  # device time, as sent
    assert (rig.twin(PILE).clock_skewed, rig.twin(CABINET).clock_skewed) == (2, 1)
    assert rig.metric("chargewatch_clock_skew_messages_total") == 3


async def test_retained_status_before_birth_leaves_device_online(rig: Rig) -> None:
    now = T0 + 5000
    await rig.feed(
        rig.received(CABINET, "status", cabinet_status(9, ts=now - 1000), retained=True, at=now),
        rig.received(CABINET, "state", cabinet_birth(0, ts=T0), retained=True, at=now),
    )
    twin = rig.twin(CABINET)
    assert twin.online(now)
    assert twin.last_seen_ms == now - 1000
    assert rig.stored_seqs(CABINET) == [("birth", 0), ("status", 9)]


async def test_stale_will_stored_but_ignored(rig: Rig) -> None:
    await rig.feed(
        rig.received(PILE, "state", pile_birth(0)),
        rig.received(PILE, "state", pile_birth(3)),  # reconnect within the boot
        rig.received(PILE, "state", will(0)),  # the old connection's Will, late
    )
    assert rig.twin(PILE).online_flag
    assert rig.metric("chargewatch_stale_deaths_total") == 1
    assert ("death", 0) in rig.stored_seqs(PILE)


async def test_a_forged_will_does_not_keep_a_talking_device_offline(rig: Rig) -> None:
    await rig.feed(
        rig.received(PILE, "state", pile_birth(0)),
        rig.received(PILE, "status", pile_status(1)),
    )
    await rig.feed(rig.received(PILE, "state", will(0), at=T0 + 1000))  # forged, or early
    assert not rig.twin(PILE).online(T0 + 1000)
    await rig.feed(rig.received(PILE, "status", pile_status(2), at=T0 + 2000))
    twin = rig.twin(PILE)
    assert twin.online(T0 + 2000)
    assert twin.wills_disproved == 1
    assert rig.metric("chargewatch_wills_disproved_total") == 1
    (record,) = [t for t in rig.store.load_twins() if t["device_id"] == PILE]
    assert (record["online_flag"], record["wills_disproved"]) == (True, 1)


async def test_cmd_topic_is_acked_and_not_data(rig: Rig) -> None:
    r = rig.received(PILE, "cmd", {"do": "reboot"})
    await rig.feed(r)
    assert rig.acked == [r]
    assert rig.store.count_messages() == 0
    assert rig.store.dead_letters() == []


async def test_listeners_hear_changed_twins(rig: Rig) -> None:
    heard: list[list[str]] = []
    rig.pipeline.listeners.append(lambda twins: heard.append([t.device_id for t in twins]))
    await rig.feed(
        rig.received(PILE, "state", pile_birth()),
        rig.received(CABINET, "state", cabinet_birth()),
        rig.received(PILE, "status", pile_status(1)),
    )
    await rig.feed(rig.received(PILE, "status", pile_status(1)))  # a duplicate changes nothing
    assert heard == [[PILE, CABINET]]


# -- bad input -------------------------------------------------------------------------------


BAD: list[tuple[str, str, Any, str]] = [
    ("cw/v1", "P", {}, "topic"),  # a topic outside the scheme (built below)
    ("NOT-IN-CATALOG", "status", pile_status(1), "unknown_device"),
    (PILE, "status", b"{not json", "not_json"),
    (PILE, "status", b'{"v":1,"temp_c":NaN}', "not_json"),
    # not UTF-8 inside a key: msgspec raises UnicodeDecodeError there (found by fuzzing)
    (
        PILE,
        "status",
        json.dumps(pile_status(1)).encode().replace(b'"boot"', b'"\xa0oot"'),
        "not_json",
    ),
    (PILE, "status", b"[1,2]", "not_object"),
    (PILE, "status", {**pile_status(1), "v": 2}, "version"),
    (PILE, "status", {**pile_status(1), "seq": "1"}, "schema"),
    (PILE, "status", {**pile_status(1), "seq": 2**64}, "schema"),
    (PILE, "event", {**header(1), "type": "exploded"}, "schema"),
    (PILE, "status", pile_status(1, ports=9), "count_mismatch"),  # catalog: 10 ports
    (PILE, "status", cabinet_status(1), "kind_mismatch"),
    (PILE, "state", cabinet_birth(), "kind_mismatch"),
    (CABINET, "status", pile_status(1), "kind_mismatch"),
    (PILE, "status", b"{" + b" " * (16 * 1024) + b"}", "oversized"),
    # a port/slot number must exist on that device (catalog: the pile has 10, the cabinet 12)
    (PILE, "event", {**header(1), "type": "fault_raised", "code": "smoke", "port": 11}, "unknown_unit"),
    (PILE, "event", {**header(1), "type": "fault_raised", "code": "smoke", "port": 2**63}, "schema"),
    (PILE, "event", {**header(1), "type": "session_started", "port": 11, "session": "s"}, "unknown_unit"),
    (PILE, "event", {**header(1), "type": "fault_raised", "code": "smoke", "slot": 1}, "unknown_unit"),
    (CABINET, "event", {**header(1), "type": "fault_raised", "code": "smoke", "slot": 13}, "unknown_unit"),
    (CABINET, "event", {**header(1), "type": "fault_raised", "code": "smoke", "port": 1}, "unknown_unit"),
    (CABINET, "event", {**header(1), "type": "swap", "slot_out": 13, "battery_out": "B", "soc_out": 95, "slot_in": 1, "battery_in": "C", "soc_in": 9}, "unknown_unit"),
    (CABINET, "event", {**header(1), "type": "swap", "slot_out": 1, "battery_out": "B", "soc_out": 95, "slot_in": 13, "battery_in": "C", "soc_in": 9}, "unknown_unit"),
    # the catalog is the authority on unit counts: a birth may not change them
    (PILE, "state", pile_birth(ports=256), "count_mismatch"),
    (PILE, "state", pile_birth(ports=8), "count_mismatch"),
    (PILE, "state", {**pile_birth(), "heartbeat_s": 86400}, "schema"),
    # a key said twice: we would read the last value, another reader the first
    (PILE, "status", json.dumps(pile_status(1), separators=(",", ":")).replace('"state":"available"', '"state":"faulted","state":"available"', 1).encode(), "duplicate_key"),
    (CABINET, "state", json.dumps(cabinet_birth()).replace('"slots": 12', '"slots": 4, "slots": 12').encode(), "duplicate_key"),
]  # fmt: skip


@pytest.mark.parametrize(("device", "channel", "payload", "reason"), BAD)
async def test_bad_input_dead_lettered(
    rig: Rig, device: str, channel: str, payload: Any, reason: str
) -> None:
    r = rig.received(device, channel, payload, at=T0 + 42)
    if reason == "topic":
        r.topic = "cw/v1/status"
    twins_before = {d: t.to_record() for d, t in rig.pipeline.twins.by_id.items()}
    await rig.feed(r)
    (letter,) = rig.store.dead_letters()
    assert (letter.reason, letter.topic, letter.received_ms) == (reason, r.topic, T0 + 42)
    assert letter.detail
    assert letter.payload == r.payload[: len(letter.payload)]
    assert letter.size == len(r.payload)
    assert rig.store.dead_letter_counts() == {reason: 1}
    assert rig.metric("chargewatch_dead_letters_total", reason=reason) == 1
    assert rig.acked == [r]
    assert rig.store.count_messages() == 0
    # never changes current state
    assert {d: t.to_record() for d, t in rig.pipeline.twins.by_id.items()} == twins_before


async def test_a_decoder_bug_is_a_dead_letter_not_a_stall(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a stand-in decoder that raises what the real one never should: such a bug cannot be
    # produced on purpose (the fuzzed contract tests look for it)
    def broken(channel: str, payload: bytes) -> None:
        raise RuntimeError("decoder bug")

    monkeypatch.setattr("ingest.pipeline.decode", broken)
    bad = rig.received(PILE, "status", pile_status(1))
    await rig.feed(bad)
    monkeypatch.undo()
    good = rig.received(PILE, "state", pile_birth())
    await rig.feed(good)
    assert rig.store.dead_letter_counts() == {"internal": 1}
    (letter,) = rig.store.dead_letters()
    assert letter.detail == "RuntimeError: decoder bug"
    assert rig.acked == [bad, good]
    assert rig.stored_seqs(PILE) == [("birth", 0)]


async def test_unknown_units_are_dead_letters_and_the_rest_applies(rig: Rig) -> None:
    # port 2^63 once killed the alert writer (its SQLite insert overflowed) and port 11 named
    # nothing on a 10-port pile: both are dead letters, and the pile's other messages apply
    heard: list[tuple[int, Any]] = []
    rig.pipeline.observers.append(lambda twin, msg, at: heard.append((msg.seq, msg)))
    raised = {**header(2), "type": "fault_raised", "code": "smoke"}
    await rig.feed(
        rig.received(PILE, "state", pile_birth(0)),
        rig.received(PILE, "status", pile_status(1)),
        rig.received(PILE, "event", {**raised, "port": 2**63}),
        rig.received(PILE, "event", {**raised, "seq": 3, "port": 11}),
        rig.received(PILE, "event", {**raised, "seq": 4, "port": 10}),
        rig.received(PILE, "status", pile_status(5, state="charging")),
    )
    assert rig.store.dead_letter_counts() == {"schema": 1, "unknown_unit": 1}
    detail = {d.reason: d.detail for d in rig.store.dead_letters()}["unknown_unit"]
    assert detail == "port 11: the device has ports 1..10"
    assert rig.stored_seqs(PILE) == [("birth", 0), ("status", 1), ("event", 4), ("status", 5)]
    assert [seq for seq, _ in heard] == [0, 1, 4, 5]
    twin = rig.twin(PILE)
    assert twin.status is not None
    assert twin.status.seq == 5
    assert twin.online(T0)
    assert len(rig.acked) == 6


async def test_status_count_checked_against_the_catalog(rig: Rig) -> None:
    await rig.feed(rig.received(PILE, "state", pile_birth()))
    await rig.feed(
        rig.received(PILE, "status", pile_status(1, ports=8)),
        rig.received(PILE, "status", pile_status(2, ports=10)),
    )
    assert rig.store.dead_letter_counts() == {"count_mismatch": 1}
    assert "8 ports listed, the device has 10" in rig.store.dead_letters()[0].detail
    assert rig.stored_seqs(PILE) == [("birth", 0), ("status", 2)]


async def test_birth_cannot_change_the_catalog_count(rig: Rig) -> None:
    # a forged (or misconfigured) birth saying 256 ports once took a station's ports_total
    # from 600 to 846: the catalog is the authority, the birth is a dead letter
    await rig.feed(
        rig.received(PILE, "state", pile_birth(0)),
        rig.received(PILE, "status", pile_status(1)),
    )
    station = CATALOG.stations[CATALOG.devices[PILE].station_id]
    before = station_view(station, rig.pipeline.twins, T0)["piles"]
    await rig.feed(rig.received(PILE, "state", pile_birth(2, ports=256, boot="boot-b")))
    after = station_view(station, rig.pipeline.twins, T0)["piles"]
    assert (after["ports_total"], after["ports_free"]) == (
        before["ports_total"],
        before["ports_free"],
    )
    assert before["ports_free"] == 10  # the pile's own ten, all available
    (letter,) = rig.store.dead_letters()
    assert (letter.reason, letter.detail) == (
        "count_mismatch",
        "birth says 256 ports, the catalog says 10",
    )
    twin = rig.twin(PILE)
    assert (twin.units, twin.boot, twin.online_flag) == (10, "boot-a", True)
    await rig.feed(rig.received(PILE, "status", pile_status(3)))  # the device's own count
    assert twin.status is not None
    assert twin.status.seq == 3


async def test_bad_and_good_in_one_batch(rig: Rig) -> None:
    msgs = [
        rig.received(PILE, "state", pile_birth()),
        rig.received(PILE, "status", b"garbage"),
        rig.received(PILE, "status", pile_status(1)),
        rig.received("GHOST", "status", pile_status(1)),
        rig.received(PILE, "status", pile_status(1)),
    ]
    await rig.feed(*msgs)
    assert rig.stored_seqs(PILE) == [("birth", 0), ("status", 1)]
    assert rig.store.dead_letter_counts() == {"not_json": 1, "unknown_device": 1}
    assert sorted(r.mid for r in rig.acked) == sorted(r.mid for r in msgs)
    assert rig.metric("chargewatch_messages_received_total") == 5
    assert rig.metric("chargewatch_messages_acked_total") == 5


# -- acks, batches and a failing store -------------------------------------------------------


async def test_run_acks_everything_once_after_the_write(running: Rig) -> None:
    rig = running
    msgs = [rig.received(PILE, "state", pile_birth())]
    msgs += [rig.received(PILE, "status", pile_status(i), at=T0 + i) for i in range(1, 30)]
    msgs += [rig.received(PILE, "status", b"bad", at=T0 + 100 + i) for i in range(5)]
    msgs += [rig.received(PILE, "status", pile_status(7))]  # a duplicate
    for r in msgs:
        rig.pipeline.deliver(r)
    await eventually(lambda: len(rig.acked) >= len(msgs))
    await asyncio.sleep(0.01)  # room for a second, wrong ack to show up
    assert sorted(r.mid for r in rig.acked) == sorted(r.mid for r in msgs)  # each exactly once
    # every ack comes after the write that holds its message
    stored_at: dict[tuple[str, int], int] = {}
    for i, (what, key) in enumerate(rig.log):
        stored_at.setdefault((what, key), i)
    by_mid = {r.mid: r for r in msgs}
    for i, (what, mid) in enumerate(rig.log):
        if what != "ack":
            continue
        r = by_mid[mid]
        if r.payload == b"bad":
            assert stored_at[("dead", r.received_ms)] < i
        else:
            seq = json.loads(r.payload)["seq"]
            assert stored_at[("stored", seq)] < i
    assert rig.stored_seqs(PILE) == [("birth", 0)] + [("status", i) for i in range(1, 30)]
    assert rig.store.dead_letter_counts() == {"not_json": 5}
    assert rig.metric("chargewatch_inflight_messages") == 0


async def test_batches_are_bounded(rig: Rig) -> None:
    rig.pipeline.batch_max = 3
    writes: list[int] = []
    write = rig.store.write

    def counting_write(
        rows: Sequence[HistoryRow],
        twins: Sequence[TwinRecord],
        dead: Sequence[DeadLetter],
        unobserved: Sequence[Unobserved] = (),
    ) -> None:
        writes.append(len(rows))
        write(rows, twins, dead, unobserved)

    rig.store.write = counting_write  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(rig.pipeline.run(), name="pipeline-under-test")
    try:
        for i in range(7):
            rig.pipeline.deliver(rig.received(PILE, "event", {**header(i), "type": "door_opened"}))
        await eventually(lambda: len(rig.acked) == 7)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert max(writes) <= 3
    assert sum(writes) == 7


async def test_store_down_nothing_acked_until_it_recovers(running: Rig) -> None:
    rig = running
    rig.store.failing = True
    msgs = [rig.received(PILE, "state", pile_birth())]
    msgs += [rig.received(PILE, "status", pile_status(i), at=T0 + i) for i in range(1, 6)]
    msgs += [rig.received(PILE, "status", b"bad")]
    for r in msgs[:3]:
        rig.pipeline.deliver(r)
    await eventually(lambda: rig.store.failures >= 2)
    for r in msgs[3:]:
        rig.pipeline.deliver(r)
    await eventually(lambda: rig.store.failures >= 4)
    assert rig.acked == []
    assert not rig.pipeline.store_healthy
    assert rig.metric("chargewatch_store_healthy") == 0
    assert rig.metric("chargewatch_store_write_errors_total") >= 4
    assert rig.metric("chargewatch_inflight_messages") == len(msgs)
    assert rig.store.count_messages() == 0

    rig.store.failing = False
    await eventually(lambda: len(rig.acked) == len(msgs))
    await asyncio.sleep(0.01)
    assert sorted(r.mid for r in rig.acked) == sorted(r.mid for r in msgs)
    assert rig.stored_seqs(PILE) == [("birth", 0)] + [("status", i) for i in range(1, 6)]
    # written in delivery order
    assert [key for what, key in rig.log if what == "stored"] == [0, 1, 2, 3, 4, 5]
    assert rig.store.dead_letter_counts() == {"not_json": 1}
    status = rig.twin(PILE).status
    assert status is not None
    assert status.seq == 5
    assert rig.pipeline.store_healthy
    assert rig.metric("chargewatch_store_healthy") == 1
    assert rig.metric("chargewatch_inflight_messages") == 0


async def test_restart_restores_twins(rig: Rig, tmp_path: Path) -> None:
    await rig.feed(
        rig.received(PILE, "state", pile_birth()),
        rig.received(PILE, "status", pile_status(4, state="charging")),
    )
    twins = Twins(CATALOG)
    restored = twins.restore([*rig.store.load_twins(), {"device_id": "GONE", "boot": "x"}])
    assert restored == 1
    assert twins[PILE] == rig.twin(PILE)
    status = twins[PILE].status
    assert status is not None
    assert status.units[0].state == "charging"
