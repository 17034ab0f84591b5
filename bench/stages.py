"""Where a message's CPU goes inside the pipeline, without MQTT: the stages one by one.

The pipeline (``ingest.pipeline.Pipeline``, with the real SQLite store and alert engine) is
fed preloaded messages directly, and each stage is timed with ``time.thread_time`` (CPU of
this thread only: other processes on the machine hardly move it, unlike wall time): decode
to twin (``_handle``), twin records, the store write (here on the same thread; the service
runs it in a worker thread), acknowledgement and counters, and the alert rules. The best of
a few rounds, each with fresh twins and a fresh store, with the garbage collector as
``chargewatch serve`` sets it, and once more with it off to show what it costs.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.rig import pipeline_rig
from bench.workload import Stream, write_catalog
from devices.catalog import Catalog
from ingest.gcpolicy import tune_gc
from ingest.mqtt import Received
from ingest.pipeline import Batch
from ingest.store import TwinRecord

STAGES = ("handle", "records", "write", "ack", "alerts")


async def _round(catalog: Catalog, messages: list[Received], work: Path) -> dict[str, float]:
    spent = dict.fromkeys(STAGES, 0.0)

    @contextlib.contextmanager
    def timing(stage: str) -> Iterator[None]:
        began = time.thread_time()
        yield
        spent[stage] += time.thread_time() - began

    async with pipeline_rig(catalog, work) as (pipeline, engine, config):
        pipeline.observers.append(lambda *a: None)  # keep the per-message snapshots
        for i in range(0, len(messages), config.batch_max):
            batch = Batch()
            with timing("handle"):
                for r in messages[i : i + config.batch_max]:
                    pipeline.deliver(r)
                    pipeline.queue.popleft()
                    pipeline.handle(r, batch)
            with timing("records"):
                records = [TwinRecord(d, t.encode()) for d, t in batch.changed.items()]
            with timing("write"):
                pipeline.write(batch.rows, records, batch.dead, batch.unobserved)
            with timing("ack"):  # counters and acks; nothing left to write
                await pipeline.commit(Batch(received=batch.received), [])
            with timing("alerts"):
                for twin, msg, received_ms in batch.applied:
                    engine.observe(twin, msg, received_ms)
    return {k: v / len(messages) * 1e6 for k, v in spent.items()}


def stages(
    work: Path, devices: int = 10_000, count: int = 30_000, rounds: int = 3
) -> dict[str, Any]:
    catalog = Catalog.load(write_catalog(work / "catalog-stages.json", devices))
    specs = [d.spec for d in catalog.devices.values()]
    best: dict[str, dict[str, float]] = {}
    for mode in ("serve", "gc_off"):
        for r in range(rounds):
            stream = Stream(specs, births=True, seed=r + 1)
            now = time.time_ns() // 1_000_000
            messages = [
                Received(topic, payload, 1, False, i, now, 0)
                for i, (topic, payload) in enumerate(stream.messages(count, now))
            ]
            gc.collect()
            tune_gc()
            if mode == "gc_off":
                gc.disable()
            try:
                with tempfile.TemporaryDirectory(dir=work) as tmp:
                    got = asyncio.run(_round(catalog, messages, Path(tmp)))
            finally:
                gc.enable()
                gc.unfreeze()
                gc.set_threshold(700, 10, 10)
            mine = best.setdefault(mode, got)
            for k, v in got.items():
                mine[k] = min(mine[k], v)
    return {
        "devices": devices,
        "messages": count,
        "rounds": rounds,
        "us_per_msg": best,
        "total_us": {mode: sum(v.values()) for mode, v in best.items()},
    }


def render(result: dict[str, Any] | None) -> list[str]:
    if not result:
        return []
    serve, off = result["us_per_msg"]["serve"], result["us_per_msg"]["gc_off"]
    lines = [
        "### Where the pipeline's CPU goes, stage by stage (no MQTT)",
        "",
        f"{result['messages']:,} messages (births, then statuses) of {result['devices']:,}"
        " devices fed straight into `Pipeline` with the real SQLite store and alert engine;"
        " CPU per message of each stage (`time.thread_time`, best of"
        f" {result['rounds']} rounds; see `bench/stages.py`).",
        "",
        "| stage | us per message | with the collector off |",
        "| --- | ---: | ---: |",
    ]
    names = {
        "handle": "topic, decode + validate, order, twin, history row",
        "records": "twin records (JSON)",
        "write": "SQLite write (a worker thread in the service)",
        "ack": "acks and counters",
        "alerts": "alert rules",
    }
    for stage in STAGES:
        lines.append(f"| {names[stage]} | {serve[stage]:.1f} | {off[stage]:.1f} |")
    total = result["total_us"]
    lines += [f"| **total** | **{total['serve']:.1f}** | {total['gc_off']:.1f} |", ""]
    return lines
