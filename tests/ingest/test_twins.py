"""Twin.apply: the ordering rules of contract v1, one device at a time."""

from __future__ import annotations

import json
from typing import Any

import pytest

from devices.catalog import Catalog, Device, DeviceSpec
from devices.contract import Birth, CabinetStatus, Death, Event, Message, PileStatus
from ingest.twins import (
    RECENT_SEQS_KEPT,
    RETIRED_BOOTS_KEPT,
    SEQ_JUMP_MAX,
    CountMismatch,
    Outcome,
    Twin,
)

T0 = 1_796_284_800_000  # our clock and the device clock agree unless a test says otherwise
PORTS = 4


def twin(kind: str = "pile") -> Twin:
    spec = (
        DeviceSpec(id="P1", kind="pile", ports=PORTS)
        if kind == "pile"
        else DeviceSpec(id="C1", kind="cabinet", slots=PORTS, release_soc=95)
    )
    return Twin.for_device(Device(spec, "st-1"))


def birth(seq: int = 0, boot: str = "boot-a", ts: int = T0, **extra: Any) -> Birth:
    data = {"v": 1, "ts": ts, "boot": boot, "seq": seq, "online": True, "kind": "pile"}
    return Birth.of({"ports": PORTS, **data, **extra})


def death(seq: int = 0, boot: str = "boot-a") -> Death:
    return Death.of({"v": 1, "online": False, "boot": boot, "seq": seq})


def status(
    seq: int, boot: str = "boot-a", ts: int = T0, states: tuple[str, ...] = ("available",) * PORTS
) -> PileStatus:
    ports = [{"n": i, "state": s} for i, s in enumerate(states, 1)]
    return PileStatus.of(
        {"v": 1, "ts": ts, "boot": boot, "seq": seq, "kind": "pile", "ports": ports}
    )


def event(seq: int, boot: str = "boot-a") -> Event:
    return Event.of({"v": 1, "ts": T0, "boot": boot, "seq": seq, "type": "door_opened"})


def feed(t: Twin, *messages: Message, at: int = T0) -> list[Outcome]:
    return [t.apply(m, at + i) for i, m in enumerate(messages)]


# -- the happy path --------------------------------------------------------------------------


def test_for_device_uses_catalog() -> None:
    t = twin("cabinet")
    assert (t.device_id, t.kind, t.station_id, t.units, t.release_soc) == (
        "C1",
        "cabinet",
        "st-1",
        4,
        95,
    )
    assert twin().release_soc == 90  # the service default
    assert not t.online(T0)


def test_birth_then_status() -> None:
    t = twin()
    assert feed(t, birth(heartbeat_s=60, model="CW-P4", firmware="1.2")) == [Outcome.APPLIED]
    assert (t.boot, t.online_flag, t.heartbeat_s, t.model, t.firmware) == (
        "boot-a",
        True,
        60,
        "CW-P4",
        "1.2",
    )
    assert (t.birth_seq, t.state_seq, t.online_since_ms) == (0, 0, T0)
    s = status(1, states=("charging", "available", "available", "available"))
    assert t.apply(s, T0 + 1000) is Outcome.APPLIED
    assert t.status is s
    assert (t.status_seq, t.status_ts_ms, t.last_seen_ms, t.changed_ms) == (
        1,
        T0,
        T0 + 1000,
        T0 + 1000,
    )
    assert t.online(T0 + 1000 + 180_000)  # 3 x 60 s
    assert not t.online(T0 + 1000 + 180_001)
    assert (t.lost_messages, t.duplicates, t.out_of_order, t.reboots) == (0, 0, 0, 0)


def test_birth_never_changes_the_catalog_count() -> None:
    # the pipeline rejects a birth whose count differs (count_mismatch); the twin itself
    # keeps the catalog's count whatever it is handed
    t = twin()
    t.apply(birth(ports=6), T0)
    assert t.units == PORTS
    with pytest.raises(CountMismatch, match="6 ports listed, the device has 4"):
        t.check_count(status(1, states=("available",) * 6))
    t.check_count(status(2))  # no exception: the catalog's count


