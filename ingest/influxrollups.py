"""The hourly rollups of an InfluxDB history, computed by the service and written back.

InfluxQL cannot judge "online" or opening hours minute by minute, so for InfluxDB 2.x/3.x
(and 1.x too, beside the sample-counting continuous queries of ``ingest.influxsetup``) the
service rolls the hours up itself: ``ingest.rollups.HourlyRollups`` over this store reads a
device's history around the hour with InfluxQL (``InfluxHistory``: the ``message``
measurement) and writes each rollup as one point through the write API:

==============  ================  =============================================================
measurement     tags              fields (time: the hour's start)
==============  ================  =============================================================
``rollup``      scope, id         the numbers of ``devices.rollup.Rollup`` (integers;
                                  ``energy_wh`` a float), ``faults.<code>`` and
                                  ``reports_by_category.<category>`` (integers)
``rollup_mark`` (none)            ``through_ms``: every hour before it is rolled up
==============  ================  =============================================================

Where: 1.x the retention policy ``rollups`` (kept forever: ``chargewatch influx setup``
creates it), 2.x/3.x the bucket ``<bucket>_rollups`` (``rollup_bucket``; reads go to
``"rollups"."rollup"`` of the URL's database, so that bucket needs the DBRP mapping
``db``/``rollups``). A point rewritten for the same hour overwrites itself: rolling an hour
again is idempotent. The rollups are written before the mark, so a failure between them
only means the hour is rolled up again.

Implements ``ingest.store.RollupStore`` (what the summaries, the forecast and the history
routes read) and what ``HourlyRollups`` needs of a history, and is a ``HistoryStore`` too (it
hands the history's reads and writes to ``InfluxHistory``): the service keeps it as its
history, so the read side hands out both. Blocking, like InfluxHistory.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ingest.influx import InfluxHistory, quote_ident, quote_string
from ingest.lineprotocol import line
from ingest.store import HistoryRow

ROLLUP_RP = "rollups"  # as ingest.influxsetup creates it on 1.x
ROLLUP = "rollup"
MARK = "rollup_mark"
_NESTED = ("faults", "reports_by_category")
_TAGS = ("time", "scope", "id")


def rollup_line(scope: str, device_or_station: str, hour_ms: int, data: dict[str, Any]) -> str:
    """One rollup as a point: every number a field, nested counts as ``<name>.<key>``."""
    fields: list[tuple[str, float | int]] = []
    for key, value in sorted(data.items()):
        if key in _NESTED:
            fields += [(f"{key}.{k}", int(n)) for k, n in sorted(value.items())]
        elif key == "energy_wh":
            fields.append((key, float(value)))
        else:
            fields.append((key, int(value)))
    tags = (("id", device_or_station), ("scope", scope))
    return line(ROLLUP, tags, fields, hour_ms * 1_000_000)


def rollup_data(row: dict[str, Any]) -> dict[str, Any]:
    """A point read back (``SELECT *``: absent fields are None) as the rollup's dict."""
    data: dict[str, Any] = {key: {} for key in _NESTED}
    for column, value in row.items():
        if column in _TAGS or value is None:
            continue
        head, dot, tail = column.partition(".")
        if dot and head in _NESTED:
            data[head][tail] = int(value)
        else:
            data[column] = float(value) if column == "energy_wh" else int(value)
    return data


