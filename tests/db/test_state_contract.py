"""The state path's contract, the same tests against the embedded SQLite store and the
PostgreSQL store: a batch (history, twins, dead letters, journal) in one transaction,
idempotent on (device, boot, seq, type); twins, dead letters and counts, the journal; the
history reads."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devices.contract import Death
from ingest import StoreError
from ingest.db import migrate
from ingest.pg_store import DAY_MS, PostgresStore, partition_name
from ingest.sqlite_store import SQLiteStore
from ingest.store import DeadLetter, HistoryRow, MessageType, TwinRecord, Unobserved

T0 = 1_796_284_800_000  # 2026-12-03T08:00:00Z
_MSG = Death(v=1, online=False, boot="boot-a", seq=0)

Store = Any  # SQLiteStore | PostgresStore: the methods under contract


def row(
    seq: int,
    ts_ms: int,
    device_id: str = "P1",
    type: MessageType = "status",
    boot: str = "boot-a",
    received_ms: int | None = None,
) -> HistoryRow:
    return HistoryRow(device_id, "st-1", "pile", type, boot, seq, ts_ms,
                      ts_ms + 5 if received_ms is None else received_ms,
                      f'{{"seq":{seq},"ts":{ts_ms}}}', _MSG)  # fmt: skip


def dead(i: int, reason: str = "schema", *, retained: bool = False) -> DeadLetter:
    return DeadLetter.of(
        T0 + i, f"cw/v1/P1/status#{i}", reason, f"detail {i}", b"x%d" % i, retained=retained
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        s: Store = SQLiteStore.in_dir(tmp_path / "data", dead_letters_kept=5)
    else:
        url = request.getfixturevalue("pg_url")
        migrate.upgrade(url)
        s = PostgresStore(url, dead_letters_kept=5, now_ms=T0)
    yield s
    s.close()


def _keys(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(r["boot"], r["seq"], r["type"]) for r in rows]


def test_a_batch_is_written_once_whatever_is_redelivered(store: Store) -> None:
    store.write([row(1, T0), row(2, T0 + 1000)], [TwinRecord("P1", b'{"v": 1}')], [dead(1)])
    store.write([row(2, T0 + 1000), row(3, T0 + 2000)], [TwinRecord("P1", b'{"v": 2}')], [])
    store.write([row(1, T0)], [], [])
    assert _keys(store.messages("P1")) == [
        ("boot-a", 1, "status"),
        ("boot-a", 2, "status"),
        ("boot-a", 3, "status"),
    ]
    assert store.load_twins() == [{"v": 2}]
    assert [d.reason for d in store.dead_letters()] == ["schema"]


def test_a_death_redelivered_on_a_later_arrival_is_stored_once(store: Store) -> None:
    """A death has no device time: it carries its arrival, different on each replay."""
    store.write([row(4, T0, type="death")], [], [])
    store.write([row(4, T0 + 60_000, type="death"), row(5, T0 + 61_000, type="birth")], [], [])
    store.write([row(4, T0 + DAY_MS, type="death")], [], [])  # even on another day
    assert _keys(store.messages("P1")) == [("boot-a", 4, "death"), ("boot-a", 5, "birth")]
    assert [m["ts_ms"] for m in store.messages("P1")] == [T0, T0 + 61_000]


def test_history_reads_by_device_time(store: Store) -> None:
    store.write(
        [
            row(1, T0 - 2 * DAY_MS),  # two days back: another partition
            row(2, T0, type="birth"),
            row(3, T0 + 10_000),
            row(4, T0 + 20_000),
            row(5, T0 + 30_000, type="event"),
            row(6, T0 + 70_000),
            row(1, T0 + 5_000, device_id="P2"),
        ],
        [],
        [],
    )
    assert [m["seq"] for m in store.messages("P1", T0, T0 + 60_000)] == [2, 3, 4, 5]
    assert [m["seq"] for m in store.messages("P1", limit=2)] == [1, 2]
    assert [m["seq"] for m in store.messages("P1")] == [1, 2, 3, 4, 5, 6]
    first = store.messages("P2")[0]
    assert first == {"device_id": "P2", "boot": "boot-a", "seq": 1, "type": "status",
                     "ts_ms": T0 + 5_000, "received_ms": T0 + 5_005,
                     "payload": f'{{"seq":1,"ts":{T0 + 5_000}}}'}  # fmt: skip
    samples = store.status_samples(["P1", "P2"], T0, T0 + 120_000, 60_000)
    assert [(s["device_id"], s["bucket_ms"], json.loads(s["payload"])["seq"]) for s in samples] == [
        ("P1", T0, 4),  # the last status of the minute (the birth and event are not statuses)
        ("P1", T0 + 60_000, 6),
        ("P2", T0, 1),
    ]
    assert store.status_samples([], T0, T0 + 1, 1) == []
    happened = store.happenings(["P1", "P2"], T0 - 3 * DAY_MS, T0 + DAY_MS)
    assert [(h["type"], h["ts_ms"]) for h in happened] == [("birth", T0), ("event", T0 + 30_000)]


def test_status_samples_break_ties_by_seq(store: Store) -> None:
    store.write([row(7, T0 + 1_000), row(8, T0 + 1_000), row(2, T0 + 500)], [], [])
    [sample] = store.status_samples(["P1"], T0, T0 + 60_000, 60_000)
    assert json.loads(sample["payload"])["seq"] == 8


def test_twins_are_upserted(store: Store) -> None:
    store.save([TwinRecord("P1", b'{"id": "P1", "n": 1}'), TwinRecord("P2", b'{"id": "P2"}')], [])
    store.save([TwinRecord("P1", b'{"id": "P1", "n": 2}')], [])
    twins = sorted(store.load_twins(), key=lambda t: t["id"])
    assert twins == [{"id": "P1", "n": 2}, {"id": "P2"}]


def test_dead_letters_are_bounded_and_counted(store: Store) -> None:
    store.save([], [dead(i, "schema" if i % 2 else "topic") for i in range(8)])
    kept = store.dead_letters(limit=100)
    assert [d.topic for d in kept] == [f"cw/v1/P1/status#{i}" for i in range(7, 2, -1)]
    assert kept[0].payload == b"x7"
    assert kept[0].size == 2
    assert store.dead_letter_counts() == {"schema": 4, "topic": 4}
    assert [d.topic for d in store.dead_letters(limit=2)] == [
        "cw/v1/P1/status#7",
        "cw/v1/P1/status#6",
    ]


def test_a_retained_replay_of_a_dead_letter_is_counted_not_stored(store: Store) -> None:
    store.save([], [dead(1, retained=True)])
    store.save([], [dead(1, retained=True)])  # the broker's replay on the next subscribe
    store.save([], [dead(1)])  # the same bytes sent again live: a new dead letter
    assert len(store.dead_letters()) == 2
    assert store.retained_repeats == 1
    assert store.dead_letter_counts() == {"schema": 2}


def test_the_event_journal(store: Store) -> None:
    assert store.unobserved_max() == 0
    store.write([], [], [], [Unobserved(1, "P1", T0, "{}"), Unobserved(2, "P1", T0, "{}")])
    store.write([], [], [], [Unobserved(2, "P1", T0 + 1, '{"again": 1}')])  # replaced
    assert store.unobserved_max() == 2


def test_facts_are_remembered(store: Store) -> None:
    assert store.fact("broker_session") is None
    store.remember("broker_session", "a")
    store.remember("broker_session", "b")
    assert store.fact("broker_session") == "b"


# -- PostgreSQL only: partitions, a refused batch, a schema behind --------------------------


@pytest.fixture
def pg_store(pg_url: str) -> Iterator[PostgresStore]:
    migrate.upgrade(pg_url)
    s = PostgresStore(pg_url, now_ms=T0, days_ahead=2)
    yield s
    s.close()


def test_partitions_are_made_ahead_and_on_demand_and_dropped_whole(pg_store: PostgresStore) -> None:
    today = T0 // DAY_MS
    assert pg_store.partitions() == [partition_name(d) for d in range(today, today + 3)]
    assert partition_name(today) == "messages_p20261203"
    pg_store.write([row(1, T0 - 5 * DAY_MS), row(2, T0)], [], [])  # an old day: made for it
    assert partition_name(today - 5) in pg_store.partitions()
    assert pg_store.prune(T0) == 1  # the old day ended before the cut; today's has not
    assert pg_store.partitions() == [partition_name(d) for d in range(today, today + 3)]
    assert [m["seq"] for m in pg_store.messages("P1")] == [2]
    pg_store.write([row(3, T0 - 5 * DAY_MS)], [], [])  # that day again: made again
    assert [m["seq"] for m in pg_store.messages("P1")] == [3, 2]


def test_a_refused_batch_leaves_nothing(pg_store: PostgresStore) -> None:
    """PostgreSQL refuses a NUL in text: the whole batch goes, twins and dead letters too."""
    bad = row(2, T0)._replace(payload="\x00")
    with pytest.raises(StoreError):
        pg_store.write([row(1, T0), bad], [TwinRecord("P1", b"{}")], [dead(1)])
    assert pg_store.messages("P1") == []
    assert pg_store.load_twins() == []
    assert pg_store.dead_letters() == []
    pg_store.write([row(1, T0)], [], [])  # and the store still writes
    assert len(pg_store.messages("P1")) == 1


def test_a_database_behind_is_refused(pg_url: str) -> None:
    with pytest.raises(migrate.SchemaBehind, match="run `chargewatch db upgrade --db"):
        PostgresStore(pg_url)


def test_two_stores_making_the_same_partition_at_once_both_write(pg_url: str) -> None:
    import threading

    migrate.upgrade(pg_url)
    stores = [PostgresStore(pg_url, now_ms=T0, days_ahead=0) for _ in range(2)]
    start = threading.Barrier(2)
    failed: list[BaseException] = []

    def write(i: int) -> None:
        start.wait()
        try:
            stores[i].write([row(i, T0 + 9 * DAY_MS, device_id=f"P{i}")], [], [])
        except BaseException as exc:
            failed.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert failed == []
        assert [len(stores[0].messages(f"P{i}")) for i in range(2)] == [1, 1]
    finally:
        for s in stores:
            s.close()
