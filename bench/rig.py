"""The in-process rig of the pipeline benchmarks: the real ``Pipeline`` over the embedded
SQLite store, with the real alert engine, no MQTT (acks always succeed)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from devices.catalog import Catalog
from devices.topics import TopicScheme
from ingest.alerts.engine import AlertEngine
from ingest.alerts.store import AlertStore
from ingest.config import IngestConfig
from ingest.metrics import IngestMetrics
from ingest.pipeline import Pipeline, Twins
from ingest.sqlite_store import SQLiteStore


@contextlib.asynccontextmanager
async def pipeline_rig(
    catalog: Catalog,
    work: Path,
    *,
    synchronous: str | None = None,
    startup_grace_s: float | None = None,
) -> AsyncIterator[tuple[Pipeline, AlertEngine, IngestConfig]]:
    """A pipeline and a started alert engine on the same twins, stores under ``work``
    (``synchronous``: the store's, default as ``chargewatch serve`` sets it;
    ``startup_grace_s``: the alert engine's, default as configured)."""
    config = IngestConfig(data_dir=work)
    if startup_grace_s is not None:
        config.alerts.startup_grace_s = startup_grace_s
    store = SQLiteStore.in_dir(work, synchronous=synchronous or config.sqlite_synchronous)
    metrics = IngestMetrics()
    twins = Twins(catalog, config.release_soc)
    pipeline = Pipeline(
        catalog=catalog,
        scheme=TopicScheme(config.topic_prefix),
        twins=twins,
        history=store,
        state=store,
        metrics=metrics,
        ack=lambda r: True,
    )
    alert_store = AlertStore.in_dir(work)
    try:
        async with AlertEngine(
            config.alerts, catalog, twins, alert_store, registry=metrics.registry
        ) as engine:
            yield pipeline, engine, config
    finally:
        alert_store.close()
        store.close()
