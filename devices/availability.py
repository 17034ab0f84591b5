"""The availability rules of contract v1: what is online, free and ready.

- Online: the latest ``state`` said ``online: true`` AND a message arrived within
  ``STALE_FACTOR`` x ``heartbeat_s``.
- A free charger port: device online, port ``available``, no device-level fault.
- A ready battery: cabinet online, slot ``ready``, ``soc`` >= release level, no fault on the
  slot or the cabinet, and the pack is not flagged (a safety event in its past: battery
  passports), whatever the cabinet says.
"""

from __future__ import annotations

from collections.abc import Collection

from devices.contract import CabinetStatus, PileStatus, Slot

STALE_FACTOR = 3


def is_fresh(last_seen_ms: int | None, heartbeat_s: int, now_ms: int) -> bool:
    """A message arrived within ``STALE_FACTOR`` heartbeats."""
    return last_seen_ms is not None and now_ms - last_seen_ms <= STALE_FACTOR * heartbeat_s * 1000


def is_online(online_flag: bool, last_seen_ms: int | None, heartbeat_s: int, now_ms: int) -> bool:
    return online_flag and is_fresh(last_seen_ms, heartbeat_s, now_ms)


def free_ports(status: PileStatus) -> int:
    """Ports a rider can plug into now, assuming the pile is online."""
    if status.device_faults:
        return 0
    return sum(1 for port in status.ports if port.state == "available" and not port.fault)


def slot_is_ready(slot: Slot, release_soc: float, flagged: Collection[str] = ()) -> bool:
    """``flagged``: serials of packs never to hand out."""
    return (
        slot.state == "ready"
        and slot.fault is None
        and slot.soc is not None
        and slot.soc >= release_soc
        and (slot.battery is None or slot.battery not in flagged)
    )


def ready_batteries(
    status: CabinetStatus, release_soc: float, flagged: Collection[str] = ()
) -> int:
    """Batteries a rider can take now, assuming the cabinet is online."""
    if status.device_faults:
        return 0
    return sum(1 for slot in status.slots if slot_is_ready(slot, release_soc, flagged))
