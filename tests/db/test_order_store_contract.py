"""The work-order store's contract (ingest.alerts.order_store), the same tests on the
embedded SQLite file and on PostgreSQL: orders upserted with their log in one transaction,
the filtered reads, and one open order per alert said by the database to any writer."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ingest import StoreError
from ingest.alerts.order_model import OrderQuery, WorkOrder
from ingest.alerts.order_store import WorkOrderStore
from ingest.db import migrate

T0 = 1_796_284_800_000  # 2026-12-03T08:00:00Z


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[WorkOrderStore]:
    if request.param == "sqlite":
        s = WorkOrderStore.in_dir(tmp_path / "data")
    else:
        url = request.getfixturevalue("pg_url")
        migrate.upgrade(url)
        s = WorkOrderStore.on_postgresql(url)
    yield s
    s.close()


def order(i: int, **changes: Any) -> WorkOrder:
    o = WorkOrder(
        id=i, alert_id=100 + i, station_id=f"st-{i % 2}", device_id=f"P{i}", rule="fault",
        code="relay_stuck", severity="major", state="open", assignee=None, created_by="li",
        created_at_ms=T0 + i, due_at_ms=T0 + 3_600_000, updated_at_ms=T0 + i,
    )  # fmt: skip
    return replace(o, **changes)


def test_orders_and_their_log_are_saved_and_read_back(store: WorkOrderStore) -> None:
    assert store.next_id() == 1
    store.save(
        [order(1), order(2)], [(1, T0, "li", "created", None), (2, T0, "li", "created", "x")]
    )
    store.save([order(1, state="assigned", assignee="wang", assigned_at_ms=T0 + 10)],
               [(1, T0 + 10, "li", "assigned", "to wang")])  # fmt: skip
    assert store.next_id() == 3
    assert store.get(1) == order(1, state="assigned", assignee="wang", assigned_at_ms=T0 + 10)
    assert store.get(3) is None
    log = store.log(1)
    assert [(e["order_id"], e["what"], e["note"]) for e in log] == [
        (1, "created", None), (1, "assigned", "to wang"),
    ]  # fmt: skip
    assert log[0]["id"] < log[1]["id"]


def test_queries_filter_and_page_newest_first(store: WorkOrderStore) -> None:
    store.save(
        [order(i) for i in range(1, 7)]
        + [order(7, state="assigned", assignee="wang"), order(8, state="closed", closed_at_ms=T0)],
        [],
    )

    def ids(**q: Any) -> list[int]:
        return [o.id for o in store.query(OrderQuery(**q))]

    assert ids() == [8, 7, 6, 5, 4, 3, 2, 1]
    assert ids(limit=2, before_id=7) == [6, 5]
    assert ids(states=("assigned", "closed", "closed")) == [8, 7]
    assert ids(assignee="wang") == [7]
    assert ids(station="st-1", states=("open",)) == [5, 3, 1]
    assert [o.id for o in store.load_unclosed()] == [1, 2, 3, 4, 5, 6, 7]


def test_a_second_open_order_for_an_alert_is_refused(store: WorkOrderStore) -> None:
    store.save([order(1)], [])
    with pytest.raises(StoreError):
        store.save([order(2, alert_id=101)], [(2, T0, "li", "created", None)])
    assert store.get(2) is None
    assert store.log(2) == []  # the log row went with it
    store.save([order(1, state="closed", closed_at_ms=T0 + 5)], [])
    store.save([order(2, alert_id=101)], [])  # once the first is closed
    assert [o.id for o in store.load_unclosed()] == [2]