def test_check_count_against_catalog_before_birth() -> None:
    t = twin()
    t.check_count(status(1))
    with pytest.raises(CountMismatch):
        t.check_count(status(1, states=("available",) * 3))


# -- duplicates and order --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "outcomes", "duplicates", "out_of_order"),
    [
        ([birth(), birth()], ["applied", "duplicate"], 1, 0),
        ([birth(), status(1), status(1)], ["applied", "applied", "duplicate"], 1, 0),
        ([birth(), event(1), event(1)], ["applied", "applied", "duplicate"], 1, 0),
        ([birth(), status(2), status(1)], ["applied", "applied", "out_of_order"], 0, 1),
        # a late event has no state to spoil: it is new, and kept
        ([birth(), status(2), event(1)], ["applied", "applied", "applied"], 0, 0),
        # one counter for all channels: a late status is still newer than the last status
        ([birth(), status(1), event(3), status(2)], ["applied"] * 4, 0, 0),
    ],
)
def test_order_and_duplicates(
    messages: list[Message], outcomes: list[str], duplicates: int, out_of_order: int
) -> None:
    t = twin()
    assert feed(t, *messages) == outcomes
    assert (t.duplicates, t.out_of_order) == (duplicates, out_of_order)


def test_older_status_changes_nothing() -> None:
    t = twin()
    new = status(5, states=("charging",) * PORTS)
    feed(t, birth(), new)
    changed, seen = t.changed_ms, t.last_seen_ms
    assert t.apply(status(4), T0 + 60_000) is Outcome.OUT_OF_ORDER
    assert t.status is new
    assert (t.status_seq, t.changed_ms, t.last_seen_ms) == (5, changed, seen)


def test_duplicate_changes_nothing() -> None:
    t = twin()
    first = status(1)
    feed(t, birth(), first)
    again = status(1, states=("charging",) * PORTS)  # same (boot, seq), other content
    assert t.apply(again, T0 + 60_000) is Outcome.DUPLICATE
    assert t.status is first
    assert t.last_seen_ms == T0 + 1


# -- boots -----------------------------------------------------------------------------------


def test_new_boot_resets_the_sequence() -> None:
    t = twin()
    feed(t, birth(), status(40), status(41))
    assert t.lost_messages == 39
    assert t.apply(birth(0, boot="boot-b"), T0 + 10_000) is Outcome.APPLIED
    assert (t.boot, t.max_seq, t.birth_seq, t.status_seq, t.reboots) == ("boot-b", 0, 0, -1, 1)
    assert t.retired_boots == ["boot-a"]
    assert t.online_flag
    assert t.apply(status(1, boot="boot-b"), T0 + 11_000) is Outcome.APPLIED
    assert t.status is not None
    assert (t.status.boot, t.status_seq) == ("boot-b", 1)
    assert t.lost_messages == 39  # a new boot's low seq is no gap (nor a late message)


def test_status_of_a_new_boot_before_its_birth_is_not_online() -> None:
    t = twin()
    feed(t, birth(), status(1))
    assert t.apply(status(1, boot="boot-b"), T0 + 5000) is Outcome.APPLIED
    assert t.boot == "boot-b"
    assert not t.online_flag  # until boot-b's birth arrives
    assert t.apply(birth(0, boot="boot-b"), T0 + 6000) is Outcome.APPLIED
    assert t.online_flag


@pytest.mark.parametrize("late", [status(99), event(99), birth(7), status(0)])
def test_late_message_of_a_retired_boot_is_ignored(late: Message) -> None:
    t = twin()
    feed(t, birth(), status(1))
    current = status(1, boot="boot-b")
    feed(t, birth(0, boot="boot-b"), current, at=T0 + 10_000)
    assert t.apply(late, T0 + 20_000) is Outcome.OUT_OF_ORDER
    assert (t.boot, t.status, t.online_flag, t.reboots, t.out_of_order) == (
        "boot-b",
        current,
        True,
        1,
        1,
    )
    assert t.last_seen_ms == T0 + 10_001


