"""Availability rules of contract v1: online, free ports, ready batteries."""

from __future__ import annotations

from typing import Any

import pytest

from devices.availability import (
    STALE_FACTOR,
    free_ports,
    is_fresh,
    is_online,
    ready_batteries,
    slot_is_ready,
)
from devices.contract import CabinetStatus, PileStatus, Slot

T0 = 1_796_284_800_000


def pile(ports: list[dict[str, Any]], **extra: Any) -> PileStatus:
    numbered = [{"n": i, **p} for i, p in enumerate(ports, 1)]
    return PileStatus.of(
        {"v": 1, "ts": T0, "boot": "b00t", "seq": 1, "kind": "pile", "ports": numbered, **extra}
    )


def cabinet(slots: list[dict[str, Any]], **extra: Any) -> CabinetStatus:
    numbered = [{"n": i, **s} for i, s in enumerate(slots, 1)]
    return CabinetStatus.of(
        {"v": 1, "ts": T0, "boot": "b00t", "seq": 1, "kind": "cabinet", "slots": numbered, **extra}
    )


AVAILABLE = {"state": "available"}
CHARGING = {"state": "charging", "power_w": 180}


@pytest.mark.parametrize(
    ("ports", "extra", "free"),
    [
        ([AVAILABLE] * 10, {}, 10),
        ([AVAILABLE, CHARGING, AVAILABLE], {}, 2),
        ([CHARGING, CHARGING], {}, 0),
        (
            [
                AVAILABLE,
                {"state": "finished"},
                {"state": "reserved"},
                {"state": "disabled"},
                {"state": "faulted", "fault": "relay_stuck"},
            ],
            {},
            1,
        ),
        # an available port that still reports a fault code is not offered
        ([AVAILABLE, {"state": "available", "fault": "meter_failure"}], {}, 1),
        # any device-level fault zeroes the pile, known code or not
        ([AVAILABLE] * 10, {"faults": ["over_temperature"]}, 0),
        ([AVAILABLE] * 10, {"faults": ["comm_error"]}, 0),
        ([AVAILABLE] * 10, {"faults": ["vendor_x42"]}, 0),
        ([AVAILABLE] * 10, {"faults": []}, 10),
    ],
)
def test_free_ports(ports: list[dict[str, Any]], extra: dict[str, Any], free: int) -> None:
    assert free_ports(pile(ports, **extra)) == free


READY = {"state": "ready", "battery": "B-1", "soc": 97}


@pytest.mark.parametrize(
    ("slots", "extra", "release_soc", "ready"),
    [
        ([READY] * 12, {}, 90, 12),
        ([READY, {"state": "ready", "soc": 90}, {"state": "ready", "soc": 89.9}], {}, 90, 2),
        ([{"state": "ready", "soc": 92}], {}, 95, 0),  # configurable release level
        ([{"state": "ready", "soc": 92}], {}, 80, 1),
        ([{"state": "ready"}], {}, 90, 0),  # no soc reported: not proven ready
        ([{"state": "ready", "soc": 100, "fault": "lock_failure"}], {}, 90, 0),  # slot fault
        ([{"state": "faulted", "fault": "battery_fault", "soc": 100}], {}, 90, 0),
        (
            [
                {"state": "charging", "soc": 95},
                {"state": "reserved", "soc": 99},
                {"state": "disabled", "soc": 99},
                {"state": "empty"},
                READY,
            ],
            {},
            90,
            1,
        ),
        ([READY] * 12, {"faults": ["water_leak"]}, 90, 0),  # cabinet fault
        ([READY] * 12, {"smoke": True}, 90, 0),  # smoke counts as a fault
        ([READY] * 12, {"smoke": False, "door_open": True}, 90, 12),
    ],
)
def test_ready_batteries(
    slots: list[dict[str, Any]], extra: dict[str, Any], release_soc: float, ready: int
) -> None:
    assert ready_batteries(cabinet(slots, **extra), release_soc) == ready


@pytest.mark.parametrize(
    ("slot", "release_soc", "ready"),
    [
        (Slot(n=1, state="ready", soc=90), 90, True),
        (Slot(n=1, state="ready", soc=89), 90, False),
        (Slot(n=1, state="charging", soc=100), 90, False),
        (Slot(n=1, state="ready", soc=100, fault="over_temperature"), 90, False),
        (Slot(n=1, state="ready", soc=None), 0, False),
    ],
)
def test_slot_is_ready(slot: Slot, release_soc: float, ready: bool) -> None:
    assert slot_is_ready(slot, release_soc) is ready


HB = 30  # seconds


@pytest.mark.parametrize(
    ("flag", "last_seen", "heartbeat_s", "now", "online"),
    [
        (True, T0, HB, T0, True),
        (True, T0, HB, T0 + 89_999, True),
        (True, T0, HB, T0 + 90_000, True),  # exactly 3 heartbeats: still fresh
        (True, T0, HB, T0 + 90_001, False),  # stale after 3 x heartbeat_s
        (True, T0, 60, T0 + 150_000, True),  # the birth's heartbeat counts
        (True, T0, 60, T0 + 180_001, False),
        (True, None, HB, T0, False),  # never heard from
        (False, T0, HB, T0, False),  # the latest state said offline
        (False, None, HB, T0, False),
        (True, T0 + 5_000, HB, T0, True),  # device clock ahead of ours: still fresh
    ],
)
def test_is_online(
    flag: bool, last_seen: int | None, heartbeat_s: int, now: int, online: bool
) -> None:
    assert is_online(flag, last_seen, heartbeat_s, now) is online


def test_freshness_window_is_three_heartbeats() -> None:
    assert STALE_FACTOR == 3
    window = STALE_FACTOR * HB * 1000
    assert is_fresh(T0, HB, T0 + window)
    assert not is_fresh(T0, HB, T0 + window + 1)
    assert not is_fresh(None, HB, T0)
