"""What the alert engine's timer pass costs as the fleet grows. ``python -m bench.alerttick``

Every ``tick_s`` the engine looks at every device and station for what only the clock can
change (silence, doors, stuck ports, stations with nothing free). This feeds each device's
birth and a status through the real ``Pipeline`` into the engine, then times one pass:
its CPU, and its longest slice (how long the event loop waited at most).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from bench.rig import pipeline_rig
from bench.workload import Stream, write_catalog
from devices.catalog import Catalog
from ingest.mqtt import Received
from ingest.pipeline import Batch


async def one_pass(devices: int, work: Path) -> tuple[float, float]:
    """(CPU of one pass, its longest slice), in ms."""
    catalog = Catalog.load(write_catalog(work / "catalog.json", devices))
    specs = [d.spec for d in catalog.devices.values()]
    now = time.time_ns() // 1_000_000
    stream = Stream(specs, births=True, seed=1).messages(2 * devices, now)
    rig = pipeline_rig(catalog, work, synchronous="OFF", startup_grace_s=0)
    async with rig as (pipeline, engine, _):
        pipeline.observers.append(lambda *a: None)  # keep the per-message snapshots
        batch = Batch()
        for i, (topic, payload) in enumerate(stream):
            pipeline.handle(Received(topic, payload, 1, False, i, now, 0), batch)
        for twin, msg, received_ms in batch.applied:
            engine.observe(twin, msg, received_ms)
        slices = []
        cpu = time.thread_time()
        began = time.perf_counter()
        for _ in engine.tick_steps():
            slices.append(time.perf_counter() - began)
            began = time.perf_counter()
        slices.append(time.perf_counter() - began)
        cpu = time.thread_time() - cpu
    return cpu * 1000, max(slices) * 1000


def main(fleet: tuple[int, ...] = (1_000, 10_000, 50_000)) -> None:
    print("devices | one timer pass, CPU | longest slice (the loop's longest wait)")
    for devices in fleet:
        with tempfile.TemporaryDirectory() as tmp:
            cpu, longest = asyncio.run(one_pass(devices, Path(tmp)))
        print(f"{devices:7,} | {cpu:8.1f} ms | {longest:5.1f} ms")


if __name__ == "__main__":
    main()