def test_one_message_of_a_strange_boot_does_not_freeze_the_device_out() -> None:
    # a forged (or corrupt) birth with a new boot retired the real one: every later message of
    # the real device was "late" until it rebooted. A retired boot that goes on (two messages
    # in a row above everything it sent before, not retained) is the live one again.
    t = twin()
    feed(t, birth(0), status(1, states=("charging",) * PORTS))
    assert t.apply(birth(0, boot="forged"), T0 + 10) is Outcome.APPLIED
    assert (t.boot, t.online_flag) == ("forged", True)  # one message: believed, for now
    assert t.apply(status(2), T0 + 20) is Outcome.OUT_OF_ORDER  # one could be a late one
    assert t.apply(status(3), T0 + 30) is Outcome.APPLIED  # two in a row: alive
    assert (t.boot, t.online_flag, t.status_seq, t.max_seq) == ("boot-a", True, 3, 3)
    assert t.status is not None
    assert t.status.boot == "boot-a"
    assert (t.boots_revived, t.retired_boots, t.lost_messages) == (1, ["forged"], 0)
    assert t.apply(status(2), T0 + 40) is Outcome.DUPLICATE  # stored while held
    assert t.apply(death(0), T0 + 50) is Outcome.APPLIED  # its Will applies again
    assert not t.online_flag


@pytest.mark.parametrize(
    "second",
    [
        status(1),  # not above what the boot sent before it was retired
        status(3, boot="boot-b"),  # the current boot spoke in between
    ],
)
def test_a_retired_boot_needs_two_live_messages_in_a_row(second: Message) -> None:
    t = twin()
    feed(t, birth(0), status(1), birth(0, boot="boot-b"), status(1, boot="boot-b"))
    t.apply(status(5), T0 + 10)
    t.apply(second, T0 + 20)
    t.apply(status(6), T0 + 30)
    assert (t.boot, t.boots_revived) == ("boot-b", 0)


def test_retained_messages_of_a_retired_boot_revive_nothing() -> None:
    t = twin()
    feed(t, birth(0), status(1), birth(0, boot="boot-b"))
    t.apply(status(5), T0 + 10, retained=True)
    t.apply(status(6), T0 + 20, retained=True)
    assert (t.boot, t.boots_revived) == ("boot-b", 0)


def test_boots_retired_in_an_older_record_are_never_revived() -> None:
    t = twin()
    feed(t, birth(0), status(1), birth(0, boot="boot-b"))
    record = t.to_record()
    del record["retired_max_seqs"], record["retired_birth_seqs"]  # written before they were
    again = Twin.from_record(record)
    assert again.apply(status(5), T0 + 10) is Outcome.OUT_OF_ORDER
    assert again.apply(status(6), T0 + 20) is Outcome.OUT_OF_ORDER
    assert again.boot == "boot-b"


def test_only_recent_boots_are_remembered() -> None:
    t = twin()
    boots = [f"boot-{i:02d}" for i in range(RETIRED_BOOTS_KEPT + 3)]
    for i, b in enumerate(boots):
        t.apply(birth(0, boot=b), T0 + i)
    assert t.retired_boots == boots[-RETIRED_BOOTS_KEPT - 1 : -1]
    assert (t.retired_max_seqs, t.retired_birth_seqs) == ([0] * RETIRED_BOOTS_KEPT,) * 2
    assert t.reboots == len(boots) - 1


# -- the Will --------------------------------------------------------------------------------


