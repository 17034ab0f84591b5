"""Why the embedded store inserts a chunk of rows per statement: a worker thread's writes
against a busy event loop. ``python -m bench.writes``

The ingest writes each batch from a worker thread while the event loop handles the next
one. ``executemany`` runs SQLite once per row and takes the GIL back after each; while
another thread is busy in Python, every row then waits for the interpreter's switch interval
(5 ms). This writes the same rows into the real schema with ``executemany`` and with the
store's ``BulkInsert``, alone and beside a thread spinning in Python, and prints the
writer's wall and CPU time per row, and the spinner's rate (the loop's share it kept).
"""

from __future__ import annotations

import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ingest.sqlite_db import SQLiteDB
from ingest.sqlite_store import INSERT_MESSAGES, message_row

PAYLOAD = '{"v":1,"ts":"2026-11-29T18:04:33.291+08:00","boot":"f3206d14475b","seq":2,' + (
    '"kind":"pile","ports":[{"n":1,"state":"available","power_w":0,"energy_wh":0},'
    '{"n":2,"state":"charging","power_w":151.0,"energy_wh":120.3,"session":"s-0065"}]}'
)
SQL = INSERT_MESSAGES.sql(1)  # the store's own statement, one row at a time
Writer = Callable[[sqlite3.Connection, Sequence[Sequence[Any]]], None]


def rows(n: int, devices: int = 10_000) -> list[tuple[Any, ...]]:
    """History rows' values in the insert's column order (``message_row``)."""
    t0 = 1_796_284_800_000
    return [
        message_row(
            (
                f"B{i * 7919 % devices:06d}",
                "S01",
                "pile",
                "status",
                "f3206d14",
                i,
                t0 + i,
                t0 + i,
                PAYLOAD,
            )
        )
        for i in range(n)
    ]


def _run(write: Writer, data: list[tuple[Any, ...]], busy: bool, batch: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        SQLiteDB(Path(tmp) / "w.db").close()  # the store's schema (made by the migrations)
        conn = sqlite3.connect(Path(tmp) / "w.db", isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        out: dict[str, float] = {}
        stop, spins = threading.Event(), [0]

        def spin() -> None:
            while not stop.is_set():
                sum(i * i for i in range(200))
                spins[0] += 1

        def writer() -> None:
            cpu, wall = time.thread_time(), time.perf_counter()
            for i in range(0, len(data), batch):
                conn.execute("BEGIN IMMEDIATE")
                write(conn, data[i : i + batch])
                conn.execute("COMMIT")
            out["cpu_us"] = (time.thread_time() - cpu) / len(data) * 1e6
            out["wall_us"] = (time.perf_counter() - wall) / len(data) * 1e6

        spinner = threading.Thread(target=spin)
        if busy:
            spinner.start()
        began = time.perf_counter()
        t = threading.Thread(target=writer)
        t.start()
        t.join()
        stop.set()
        if busy:
            spinner.join()
            out["spins_per_s"] = spins[0] / (time.perf_counter() - began)
        conn.close()
    return out


def _executemany(conn: sqlite3.Connection, chunk: Sequence[Sequence[Any]]) -> None:
    conn.executemany(SQL, chunk)


def main(n: int = 30_000, batch: int = 500) -> None:
    data = rows(n)
    ways: dict[str, Writer] = {
        "executemany": _executemany,
        "BulkInsert": INSERT_MESSAGES.run,
    }
    print(f"{n:,} rows in batches of {batch}; us per row (writer thread)")
    for name, write in ways.items():
        for busy in (False, True):
            got = _run(write, data, busy, batch)
            spins = f"  spinner {got['spins_per_s']:,.0f}/s" if busy else ""
            print(
                f"{name:12} {'beside a busy thread' if busy else 'alone':21}"
                f" wall {got['wall_us']:6.1f}  cpu {got['cpu_us']:5.1f}{spins}"
            )


if __name__ == "__main__":
    main()
