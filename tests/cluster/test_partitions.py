"""Station -> partition by a stable hash; devices, topic filters and client ids by partition."""

from __future__ import annotations

import collections
import subprocess
import sys

import pytest

from devices.catalog import Catalog
from ingest.partitions import MAX_PARTITIONS, PartitionMap, station_partition
from tests.cluster.catalogs import synthetic


@pytest.mark.parametrize(
    ("station", "partitions", "expected"),
    [
        # golden values: a change here moves every station of every deployment
        ("wanguo-south", 16, 14),
        ("service-centre", 16, 9),
        ("tsinghua-garden", 16, 5),
        ("guanhu-garden", 16, 2),
        ("ziyun-road", 16, 15),
        ("huizhou-avenue", 16, 0),
        ("yungu-road", 16, 11),
        ("a", 2, 1),
        ("站点", 64, 1),
        ("st-0001", 7, 4),
        ("anything", 1, 0),
    ],
)
def test_station_partition_is_a_fixed_function(
    station: str, partitions: int, expected: int
) -> None:
    assert station_partition(station, partitions) == expected


def test_independent_of_the_hash_seed() -> None:
    code = (
        "from ingest.partitions import station_partition as p;"
        "print([p(f'st-{i}', 16) for i in range(50)])"
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("0", "1", "12345")
    }
    assert len(runs) == 1
    assert runs.pop().strip() == str([station_partition(f"st-{i}", 16) for i in range(50)])


@pytest.mark.parametrize("bad", [0, -1, MAX_PARTITIONS + 1, True, 2.0])
def test_partition_count_has_a_range(bad: object) -> None:
    with pytest.raises(ValueError, match="partition count"):
        station_partition("x", bad)  # type: ignore[arg-type]


def test_the_district_spreads_its_seven_stations_over_seven_partitions() -> None:
    catalog = Catalog.load()
    pm = PartitionMap(catalog)
    used = {pm.of_station(s) for s in catalog.stations}
    assert len(used) == 7  # no two of the district's stations share a partition at N=16
    # every device is in its station's partition, and in exactly one partition
    for device in catalog.devices.values():
        assert pm.of_device(device.id) == pm.of_station(device.station_id)
    sizes = [len(pm.devices(p)) for p in range(16)]
    assert sum(sizes) == len(catalog.devices) == 412
    assert sorted(s for s in sizes if s) == sorted(
        len(st.devices) for st in catalog.stations.values()
    )


@pytest.mark.parametrize("partitions", [4, 16, 64])
def test_a_thousand_stations_spread_evenly(partitions: int) -> None:
    catalog = synthetic(1000, per_station=3)
    pm = PartitionMap(catalog, partitions)
    counts = collections.Counter(pm.of_station(s) for s in catalog.stations)
    mean = 1000 / partitions
    assert len(counts) == partitions  # every partition has stations
    # a fair hash: every count within 4 standard deviations (binomial: ~sqrt(mean)) of the mean
    assert all(abs(c - mean) <= 4 * mean**0.5 for c in counts.values()), counts
    for p in range(partitions):
        assert len(pm.devices(p)) == 3 * counts[p]


def test_topic_filters_and_client_ids() -> None:
    pm = PartitionMap(synthetic(40), 16, topic_prefix="/acme/v1/", client_prefix="plant_7")
    p = pm.of_device("D0003x0")
    assert p is not None
    assert "acme/v1/D0003x0/+" in pm.topic_filters(p)
    assert all(f.startswith("acme/v1/") and f.endswith("/+") for f in pm.topic_filters(p))
    ids = {pm.client_id(q) for q in range(16)}
    assert len(ids) == 16
    assert pm.client_id(3) == "plant_7-p03of16"
    assert PartitionMap(synthetic(1), 16).client_id(15) == "cw-ingest-p15of16"
    assert PartitionMap(synthetic(1), 200).client_id(7) == "cw-ingest-p007of200"
    assert PartitionMap(synthetic(1), 1).client_id(0) == "cw-ingest-p0of1"
    with pytest.raises(ValueError, match="outside"):
        pm.client_id(16)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"client_prefix": "a b"}, "client id prefix"),
        ({"client_prefix": ""}, "client id prefix"),
        ({"topic_prefix": "cw/+"}, "topic prefix"),
        ({"topic_prefix": "/"}, "topic prefix"),
    ],
)
def test_bad_prefixes_are_refused(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PartitionMap(synthetic(1), 16, **kwargs)  # type: ignore[arg-type]


def test_a_device_added_at_run_time_joins_its_stations_partition() -> None:
    pm = PartitionMap(synthetic(5), 16)
    station_p = pm.of_station("st-0002")
    assert pm.add_device("NEW-1", "st-0002") == (station_p, True)
    assert pm.add_device("NEW-1", "somewhere-else") == (station_p, False)
    assert pm.of_device("NEW-1") == station_p
    assert "cw/v1/NEW-1/+" in pm.topic_filters(station_p)
    with pytest.raises(ValueError, match="invalid device id"):
        pm.add_device("bad/id", "st-0002")
