"""The benchmarks' messages have the district's shapes, as its devices write them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from bench.workload import Stream, birth_payload, specs_of, status_sizes, write_catalog
from devices.catalog import Catalog
from devices.contract import Birth, CabinetStatus, PileStatus, decode


def test_a_synthetic_catalog_has_the_districts_devices_in_its_proportions(
    tmp_path: Path,
) -> None:
    district = Counter((d.kind, d.spec.units) for d in Catalog.load().devices.values())
    specs = specs_of(write_catalog(tmp_path / "c.json", 1_000))
    shapes = Counter((s.kind, s.units) for s in specs)
    assert set(shapes) == set(district) == {("pile", 10), ("cabinet", 12)}
    share = shapes["cabinet", 12] / len(specs)
    assert abs(share - district["cabinet", 12] / district.total()) < 0.01
    # any prefix keeps the mix: the short benchmarks use small fleets
    assert {s.kind for s in specs[:10]} == {"pile", "cabinet"}


def test_the_stream_sends_valid_district_sized_messages_that_change(tmp_path: Path) -> None:
    specs = specs_of(write_catalog(tmp_path / "c.json", 20))
    stream = Stream(specs, seed=1, births=True)
    msgs = list(stream.messages(3 * len(specs), 1_796_284_800_000))
    births = [decode("state", p) for _, p in msgs[: len(specs)]]
    assert all(isinstance(b, Birth) for b in births)
    statuses = [decode("status", p) for _, p in msgs[len(specs) :]]
    assert all(isinstance(s, PileStatus | CabinetStatus) for s in statuses)
    by_id = {s.id: s for s in specs}
    for (topic, _), status in zip(msgs[len(specs) :], statuses, strict=True):
        assert isinstance(status, PileStatus | CabinetStatus)
        assert len(status.units) == by_id[topic.split("/")[2]].units
    # a device's two statuses differ (its model lived a step between them)
    first, second = msgs[len(specs)][1], msgs[2 * len(specs)][1]
    assert first != second
    sizes = status_sizes(specs, count=200)
    assert 600 < sizes["pile"] < 1_200, sizes
    assert 800 < sizes["cabinet"] < 1_500, sizes
    # the same seed gives the same bytes
    again = Stream(specs, seed=1, births=True)
    assert list(again.messages(len(msgs), 1_796_284_800_000)) == msgs
    assert birth_payload(specs[0], "b00t", 0, 1) == birth_payload(specs[0], "b00t", 0, 1)
