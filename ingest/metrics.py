"""Self-monitoring counters, in a registry per service (tests run several side by side)."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class BatchHistogram(Collector):
    """A Prometheus histogram observed a batch at a time: ``observe_many({value: count})``.

    prometheus_client's Histogram takes one value per call, under a lock; ingest acknowledges
    messages a batch at a time, and most of a batch shares a handful of latencies.
    """

    def __init__(
        self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = [*buckets, float("inf")]
        self._counts = [0] * len(self.bounds)
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, counts: Mapping[float, int]) -> None:
        with self._lock:
            for value, n in counts.items():
                self._counts[bisect.bisect_left(self.bounds, value)] += n
                self._sum += value * n

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for bound, n in zip(self.bounds, counts, strict=True):
            running += n
            cumulative.append((floatToGoString(bound), running))  # type: ignore[no-untyped-call]
        yield HistogramMetricFamily(
            self.name, self.documentation, buckets=cumulative, sum_value=total
        )


class IngestMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "chargewatch_messages_received", "MQTT messages received", registry=r
        )
        self.accepted = Counter(
            "chargewatch_messages_accepted", "Messages that passed validation", ["type"], registry=r
        )
        self.applied = Counter(
            "chargewatch_messages_applied", "Messages that changed current state", registry=r
        )
        self.duplicates = Counter(
            "chargewatch_messages_duplicate", "Exact repeats of applied messages", registry=r
        )
        self.out_of_order = Counter(
            "chargewatch_messages_out_of_order", "Messages older than applied state", registry=r
        )
        self.stale_deaths = Counter(
            "chargewatch_stale_deaths", "Wills of replaced connections, ignored", registry=r
        )
        self.seq_jumps = Counter(
            "chargewatch_messages_seq_jump",
            "Messages whose seq jumped far past the device's: kept, held until it goes on",
            registry=r,
        )
        self.wills_disproved = Counter(
            "chargewatch_wills_disproved",
            "Deaths overruled by a newer live message of the same boot (forged or early Will)",
            registry=r,
        )
        self.clock_skew = Counter(
            "chargewatch_clock_skew_messages",
            "Messages whose device time was more than 5 minutes off our clock (kept as sent)",
            registry=r,
        )
        self.dead_letters = Counter(
            "chargewatch_dead_letters", "Rejected messages by reason", ["reason"], registry=r
        )
        self.acked = Counter("chargewatch_messages_acked", "Messages acknowledged", registry=r)
        self.written = Counter(
            "chargewatch_history_rows_written", "History rows handed to the store", registry=r
        )
        self.write_errors = Counter(
            "chargewatch_store_write_errors", "Failed store writes (retried)", registry=r
        )
        self.observer_errors = Counter(
            "chargewatch_observer_errors", "Alert rules or listeners that raised", registry=r
        )
        self.task_deaths = Counter(
            "chargewatch_task_deaths",
            "Deaths of the service's long-lived tasks (restarted, or the process stops)",
            ["task"],
            registry=r,
        )
        self.inflight = Gauge(
            "chargewatch_inflight_messages", "Received, not yet acknowledged", registry=r
        )  # read from the pipeline at scrape time (Gauge.set_function)
        self.broker_connected = Gauge(
            "chargewatch_broker_connected", "1 while connected to the broker", registry=r
        )
        self.store_healthy = Gauge(
            "chargewatch_store_healthy", "1 while the last store write succeeded", registry=r
        )
        self.last_message_ts = Gauge(
            "chargewatch_last_message_timestamp_seconds", "Arrival of the last message", registry=r
        )
        self.store_healthy.set(1)
        self.sessions_lost = Counter(
            "chargewatch_broker_sessions_lost",
            "Reconnects that found no session for our client id: what the broker held is lost",
            registry=r,
        )
        self.write_seconds = Histogram(
            "chargewatch_store_write_seconds",
            "One batch written to the stores",
            buckets=BUCKETS,
            registry=r,
        )
        self.ack_latency = BatchHistogram(
            "chargewatch_ingest_latency_seconds",
            "Message arrival to acknowledgement (decode, apply, durable write)",
            BUCKETS,
            r,
        )
