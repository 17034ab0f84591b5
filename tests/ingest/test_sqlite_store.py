"""The embedded SQLite store: idempotent history, twin records, bounded dead letters."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devices.contract import Death
from ingest import StoreError, StoreUnavailable
from ingest.sqlite_db import BulkInsert
from ingest.sqlite_store import DB_FILE, SQLiteStore
from ingest.store import DEAD_LETTER_PAYLOAD_KEPT, DeadLetter, HistoryRow, MessageType, TwinRecord

T0 = 1_796_284_800_000
_MSG = Death(v=1, online=False, boot="boot-a", seq=0)  # any decoded message will do


def row(
    seq: int,
    ts_ms: int,
    device_id: str = "P1",
    type: MessageType = "status",
    boot: str = "boot-a",
) -> HistoryRow:
    return HistoryRow(
        device_id=device_id,
        station_id="st-1",
        kind="pile",
        type=type,
        boot=boot,
        seq=seq,
        ts_ms=ts_ms,
        received_ms=ts_ms + 5,
        payload=f'{{"seq":{seq}}}',
        message=_MSG,
    )


def dead(i: int, reason: str = "schema") -> DeadLetter:
    return DeadLetter.of(T0 + i, f"cw/v1/P1/status#{i}", reason, f"detail {i}", b"x%d" % i)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore.in_dir(tmp_path / "data", dead_letters_kept=5)
    yield s
    s.close()


def _keys(rows: list[dict[str, object]]) -> list[tuple[object, ...]]:
    return [(r["boot"], r["seq"], r["type"]) for r in rows]


def test_in_dir_creates_the_file(tmp_path: Path) -> None:
    s = SQLiteStore.in_dir(tmp_path / "a" / "b")
    s.close()
    assert (tmp_path / "a" / "b" / DB_FILE).is_file()


def test_append_is_idempotent(store: SQLiteStore) -> None:
    store.append([row(1, T0), row(2, T0 + 1000)])
    store.append([row(2, T0 + 1000), row(3, T0 + 2000)])  # 2 redelivered
    store.append([row(1, T0)])
    assert store.count_messages() == 3
    assert _keys(store.messages("P1")) == [
        ("boot-a", 1, "status"),
        ("boot-a", 2, "status"),
        ("boot-a", 3, "status"),
    ]


def test_batches_larger_than_one_statement(store: SQLiteStore) -> None:
    """Rows go to SQLite a chunk of rows per statement (BulkInsert): a batch of several
    chunks and a remainder, with repeats inside a chunk and across chunks, is stored once
    each; so are twin records upserted in one batch, a device twice."""
    n = 2 * BulkInsert.CHUNK + 37
    rows = [row(i, T0 + i) for i in range(n)]
    store.append(rows + rows[:3] + rows[-150:])
    assert store.count_messages() == n
    assert [m["seq"] for m in store.messages("P1", limit=n + 10)] == list(range(n))
    records = [rec({"device_id": f"P{i}", "seq": i}) for i in range(n)]
    store.save([*records, rec({"device_id": "P7", "seq": -7})], [])
    twins = {str(t["device_id"]): t["seq"] for t in store.load_twins()}
    assert len(twins) == n
    assert (twins["P7"], twins["P8"]) == (-7, 8)  # the later record of P7 in the batch wins


def test_write_is_one_transaction(store: SQLiteStore) -> None:
    """History, twins and dead letters of a batch land together, or none of them does."""
    store.write([row(1, T0)], [rec({"device_id": "P1", "seq": 1})], [dead(1)])
    assert store.count_messages() == 1
    assert [t["seq"] for t in store.load_twins()] == [1]
    assert store.dead_letter_counts() == {"schema": 1}
    bad = DeadLetter(T0, None, "schema", "x", b"", 0)  # type: ignore[arg-type]  # NOT NULL
    with pytest.raises(StoreError):
        store.write([row(2, T0 + 1)], [rec({"device_id": "P1", "seq": 2})], [bad])
    assert store.count_messages() == 1
    assert [t["seq"] for t in store.load_twins()] == [1]
    assert store.dead_letter_counts() == {"schema": 1}


def test_same_seq_other_type_or_boot_is_another_message(store: SQLiteStore) -> None:
    # a Will carries the seq of its birth; a new boot starts again from 0
    store.append(
        [
            row(0, T0, type="birth"),
            row(0, T0 + 1, type="death"),
            row(0, T0 + 2, boot="boot-b", type="birth"),
        ]
    )
    assert store.count_messages() == 3


def test_messages_ordered_by_device_time(store: SQLiteStore) -> None:
    store.append([row(5, T0 + 5000), row(3, T0 + 1000), row(4, T0 + 1000), row(1, T0 - 9000)])
    store.append([row(9, T0, device_id="P2")])
    rows = store.messages("P1")
    assert [r["seq"] for r in rows] == [1, 3, 4, 5]  # by ts, then seq
    assert rows[0] == {
        "device_id": "P1",
        "boot": "boot-a",
        "seq": 1,
        "type": "status",
        "ts_ms": T0 - 9000,
        "received_ms": T0 - 8995,
        "payload": '{"seq":1}',
    }
    assert [r["seq"] for r in store.messages("P2")] == [9]
    assert store.messages("P3") == []


@pytest.mark.parametrize(
    ("since", "until", "limit", "seqs"),
    [
        (None, None, 1000, [1, 2, 3, 4]),
        (T0 + 1000, None, 1000, [2, 3, 4]),  # since is inclusive
        (None, T0 + 2000, 1000, [1, 2]),  # until is exclusive
        (T0 + 1000, T0 + 3000, 1000, [2, 3]),
        (None, None, 2, [1, 2]),
    ],
)
def test_messages_window(
    store: SQLiteStore, since: int | None, until: int | None, limit: int, seqs: list[int]
) -> None:
    store.append([row(i + 1, T0 + i * 1000) for i in range(4)])
    assert [r["seq"] for r in store.messages("P1", since, until, limit)] == seqs


def rec(record: dict[str, Any]) -> TwinRecord:
    return TwinRecord(record["device_id"], json.dumps(record).encode())


def test_save_and_load_twins(store: SQLiteStore) -> None:
    a = {"device_id": "P1", "boot": "boot-a", "max_seq": 3, "retired_boots": [], "status": None}
    b = {"device_id": "C1", "boot": None, "status": {"kind": "cabinet", "slots": []}}
    store.save([rec(a), rec(b)], [])
    assert sorted(store.load_twins(), key=lambda r: str(r["device_id"])) == [b, a]
    a2 = {**a, "max_seq": 9, "retired_boots": ["boot-0"]}
    store.save([rec(a2)], [])  # an upsert, not a second row
    assert sorted(store.load_twins(), key=lambda r: str(r["device_id"])) == [b, a2]


def test_state_survives_reopen(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "x.db")
    s.append([row(1, T0)])
    s.save([rec({"device_id": "P1", "max_seq": 1})], [dead(1, "not_json")])
    s.close()
    s = SQLiteStore(tmp_path / "x.db")
    try:
        assert s.count_messages() == 1
        assert s.load_twins() == [{"device_id": "P1", "max_seq": 1}]
        assert s.dead_letter_counts() == {"not_json": 1}
        assert [d.topic for d in s.dead_letters()] == ["cw/v1/P1/status#1"]
    finally:
        s.close()


def test_dead_letters_newest_first_with_payload(store: SQLiteStore) -> None:
    store.save([], [dead(1), dead(2, "topic")])
    letters = store.dead_letters()
    assert [(d.received_ms, d.reason, d.detail, d.payload, d.size) for d in letters] == [
        (T0 + 2, "topic", "detail 2", b"x2", 2),
        (T0 + 1, "schema", "detail 1", b"x1", 2),
    ]
    assert letters[0].id is not None
    assert letters[1].id is not None
    assert letters[0].id > letters[1].id
    assert [d.reason for d in store.dead_letters(limit=1)] == ["topic"]


def test_dead_letter_keeps_a_prefix_and_the_size(store: SQLiteStore) -> None:
    big = b"{" + b"x" * (3 * DEAD_LETTER_PAYLOAD_KEPT)
    store.save([], [DeadLetter.of(T0, "t", "oversized", "too big", big)])
    (letter,) = store.dead_letters()
    assert letter.payload == big[:DEAD_LETTER_PAYLOAD_KEPT]
    assert letter.size == len(big)


def test_dead_letter_pruning_keeps_newest_n_and_all_counts(store: SQLiteStore) -> None:
    # kept = 5
    store.save([], [dead(i) for i in range(4)])
    store.save([], [dead(i, "topic") for i in range(4, 7)])
    store.save([], [dead(i, "unknown_device") for i in range(7, 12)])
    store.save([], [dead(12, "not_json")])
    assert [d.received_ms - T0 for d in store.dead_letters(limit=100)] == [12, 11, 10, 9, 8]
    assert store.dead_letter_counts() == {
        "schema": 4,
        "topic": 3,
        "unknown_device": 5,
        "not_json": 1,
    }


def test_twin_only_save_does_not_prune(store: SQLiteStore) -> None:
    store.save([], [dead(i) for i in range(3)])
    store.save([rec({"device_id": "P1"})], [])
    assert len(store.dead_letters()) == 3


def test_cannot_open_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreUnavailable, match="cannot open"):
        SQLiteStore(blocker / "sub" / DB_FILE)


def test_write_after_close_fails_as_store_error(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "x.db")
    s.close()
    with pytest.raises(StoreError, match=r"x\.db"):
        s.append([row(1, T0)])


def garbage(i: int, payload: bytes, *, retained: bool) -> DeadLetter:
    return DeadLetter.of(T0 + i, "cw/v1/P1/status", "not_json", "bad", payload, retained=retained)


def test_a_retained_replay_of_a_dead_letter_is_counted_not_stored_again(tmp_path: Path) -> None:
    s = SQLiteStore.in_dir(tmp_path / "data")
    try:
        s.save([], [garbage(0, b"{a", retained=True)])
        s.write([], [], [garbage(1, b"{a", retained=True)])  # the next subscribe's replay
        s.save([], [garbage(2, b"{b", retained=False), garbage(3, b"{b", retained=False)])
        s.save([], [garbage(4, b"{b", retained=True)])  # a live one, now replayed retained
        assert [d.payload for d in s.dead_letters()] == [b"{b", b"{b", b"{a"]
        assert s.dead_letter_counts() == {"not_json": 3}
        assert s.retained_repeats == 2
    finally:
        s.close()
    again = SQLiteStore.in_dir(tmp_path / "data")  # remembered across a restart
    try:
        again.save([], [garbage(5, b"{a", retained=True), garbage(6, b"{c", retained=True)])
        assert again.dead_letter_counts() == {"not_json": 4}
        assert again.retained_repeats == 1
    finally:
        again.close()


def test_remembered_dead_letters_are_bounded(tmp_path: Path) -> None:
    s = SQLiteStore.in_dir(tmp_path / "data", dead_letters_kept=10)
    try:
        s.save([], [garbage(i, b"{%d" % i, retained=True) for i in range(25)])
        s.save([], [garbage(99, b"{0", retained=True)])  # long forgotten: a dead letter again
        s.save([], [garbage(99, b"{24", retained=True)])  # recent: a repeat
        assert s.dead_letter_counts() == {"not_json": 26}
        assert s.retained_repeats == 1
    finally:
        s.close()
    again = SQLiteStore.in_dir(tmp_path / "data", dead_letters_kept=10)
    try:
        kept = again._db.query("SELECT count(*) FROM dead_letter_digests")[0][0]
        assert kept == 10
        again.save([], [garbage(100, b"{24", retained=True)])
        assert again.retained_repeats == 1
    finally:
        again.close()


HOUR = 3_600_000


def _story() -> list[HistoryRow]:
    """Three hours of statuses every 30 s, an event every ten minutes, a second boot."""
    rows = []
    for i in range(360):
        boot = "boot-a" if i < 200 else "boot-b"
        rows.append(row(i, T0 + i * 30_000, boot=boot))
        if i % 20 == 0:
            rows.append(row(10_000 + i, T0 + i * 30_000 + 1, type="event", boot=boot))
    return rows


def test_compacted_history_reads_the_same(store: SQLiteStore) -> None:
    rows = _story()
    store.append(rows)
    before = store.messages("P1", limit=10_000)
    samples = store.status_samples(["P1"], T0 - HOUR, T0 + 4 * HOUR, 7 * 60_000)
    happenings = store.happenings(["P1"], T0, T0 + 4 * HOUR)
    assert store.compact(T0 + 2 * HOUR + 1) == 2  # T0 is an hour's start: two are over
    assert store.compact(T0 + 2 * HOUR + 1) == 0
    raw = store._db.query("SELECT count(*) FROM messages WHERE type = 'status'")[0][0]
    assert raw == 360 - 240
    store.append(rows[:50])  # redelivered after their hour was compacted
    assert store.messages("P1", limit=10_000) == before
    assert store.status_samples(["P1"], T0 - HOUR, T0 + 4 * HOUR, 7 * 60_000) == samples
    assert store.happenings(["P1"], T0, T0 + 4 * HOUR) == happenings
    window = store.messages("P1", T0 + 10 * 60_000, T0 + 70 * 60_000, limit=30)
    assert window == [m for m in before if m["ts_ms"] >= T0 + 10 * 60_000][:30]
    again = sum(1 for r in rows[:50] if r.type == "status")  # events stay in place: once
    assert store.count_messages() == len(rows) + again
    assert store.compact(T0 + 2 * HOUR + 1) == 1  # folds the redelivered ones in, once
    assert store.count_messages() == len(rows)
    assert store.messages("P1", limit=10_000) == before


def test_prune_drops_what_is_older_than_the_cutoff(store: SQLiteStore) -> None:
    rows = _story()
    store.append(rows)
    store.compact(T0 + 2 * HOUR)
    cutoff = T0 + HOUR + 15 * 60_000
    gone = 0
    while n := store.prune(cutoff, batch=50):
        gone += n
    kept = store.messages("P1", limit=10_000)
    # the first hour's block went whole; the second hour's block stays until it is over
    assert min(m["ts_ms"] for m in kept) == T0 + HOUR
    assert next(m for m in kept if m["type"] == "event")["ts_ms"] >= T0 + HOUR
    assert gone == 1 + sum(1 for r in rows if r.type == "event" and r.ts_ms < cutoff)
    assert len(kept) == len(rows) - 120 - sum(
        1 for r in rows if r.type == "event" and r.ts_ms < cutoff
    )


def test_reads_by_a_list_of_devices_are_each_device_s(store: SQLiteStore) -> None:
    """A read by several ids (an IN list of the next power of two of parameters, the rest
    NULL) returns what the reads of each id return, and nothing of a device not asked."""
    devices = ["P1", "P2", "P3", "P4", "P5"]
    store.append([r._replace(device_id=d) for d in devices for r in _story()])
    store.compact(T0 + HOUR + 1)  # the first hour in blocks, the rest in rows
    store.save_rollups([("device", d, T0 + h * HOUR, f'{{"h":{h}}}') for d in devices
                        for h in range(3)], T0 + 3 * HOUR)  # fmt: skip
    asked = ["P5", "P1", "P3"]  # three ids: four parameters, one NULL
    window = (T0, T0 + 4 * HOUR)

    samples = store.status_samples(asked, *window, 7 * 60_000)
    each = [s for d in asked for s in store.status_samples([d], *window, 7 * 60_000)]
    assert samples == sorted(each, key=lambda s: (s["device_id"], s["bucket_ms"]))
    assert {s["device_id"] for s in samples} == set(asked)

    happenings = store.happenings(asked, *window)
    each = [h for d in asked for h in store.happenings([d], *window)]
    assert sorted(happenings, key=lambda h: (h["device_id"], h["ts_ms"])) == sorted(
        each, key=lambda h: (h["device_id"], h["ts_ms"])
    )
    assert {h["device_id"] for h in happenings} == set(asked)
    assert [h["ts_ms"] for h in happenings] == sorted(h["ts_ms"] for h in happenings)

    rollups = store.rollups("device", asked, *window)
    assert [(r["id"], r["hour_ms"]) for r in rollups] == [
        (d, T0 + h * HOUR) for d in sorted(asked) for h in range(3)
    ]
    assert store.rollups("device", ["P2"] * 9, *window) == store.rollups("device", ["P2"], *window)
