"""Fault codes of contract v1 and how serious each is.

Unknown codes are kept (vendors add their own): ``severity`` gives them ``major``.
"""

from __future__ import annotations

from typing import Literal

Severity = Literal["critical", "major", "minor", "warning"]

FAULT_CODES: frozenset[str] = frozenset(
    {
        "over_temperature",
        "over_current",
        "over_voltage",
        "under_voltage",
        "ground_fault",
        "relay_stuck",
        "meter_failure",
        "comm_error",
        "power_loss",
        "lock_failure",
        "door_fault",
        "battery_fault",
        "smoke",
        "thermal_runaway",
        "water_leak",
        "internal_error",
    }
)

SAFETY_CRITICAL: frozenset[str] = frozenset({"smoke", "thermal_runaway", "water_leak"})

_SEVERITY: dict[str, Severity] = {
    "smoke": "critical",
    "thermal_runaway": "critical",
    "water_leak": "critical",
    # Fire precursors and electrical hazards: someone must look today.
    "over_temperature": "major",
    "ground_fault": "major",
    "over_current": "major",
    "over_voltage": "major",
    "battery_fault": "major",
    "relay_stuck": "major",
    "power_loss": "major",
    # Take a port or slot out of service but endanger nobody.
    "lock_failure": "minor",
    "door_fault": "minor",
    "meter_failure": "minor",
    "under_voltage": "minor",
    "internal_error": "minor",
    "comm_error": "warning",
}


def severity(code: str) -> Severity:
    """The severity of a fault code; an unknown vendor code is ``major`` until triaged."""
    return _SEVERITY.get(code, "major")


def is_known(code: str) -> bool:
    return code in FAULT_CODES
