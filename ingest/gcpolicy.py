"""The garbage collector's policy for a long-running ingest process."""

from __future__ import annotations

import gc


def tune_gc() -> None:
    """Once start-up is done: what exists now (catalog, twins, the app) lives as long as the
    process, so the collector stops scanning it (``gc.freeze``), and young collections run
    every 10,000 allocations instead of 700. Ingest allocates a handful of short-lived
    objects per message; with the defaults the collector took about a third of the time
    to handle one (decode, order, twin; docs/benchmarks.md)."""
    gc.collect()  # start-up's garbage first, or freezing would keep it forever
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
