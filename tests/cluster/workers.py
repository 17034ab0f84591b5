"""A worker in-process with the real pipeline (``PipelineConsumer``), on a database whose
registry is a given catalog: what the worker tests share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Engine

from devices.catalog import Catalog
from devices.topics import TopicScheme
from ingest.db import migrate, registry
from ingest.metrics import IngestMetrics
from ingest.mqtt import BrokerURL
from ingest.partition_consumer import PipelineConsumer
from ingest.partitions import PartitionMap
from ingest.pg_store import PostgresStore
from ingest.worker import Worker


@dataclass
class InProcess:
    worker: Worker
    store: PostgresStore
    engine: Engine
    partitions: PartitionMap
    metrics: IngestMetrics
    scheme: TopicScheme

    def registry(self) -> Catalog | None:
        """The registry as the database has it now (``follow_registry``'s ``load``)."""
        with self.engine.begin() as conn:
            return registry.load_catalog(conn)


@contextmanager
def in_process_worker(
    broker: str, db: str, catalog: Catalog, partitions: int = 4
) -> Iterator[InProcess]:
    """Worker "w" (lease timeout 2 s) over ``partitions``, not entered; the registry made
    ``catalog`` first. The store and the engine are closed on leaving."""
    engine = migrate.connect(db)
    with engine.begin() as conn:
        registry.import_catalog(conn, catalog)
    store = PostgresStore(db)
    scheme = TopicScheme()
    pm = PartitionMap(catalog, partitions)
    metrics = IngestMetrics()
    worker: Worker

    def consumer(p: int, epoch: int) -> PipelineConsumer:
        assert worker.catalog is not None
        return PipelineConsumer(store=store, catalog=worker.catalog, devices=pm.devices(p),
                                partition=p, epoch=epoch, scheme=scheme, metrics=metrics)  # fmt: skip

    worker = Worker(broker=BrokerURL.parse(broker), db=db, partitions=pm,
                    consumer_factory=consumer, name="w", lease_timeout_s=2, catalog=catalog)  # fmt: skip
    try:
        yield InProcess(worker, store, engine, pm, metrics, scheme)
    finally:
        store.close()
        engine.dispose()
