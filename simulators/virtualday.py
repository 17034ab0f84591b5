"""The district's traffic in virtual time, without a broker: what each device would publish.

The same models as ``chargewatch simulate`` (``simulators.pile``/``cabinet``), stepped by
``STEP_S``; each device publishes a status on every change and its events, and beats every
0.8-0.95 x ``heartbeat_s`` of device time after its last status, as
``simulators.device.SimDevice`` does on the wire. For measurements over simulated days that
the wall-clock simulator cannot run fast enough (its heartbeat is in wall seconds).

    python -m simulators.virtualday --hours 24 [--devices N]   # JSON lines on stdout
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import Any, NamedTuple

from devices.catalog import Catalog, Device
from devices.topics import Channel
from simulators import payloads
from simulators.cabinet import CabinetModel
from simulators.model import DEFAULT_FAULT_RATE, STEP_S, DeviceModel
from simulators.pile import PileModel
from simulators.rng import device_rng

HEARTBEAT_S = 30
DAY_START_S = 1_796_140_800.0  # 2026-12-02T00:00:00+08:00, midnight local


class Wire(NamedTuple):
    """One publish: device, channel, sim time (epoch s), boot, seq and the payload text."""

    device_id: str
    channel: Channel
    at: float
    boot: str
    seq: int
    text: str


class VirtualDevice:
    def __init__(self, device: Device, start: float, seed: int = 1) -> None:
        self.device = device
        model_type = PileModel if device.kind == "pile" else CabinetModel
        rng = device_rng(seed, device.id)
        self.model: DeviceModel = model_type(device.spec, rng, start, fault_rate=DEFAULT_FAULT_RATE)
        self.model.drain()
        self.boot = f"{rng.getrandbits(48):012x}"
        self.seq = 0
        self.beat_s = HEARTBEAT_S * rng.uniform(0.8, 0.95)
        self.last_status = start

    def _send(self, channel: Channel, at: float, body: dict[str, Any]) -> Wire:
        text = payloads.message(self.device.kind, at, self.boot, self.seq, body)
        wire = Wire(self.device.id, channel, at, self.boot, self.seq, text)
        self.seq += 1
        if channel == "status":
            self.last_status = at
        return wire

    def birth(self, at: float) -> list[Wire]:
        """A birth and the status that follows it."""
        body = payloads.birth_body(self.model.birth_fields(), HEARTBEAT_S)
        return [self._send("state", at, body), self._send("status", at, self.model.snapshot())]

    def death(self, at: float) -> Wire:
        """The Will of the current connection (no ``ts``: ``at`` is when it arrives)."""
        wire = Wire(self.device.id, "state", at, self.boot, self.seq, payloads.death(self.boot, 0))
        self.seq += 1
        return wire

    def skip(self, t: float) -> None:
        """Run the model to ``t`` publishing nothing (the device is offline)."""
        self.model.advance_to(t)
        self.model.drain()
        self.last_status = t

    def until(self, t: float) -> list[Wire]:
        """What the device publishes in (t - STEP_S, t]: events, a status on change, and
        heartbeats."""
        out: list[Wire] = []
        self.model.advance_to(t)
        drained = self.model.drain()
        for event in drained.events:
            out.append(self._send("event", event.at, event.body))
        if drained.changed:
            out.append(self._send("status", t, self.model.snapshot()))
        while self.last_status + self.beat_s <= t:
            out.append(self._send("status", self.last_status + self.beat_s, self.model.snapshot()))
        return out


def chosen(catalog: Catalog, devices: int | None) -> list[Device]:
    """The first ``devices`` of the catalog spread over it (None: all)."""
    every = list(catalog.devices.values())
    if devices is None or devices >= len(every):
        return every
    return every[:: len(every) // devices][:devices]


def day(
    catalog: Catalog,
    devices: int | None = None,
    hours: float = 24.0,
    start: float = DAY_START_S,
    seed: int = 1,
) -> Iterator[list[Wire]]:
    """Births, then each step's publishes of every device, one list per step."""
    sims = [VirtualDevice(d, start, seed) for d in chosen(catalog, devices)]
    yield [w for sim in sims for w in sim.birth(start)]
    t = start
    while t + STEP_S <= start + hours * 3600:
        t += STEP_S
        yield [w for sim in sims for w in sim.until(t)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulators.virtualday", description=__doc__)
    p.add_argument("--hours", type=float, default=24.0)
    p.add_argument("--devices", type=int, help="devices spread over the catalog (default all)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    out = sys.stdout
    for step in day(Catalog.load(), args.devices, args.hours, seed=args.seed):
        for w in step:
            out.write(json.dumps(w._asdict(), ensure_ascii=False, separators=(",", ":")) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
