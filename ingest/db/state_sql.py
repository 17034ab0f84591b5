"""The statements of ingest's own state that mean the same on both engines, built once: the
embedded store (``ingest.sqlite_store``, through ``SQLiteDB``) and the cluster's
(``ingest.pg_store``, on its connections) run these, each picking its dialect's upserts
(``ingest.db.dialect``). What only one engine does stays in its store: SQLite's history
insert (``INSERT OR IGNORE``), compaction into ``status_blocks`` and its history reads;
PostgreSQL's partitions, NOTIFY and its history reads.

Parameters are named as ``ingest.db.database`` says: an insert's are its columns, the
others ``b_...``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, delete, func, literal_column, select, update
from sqlalchemy.sql.dml import Insert

from ingest.db.dialect import Upserts, per_dialect
from ingest.db.schema import (
    dead_letter_counts,
    dead_letter_digests,
    dead_letters,
    facts,
    rollups,
    twins,
    unobserved,
)

if TYPE_CHECKING:
    from ingest.store import DeadLetter

UPSERT_TWINS = Upserts(twins, key=("device_id",))
UPSERT_UNOBSERVED = Upserts(unobserved)
UPSERT_ROLLUPS = Upserts(rollups, key=("scope", "id", "hour_ms"))
REMEMBER = Upserts(facts, key=("name",))
FACT = select(facts.c.value).where(facts.c.name == bindparam("b_name"))
LOAD_TWINS = select(twins.c.record)


def _count_dead(insert: Callable[..., Any]) -> Insert:
    i = insert(dead_letter_counts)
    counted: Insert = i.on_conflict_do_update(
        index_elements=[dead_letter_counts.c.reason],
        set_={"count": dead_letter_counts.c.count + i.excluded["count"]},
    )
    return counted


INSERT_DEAD_LETTER = dead_letters.insert()
COUNT_DEAD_LETTERS = per_dialect(_count_dead)
"""Add ``count`` to the reason's count (the first one of a reason inserts it)."""
KEEP_DIGEST = per_dialect(lambda insert: insert(dead_letter_digests).on_conflict_do_nothing())
REPEATED_DIGEST = (
    update(dead_letter_digests)
    .where(dead_letter_digests.c.digest == bindparam("b_digest"))
    .values(repeats=dead_letter_digests.c.repeats + 1)
)
# keep the newest ``b_kept`` for inspection; the per-reason counts keep the whole story
TRIM_DEAD_LETTERS = delete(dead_letters).where(
    dead_letters.c.id <= select(func.max(dead_letters.c.id)).scalar_subquery() - bindparam("b_kept")
)
TRIM_DIGESTS = delete(dead_letter_digests).where(
    dead_letter_digests.c.id
    <= select(func.max(dead_letter_digests.c.id)).scalar_subquery() - bindparam("b_kept")
)
_ZERO: Any = literal_column("0")  # SQLite renders LIMIT with an OFFSET: 0, not a parameter
NEWEST_DIGESTS = (
    select(dead_letter_digests.c.digest)
    .order_by(dead_letter_digests.c.id.desc())
    .limit(bindparam("b_limit"))
    .offset(_ZERO)
)
_D = dead_letters.c
NEWEST_DEAD_LETTERS = (
    select(_D.received_ms, _D.topic, _D.reason, _D.detail, _D.payload, _D.size, _D.id)
    .order_by(_D.id.desc())
    .limit(bindparam("b_limit"))
    .offset(_ZERO)
)
DEAD_LETTER_COUNTS = select(dead_letter_counts.c.reason, dead_letter_counts.c.count)


def dead_letter_writes(
    dialect: str,
    fresh: Sequence[tuple[DeadLetter, bytes]],
    repeats: Sequence[bytes],
    kept: int,
) -> list[tuple[Any, list[dict[str, Any]]]]:
    """The statements (each with its rows) that keep a batch's dead letters, in order: the
    new ones (``fresh``, each with its digest) inserted, counted by reason, the newest
    ``kept`` of them and of their digests kept; a retained replay's digest (``repeats``)
    counted again. Both stores run them in the batch's transaction."""
    writes: list[tuple[Any, list[dict[str, Any]]]] = []
    if fresh:
        counts: dict[str, int] = {}
        for d, _ in fresh:
            counts[d.reason] = counts.get(d.reason, 0) + 1
        trim = [{"b_kept": kept}]
        rows = [
            {"received_ms": d.received_ms, "topic": d.topic, "reason": d.reason,
             "detail": d.detail, "payload": d.payload, "size": d.size}
            for d, _ in fresh
        ]  # fmt: skip
        writes += [
            (INSERT_DEAD_LETTER, rows),
            (COUNT_DEAD_LETTERS[dialect], [{"reason": r, "count": n} for r, n in counts.items()]),
            (TRIM_DEAD_LETTERS, trim),
            (KEEP_DIGEST[dialect], [{"digest": digest} for _, digest in fresh]),
            (TRIM_DIGESTS, trim),
        ]
    if repeats:
        writes.append((REPEATED_DIGEST, [{"b_digest": digest} for digest in repeats]))
    return writes


UNOBSERVED_MAX = select(func.coalesce(func.max(unobserved.c.id), 0))
