"""What a message costs the event loop at district rates, where every batch is one message.
``python -m bench.lowrate``

Draining, the pipeline spends ~50 us of its loop thread a message; at 133 msg/s (10x
district) ``serve`` spends ~1.3 ms. This feeds the real ``Pipeline`` (embedded store with
``synchronous=FULL``, the alert engine) one district message every ``gap`` seconds and prints
the loop thread's CPU per message, beside what an empty ``asyncio.sleep(gap)`` iteration
costs the same thread: on a virtual machine, waking from idle is most of it.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from bench.rig import pipeline_rig
from bench.workload import Stream
from devices.catalog import Catalog
from ingest.gcpolicy import tune_gc
from ingest.mqtt import Received


async def idle_wakeups(count: int, gap: float) -> float:
    """The loop thread's CPU per empty ``asyncio.sleep(gap)``, in us."""
    began = time.thread_time()
    for _ in range(count):
        await asyncio.sleep(gap)
    return (time.thread_time() - began) / count * 1e6


async def pipeline_at(count: int, gap: float, work: Path) -> float:
    """The loop thread's CPU per message fed every ``gap`` s, the feeding included, in us."""
    catalog = Catalog.load(None)  # the district
    specs = [d.spec for d in catalog.devices.values()]
    now = time.time_ns() // 1_000_000
    stream = Stream(specs, births=True, seed=1).messages(count + len(specs), now)
    messages = [
        Received(topic, payload, 1, False, i, now, 0) for i, (topic, payload) in enumerate(stream)
    ]
    async with pipeline_rig(catalog, work) as (pipeline, engine, _):
        pipeline.observers.append(engine.observe)
        task = asyncio.create_task(pipeline.run())
        for r in messages[: len(specs)]:  # the births, in big batches
            pipeline.deliver(r)
        while pipeline.unacked:  # noqa: ASYNC110 - polling a counter
            await asyncio.sleep(0.01)
        tune_gc()
        began = time.thread_time()
        for r in messages[len(specs) :]:
            pipeline.deliver(r)
            await asyncio.sleep(gap)
        while pipeline.unacked:  # noqa: ASYNC110 - polling a counter
            await asyncio.sleep(0.001)
        spent = time.thread_time() - began
        task.cancel()
    return spent / count * 1e6


def main(count: int = 1500, gap: float = 0.0075) -> None:
    idle = asyncio.run(idle_wakeups(count, gap))
    with tempfile.TemporaryDirectory() as tmp:
        busy = asyncio.run(pipeline_at(count, gap, Path(tmp)))
    print(f"one message every {gap * 1000:g} ms ({1 / gap:.0f} msg/s), loop thread CPU:")
    print(f"  an empty asyncio.sleep wake-up     {idle:6.0f} us")
    print(f"  a message through the pipeline     {busy:6.0f} us (its wake-up included)")


if __name__ == "__main__":
    main()
