"""The simulator's exception hierarchy (drawn in the package docstring)."""

from __future__ import annotations


class SimulatorError(Exception):
    """Anything the simulator refuses to do."""


class UnknownDevice(SimulatorError, KeyError):
    """A device id that this fleet does not run."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown device"


class UnsupportedUnit(SimulatorError, ValueError):
    """An injection that makes no sense for this kind of device (or a unit out of range)."""


class LockFailed(SimulatorError):
    """A command the device tried and could not carry out (a faulty lock or door): its
    ``command_result`` is ``failed``."""
