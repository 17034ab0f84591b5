"""History in InfluxDB: line protocol writes, InfluxQL reads (implements HistoryStore).

Two write modes, picked by the URL scheme (``s`` at the end of the scheme means HTTPS)::

    influx2://host:8086?org=ORG&bucket=BUCKET&token=TOKEN[&db=DB&rp=RP]
        InfluxDB 2.x / 3.x / 1.8+ (and VictoriaMetrics): influxdb-client's write API on
        /api/v2/write, synchronous, gzip. Reads use the bucket's DBRP mapping (db defaults
        to the bucket name) with the token.
    influx1://[user:password@]host:8086?db=DB[&rp=RP][&u=USER&p=PASSWORD]
        InfluxDB 1.x (1.6 has no /api/v2): line protocol POSTed to /write, gzip.

Both read over InfluxQL on /query, the one query language 1.x, 2.x and 3.x all answer.
The schema (measurements, tags, fields, timestamps) is in ``ingest.lineprotocol``.

Guarantees: ``append`` returns only once the server answered 204 for every point, so the
ingestor may acknowledge the messages to the broker afterwards. Writes are idempotent
(a redelivered message overwrites its own points). A failed attempt is logged, counted in
``failures`` and passed to ``on_error``; connection failures, timeouts, 429 and 5xx are
retried with capped jittered backoff for ``retry_s`` seconds and then raise
``StoreUnavailable``; any other 4xx (bad schema, auth, missing database) raises ``StoreError``
at once, since retrying cannot help. ``append`` therefore returns or raises within about
``retry_s + timeout_s`` seconds. Third-party exceptions (httpx, urllib3, influxdb-client) do
not leave this module.

All methods are blocking; the ingestor calls ``append`` from a worker thread.
"""

from __future__ import annotations

import gzip
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import urllib3.exceptions
from influxdb_client.client.exceptions import InfluxDBError
from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.domain.write_precision import WritePrecision
from influxdb_client.rest import ApiException

from ingest import StoreError, StoreUnavailable
from ingest.lineprotocol import MAX_TIME_NS, rows_lines
from ingest.store import HistoryRow

log = logging.getLogger(__name__)

T = TypeVar("T")
Mode = Literal["v1", "v2"]
_SCHEMES: dict[str, tuple[Mode, str]] = {
    "influx1": ("v1", "http"),
    "influx1s": ("v1", "https"),
    "influx2": ("v2", "http"),
    "influx2s": ("v2", "https"),
}
_MESSAGE_COLUMNS = ("boot", "seq", "received_ms", "payload", "type")


@dataclass(frozen=True, slots=True)
class InfluxSettings:
    """Where and how to write; ``parse`` builds it from a store URL."""

    mode: Mode
    base_url: str  # http(s)://host:port
    database: str  # v1: the database; v2: the DBRP database reads go to (default: bucket)
    retention_policy: str = ""
    org: str = ""
    bucket: str = ""
    token: str = ""
    username: str = ""
    password: str = ""

    @classmethod
    def parse(cls, url: str) -> InfluxSettings:
        parts = urlsplit(url)
        if parts.scheme not in _SCHEMES:
            raise StoreError(
                f"InfluxDB URL {parts.scheme}://…: the scheme must be one of "
                f"{', '.join(sorted(_SCHEMES))} (influx2 for InfluxDB 2.x/3.x, influx1 for 1.x)"
            )
        mode, http = _SCHEMES[parts.scheme]
        if not parts.hostname:
            raise StoreError(f"InfluxDB URL {url!r} names no host")
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        port = parts.port or 8086
        path_db = unquote(parts.path.strip("/"))
        settings = cls(
            mode=mode,
            base_url=f"{http}://{host}:{port}",
            database=query.get("db") or path_db,
            retention_policy=query.get("rp", ""),
            org=query.get("org", ""),
            bucket=query.get("bucket", ""),
            token=query.get("token", ""),
            username=query.get("u") or unquote(parts.username or ""),
            password=query.get("p") or unquote(parts.password or ""),
        )
        return settings.checked()

    def checked(self) -> InfluxSettings:
        """Fill defaults and say what is missing (validated eagerly, at start-up)."""
        if self.mode == "v2":
            missing = [name for name in ("org", "bucket") if not getattr(self, name)]
            if missing:
                raise StoreError(
                    f"InfluxDB 2.x/3.x needs {' and '.join(missing)}: "
                    "influx2://host:8086?org=ORG&bucket=BUCKET&token=TOKEN"
                )
            if not self.database:
                return replace(self, database=self.bucket)
        elif not self.database:
            raise StoreError("InfluxDB 1.x needs a database: influx1://host:8086?db=DB")
        return self


