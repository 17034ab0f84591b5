"""What the benchmarks send: synthetic catalogs of any size and contract v1 payloads.

Pure functions, no I/O but writing the catalog file. A synthetic catalog has stations of
``DEVICES_PER_STATION`` two-port piles spread around the district's centre, so a status
is about 250 bytes (the issue's "250-byte class"); the district's own catalog (10-port piles,
12-slot cabinets) is used where the benchmark is about the district.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from devices.catalog import Catalog, DeviceSpec

DEVICES_PER_STATION = 10
PORTS_PER_PILE = 2
CENTRE = (31.742, 117.296)
_LOCAL = timezone(timedelta(hours=8))


def synthetic_catalog(devices: int) -> dict[str, Any]:
    """A catalog of ``devices`` two-port piles, ten per station, within ~5 km of the centre."""
    rng = random.Random(devices)
    stations = []
    for s in range(math.ceil(devices / DEVICES_PER_STATION)):
        first = s * DEVICES_PER_STATION
        ids = range(first, min(first + DEVICES_PER_STATION, devices))
        stations.append(
            {
                "id": f"bench-{s:05d}",
                "name": {"zh": f"测试站 {s}", "en": f"Bench station {s}"},
                "lat": round(CENTRE[0] + rng.uniform(-0.045, 0.045), 6),
                "lon": round(CENTRE[1] + rng.uniform(-0.05, 0.05), 6),
                "address": {"zh": "测试", "en": "bench"},
                "site_kind": "roadside",
                "devices": [
                    {"id": f"B{i:06d}", "kind": "pile", "ports": PORTS_PER_PILE} for i in ids
                ],
            }
        )
    return {
        "district": {"name": {"zh": "基准", "en": "Benchmark"}, "lat": CENTRE[0], "lon": CENTRE[1]},
        "stations": stations,
    }


def write_catalog(path: Path, devices: int) -> Path:
    path.write_text(json.dumps(synthetic_catalog(devices), ensure_ascii=False), encoding="utf-8")
    return path


def _pile_ts(ms: int) -> str:
    dt = datetime.fromtimestamp(ms / 1000, tz=UTC).astimezone(_LOCAL)
    return dt.isoformat(timespec="milliseconds")


def status_payload(spec: DeviceSpec, boot: str, seq: int, ts_ms: int, variant: int = 0) -> bytes:
    """A contract v1 status for ``spec`` (every port/slot listed), as compact JSON bytes.

    Piles stamp RFC 3339 and cabinets epoch ms, as the simulators do; ``variant`` moves the
    numbers so consecutive statuses differ.
    """
    body: dict[str, Any]
    if spec.kind == "pile":
        ports = []
        for n in range(1, spec.units + 1):
            if (n + variant) % 2:
                ports.append(
                    {
                        "n": n,
                        "state": "charging",
                        "power_w": 150.0 + (variant % 50),
                        "energy_wh": round(90.0 + variant * 0.3, 1),
                        "session": f"s-{variant % 65536:04x}",
                    }
                )
            else:
                ports.append({"n": n, "state": "available", "power_w": 0, "energy_wh": 0})
        body = {
            "v": 1,
            "ts": _pile_ts(ts_ms),
            "boot": boot,
            "seq": seq,
            "kind": "pile",
            "temp_c": round(30.0 + (variant % 10) * 0.1, 1),
            "rssi_dbm": -71,
            "faults": [],
            "ports": ports,
        }
    else:
        slots: list[dict[str, Any]] = []
        for n in range(1, spec.units + 1):
            if (n + variant) % 3 == 0:
                slots.append({"n": n, "state": "empty"})
            else:
                slots.append(
                    {
                        "n": n,
                        "state": "ready" if n % 2 else "charging",
                        "battery": f"B-{n:05d}",
                        "soc": 95 if n % 2 else 40 + variant % 50,
                        "temp_c": 27.5,
                    }
                )
        body = {
            "v": 1,
            "ts": ts_ms,
            "boot": boot,
            "seq": seq,
            "kind": "cabinet",
            "temp_c": 28.0,
            "smoke": False,
            "door_open": False,
            "faults": [],
            "slots": slots,
        }
    return json.dumps(body, separators=(",", ":")).encode()


def birth_payload(spec: DeviceSpec, boot: str, seq: int, ts_ms: int) -> bytes:
    units = "ports" if spec.kind == "pile" else "slots"
    body = {
        "v": 1,
        "ts": ts_ms,
        "boot": boot,
        "seq": seq,
        "online": True,
        "kind": spec.kind,
        "model": "bench",
        "firmware": "1.0",
        units: spec.units,
        "heartbeat_s": 30,
    }
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass
class Stream:
    """Statuses round-robin over devices, each device's seq rising: ``next()`` -> message."""

    specs: list[DeviceSpec]
    prefix: str = "cw/v1"
    seed: int = 1
    births: bool = False  # send each device's birth before its first status

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        self.boots = [f"{rng.getrandbits(48):012x}" for _ in self.specs]
        self.seqs = [0] * len(self.specs)
        self.topics = [f"{self.prefix}/{s.id}/status" for s in self.specs]
        self.state_topics = [f"{self.prefix}/{s.id}/state" for s in self.specs]
        self._i = 0

    def messages(self, count: int, now_ms: int) -> Iterator[tuple[str, bytes]]:
        for _ in range(count):
            yield self.next(now_ms)

    def next(self, now_ms: int) -> tuple[str, bytes]:
        i = self._i % len(self.specs)
        self._i += 1
        spec, seq = self.specs[i], self.seqs[i]
        self.seqs[i] += 1
        if self.births and seq == 0:
            return self.state_topics[i], birth_payload(spec, self.boots[i], 0, now_ms)
        return self.topics[i], status_payload(spec, self.boots[i], seq, now_ms, variant=seq + i)


def specs_of(catalog_path: Path | None, exclude: frozenset[str] = frozenset()) -> list[DeviceSpec]:
    catalog = Catalog.load(catalog_path)
    return [d.spec for d in catalog.devices.values() if d.id not in exclude]
