"""The embedded store's write on its own, measured in instructions (callgrind) or CPU time.

``prepare`` runs district-shaped messages (the synthetic catalog: a birth per device, then
statuses) through the real pipeline (``bench.rig``) and keeps each batch's history rows and
twin records in a file: what ``SQLiteStore.write`` is given in the service. ``run`` opens a
fresh store and writes the first ``--batches`` of them, nothing else: under ``valgrind
--tool=callgrind``, the difference between a run of N and of 2N batches over the rows of
the second N is the instructions of one row's write, start-up and births excluded
(docs/benchmarks.md, "The embedded store on SQLAlchemy Core").

``--twins rowid`` rebuilds ``twins`` as a rowid table (the same primary key) before the
writes: the table shape measured against ``WITHOUT ROWID``.

    python -m bench.storewrite prepare /tmp/w/batches.pickle --devices 2000 --messages 24000
    valgrind --tool=callgrind python -m bench.storewrite run /tmp/w/batches.pickle --batches 8
    python -m bench.storewrite time /tmp/w/batches.pickle   # thread CPU per row, best of 5
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.rig import pipeline_rig
from bench.workload import Stream, write_catalog
from devices.catalog import Catalog
from ingest.mqtt import Received
from ingest.pipeline import Batch
from ingest.sqlite_store import SQLiteStore
from ingest.store import HistoryRow, TwinRecord

Rows = list[tuple[Any, ...]]
Prepared = list[tuple[Rows, list[tuple[str, bytes]]]]
"""Per batch: history rows (their nine columns) and twin records (device id, JSON)."""


async def _batches(catalog: Catalog, work: Path, count: int, batch: int) -> Prepared:
    specs = [d.spec for d in catalog.devices.values()]
    now = 1_796_284_800_000
    messages = [
        Received(topic, payload, 1, False, i, now, 0)
        for i, (topic, payload) in enumerate(Stream(specs, births=True).messages(count, now))
    ]
    out: Prepared = []
    async with pipeline_rig(catalog, work) as (pipeline, _, _):
        for i in range(0, len(messages), batch):
            b = Batch()
            for r in messages[i : i + batch]:
                pipeline.deliver(r)
                pipeline.queue.popleft()
                pipeline.handle(r, b)
            out.append(
                (
                    [tuple(r[:9]) for r in b.rows],
                    [(d, t.encode()) for d, t in b.changed.items()],
                )
            )
    return out


def prepare(path: Path, devices: int, messages: int, batch: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        catalog = Catalog.load(write_catalog(Path(tmp) / "catalog.json", devices))
        prepared = asyncio.run(_batches(catalog, Path(tmp), messages, batch))
    path.write_bytes(pickle.dumps(prepared))
    rows = sum(len(r) for r, _ in prepared)
    print(f"{len(prepared)} batches, {rows} rows -> {path}")


def _rowid_twins(store: SQLiteStore) -> None:
    """``twins`` as a rowid table with the same primary key (empty: a fresh store)."""
    store._db.execute("DROP TABLE twins")
    store._db.execute("CREATE TABLE twins (device_id TEXT PRIMARY KEY, record TEXT NOT NULL)")


def run(path: Path, batches: int, twins: str, synchronous: str) -> float:
    """Write the first ``batches`` batches into a fresh store; the thread CPU seconds the
    writes took."""
    prepared: Prepared = pickle.loads(path.read_bytes())[:batches]
    writes = [
        (
            [HistoryRow(*r, None) for r in rows],  # type: ignore[call-arg]
            [TwinRecord(d, data) for d, data in records],
        )
        for rows, records in prepared
    ]
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "w.db", synchronous=synchronous)
        if twins == "rowid":
            _rowid_twins(store)
        began = time.thread_time()
        for rows, records in writes:
            store.write(rows, records, ())
        spent = time.thread_time() - began
        store.close()
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("path", type=Path)
    p.add_argument("--devices", type=int, default=2_000)
    p.add_argument("--messages", type=int, default=24_000)
    p.add_argument("--batch", type=int, default=1_000)
    for name in ("run", "time"):
        r = sub.add_parser(name)
        r.add_argument("path", type=Path)
        r.add_argument("--batches", type=int, default=8)
        r.add_argument("--twins", choices=("without-rowid", "rowid"), default="without-rowid")
        r.add_argument("--synchronous", default="FULL")
        r.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.path, args.devices, args.messages, args.batch)
    elif args.command == "run":
        run(args.path, args.batches, args.twins, args.synchronous)
    else:
        # the second half's batches: births (the first batches) and start-up left out
        rows = sum(len(r) for r, _ in pickle.loads(args.path.read_bytes())[: 2 * args.batches])
        half = rows - sum(len(r) for r, _ in pickle.loads(args.path.read_bytes())[: args.batches])
        best = min(
            run(args.path, 2 * args.batches, args.twins, args.synchronous)
            - run(args.path, args.batches, args.twins, args.synchronous)
            for _ in range(args.rounds)
        )
        print(f"{best / half * 1e6:.2f} us a row ({args.twins}, {args.synchronous})")


if __name__ == "__main__":
    main()