def test_will_of_current_connection_goes_offline() -> None:
    t = twin()
    feed(t, birth(), status(1))
    assert t.apply(death(0), T0 + 5000) is Outcome.APPLIED
    assert not t.online_flag
    assert not t.online(T0 + 5000)
    assert t.changed_ms == T0 + 5000
    assert t.last_seen_ms == T0 + 1  # a Will is no sign of life
    assert t.status is not None  # the last-known state is kept (shown stale)
    assert t.apply(death(0), T0 + 6000) is Outcome.DUPLICATE  # graceful death, then the Will


def test_will_after_reconnect_in_same_boot() -> None:
    t = twin()
    feed(t, birth(0), status(1), birth(2))  # reconnect: the next birth has seq 2
    assert t.apply(death(0), T0 + 5000) is Outcome.STALE_DEATH  # late Will of connection 0
    assert t.online_flag
    assert t.apply(death(2), T0 + 6000) is Outcome.APPLIED  # this connection's Will
    assert not t.online_flag


def test_will_of_an_older_boot_is_ignored() -> None:
    t = twin()
    feed(t, birth(0), status(1), birth(0, boot="boot-b"))
    assert t.apply(death(0, boot="boot-a"), T0 + 5000) is Outcome.STALE_DEATH
    assert (t.online_flag, t.boot) == (True, "boot-b")


def test_will_on_a_fresh_twin() -> None:
    t = twin()
    assert t.apply(death(3), T0) is Outcome.APPLIED
    assert (t.boot, t.online_flag, t.state_seq) == ("boot-a", False, 3)
    # the retained status of the same boot that follows does not bring it online
    assert t.apply(status(4), T0 + 1) is Outcome.APPLIED
    assert not t.online_flag
    # a reconnect does
    assert t.apply(birth(5), T0 + 2) is Outcome.APPLIED
    assert t.online_flag


def test_online_again_after_death_and_reconnect() -> None:
    t = twin()
    feed(t, birth(0), death(0))
    assert not t.online_flag
    assert t.apply(birth(1), T0 + 60_000) is Outcome.APPLIED
    assert t.online_flag
    assert t.online_since_ms == T0 + 60_000


def test_a_live_message_after_the_will_disproves_it() -> None:
    # a forged Will (any client that may write the state topic) once kept a device offline
    # while its statuses kept arriving: a message of the same boot newer than everything seen
    # when the Will applied proves a live connection (Sparkplug: data after a death)
    t = twin()
    feed(t, birth(0), status(1))
    assert t.apply(death(0), T0 + 5000) is Outcome.APPLIED
    assert not t.online(T0 + 5000)
    assert t.apply(status(2), T0 + 6000) is Outcome.APPLIED
    assert t.online_flag
    assert t.online(T0 + 6000)
    assert (t.wills_disproved, t.online_since_ms) == (1, T0 + 6000)
    # the same for an event, after the next Will
    t.apply(death(0), T0 + 7000)
    assert not t.online_flag
    assert t.apply(event(3), T0 + 8000) is Outcome.APPLIED
    assert (t.online_flag, t.wills_disproved) == (True, 2)


@pytest.mark.parametrize(
    "after",
    [
        status(1),  # a redelivery of what was seen before the Will
        event(2),  # a late message, sent before the connection died
    ],
)
def test_nothing_older_than_the_will_disproves_it(after: Message) -> None:
    t = twin()
    feed(t, birth(0), event(1), status(3))  # 2 is late
    t.apply(death(0), T0 + 5000)
    t.apply(after, T0 + 6000)
    assert (t.online_flag, t.wills_disproved) == (False, 0)


def test_a_retained_message_does_not_disprove_a_will() -> None:
    t = twin()
    feed(t, birth(0), status(1))
    t.apply(death(0), T0 + 5000)
    # a retained status proves nothing about a live connection (it may be the broker's copy)
    t.apply(status(2, ts=T0 + 4000), T0 + 6000, retained=True)
    assert (t.online_flag, t.wills_disproved) == (False, 0)


def test_a_new_boot_needs_its_birth_after_a_will() -> None:
    t = twin()
    feed(t, birth(0), status(1), death(0))
    t.apply(status(1, boot="boot-b"), T0 + 6000)
    assert (t.online_flag, t.wills_disproved) == (False, 0)