class InfluxHistory:
    """History in InfluxDB 1.x (v1 ``/write``) or 2.x/3.x (``/api/v2/write``)."""

    def __init__(
        self,
        settings: str | InfluxSettings,
        *,
        on_error: Callable[[Exception], None] | None = None,
        timeout_s: float = 5.0,
        retry_s: float = 10.0,
        read_retry_s: float = 1.0,
        max_backoff_s: float = 2.0,
        chunk_points: int = 5000,
        gzip_level: int = 1,
    ) -> None:
        self.settings = (
            InfluxSettings.parse(settings) if isinstance(settings, str) else settings.checked()
        )
        self.on_error = on_error
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.read_retry_s = read_retry_s
        self.max_backoff_s = max_backoff_s
        self.chunk_points = chunk_points
        self.gzip_level = gzip_level
        self.failures = 0  # failed attempts, retried or not
        self.points_written = 0
        s = self.settings
        headers = {"Authorization": f"Token {s.token}"} if s.mode == "v2" and s.token else {}
        auth = (s.username, s.password) if s.mode == "v1" and s.username else None
        self._http = httpx.Client(
            base_url=s.base_url, headers=headers, auth=auth, timeout=timeout_s
        )
        self._client: Any = None
        self._write_api: Any = None
        if s.mode == "v2":
            self._client = InfluxDBClient(
                url=s.base_url,
                token=s.token,
                org=s.org,
                timeout=int(timeout_s * 1000),
                enable_gzip=True,
                retries=False,  # we retry ourselves, within a bounded time
            )
            self._write_api = self._client.write_api(write_options=SYNCHRONOUS)

    def __repr__(self) -> str:  # no token or password in logs
        s = self.settings
        where = f"db={s.database}" if s.mode == "v1" else f"org={s.org} bucket={s.bucket}"
        return f"InfluxHistory({s.mode} {s.base_url} {where})"

    # -- HistoryStore -------------------------------------------------------------------

    def append(self, rows: Sequence[HistoryRow]) -> None:
        self.write_lines(rows_lines(rows))

    def write_lines(self, lines: Sequence[str], *, rp: str = "", bucket: str = "") -> None:
        """Write line-protocol points, in chunks, retried like ``append``; to retention
        policy ``rp`` (v1) / ``bucket`` (v2) instead of the URL's when given."""
        for start in range(0, len(lines), self.chunk_points):
            chunk = lines[start : start + self.chunk_points]
            body = "\n".join(chunk)
            if self.settings.mode == "v1":
                send = partial(self._write_v1, body, rp or self.settings.retention_policy)
            else:
                send = partial(self._write_v2, body, bucket or self.settings.bucket)
            self._retrying("write", send, self.retry_s)
            self.points_written += len(chunk)

    def messages(
        self,
        device_id: str,
        since_ms: int | None = None,
        until_ms: int | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        since_ns = max(0, int(since_ms or 0)) * 1_000_000
        until_ns = MAX_TIME_NS if until_ms is None else min(int(until_ms) * 1_000_000, MAX_TIME_NS)
        columns = ", ".join(quote_ident(c) for c in _MESSAGE_COLUMNS)
        q = (
            f"SELECT {columns} FROM {self.measurement('message')}"
            f" WHERE {quote_ident('device')} = {quote_string(device_id)}"
            f" AND time >= {since_ns} AND time < {until_ns}"
            f" ORDER BY time ASC LIMIT {max(0, int(limit))}"
        )
        out: list[dict[str, Any]] = []
        seen: set[tuple[Any, ...]] = set()
        for row in self.query(q):
            key = (row["boot"], row["seq"], row["type"])
            if key in seen:  # a redelivered death: stamped with its new arrival time
                continue
            seen.add(key)
            out.append(
                {
                    "device_id": device_id,
                    "boot": row["boot"],
                    "seq": row["seq"],
                    "type": row["type"],
                    "ts_ms": row["time"] // 1_000_000,
                    "received_ms": row["received_ms"],
                    "payload": row["payload"],
                }
            )
        return out

    def status_samples(
        self, device_ids: Sequence[str], since_ms: int, until_ms: int, every_ms: int
    ) -> list[dict[str, Any]]:
        if not device_ids or every_ms <= 0:
            return []
        since_ns, until_ns = _time_range(since_ms, until_ms)
        # last() picks the highest timestamp: device time, then seq (ingest.lineprotocol)
        q = (
            f"SELECT last({quote_ident('payload')}) AS {quote_ident('payload')}"
            f" FROM {self.measurement('message')}"
            f" WHERE {quote_ident('type')} = 'status' AND {_devices_match(device_ids)}"
            f" AND time >= {since_ns} AND time < {until_ns}"
            f" GROUP BY time({int(every_ms)}ms), {quote_ident('device')} fill(none)"
        )
        out = [
            {
                "device_id": row["device"],
                "bucket_ms": row["time"] // 1_000_000,
                "payload": row["payload"],
            }
            for row in self.query(q)
            if row.get("payload") is not None
        ]
        out.sort(key=lambda r: (r["device_id"], r["bucket_ms"]))
        return out

    def happenings(
        self,
        device_ids: Sequence[str],
        since_ms: int,
        until_ms: int,
        limit: int = 100_000,
    ) -> list[dict[str, Any]]:
        if not device_ids:
            return []
        since_ns, until_ns = _time_range(since_ms, until_ms)
        columns = ", ".join(quote_ident(c) for c in ("device", "type", "boot", "seq", "payload"))
        q = (
            f"SELECT {columns} FROM {self.measurement('message')}"
            f" WHERE {quote_ident('type')} != 'status' AND {_devices_match(device_ids)}"
            f" AND time >= {since_ns} AND time < {until_ns}"
        )
        rows: list[tuple[int, str, int, dict[str, Any]]] = []
        seen: set[tuple[Any, ...]] = set()
        for row in sorted(self.query(q), key=lambda r: int(r["time"])):
            key = (row["device"], row["boot"], row["seq"], row["type"])
            if key in seen:  # a redelivered death: stamped with its new arrival time
                continue
            seen.add(key)
            ts_ms = int(row["time"]) // 1_000_000
            rows.append(
                (
                    ts_ms,
                    row["device"],
                    int(row["seq"]),
                    {
                        "device_id": row["device"],
                        "type": row["type"],
                        "ts_ms": ts_ms,
                        "payload": row["payload"],
                    },
                )
            )
        rows.sort(key=lambda r: r[:3])
        return [r[3] for r in rows[: max(0, int(limit))]]

    def close(self) -> None:
        self._http.close()
        if self._client is not None:
            self._write_api.close()
            self._client.close()

    # -- extras -------------------------------------------------------------------------

    def query(self, influxql: str) -> list[dict[str, Any]]:
        """Run one InfluxQL statement; rows as dicts with ``time`` in epoch nanoseconds."""
        s = self.settings
        params = {"db": s.database, "epoch": "ns", "q": influxql}
        if s.retention_policy:
            params["rp"] = s.retention_policy
        data = self._retrying("query", partial(self._get_json, "/query", params), self.read_retry_s)
        rows: list[dict[str, Any]] = []
        for result in data.get("results", []):
            if "error" in result:
                raise StoreError(f"InfluxQL error: {result['error']}")
            for series in result.get("series", []):
                tags = series.get("tags", {})
                for values in series.get("values", []):
                    rows.append({**tags, **dict(zip(series["columns"], values, strict=True))})
        return rows

    def disk_bytes(self) -> int | None:
        """Bytes the history's database takes on InfluxDB's disk: the ``diskBytes`` of its
        shards (``SHOW STATS``, InfluxDB 1.x, admin rights when auth is on). None when the
        server does not say (2.x/3.x: scrape their own /metrics). One attempt, not counted
        as a store failure: it is a measurement, not a write."""
        params = {"q": "SHOW STATS FOR 'shard'"}
        try:
            data = self._get_json("/query", params)
        except StoreError as exc:
            log.debug("InfluxDB disk usage unknown: %s", exc)
            return None
        total, found = 0, False
        for result in data.get("results", []):
            for series in result.get("series", []):
                if series.get("tags", {}).get("database") != self.settings.database:
                    continue
                for values in series.get("values", []):
                    row = dict(zip(series.get("columns", []), values, strict=False))
                    if isinstance(row.get("diskBytes"), int):
                        total += row["diskBytes"]
                        found = True
        return total if found else None

    def create_database(self) -> None:
        """v1: create the database if it does not exist (InfluxDB 1.x answers this)."""
        q = f"CREATE DATABASE {quote_ident(self.settings.database)}"
        self._retrying("create database", partial(self._post_query, q), self.retry_s)

    def execute(self, influxql: str) -> None:
        """Run one InfluxQL statement that changes something (POST /query)."""
        self._retrying("query", partial(self._post_query, influxql), self.retry_s)

    def ping(self) -> bool:
        try:
            return self._http.get("/ping").status_code == 204
        except httpx.HTTPError:
            return False

    # -- transport ----------------------------------------------------------------------

    def measurement(self, name: str) -> str:
        """A measurement of the history, in the URL's retention policy if it names one."""
        rp = self.settings.retention_policy
        return f"{quote_ident(rp)}.{quote_ident(name)}" if rp else quote_ident(name)

    def _write_v1(self, body: str, rp: str) -> None:
        s = self.settings
        params = {"db": s.database, "precision": "ns"}
        if rp:
            params["rp"] = rp
        content = gzip.compress(body.encode(), compresslevel=self.gzip_level)
        try:
            response = self._http.post(
                "/write",
                params=params,
                content=content,
                headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"},
            )
        except httpx.HTTPError as exc:
            raise StoreUnavailable(f"{s.base_url}/write: {type(exc).__name__}: {exc}") from exc
        _check(response.status_code, response.text, f"{s.base_url}/write")

    def _write_v2(self, body: str, bucket: str) -> None:
        s = self.settings
        where = f"{s.base_url}/api/v2/write"
        try:
            self._write_api.write(
                bucket=bucket, org=s.org, record=body, write_precision=WritePrecision.NS
            )
        except ApiException as exc:
            _check(int(exc.status or 0), str(getattr(exc, "message", "") or exc.body), where)
            raise StoreError(f"{where}: {exc}") from exc  # _check raised unless 2xx: unexpected
        except (urllib3.exceptions.HTTPError, OSError, InfluxDBError) as exc:
            raise StoreUnavailable(f"{where}: {type(exc).__name__}: {exc}") from exc

    def _get_json(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        where = f"{self.settings.base_url}{path}"
        try:
            response = self._http.get(path, params=params)
        except httpx.HTTPError as exc:
            raise StoreUnavailable(f"{where}: {type(exc).__name__}: {exc}") from exc
        _check(response.status_code, response.text, where, ok=(200,))
        try:
            data = response.json()
        except ValueError as exc:
            raise StoreError(f"{where}: not JSON: {response.text[:200]!r}") from exc
        if not isinstance(data, dict):
            raise StoreError(f"{where}: unexpected answer {response.text[:200]!r}")
        return data

    def api(
        self, method: str, path: str, *, params: dict[str, str] | None = None, body: Any = None
    ) -> dict[str, Any]:
        """One call of InfluxDB 2.x's management API (``/api/v2/...``, the URL's token), its
        JSON answer (``{}`` when it has none); refused or unreachable: StoreError."""
        where = f"{self.settings.base_url}{path}"
        try:
            response = self._http.request(method, path, params=params, json=body)
        except httpx.HTTPError as exc:
            raise StoreUnavailable(f"{where}: {type(exc).__name__}: {exc}") from exc
        _check(response.status_code, response.text, where, ok=(200, 201, 204))
        if not response.content:
            return {}
        try:
            data = response.json()
        except ValueError as exc:
            raise StoreError(f"{where}: not JSON: {response.text[:200]!r}") from exc
        if not isinstance(data, dict):
            raise StoreError(f"{where}: unexpected answer {response.text[:200]!r}")
        return data

    def _post_query(self, influxql: str) -> None:
        where = f"{self.settings.base_url}/query"
        try:
            response = self._http.post("/query", data={"q": influxql})
        except httpx.HTTPError as exc:
            raise StoreUnavailable(f"{where}: {type(exc).__name__}: {exc}") from exc
        _check(response.status_code, response.text, where, ok=(200,))
        for result in response.json().get("results", []):
            if "error" in result:
                raise StoreError(f"InfluxQL error: {result['error']}")

    def _retrying(self, what: str, attempt: Callable[[], T], budget_s: float) -> T:
        """Run ``attempt``; retry StoreUnavailable with capped jittered backoff for budget_s."""
        deadline = time.monotonic() + budget_s
        delay = 0.05
        tries = 0
        while True:
            tries += 1
            try:
                return attempt()
            except StoreError as exc:
                self.failures += 1
                retry = isinstance(exc, StoreUnavailable) and time.monotonic() + delay < deadline
                log.warning(
                    "InfluxDB %s failed (attempt %d%s): %s",
                    what,
                    tries,
                    ", retrying" if retry else ", giving up",
                    exc,
                )
                if self.on_error is not None:
                    try:
                        self.on_error(exc)
                    except Exception:
                        log.exception("on_error callback failed")
                if not retry:
                    if isinstance(exc, StoreUnavailable) and tries > 1:
                        raise StoreUnavailable(
                            f"{exc} (gave up after {tries} attempts in {budget_s:g}s)"
                        ) from exc
                    raise
            time.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self.max_backoff_s)


def _time_range(since_ms: int, until_ms: int) -> tuple[int, int]:
    since_ns = max(0, int(since_ms)) * 1_000_000
    return since_ns, min(max(0, int(until_ms)) * 1_000_000, MAX_TIME_NS)


def _devices_match(device_ids: Sequence[str]) -> str:
    """``device`` is one of ``device_ids`` (a tag comparison per id, OR-ed)."""
    terms = " OR ".join(f"{quote_ident('device')} = {quote_string(d)}" for d in device_ids)
    return f"({terms})"


def _check(status: int, text: str, where: str, ok: tuple[int, ...] = (200, 204)) -> None:
    if status in ok:
        return
    detail = text.strip()[:500]
    if status == 0 or status == 429 or status >= 500:
        raise StoreUnavailable(f"{where}: HTTP {status}: {detail}")
    raise StoreError(f"{where}: HTTP {status}: {detail}")


def quote_ident(name: str) -> str:
    """An InfluxQL identifier in double quotes (backslash and quote escaped)."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_string(value: str) -> str:
    """An InfluxQL string literal in single quotes (backslash and quote escaped)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
