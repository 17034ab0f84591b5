"""Simulated charging piles and swap cabinets that speak contract v1 over MQTT.

Layout: pure behaviour (``daycycle``, ``model``, ``pile``, ``cabinet``, ``rng``) that only
moves state along a simulated clock; the wire (``payloads``, ``mqtt``, ``device``,
``backoff``, ``truth``) that turns that state into firmware-identical MQTT traffic; and the
``fleet`` and ``cli`` that run every catalog device from one process.

Errors::

    SimulatorError        anything the simulator refuses to do
     +-- UnknownDevice    a device id that this fleet does not run
     +-- UnsupportedUnit  an injection (or a command) that makes no sense for this device
     +-- LockFailed       a command tried and not carried out (its result is ``failed``)

simulators depends only on ``devices`` of ours and the stdlib: its MQTT 3.1.1 client is its
own (``mqtt``), one asyncio protocol per device connection.
"""

from simulators.errors import LockFailed, SimulatorError, UnknownDevice, UnsupportedUnit

__all__ = ["LockFailed", "SimulatorError", "UnknownDevice", "UnsupportedUnit"]