def test_a_will_far_past_the_sequence_cannot_be_placed() -> None:
    # it names no connection we know; applied, it would also hold back the births after it
    t = twin()
    feed(t, birth(0), status(1))
    assert t.apply(death(2 + SEQ_JUMP_MAX + 1), T0 + 5000) is Outcome.STALE_DEATH
    assert t.online_flag
    assert t.apply(death(2 + SEQ_JUMP_MAX), T0 + 5000) is Outcome.APPLIED  # birth lost
    assert not t.online_flag


# -- retained messages -----------------------------------------------------------------------


def test_retained_status_before_retained_birth_still_online() -> None:
    """On (re)subscribe the broker hands out retained messages of both topics in any order."""
    t = twin()
    now = T0 + 10_000
    s = status(17, ts=now - 2000)
    assert t.apply(s, now, retained=True) is Outcome.APPLIED
    assert t.apply(birth(0, ts=now - 60_000), now + 1, retained=True) is Outcome.APPLIED
    assert t.online_flag
    assert t.status is s
    assert t.birth_seq == 0
    assert t.last_seen_ms == now - 2000  # the status proves life up to its own ts
    assert t.online(now)
    assert t.lost_messages == 0


def test_retained_refreshes_last_seen_only_up_to_its_ts() -> None:
    t = twin()
    old = T0 - 10 * 60_000
    t.apply(birth(0, ts=old - 1000), T0, retained=True)
    t.apply(status(9, ts=old), T0 + 1, retained=True)
    assert t.last_seen_ms == old
    assert t.online_flag
    assert not t.online(T0)  # ten minutes old: stale, not live
    # a live message brings it back
    t.apply(status(10, ts=T0 + 2), T0 + 2)
    assert t.last_seen_ms == T0 + 2
    assert t.online(T0 + 2)


def test_retained_ts_in_our_future_is_capped_at_arrival() -> None:
    t = twin()
    t.apply(birth(0, ts=T0 + 3_600_000), T0, retained=True)  # device clock an hour ahead
    assert t.last_seen_ms == T0


def test_last_seen_never_goes_back() -> None:
    t = twin()
    t.apply(birth(0), T0 + 5000)
    t.apply(status(1, ts=T0 - 60_000), T0 + 6000, retained=True)
    assert t.last_seen_ms == T0 + 5000


# -- lost messages ---------------------------------------------------------------------------


def test_gap_counts_lost_and_late_message_uncounts() -> None:
    t = twin()
    feed(t, birth(0), status(1), status(5))
    assert t.lost_messages == 3  # 2, 3, 4
    assert t.apply(event(3), T0 + 10) is Outcome.APPLIED
    assert t.lost_messages == 2
    assert t.apply(status(4), T0 + 11) is Outcome.OUT_OF_ORDER
    assert t.lost_messages == 1
    assert t.apply(event(2), T0 + 12) is Outcome.APPLIED
    assert t.lost_messages == 0


def test_redelivery_of_a_received_message_does_not_uncount_a_loss() -> None:
    t = twin()
    feed(t, birth(0), status(1), status(2), status(4))
    assert t.lost_messages == 1  # 3 is missing
    # QoS 1 redelivers status 2 after a reconnect: it was never lost, 3 still is
    t.apply(status(2), T0 + 10)
    t.apply(birth(0), T0 + 11)
    assert t.lost_messages == 1


def test_duplicate_does_not_uncount_a_loss() -> None:
    t = twin()
    feed(t, birth(0), status(3))
    assert t.lost_messages == 2
    assert t.apply(status(3), T0 + 10) is Outcome.DUPLICATE
    assert t.lost_messages == 2


def test_losses_of_a_previous_boot_stay_counted() -> None:
    t = twin()
    feed(t, birth(0), status(3))
    t.apply(birth(0, boot="boot-b"), T0 + 10)
    t.apply(status(1, boot="boot-b"), T0 + 11)
    assert t.lost_messages == 2