class InfluxRollupStore:
    """Rollups of an InfluxDB history, in InfluxDB (see the module docstring)."""

    def __init__(self, history: InfluxHistory, *, rollup_bucket: str = "") -> None:
        self.history = history
        s = history.settings
        self.rollup_bucket = rollup_bucket or (f"{s.bucket}_rollups" if s.mode == "v2" else "")
        self._raw = history.measurement("message")

    def __repr__(self) -> str:
        return f"{self.history!r} with hourly rollups"

    # -- HistoryStore: the history's own ---------------------------------------------------

    def append(self, rows: Sequence[HistoryRow]) -> None:
        self.history.append(rows)

    def status_samples(
        self, device_ids: Sequence[str], since_ms: int, until_ms: int, every_ms: int
    ) -> list[dict[str, Any]]:
        return self.history.status_samples(device_ids, since_ms, until_ms, every_ms)

    def happenings(
        self, device_ids: Sequence[str], since_ms: int, until_ms: int, limit: int = 100_000
    ) -> list[dict[str, Any]]:
        return self.history.happenings(device_ids, since_ms, until_ms, limit)

    def close(self) -> None:
        self.history.close()

    # -- what HourlyRollups reads --------------------------------------------------------

    def messages(
        self,
        device_id: str,
        since_ms: int | None = None,
        until_ms: int | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        return self.history.messages(device_id, since_ms, until_ms, limit)

    def last_state_before(self, device_id: str, t_ms: int) -> tuple[str, str] | None:
        """The last birth or death of the device before ``t_ms`` as (type, payload)."""
        q = (
            f"SELECT {quote_ident('payload')}, {quote_ident('type')} FROM {self._raw}"
            f" WHERE {quote_ident('device')} = {quote_string(device_id)}"
            f" AND ({quote_ident('type')} = 'birth' OR {quote_ident('type')} = 'death')"
            f" AND time < {max(0, int(t_ms)) * 1_000_000} ORDER BY time DESC LIMIT 1"
        )
        rows = self.history.query(q)
        return (str(rows[0]["type"]), str(rows[0]["payload"])) if rows else None

    def active_devices(self, since_ms: int, until_ms: int) -> set[str]:
        """Devices with any message in [since_ms, until_ms) of device time."""
        since_ns, until_ns = max(0, since_ms) * 1_000_000, max(0, until_ms) * 1_000_000
        q = (
            f"SELECT count({quote_ident('seq')}) FROM {self._raw}"
            f" WHERE time >= {since_ns} AND time < {until_ns} GROUP BY {quote_ident('device')}"
        )
        return {str(r["device"]) for r in self.history.query(q) if r.get("count")}

    def first_ts(self) -> int | None:
        """The oldest device time in the history (None: empty)."""
        rows = self.history.query(f"SELECT first({quote_ident('seq')}) FROM {self._raw}")
        return int(rows[0]["time"]) // 1_000_000 if rows else None

    def fact(self, name: str) -> str | None:
        """Only ``rollups_through`` is kept here."""
        through = self.rolled_through() if name == "rollups_through" else None
        return None if through is None else str(through)

    def save_rollups(self, rows: Sequence[tuple[str, str, int, str]], through_ms: int) -> None:
        """Write (scope, id, hour_ms, data JSON) rollups, then the mark."""
        lines = [rollup_line(scope, id_, hour, json.loads(data)) for scope, id_, hour, data in rows]
        mark = line(MARK, (), [("through_ms", int(through_ms))], int(through_ms) * 1_000_000)
        self.history.write_lines(lines, rp=ROLLUP_RP, bucket=self.rollup_bucket)
        self.history.write_lines([mark], rp=ROLLUP_RP, bucket=self.rollup_bucket)

    # -- RollupStore ---------------------------------------------------------------------

    def rolled_through(self) -> int | None:
        q = f"SELECT max({quote_ident('through_ms')}) FROM {self._rollups(MARK)}"
        rows = self.history.query(q)
        return int(rows[0]["max"]) if rows and rows[0].get("max") is not None else None

    def rollups(
        self, scope: str, ids: Sequence[str], since_ms: int, until_ms: int
    ) -> list[dict[str, Any]]:
        """Rollups of the hours starting in [since_ms, until_ms), by id then hour, as
        ``{id, hour_ms, data}``."""
        if not ids:
            return []
        match = " OR ".join(f"{quote_ident('id')} = {quote_string(i)}" for i in ids)
        q = (
            f"SELECT * FROM {self._rollups(ROLLUP)}"
            f" WHERE {quote_ident('scope')} = {quote_string(scope)} AND ({match})"
            f" AND time >= {max(0, since_ms) * 1_000_000} AND time < {max(0, until_ms) * 1_000_000}"
        )
        out = [
            {"id": str(r["id"]), "hour_ms": int(r["time"]) // 1_000_000, "data": rollup_data(r)}
            for r in self.history.query(q)
        ]
        out.sort(key=lambda r: (r["id"], r["hour_ms"]))
        return out

    def _rollups(self, measurement: str) -> str:
        return f"{quote_ident(ROLLUP_RP)}.{quote_ident(measurement)}"
