"""What the benchmarks send: catalogs of any size shaped like the district, and contract v1
payloads as the simulators' devices write them.

A synthetic catalog repeats the shipped district's devices (``devices/data/district.json``:
10-port piles and 12-slot cabinets, in its proportions) in stations of
``DEVICES_PER_STATION`` around the district's centre; its payloads come from the simulators'
own pile and cabinet models (``simulators.pile``, ``simulators.cabinet``) and wire format
(``simulators.payloads``), so a benchmark message is what a district device publishes
(a status: ~0.85 KB from a pile, ~1.1 KB from a cabinet). Deterministic: the same seed gives the same
bytes. No I/O but writing the catalog file.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from devices.catalog import Catalog, DeviceSpec
from simulators.cabinet import CabinetModel
from simulators.model import STEP_S, DeviceModel
from simulators.payloads import birth_body, message
from simulators.pile import PileModel

DEVICES_PER_STATION = 10
CENTRE = (31.742, 117.296)
SIM_START_S = datetime(2026, 11, 28, 4, 0, tzinfo=UTC).timestamp()
"""The models' own clock starts at noon in the district (fixed: the same bytes every run)."""
HEARTBEAT_S = 30


def _district_devices() -> list[dict[str, Any]]:
    """The shipped catalog's devices as catalog entries, ids left out, in catalog order."""
    return [
        d.spec.model_dump(exclude={"id"}, exclude_none=True)
        for d in Catalog.load().devices.values()
    ]


def synthetic_catalog(devices: int) -> dict[str, Any]:
    """A catalog of ``devices`` devices shaped like the district's (its piles and cabinets,
    interleaved in its proportions), ten per station, within ~5 km of the centre."""
    rng = random.Random(devices)
    shapes = _district_devices()
    # interleave piles and cabinets so any prefix keeps the district's mix
    piles = [d for d in shapes if d["kind"] == "pile"]
    cabinets = [d for d in shapes if d["kind"] == "cabinet"]
    mixed: list[dict[str, Any]] = []
    for i in range(len(shapes)):
        want_cabinets = round((i + 1) * len(cabinets) / len(shapes))
        taken = sum(1 for d in mixed if d["kind"] == "cabinet")
        pool = cabinets if taken < want_cabinets else piles
        mixed.append(pool[(taken if pool is cabinets else i - taken) % len(pool)])
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
                "devices": [{"id": f"B{i:06d}", **mixed[i % len(mixed)]} for i in ids],
            }
        )
    return {
        "district": {"name": {"zh": "基准", "en": "Benchmark"}, "lat": CENTRE[0], "lon": CENTRE[1]},
        "stations": stations,
    }


def write_catalog(path: Path, devices: int) -> Path:
    path.write_text(json.dumps(synthetic_catalog(devices), ensure_ascii=False), encoding="utf-8")
    return path


def _model(spec: DeviceSpec, rng: random.Random) -> DeviceModel:
    cls = PileModel if spec.kind == "pile" else CabinetModel
    return cls(spec, rng, SIM_START_S)


def birth_payload(spec: DeviceSpec, boot: str, seq: int, ts_ms: int) -> bytes:
    """A birth as the simulators' device of ``spec`` publishes it."""
    fields = _model(spec, random.Random(spec.id)).birth_fields()
    return message(spec.kind, ts_ms / 1000, boot, seq, birth_body(fields, HEARTBEAT_S)).encode()


@dataclass
class Stream:
    """Statuses round-robin over devices, each device's seq rising: ``next()`` -> message.

    Each device is a simulator model; between two of its statuses it lives one behaviour
    step (``STEP_S`` of its own clock: sessions charge, packs fill, riders come), so
    consecutive statuses differ as a real device's do. ``ts`` is the ``now_ms`` given."""

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
        self._models: list[DeviceModel | None] = [None] * len(self.specs)
        self._i = 0

    def messages(self, count: int, now_ms: int) -> Iterator[tuple[str, bytes]]:
        for _ in range(count):
            yield self.next(now_ms)

    def model(self, i: int) -> DeviceModel:
        model = self._models[i]
        if model is None:  # made when first needed: 50,000 models take a while
            spec = self.specs[i]
            model = self._models[i] = _model(spec, random.Random(f"{self.seed}/{spec.id}"))
        return model

    def next(self, now_ms: int) -> tuple[str, bytes]:
        i = self._i % len(self.specs)
        self._i += 1
        spec, seq = self.specs[i], self.seqs[i]
        self.seqs[i] += 1
        model = self.model(i)
        t = now_ms / 1000
        if self.births and seq == 0:
            body = birth_body(model.birth_fields(), HEARTBEAT_S)
            return self.state_topics[i], message(spec.kind, t, self.boots[i], 0, body).encode()
        model.advance_to(model.t + STEP_S)
        model.drain()  # its events are not sent: the benchmarks measure statuses
        payload = message(spec.kind, t, self.boots[i], seq, model.snapshot())
        return self.topics[i], payload.encode()


def status_sizes(specs: list[DeviceSpec], count: int = 2_000) -> dict[str, float]:
    """Mean bytes of a status, per kind, over the first ``count`` statuses of a stream."""
    by_kind: dict[str, list[int]] = {}
    stream = Stream(specs, seed=1)
    kinds = {s.id: s.kind for s in specs}
    for topic, payload in stream.messages(count, 1_796_284_800_000):
        by_kind.setdefault(kinds[topic.split("/")[-2]], []).append(len(payload))
    return {kind: statistics.fmean(sizes) for kind, sizes in sorted(by_kind.items())}


def specs_of(catalog_path: Path | None, exclude: frozenset[str] = frozenset()) -> list[DeviceSpec]:
    catalog = Catalog.load(catalog_path)
    return [d.spec for d in catalog.devices.values() if d.id not in exclude]