def test_redelivered_older_status_is_a_duplicate_not_out_of_order() -> None:
    # after a broker restart QoS 1 redelivers what was stored but never acknowledged, after
    # newer messages: each message must be counted once (12 such "out of order" were seen)
    t = twin()
    feed(t, birth(0), status(1), status(2), event(3), status(4))
    assert [t.apply(m, T0 + 10) for m in (status(2), status(1), event(3), birth(0))] == [
        Outcome.DUPLICATE
    ] * 4
    assert (t.duplicates, t.out_of_order, t.lost_messages) == (4, 0, 0)
    assert t.status is not None
    assert t.status.seq == 4
    # a real late message is still out of order, once; its redelivery is a duplicate
    feed(t, status(6), status(5), status(5), at=T0 + 20)
    assert (t.out_of_order, t.duplicates, t.lost_messages) == (1, 5, 0)


def test_redeliveries_are_recognised_only_within_the_recent_window() -> None:
    t = twin()
    last = 2 * RECENT_SEQS_KEPT + 1  # the memory is trimmed to the newest 64 past 128
    feed(t, birth(0), *(status(seq) for seq in range(1, last + 1)))
    oldest_kept = last - RECENT_SEQS_KEPT
    assert t.apply(status(oldest_kept), T0 + 10) is Outcome.DUPLICATE  # still remembered
    assert t.apply(status(1), T0 + 11) is Outcome.OUT_OF_ORDER  # forgotten: older, not applied


def test_repeated_events_are_remembered_apart_from_statuses() -> None:
    # a late repeat of an event must not look new (its alert would be raised again)
    t = twin()
    feed(t, birth(0), event(1), *(status(seq) for seq in range(2, RECENT_SEQS_KEPT + 3)))
    assert t.apply(event(1), T0 + 10) is Outcome.DUPLICATE


def test_one_huge_seq_jump_is_held_and_does_not_freeze_the_device() -> None:
    # a forged (or corrupt) status with a huge seq once froze the real device out for the
    # rest of its boot, and lost_messages read 9.22e18
    t = twin()
    feed(t, birth(0), status(1))
    forged = status(2**53 - 1)
    assert t.apply(forged, T0 + 10) is Outcome.SEQ_JUMP
    assert t.status is not None
    assert t.status.seq == 1  # not applied
    real = status(2, states=("charging",) * PORTS)
    assert feed(t, real, event(3), status(4), at=T0 + 20) == [Outcome.APPLIED] * 3
    assert t.status.seq == 4
    assert (t.max_seq, t.lost_messages, t.out_of_order, t.seq_jumps, t.seq_resets) == (
        4,
        0,
        0,
        1,
        0,
    )
    assert t.apply(forged, T0 + 30) is Outcome.DUPLICATE  # its redelivery: counted once


def test_a_jump_the_device_continues_from_is_a_reset() -> None:
    # a real device whose counter jumped (or that lost more than the window) goes on from the
    # new number: the next message confirms the jump; no billions of lost messages
    t = twin()
    feed(t, birth(0), status(1))
    jump = 1 + SEQ_JUMP_MAX + 2  # SEQ_JUMP_MAX + 1 missing
    assert t.apply(status(jump), T0 + 10) is Outcome.SEQ_JUMP
    assert t.apply(status(jump + 2), T0 + 11) is Outcome.APPLIED  # jump + 1 lost, uncounted
    assert t.status is not None
    assert t.status.seq == jump + 2
    assert (t.max_seq, t.lost_messages, t.seq_jumps, t.seq_resets) == (jump + 2, 0, 1, 1)
    assert t.apply(status(jump + 1), T0 + 12) is Outcome.OUT_OF_ORDER  # late, as usual
    assert t.apply(status(jump + 3), T0 + 13) is Outcome.APPLIED


