"""The batch-observed histogram: the same exposition as prometheus_client's Histogram."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from ingest.metrics import BUCKETS, BatchHistogram


def samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    return {
        (s.name, s.labels.get("le", "")): s.value
        for metric in registry.collect()
        for s in metric.samples
    }


def test_batch_histogram_exposes_what_a_histogram_observing_each_value_would() -> None:
    values = {0.0: 3, 0.001: 2, 0.0011: 1, 0.25: 4, 31.0: 1}  # on and off the bucket bounds
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    batch = BatchHistogram("lat_seconds", "latency", BUCKETS, ours)
    reference = Histogram("lat_seconds", "latency", buckets=BUCKETS, registry=theirs)
    batch.observe_many(values)
    batch.observe_many({0.25: 1})
    for value, n in [*values.items(), (0.25, 1)]:
        for _ in range(n):
            reference.observe(value)
    got = {k: v for k, v in samples(ours).items() if not k[0].endswith("_created")}
    want = {k: v for k, v in samples(theirs).items() if not k[0].endswith("_created")}
    assert got == want
    assert got[("lat_seconds_count", "")] == 12
    assert got[("lat_seconds_bucket", "0.001")] == 5  # le: a value on the bound is inside
