"""The hot write of the state path on PostgreSQL, per driver, on district-shaped batches.

    .venv/bin/python -m tests.db.pgbench [--messages 20000] [--batch 500]

The district's publishes (``simulators.virtualday``: 10-port piles, 12-slot cabinets of
the shipped catalog) are applied to twins the way ingest does; each batch of ``--batch``
messages is one transaction: the history rows (``INSERT .. ON CONFLICT DO NOTHING`` into
the day-partitioned ``messages``) and the upserts of the twins it changed. Each candidate
writes the same batches into a fresh database of one PostgreSQL started for the run (from
the Debian binaries, ``tests.pg_server``; fsync off and its files in /dev/shm when there is
room, as the test server is; docs/benchmarks.md of 2026-12-02 was measured on disk). Reported:
messages per second of wall time, and of this process's CPU.

Needs asyncpg for its candidates (``pip install asyncpg``; not a dependency).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from devices.catalog import Catalog
from devices.contract import decode
from ingest.store import HistoryRow, MessageType, TwinRecord
from ingest.twins import Twin

Batch = tuple[list[HistoryRow], list[TwinRecord]]
DAY_MS = 86_400_000


def district_batches(messages: int, batch: int) -> list[Batch]:
    """``messages`` publishes of the virtual district in batches, with the twins they made."""
    catalog = Catalog.load()
    twins: dict[str, Twin] = {}
    argv = [sys.executable, "-m", "simulators.virtualday", "--hours", "24"]
    out: list[Batch] = []
    rows: list[HistoryRow] = []
    touched: dict[str, Twin] = {}
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            p = json.loads(line)
            device = catalog.devices[p["device_id"]]
            msg = decode(p["channel"], p["text"].encode())
            types: dict[str, MessageType] = {"status": "status", "event": "event"}
            online = getattr(msg, "online", False)
            mtype = (
                ("birth" if online else "death") if p["channel"] == "state" else types[p["channel"]]
            )
            arrival = round(p["at"] * 1000) + 40
            ts = msg.ts if msg.ts is not None else arrival
            rows.append(
                HistoryRow(
                    device.id,
                    device.station_id,
                    device.kind,
                    mtype,
                    p["boot"],
                    p["seq"],
                    ts,
                    arrival,
                    p["text"],
                    msg,
                )
            )
            twin = twins.get(device.id) or twins.setdefault(
                device.id,
                Twin(device.id, device.kind, device.station_id, device.spec.units, 90.0),
            )
            twin.apply(msg, arrival)
            touched[device.id] = twin
            if len(rows) == batch:
                out.append((rows, [TwinRecord(i, t.encode()) for i, t in touched.items()]))
                rows, touched = [], {}
                if len(out) * batch >= messages:
                    proc.kill()
                    break
    return out


def _history_args(rows: list[HistoryRow]) -> list[tuple[Any, ...]]:
    return [r[:9] for r in rows]


INSERT_PG = (
    "INSERT INTO messages (device_id, station_id, kind, type, boot, seq, ts_ms, received_ms,"
    " payload) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING"
)
UPSERT_PG = (
    "INSERT INTO twins (device_id, record) VALUES (%s,%s)"
    " ON CONFLICT (device_id) DO UPDATE SET record = excluded.record"
)


def psycopg_raw(url: str) -> Callable[[Batch], None]:
    import psycopg

    conn = psycopg.connect(url.replace("postgresql+psycopg", "postgresql"))

    def write(b: Batch) -> None:
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany(INSERT_PG, _history_args(b[0]))
            cur.executemany(UPSERT_PG, [(t.device_id, t.data.decode()) for t in b[1]])

    return write


def sqlalchemy_psycopg(url: str) -> Callable[[Batch], None]:
    from sqlalchemy import create_engine
    from sqlalchemy.dialects.postgresql import insert

    from ingest.db.schema import messages, twins

    engine = create_engine(url)
    keys = ("device_id", "station_id", "kind", "type", "boot", "seq", "ts_ms", "received_ms",
            "payload")  # fmt: skip
    history = insert(messages).on_conflict_do_nothing()
    t = insert(twins)
    upsert = t.on_conflict_do_update(
        index_elements=["device_id"], set_={"record": t.excluded.record}
    )

    def write(b: Batch) -> None:
        with engine.begin() as conn:
            conn.execute(history, [dict(zip(keys, r[:9], strict=True)) for r in b[0]])
            conn.execute(
                upsert, [{"device_id": x.device_id, "record": x.data.decode()} for x in b[1]]
            )

    return write


def _asyncpg_sql(sql: str) -> str:
    n = iter(range(1, 100))
    return (
        sql.replace("%s", "$%d")
        .replace("$%d", "${}")
        .format(*[next(n) for _ in range(sql.count("%s"))])
    )


def asyncpg_raw(url: str) -> Callable[[Batch], None]:
    import asyncpg

    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(asyncpg.connect(url.replace("postgresql+psycopg", "postgresql")))
    history, upsert = _asyncpg_sql(INSERT_PG), _asyncpg_sql(UPSERT_PG)

    async def run(b: Batch) -> None:
        async with conn.transaction():
            await conn.executemany(history, _history_args(b[0]))
            await conn.executemany(upsert, [(t.device_id, t.data.decode()) for t in b[1]])

    return lambda b: loop.run_until_complete(run(b))


def sqlalchemy_asyncpg(url: str) -> Callable[[Batch], None]:
    from sqlalchemy.dialects.postgresql import insert
    from sqlalchemy.ext.asyncio import create_async_engine

    from ingest.db.schema import messages, twins

    loop = asyncio.new_event_loop()
    engine = create_async_engine(url.replace("postgresql+psycopg", "postgresql+asyncpg"))
    keys = ("device_id", "station_id", "kind", "type", "boot", "seq", "ts_ms", "received_ms",
            "payload")  # fmt: skip
    history = insert(messages).on_conflict_do_nothing()
    t = insert(twins)
    upsert = t.on_conflict_do_update(
        index_elements=["device_id"], set_={"record": t.excluded.record}
    )

    async def run(b: Batch) -> None:
        async with engine.begin() as conn:
            await conn.execute(history, [dict(zip(keys, r[:9], strict=True)) for r in b[0]])
            await conn.execute(
                upsert, [{"device_id": x.device_id, "record": x.data.decode()} for x in b[1]]
            )

    return lambda b: loop.run_until_complete(run(b))


CANDIDATES: dict[str, Callable[[str], Callable[[Batch], None]]] = {
    "psycopg 3, executemany (pipeline)": psycopg_raw,
    "psycopg 3 + SQLAlchemy Core": sqlalchemy_psycopg,
    "asyncpg, executemany": asyncpg_raw,
    "asyncpg + SQLAlchemy Core (async engine)": sqlalchemy_asyncpg,
}


def partitions_for(batches: list[Batch]) -> Iterator[str]:
    days = {r.ts_ms // DAY_MS for rows, _ in batches for r in rows}
    for day in sorted(days):
        yield (
            f"CREATE TABLE messages_p{day} PARTITION OF messages"
            f" FOR VALUES FROM ({day * DAY_MS}) TO ({(day + 1) * DAY_MS})"
        )


def measure(write: Callable[[Batch], None], batches: list[Batch]) -> tuple[float, float]:
    write(batches[0])  # connect, warm up; counted below again (ON CONFLICT: skipped)
    wall, cpu = time.perf_counter(), time.process_time()
    for b in batches:
        write(b)
    n = sum(len(rows) for rows, _ in batches)
    return n / (time.perf_counter() - wall), n / max(1e-9, time.process_time() - cpu)


def store_rates(batches: list[Batch], rounds: int) -> dict[str, tuple[float, float]]:
    """The embedded store's ``write`` and the PostgreSQL store's on the same batches."""
    import tempfile
    from pathlib import Path

    from ingest.db import migrate
    from ingest.pg_store import PostgresStore
    from ingest.sqlite_store import SQLiteStore
    from tests.pg_server import postgresql

    best: dict[str, tuple[float, float]] = {}

    def keep(name: str, rate: tuple[float, float]) -> None:
        if name not in best or rate[0] > best[name][0]:
            best[name] = rate

    with postgresql() as pg:
        for rnd in range(rounds):
            for sync in ("FULL", "NORMAL"):
                with tempfile.TemporaryDirectory() as tmp:
                    sq = SQLiteStore(Path(tmp) / "c.db", synchronous=sync)
                    keep(f"SQLiteStore.write (synchronous={sync})",
                         measure(lambda b, s=sq: s.write(b[0], b[1], ()), batches))  # fmt: skip
                    sq.close()
            url = pg.create_database(f"s{rnd}")
            migrate.upgrade(url)
            ps = PostgresStore(url, now_ms=batches[0][0][0].ts_ms)
            keep(
                "PostgresStore.write (fsync off)",
                measure(lambda b, s=ps: s.write(b[0], b[1], ()), batches),
            )
            ps.close()
    return best


def driver_rates(batches: list[Batch], rounds: int) -> dict[str, tuple[float, float]]:
    """Each candidate driver's write of the same batches."""
    from ingest.db import migrate
    from tests.pg_server import postgresql

    best: dict[str, tuple[float, float]] = {}
    with postgresql() as pg:
        for rnd in range(rounds):
            for i, (name, make) in enumerate(CANDIDATES.items()):
                url = migrate.engine_url(pg.create_database(f"b{rnd}_{i}"))
                migrate.upgrade(url)
                for ddl in partitions_for(batches):
                    pg.psql(ddl, url.rsplit("/", 1)[1])
                rate = measure(make(url), batches)
                if name not in best or rate[0] > best[name][0]:
                    best[name] = rate
    return best


def main(argv: list[str] | None = None) -> int:

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--stores", action="store_true", help="the stores' write, not the drivers")
    args = p.parse_args(argv)
    batches = district_batches(args.messages, args.batch)
    twins = sum(len(t) for _, t in batches) / len(batches)
    size = sum(len(r.payload) for rows, _ in batches for r in rows) / (len(batches) * args.batch)
    print(f"{len(batches)} batches of {args.batch} messages (mean payload {size:.0f} B,"
          f" {twins:.0f} twins upserted per batch)")  # fmt: skip
    rates = store_rates if args.stores else driver_rates
    best = rates(batches, args.rounds)
    print(f"{'candidate':44} {'msg/s (wall)':>13} {'msg/s of CPU':>13}")
    for name, (wall, cpu) in best.items():
        print(f"{name:44} {wall:13,.0f} {cpu:13,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