def test_gap_within_the_window_is_counted() -> None:
    t = twin()
    feed(t, birth(0), status(SEQ_JUMP_MAX + 1))
    assert (t.lost_messages, t.seq_jumps) == (SEQ_JUMP_MAX, 0)
    t.apply(status(SEQ_JUMP_MAX), T0 + 10)  # the message just before the gap's end was late
    assert t.lost_messages == SEQ_JUMP_MAX - 1


# -- persistence -----------------------------------------------------------------------------


def _cabinet_status(seq: int) -> CabinetStatus:
    return CabinetStatus.of(
        {
            "v": 1,
            "ts": "2026-11-28T12:00:00.250+08:00",
            "boot": "boot-a",
            "seq": seq,
            "kind": "cabinet",
            "smoke": True,
            "faults": ["vendor_x42"],
            "temp_c": 28.5,
            "slots": [
                {"n": 1, "state": "ready", "battery": "B-1", "soc": 97, "temp_c": 27.1},
                {"n": 2, "state": "charging", "soc": 43, "power_w": 250},
                {"n": 3, "state": "empty"},
                {"n": 4, "state": "faulted", "fault": "lock_failure"},
            ],
        }
    )


def _cabinet_birth(seq: int = 0) -> Birth:
    return Birth.of(
        {
            "v": 1,
            "ts": T0,
            "boot": "boot-a",
            "seq": seq,
            "online": True,
            "kind": "cabinet",
            "slots": 4,
        }
    )


def test_record_round_trip_pile() -> None:
    t = twin()
    feed(t, birth(0), status(1, states=("charging", "finished", "available", "reserved")))
    feed(t, event(4), birth(0, boot="boot-b"), at=T0 + 100)  # a gap, then a reboot
    assert (t.lost_messages, t.reboots, t.retired_boots) == (2, 1, ["boot-a"])
    record = t.to_record()
    again = Twin.from_record(json.loads(json.dumps(record)))  # a record is plain JSON
    assert again == t
    assert again.to_record() == record


def test_record_round_trip_cabinet() -> None:
    t = twin("cabinet")
    feed(t, _cabinet_birth(), _cabinet_status(1), death(0))
    record = t.to_record()
    again = Twin.from_record(json.loads(json.dumps(record)))
    assert again == t
    assert again.to_record() == record
    assert (again.online_flag, again.release_soc, again.status_seq) == (False, 95, 1)


def test_record_round_trip_keeps_status_and_counters() -> None:
    t = twin("cabinet")
    feed(
        t, _cabinet_birth(), _cabinet_status(3), event(2), event(2)
    )  # 1 and 2 missing, then 2 arrives late
    again = Twin.from_record(json.loads(json.dumps(t.to_record())))
    assert isinstance(again.status, CabinetStatus)
    assert again.status.device_faults == ["vendor_x42", "smoke"]
    assert [s.soc for s in again.status.slots] == [97, 43, None, None]
    assert again.status.ts == 1_795_838_400_250  # 2026-11-28T04:00:00.250Z
    assert (again.lost_messages, again.duplicates, again.recent_seqs) == (1, 1, [0, 3, 2])
    assert again.recent_event_seqs == [2]
    # ordering continues where it left off
    assert again.apply(event(2), T0 + 10) is Outcome.DUPLICATE
    assert again.apply(_cabinet_status(1), T0 + 11) is Outcome.OUT_OF_ORDER
    assert again.lost_messages == 0  # 1 was late, not lost


def test_from_record_ignores_unknown_fields() -> None:
    record = twin().to_record()
    record["field_from_a_newer_version"] = 1
    assert Twin.from_record(record) == twin()


def test_shipped_catalog_twins() -> None:
    catalog = Catalog.load()
    twins = [Twin.for_device(d) for d in catalog.devices.values()]
    assert {(t.kind, t.units) for t in twins} == {("pile", 10), ("cabinet", 12)}
    assert all(t.boot is None and not t.online(T0) for t in twins)
